"""Hierarchical layer-wise and element-wise regularisation for fine-tuning (RG-06).

Element-wise importance ``Ω`` of the parameters for general knowledge is recorded path-integral
style while the model trains on general data; fine-tuning on a domain then adds the penalty
``strength · Σ_l α_l Σ_{i∈l} Ω_i (θ_i − θ⁰_i)²`` toward the pre-trained weights ``θ⁰``, with one
coefficient ``α_l`` per layer (per parameter leaf) recomputed every step from the layers'
current penalties by a rule the caller chooses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = [
    "HierarchicalRegState",
    "hierarchical_layer_penalties",
    "hierarchical_reg",
    "hierarchical_reg_record",
]

_f32 = jnp.float32

LayerWeights = Callable[[jax.Array], jax.Array]


class HierarchicalRegState(NamedTuple):
    """State of `hierarchical_reg`."""

    path_integral: optax.Params  # Σ |g ⊙ Δθ| since the last record, float32
    importance: optax.Params  # Ω, float32; zeros = nothing protected yet
    anchor: optax.Params  # θ⁰, the parameters at `init` (the pre-trained model)
    start: optax.Params  # θ at the last record (or at `init`)
    damping: chex.Array  # float32 ξ, read by `hierarchical_reg_record`
    inner: optax.OptState  # the wrapped optimizer's state


def _layer_penalties(params, anchor, importance) -> jax.Array:
    """``R_l = Σ_{i∈l} Ω_i (θ_i − θ⁰_i)²`` per non-empty leaf, in tree order, float32."""
    values = []
    for p, a, o in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(anchor, is_leaf=_common.is_masked),
        jax.tree.leaves(importance, is_leaf=_common.is_masked),
        strict=True,
    ):
        if _common.is_masked(o):
            continue
        d = p.astype(_f32) - a.astype(_f32)
        values.append(jnp.sum(o * d * d))
    return jnp.stack(values) if values else jnp.zeros((0,), _f32)


def hierarchical_reg(
    inner: optax.GradientTransformation,
    strength: chex.Numeric,
    damping: chex.Numeric = 0.1,
    *,
    layer_weights: LayerWeights | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Importance-weighted pull toward the pre-trained weights, with layer-wise coefficients.

    Each step, with the raw task gradient ``g`` and ``R_l = Σ_{i∈l} Ω_i (θ_i − θ⁰_i)²`` for every
    parameter leaf ``l``:

    1. ``α = layer_weights(R)`` (all ones without `layer_weights`), held constant in the step;
    2. adds the gradient of ``strength · Σ_l α_l R_l``, i.e. ``2 · strength · α_l Ω ⊙ (θ − θ⁰)``,
       to ``g``;
    3. runs `inner` on the penalised gradient, giving the update ``u`` (the parameter change);
    4. accumulates the path integral ``w ← w + |g ⊙ u|`` with the unpenalised gradient.

    `hierarchical_reg_record` turns ``w`` into importance, ``Ω += w / ((θ − θ_start)² + ξ)``:
    train on general data with ``Ω = 0`` (plain fine-tuning), record, then fine-tune on the
    domain. The anchor ``θ⁰`` stays the parameters given to `init` (the pre-trained model), not
    the end of the general phase. `inner` must be the whole optimizer, learning rate included.

    Args:
        inner: The optimizer whose final update is the parameter change, e.g. ``optax.adam(1e-4)``.
        strength: The penalty strength (the paper's regularisation weight).
        damping: ``ξ`` of `hierarchical_reg_record`; stored in the state at `init`.
        layer_weights: The coefficient rule: a function from the ``(L,)`` float32 vector of
            per-leaf penalties ``R`` (leaves in tree order, masked ones left out) to ``(L,)``
            non-negative coefficients ``α``, e.g. ``lambda r: r.size * r / (r.sum() + 1e-12)``
            (more weight on the layers that drift most from their important weights). Its
            output is not differentiated. None: ``α_l = 1``. Static.

    Returns:
        A transform whose state is a `HierarchicalRegState` wrapping `inner`'s state; `update`
        needs `params` and passes extra arguments on to `inner`.

    Raises:
        ValueError: for a negative `strength` or a non-positive `damping`; when `layer_weights`
            returns the wrong shape.
        TypeError: when `inner` is not a gradient transformation or `layer_weights` is not
            callable.

    Example:
        >>> tx = cljax.hierarchical_reg(optax.sgd(1.0), strength=1.0)
        >>> params = {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
        >>> state.path_integral["w"]  # |g ⊙ u| = g²
        Array([1., 4.], dtype=float32)

    References:
        Song et al., "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical
        Layer-Wise and Element-Wise Regularization", 2025. https://arxiv.org/abs/2501.13669
    """
    fn = "hierarchical_reg"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)
    _checks.check_in_range(fn, "damping", damping, 0.0, math.inf, low_inclusive=False)
    if layer_weights is not None and not callable(layer_weights):
        raise TypeError(
            f"{fn}(layer_weights=...) must be a function from the (L,) per-layer penalties to "
            f"(L,) coefficients, or None; got {type(layer_weights).__name__}."
        )
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params):
        return HierarchicalRegState(
            path_integral=optax.tree.zeros_like(params, dtype=_f32),
            importance=optax.tree.zeros_like(params, dtype=_f32),
            anchor=_common.copy_tree(params),
            start=_common.copy_tree(params),
            damping=jnp.asarray(damping, _f32),
            inner=inner_tx.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params(fn, params)
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_common.is_none)
        p_leaves = treedef.flatten_up_to(params)
        a_leaves = treedef.flatten_up_to(state.anchor)
        o_leaves = treedef.flatten_up_to(state.importance)
        live = [i for i, g in enumerate(leaves) if g is not None and not _common.is_masked(g)]
        if layer_weights is None:
            alpha = jnp.ones((len(live),), _f32)
        else:
            r = _layer_penalties(
                [p_leaves[i] for i in live],
                [a_leaves[i] for i in live],
                [o_leaves[i] for i in live],
            )
            alpha = jnp.asarray(layer_weights(r))
            if alpha.shape != r.shape:
                raise ValueError(
                    f"{fn}: `layer_weights` returned shape {alpha.shape} for {r.shape[0]} layers; "
                    f"it must return one coefficient per layer, shape {r.shape}."
                )
            alpha = jax.lax.stop_gradient(alpha.astype(_f32))
        out_leaves = list(leaves)
        for j, i in enumerate(live):
            out_leaves[i] = _common.quadratic_leaf(
                leaves[i], p_leaves[i], a_leaves[i], o_leaves[i], 2.0 * strength * alpha[j]
            )
        penalised = jax.tree.unflatten(treedef, out_leaves)
        out, inner_state = inner_tx.update(penalised, state.inner, params, **extra_args)
        path = jax.tree.map(
            lambda w, g, u: None if g is None else w + jnp.abs(g.astype(_f32) * u.astype(_f32)),
            state.path_integral,
            updates,
            out,
            is_leaf=_common.is_none,
        )
        return out, state._replace(path_integral=path, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hierarchical_reg_record(opt_state: Any, params: Any, *, index: int | None = None) -> Any:
    """Records importance: ``Ω += w / ((θ − θ_start)² + ξ)``, then ``w ← 0``, ``θ_start ← θ``.

    Call it at the end of the general-knowledge phase (and after any later phase whose knowledge
    should be protected too). The anchor ``θ⁰`` does not move.

    Args:
        opt_state: The whole optimizer state holding one `HierarchicalRegState`.
        params: The current parameters.
        index: Which `HierarchicalRegState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the `HierarchicalRegState` updated (the inner state is untouched).

    Raises:
        ValueError: when `opt_state` holds no (or several) `HierarchicalRegState`, or `params`
            does not match the parameters the transform was initialised with.

    Example:
        >>> tx = cljax.hierarchical_reg(optax.sgd(1.0), strength=1.0, damping=1.0)
        >>> params = {"w": jnp.zeros(1)}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": jnp.ones(1)}, state, params)  # w = |1 · -1| = 1
        >>> state = cljax.hierarchical_reg_record(state, optax.apply_updates(params, u))
        >>> state.importance["w"]  # 1 / (1² + 1)
        Array([0.5], dtype=float32)
    """
    fn = "hierarchical_reg_record"
    state = _common.find_one(fn, opt_state, HierarchicalRegState, index)
    new = state._replace(**_common.record_path_integral(fn, state, params))
    return _common.replace_one(opt_state, new, index)


def hierarchical_layer_penalties(
    opt_state: Any, params: Any, *, index: int | None = None
) -> jax.Array:
    """Returns the per-layer penalties ``R_l = Σ_{i∈l} Ω_i (θ_i − θ⁰_i)²`` of `hierarchical_reg`.

    Args:
        opt_state: The whole optimizer state holding one `HierarchicalRegState`.
        params: The current parameters.
        index: Which `HierarchicalRegState` when `opt_state` holds several.

    Returns:
        A ``(L,)`` float32 vector, leaves in tree order (masked leaves left out). The total
        penalty is ``strength · Σ_l α_l R_l``.

    Raises:
        ValueError: as `hierarchical_reg_record`.

    Example:
        >>> tx = cljax.hierarchical_reg(optax.sgd(1.0), strength=1.0)
        >>> state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
        >>> cljax.hierarchical_layer_penalties(state, {"a": jnp.ones(2), "b": jnp.ones(3)})
        Array([0., 0.], dtype=float32)
    """
    fn = "hierarchical_layer_penalties"
    state = _common.find_one(fn, opt_state, HierarchicalRegState, index)
    _common.map_like_state(fn, lambda s, _: s, state.start, {"params": params})
    is_masked = _common.is_masked
    pairs = [
        (p, a, o)
        for p, a, o in zip(
            jax.tree.leaves(params, is_leaf=is_masked),
            jax.tree.leaves(state.anchor, is_leaf=is_masked),
            jax.tree.leaves(state.importance, is_leaf=is_masked),
            strict=True,
        )
        if not is_masked(o)
    ]
    return _layer_penalties(
        [p for p, _, _ in pairs], [a for _, a, _ in pairs], [o for _, _, o in pairs]
    )
