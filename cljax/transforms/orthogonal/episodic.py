"""Episodic-memory constraint projections: GEM (OR-03) and A-GEM (OR-04).

Both compare the incoming vector with gradients of the loss on an episodic memory of past tasks,
passed in every step as keyword-only extra arguments, and use inner products over the *whole*
parameter vector (all leaves jointly). A-GEM has a closed form; GEM solves a small box-constrained
dual QP inside `jit` with an exact active-set method.

Sign: without `inner` the transform treats what it receives as gradient-aligned (a gradient, or a
direction before `optax.scale_by_learning_rate`) and enforces ``<g~, g_k> >= 0``. With
``inner`` and ``where='update'`` it receives the final update ``u = -lr * d`` and enforces
``<u~, g_k> <= 0`` (the update does not increase any memory loss to first order).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal._common import Where

__all__ = ["agem", "gem"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _leaves(tree):
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_common.is_empty)
    return [None if _common.is_empty(x) else x for x in leaves], leaves, treedef


def _rebuild(treedef, originals, new):
    return jax.tree.unflatten(
        treedef, [o if n is None else n for o, n in zip(originals, new, strict=True)]
    )


# ---------------------------------------------------------------------------------------------
# OR-04 A-GEM.


def agem(
    *, inner: optax.GradientTransformation | None = None, where: Where | None = None
) -> optax.GradientTransformationExtraArgs:
    """Projects the update off a memory gradient when they conflict (A-GEM).

    With the incoming gradient-aligned vector ``g`` and the memory gradient ``g_ref`` (the loss
    gradient on a batch drawn from the union of past tasks' memories), inner products taken over
    all leaves jointly: if ``<g, g_ref> < 0``, ``g~ = g - <g, g_ref> / <g_ref, g_ref> * g_ref``;
    otherwise ``g~ = g`` bitwise. There is no margin. ``g_ref = 0`` leaves ``g`` unchanged.

    Place it before `optax.scale_by_learning_rate` (the paper: ``chain(agem(),
    optax.sgd(lr))`` or ``agem(inner=optax.sgd(lr), where='gradient')``), or give a full optimizer
    as `inner` with ``where='update'`` to constrain its final update for any inner optimizer.

    Args:
        inner: An optimizer run inside the projection.
        where: With `inner`: ``'update'`` (default) or ``'gradient'``; see the module notes on
            sign. Static.

    Returns:
        A transform whose state is `inner`'s state (`optax.EmptyState` without one). Its `update`
        needs the keyword-only extra argument ``memory_grads``: a tree with the params'
        structure (leaves matched by path; masked or None leaves are skipped).

    Example:
        >>> tx = cljax.agem()
        >>> g = {"w": jnp.array([1.0, -1.0])}
        >>> out, _ = tx.update(g, tx.init(g), memory_grads={"w": jnp.array([0.0, 1.0])})
        >>> out["w"]
        Array([1., 0.], dtype=float32)

    References:
        Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019.
        https://arxiv.org/abs/1812.00420
    """
    fn = "agem"
    where = _common.resolve_where(fn, inner, where)

    def init_fn(params):
        return _common.init_inner(inner, params)

    def update_fn(updates, state, params=None, *, memory_grads, **extra_args):
        def project(tree, descent):
            ref = _common.aligned_leaves(fn, "memory_grads", tree, memory_grads)
            plain, originals, treedef = _leaves(tree)
            dot = _common.tree_dot(plain, ref)
            ref_sq = _common.tree_dot(ref, ref)
            conflict = (dot > 0) if descent else (dot < 0)
            conflict = conflict & (ref_sq > 0)
            coef = jnp.where(conflict, dot / jnp.where(ref_sq > 0, ref_sq, 1.0), 0.0)
            new = [
                None
                if u is None
                else jnp.where(
                    conflict,
                    (u.astype(jnp.float32) - coef * r.astype(jnp.float32)).astype(u.dtype),
                    u,
                )
                for u, r in zip(plain, ref, strict=True)
            ]
            return _rebuild(treedef, originals, new)

        return _common.around_inner(project, inner, where, updates, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# OR-03 GEM.


def _pinv_solve(a, b):
    """Solves a symmetric PSD system by eigendecomposition (least-norm for singular ones)."""
    w, v = jnp.linalg.eigh(a)
    cutoff = 1e-6 * jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
    inv = jnp.where(w > cutoff, 1.0 / jnp.where(w > cutoff, w, 1.0), 0.0)
    return _common.mm(v, inv * _common.mm(v.T, b))


def box_qp(p, q, lower, valid, max_iter: int):
    """Solves ``min_v 1/2 v^T p v + q^T v`` s.t. ``v >= lower`` on `valid` slots, ``v = 0`` elsewhere.

    Exact active-set method (Lawson–Hanson on the shifted variable ``w = v - lower >= 0``),
    jit-able with fixed shapes; at most `max_iter` steps. Returns ``(v, converged)``.
    """
    t = p.shape[0]
    valid_f = valid.astype(jnp.float32)
    scale = jnp.max(jnp.where(valid, jnp.diag(p), 0.0))
    scale = jnp.where(scale > 0, scale, 1.0)
    p = p / scale
    q = q / scale
    lower_v = lower * valid_f
    c = (_common.mm(p, lower_v) + q) * valid_f
    both = valid_f[:, None] * valid_f[None, :]
    p = p * both + jnp.diag(1.0 - valid_f)  # invalid slots are decoupled and pinned at zero
    mm = _common.mm
    tol = 1e-6 * (1.0 + jnp.max(jnp.abs(c)))

    def solve_on(passive):
        pf = passive.astype(jnp.float32)
        a = p * (pf[:, None] * pf[None, :]) + jnp.diag(1.0 - pf)
        return _pinv_solve(a, -c * pf) * pf

    def body(carry):
        w, passive, _, it = carry
        z = solve_on(passive)
        feasible = jnp.all(jnp.where(passive, z > 0, True))
        # feasible: accept z and add the most violated free index, if any
        grad = mm(p, z) + c
        cand = (~passive) & valid & (grad < -tol)
        j = jnp.argmin(jnp.where(cand, grad, jnp.inf))
        add = jnp.any(cand)
        passive_f = passive | (add & (jnp.arange(t) == j))
        # infeasible: step from w towards z until a passive variable hits zero; drop it
        blocking = passive & (z <= 0)
        ratios = jnp.where(blocking, w / jnp.where(blocking, w - z, 1.0), jnp.inf)
        alpha = jnp.clip(jnp.min(ratios), 0.0, 1.0)
        w_i = w + alpha * (z - w)
        passive_i = passive & (w_i > 1e-12) & ~(blocking & (ratios <= alpha))
        w_i = jnp.where(passive_i, w_i, 0.0)
        done = feasible & ~add
        return (
            jnp.where(feasible, z, w_i),
            jnp.where(feasible, passive_f, passive_i),
            done,
            it + 1,
        )

    def cond(carry):
        _, _, done, it = carry
        return (~done) & (it < max_iter)

    init = (
        jnp.zeros(t, jnp.float32),
        jnp.zeros(t, bool),
        jnp.zeros([], bool),
        jnp.zeros([], jnp.int32),
    )
    w, _, done, _ = jax.lax.while_loop(cond, body, init)
    return (lower_v + w) * valid_f, done


def _gem_dual_impl(flat_r, flat_g, count, margin, ridge, iters):
    """The dual variables ``v`` (zeros when nothing is violated) and the violation flag."""
    slots = flat_r[0].shape[0]
    valid = jnp.arange(slots) < count
    gg = sum(jnp.matmul(r, g, precision=_HIGHEST) for r, g in zip(flat_r, flat_g, strict=True))
    violated = jnp.any(valid & (gg < 0))

    def solve(_):
        pp = sum(jnp.matmul(r, r.T, precision=_HIGHEST) for r in flat_r)
        pp = pp + jnp.asarray(ridge, jnp.float32) * jnp.eye(slots, dtype=jnp.float32)
        v, _ = box_qp(pp, gg, jnp.asarray(margin, jnp.float32), valid, iters)
        return v

    v = jax.lax.cond(violated, solve, lambda _: jnp.zeros(slots, jnp.float32), None)
    return v, violated


# One compiled program per shape, shared by eager calls (jit inlines it when traced).
_gem_dual = jax.jit(_gem_dual_impl, static_argnums=(5,))


def gem(
    margin: chex.Numeric = 0.5,
    ridge: chex.Numeric = 1e-3,
    *,
    qp_iters: int | None = None,
    inner: optax.GradientTransformation | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Projects the update so that no past task's memory loss increases (GEM).

    With the incoming gradient-aligned vector ``g`` and one memory gradient ``g_k`` per past task
    (rows of ``G``; inner products over all leaves jointly): if ``<g, g_k> >= 0`` for every valid
    ``k``, ``g~ = g`` bitwise. Otherwise the dual QP

        ``min_v 1/2 v^T (G G^T + ridge I) v + (G g)^T v``  subject to  ``v >= margin``

    is solved exactly (active set, inside `jit`) and ``g~ = G^T v + g``. The margin is a lower
    bound on the dual variables, as in the reference code, not a primal margin; with
    ``ridge = 0`` the result satisfies ``<g~, g_k> >= 0`` for all valid ``k``.

    Place it before `optax.scale_by_learning_rate` (the paper uses SGD), or give a full optimizer
    as `inner` with ``where='update'`` (the QP is then solved for ``-u``, so `margin` is in the
    update's units: scale it by the learning rate for the paper's semantics).

    Args:
        margin: Lower bound ``gamma`` on the dual variables (``memory_strength``).
        ridge: ``epsilon`` added to the diagonal of ``G G^T``.
        qp_iters: Maximum active-set steps (default ``4 * T + 8`` for ``T`` task slots). Static.
        inner: An optimizer run inside the projection.
        where: With `inner`: ``'update'`` (default) or ``'gradient'``. Static.

    Returns:
        A transform whose state is `inner`'s state (`optax.EmptyState` without one). Its `update`
        needs the keyword-only extra argument ``task_grads``: a tree with the params' structure
        whose leaves have a leading task axis ``T`` (a fixed capacity: ``(T,) + leaf.shape``),
        and takes ``num_tasks`` (an int or int32 scalar; default ``T``): only the first
        ``num_tasks`` slots are constraints, so the memory can fill up without recompiling.

    Example:
        >>> tx = cljax.gem(margin=0.0, ridge=0.0)
        >>> g = {"w": jnp.array([1.0, -1.0])}
        >>> memory = {"w": jnp.array([[0.0, 1.0], [0.0, 0.0]])}
        >>> out, _ = tx.update(g, tx.init(g), task_grads=memory, num_tasks=1)
        >>> out["w"]
        Array([1., 0.], dtype=float32)

    References:
        Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
        https://arxiv.org/abs/1706.08840
    """
    fn = "gem"
    _checks.check_in_range(fn, "margin", margin, 0.0)
    _checks.check_in_range(fn, "ridge", ridge, 0.0)
    if qp_iters is not None:
        _checks.check_int(fn, "qp_iters", qp_iters, 1)
    where = _common.resolve_where(fn, inner, where)

    def init_fn(params):
        return _common.init_inner(inner, params)

    def update_fn(updates, state, params=None, *, task_grads, num_tasks=None, **extra_args):
        firsts = [x for x in jax.tree.leaves(task_grads) if x is not None]
        if not firsts or jnp.ndim(firsts[0]) < 1:
            raise ValueError(
                f"{fn}: `task_grads` must hold arrays with a leading task axis, (T,) + leaf.shape."
            )
        slots = int(jnp.shape(firsts[0])[0])
        if num_tasks is None:
            count = jnp.asarray(slots, jnp.int32)
        else:
            if not isinstance(num_tasks, jax.core.Tracer):
                value = int(num_tasks)
                if not 0 <= value <= slots:
                    raise ValueError(
                        f"{fn}: `num_tasks` must be in [0, {slots}] (the task axis of `task_grads`), got {value}."
                    )
            count = jnp.asarray(num_tasks, jnp.int32)
        iters = qp_iters if qp_iters is not None else 4 * slots + 8

        def project(tree, descent):
            refs = _common.aligned_leaves(fn, "task_grads", tree, task_grads, lead=(slots,))
            plain, originals, treedef = _leaves(tree)
            sign = -1.0 if descent else 1.0
            pairs = [(u, r) for u, r in zip(plain, refs, strict=True) if u is not None]
            if not pairs:
                return tree
            flat_g = [sign * u.astype(jnp.float32).reshape(-1) for u, _ in pairs]
            flat_r = [jnp.asarray(r, jnp.float32).reshape(slots, -1) for _, r in pairs]
            v, violated = _gem_dual(flat_r, flat_g, count, margin, ridge, iters)
            new = []
            for u, r in zip(plain, refs, strict=True):
                if u is None:
                    new.append(None)
                    continue
                shift = jnp.tensordot(v, r.astype(jnp.float32), axes=1, precision=_HIGHEST)
                projected = (u.astype(jnp.float32) + sign * shift).astype(u.dtype)
                new.append(jnp.where(violated, projected, u))
            return _rebuild(treedef, originals, new)

        return _common.around_inner(project, inner, where, updates, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
