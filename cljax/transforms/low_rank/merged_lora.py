"""LoRA trained on merged weights: the adapters live in the optimizer state (EX-17's updates).

LoRA trains ``W = W₀ + s · a b`` (``a`` of shape ``(m, r)``, ``b`` of shape ``(r, n)`` in a leaf's
matrix view; `cljax.lora_init`'s convention). Its factor gradients are functions of the dense
gradient ``G = ∂L/∂W`` at the current ``W``::

    ∂L/∂a = s · G bᵀ,        ∂L/∂b = s · aᵀ G.

So the same training can run on plain (merged) parameters: `merged_lora` keeps ``a``, ``b`` and
the inner optimizer's state over them, turns the incoming dense gradient into the factor
gradients, runs `inner` on them, and returns the dense update the factor step makes::

    a' = a + Δa,   b' = b + Δb,   u = s · (a' b' − a b) = s · (Δa b' + a Δb).

After ``optax.apply_updates`` the parameters equal ``W₀ + s · a' b'``: exactly the LoRA model,
always merged (up to the rounding of the running sum). `merged_lora_reset` starts a new adapter
(fresh ``a``, ``b = 0``, a freshly initialised inner state) at a task boundary: the per-task
"merge, then reset the adapter and its optimizer state" protocol of incremental low-rank updates,
with nothing to merge. The model's code never sees adapters, and its state holds only the
factors and their optimizer statistics (the dense gradient is still formed by autodiff).

Leaves that get no adapter (vectors, or those `targets` leaves out) are frozen
(``others='frozen'``, PEFT's default) or trained by their own copy of `inner`
(``others='train'``, e.g. biases and norms), which a reset leaves alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.low_rank.lora import _INITS, Init, _factors, _layout, _scale
from cljax.tree import MatrixSpec, as_matrices, from_matrices

__all__ = ["MergedLoraState", "merged_lora", "merged_lora_reset"]

_F32 = jnp.float32


class MergedLoraState(NamedTuple):
    """State of `merged_lora`."""

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data the factors are drawn from
    resets: chex.Array  # int32 adapters started after the first (draw ``fold_in(key, resets)``)
    pending: chex.Array  # bool: `merged_lora_reset` was called; the next update starts an adapter
    a: Any  # float32 (*batch, m, r) per adapted leaf, None elsewhere
    b: Any  # float32 (*batch, r, n) per adapted leaf, None elsewhere
    inner_state: Any  # `inner`'s state over the pair of factor trees ``(a, b)``
    others_state: Any  # `inner`'s state over the leaves without an adapter (``others='train'``)


def merged_lora(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
    init: Init = "kaiming_uniform",
    rslora: bool = False,
    others: Literal["frozen", "train"] = "frozen",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """LoRA of rank `rank` on plain parameters: factors and their optimizer state in the state.

    For each adapted leaf (matrix view ``(m, n)``, one adapter per matrix of a stacked leaf) the
    update is ``u = s · (a' b' − a b)`` where ``(a', b')`` is one step of `inner` on the factor
    gradients ``(s · G bᵀ, s · aᵀ G)`` of the incoming gradient ``G`` (module docstring). Applied
    to parameters ``W₀``, the steps give ``W₀ + s · a b`` for the current factors, as training
    `cljax.lora_init` factors through `cljax.lora_apply` does, with the same initial factors
    (``fold_in(key(seed), i)`` for leaf ``i``) and ``s = alpha / r`` (``alpha / sqrt(r)`` with
    `rslora`; 1 without `alpha`). Factors and the factor math are float32; the update has the
    gradient's dtype.

    Args:
        inner: The adapters' optimizer (e.g. ``optax.adamw(1e-3)``, decay included: it sees the
            factors as its parameters).
        rank: Adapter rank ``r`` (at most ``min(m, n)`` is useful; larger is allowed). Static.
        alpha: Scale numerator (None: ``s = 1``). Static.
        targets: Function ``params -> tree of bools`` choosing the adapted leaves (e.g.
            ``cljax.select("kernel")``); default every leaf with at least two dims. Static.
        matrix_spec: Matrix view of the adapted leaves. Static.
        init: ``'kaiming_uniform'`` (PEFT: ``a ~ U(±1/sqrt(m))``, ``b = 0``) or ``'gaussian'``
            (``a ~ N(0, 1/r²)``, ``b = 0``). Static.
        rslora: ``s = alpha / sqrt(r)``. Static.
        others: ``'frozen'`` (``u = 0`` on leaves without an adapter) or ``'train'`` (`inner` on
            them, with its own state, untouched by resets). Static.
        seed: Seed of the factor draws. Static.

    Returns:
        A transform whose state is `MergedLoraState`.

    Raises:
        ValueError: a bad rank, alpha, init or `others`; a targeted leaf with fewer than two dims.

    Example:
        >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
        >>> tx = cljax.merged_lora(optax.sgd(0.1), rank=1)
        >>> state = tx.init(params)
        >>> grads = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
        >>> u, state = tx.update(grads, state)
        >>> int(jnp.linalg.matrix_rank(u["w"])), float(jnp.abs(u["b"]).sum())
        (1, 0.0)

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
        "An Empirical Analysis of Forgetting in Pre-trained Models with Incremental Low-Rank
        Updates", 2024.
    """
    fn = "merged_lora"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "rank", rank, 1)
    _checks.check_int(fn, "seed", seed, 0)
    if init not in _INITS or init == "svd_form":
        raise ValueError(
            f"{fn}(init=...) must be 'kaiming_uniform' or 'gaussian', got {init!r} (the gated "
            "'svd_form' needs its gates trained, which this transform does not hold)."
        )
    _checks.check_choice(fn, "others", others, ("frozen", "train"))
    if alpha is not None:
        _checks.check_in_range(fn, "alpha", alpha, 0.0, math.inf, low_inclusive=False)
    scale = _scale(rank, alpha, rslora)
    inner = optax.with_extra_args_support(inner)
    key0 = jax.random.key_data(jax.random.key(seed))

    def layout(params):
        """Per leaf: None (no adapter) or ``(name, batch_shape, m, n)``; and the treedef."""
        _, treedef, plan = _layout(fn, params, targets, matrix_spec)
        return plan, treedef

    def draw(key_data, plan, treedef):
        key = jax.random.wrap_key_data(key_data)
        a_leaves, b_leaves = [], []
        for i, entry in enumerate(plan):
            if entry is None:
                a_leaves.append(None)
                b_leaves.append(None)
                continue
            _, batch, m, n = entry
            a, b, _ = _factors(jax.random.fold_in(key, i), batch, m, n, rank, init, _F32)
            a_leaves.append(a)
            b_leaves.append(b)
        return treedef.unflatten(a_leaves), treedef.unflatten(b_leaves)

    def others_tree(tree, plan, treedef):
        leaves = treedef.flatten_up_to(tree)
        return treedef.unflatten(
            [x if entry is None else None for x, entry in zip(leaves, plan, strict=True)]
        )

    def init_fn(params):
        plan, treedef = layout(params)
        a, b = draw(key0, plan, treedef)
        others_state = None
        if others == "train":
            others_state = inner.init(others_tree(params, plan, treedef))
        return MergedLoraState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            resets=jnp.zeros([], jnp.int32),
            pending=jnp.zeros([], jnp.bool_),
            a=a,
            b=b,
            inner_state=inner.init((a, b)),
            others_state=others_state,
        )

    def update_fn(updates, state, params=None, **extra_args):
        plan, treedef = layout(updates)
        g_leaves = treedef.flatten_up_to(updates)

        def restart(_):
            resets = state.resets + 1
            key = jax.random.key_data(
                jax.random.fold_in(jax.random.wrap_key_data(state.key), resets)
            )
            a, b = draw(key, plan, treedef)
            return resets, a, b, inner.init((a, b))

        def keep(_):
            return state.resets, state.a, state.b, state.inner_state

        resets, a, b, inner_state = lax.cond(state.pending, restart, keep, None)
        a_leaves = treedef.flatten_up_to(a)
        b_leaves = treedef.flatten_up_to(b)

        ga, gb = [], []
        for g, entry, fa, fb in zip(g_leaves, plan, a_leaves, b_leaves, strict=True):
            if entry is None:
                ga.append(None)
                gb.append(None)
                continue
            name, batch, m, n = entry
            gm = as_matrices(g.astype(_F32), matrix_spec, name)  # (B, m, n)
            am, bm = fa.reshape(-1, m, rank), fb.reshape(-1, rank, n)
            ga.append((scale * jnp.einsum("bmn,brn->bmr", gm, bm)).reshape(fa.shape))
            gb.append((scale * jnp.einsum("bmr,bmn->brn", am, gm)).reshape(fb.shape))
        grads = (treedef.unflatten(ga), treedef.unflatten(gb))
        (da, db), inner_state = inner.update(grads, inner_state, (a, b), **extra_args)

        new_a, new_b, out = [], [], []
        da_leaves, db_leaves = treedef.flatten_up_to(da), treedef.flatten_up_to(db)
        for g, entry, fa, fb, ua, ub in zip(
            g_leaves, plan, a_leaves, b_leaves, da_leaves, db_leaves, strict=True
        ):
            if entry is None:
                new_a.append(None)
                new_b.append(None)
                out.append(None if g is None else jnp.zeros_like(g))
                continue
            name, batch, m, n = entry
            a1 = fa + ua.astype(_F32)
            b1 = fb + ub.astype(_F32)
            # s (a' b' - a b) = s (da b' + a db): no cancellation between two large products.
            delta = jnp.einsum(
                "bmr,brn->bmn", ua.astype(_F32).reshape(-1, m, rank), b1.reshape(-1, rank, n)
            ) + jnp.einsum(
                "bmr,brn->bmn", fa.reshape(-1, m, rank), ub.astype(_F32).reshape(-1, rank, n)
            )
            out.append(from_matrices(scale * delta, matrix_spec, g.shape, name).astype(g.dtype))
            new_a.append(a1)
            new_b.append(b1)
        out = treedef.unflatten(out)

        others_state = state.others_state
        if others == "train":
            trained, others_state = inner.update(
                others_tree(updates, plan, treedef),
                others_state,
                None if params is None else others_tree(params, plan, treedef),
                **extra_args,
            )
            t_leaves = treedef.flatten_up_to(trained)
            o_leaves = treedef.flatten_up_to(out)
            out = treedef.unflatten(
                [
                    o if entry is not None else t
                    for o, t, entry in zip(o_leaves, t_leaves, plan, strict=True)
                ]
            )
        return out, MergedLoraState(
            count=optax.safe_increment(state.count),
            key=state.key,
            resets=resets,
            pending=jnp.zeros([], jnp.bool_),
            a=treedef.unflatten(new_a),
            b=treedef.unflatten(new_b),
            inner_state=inner_state,
            others_state=others_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def merged_lora_reset(opt_state: Any, *, index: int | None = None) -> Any:
    """Starts a new adapter in `merged_lora`'s state (a task boundary). Call between steps.

    The adapter trained so far is already merged into the parameters. The next update draws
    fresh factors (``a`` random from ``fold_in(key, resets)``, ``b = 0``) and re-initialises
    `inner`'s state over them (``inner.init``, exact for any inner optimizer) before it steps, so
    the model function is unchanged by the reset. The state of the leaves trained without an
    adapter (``others='train'``) is kept. No recompilation: only a flag in the state changes.

    Args:
        opt_state: The whole optimizer state holding one `MergedLoraState` (or several: pick one
            with `index`).
        index: Which `MergedLoraState`, in tree order, when there are several.

    Returns:
        `opt_state` with the reset requested.

    Raises:
        ValueError: no `MergedLoraState` in `opt_state`, or several and no `index`.

    Example:
        >>> tx = cljax.merged_lora(optax.adam(1e-3), rank=1)
        >>> state = cljax.merged_lora_reset(tx.init({"w": jnp.zeros((4, 3))}))
        >>> bool(state.pending)
        True
    """
    fn = "merged_lora_reset"
    try:
        state = _tree.find_state(opt_state, MergedLoraState, index=index)
    except ValueError as err:
        raise ValueError(f"{fn}: {str(err).removeprefix('find_state: ')}") from err
    new = state._replace(pending=jnp.ones_like(state.pending))
    return _tree.replace_state(opt_state, new, index=index)
