"""Intrinsic-dimension fine-tuning and SAID (LR-34): train a short vector inside a random subspace.

The trainable tree is an `IntrinsicParams` ``(theta, scales)``; `intrinsic_apply` maps it to full
parameters ``θ_i = θ₀_i + λ_i · P_i θ`` (SAID: one random projection ``P_i`` and one learned scale
``λ_i`` per leaf) or ``θ = θ₀ + P θ`` (direct: one projection of the whole flattened tree). The
projections are regenerated from a seed on every call and never stored; the Fastfood transform
applies them in ``O(D log D)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax import _checks

__all__ = ["IntrinsicParams", "intrinsic_apply", "intrinsic_dimension", "intrinsic_init"]

Projection = Literal["fastfood", "dense"]
_PROJECTIONS = ("fastfood", "dense")


class IntrinsicParams(NamedTuple):
    """The trainable vector of intrinsic-dimension fine-tuning."""

    theta: jax.Array  # float32 (d,) subspace coordinates, zeros at init
    scales: jax.Array  # float32 (n_leaves,) SAID scales λ_i, ones at init; (0,) for the direct form


def intrinsic_init(params: Any, *, dim: int, said: bool = True) -> IntrinsicParams:
    """Returns the zero-initialised trainable vector for `dim` trainable numbers.

    With `said`, one scale per leaf of `params` is counted inside `dim` (``theta`` gets
    ``dim − n_leaves`` entries), as SAID does; otherwise ``theta`` has `dim` entries.

    Example:
        >>> trainable = cljax.intrinsic_init({"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}, dim=10)
        >>> trainable.theta.shape, trainable.scales.shape
        ((8,), (2,))

    References:
        Aghajanyan, Zettlemoyer and Gupta, "Intrinsic Dimensionality Explains the Effectiveness
        of Language Model Fine-Tuning", ACL 2021. https://arxiv.org/abs/2012.13255
    """
    fn = "intrinsic_init"
    _checks.check_int(fn, "dim", dim, 1)
    n_leaves = len(jax.tree.leaves(params))
    if n_leaves == 0:
        raise ValueError(f"{fn}: `params` has no leaves.")
    size = dim - n_leaves if said else dim
    if size < 1:
        raise ValueError(
            f"{fn}(dim=...) must exceed the {n_leaves} per-leaf SAID scales it counts, got {dim}; "
            "raise `dim` or pass said=False."
        )
    scales = jnp.ones(n_leaves if said else 0, jnp.float32)
    return IntrinsicParams(theta=jnp.zeros(size, jnp.float32), scales=scales)


def _fwht(x: jax.Array) -> jax.Array:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) of a power-of-two-length vector."""
    n = x.shape[0]
    k = n.bit_length() - 1
    if k == 0:
        return x
    y = x.reshape((2,) * k)
    for axis in range(k):
        a = jnp.take(y, 0, axis=axis)
        b = jnp.take(y, 1, axis=axis)
        y = jnp.stack([a + b, a - b], axis=axis)
    return y.reshape(n)


def _fastfood_factors(key: jax.Array, length: int):
    kb, kp, kg = jax.random.split(key, 3)
    signs = jnp.where(jax.random.bernoulli(kb, 0.5, (length,)), 1.0, -1.0).astype(jnp.float32)
    perm = jax.random.permutation(kp, length)
    gauss = jax.random.normal(kg, (length,), jnp.float32)
    return signs, perm, gauss


def _fastfood(key: jax.Array, x: jax.Array, out_size: int) -> jax.Array:
    """``(H G Π H B x)[:D] / (sqrt(LL · ΣG²) · sqrt(D / LL))`` with ``LL`` the next power of two."""
    need = max(out_size, x.shape[0], 1)
    length = 1 << (need - 1).bit_length()
    signs, perm, gauss = _fastfood_factors(key, length)
    v = jnp.pad(x.astype(jnp.float32), (0, length - x.shape[0]))
    v = _fwht(signs * v)
    v = gauss * v[perm]
    v = _fwht(v)
    norm = jnp.sqrt(length * jnp.sum(gauss * gauss)) * math.sqrt(out_size / length)
    return v[:out_size] / norm


def _dense(key: jax.Array, x: jax.Array, out_size: int) -> jax.Array:
    """``P x`` with ``P`` ``(D, d)`` Gaussian, entries ``N(0, 1/D)``."""
    p = jax.random.normal(key, (out_size, x.shape[0]), jnp.float32) / math.sqrt(out_size)
    return p @ x.astype(jnp.float32)


def intrinsic_apply(
    trainable: IntrinsicParams, base: Any, *, seed: int = 0, projection: Projection = "fastfood"
) -> Any:
    """Returns the full parameters ``θ₀ + λ_i P_i θ`` (SAID) or ``θ₀ + P θ`` (direct form).

    Leaf ``i`` (tree order) uses the projection drawn from ``fold_in(key(seed), i)`` (direct:
    from ``key(seed)`` over the concatenated leaves); the sum is taken in float32 and cast to each
    leaf's dtype. Differentiate the loss through it to train `trainable` with any optimizer.

    Args:
        trainable: From `intrinsic_init`.
        base: The frozen pre-trained parameters ``θ₀``.
        seed: Seed of the projections (the same on every call and replica). Static.
        projection: ``'fastfood'`` (``O(D log D)``) or ``'dense'`` (a Gaussian matrix, for small
            models and tests). Static.

    Example:
        >>> base = {"w": jnp.ones((8, 4))}
        >>> out = cljax.intrinsic_apply(cljax.intrinsic_init(base, dim=4), base)
        >>> bool(jnp.all(out["w"] == 1.0))
        True
    """
    fn = "intrinsic_apply"
    _checks.check_choice(fn, "projection", projection, _PROJECTIONS)
    _checks.check_int(fn, "seed", seed, 0)
    if not isinstance(trainable, IntrinsicParams):
        raise TypeError(
            f"{fn}: `trainable` must be an IntrinsicParams from intrinsic_init, got {type(trainable).__name__}."
        )
    leaves, treedef = jax.tree.flatten(base)
    said = trainable.scales.shape[0] > 0
    if said and trainable.scales.shape[0] != len(leaves):
        raise ValueError(
            f"{fn}: `trainable.scales` has {trainable.scales.shape[0]} entries but `base` has {len(leaves)} leaves."
        )
    project = _fastfood if projection == "fastfood" else _dense
    key = jax.random.key(seed)
    if said:
        out = []
        for i, leaf in enumerate(leaves):
            size = int(np.prod(jnp.shape(leaf)))
            delta = trainable.scales[i] * project(jax.random.fold_in(key, i), trainable.theta, size)
            out.append(
                (jnp.asarray(leaf, jnp.float32) + delta.reshape(jnp.shape(leaf))).astype(
                    jnp.result_type(leaf)
                )
            )
        return treedef.unflatten(out)
    sizes = [int(np.prod(jnp.shape(leaf))) for leaf in leaves]
    flat = project(key, trainable.theta, sum(sizes))
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        delta = flat[offset : offset + size].reshape(jnp.shape(leaf))
        out.append((jnp.asarray(leaf, jnp.float32) + delta).astype(jnp.result_type(leaf)))
        offset += size
    return treedef.unflatten(out)


def intrinsic_dimension(
    dims: Sequence[int], scores: Sequence[float], *, full_score: float, fraction: float = 0.9
) -> int | None:
    """``d₉₀``: the smallest `dims` entry whose score reaches ``fraction · full_score``.

    Args:
        dims: The subspace sizes tried (any order).
        scores: Their scores (higher is better), same length, same training budget each.
        full_score: The score of full fine-tuning.
        fraction: The target fraction (0.9 for ``d₉₀``).

    Returns:
        The smallest qualifying dimension, or None when no entry qualifies.

    Example:
        >>> cljax.intrinsic_dimension([10, 100, 1000], [0.5, 0.85, 0.95], full_score=1.0)
        1000
    """
    fn = "intrinsic_dimension"
    if len(dims) != len(scores) or not dims:
        raise ValueError(
            f"{fn}: `dims` and `scores` must be non-empty and of one length, got {len(dims)} and {len(scores)}."
        )
    _checks.check_in_range(fn, "fraction", fraction, 0.0, 1.0)
    threshold = fraction * full_score
    passing = [int(d) for d, s in zip(dims, scores, strict=True) if s >= threshold]
    return min(passing) if passing else None
