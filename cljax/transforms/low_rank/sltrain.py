"""SLTrain: sparse plus low-rank weights trained from scratch (LR-04), as pure pytree functions.

A targeted ``(m, n)`` matrix (a Flax kernel, ``(d_in, d_out)``) is ``W = s · a b + S``: ``a`` is
``(m, r)`` Kaiming-uniform, ``b`` is ``(r, n)`` zeros, ``s = alpha / r``, and ``S`` holds trainable
values on a fixed random support of ``⌊density · m · n⌋`` entries, drawn once from a key and
regenerable from it. The support is an int32 index buffer kept *outside* the trainable tree, so
gradients and optimizer state exist only for ``a``, ``b`` and the values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from cljax import _checks
from cljax.kernels import _sltrain as _kernels_sltrain
from cljax.tree import MatrixSpec, from_matrices, matrix_shape

__all__ = [
    "SparseLowRankWeight",
    "sltrain_apply",
    "sltrain_init",
    "sltrain_materialize",
    "sltrain_support",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b", "values"],
    meta_fields=["scale", "shape", "spec"],
)
@dataclasses.dataclass(frozen=True)
class SparseLowRankWeight:
    """The trainable part of an SLTrain weight: ``W = scale · a b + S(values)``.

    Attributes:
        a: ``(*batch, m, r)`` factor.
        b: ``(*batch, r, n)`` factor.
        values: ``(*batch, k)`` values of ``S`` on the support (see `sltrain_support`).
        scale: ``alpha / r``. Static.
        shape: The original leaf's shape. Static.
        spec: Its `MatrixSpec`. Static.
    """

    a: Any
    b: Any
    values: Any
    scale: float = 1.0
    shape: tuple[int, ...] = ()
    spec: MatrixSpec = MatrixSpec()


def _is_slt(x: Any) -> bool:
    return isinstance(x, SparseLowRankWeight)


def _chosen(
    fn: str,
    params: Any,
    targets: Callable | None,
    matrix_spec: MatrixSpec,
    kind: str = "a sparse plus low-rank leaf needs at least two dims.",
):
    """Flat leaves, treedef and which leaves `targets` picks (default: every leaf of 2+ dims)."""
    if not isinstance(matrix_spec, MatrixSpec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec, got {type(matrix_spec).__name__}."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if targets is None:
        return leaves, treedef, [jnp.ndim(x) >= 2 for _, x in leaves]
    if not callable(targets):
        raise TypeError(
            f"{fn}(targets=...) must be a function params -> tree of bools, got {type(targets).__name__}."
        )
    chosen = treedef.flatten_up_to(targets(params))
    for (path, leaf), sel in zip(leaves, chosen, strict=True):
        if sel and jnp.ndim(leaf) < 2:
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {jnp.shape(leaf)}; {kind}"
            )
    return leaves, treedef, [bool(c) for c in chosen]


def _support_count(fn: str, m: int, n: int, density: float, name: str) -> int:
    k = int(math.floor(density * m * n))
    if k < 1:
        raise ValueError(
            f"{fn}: leaf '{name}' has a {m} x {n} matrix view; density {density} gives no sparse "
            "entry. Raise `density` or leave the leaf out of `targets`."
        )
    return k


def _leaf_support(key: jax.Array, batch: int, m: int, n: int, k: int) -> jax.Array:
    """``(batch, k)`` sorted flat indices into each ``m x n`` matrix, without replacement."""
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda kk: jnp.sort(jax.random.permutation(kk, m * n)[:k]))(keys).astype(
        jnp.int32
    )


def sltrain_support(
    key: jax.Array,
    params: Any,
    *,
    density: float = 0.03,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> Any:
    """The fixed random supports, regenerated from `key`: int32 ``(*batch, k)`` per targeted leaf.

    Flat indices (sorted, unique) into each matrix view, ``k = ⌊density · m · n⌋``; other leaves
    map to None. `sltrain_init` with the same key and arguments returns the same supports.

    Example:
        >>> support = cljax.sltrain_support(jax.random.key(0), {"w": jnp.zeros((8, 4))}, density=0.25)
        >>> support["w"].shape
        (8,)
    """
    fn = "sltrain_support"
    _checks.check_in_range(fn, "density", density, 0.0, 1.0, low_inclusive=False)
    leaves, treedef, chosen = _chosen(fn, params, targets, matrix_spec)
    out = []
    for i, ((path, leaf), sel) in enumerate(zip(leaves, chosen, strict=True)):
        if not sel:
            out.append(None)
            continue
        name = _checks.leaf_name(path)
        batch, m, n = matrix_shape(jnp.shape(leaf), matrix_spec, name)
        k = _support_count(fn, m, n, density, name)
        batch_axes, _, _ = matrix_spec.axes(jnp.ndim(leaf), name)
        batch_shape = tuple(jnp.shape(leaf)[ax] for ax in batch_axes)
        support_key = jax.random.fold_in(jax.random.fold_in(key, i), 1)
        out.append(_leaf_support(support_key, batch, m, n, k).reshape(*batch_shape, k))
    return treedef.unflatten(out)


def sltrain_init(
    key: jax.Array,
    params: Any,
    *,
    rank: int,
    density: float = 0.03,
    alpha: float | None = None,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> tuple[Any, Any]:
    """Builds SLTrain weights from scratch for the targeted leaves; returns ``(trainable, support)``.

    Each targeted leaf becomes a `SparseLowRankWeight`: ``a ~ U(±1/sqrt(m))`` (Kaiming-uniform
    with ``a = sqrt(5)``), ``b = 0``, values ``~ U(±1/sqrt(m))`` with ``m = d_in`` the rows of the
    matrix view; there is no dense base. Other leaves are kept as they are (re-initialise biases
    yourself). The support is returned separately: never differentiate or optimise it.

    Args:
        key: PRNG key.
        params: Parameters giving shapes and dtypes (values of targeted leaves are ignored).
        rank: Rank ``r`` of ``a b``. Static.
        density: Fraction ``δ`` of sparse entries (0.03 in the reference).
        alpha: ``scale = alpha / r`` (None: ``scale = 1``); the reference 60M recipe uses
            ``r = 128, alpha = 32``.
        targets: Function ``params -> tree of bools`` (default: every leaf with two or more dims).
        matrix_spec: Matrix view of the targeted leaves.

    Returns:
        ``(trainable, support)``: the tree with `SparseLowRankWeight` nodes, and
        ``sltrain_support(key, params, ...)``.

    Example:
        >>> trainable, support = cljax.sltrain_init(jax.random.key(0), {"w": jnp.zeros((8, 4))},
        ...                                         rank=2, density=0.25)
        >>> cljax.sltrain_materialize(trainable, support)["w"].shape
        (8, 4)

    References:
        Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
        pretraining", 2024.
    """
    fn = "sltrain_init"
    _checks.check_int(fn, "rank", rank, 1)
    _checks.check_in_range(fn, "density", density, 0.0, 1.0, low_inclusive=False)
    if alpha is not None:
        _checks.check_in_range(fn, "alpha", alpha, 0.0, math.inf, low_inclusive=False)
    support = sltrain_support(
        key, params, density=density, targets=targets, matrix_spec=matrix_spec
    )
    leaves, treedef, chosen = _chosen(fn, params, targets, matrix_spec)
    scale = 1.0 if alpha is None else float(alpha) / rank
    out = []
    for i, ((path, leaf), sel, idx) in enumerate(
        zip(leaves, chosen, treedef.flatten_up_to(support), strict=True)
    ):
        if not sel:
            out.append(leaf)
            continue
        name = _checks.leaf_name(path)
        shape = tuple(jnp.shape(leaf))
        _, m, n = matrix_shape(shape, matrix_spec, name)
        batch_shape = idx.shape[:-1]
        ka, kv = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), 0))
        bound = 1.0 / math.sqrt(m)
        dtype = jnp.result_type(leaf)
        a = jax.random.uniform(ka, (*batch_shape, m, rank), jnp.float32, -bound, bound).astype(
            dtype
        )
        b = jnp.zeros((*batch_shape, rank, n), dtype)
        values = jax.random.uniform(kv, idx.shape, jnp.float32, -bound, bound).astype(dtype)
        out.append(SparseLowRankWeight(a, b, values, scale, shape, matrix_spec))
    return treedef.unflatten(out), support


def _check_support(fn: str, w: SparseLowRankWeight, idx: Any, name: str) -> None:
    if idx is None or tuple(jnp.shape(idx)) != tuple(jnp.shape(w.values)):
        raise ValueError(
            f"{fn}: leaf '{name}' has values of shape {jnp.shape(w.values)} but support "
            f"{None if idx is None else jnp.shape(idx)}; pass the support from `sltrain_init`."
        )


def sltrain_materialize(trainable: Any, support: Any) -> Any:
    """Returns dense parameters ``W = scale · a b + S`` (for checking and export, not training).

    Example:
        >>> trainable, support = cljax.sltrain_init(jax.random.key(0), {"w": jnp.zeros((8, 4))},
        ...                                         rank=2, density=0.25)
        >>> dense = cljax.sltrain_materialize(trainable, support)
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=_is_slt)
    supports = treedef.flatten_up_to(support)
    out = []
    for (path, x), idx in zip(leaves, supports, strict=True):
        if not _is_slt(x):
            out.append(x)
            continue
        _check_support("sltrain_materialize", x, idx, _checks.leaf_name(path))
        a = x.a.astype(jnp.float32).reshape(-1, *x.a.shape[-2:])
        b = x.b.astype(jnp.float32).reshape(-1, *x.b.shape[-2:])
        m, n = a.shape[1], b.shape[2]
        low = x.scale * jnp.einsum("bmr,brn->bmn", a, b)
        flat_idx = jnp.reshape(idx, (a.shape[0], -1))
        vals = x.values.astype(jnp.float32).reshape(a.shape[0], -1)
        size = m * n
        sparse = jax.vmap(lambda i, v, size=size: jnp.zeros(size, jnp.float32).at[i].add(v))(
            flat_idx, vals
        )
        dense = low + sparse.reshape(-1, m, n)
        out.append(from_matrices(dense, x.spec, x.shape).astype(jnp.result_type(x.a)))
    return treedef.unflatten(out)


