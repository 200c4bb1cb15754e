"""Conflict-dropping projection onto a reference direction (FedGP, OR-15).

``proj+(a on b) = max(<a, b>, 0) / <b, b> * b``: the part of `a` along `b`, dropped entirely when
`a` conflicts with `b`. Inner products run over all leaves jointly. FedGP aggregates source
updates this way onto the target domain's update; the sibling of A-GEM (which removes the
conflicting part instead of keeping only the agreeing one).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from cljax import _checks
from cljax.transforms.orthogonal import _common

__all__ = ["fedgp_aggregate", "fedgp_project"]


def _pairs(fn: str, arg: str, tree: Any, other: Any, lead=()):
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_common.is_empty)
    others = _common.aligned_leaves(fn, arg, tree, other, lead=lead)
    plain = [None if _common.is_empty(x) else x for x in leaves]
    return plain, others, leaves, treedef


def _coefficient(a_leaves, b_leaves) -> jax.Array:
    dot = _common.tree_dot(a_leaves, b_leaves)
    sq = _common.tree_dot(b_leaves, b_leaves)
    return jnp.where((dot > 0) & (sq > 0), dot / jnp.where(sq > 0, sq, 1.0), 0.0)


def fedgp_project(update: Any, reference: Any) -> Any:
    """Returns ``max(<update, reference>, 0) / <reference, reference> * reference``.

    Inner products over all leaves jointly, in float32; the result has `reference`'s direction,
    the params' structure and `update`'s dtypes. A zero `reference` or a conflicting `update`
    gives zeros.

    Args:
        update: A tree (e.g. a source client's update).
        reference: A tree with the same structure (e.g. the target domain's update).

    Returns:
        The non-conflicting projection of `update` onto `reference`.

    Example:
        >>> cljax.fedgp_project({"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([2.0, 0.0])})["w"]
        Array([1., 0.], dtype=float32)

    References:
        Jiang et al., "Principled Federated Domain Adaptation: Gradient Projection and
        Auto-Weighting", 2024.
    """
    plain, refs, leaves, treedef = _pairs("fedgp_project", "reference", update, reference)
    coef = _coefficient(plain, refs)
    out = [
        leaf if u is None else (coef * jnp.asarray(r, jnp.float32)).astype(u.dtype)
        for u, r, leaf in zip(plain, refs, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def fedgp_aggregate(
    target: Any,
    sources: Any,
    *,
    beta: chex.Numeric = 0.5,
    weights: jax.Array | None = None,
) -> Any:
    """FedGP aggregation: ``beta * g_T + (1 - beta) * sum_i w_i proj+(g_S_i on g_T)``.

    Args:
        target: The target domain's update ``g_T`` (a tree).
        sources: The source updates stacked along a leading axis: leaves ``(S,) + leaf.shape``.
        beta: Weight of the target update, in [0, 1]. (The paper also derives ``beta`` from
            estimated domain divergences; pass that value here.)
        weights: ``(S,)`` source weights ``w_i`` (default ``1 / S`` each, e.g. replace by data
            shares).

    Returns:
        The aggregated update, with `target`'s structure and dtypes.

    Example:
        >>> target = {"w": jnp.array([1.0, 0.0])}
        >>> sources = {"w": jnp.array([[2.0, 5.0], [-1.0, 3.0]])}
        >>> cljax.fedgp_aggregate(target, sources, beta=0.5)["w"]  # the second conflicts
        Array([1., 0.], dtype=float32)

    References:
        Jiang et al., "Principled Federated Domain Adaptation: Gradient Projection and
        Auto-Weighting", 2024.
    """
    fn = "fedgp_aggregate"
    _checks.check_in_range(fn, "beta", beta, 0.0, 1.0)
    firsts = [x for x in jax.tree.leaves(sources) if x is not None]
    if not firsts or jnp.ndim(firsts[0]) < 1:
        raise ValueError(
            f"{fn}: `sources` must hold arrays with a leading source axis, (S,) + leaf.shape."
        )
    count = int(jnp.shape(firsts[0])[0])
    if weights is None:
        w = jnp.full((count,), 1.0 / count, jnp.float32)
    else:
        w = jnp.asarray(weights, jnp.float32)
        if w.shape != (count,):
            raise ValueError(
                f"{fn}: `weights` has shape {tuple(w.shape)}; it must be ({count},), one per source."
            )
    plain, srcs, leaves, treedef = _pairs(fn, "sources", target, sources, lead=(count,))
    live = [(t, s) for t, s in zip(plain, srcs, strict=True) if t is not None]
    t32 = [t.astype(jnp.float32) for t, _ in live]
    s32 = [jnp.asarray(s, jnp.float32) for _, s in live]
    sq = _common.tree_dot(t32, t32)
    dots = sum(
        jnp.matmul(s.reshape(count, -1), t.reshape(-1), precision=jax.lax.Precision.HIGHEST)
        for s, t in zip(s32, t32, strict=True)
    )
    coefs = jnp.where((dots > 0) & (sq > 0), dots / jnp.where(sq > 0, sq, 1.0), 0.0)
    scale = beta + (1.0 - beta) * jnp.sum(w * coefs)
    out = [
        leaf if t is None else (scale * t.astype(jnp.float32)).astype(t.dtype)
        for t, leaf in zip(plain, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
