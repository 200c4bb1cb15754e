"""Projection off stored gradient directions: OGD (OR-06) and PCA-OGD (OR-07).

The state holds an orthonormal set of whole-parameter vectors (one ``(capacity,) + leaf.shape``
float32 block per leaf, rows beyond a valid count zero); every update loses its component along
them, with inner products over all leaves jointly. `ogd_add_task` appends a finished task's
output gradients (Gram–Schmidt, OGD) or their top principal directions (PCA-OGD) leaf by leaf,
writing rows in place (``donate=True`` reuses the caller's basis buffers). Memory is
``capacity * num_params`` floats: meant for small models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal._common import Where

__all__ = ["OgdState", "ogd", "ogd_add_task", "ogd_output_gradients"]

_HIGHEST = jax.lax.Precision.HIGHEST
# A vector whose residual after projection is at most this fraction of its norm is taken to lie
# in the span already (float32 Gram–Schmidt, two passes).
_GS_RTOL = 1e-4
# PCA directions with at most this fraction of the task's gradient energy are numerical noise.
_PCA_RTOL = 1e-10

Variant = Literal["gtl", "ave", "all"]


class OgdState(NamedTuple):
    """State of `ogd`."""

    count: chex.Array  # int32 number of valid basis vectors
    basis: optax.Params  # per leaf: (capacity,) + leaf.shape float32, rows >= count are zero
    inner: optax.OptState  # state of `inner` (EmptyState without one)


def ogd(
    capacity: int,
    *,
    inner: optax.GradientTransformation | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Projects updates off a stored orthonormal set of gradient directions (OGD, PCA-OGD).

    ``g~ = g - sum_k <g, v_k> v_k`` with inner products over all leaves jointly; the basis starts
    empty (identity) and grows at task boundaries with `ogd_add_task`. OGD is specified for plain
    SGD (``chain(ogd(c), optax.sgd(lr))``); with momentum or Adam pass the optimizer as `inner`
    (``where='update'``) so that the final update stays orthogonal.

    Args:
        capacity: Number of basis vectors kept (the whole memory is ``capacity`` copies of the
            parameters, in float32). Static.
        inner: An optimizer to run inside the projection.
        where: With `inner`: ``'update'`` (default) or ``'gradient'``. Static.

    Returns:
        A transform whose state is `OgdState`.

    Example:
        >>> params = {"w": jnp.zeros(3)}
        >>> tx = cljax.ogd(capacity=2)
        >>> state = cljax.ogd_add_task(tx.init(params), {"w": jnp.array([[1.0, 0.0, 0.0]])})
        >>> tx.update({"w": jnp.ones(3)}, state)[0]["w"]
        Array([0., 1., 1.], dtype=float32)

    References:
        Farajtabar, Azizan, Mott and Li, "Orthogonal Gradient Descent for Continual Learning",
        AISTATS 2020. https://arxiv.org/abs/1910.07104
    """
    fn = "ogd"
    _checks.check_int(fn, "capacity", capacity, 1)
    where = _common.resolve_where(fn, inner, where)

    def init_fn(params):
        basis = jax.tree.map(lambda p: jnp.zeros((capacity,) + tuple(p.shape), jnp.float32), params)
        return OgdState(
            count=jnp.zeros([], jnp.int32), basis=basis, inner=_common.init_inner(inner, params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        def project(tree, descent):
            del descent
            leaves, treedef = jax.tree.flatten(tree, is_leaf=_common.is_empty)
            bases = treedef.flatten_up_to(state.basis)
            coef = jnp.zeros((capacity,), jnp.float32)
            for u, b in zip(leaves, bases, strict=True):
                if not _common.is_empty(u):
                    coef = coef + jnp.matmul(
                        b.reshape(capacity, -1),
                        u.astype(jnp.float32).reshape(-1),
                        precision=_HIGHEST,
                    )
            coef = jnp.where(jnp.arange(capacity) < state.count, coef, 0.0)
            out = [
                u
                if _common.is_empty(u)
                else (
                    u.astype(jnp.float32) - jnp.tensordot(coef, b, axes=1, precision=_HIGHEST)
                ).astype(u.dtype)
                for u, b in zip(leaves, bases, strict=True)
            ]
            return jax.tree.unflatten(treedef, out)

        out, inner_state = _common.around_inner(
            project, inner, where, updates, state.inner, params, extra_args
        )
        return out, state._replace(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Task boundaries.


def _coefs(bases, rows):
    """``sum_l rows_l @ bases_l^T``: (m, capacity) inner products over all leaves jointly."""
    cap = bases[0].shape[0]
    out = 0.0
    for b, r in zip(bases, rows, strict=True):
        # ``b @ r^T``, not ``r @ b^T``: a transposed basis operand makes XLA copy the whole basis.
        out = out + _common.mm(b.reshape(cap, -1), r.reshape(r.shape[0], -1).T).T
    return out


def _minus(bases, rows, coef):
    """``rows_l - coef @ bases_l`` per leaf (each row loses its component along the basis)."""
    cap = bases[0].shape[0]
    return [
        r - _common.mm(coef, b.reshape(cap, -1)).reshape(r.shape)
        for b, r in zip(bases, rows, strict=True)
    ]


def _project_out_twice(bases, rows):
    rows = _minus(bases, rows, _coefs(bases, rows))
    return _minus(bases, rows, _coefs(bases, rows))


def _sq_norms(rows):
    """(m,) squared norms of the rows over all leaves jointly."""
    return sum(jnp.sum(r.reshape(r.shape[0], -1) ** 2, axis=1) for r in rows)


def _write_row(bases, idx, rows, write):
    """Row `idx` of every leaf's basis becomes `rows` (one ``leaf.shape`` array each) if `write`.

    An in-place `dynamic_update_slice`: with the basis donated no copy of it is made.
    """
    out = []
    for b, r in zip(bases, rows, strict=True):
        old = jax.lax.dynamic_index_in_dim(b, idx, keepdims=True)
        new = jnp.where(write, r.reshape(old.shape).astype(b.dtype), old)
        out.append(jax.lax.dynamic_update_index_in_dim(b, new, idx, 0))
    return tuple(out)


def _gram_schmidt(bases, count, vecs):
    """Appends each stacked vector of `vecs` (two-pass Gram–Schmidt); skips those in the span.

    `bases` and `vecs` are tuples of per-leaf arrays, ``(capacity,) + shape`` float32 and
    ``(n,) + shape``. Works leaf by leaf (no concatenated copy of the basis or of the vectors)
    and writes each new row in place, so the memory beyond the basis is a few model-sized vectors.
    """
    cap = bases[0].shape[0]

    def body(i, carry):
        b, c, needed = carry
        v = [jax.lax.dynamic_index_in_dim(x, i, keepdims=True).astype(jnp.float32) for x in vecs]
        r = _project_out_twice(b, v)
        nv, nr = jnp.sqrt(_sq_norms(v)[0]), jnp.sqrt(_sq_norms(r)[0])
        keep = (nr > _GS_RTOL * nv) & (nv > 0)
        scale = jnp.where(keep, nr, 1.0)
        write = keep & (c < cap)
        b = _write_row(b, jnp.minimum(c, cap - 1), [x / scale for x in r], write)
        return b, c + write.astype(jnp.int32), needed + keep.astype(jnp.int32)

    return jax.lax.fori_loop(0, vecs[0].shape[0], body, (tuple(bases), count, count))


def _principal(bases, count, vecs, k_rule):
    """Appends the top-`k_rule` principal directions of the residual of `vecs` (PCA-OGD).

    Leaf by leaf as `_gram_schmidt` (the same steps as `_common.orthonormal_extend` on the
    transposed layout): the basis is projected out of the ``n`` vectors twice; the left singular
    vectors of the residual (one ``(num_params, n)`` matrix, the size of the gradients given)
    that carry more than `_PCA_RTOL` of the vectors' energy and are not already in the span are
    re-projected, orthonormalised (QR) and written in place after row `count`.
    """
    cap = bases[0].shape[0]
    n = vecs[0].shape[0]
    sizes = [int(np.prod(b.shape[1:])) for b in bases]
    v = [x.astype(jnp.float32).reshape(n, -1) for x in vecs]
    resid = _project_out_twice(bases, v)
    u, s = _common.left_singular(jnp.concatenate(resid, axis=1).T)  # (num_params, r)
    del resid
    r = u.shape[1]
    energy = jnp.sum(_sq_norms(v))
    offsets = np.cumsum([0] + sizes)
    cands = [u[a:z].T for a, z in zip(offsets[:-1], offsets[1:], strict=True)]  # (r, size)
    cands = _project_out_twice(bases, cands)
    norms = jnp.sqrt(_sq_norms(cands))
    ok = (s * s > _PCA_RTOL * energy) & (norms > 0.5)  # noise, or a direction already stored
    k_ok = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    k = jnp.minimum(jnp.minimum(k_rule, k_ok), offsets[-1] - count).astype(jnp.int32)
    keep = (jnp.arange(r) < k).astype(jnp.float32)
    q, _ = jnp.linalg.qr(jnp.concatenate([c * keep[:, None] for c in cands], axis=1).T)
    q = (q * keep[None, :]).T  # (r, num_params), rows >= k zero
    rows = [q[:, a:z] for a, z in zip(offsets[:-1], offsets[1:], strict=True)]

    def body(t, b):
        j = count + t
        row = [jax.lax.dynamic_index_in_dim(x, t, keepdims=False) for x in rows]
        return _write_row(b, jnp.minimum(j, cap - 1), row, (t < k) & (j < cap))

    new = jax.lax.fori_loop(0, r, body, tuple(bases))
    needed = (count + k).astype(jnp.int32)
    return new, jnp.minimum(needed, cap).astype(jnp.int32), needed


_GRAM_SCHMIDT = jax.jit(_gram_schmidt)
_PRINCIPAL = jax.jit(_principal)
# The same work writing into the caller's basis buffers (``ogd_add_task(..., donate=True)``).
_GRAM_SCHMIDT_DONATED = jax.jit(_gram_schmidt, donate_argnums=(0,))
_PRINCIPAL_DONATED = jax.jit(_principal, donate_argnums=(0,))


def ogd_add_task(
    opt_state: Any,
    gradients: Any,
    *,
    num_components: int | None = None,
    index: int | None = None,
    donate: bool = False,
) -> Any:
    """Appends a finished task's output gradients to the `ogd` basis (OGD or PCA-OGD).

    OGD (``num_components=None``): each of the ``n`` vectors is Gram–Schmidt-orthogonalised
    (two passes, float32) against the basis and appended normalised; vectors already in the span
    (residual at most 1e-4 of their norm) are skipped. PCA-OGD (``num_components=k``): the
    basis is projected out of the ``n`` vectors first, then the top-``k`` left singular vectors of
    the residual are appended (fewer when its numerical rank is below ``k``); ``k = n`` spans the
    same space as OGD. Runs eagerly; its work is jitted once per shape.

    Memory: the work runs leaf by leaf and writes the new rows in place, so beyond `opt_state`
    and `gradients` it needs a few model-sized vectors (OGD) or a few copies of `gradients`
    (PCA-OGD), plus one new copy of the basis unless `donate`.

    Args:
        opt_state: The whole optimizer state holding one `OgdState`.
        gradients: A tree with the params' structure whose leaves stack ``n`` gradients,
            ``(n,) + leaf.shape`` (e.g. from `ogd_output_gradients`); leaves the transform does
            not see (masked, partitioned) are ignored.
        num_components: ``k`` for PCA-OGD; None for OGD. Static.
        index: Which `OgdState` when the optimizer holds several.
        donate: Write the new rows into the basis buffers of `opt_state` instead of a copy (the
            basis arrays of the `opt_state` passed in are deleted; use only the returned state).
            Skipped, so that a capacity error leaves `opt_state` intact, when the ``n`` vectors
            might not fit in the free rows.

    Returns:
        `opt_state` with the vectors appended.

    Raises:
        ValueError: no or several `OgdState`s; shapes that do not match; more vectors than the
            capacity (nothing is truncated).
        TypeError: called under `jax.jit`.

    Example:
        >>> tx = cljax.ogd(capacity=3)
        >>> grads = {"w": jnp.array([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])}
        >>> int(cljax.ogd_add_task(tx.init({"w": jnp.zeros(2)}), grads).count)  # e_0, e_1
        2

    References:
        Farajtabar et al., "Orthogonal Gradient Descent for Continual Learning", AISTATS 2020.
        Doan et al., "A Theoretical Analysis of Catastrophic Forgetting through the NTK Overlap
        Matrix", AISTATS 2021.
    """
    fn = "ogd_add_task"
    _common.require_concrete(fn, gradients=gradients)
    if num_components is not None:
        _checks.check_int(fn, "num_components", num_components, 1)
    state = _tree.find_state(opt_state, OgdState, index=index)
    leaves, treedef = jax.tree.flatten(state.basis, is_leaf=_common.is_empty)
    paths = [
        p for p, _ in jax.tree_util.tree_flatten_with_path(state.basis, is_leaf=_common.is_empty)[0]
    ]
    given = {
        _common.path_name(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(gradients, is_leaf=lambda x: x is None)[0]
        if x is not None
    }
    names = [_common.path_name(p) for p in paths]
    for name in given:
        if name not in names:
            raise ValueError(
                f"{fn}: `gradients` has leaf '{name}', which the parameters do not have."
            )
    active = [i for i, b in enumerate(leaves) if not _common.is_empty(b)]
    if not active:
        return opt_state
    cap = leaves[active[0]].shape[0]
    n = None
    vecs = []
    for i in active:
        name, b = names[i], leaves[i]
        if name not in given:
            raise ValueError(
                f"{fn}: leaf '{name}' has no entry in `gradients`; give every trained leaf."
            )
        g = jnp.asarray(given[name])
        if (
            g.ndim != b.ndim
            or tuple(g.shape[1:]) != tuple(b.shape[1:])
            or (n is not None and g.shape[0] != n)
        ):
            want = ("n",) + tuple(b.shape[1:]) if n is None else (n,) + tuple(b.shape[1:])
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {tuple(g.shape)} in `gradients`; it must be {want} "
                "(the same number of stacked gradients n for every leaf, then the leaf's shape)."
            )
        n = g.shape[0]
        vecs.append(g)
    bases = tuple(leaves[i] for i in active)
    adds = n if num_components is None else min(n, num_components)
    donate = (
        bool(donate)
        and int(_common.host_int(state.count)) + adds <= cap  # cannot raise the capacity error
        and len({id(b) for b in bases}) == len(bases)
    )
    if num_components is None:
        work = _GRAM_SCHMIDT_DONATED if donate else _GRAM_SCHMIDT
        new, count, needed = work(bases, state.count, tuple(vecs))
    else:
        work = _PRINCIPAL_DONATED if donate else _PRINCIPAL
        new, count, needed = work(
            bases, state.count, tuple(vecs), jnp.asarray(num_components, jnp.int32)
        )
    needed = int(_common.host_int(needed))
    if needed > cap:
        raise ValueError(
            f"{fn}: the basis needs {needed} vectors, but the capacity is {cap}. Build `ogd` with a "
            "larger `capacity`, store fewer gradients per task, or use PCA-OGD (`num_components`)."
        )
    out = list(leaves)
    for i, b in zip(active, new, strict=True):
        out[i] = b
    new_state = state._replace(count=count, basis=jax.tree.unflatten(treedef, out))
    del state, leaves, bases, new
    return _tree.replace_state(opt_state, new_state, index=index)


def ogd_output_gradients(
    logit_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    inputs: Any,
    labels: jax.Array | None = None,
    *,
    variant: Variant = "gtl",
) -> Any:
    """Per-sample gradients of the model's logits, the vectors OGD stores.

    Args:
        logit_fn: ``logit_fn(params, x) -> (num_classes,)`` logits for one example.
        params: The parameters at the end of the task.
        inputs: ``n`` examples, stacked along the leading axis (an array or a tree).
        labels: ``(n,)`` int labels, for ``variant='gtl'``.
        variant: ``'gtl'`` (gradient of the ground-truth logit, the paper's recommendation),
            ``'ave'`` (of the mean logit) or ``'all'`` (of every logit: ``n * num_classes``
            vectors). Static.

    Returns:
        A tree with the params' structure whose leaves are ``(n,) + leaf.shape`` (``'all'``:
        ``(n * num_classes,) + leaf.shape``), ready for `ogd_add_task`.

    Example:
        >>> logit_fn = lambda p, x: x @ p["w"]
        >>> grads = cljax.ogd_output_gradients(logit_fn, {"w": jnp.ones((2, 3))}, jnp.eye(2), jnp.array([0, 2]))
        >>> grads["w"][1]
        Array([[0., 0., 0.],
               [0., 0., 1.]], dtype=float32)
    """
    fn = "ogd_output_gradients"
    _checks.check_choice(fn, "variant", variant, ("gtl", "ave", "all"))
    if not callable(logit_fn):
        raise TypeError(f"{fn}(logit_fn=...) must be callable, got {type(logit_fn).__name__}.")
    if variant == "gtl":
        if labels is None:
            raise ValueError(
                f"{fn}(variant='gtl') needs `labels`, the ground-truth class of each input."
            )
        one = lambda p, x, y: logit_fn(p, x)[y]
        return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, inputs, jnp.asarray(labels))
    if variant == "ave":
        return jax.vmap(jax.grad(lambda p, x: jnp.mean(logit_fn(p, x))), in_axes=(None, 0))(
            params, inputs
        )
    jac = jax.vmap(jax.jacrev(logit_fn), in_axes=(None, 0))(params, inputs)
    return jax.tree.map(lambda j: j.reshape((-1,) + j.shape[2:]), jac)
