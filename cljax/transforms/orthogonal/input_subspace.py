"""Input-subspace projection: GPM (OR-01) and FOT's server-side form (OR-02).

Per matrix leaf the state holds a fixed-capacity orthonormal basis ``M`` of old tasks' layer
inputs (zero-padded columns beyond a valid count). Each step the update ``G`` of a Flax kernel
``(d_in, d_out)`` loses its component in that subspace, ``G <- G - M (M^T G)``, so the layer's
outputs on old inputs do not move. Between tasks `gpm_add_task` (from activations) or
`fot_add_task` (from Gram matrices summed over clients or replicas) grows the bases by GPM's
energy criterion; counts are arrays, so nothing recompiles from one task to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal._common import Where

__all__ = ["GpmState", "fot_add_task", "fot_client_grams", "gpm", "gpm_add_task"]

SpecArg = _tree.MatrixSpec | Callable[[str, tuple[int, ...]], "_tree.MatrixSpec | None"]

# Candidate directions with energy at most this fraction of the layer's total are numerical
# noise: SVD of activations is accurate far below it; eigh of a float32 Gram only to ~1e-7.
_RTOL_ACTIVATIONS = 1e-10
_RTOL_GRAMS = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST
mm = _common.mm


class GpmState(NamedTuple):
    """State of `gpm`."""

    num_tasks: chex.Array  # int32 number of task-boundary calls so far
    bases: optax.Params  # matrix leaf: batch + (d_in, capacity) float32, zero-padded; else None
    counts: optax.Params  # matrix leaf: int32 of the batch shape, valid basis columns; else None
    inner: optax.OptState  # state of `inner` (EmptyState without one)


def _leaf_spec(
    fn: str, spec: SpecArg, name: str, shape: tuple[int, ...]
) -> _tree.MatrixSpec | None:
    if isinstance(spec, _tree.MatrixSpec):
        return spec if len(shape) >= 2 else None
    got = spec(name, tuple(shape))
    if got is not None and not isinstance(got, _tree.MatrixSpec):
        raise TypeError(
            f"{fn}(spec=...) returned {got!r} for leaf '{name}'; return a MatrixSpec or None."
        )
    return got


def _check_spec(fn: str, spec: Any) -> None:
    if not isinstance(spec, _tree.MatrixSpec) and not callable(spec):
        raise TypeError(
            f"{fn}(spec=...) must be a MatrixSpec or a function (path, shape) -> MatrixSpec | None, "
            f"got {type(spec).__name__}."
        )


def _matrix_dims(fn, spec, name, shape):
    """Returns ``(batch_shape, d_in, d_out)`` of a leaf's matrix view (rows = inputs)."""
    batch_axes, row_axes, col_axes = spec.axes(len(shape), name)
    batch_shape = tuple(shape[a] for a in batch_axes)
    d_in = int(np.prod([shape[a] for a in row_axes]))
    d_out = int(np.prod([shape[a] for a in col_axes]))
    return batch_shape, d_in, d_out


def _project_leaf(u, basis, spec, name):
    """``G - M (M^T G)`` on every matrix of the leaf, in float32; returns u's dtype."""
    mats = _tree.as_matrices(u, spec, name).astype(jnp.float32)  # (B, d_in, d_out)
    m = basis.reshape((-1,) + basis.shape[-2:])  # (B, d_in, c)
    coef = jnp.einsum("bic,bio->bco", m, mats, precision=_HIGHEST)
    out = mats - jnp.einsum("bic,bco->bio", m, coef, precision=_HIGHEST)
    return _tree.from_matrices(out, spec, u.shape, name).astype(u.dtype)


