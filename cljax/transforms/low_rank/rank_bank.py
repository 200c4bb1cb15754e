"""Incremental rank updates per task (LR-10): a fixed-capacity bank of low-rank factors.

A targeted leaf becomes a `RankBankWeight`: in its matrix view,
``W⁽ᵗ⁾ = W₀ + Σ_{i ≤ t} S[t, i] · u_i v_i`` with ``u_i`` ``(m, r)``, ``v_i`` ``(r, n)`` and a
selector matrix ``S`` (``capacity x capacity``). Task ``t`` trains ``u_t``, ``v_t`` and the
selector row ``S[t, :t+1]``; `rank_bank_mask_updates` zeroes every other update, so earlier
factors and rows stay bit-identical and ``rank_bank_apply(params, j)`` never changes after task
``j``. The task index is an array argument: moving to the next task recompiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cljax import _checks
from cljax.tree import MatrixSpec, from_matrices, matrix_shape

__all__ = [
    "RankBankWeight",
    "rank_bank_add_task",
    "rank_bank_apply",
    "rank_bank_init",
    "rank_bank_mask_updates",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "u", "v", "selectors"],
    meta_fields=["spec"],
)
@dataclasses.dataclass(frozen=True)
class RankBankWeight:
    """A leaf re-parameterised as a base plus a task-indexed bank of low-rank factors.

    Attributes:
        base: Frozen ``W₀`` (the leaf's shape; zeros when training from scratch).
        u: ``(*batch, capacity, m, r)`` input-side factors.
        v: ``(*batch, capacity, r, n)`` output-side factors.
        selectors: ``(*batch, capacity, capacity)``; row ``t`` weighs the factors for task ``t``.
        spec: The `MatrixSpec` of the matrix view. Static.
    """

    base: Any
    u: Any
    v: Any
    selectors: Any
    spec: MatrixSpec = MatrixSpec()


def _is_bank(x: Any) -> bool:
    return isinstance(x, RankBankWeight)


def _new_factors(key, shape_u, m, dtype):
    bound = 1.0 / math.sqrt(m)
    return jax.random.uniform(key, shape_u, jnp.float32, -bound, bound).astype(dtype)


def rank_bank_init(
    key: jax.Array,
    params: Any,
    *,
    capacity: int,
    rank: int = 1,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> Any:
    """Replaces each targeted leaf by a `RankBankWeight` ready for task 0.

    The leaf becomes the frozen base; slot 0 gets ``u_0 ~ U(±1/sqrt(m))``, ``v_0 = 0`` and
    ``S[0, 0] = 1``; the other slots are zero. So ``rank_bank_apply(params, 0)`` equals `params`.

    Args:
        key: PRNG key (leaf ``i`` uses ``fold_in(key, i)``).
        params: The parameters (the bases).
        capacity: Maximum number of tasks ``T_max``. Static.
        rank: Rank of each task's factor (1 in the paper's rank-one form). Static.
        targets: Function ``params -> tree of bools`` (default: leaves with two or more dims).
        matrix_spec: Matrix view of the targeted leaves.

    Example:
        >>> bank = cljax.rank_bank_init(jax.random.key(0), {"w": jnp.zeros((4, 3))}, capacity=5)
        >>> bank["w"].u.shape, bank["w"].selectors.shape
        ((5, 4, 1), (5, 5))

    References:
        Hyder et al., "Incremental Task Learning with Incremental Rank Updates", ECCV 2022.
    """
    fn = "rank_bank_init"
    _checks.check_int(fn, "capacity", capacity, 1)
    _checks.check_int(fn, "rank", rank, 1)
    if not isinstance(matrix_spec, MatrixSpec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec, got {type(matrix_spec).__name__}."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if targets is None:
        chosen = [jnp.ndim(x) >= 2 for _, x in leaves]
    else:
        if not callable(targets):
            raise TypeError(
                f"{fn}(targets=...) must be a function params -> tree of bools, got {type(targets).__name__}."
            )
        chosen = [bool(c) for c in treedef.flatten_up_to(targets(params))]
    out = []
    for i, ((path, leaf), sel) in enumerate(zip(leaves, chosen, strict=True)):
        if not sel:
            out.append(leaf)
            continue
        name = _checks.leaf_name(path)
        if jnp.ndim(leaf) < 2:
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {jnp.shape(leaf)}; a factor bank needs two or more dims."
            )
        batch_axes, _, _ = matrix_spec.axes(jnp.ndim(leaf), name)
        batch_shape = tuple(jnp.shape(leaf)[a] for a in batch_axes)
        _, m, n = matrix_shape(jnp.shape(leaf), matrix_spec, name)
        dtype = jnp.result_type(leaf)
        u = jnp.zeros((*batch_shape, capacity, m, rank), dtype)
        u = u.at[..., 0, :, :].set(
            _new_factors(jax.random.fold_in(key, i), (*batch_shape, m, rank), m, dtype)
        )
        v = jnp.zeros((*batch_shape, capacity, rank, n), dtype)
        selectors = jnp.zeros((*batch_shape, capacity, capacity), dtype).at[..., 0, 0].set(1)
        out.append(RankBankWeight(leaf, u, v, selectors, matrix_spec))
    return treedef.unflatten(out)


def _check_task(fn: str, task: Any, capacity: int, low: int = 0) -> None:
    try:
        value = int(task)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return  # traced: checked by the caller's own bookkeeping
    if not low <= value < capacity:
        raise ValueError(
            f"{fn}(task=...) must be in [{low}, {capacity}) for a bank of capacity {capacity}, got {value}."
        )


def _capacity(tree: Any) -> int | None:
    for x in jax.tree.leaves(tree, is_leaf=_is_bank):
        if _is_bank(x):
            return jnp.shape(x.selectors)[-1]
    return None


def rank_bank_apply(params: Any, task: jax.typing.ArrayLike) -> Any:
    """Returns plain parameters for `task`: ``W₀ + Σ_i S[task, i] u_i v_i`` per bank leaf.

    Example:
        >>> bank = cljax.rank_bank_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, capacity=3)
        >>> bool(jnp.all(cljax.rank_bank_apply(bank, 0)["w"] == 1.0))
        True
    """
    capacity = _capacity(params)
    if capacity is not None:
        _check_task("rank_bank_apply", task, capacity)

    def leaf(x):
        if not _is_bank(x):
            return x
        u = x.u.astype(jnp.float32)
        v = x.v.astype(jnp.float32)
        cap, m, r = u.shape[-3:]
        n = v.shape[-1]
        batch = math.prod(u.shape[:-3])
        row = jnp.take(
            x.selectors.astype(jnp.float32).reshape(batch, cap, cap), task, axis=1
        )  # (b, cap)
        prod = jnp.einsum(
            "bt,btmr,btrn->bmn", row, u.reshape(batch, cap, m, r), v.reshape(batch, cap, r, n)
        )
        delta = from_matrices(prod, x.spec, jnp.shape(x.base))
        return (x.base.astype(jnp.float32) + delta).astype(jnp.result_type(x.base))

    return jax.tree.map(leaf, params, is_leaf=_is_bank)


def rank_bank_add_task(params: Any, task: jax.typing.ArrayLike, key: jax.Array) -> Any:
    """Prepares slot `task` (≥ 1) of every bank: a fresh factor and a selector row.

    ``S[task] ← S[task − 1]`` with ``S[task, task] = 1``, ``u_task ~ U(±1/sqrt(m))``,
    ``v_task = 0``: the new task starts from the previous task's function. Call it at the task
    boundary, before training `task`.

    Example:
        >>> bank = cljax.rank_bank_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, capacity=3)
        >>> bank = cljax.rank_bank_add_task(bank, 1, jax.random.key(1))
    """
    capacity = _capacity(params)
    if capacity is not None:
        _check_task("rank_bank_add_task", task, capacity, low=1)
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_bank)
    out = []
    for i, x in enumerate(leaves):
        if not _is_bank(x):
            out.append(x)
            continue
        batch_shape = jnp.shape(x.u)[:-3]
        m, r = jnp.shape(x.u)[-2:]
        cap = jnp.shape(x.selectors)[-1]
        fresh = _new_factors(
            jax.random.fold_in(jax.random.fold_in(key, i), task), (*batch_shape, m, r), m, x.u.dtype
        )
        onehot = (jnp.arange(cap) == task).astype(x.u.dtype)
        slot = onehot.reshape((1,) * len(batch_shape) + (cap, 1, 1))
        u = x.u * (1 - slot) + fresh[..., None, :, :] * slot
        v = x.v * (1 - slot)
        previous = jnp.take(x.selectors, task - 1, axis=-2)  # (*batch, cap)
        row = previous * (1 - onehot.reshape((1,) * len(batch_shape) + (cap,))) + onehot.reshape(
            (1,) * len(batch_shape) + (cap,)
        )
        rows = onehot.reshape((1,) * len(batch_shape) + (cap, 1))
        selectors = x.selectors * (1 - rows) + row[..., None, :] * rows
        out.append(dataclasses.replace(x, u=u, v=v, selectors=selectors))
    return treedef.unflatten(out)


def rank_bank_mask_updates(updates: Any, task: jax.typing.ArrayLike) -> Any:
    """Zeroes every bank update but task `task`'s factor and selector row ``S[task, :task+1]``.

    Apply it to the optimizer's updates before `optax.apply_updates`; base updates are zeroed
    too. Works under `jit` with a traced `task`.

    Example:
        >>> bank = cljax.rank_bank_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, capacity=3)
        >>> masked = cljax.rank_bank_mask_updates(jax.tree.map(jnp.ones_like, bank), 0)
    """

    def leaf(x):
        if not _is_bank(x):
            return x
        cap = jnp.shape(x.selectors)[-1]
        batch_nd = jnp.ndim(x.selectors) - 2
        slot = (jnp.arange(cap) == task).reshape((1,) * batch_nd + (cap, 1, 1))
        row = (jnp.arange(cap) == task)[:, None] & (jnp.arange(cap) <= task)[None, :]
        row = row.reshape((1,) * batch_nd + (cap, cap))
        zero = lambda a, keep: jnp.where(keep, a, jnp.zeros_like(a))  # noqa: E731
        return dataclasses.replace(
            x,
            base=jnp.zeros_like(x.base),
            u=zero(x.u, slot),
            v=zero(x.v, slot),
            selectors=zero(x.selectors, row),
        )

    return jax.tree.map(leaf, updates, is_leaf=_is_bank)
