"""Weight singular-subspace constraint: OSFT (OR-05), full-gradient and factorized forms.

Each weight ``W = U S V^T`` is split at a task boundary into a frozen high part (top-``k``
singular directions, what earlier tasks rely on) and a trainable low part.

* `osft` (full-gradient form): the state holds ``U_h`` ``(m, k)`` and ``V_h`` ``(n, k)`` per matrix
  and every update becomes ``(I - U_h U_h^T) G (I - V_h V_h^T)``; `osft_decompose` re-computes them
  from the current weights before each task.
* `osft_factorize` / `osft_materialize` / `osft_factored` (the paper's factorized form): the
  weight becomes `OsftFactors`; the loss sees ``osft_materialize(factors)``, and `osft_factored`
  zeroes the high factors' gradients and projects ``dU_l`` off ``U_h`` and ``dV_l`` off ``V_h``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal._common import Where
from cljax.transforms.orthogonal.input_subspace import SpecArg, _check_spec, _leaf_spec

__all__ = [
    "OsftFactors",
    "OsftState",
    "osft",
    "osft_decompose",
    "osft_factored",
    "osft_factorize",
    "osft_importance",
    "osft_materialize",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class OsftState(NamedTuple):
    """State of `osft`."""

    left: optax.Params  # matrix leaf: batch + (m, capacity) float32 U_h, zero-padded; else None
    right: optax.Params  # matrix leaf: batch + (n, capacity) float32 V_h, zero-padded; else None
    ranks: optax.Params  # matrix leaf: int32 of the batch shape, preserved rank k; else None
    inner: optax.OptState  # state of `inner` (EmptyState without one)


def _project_two_sided(g, u, v):
    """``(I - U U^T) G (I - V V^T)`` for (B, m, n) G, (B, m, c) U, (B, n, c) V, in float32."""
    g = g - jnp.einsum(
        "bmc,bcn->bmn", u, jnp.einsum("bmc,bmn->bcn", u, g, precision=_HIGHEST), precision=_HIGHEST
    )
    return g - jnp.einsum(
        "bmc,bnc->bmn", jnp.einsum("bmn,bnc->bmc", g, v, precision=_HIGHEST), v, precision=_HIGHEST
    )


def osft(
    capacity: int | None,
    *,
    spec: SpecArg = _tree.MatrixSpec(),
    inner: optax.GradientTransformation | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Constrains each matrix update orthogonal to its weight's top singular subspace (OSFT).

    Full-gradient form: with the frozen top-``k`` singular vectors ``U_h`` (``(m, k)``) and
    ``V_h`` (``(n, k)``) of the weight at the last `osft_decompose`, every update becomes
    ``(I - U_h U_h^T) G (I - V_h V_h^T)``, so ``U_h^T dW = 0``, ``dW V_h = 0`` and the high part
    ``U_h U_h^T W V_h V_h^T`` does not move during the task. Until the first `osft_decompose`
    nothing is frozen (plain fine-tuning).

    The projection is linear: put it after the optimizer (``inner=...``, ``where='update'``) to
    keep the constraint for Adam; the paper trains with AdamW on the factors (see
    `osft_factored` for that form).

    Args:
        capacity: Largest preserved rank per matrix (None: ``min(m, n)``). Static.
        spec: Which axes form each matrix (as in `gpm`); other axes are batch axes. Static.
        inner: An optimizer to run inside the projection, e.g. ``optax.adamw(1e-5)``.
        where: With `inner`: ``'update'`` (default) or ``'gradient'``. Static.

    Returns:
        A transform whose state is `OsftState`.

    Example:
        >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
        >>> tx = cljax.osft(capacity=2)
        >>> state = cljax.osft_decompose(tx.init(params), params, rank=1)  # freeze e_0 e_0^T
        >>> updates, _ = tx.update({"w": jnp.ones((3, 3))}, state)
        >>> updates["w"][0], updates["w"][:, 0]
        (Array([0., 0., 0.], dtype=float32), Array([0., 0., 0.], dtype=float32))

    References:
        Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
        Learning", 2025. https://arxiv.org/abs/2504.07097
    """
    fn = "osft"
    if capacity is not None:
        _checks.check_int(fn, "capacity", capacity, 1)
    _check_spec(fn, spec)
    where = _common.resolve_where(fn, inner, where)

    def leaf_state(path, p):
        name = _common.path_name(path)
        s = _leaf_spec(fn, spec, name, tuple(p.shape))
        if s is None:
            return None, None, None
        b, m, n = _tree.matrix_shape(p.shape, s, name)
        batch_axes, _, _ = s.axes(p.ndim, name)
        batch_shape = tuple(p.shape[a] for a in batch_axes)
        c = min(m, n) if capacity is None else min(capacity, m, n)
        return (
            jnp.zeros(batch_shape + (m, c), jnp.float32),
            jnp.zeros(batch_shape + (n, c), jnp.float32),
            jnp.zeros(batch_shape, jnp.int32),
        )

    def init_fn(params):
        triples = jax.tree_util.tree_map_with_path(leaf_state, params)
        is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and not hasattr(x, "_fields")
        pick = lambda i: jax.tree.map(lambda x: x[i], triples, is_leaf=is_triple)
        return OsftState(
            left=pick(0), right=pick(1), ranks=pick(2), inner=_common.init_inner(inner, params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        def project(tree, descent):
            del descent

            def leaf(path, u, left, right):
                if _common.is_empty(u) or left is None:
                    return u
                name = _common.path_name(path)
                s = _leaf_spec(fn, spec, name, tuple(u.shape))
                mats = _tree.as_matrices(u, s, name).astype(jnp.float32)
                lu = left.reshape((-1,) + left.shape[-2:])
                rv = right.reshape((-1,) + right.shape[-2:])
                out = _project_two_sided(mats, lu, rv)
                return _tree.from_matrices(out, s, u.shape, name).astype(u.dtype)

            return jax.tree_util.tree_map_with_path(
                leaf, tree, state.left, state.right, is_leaf=_common.is_empty
            )

        out, inner_state = _common.around_inner(
            project, inner, where, updates, state.inner, params, extra_args
        )
        return out, state._replace(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Task boundaries.


def _top_singular(w, k_max: int):
    """Top-`k_max` singular triplets of a (m, n) matrix, decomposing the tall orientation."""
    m, n = w.shape
    if m >= n:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        v = vt.T
    else:
        v, s, ut = jnp.linalg.svd(w.T, full_matrices=False)
        u = ut.T
    return u[:, :k_max], s[:k_max], v[:, :k_max]


def _decompose_one(w, k, cap: int):
    u, _, v = _top_singular(w.astype(jnp.float32), cap)
    keep = (jnp.arange(cap) < k).astype(jnp.float32)
    return u * keep[None, :], v * keep[None, :]


_DECOMPOSE = jax.jit(jax.vmap(_decompose_one, in_axes=(0, None, None)), static_argnums=(2,))


def _rank_for(fn: str, name: str, rank: Any, r: int) -> int:
    """Resolves an int (absolute) or a float in [0, 1] (fraction of min(m, n)) to an int."""
    if isinstance(rank, bool):
        raise TypeError(
            f"{fn}(rank=...) for leaf '{name}' must be an int or a float, got {rank!r}."
        )
    if isinstance(rank, (int, np.integer)):
        k = int(rank)
        if not 0 <= k <= r:
            raise ValueError(
                f"{fn}(rank=...) for leaf '{name}' must be in [0, {r}] (min(m, n)), got {k}."
            )
        return k
    value = _common.as_float(fn, "rank", rank)
    _checks.check_in_range(fn, "rank", value, 0.0, 1.0)
    return int(np.floor(value * r + 1e-9))


def _ranks_by_name(rank: Any) -> dict[str, Any] | None:
    if isinstance(rank, (int, float, np.number)) or (hasattr(rank, "shape") and np.ndim(rank) == 0):
        return None
    leaves = jax.tree_util.tree_flatten_with_path(rank, is_leaf=lambda x: x is None)[0]
    return {_common.path_name(p): x for p, x in leaves}


def osft_decompose(
    opt_state: Any,
    params: Any,
    rank: Any,
    *,
    spec: SpecArg = _tree.MatrixSpec(),
    index: int | None = None,
) -> Any:
    """Re-decomposes the current weights and freezes their top singular subspaces (OSFT).

    Call it before every task, the first one included (on the pre-trained weights): per matrix
    leaf ``W = U S V^T`` and the `osft` state keeps ``U_h = U[:, :k]``, ``V_h = V[:, :k]``. Runs
    eagerly (call it outside `jax.jit`); the SVD is jitted once per shape.

    Args:
        opt_state: The whole optimizer state holding one `OsftState`.
        params: The current parameters (same structure as at `init`).
        rank: The preserved rank ``k`` per matrix: an int, a float in [0, 1] (fraction of
            ``min(m, n)``, rounded down: the paper's retention ratio, e.g. from
            ``min_ratio + importance * (target_ratio - min_ratio)`` with `osft_importance`), or a
            tree of those with the params' structure (None: leave that leaf unchanged).
        spec: The `spec` `osft` was built with.
        index: Which `OsftState` when the optimizer holds several.

    Returns:
        `opt_state` with new ``U_h, V_h`` and ranks.

    Raises:
        ValueError: no or several `OsftState`s; a rank above the capacity or below the rank the
            leaf already preserves (the preserved subspace never shrinks); `params` does not
            match the state.
        TypeError: called under `jax.jit`.

    Example:
        >>> params = {"w": jnp.eye(4)}
        >>> state = cljax.osft_decompose(cljax.osft(2).init(params), params, rank=0.5)
        >>> int(state.ranks["w"])
        2
    """
    fn = "osft_decompose"
    _common.require_concrete(fn, params=params, rank=rank)
    state = _tree.find_state(opt_state, OsftState, index=index)
    lefts, treedef = jax.tree.flatten(state.left, is_leaf=_common.is_empty)
    paths = [
        p for p, _ in jax.tree_util.tree_flatten_with_path(state.left, is_leaf=_common.is_empty)[0]
    ]
    rights = treedef.flatten_up_to(state.right)
    ranks = treedef.flatten_up_to(state.ranks)
    try:
        weights = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{fn}: `params` does not have the structure the optimizer was built for ({err})."
        ) from err
    per_leaf = _ranks_by_name(rank)
    new_l, new_r, new_k = list(lefts), list(rights), list(ranks)
    for i, path in enumerate(paths):
        left = lefts[i]
        if _common.is_empty(left):
            continue
        name = _common.path_name(path)
        m, cap = left.shape[-2:]
        n = rights[i].shape[-2]
        batch_shape = left.shape[:-2]
        w = weights[i]
        leaf_rank = rank if per_leaf is None else per_leaf.get(name)
        if leaf_rank is None:
            continue
        k = _rank_for(fn, name, leaf_rank, min(m, n))
        if k > cap:
            raise ValueError(
                f"{fn}: leaf '{name}' would preserve rank {k}, above its capacity {cap}. Build "
                "`osft` with a larger `capacity`."
            )
        previous = int(np.max(_common.host_int(ranks[i]))) if ranks[i].size else 0
        if k < previous:
            raise ValueError(
                f"{fn}: leaf '{name}' would preserve rank {k}, below the rank {previous} it already "
                "preserves; the preserved subspace only grows from task to task."
            )
        leaf_spec = _leaf_spec(fn, spec, name, tuple(jnp.shape(w)))
        view = None if leaf_spec is None else _tree.matrix_shape(jnp.shape(w), leaf_spec, name)
        if view != (int(np.prod(batch_shape)), m, n):
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {tuple(jnp.shape(w))}, whose matrix view {view} is not "
                f"the ({int(np.prod(batch_shape))}, {m}, {n}) the state holds; pass the `spec` `osft` was built with."
            )
        mats = _tree.as_matrices(jnp.asarray(w), leaf_spec, name)
        lu, rv = _DECOMPOSE(mats, jnp.asarray(k, jnp.int32), cap)
        new_l[i] = lu.reshape(left.shape)
        new_r[i] = rv.reshape(rights[i].shape)
        new_k[i] = jnp.full(batch_shape, k, jnp.int32)
    new = state._replace(
        left=jax.tree.unflatten(treedef, new_l),
        right=jax.tree.unflatten(treedef, new_r),
        ranks=jax.tree.unflatten(treedef, new_k),
    )
    return _tree.replace_state(opt_state, new, index=index)


def osft_importance(inputs: Any, outputs: Any) -> Any:
    """Mean cosine similarity between each layer's inputs and outputs (OSFT's layer importance).

    ``I = mean_i cos(x_i, y_i)`` over samples, for layers whose input and output widths match
    (the paper follows AdaSVD). Combine it into a retention fraction as
    ``min_ratio + I * (target_ratio - min_ratio)`` and pass that as `osft_decompose`'s `rank`.

    Args:
        inputs: A tree of ``(num_samples, d)`` layer inputs (None to skip a leaf).
        outputs: A tree of the same structure with the ``(num_samples, d)`` layer outputs.

    Returns:
        A tree of float32 scalars (None where skipped).

    Example:
        >>> x = {"w": jnp.ones((3, 2))}
        >>> round(float(cljax.osft_importance(x, x)["w"]), 5)
        1.0
    """

    def one(path, x, y):
        if x is None:
            return None
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        if x.shape != y.shape or x.ndim != 2:
            raise ValueError(
                f"osft_importance: leaf '{_common.path_name(path)}' has inputs {tuple(x.shape)} and "
                f"outputs {tuple(y.shape)}; both must be (num_samples, d) with the same d."
            )
        num = jnp.sum(x * y, axis=1)
        den = jnp.linalg.norm(x, axis=1) * jnp.linalg.norm(y, axis=1)
        return jnp.mean(num / jnp.maximum(den, 1e-12))

    return jax.tree_util.tree_map_with_path(one, inputs, outputs, is_leaf=lambda x: x is None)


# ---------------------------------------------------------------------------------------------
# Factorized form.


class OsftFactors(NamedTuple):
    """A weight ``U_h diag(s_h) V_h^T + U_l diag(s_l) V_l^T`` (last two axes: the matrix)."""

    u_high: jax.Array  # batch + (m, k), frozen
    s_high: jax.Array  # batch + (k,), frozen
    v_high: jax.Array  # batch + (n, k), frozen
    u_low: jax.Array  # batch + (m, r - k), trainable
    s_low: jax.Array  # batch + (r - k,), trainable, never projected
    v_low: jax.Array  # batch + (n, r - k), trainable


def osft_factorize(params: Any, rank: Any) -> Any:
    """Splits each matrix leaf into `OsftFactors` by its SVD (OSFT's factorized form).

    Leaves with two or more dims are viewed as batch + (m, n) (last two axes); the first ``k``
    singular triplets form the frozen high part, the remaining ``min(m, n) - k`` the trainable
    low part. Other leaves are returned unchanged. Train with ``loss(osft_materialize(f))`` and
    `osft_factored` in the chain; before the next task, call
    ``osft_factorize(osft_materialize(f), rank)`` again (and re-initialise the optimizer).

    Args:
        params: The parameters.
        rank: As in `osft_decompose` (int, fraction or tree; None leaves a leaf unfactorized).

    Returns:
        The factorized tree; factors are float32 for float32 params and keep the params' dtype
        otherwise (the SVD runs in float32).

    Example:
        >>> f = cljax.osft_factorize({"w": jnp.eye(3)}, rank=1)
        >>> f["w"].u_high.shape, f["w"].u_low.shape
        ((3, 1), (3, 2))
    """
    fn = "osft_factorize"
    _common.require_concrete(fn, params=params)
    per_leaf = _ranks_by_name(rank)

    def one(path, w):
        if w is None or jnp.ndim(w) < 2:
            return w
        name = _common.path_name(path)
        leaf_rank = rank if per_leaf is None else per_leaf.get(name)
        if leaf_rank is None:
            return w
        m, n = w.shape[-2:]
        r = min(m, n)
        k = _rank_for(fn, name, leaf_rank, r)
        flat = jnp.asarray(w).reshape((-1, m, n)).astype(jnp.float32)
        u, s, v = jax.vmap(lambda x: _top_singular(x, r))(flat)
        batch = tuple(w.shape[:-2])
        cast = lambda x, tail: x.reshape(batch + tail).astype(w.dtype)
        return OsftFactors(
            u_high=cast(u[:, :, :k], (m, k)),
            s_high=cast(s[:, :k], (k,)),
            v_high=cast(v[:, :, :k], (n, k)),
            u_low=cast(u[:, :, k:], (m, r - k)),
            s_low=cast(s[:, k:], (r - k,)),
            v_low=cast(v[:, :, k:], (n, r - k)),
        )

    return jax.tree_util.tree_map_with_path(one, params)


def osft_materialize(factored: Any) -> Any:
    """Rebuilds the weights from `OsftFactors` leaves (differentiable; other leaves unchanged).

    Example:
        >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0]])
        >>> cljax.osft_materialize(cljax.osft_factorize({"w": w}, rank=1))["w"]
        Array([[2., 0.],
               [0., 1.]], dtype=float32)
    """
    is_f = lambda x: isinstance(x, OsftFactors)

    def one(f):
        if not is_f(f):
            return f
        high = jnp.einsum("...mk,...k,...nk->...mn", f.u_high, f.s_high, f.v_high)
        low = jnp.einsum("...mk,...k,...nk->...mn", f.u_low, f.s_low, f.v_low)
        return high + low

    return jax.tree.map(one, factored, is_leaf=is_f)


def osft_factored() -> optax.GradientTransformationExtraArgs:
    """Projects factor gradients for OSFT's factorized form (place it before the optimizer).

    For every `OsftFactors` leaf: the high factors get zero updates,
    ``dU_l <- dU_l - U_h (U_h^T dU_l)``, ``dV_l <- dV_l - V_h (V_h^T dV_l)``, and ``ds_l`` passes
    unchanged; ``U_h, V_h`` are read from `params`. Other leaves pass through. Put it first in
    the chain, e.g. ``chain(osft_factored(), optax.adamw(lr))`` (the paper, which projects the
    factor gradients before AdamW). Mask the high factors out of weight decay, or wrap the chain
    in ``optax.masked``, since decay would move them.

    Returns:
        A stateless transform (`optax.EmptyState`); `update` needs `params`.

    Example:
        >>> params = cljax.osft_factorize({"w": jnp.eye(3)}, rank=1)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> out, _ = cljax.osft_factored().update(grads, optax.EmptyState(), params)
        >>> float(jnp.abs(params["w"].u_high.T @ out["w"].u_low).max()), float(out["w"].s_high.sum())
        (0.0, 0.0)

    References:
        Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
        Learning", 2025.
    """
    fn = "osft_factored"
    is_f = lambda x: isinstance(x, OsftFactors)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)

        def off(d, basis):
            d32 = d.astype(jnp.float32)
            b = basis.astype(jnp.float32)
            coef = jnp.einsum("...mk,...mr->...kr", b, d32, precision=_HIGHEST)
            return (d32 - jnp.einsum("...mk,...kr->...mr", b, coef, precision=_HIGHEST)).astype(
                d.dtype
            )

        def one(d, p):
            if not is_f(d):
                return d
            if not is_f(p):
                raise ValueError(f"{fn}: an OsftFactors update has no OsftFactors in `params`.")
            return OsftFactors(
                u_high=jnp.zeros_like(d.u_high),
                s_high=jnp.zeros_like(d.s_high),
                v_high=jnp.zeros_like(d.v_high),
                u_low=off(d.u_low, p.u_high),
                s_low=d.s_low,
                v_low=off(d.v_low, p.v_high),
            )

        return jax.tree.map(
            one, updates, params, is_leaf=lambda x: is_f(x) or _common.is_empty(x)
        ), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