def sltrain_apply(
    x: jax.Array,
    weight: SparseLowRankWeight,
    support: jax.Array,
    *,
    tiles: Any = None,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> jax.Array:
    """Returns ``x @ W`` for one ``(m, n)`` SLTrain weight without forming ``W`` or dense ``S``.

    ``y = scale · (x a) b + x S``, where ``x S`` gathers the inputs at the support's rows and
    adds ``x[..., row] · value`` into the output columns (a segment sum): ``O(k)`` per input row.

    Args:
        x: Inputs ``(..., m)``.
        weight: A 2-D `SparseLowRankWeight` (rows = inputs, as a Flax kernel).
        support: Its ``(k,)`` int32 support.
        tiles: ``cljax.kernels.sltrain_tiles(support, (m, n))``, built once outside `jit`: lets
            the Pallas kernel run (it builds tiles of ``W`` on chip, never in memory).
        impl: ``'auto'``, ``'xla'`` or ``'pallas'``, as in `cljax.kernels.sltrain_matmul`. Static.

    Returns:
        ``(..., n)`` outputs in float32 accumulation, cast to `x`'s dtype.

    Example:
        >>> trainable, support = cljax.sltrain_init(jax.random.key(0), {"w": jnp.zeros((8, 4))},
        ...                                         rank=2, density=0.25)
        >>> cljax.sltrain_apply(jnp.ones((3, 8)), trainable["w"], support["w"]).shape
        (3, 4)
    """
    fn = "sltrain_apply"
    if not _is_slt(weight) or jnp.ndim(weight.a) != 2:
        raise ValueError(
            f"{fn}: `weight` must be a 2-D SparseLowRankWeight (vmap over stacked ones)."
        )
    _check_support(fn, weight, support, "weight")
    m = weight.a.shape[0]
    if jnp.shape(x)[-1] != m:
        raise ValueError(
            f"{fn}: `x` has shape {jnp.shape(x)}; its last dim must be the weight's {m} rows."
        )
    # The XLA path is this function's former body, moved to the kernel module as its reference.
    return _kernels_sltrain.sltrain_matmul(
        x, weight.a, weight.b, weight.values, support, scale=weight.scale, tiles=tiles, impl=impl
    )
