"""FRUGAL's subset projectors (LR-02): whole tensors (blocks) and coordinates / rows / columns.

Both keep the state-full part as a gathered subset of the gradient, so the inner transform's state
covers only the chosen entries, and apply the state-free rule to exactly the complement:

* ``'blocks'`` (BAdam-like): the projectable matrices (every matrix of every `MatrixSpec` view,
  a stacked ``(L, m, n)`` leaf being ``L`` matrices) are grouped by ``(m, n, dtype)``; each group
  ``g`` owns ``k_g`` static slots (``Σ k_g = max(1, round(density · N))``, split over the groups
  by largest remainder) with the index of the matrix each slot holds. Active matrices are
  gathered into a ``(k_g, m, n)`` stack for the inner transform.
* ``'coordinates'`` / ``'rows'`` / ``'columns'`` (RandK): per matrix, a sorted random subset of
  ``max(1, round(density · D))`` flat coordinates (``D = m n``), rows (``D = m``) or columns
  (``D = n``), stored as int32 indices, and the inner state on the gathered entries.

Selections change only at a refresh (`lax.cond` on the step count); random draws come from the
PRNG key in state folded with the refresh step (and the group index for blocks; for staggered
coordinate refreshes, the matrix leaf's index), so they are regenerable. Unstaggered coordinate
refreshes take one uniform draw for all matrices (split in tree order) and sort once per distinct
``(D, k)``, which keeps the compiled program small.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cljax.transforms.low_rank.projection import _plans, _refresh_due
from cljax.tree import as_matrices, from_matrices

__all__: list[str] = []

_MASKED = optax.MaskedNode()
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
SUBSET_PROJECTORS = ("blocks", "coordinates", "rows", "columns")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def block_counts(sizes: list[int], density: float) -> list[int]:
    """Active matrices per group: ``max(1, round(density · N))`` split by largest remainder.

    Quotas ``K n_g / N`` are floored and the leftover slots go to the largest fractional parts
    (ties to the earlier group); each count is at most its group size.
    """
    total = sum(sizes)
    if total == 0:
        return []
    k = min(total, max(1, _round_half_up(density * total)))
    quotas = [k * s / total for s in sizes]
    counts = [min(s, math.floor(q)) for s, q in zip(sizes, quotas, strict=True)]
    order = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - math.floor(quotas[g])), g))
    left = k - sum(counts)
    while left > 0:
        for g in order:
            if left > 0 and counts[g] < sizes[g]:
                counts[g] += 1
                left -= 1
    return counts


def subset_size(projector: str, density: float, m: int, n: int) -> int:
    """Number of state-full coordinates / rows / columns of one ``(m, n)`` matrix."""
    d = {"coordinates": m * n, "rows": m, "columns": n}[projector]
    return min(d, max(1, _round_half_up(density * d)))


def _random_subset(key: jax.Array, d: int, k: int) -> jax.Array:
    """A sorted uniformly random ``k``-subset of ``range(d)`` (int32): the ``k`` smallest of
    ``d`` i.i.d. uniform draws."""
    draws = jax.random.uniform(key, (d,))
    return jnp.sort(jnp.argsort(draws)[:k]).astype(jnp.int32)


def _block_selection(order: str, key: jax.Array, refresh: jax.Array, n: int, k: int) -> jax.Array:
    """The ``k`` active matrices (int32, increasing for 'random') of a group of ``n`` at a refresh.

    ``'random'``: a fresh uniform ``k``-subset at every refresh. Otherwise a cycle covers the
    group in ``c = ceil(n / k)`` refreshes; refresh ``j`` takes the window of positions
    ``(j mod c) · k + [0, k)`` (mod ``n``, so the last window of a cycle wraps to the start);
    position ``p`` is matrix ``p`` (``'ascending'``: tree order, then layer order), matrix
    ``n − 1 − p`` (``'descending'``), or alternately the one and the other on even / odd cycles
    (``'mirror'``: forwards, then backwards).
    """
    if order == "random":
        return _random_subset(jax.random.fold_in(key, refresh), n, k)
    cycle_len = -(-n // k)
    cycle, within = refresh // cycle_len, refresh % cycle_len
    positions = (within * k + jnp.arange(k, dtype=jnp.int32)) % n
    backwards = n - 1 - positions
    if order == "ascending":
        return positions.astype(jnp.int32)
    if order == "descending":
        return backwards.astype(jnp.int32)
    return jnp.where(cycle % 2 == 0, positions, backwards).astype(jnp.int32)


def _free(residual: str, x: jax.Array) -> jax.Array:
    if residual == "sign_sgd":
        return jnp.sign(x)
    if residual == "sgd":
        return x
    return jnp.zeros_like(x)


def subset_core(
    fn: str,
    state_cls: type,
    *,
    inner: optax.GradientTransformation,
    fallback: optax.GradientTransformation,
    density: float,
    refresh_every: int,
    scale: Any,
    projector: str,
    block_order: str,
    reset_statistics: bool,
    matrix_spec: Any,
    stagger: bool,
    seed: int,
    residual: str,
    residual_scale: Any,
) -> optax.GradientTransformationExtraArgs:
    """The FRUGAL transform for the subset projectors (see the module docstring)."""
    inner = optax.with_extra_args_support(inner)
    fallback = optax.with_extra_args_support(fallback)
    blocks = projector == "blocks"

    def plans_of(tree):
        return _plans(fn, tree, matrix_spec, "std", "flax", lambda m, n: 1, refresh_every, stagger)

    def groups_of(leaves, plans) -> list[tuple[tuple, list[int], int]]:
        """``[(key, [leaf positions], k_g)]`` in order of first appearance."""
        groups: dict[tuple, list[int]] = {}
        for i, ((_, leaf), plan) in enumerate(zip(leaves, plans, strict=True)):
            if plan is not None:
                key = (plan.m, plan.n, jnp.dtype(jnp.result_type(leaf)).name)
                groups.setdefault(key, []).append(i)
        sizes = [sum(plans[i].batch for i in ids) for ids in groups.values()]
        counts = block_counts(sizes, density)
        return [(k, ids, c) for (k, ids), c in zip(groups.items(), counts, strict=True)]

    def low_shape(plan) -> tuple[int, ...]:
        k = subset_size(projector, density, plan.m, plan.n)
        tail = {"coordinates": (k,), "rows": (k, plan.n), "columns": (plan.m, k)}[projector]
        return (*plan.batch_shape, *tail)

    def index_shape(plan) -> tuple[int, ...]:
        return (*plan.batch_shape, subset_size(projector, density, plan.m, plan.n))

    def init_fn(params):
        leaves, plans, treedef = plans_of(params)
        fallback_leaves = [
            leaf if plan is None else _MASKED for (_, leaf), plan in zip(leaves, plans, strict=True)
        ]
        if blocks:
            selections, inner_states = [], []
            for (m, n, dtype), _, k in groups_of(leaves, plans):
                if k == 0:
                    selections.append(_MASKED)
                    inner_states.append(_MASKED)
                    continue
                selections.append(jnp.arange(k, dtype=jnp.int32))
                inner_states.append(inner.init(jnp.zeros((k, m, n), dtype)))
            projector_state, inner_state = tuple(selections), tuple(inner_states)
        else:
            indices, inner_states = [], []
            for (_, leaf), plan in zip(leaves, plans, strict=True):
                if plan is None:
                    indices.append(_MASKED)
                    inner_states.append(_MASKED)
                    continue
                indices.append(jnp.zeros(index_shape(plan), jnp.int32))
                inner_states.append(inner.init(jnp.zeros(low_shape(plan), jnp.result_type(leaf))))
            projector_state = treedef.unflatten(indices)
            inner_state = treedef.unflatten(inner_states)
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            projector=projector_state,
            inner=inner_state,
            fallback=fallback.init(treedef.unflatten(fallback_leaves)),
            projector_opt=treedef.unflatten([_MASKED] * len(leaves)),
        )

    def finish(full: jax.Array, count: jax.Array) -> jax.Array:
        scale_now = scale(count) if callable(scale) else scale
        return full * jnp.asarray(scale_now, jnp.float32)

    def free_part(mats: jax.Array) -> jax.Array:
        return jnp.asarray(residual_scale, jnp.float32) * _free(residual, mats.astype(jnp.float32))

    def blocks_update(leaves, plans, selections, inner_states, count, key, extra_args):
        outs: dict[int, jax.Array] = {}
        new_sel, new_inner = [], []
        due = count % refresh_every == 0
        for g, ((m, n, dtype), ids, k) in enumerate(groups_of(leaves, plans)):
            mats = jnp.concatenate(
                [as_matrices(leaves[i][1], plans[i].spec, plans[i].name) for i in ids], axis=0
            )  # (n_g, m, n)
            full = free_part(mats)
            if k == 0:
                new_sel.append(_MASKED)
                new_inner.append(_MASKED)
            else:
                group_key = jax.random.fold_in(jax.random.wrap_key_data(key), g)

                def refresh(
                    sel, state, group_key=group_key, k=k, m=m, n=n, dtype=dtype, size=mats.shape[0]
                ):
                    new = _block_selection(block_order, group_key, count // refresh_every, size, k)
                    if reset_statistics:
                        state = inner.init(jnp.zeros((k, m, n), dtype))
                    return new, state

                sel, state = jax.lax.cond(
                    due, refresh, lambda s, t: (s, t), selections[g], inner_states[g]
                )
                direction, state = inner.update(
                    jnp.take(mats, sel, axis=0), state, None, **extra_args
                )
                full = full.at[sel].set(direction.astype(jnp.float32))
                new_sel.append(sel)
                new_inner.append(state)
            full = finish(full, count)
            start = 0
            for i in ids:
                plan, leaf = plans[i], leaves[i][1]
                part = full[start : start + plan.batch]
                start += plan.batch
                outs[i] = from_matrices(part, plan.spec, leaf.shape, plan.name).astype(leaf.dtype)
        return outs, tuple(new_sel), tuple(new_inner)

    def gather(mats, idx):  # mats (b, m, n), idx (b, k)
        b, m, n = mats.shape
        if projector == "coordinates":
            return jnp.take_along_axis(mats.reshape(b, m * n), idx, axis=1)
        if projector == "rows":
            return jnp.take_along_axis(mats, idx[:, :, None], axis=1)
        return jnp.take_along_axis(mats, idx[:, None, :], axis=2)

    def place(direction, idx, free):
        """``free`` (b, m, n) with the chosen entries replaced by ``direction`` (gathered layout).

        One scatter of the slot numbers into a ``(b, D)`` position map (-1: not chosen), then a
        gather from `direction`: cheaper to compile and run than scattering the values.
        """
        b, m, n = free.shape
        d, k = {"coordinates": m * n, "rows": m, "columns": n}[projector], idx.shape[-1]
        slots = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), idx.shape)
        pos = jnp.full((b, d), -1, jnp.int32).at[jnp.arange(b)[:, None], idx].set(slots)
        safe = jnp.maximum(pos, 0)
        if projector == "coordinates":
            values = jnp.take_along_axis(direction, safe, axis=1).reshape(b, m, n)
            hit = (pos >= 0).reshape(b, m, n)
        elif projector == "rows":
            values = jnp.take_along_axis(direction, safe[:, :, None], axis=1)
            hit = (pos >= 0)[:, :, None]
        else:
            values = jnp.take_along_axis(direction, safe[:, None, :], axis=2)
            hit = (pos >= 0)[:, None, :]
        return jnp.where(hit, values, free)

    def subset_dim(plan) -> int:
        return {"coordinates": plan.m * plan.n, "rows": plan.m, "columns": plan.n}[projector]

    def fresh(plan, draws, idx, dtype, inner_state):
        """New sorted indices from ``(batch, D)`` uniform draws, and the (reset) inner state."""
        k = idx.shape[-1]
        new = jnp.sort(jnp.argsort(draws, axis=-1)[:, :k], axis=-1).astype(jnp.int32)
        if reset_statistics:
            inner_state = inner.init(jnp.zeros(low_shape(plan), dtype))
        return new.reshape(idx.shape), inner_state

    def refresh_all(leaves, plans, indices, inner_states, count, key):
        """One draw for every matrix at a shared refresh (`stagger=False`): a single PRNG call,
        and one batched sort per distinct ``(D, k)``."""
        chosen = [i for i, plan in enumerate(plans) if plan is not None]
        if not chosen:
            return indices, inner_states
        sizes = [plans[i].batch * subset_dim(plans[i]) for i in chosen]
        by_dims: dict[tuple[int, int], list[int]] = {}
        for j, i in enumerate(chosen):
            by_dims.setdefault((subset_dim(plans[i]), indices[i].shape[-1]), []).append(j)

        def refresh(idx_list, state_list):
            u = jax.random.uniform(
                jax.random.fold_in(jax.random.wrap_key_data(key), count), (sum(sizes),)
            )
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            out_idx = list(idx_list)
            for (d, k), members in by_dims.items():
                draws = jnp.concatenate(
                    [u[offsets[j] : offsets[j] + sizes[j]].reshape(-1, d) for j in members]
                )
                picked = jnp.sort(jnp.argsort(draws, axis=-1)[:, :k], axis=-1).astype(jnp.int32)
                start = 0
                for j in members:
                    batch = plans[chosen[j]].batch
                    out_idx[j] = picked[start : start + batch].reshape(idx_list[j].shape)
                    start += batch
            out_state = list(state_list)
            if reset_statistics:
                for j, i in enumerate(chosen):
                    dtype = jnp.result_type(leaves[i][1])
                    out_state[j] = inner.init(jnp.zeros(low_shape(plans[i]), dtype))
            return out_idx, out_state

        idx_list, state_list = jax.lax.cond(
            count % refresh_every == 0,
            refresh,
            lambda a, b: (a, b),
            [indices[i] for i in chosen],
            [inner_states[i] for i in chosen],
        )
        indices, inner_states = list(indices), list(inner_states)
        for i, idx, st in zip(chosen, idx_list, state_list, strict=True):
            indices[i], inner_states[i] = idx, st
        return indices, inner_states

    def refresh_one(plan, g, idx, inner_state, count, key):
        """A staggered refresh of one matrix leaf, from the key folded with its index."""
        leaf_key = jax.random.fold_in(jax.random.wrap_key_data(key), plan.index)

        def refresh(idx, st):
            u = jax.random.uniform(
                jax.random.fold_in(leaf_key, count), (plan.batch, subset_dim(plan))
            )
            return fresh(plan, u, idx, g.dtype, st)

        due = _refresh_due(count, plan, refresh_every, "random")
        return jax.lax.cond(due, refresh, lambda s, t: (s, t), idx, inner_state)

    def coordinates_update(plan, g, idx, inner_state, count, extra_args):
        mats = as_matrices(g, plan.spec, plan.name)  # (b, m, n)
        flat_idx = idx.reshape(plan.batch, idx.shape[-1])
        gathered = gather(mats, flat_idx)
        direction, inner_state = inner.update(
            gathered.reshape(low_shape(plan)), inner_state, None, **extra_args
        )
        direction = direction.astype(jnp.float32).reshape(gathered.shape)
        full = place(direction, flat_idx, free_part(mats))
        out = from_matrices(finish(full, count), plan.spec, g.shape, plan.name).astype(g.dtype)
        return out, inner_state

    def update_fn(updates, state, params=None, **extra_args):
        leaves, plans, treedef = plans_of(updates)
        param_leaves = None if params is None else treedef.flatten_up_to(params)
        fallback_grads = [
            leaf if plan is None else _MASKED for (_, leaf), plan in zip(leaves, plans, strict=True)
        ]
        fallback_params = None
        if param_leaves is not None:
            fallback_params = treedef.unflatten(
                [
                    p if plan is None else _MASKED
                    for p, plan in zip(param_leaves, plans, strict=True)
                ]
            )
        fallback_out, fallback_state = fallback.update(
            treedef.unflatten(fallback_grads), state.fallback, fallback_params, **extra_args
        )
        fallback_leaves = iter(jax.tree.leaves(fallback_out))
        if blocks:
            matrix_outs, projector_state, inner_state = blocks_update(
                leaves, plans, state.projector, state.inner, state.count, state.key, extra_args
            )
        else:
            indices = treedef.flatten_up_to(state.projector)
            inner_states = treedef.flatten_up_to(state.inner)
            if not stagger:
                indices, inner_states = refresh_all(
                    leaves, plans, indices, inner_states, state.count, state.key
                )
            matrix_outs, new_idx, new_inner = {}, [], []
            for i, ((_, leaf), plan) in enumerate(zip(leaves, plans, strict=True)):
                idx, st = indices[i], inner_states[i]
                if plan is not None:
                    if stagger:
                        idx, st = refresh_one(plan, leaf, idx, st, state.count, state.key)
                    matrix_outs[i], st = coordinates_update(
                        plan, leaf, idx, st, state.count, extra_args
                    )
                new_idx.append(idx)
                new_inner.append(st)
            projector_state = treedef.unflatten(new_idx)
            inner_state = treedef.unflatten(new_inner)
        outs = [
            next(fallback_leaves) if plan is None else matrix_outs[i]
            for i, plan in enumerate(plans)
        ]
        return treedef.unflatten(outs), state_cls(
            count=optax.safe_increment(state.count),
            key=state.key,
            projector=projector_state,
            inner=inner_state,
            fallback=fallback_state,
            projector_opt=state.projector_opt,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