def gpm(
    capacity: int | None,
    *,
    spec: SpecArg = _tree.MatrixSpec(),
    inner: optax.GradientTransformation | None = None,
    where: Where | None = None,
    freeze_non_matrix: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Projects each matrix update off the stored input subspaces of old tasks (GPM).

    For a Flax kernel ``(d_in, d_out)`` with stored orthonormal basis ``M`` (``(d_in, k)``) of old
    tasks' layer inputs, the update becomes ``G - M (M^T G)``: for any old input ``x`` in the
    span of ``M``, ``x^T (K + G') = x^T K``. Bases start empty (the transform is then the
    identity) and grow at task boundaries with `gpm_add_task` or `fot_add_task`.

    The projection is linear, so it may sit anywhere in a chain. With plain SGD projecting the
    gradient equals projecting the update (the paper); with momentum or Adam only projecting the
    final update keeps the constraint: pass the optimizer as `inner` (``where='update'``, the
    default) or place `gpm` after it in an `optax.chain`.

    Args:
        capacity: Basis columns kept per matrix, at most ``d_in`` (None: ``d_in``). Static.
            `gpm_add_task` raises rather than truncate when a layer needs more.
        spec: Which axes form each matrix; its rows are the layer's input dimension (Flax:
            the default ``MatrixSpec()``; PyTorch ``(d_out, d_in)``: ``MatrixSpec(rows=-1,
            cols=-2)``; a Flax convolution ``(kh, kw, c_in, c_out)``: ``MatrixSpec(rows=(0, 1,
            2), cols=3)``). Other axes are batch axes (stacked layers, one basis each). Either
            one spec for every leaf with two or more dims, or a function ``(path, shape) ->
            MatrixSpec | None`` (None: not projected). Static.
        inner: An optimizer to run inside the projection, e.g. ``optax.adam(1e-3)``.
        where: With `inner`: ``'update'`` (default) projects the final update `inner` emits;
            ``'gradient'`` projects the gradient before `inner` (the paper, with SGD). Static.
        freeze_non_matrix: Zero the updates of leaves without a basis (biases, norms) once a
            task has been stored, as the reference code does for the shared backbone. Static.

    Returns:
        A transform whose state is `GpmState`.

    Example:
        >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
        >>> tx = cljax.gpm(capacity=3, inner=optax.sgd(0.1))
        >>> state = tx.init(params)
        >>> acts = {"w": jnp.array([[2.0, 0.0, 0.0], [0.0, 0.1, 0.0]]), "b": None}
        >>> state = cljax.gpm_add_task(state, acts, threshold=0.999)  # keeps x = e_0
        >>> updates, state = tx.update({"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, state, params)
        >>> updates["w"][0]  # the output on x = e_0 cannot change
        Array([0., 0.], dtype=float32)

    References:
        Saha, Garg and Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021.
        https://arxiv.org/abs/2103.09762
    """
    fn = "gpm"
    if capacity is not None:
        _checks.check_int(fn, "capacity", capacity, 1)
    _check_spec(fn, spec)
    where = _common.resolve_where(fn, inner, where)
    if not isinstance(freeze_non_matrix, bool):
        raise TypeError(f"{fn}(freeze_non_matrix=...) must be a bool, got {freeze_non_matrix!r}.")

    def leaf_state(path, p):
        name = _common.path_name(path)
        s = _leaf_spec(fn, spec, name, tuple(p.shape))
        if s is None:
            return None, None
        batch_shape, d_in, _ = _matrix_dims(fn, s, name, tuple(p.shape))
        c = d_in if capacity is None else min(capacity, d_in)
        return (
            jnp.zeros(batch_shape + (d_in, c), jnp.float32),
            jnp.zeros(batch_shape, jnp.int32),
        )

    def init_fn(params):
        pairs = jax.tree_util.tree_map_with_path(leaf_state, params)
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not hasattr(x, "_fields")
        bases = jax.tree.map(lambda x: x[0], pairs, is_leaf=is_pair)
        counts = jax.tree.map(lambda x: x[1], pairs, is_leaf=is_pair)
        return GpmState(
            num_tasks=jnp.zeros([], jnp.int32),
            bases=bases,
            counts=counts,
            inner=_common.init_inner(inner, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        def project(tree, descent):
            del descent  # a linear projection: the sign does not matter

            def leaf(path, u, basis):
                if _common.is_empty(u):
                    return u
                if basis is None:
                    if freeze_non_matrix:
                        return jnp.where(state.num_tasks > 0, jnp.zeros_like(u), u)
                    return u
                name = _common.path_name(path)
                return _project_leaf(u, basis, _leaf_spec(fn, spec, name, tuple(u.shape)), name)

            return jax.tree_util.tree_map_with_path(
                leaf, tree, state.bases, is_leaf=_common.is_empty
            )

        out, inner_state = _common.around_inner(
            project, inner, where, updates, state.inner, params, extra_args
        )
        return out, state._replace(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Task boundaries.


def _select_and_extend(basis, count, cands, s2, energy, resid_energy, threshold, first, rtol):
    """GPM's energy criterion, then `orthonormal_extend`. One matrix."""
    positive = energy > 0
    safe = jnp.where(positive, energy, 1.0)
    ratio = jnp.where(positive, s2 / safe, 0.0)
    cum = jnp.cumsum(ratio)
    # First task: count of prefixes whose cumulative ratio is strictly below the threshold.
    k_first = jnp.sum(cum < threshold)
    # Later tasks: start from the energy the basis already captures (measured against the
    # original total) and add residual directions while the running total is below threshold.
    acc0 = jnp.where(positive, (energy - resid_energy) / safe, 1.0)
    k_later = jnp.sum(acc0 + cum - ratio < threshold)
    k_rule = jnp.where(first, k_first, k_later).astype(jnp.int32)
    return _common.orthonormal_extend(basis, count, cands, k_rule, s2, energy, rtol)


def _grow_activations(basis, count, acts, threshold, first):
    r = acts.T.astype(jnp.float32)  # (d_in, n): the representation matrix R
    energy = jnp.sum(r * r)
    resid = r - mm(basis, mm(basis.T, r))
    u, s = _common.left_singular(resid)
    s2 = s * s
    return _select_and_extend(
        basis, count, u, s2, energy, jnp.sum(resid * resid), threshold, first, _RTOL_ACTIVATIONS
    )


def _grow_grams(basis, count, gram, threshold, first):
    c = gram.astype(jnp.float32)
    c = 0.5 * (c + c.T)
    energy = jnp.trace(c)
    proj = jnp.eye(c.shape[0], dtype=jnp.float32) - mm(basis, basis.T)
    resid = mm(mm(proj, c), proj)
    resid = 0.5 * (resid + resid.T)
    w, v = jnp.linalg.eigh(resid)
    w, v = w[::-1], v[:, ::-1]  # descending
    s2 = jnp.maximum(w, 0.0)
    return _select_and_extend(
        basis,
        count,
        v,
        s2,
        energy,
        jnp.maximum(jnp.trace(resid), 0.0),
        threshold,
        first,
        _RTOL_GRAMS,
    )


_GROW = {
    "activations": jax.jit(jax.vmap(_grow_activations, in_axes=(0, 0, 0, None, None))),
    "grams": jax.jit(jax.vmap(_grow_grams, in_axes=(0, 0, 0, None, None))),
}


def _thresholds(fn: str, threshold: Any, names: list[str]) -> dict[str, float]:
    """One threshold per matrix leaf: a number for all, or a tree matched by path."""
    if isinstance(threshold, (int, float, np.number)) or (
        hasattr(threshold, "shape") and np.ndim(threshold) == 0
    ):
        value = _common.as_float(fn, "threshold", threshold)
        _checks.check_in_range(fn, "threshold", value, 0.0, 1.0)
        return dict.fromkeys(names, value)
    leaves = jax.tree_util.tree_flatten_with_path(threshold, is_leaf=lambda x: x is None)[0]
    by_name = {_common.path_name(p): x for p, x in leaves if x is not None}
    out = {}
    for name in names:
        if name in by_name:
            value = _common.as_float(fn, f"threshold['{name}']", by_name[name])
            _checks.check_in_range(fn, f"threshold['{name}']", value, 0.0, 1.0)
            out[name] = value
    return out


def _grow(
    fn: str, opt_state: Any, inputs: Any, threshold: Any, index: int | None, kind: str
) -> Any:
    _common.require_concrete(fn, **{kind: inputs, "threshold": threshold})
    state = _tree.find_state(opt_state, GpmState, index=index)
    base_leaves, treedef = jax.tree.flatten(state.bases, is_leaf=_common.is_empty)
    base_paths = [
        p for p, _ in jax.tree_util.tree_flatten_with_path(state.bases, is_leaf=_common.is_empty)[0]
    ]
    count_leaves = treedef.flatten_up_to(state.counts)
    names = [_common.path_name(p) for p in base_paths]
    given = {
        _common.path_name(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(inputs, is_leaf=lambda x: x is None)[0]
        if x is not None
    }
    for name in given:
        if name not in names:
            raise ValueError(f"{fn}: `{kind}` has leaf '{name}', which the parameters do not have.")
        b = base_leaves[names.index(name)]
        if b is None:
            raise ValueError(
                f"{fn}: leaf '{name}' has no input-subspace basis (it is not a matrix for `gpm`'s "
                f"spec); pass None there in `{kind}`."
            )
    thresholds = _thresholds(fn, threshold, [n for n in names if n in given])
    first = jnp.asarray(int(_common.host_int(state.num_tasks)) == 0)
    new_bases, new_counts = list(base_leaves), list(count_leaves)
    for i, name in enumerate(names):
        basis, count = base_leaves[i], count_leaves[i]
        if _common.is_empty(basis) or name not in given:
            continue
        if name not in thresholds:
            raise ValueError(f"{fn}: `threshold` has no value for leaf '{name}'.")
        batch_shape, (d_in, cap) = basis.shape[:-2], basis.shape[-2:]
        x = jnp.asarray(given[name])
        if kind == "activations":
            ok = (
                x.ndim == len(batch_shape) + 2
                and x.shape[: len(batch_shape)] == batch_shape
                and x.shape[-1] == d_in
            )
            want = f"{batch_shape + ('num_samples', d_in)}"
        else:
            ok = x.shape == batch_shape + (d_in, d_in)
            want = f"{batch_shape + (d_in, d_in)}"
        if not ok:
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {tuple(x.shape)} in `{kind}`; it must be {want} "
                "(the leaf's batch axes, then the matrix rows = layer inputs, flattened in the "
                "order of the spec's row axes)."
            )
        flat_b = basis.reshape((-1, d_in, cap))
        flat_c = count.reshape((-1,))
        flat_x = x.reshape((flat_b.shape[0],) + x.shape[len(batch_shape) :])
        thr = jnp.asarray(thresholds[name], jnp.float32)
        b, c, needed = _GROW[kind](flat_b, flat_c, flat_x, thr, first)
        worst = int(np.max(_common.host_int(needed))) if needed.size else 0
        if worst > cap:
            raise ValueError(
                f"{fn}: leaf '{name}' needs {worst} basis columns at threshold "
                f"{thresholds[name]}, but its capacity is {cap}. Build `gpm` with a larger "
                "`capacity` or lower the threshold."
            )
        new_bases[i] = b.reshape(basis.shape)
        new_counts[i] = c.reshape(count.shape)
    new = state._replace(
        num_tasks=state.num_tasks + jnp.ones([], jnp.int32),
        bases=jax.tree.unflatten(treedef, new_bases),
        counts=jax.tree.unflatten(treedef, new_counts),
    )
    return _tree.replace_state(opt_state, new, index=index)


def _check_samples(
    fn: str, arg: str, name: str, x: jax.Array, batch_shape: tuple, width: int, what: str, hint: str
) -> None:
    """Raises unless `x` is ``batch_shape + (n, width)``: samples of one leaf's matrix rows."""
    if not (
        x.ndim == len(batch_shape) + 2
        and x.shape[: len(batch_shape)] == batch_shape
        and x.shape[-1] == width
    ):
        raise ValueError(
            f"{fn}: leaf '{name}' has shape {tuple(x.shape)} in `{arg}`; it must be "
            f"{batch_shape + (what, width)} ({hint})."
        )


def gpm_add_task(
    opt_state: Any, activations: Any, threshold: Any, *, index: int | None = None
) -> Any:
    """Grows the `gpm` bases in `opt_state` from a finished task's layer inputs (GPM).

    Per matrix leaf with representation matrix ``R = activations.T`` (``(d_in, n)``), total energy
    ``E = ||R||_F^2``:

    * first task: ``U, S = svd(R)``; keep ``k = #{i : cumsum(S^2)_i / E < threshold}`` columns;
    * later tasks: residual ``R' = R - M M^T R``, ``U, S = svd(R')``, running ratio
      ``acc = (E - ||R'||_F^2) / E``; add residual directions one by one while
      ``acc < threshold`` (``acc += S_i^2 / E``).

    New columns are re-orthogonalised against the basis (QR) and directions with no energy are
    never added, so the basis stays orthonormal. Runs eagerly (call it outside `jax.jit`); its
    work is jitted once per shape, and counts are arrays, so nothing recompiles across tasks.

    Args:
        opt_state: The whole optimizer state holding one `GpmState`.
        activations: A tree with the params' structure: for each matrix leaf its layer inputs as
            ``batch + (num_samples, d_in)`` (``batch``: the leaf's batch axes; ``d_in``: its rows,
            flattened in the spec's row-axis order, e.g. conv patches in ``(kh, kw, c_in)``
            order); None for other leaves and for layers to leave unchanged (task heads).
        threshold: Energy threshold in [0, 1], one number or a tree with a number per matrix leaf
            (PMNIST: 0.95 / 0.99 / 0.99; CIFAR-100: ``0.97 + 0.003 * task``).
        index: Which `GpmState` when the optimizer holds several (tree order).

    Returns:
        `opt_state` with the bases grown and the task count incremented.

    Raises:
        ValueError: no or several `GpmState`s; a leaf's activations have the wrong shape or sit
            on a leaf without a basis; a layer needs more columns than its capacity (nothing is
            truncated).
        TypeError: called under `jax.jit`.

    Example:
        >>> tx = cljax.gpm(capacity=4)
        >>> state = tx.init({"w": jnp.zeros((4, 2))})
        >>> acts = {"w": jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.1, 0.0, 0.0]])}
        >>> state = cljax.gpm_add_task(state, acts, threshold=0.995)
        >>> int(state.counts["w"])  # e_0 holds 99% of the energy: below 0.995, so it is kept
        1

    References:
        Saha, Garg and Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021.
    """
    return _grow("gpm_add_task", opt_state, activations, threshold, index, "activations")


def fot_add_task(opt_state: Any, grams: Any, threshold: Any, *, index: int | None = None) -> Any:
    """Grows the `gpm` bases from input Gram matrices summed over clients (FOT's GPSE).

    The left singular vectors of concatenated activations ``[X_1; ...; X_C]`` are the
    eigenvectors of ``sum_c X_c^T X_c``, and the squared singular values its eigenvalues, so a
    server that only receives (securely) summed Grams extracts exactly the basis `gpm_add_task`
    would from the pooled activations, with the same energy criterion on the global spectrum.
    Also the way to grow bases under data parallelism: ``psum`` the Grams of each replica.
    The server then projects every aggregated update with the `gpm` transform (FedProject).

    Args:
        opt_state: The whole optimizer state holding one `GpmState`.
        grams: A tree with the params' structure: for each matrix leaf ``batch + (d_in, d_in)``
            summed ``X^T X`` (see `fot_client_grams`); None elsewhere.
        threshold: As in `gpm_add_task`.
        index: Which `GpmState` when the optimizer holds several.

    Returns:
        `opt_state` with the bases grown and the task count incremented.

    Raises:
        ValueError, TypeError: as `gpm_add_task`.

    Example:
        >>> tx = cljax.gpm(capacity=4)
        >>> state = tx.init({"w": jnp.zeros((4, 2))})
        >>> client_a = cljax.fot_client_grams({"w": jnp.eye(4)[:1]})
        >>> client_b = cljax.fot_client_grams({"w": 0.1 * jnp.eye(4)[1:2]})
        >>> summed = jax.tree.map(jnp.add, client_a, client_b)
        >>> int(cljax.fot_add_task(state, summed, threshold=0.995).counts["w"])
        1

    References:
        Bakman et al., "Federated Orthogonal Training: Mitigating Global Catastrophic Forgetting
        in Continual Federated Learning", 2023.
    """
    return _grow("fot_add_task", opt_state, grams, threshold, index, "grams")


def fot_client_grams(activations: Any) -> Any:
    """Returns each leaf's input Gram matrix ``X^T X`` in float32 (what a FOT client sends).

    Args:
        activations: A tree whose leaves are ``batch + (num_samples, d_in)`` layer inputs, or None.

    Returns:
        A tree of ``batch + (d_in, d_in)`` float32 Grams (None where the input is None); sum them
        over clients or replicas and pass the sum to `fot_add_task`.

    Example:
        >>> cljax.fot_client_grams({"w": jnp.ones((5, 2))})["w"]
        Array([[5., 5.],
               [5., 5.]], dtype=float32)
    """

    def gram(path, x):
        if x is None:
            return None
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(
                f"fot_client_grams: leaf '{_common.path_name(path)}' has shape {tuple(x.shape)}; "
                "it must be batch + (num_samples, d_in)."
            )
        x = x.astype(jnp.float32)
        return jnp.einsum("...ni,...nj->...ij", x, x, precision=_HIGHEST)

    return jax.tree_util.tree_map_with_path(gram, activations, is_leaf=lambda x: x is None)
