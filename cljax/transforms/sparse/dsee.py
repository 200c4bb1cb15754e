"""DSEE: a sparse-plus-low-rank fine-tuning delta on a data-free support, then sparse weights.

A targeted ``(m, n)`` matrix view (a Flax kernel, ``(d_in, d_out)``) is fine-tuned as
``W = W₀ + s · (a b + S)`` with ``s = alpha / r``: ``a`` is ``(m, r)`` drawn from ``N(0, 0.02²)``,
``b`` is ``(r, n)`` zeros and ``S`` holds ``N`` trainable values (zeros at the start) on a fixed
support ``Ω`` chosen once from ``W₀`` without data (`dsee_support`). The support is an int32
index buffer kept outside the trainable tree, so ``S``, its gradient and its optimizer moments
exist only on ``Ω``. Stage 2 merges, prunes the merged weights by magnitude and re-tunes with the
pruning mask fixed (`dsee_materialize` with ``masks=``).

* `dsee_support` — ``Ω`` by GreBsmo (low-rank + sparse split of ``W₀``), ``'omp'`` (largest
  ``|W₀|``) or ``'rp'`` (uniform random from a key).
* `dsee_init`, `DseeWeight` — the trainable tree; `dsee_labels` for `optax.partition`.
* `dsee_materialize` — the dense weights ``W₀ + s (a b + S)`` (times the stage-2 mask).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from cljax import _checks
from cljax.transforms.low_rank.sltrain import SparseLowRankWeight, sltrain_materialize
from cljax.transforms.low_rank.sltrain import _chosen as _sltrain_chosen
from cljax.tree import MatrixSpec, as_matrices, matrix_shape

__all__ = [
    "DseeWeight",
    "dsee_grebsmo",
    "dsee_init",
    "dsee_labels",
    "dsee_materialize",
    "dsee_support",
]

Method = Literal["grebsmo", "omp", "rp"]
_METHODS = ("grebsmo", "omp", "rp")
_F32 = jnp.float32


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b", "values"],
    meta_fields=["scale", "spec"],
)
@dataclasses.dataclass(frozen=True)
class DseeWeight:
    """A DSEE-adapted leaf: ``W = base + scale · (a b + S(values))`` in its matrix view.

    Attributes:
        base: The frozen pre-trained weight ``W₀``, of the original leaf's shape.
        a: ``(*batch, m, r)`` factor, ``N(0, 0.02²)`` at init.
        b: ``(*batch, r, n)`` factor, zeros at init.
        values: ``(*batch, N)`` values of ``S`` on the support (see `dsee_support`), zeros at init.
        scale: ``alpha / r``; it multiplies ``S`` too. Static.
        spec: The `MatrixSpec` of the matrix view. Static.
    """

    base: Any
    a: Any
    b: Any
    values: Any
    scale: float = 1.0
    spec: MatrixSpec = MatrixSpec()


def _is_dsee(x: Any) -> bool:
    return isinstance(x, DseeWeight)


def _chosen(fn: str, params: Any, targets: Callable | None, matrix_spec: MatrixSpec):
    return _sltrain_chosen(
        fn,
        params,
        targets,
        matrix_spec,
        "a DSEE leaf needs at least two dims. Leave it out of `targets`.",
    )


# ---------------------------------------------------------------------------------------------
# Support.


@functools.partial(jax.jit, static_argnames=("rank_steps", "alternations", "rows_per_step"))
def _grebsmo_matrix(w, key, threshold, *, rank_steps: int, alternations: int, rows_per_step: int):
    """GreBsmo on one ``(m, n)`` float32 matrix; returns the sparse part ``S₀``.

    The rank grows from 1 by `rows_per_step` per step up to ``min(m, n)``; ``V`` is held at that
    capacity with zero rows beyond the valid count, which leaves the leading columns of the QR
    factor (and so ``U V``) exactly those of the valid part.
    """
    m, n = w.shape
    cap = min(m, n)
    v = jnp.zeros((cap, n), _F32).at[0].set(jax.random.normal(key, (n,), _F32))
    rows = jnp.arange(cap)

    def alternate(_, carry):
        v, s, count, _ = carry
        low = w - s
        u, _ = jnp.linalg.qr(low @ v.T)  # (m, cap); columns past `count` multiply zero rows of v
        v = jnp.where((rows < count)[:, None], u.T @ low, jnp.zeros_like(v))
        uv = u @ v
        s = w - uv
        return v, jnp.where(jnp.abs(s) < threshold, jnp.zeros_like(s), s), count, uv

    def grow(_, carry):
        v, _, count, uv = carry  # S₀ restarts from zero at every rank increment
        v, s, count, uv = lax.fori_loop(
            0, alternations, alternate, (v, jnp.zeros_like(w), count, uv)
        )
        r = jnp.linalg.qr(w - uv - s, mode="r")  # (min(m, n), n)
        for j in range(min(rows_per_step, r.shape[0])):
            v = v.at[count + j].set(r[j], mode="drop")
        return v, s, jnp.minimum(count + rows_per_step, cap), uv

    zeros = jnp.zeros_like(w)
    _, s, _, _ = lax.fori_loop(0, rank_steps, grow, (v, zeros, jnp.int32(1), zeros))
    return s


def dsee_grebsmo(
    w: jax.Array,
    key: jax.Array,
    *,
    rank_steps: int = 100,
    alternations: int = 10,
    rows_per_step: int = 1,
    threshold: float = 0.01,
) -> jax.Array:
    """Returns the sparse part ``S₀`` of a GreBsmo low-rank + sparse split of one matrix.

    From a random rank-1 start, `rank_steps` times: ``S₀ ← 0``, then `alternations` rounds of
    ``U ← QR((W − S₀) Vᵀ)``, ``V ← Uᵀ (W − S₀)``, ``S₀ ← W − U V`` with entries ``|·| < threshold``
    zeroed, then `rows_per_step` rows of the ``R`` factor of the residual ``W − U V − S₀``
    appended to ``V`` (the rank stops growing at ``min(m, n)``). The returned ``S₀`` is the one
    of the last increment, whose alternations run at rank ``min(rank_steps, …)``. Computed in
    float32.

    Args:
        w: An ``(m, n)`` matrix.
        key: PRNG key of the random rank-1 start.
        rank_steps: Rank increments (100 in the DSEE reference). Static.
        alternations: Alternations per increment (10). Static.
        rows_per_step: Rows appended to ``V`` per increment (1). Static.
        threshold: Entries of ``S₀`` below this magnitude are zeroed (0.01).

    Returns:
        ``S₀``, float32 ``(m, n)``.

    Example:
        >>> s0 = cljax.dsee_grebsmo(jnp.eye(4), jax.random.key(0), rank_steps=2, alternations=2)
        >>> s0.shape
        (4, 4)

    Notes:
        ``S₀`` restarts from zero at every increment, as the DSEE reference code does for the
        query projection (one version of it keeps the value projection's ``S₀`` across
        increments). Without the restart, the first alternation puts the whole residual in
        ``S₀`` and the rank increments stop changing it.

    References:
        Zhou and Tao, "Greedy Bilateral Sketch, Completion & Smoothing", AISTATS 2013.
    """
    fn = "dsee_grebsmo"
    if jnp.ndim(w) != 2:
        raise ValueError(
            f"{fn}: `w` has shape {jnp.shape(w)}; pass one (m, n) matrix (vmap over stacks)."
        )
    _checks.check_int(fn, "rank_steps", rank_steps, 0)
    _checks.check_int(fn, "alternations", alternations)
    _checks.check_int(fn, "rows_per_step", rows_per_step)
    _checks.check_in_range(fn, "threshold", threshold, 0.0, math.inf)
    return _grebsmo_matrix(
        jnp.asarray(w, _F32),
        key,
        jnp.asarray(threshold, _F32),
        rank_steps=rank_steps,
        alternations=alternations,
        rows_per_step=rows_per_step,
    )


def _random_indices(key: jax.Array, *, size: int, k: int) -> jax.Array:
    """`k` sorted distinct flat indices in ``[0, size)``, uniform from `key`."""
    return jnp.sort(jax.random.permutation(key, size)[:k])


def _top_indices(scores: jax.Array, k: int) -> jax.Array:
    """``(batch, k)`` sorted flat indices of the `k` largest scores of each ``(batch, m, n)``
    matrix (ties to the lower index)."""
    flat = scores.reshape(scores.shape[0], -1)
    _, idx = lax.top_k(flat, k)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def dsee_support(
    params: Any,
    num_entries: int,
    *,
    method: Method = "grebsmo",
    key: jax.Array | None = None,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
    rank_steps: int = 100,
    alternations: int = 10,
    rows_per_step: int = 1,
    threshold: float = 0.01,
) -> Any:
    """Chooses DSEE's sparse support ``Ω`` from the pre-trained weights, without data.

    ``Ω`` is the `num_entries` entries of each matrix view with the largest ``|S₀|``, where ``S₀``
    is the sparse part of a GreBsmo split of ``W₀`` (`dsee_grebsmo`, ``method='grebsmo'``), the
    largest ``|W₀|`` (``'omp'``) or uniform at random (``'rp'``, a pure function of `key`).
    Exactly `num_entries` entries are kept (ties to the lower index); the reference code's
    ``|S₀| >= kthvalue`` keeps ``N + 1``. Build ``Ω`` once from the pre-trained ``W₀`` and keep
    it for stage 2: recomputing it from merged weights gives a different support.

    Args:
        params: The pre-trained parameters.
        num_entries: ``N``, entries per matrix (16 or 64 in the reference). Static.
        method: ``'grebsmo'``, ``'omp'`` or ``'rp'``. Static.
        key: PRNG key (``'grebsmo'``'s random start, ``'rp'``'s draw); not needed for ``'omp'``.
        targets: Function ``params -> tree of bools`` (default: every leaf with two or more dims).
        matrix_spec: Matrix view of the targeted leaves.
        rank_steps, alternations, rows_per_step, threshold: The GreBsmo schedule
            (`dsee_grebsmo`).

    Returns:
        A tree with the structure of `params`: int32 ``(*batch, N)`` sorted flat indices into
        each matrix view for targeted leaves (the format of `cljax.sltrain_support`), None for
        the others.

    Raises:
        ValueError: an unknown `method`; `num_entries` larger than a matrix; no `key` where one
            is needed.

    Example:
        >>> support = cljax.dsee_support({"w": jnp.arange(12.0).reshape(3, 4)}, 2, method="omp")
        >>> support["w"]
        Array([10, 11], dtype=int32)

    References:
        Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
        Models", ACL 2023. https://arxiv.org/abs/2111.00160
    """
    fn = "dsee_support"
    _checks.check_choice(fn, "method", method, _METHODS)
    _checks.check_int(fn, "num_entries", num_entries)
    if key is None and method != "omp":
        raise ValueError(f"{fn}: method={method!r} needs a `key`.")
    leaves, treedef, chosen = _chosen(fn, params, targets, matrix_spec)
    out = []
    for i, ((path, leaf), sel) in enumerate(zip(leaves, chosen, strict=True)):
        if not sel:
            out.append(None)
            continue
        name = _checks.leaf_name(path)
        shape = tuple(jnp.shape(leaf))
        batch, m, n = matrix_shape(shape, matrix_spec, name)
        if num_entries > m * n:
            raise ValueError(
                f"{fn}: leaf '{name}' has a {m} x {n} matrix view; num_entries={num_entries} is larger than it."
            )
        batch_axes, _, _ = matrix_spec.axes(len(shape), name)
        batch_shape = tuple(shape[a] for a in batch_axes)
        mats = as_matrices(jnp.asarray(leaf, _F32), matrix_spec, name)
        if method == "omp":
            idx = _top_indices(jnp.abs(mats), num_entries)
        elif method == "rp":
            keys = jax.random.split(jax.random.fold_in(key, i), batch)
            draw = functools.partial(_random_indices, size=m * n, k=num_entries)
            idx = jax.vmap(draw)(keys)
        else:
            keys = jax.random.split(jax.random.fold_in(key, i), batch)
            s0 = jnp.stack(
                [
                    dsee_grebsmo(
                        mats[j],
                        keys[j],
                        rank_steps=rank_steps,
                        alternations=alternations,
                        rows_per_step=rows_per_step,
                        threshold=threshold,
                    )
                    for j in range(batch)
                ]
            )
            idx = _top_indices(jnp.abs(s0), num_entries)
        out.append(idx.astype(jnp.int32).reshape(*batch_shape, num_entries))
    return treedef.unflatten(out)


# ---------------------------------------------------------------------------------------------
# Trainable tree.


def dsee_init(
    key: jax.Array,
    params: Any,
    support: Any,
    *,
    rank: int = 16,
    alpha: float | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> Any:
    """Wraps each leaf that has a support in a `DseeWeight` (stage 1); the model is unchanged.

    ``a ~ N(0, 0.02²)``, ``b = 0`` and the values of ``S`` are zeros, so `dsee_materialize`
    returns the pre-trained weights bit for bit. Leaves whose support is None are kept as they
    are (train a head next to the adapters with `dsee_labels`).

    Args:
        key: PRNG key for ``a``.
        params: The pre-trained parameters (or, in stage 2, the merged ones).
        support: From `dsee_support` (the same one in both stages: ``Ω`` comes from ``W₀``).
        rank: ``r`` (16 in the reference). Static.
        alpha: ``scale = alpha / r`` (None: ``scale = 1``).
        matrix_spec: The matrix view the support was built with.

    Returns:
        The tree with `DseeWeight` nodes.

    Raises:
        ValueError: a support of the wrong shape for its leaf.

    Example:
        >>> params = {"w": jnp.ones((4, 3))}
        >>> tuned = cljax.dsee_init(jax.random.key(0), params, cljax.dsee_support(params, 2, method="omp"), rank=2)
        >>> tuned["w"].values.shape
        (2,)

    References:
        Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
        Models", ACL 2023. https://arxiv.org/abs/2111.00160
    """
    fn = "dsee_init"
    _checks.check_int(fn, "rank", rank)
    if alpha is not None:
        _checks.check_in_range(fn, "alpha", alpha, 0.0, math.inf, low_inclusive=False)
    scale = 1.0 if alpha is None else float(alpha) / rank
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    supports = treedef.flatten_up_to(support)
    out = []
    for i, ((path, leaf), idx) in enumerate(zip(leaves, supports, strict=True)):
        if idx is None:
            out.append(leaf)
            continue
        name = _checks.leaf_name(path)
        spec = matrix_spec
        shape = tuple(jnp.shape(leaf))
        _, m, n = matrix_shape(shape, spec, name)
        batch_axes, _, _ = spec.axes(len(shape), name)
        batch_shape = tuple(shape[ax] for ax in batch_axes)
        if tuple(jnp.shape(idx)[:-1]) != batch_shape:
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {shape} but its support has shape {tuple(jnp.shape(idx))}; "
                f"it needs {batch_shape + ('N',)} (pass the support from `dsee_support`)."
            )
        dtype = jnp.result_type(leaf)
        a = (
            0.02 * jax.random.normal(jax.random.fold_in(key, i), (*batch_shape, m, rank), _F32)
        ).astype(dtype)
        b = jnp.zeros((*batch_shape, rank, n), dtype)
        values = jnp.zeros(jnp.shape(idx), dtype)
        out.append(DseeWeight(leaf, a, b, values, scale, spec))
    return treedef.unflatten(out)


def dsee_labels(trainable: Any, *, others: str = "frozen") -> Any:
    """Labels for `optax.partition`: ``'dsee'`` on ``a``, ``b`` and the values, ``'frozen'`` on bases.

    Args:
        trainable: A tree with `DseeWeight` nodes.
        others: Label of the leaves outside any adapter (``'frozen'``, or ``'dsee'`` to train a
            head with the same optimizer).

    Example:
        >>> params = {"w": jnp.ones((4, 3))}
        >>> tuned = cljax.dsee_init(jax.random.key(0), params, cljax.dsee_support(params, 2, method="omp"))
        >>> tx = optax.partition({"dsee": optax.adam(1e-3), "frozen": optax.set_to_zero()},
        ...                      cljax.dsee_labels(tuned))

    References:
        Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
        Models", ACL 2023. https://arxiv.org/abs/2111.00160
    """

    def leaf(x):
        if not _is_dsee(x):
            return others
        return dataclasses.replace(x, base="frozen", a="dsee", b="dsee", values="dsee")

    return jax.tree.map(leaf, trainable, is_leaf=_is_dsee)


def dsee_materialize(trainable: Any, support: Any, *, masks: Any = None) -> Any:
    """Returns the dense weights ``W₀ + scale · (a b + S)``, times the stage-2 masks if given.

    Differentiable: use it in the forward pass, so ``S`` gets gradients on its support only.
    With `masks` (stage 2: a magnitude mask of the merged weights, e.g. `cljax.magnitude_mask`),
    pruned entries are exactly zero whatever the factors hold.

    Args:
        trainable: A tree with `DseeWeight` nodes (from `dsee_init`).
        support: The support the tree was built with.
        masks: None, or boolean arrays of the parameters' shapes (None for unmasked leaves).

    Returns:
        A tree of dense arrays in the bases' dtypes.

    Raises:
        ValueError: a support or mask that does not match its leaf.

    Example:
        >>> params = {"w": jnp.ones((4, 3))}
        >>> support = cljax.dsee_support(params, 2, method="omp")
        >>> dense = cljax.dsee_materialize(cljax.dsee_init(jax.random.key(0), params, support), support)
        >>> bool((dense["w"] == params["w"]).all())
        True

    References:
        Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
        Models", ACL 2023. https://arxiv.org/abs/2111.00160
    """
    fn = "dsee_materialize"
    leaves, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=_is_dsee)
    supports = treedef.flatten_up_to(support)
    mask_leaves = [None] * len(leaves) if masks is None else treedef.flatten_up_to(masks)
    out = []
    for (path, x), idx, mask in zip(leaves, supports, mask_leaves, strict=True):
        name = _checks.leaf_name(path)
        if _is_dsee(x):
            if idx is None or tuple(jnp.shape(idx)) != tuple(jnp.shape(x.values)):
                raise ValueError(
                    f"{fn}: leaf '{name}' has values of shape {jnp.shape(x.values)} but support "
                    f"{None if idx is None else jnp.shape(idx)}; pass the support the tree was built with."
                )
            shape = tuple(jnp.shape(x.base))
            low_plus_sparse = SparseLowRankWeight(
                x.a.astype(_F32),
                x.b.astype(_F32),
                x.values.astype(_F32) * x.scale,
                x.scale,
                shape,
                x.spec,
            )
            delta = sltrain_materialize(low_plus_sparse, idx)
            x = (x.base.astype(_F32) + delta).astype(jnp.result_type(x.base))
        if mask is not None:
            if tuple(jnp.shape(mask)) != tuple(jnp.shape(x)):
                raise ValueError(
                    f"{fn}: leaf '{name}' has shape {tuple(jnp.shape(x))} but its mask has shape "
                    f"{tuple(jnp.shape(mask))}."
                )
            x = jnp.where(mask, x, jnp.zeros_like(x))
        out.append(x)
    return treedef.unflatten(out)
