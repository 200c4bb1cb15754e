"""Operations on masked weights: decay on masked-out entries (AST, SR-STE), sparsity-preserving
merges (PERP, SQFT), sparse model soups and the straight-through mask.

* `masked_decay` — decoupled (or coupled) decay on the entries a mask function selects.
* `masked_merge` — ``(W + delta) * M``: an adapter merge that keeps the sparsity pattern.
* `sparse_soup` — the average of models sharing one mask, checked and exactly as sparse.
* `straight_through_mask` — ``W * M`` in the forward pass with the dense gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.sparse import _common

__all__ = [
    "MaskedDecayState",
    "masked_decay",
    "masked_merge",
    "sparse_soup",
    "straight_through_mask",
]


# ---------------------------------------------------------------------------------------------
# Masked decay, merges and the straight-through mask.


class MaskedDecayState(NamedTuple):
    """State of `masked_decay` with a scheduled `weight_decay`."""

    count: chex.Array  # int32 step count fed to the schedule


def masked_decay(
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    *,
    mask_fn: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adds decay ``weight_decay * M * p`` only on the entries `mask_fn` selects.

    ``mask_fn(params)`` returns a tree of boolean arrays (True where the decay applies), Python
    bools or None (no decay) per leaf; without it every entry decays (``optax.add_decayed_weights``).
    Decay on the masked-out weights of an N:M mask gives AST's and SR-STE's term
    ``lambda * (1 - M) * W``: ``mask_fn=lambda p: jax.tree.map(lambda w: ~cljax.nm_mask(w, 2, 4,
    axis=0), p)``. Placed before the inner optimizer it is a coupled penalty gradient (SR-STE);
    placed after the direction and before `optax.scale_by_learning_rate` it is decoupled (AST).

    Args:
        weight_decay: The decay strength, a float or a schedule of the step count.
        mask_fn: ``params -> mask tree``; evaluated every step on the current parameters. Static.

    Returns:
        A transform with an empty state (a step count when `weight_decay` is a schedule).

    Raises:
        ValueError: a negative decay; at `update`, missing `params`.

    Example:
        >>> tx = cljax.masked_decay(0.1, mask_fn=lambda p: jax.tree.map(lambda w: w < 0, p))
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> tx.update({"w": jnp.zeros(2)}, tx.init(params), params)[0]["w"]
        Array([ 0. , -0.2], dtype=float32)

    References:
        Huang et al., "Pruning Large Language Models with Semi-Structural Adaptive Sparse
        Training", 2024. https://arxiv.org/abs/2407.20584
    """
    fn = "masked_decay"
    scheduled = callable(weight_decay)
    if not scheduled:
        _checks.check_in_range(fn, "weight_decay", weight_decay, 0.0)
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(
            f"{fn}(mask_fn=...) must be a function of the params, got {type(mask_fn).__name__}."
        )

    def init_fn(params):
        del params
        if scheduled:
            return MaskedDecayState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        if scheduled:
            strength = weight_decay(state.count)
            state = MaskedDecayState(count=optax.safe_increment(state.count))
        else:
            strength = weight_decay
        if mask_fn is None:
            masks = jax.tree.map(
                lambda p: None if p is None else True, params, is_leaf=_common.is_none
            )
        else:
            masks = mask_fn(params)

        def leaf(u, p, m):
            if u is None:
                return None
            if m is None or m is False:
                return u
            decay = jnp.asarray(strength, jnp.float32) * p.astype(jnp.float32)
            if m is not True:
                decay = jnp.where(m, decay, jnp.zeros_like(decay))
            return (u.astype(jnp.float32) + decay).astype(u.dtype)

        out = jax.tree.map(leaf, updates, params, masks, is_leaf=_common.is_none)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked_merge(params: Any, delta: Any, masks: Any) -> Any:
    """Returns ``(W + delta) * M`` per leaf: an adapter merge that keeps the sparsity pattern.

    PERP's MaskLoRA merge (``delta = s * B @ A``) and SQFT's SparsePEFT merge (``W + delta *
    1[W != 0]``; equal when ``W`` is already zero outside ``M``). Keep the mask explicitly rather
    than deriving it from ``W != 0``, which would treat accidental exact zeros as pruned.

    Args:
        params: The (sparse) weights.
        delta: The adapter delta, a tree with the structure of `params` (None leaves: no delta).
        masks: Boolean masks with the structure of `params` (None leaves: dense).

    Returns:
        The merged weights, in the dtypes of `params`.

    Raises:
        ValueError: a delta or mask whose shape differs from its parameter's.

    Example:
        >>> w = jnp.array([1.0, 0.0, 2.0])
        >>> cljax.masked_merge({"w": w}, {"w": jnp.ones(3)}, {"w": w != 0})["w"]
        Array([2., 0., 3.], dtype=float32)

    References:
        Zimmer et al., "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs", 2023.
        https://arxiv.org/abs/2312.15230 ; Muñoz et al., "SQFT: Low-cost Model Adaptation in
        Low-precision Sparse Foundation Models", EMNLP Findings 2024.
        https://arxiv.org/abs/2410.03750
    """
    fn = "masked_merge"
    deltas = _common.by_path(delta, fn, "delta")
    masks_by = _common.by_path(masks, fn, "masks")

    def leaf(path, p):
        if p is None:
            return None
        name = _common.path_name(path)
        d, m = deltas.get(name), masks_by.get(name)
        for arg, x in (("delta", d), ("masks", m)):
            if x is not None and tuple(jnp.shape(x)) != tuple(jnp.shape(p)):
                raise ValueError(
                    f"{fn}: leaf '{name or '<root>'}' has shape {tuple(jnp.shape(p))} in `params` but "
                    f"{tuple(jnp.shape(x))} in `{arg}`."
                )
        out = (
            p.astype(jnp.float32)
            if d is None
            else p.astype(jnp.float32) + jnp.asarray(d, jnp.float32)
        )
        if m is not None:
            out = jnp.where(m, out, jnp.zeros_like(out))
        return out.astype(p.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_common.is_none)


