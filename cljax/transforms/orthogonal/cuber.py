"""CUBER (OR-09): input-subspace projection with layer-wise backward transfer to correlated tasks.

CUBER stores each old task's input subspace per layer separately, judges layer by layer which
old tasks the new task correlates with, and keeps the update's component in those tasks'
subspaces (it may then improve them) while removing it from all the others, as GPM does.

Task ``k``'s basis is the block of columns that GPM's energy criterion adds at task ``k``, taken
from the residual of that task's activations after the older bases; the blocks are therefore
mutually orthogonal and their union is exactly GPM's merged basis. Per matrix the state holds
that merged basis, the task label of every column and one scale per stored task; the update of
a Flax kernel becomes ``G - sum_k (1 - s_k) M_k M_k^T G``, equal to GPM's when every ``s_k = 0``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal import input_subspace as _gpm
from cljax.transforms.orthogonal._common import Where

__all__ = ["CuberState", "cuber", "cuber_add_task", "cuber_correlate"]

_HIGHEST = jax.lax.Precision.HIGHEST


class CuberState(NamedTuple):
    """State of `cuber`."""

    num_tasks: chex.Array  # int32 number of stored tasks
    bases: optax.Params  # matrix leaf: batch + (d_in, capacity) float32, zero-padded; else None
    counts: optax.Params  # matrix leaf: int32 of the batch shape, valid basis columns; else None
    labels: optax.Params  # matrix leaf: batch + (capacity,) int32 task of each column, -1 unused
    scales: optax.Params  # matrix leaf: batch + (max_tasks,) float32 kept fraction per old task
    inner: optax.OptState  # state of `inner` (EmptyState without one)


def _project_leaf(u, basis, labels, scales, spec, name):
    """``G - M diag(1 - s[label]) M^T G`` on every matrix of the leaf, in float32."""
    mats = _tree.as_matrices(u, spec, name).astype(jnp.float32)  # (B, d_in, d_out)
    m = basis.reshape((-1,) + basis.shape[-2:])  # (B, d_in, c)
    lab = labels.reshape((-1, labels.shape[-1]))  # (B, c)
    s = scales.reshape((-1, scales.shape[-1]))  # (B, T)
    keep = jnp.take_along_axis(s, jnp.clip(lab, 0, s.shape[-1] - 1), axis=-1)
    drop = jnp.where(lab >= 0, 1.0 - keep, 0.0)  # (B, c)
    coef = jnp.einsum("bic,bio->bco", m, mats, precision=_HIGHEST) * drop[..., None]
    out = mats - jnp.einsum("bic,bco->bio", m, coef, precision=_HIGHEST)
    return _tree.from_matrices(out, spec, u.shape, name).astype(u.dtype)


def cuber(
    capacity: int | None,
    max_tasks: int,
    *,
    spec: _gpm.SpecArg = _tree.MatrixSpec(),
    inner: optax.GradientTransformation | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Projects matrix updates off old tasks' input subspaces except positively correlated ones.

    Per matrix leaf (Flax kernel ``(d_in, d_out)``) and stored task ``k`` with orthonormal basis
    block ``M_k`` and scale ``s_k`` (set per layer by `cuber_correlate`, 0 until then), the
    update becomes ``G - sum_k (1 - s_k) M_k M_k^T G``: the component in an uncorrelated task's
    subspace is removed (GPM), a fraction ``s_k`` of the component in a positively correlated
    task's subspace is kept, so learning the new task may also change, and improve, that task.
    With every ``s_k = 0`` the transform equals `gpm` with the same bases.

    Bases grow with `cuber_add_task`; after it, and before training the next task, call
    `cuber_correlate` with the new task's gradient to judge the correlations layer by layer.

    Args:
        capacity: Basis columns per matrix over all tasks, at most ``d_in`` (None: ``d_in``).
            Static.
        max_tasks: Number of tasks whose bases can be stored. Static.
        spec: Which axes form each matrix (rows = layer inputs), as in `gpm`. Static.
        inner: An optimizer to run inside the projection, e.g. ``optax.sgd(1e-2)``.
        where: With `inner`: ``'update'`` (default) or ``'gradient'``, as in `gpm`. Static.

    Returns:
        A transform whose state is `CuberState`.

    Example:
        >>> tx = cljax.cuber(capacity=2, max_tasks=2)
        >>> state = tx.init({"w": jnp.zeros((2, 1))})
        >>> acts = {"w": jnp.array([[1.0, 0.0], [0.0, 0.1]])}  # keeps e_0 (99% of the energy)
        >>> state = cljax.cuber_add_task(state, acts, threshold=0.995)
        >>> g = {"w": jnp.array([[3.0], [4.0]])}
        >>> tx.update(g, state)[0]["w"].ravel()  # uncorrelated so far: as GPM
        Array([0., 4.], dtype=float32)
        >>> state = cljax.cuber_correlate(state, g, threshold=0.5)  # |M^T g| / |g| = 0.6
        >>> tx.update(g, state)[0]["w"].ravel()
        Array([3., 4.], dtype=float32)

    References:
        Lin, Yang, Fan and Zhang, "Beyond Not-Forgetting: Continual Learning with Backward
        Knowledge Transfer", NeurIPS 2022. https://arxiv.org/abs/2211.00789
    """
    fn = "cuber"
    if capacity is not None:
        _checks.check_int(fn, "capacity", capacity, 1)
    _checks.check_int(fn, "max_tasks", max_tasks, 1)
    _gpm._check_spec(fn, spec)
    where = _common.resolve_where(fn, inner, where)

    def leaf_state(path, p):
        name = _common.path_name(path)
        s = _gpm._leaf_spec(fn, spec, name, tuple(p.shape))
        if s is None:
            return None
        batch_shape, d_in, _ = _gpm._matrix_dims(fn, s, name, tuple(p.shape))
        c = d_in if capacity is None else min(capacity, d_in)
        return (
            jnp.zeros(batch_shape + (d_in, c), jnp.float32),
            jnp.zeros(batch_shape, jnp.int32),
            jnp.full(batch_shape + (c,), -1, jnp.int32),
            jnp.zeros(batch_shape + (max_tasks,), jnp.float32),
        )

    def init_fn(params):
        parts = jax.tree_util.tree_map_with_path(leaf_state, params)
        bases, counts, labels, scales = _common.unzip_parts(parts, 4)
        return CuberState(
            num_tasks=jnp.zeros([], jnp.int32),
            bases=bases,
            counts=counts,
            labels=labels,
            scales=scales,
            inner=_common.init_inner(inner, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        def project(tree, descent):
            del descent  # a linear projection: the sign does not matter

            def leaf(path, u, basis, labels, scales):
                if _common.is_empty(u) or basis is None:
                    return u
                name = _common.path_name(path)
                s = _gpm._leaf_spec(fn, spec, name, tuple(u.shape))
                return _project_leaf(u, basis, labels, scales, s, name)

            return jax.tree_util.tree_map_with_path(
                leaf, tree, state.bases, state.labels, state.scales, is_leaf=_common.is_empty
            )

        out, inner_state = _common.around_inner(
            project, inner, where, updates, state.inner, params, extra_args
        )
        return out, state._replace(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Task boundaries.


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_common.is_empty)[0]


def cuber_add_task(
    opt_state: Any, activations: Any, threshold: Any, *, index: int | None = None
) -> Any:
    """Stores a finished task's per-layer input subspace in the `cuber` state in `opt_state`.

    Per matrix leaf the new columns are chosen exactly as `gpm_add_task` chooses them (GPM's
    energy criterion on the residual of ``R = activations.T`` after the stored bases) and are
    labelled with the new task's index, so they form that task's basis ``M_k``, orthogonal to
    every older block. All scales are reset to 0 (uncorrelated) until `cuber_correlate` judges
    the next task. Runs eagerly (call it outside `jax.jit`); counts are arrays, so nothing
    recompiles across tasks.

    Args:
        opt_state: The whole optimizer state holding one `CuberState`.
        activations: As in `gpm_add_task`: per matrix leaf its layer inputs
            ``batch + (num_samples, d_in)``; None elsewhere and for layers to leave unchanged.
        threshold: Energy threshold in [0, 1], one number or a tree with one per matrix leaf.
        index: Which `CuberState` when the optimizer holds several (tree order).

    Returns:
        `opt_state` with the new task's bases stored and the task count incremented.

    Raises:
        ValueError: no or several `CuberState`s; already `max_tasks` tasks stored; activations
            of the wrong shape or on a leaf without a basis; a layer needs more columns than
            its capacity (nothing is truncated).
        TypeError: called under `jax.jit`.

    Example:
        >>> tx = cljax.cuber(capacity=3, max_tasks=2)
        >>> state = tx.init({"w": jnp.zeros((3, 2))})
        >>> acts = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.1, 0.0]])  # e_0 holds 99% of the energy
        >>> state = cljax.cuber_add_task(state, {"w": acts}, threshold=0.995)
        >>> state = cljax.cuber_add_task(state, {"w": jnp.eye(3)[1:2]}, threshold=0.995)
        >>> state.labels["w"]
        Array([ 0,  1, -1], dtype=int32)

    References:
        Lin, Yang, Fan and Zhang, "Beyond Not-Forgetting: Continual Learning with Backward
        Knowledge Transfer", NeurIPS 2022.
    """
    fn = "cuber_add_task"
    _common.require_concrete(fn, activations=activations, threshold=threshold)
    state = _tree.find_state(opt_state, CuberState, index=index)
    task = int(_common.host_int(state.num_tasks))
    leaves = _leaves(state.bases)
    names = [_common.path_name(p) for p, _ in leaves]
    max_tasks = next((x.shape[-1] for x in jax.tree.leaves(state.scales)), None)
    if max_tasks is not None and task >= max_tasks:
        raise ValueError(
            f"{fn}: {task} tasks are already stored, the `max_tasks` of `cuber`; build it with a "
            "larger `max_tasks`."
        )
    given = {
        _common.path_name(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(activations, is_leaf=lambda x: x is None)[
            0
        ]
        if x is not None
    }
    for name in given:
        if name not in names:
            raise ValueError(
                f"{fn}: `activations` has leaf '{name}', which the parameters do not have."
            )
        if _common.is_empty(leaves[names.index(name)][1]):
            raise ValueError(
                f"{fn}: leaf '{name}' has no input-subspace basis (it is not a matrix for "
                "`cuber`'s spec); pass None there in `activations`."
            )
    thresholds = _gpm._thresholds(fn, threshold, [n for n in names if n in given])
    treedef = jax.tree.structure(state.bases, is_leaf=_common.is_empty)
    counts = treedef.flatten_up_to(state.counts)
    labels = treedef.flatten_up_to(state.labels)
    scales = treedef.flatten_up_to(state.scales)
    new_b, new_c, new_l = [x for _, x in leaves], list(counts), list(labels)
    first = jnp.asarray(task == 0)
    for i, name in enumerate(names):
        basis = new_b[i]
        if _common.is_empty(basis) or name not in given:
            continue
        if name not in thresholds:
            raise ValueError(f"{fn}: `threshold` has no value for leaf '{name}'.")
        batch_shape, (d_in, cap) = basis.shape[:-2], basis.shape[-2:]
        x = jnp.asarray(given[name])
        _gpm._check_samples(
            fn,
            "activations",
            name,
            x,
            batch_shape,
            d_in,
            "num_samples",
            "the leaf's batch axes, then the layer inputs flattened in the order of the spec's "
            "row axes",
        )
        flat_b = basis.reshape((-1, d_in, cap))
        old_c = counts[i].reshape((-1,))
        flat_x = x.reshape((flat_b.shape[0],) + x.shape[len(batch_shape) :])
        thr = jnp.asarray(thresholds[name], jnp.float32)
        b, c, needed = _gpm._GROW["activations"](flat_b, old_c, flat_x, thr, first)
        worst = int(np.max(_common.host_int(needed))) if needed.size else 0
        if worst > cap:
            raise ValueError(
                f"{fn}: leaf '{name}' needs {worst} basis columns at threshold "
                f"{thresholds[name]}, but its capacity is {cap}. Build `cuber` with a larger "
                "`capacity` or lower the threshold."
            )
        j = jnp.arange(cap)[None, :]
        fresh = (j >= old_c[:, None]) & (j < c[:, None])
        lab = jnp.where(fresh, task, labels[i].reshape((-1, cap)))
        new_b[i] = b.reshape(basis.shape)
        new_c[i] = c.reshape(counts[i].shape)
        new_l[i] = lab.reshape(labels[i].shape).astype(jnp.int32)
    new = state._replace(
        num_tasks=state.num_tasks + jnp.ones([], jnp.int32),
        bases=jax.tree.unflatten(treedef, new_b),
        counts=jax.tree.unflatten(treedef, new_c),
        labels=jax.tree.unflatten(treedef, new_l),
        scales=jax.tree.unflatten(
            treedef, [s if _common.is_empty(s) else jnp.zeros_like(s) for s in scales]
        ),
    )
    return _tree.replace_state(opt_state, new, index=index)


def cuber_correlate(
    opt_state: Any,
    grads: Any,
    threshold: float = 0.5,
    *,
    scale: float = 1.0,
    old_grads: Any = None,
    spec: _gpm.SpecArg = _tree.MatrixSpec(),
    index: int | None = None,
) -> Any:
    """Judges, per layer and old task, whether the new task correlates with it (CUBER).

    With the new task's gradient ``G`` of a matrix leaf (at the start of the task), old task
    ``k`` is positively correlated in that layer when the projection onto its subspace is large,
    ``||M_k^T G||_F >= threshold * ||G||_F`` (and nonzero), and, when `old_grads` is given, the
    projected gradients agree, ``<M_k^T G, M_k^T G_k> > 0`` (a descent step on the new task then
    also descends task ``k``'s loss to first order). Its scale becomes `scale`, every other
    scale 0. Works under `jax.jit`.

    Args:
        opt_state: The whole optimizer state holding one `CuberState`.
        grads: The new task's gradient, a tree with the params' structure (None where the leaf
            has no basis).
        threshold: Sufficient-projection ratio in [0, 1].
        scale: Fraction in [0, 1] of the component kept in a correlated task's subspace.
        old_grads: Optional tree whose matrix leaves are ``(max_tasks,) + leaf.shape``: slot
            ``k`` holds old task ``k``'s gradient at the current parameters (e.g. on a few
            stored samples); unused slots are ignored.
        spec: The `spec` given to `cuber` (a MatrixSpec or a function). Static.
        index: Which `CuberState` when the optimizer holds several.

    Returns:
        `opt_state` with the per-layer, per-task scales set.

    Raises:
        ValueError: no or several `CuberState`s; a gradient leaf missing or of the wrong shape;
            `threshold` or `scale` outside [0, 1].

    Example:
        >>> tx = cljax.cuber(capacity=2, max_tasks=1)
        >>> state = tx.init({"w": jnp.zeros((2, 1))})
        >>> acts = {"w": jnp.array([[1.0, 0.0], [0.0, 0.1]])}
        >>> state = cljax.cuber_add_task(state, acts, threshold=0.995)
        >>> cljax.cuber_correlate(state, {"w": jnp.array([[1.0], [9.0]])}, 0.5).scales["w"]
        Array([0.], dtype=float32)

    References:
        Lin, Yang, Fan and Zhang, "Beyond Not-Forgetting: Continual Learning with Backward
        Knowledge Transfer", NeurIPS 2022.
    """
    fn = "cuber_correlate"
    _checks.check_in_range(fn, "threshold", threshold, 0.0, 1.0)
    _checks.check_in_range(fn, "scale", scale, 0.0, 1.0)
    _gpm._check_spec(fn, spec)
    state = _tree.find_state(opt_state, CuberState, index=index)
    treedef = jax.tree.structure(state.bases, is_leaf=_common.is_empty)
    leaves = _leaves(state.bases)
    labels = treedef.flatten_up_to(state.labels)
    scales = treedef.flatten_up_to(state.scales)
    known = {_common.path_name(p) for p, _ in leaves}
    given = _by_name(grads)
    old = None if old_grads is None else _by_name(old_grads)
    for arg, tree in (("grads", given), ("old_grads", old or {})):
        unknown = sorted(set(tree) - known)
        if unknown:
            raise ValueError(
                f"{fn}: `{arg}` has leaf '{unknown[0]}', which the parameters do not have. "
                f"Give `{arg}` the parameters' structure."
            )
    thr = jnp.asarray(threshold, jnp.float32)
    new_scales = []
    for (path, basis), lab, sc in zip(leaves, labels, scales, strict=True):
        if _common.is_empty(basis):
            new_scales.append(sc)
            continue
        name = _common.path_name(path)
        if name not in given:
            raise ValueError(
                f"{fn}: leaf '{name}' has no entry in `grads`; give `grads` the parameters' "
                "structure."
            )
        num_t = sc.shape[-1]
        m = basis.reshape((-1,) + basis.shape[-2:])  # (B, d_in, c)
        mats = _matrices_of(fn, "grads", name, given[name], spec, m.shape)
        onehot = jax.nn.one_hot(lab.reshape((-1, lab.shape[-1])), num_t, dtype=jnp.float32)
        coef = jnp.einsum("bic,bio->bco", m, mats, precision=_HIGHEST)
        proj2 = jnp.einsum("bco,bct->bt", coef * coef, onehot, precision=_HIGHEST)
        total = jnp.sum(mats * mats, axis=(-2, -1))[:, None]
        ok = (proj2 > 0.0) & (proj2 >= thr * thr * total)
        if old is not None:
            o = old.get(name)
            if o is None:
                raise ValueError(f"{fn}: leaf '{name}' has no entry in `old_grads`.")
            o = jnp.asarray(o)
            if o.ndim < 1 or o.shape[0] != num_t:
                raise ValueError(
                    f"{fn}: leaf '{name}' has shape {tuple(o.shape)} in `old_grads`; it must be "
                    f"({num_t},) + the leaf's shape (a leading axis of size max_tasks)."
                )
            omats = jnp.stack(
                [_matrices_of(fn, "old_grads", name, o[t], spec, m.shape) for t in range(num_t)]
            )  # (T, B, d_in, d_out)
            ocoef = jnp.einsum("bic,tbio->tbco", m, omats, precision=_HIGHEST)
            agree = jnp.einsum("bco,tbco,bct->bt", coef, ocoef, onehot, precision=_HIGHEST)
            ok = ok & (agree > 0.0)
        value = jnp.where(ok, jnp.asarray(scale, jnp.float32), 0.0)
        new_scales.append(value.reshape(sc.shape))
    new = state._replace(scales=jax.tree.unflatten(treedef, new_scales))
    return _tree.replace_state(opt_state, new, index=index)


def _by_name(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {_common.path_name(p): x for p, x in leaves if x is not None}


def _matrices_of(fn, arg, name, g, spec, basis_shape):
    """The float32 ``(B, d_in, d_out)`` matrices of a gradient leaf, checked against its basis."""
    g = jnp.asarray(g)
    s = _gpm._leaf_spec(fn, spec, name, tuple(g.shape))
    mats = None
    if s is not None:
        try:
            mats = _tree.as_matrices(g, s, name)
        except (ValueError, TypeError):
            mats = None
    if mats is None or mats.shape[:2] != basis_shape[:2]:
        raise ValueError(
            f"{fn}: leaf '{name}' has shape {tuple(g.shape)} in `{arg}`, which does not match "
            f"its basis ({basis_shape[0]} matrices with {basis_shape[1]} rows under `spec`). "
            f"Give `{arg}` the parameters' shapes and `cuber`'s spec."
        )
    return mats.astype(jnp.float32)