def sparse_soup(models: Any, masks: Any = None) -> Any:
    """Averages models that share one sparsity pattern; the soup is exactly as sparse.

    Sparse Model Soups: the copies retrained from one pruned model (different seeds, orders,
    hyper-parameters) share its mask, so their uniform average keeps it. The shared support is
    checked first: with `masks`, every model must be zero outside them; without, every model
    must have the first model's zero pattern. Averaging copies with different masks would
    destroy the sparsity, so it is an error. The mean accumulates in float32.

    Args:
        models: A non-empty list of parameter trees of one structure.
        masks: Boolean masks with the structure of the parameters (None leaves: dense), or None
            to use the first model's nonzeros.

    Returns:
        ``mean(models) * M`` in the dtypes of the first model.

    Raises:
        ValueError: an empty list; trees of different structure or shapes; a model that is
            nonzero outside the mask, or whose zero pattern differs (checked on concrete values).

    Example:
        >>> a, b = {"w": jnp.array([1.0, 0.0, 3.0])}, {"w": jnp.array([3.0, 0.0, 1.0])}
        >>> cljax.sparse_soup([a, b])["w"]
        Array([2., 0., 2.], dtype=float32)

    References:
        Zimmer, Spiegel and Pokutta, "Sparse Model Soups: A Recipe for Improved Pruning via Model
        Averaging", ICLR 2024. https://arxiv.org/abs/2306.16788
    """
    fn = "sparse_soup"
    if not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"{fn}: `models` must be a non-empty list of parameter trees.")
    for i, m in enumerate(models[1:], start=1):
        _checks.check_same_structure(fn, **{"models[0]": models[0], f"models[{i}]": m})
    if masks is None:
        support = jax.tree.map(
            lambda x: None if x is None else x != 0, models[0], is_leaf=_common.is_none
        )
    else:
        _checks.check_same_structure(fn, models=models[0], masks=masks)
        support = masks
    leaves = jax.tree_util.tree_flatten_with_path(support, is_leaf=_common.is_none)[0]
    for i, model in enumerate(models):
        for (path, m), x in zip(
            leaves, jax.tree.leaves(model, is_leaf=_common.is_none), strict=True
        ):
            if m is None or x is None:
                continue
            m_np, x_np = _common.concrete_bool(m), _common.concrete_bool(x)
            if m_np is None or x_np is None:
                continue
            outside = x_np & ~m_np
            if outside.any():
                raise ValueError(
                    f"{fn}: models[{i}] leaf '{_common.path_name(path) or '<root>'}' is nonzero at {int(outside.sum())} "
                    "entries outside the shared mask; soups need one sparsity pattern (prune the copies "
                    "with the same mask first)."
                )
            if masks is None and (m_np & ~x_np).any():
                raise ValueError(
                    f"{fn}: models[{i}] leaf '{_common.path_name(path) or '<root>'}' has a different zero pattern "
                    "from models[0]; pass the shared `masks` explicitly if exact zeros are expected."
                )
    n = len(models)

    def leaf(m, *xs):
        if xs[0] is None:
            return None
        mean = sum(jnp.asarray(x, jnp.float32) for x in xs) / n
        if m is not None:
            mean = jnp.where(m, mean, jnp.zeros_like(mean))
        return mean.astype(xs[0].dtype)

    return jax.tree.map(leaf, support, *models, is_leaf=_common.is_none)


def straight_through_mask(params: Any, masks: Any) -> Any:
    """Returns ``W * M`` in the forward pass with the gradient of the dense ``W``.

    The straight-through estimator of SR-STE and AST: the loss sees the sparse weights, and every
    entry (pruned ones included) receives the gradient taken at ``W * M``, so a mask recomputed
    from the trained dense weights can change. Leaves with a None mask pass unchanged.

    Example:
        >>> w = jnp.array([1.0, 2.0])
        >>> f = lambda w: jnp.sum(cljax.straight_through_mask(w, jnp.array([True, False])) ** 2)
        >>> float(f(w)), jax.grad(f)(w)
        (1.0, Array([2., 0.], dtype=float32))

    References:
        Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
        ICLR 2021. https://arxiv.org/abs/2102.04010
    """

    def leaf(p, m):
        if p is None or m is None:
            return p
        sparse = jnp.where(m, p, jnp.zeros_like(p))
        return p + jax.lax.stop_gradient(sparse - p)

    return jax.tree.map(leaf, params, masks, is_leaf=_common.is_none)
