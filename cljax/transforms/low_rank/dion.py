"""Dion (LR-13): orthonormalized updates from a low-rank power iteration with error feedback."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.low_rank.projection import _resolve_specs
from cljax.tree import MatrixSpec, as_matrices, from_matrices, matrix_shape

__all__ = ["ScaleByDionState", "scale_by_dion"]

_MASKED = optax.MaskedNode()


class ScaleByDionState(NamedTuple):
    """State of `scale_by_dion`; `momentum` and `q` mirror the parameters (matrix leaves only)."""

    count: chex.Array  # int32 steps taken
    momentum: optax.Params  # float32 momentum buffer M, the leaf's shape
    q: optax.Params  # float32 (*batch, n, r) right factor, warm start of the power iteration
    fallback: optax.OptState  # the fallback transform's state on the other leaves


def _power_step(b: jax.Array, q: jax.Array, eps: float):
    """One Dion power-iteration step on ``B`` (``m x n``) from ``Q`` (``n x r``).

    Returns ``(P, R, Q_unit, Q_next)``: ``P = orth(B Q)``, ``R = Bᵀ P``, ``Q_unit`` the columns
    of ``R`` normalised (zero where a column vanishes), used in the direction, and ``Q_next`` the
    warm start kept for the next step (a vanished column keeps its previous value, so a zero
    gradient cannot erase ``Q``).
    """
    p, _ = jnp.linalg.qr(b @ q)
    r = b.T @ p
    norms = jnp.sqrt(jnp.sum(r * r, axis=0, keepdims=True))
    unit = jnp.where(norms > eps, r / jnp.maximum(norms, eps), 0.0)
    return p, r, unit, jnp.where(norms > eps, unit, q)


def scale_by_dion(
    rank: int = 128,
    mu: chex.Numeric = 0.95,
    *,
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    fallback: optax.GradientTransformation | None = None,
    seed: int = 0,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Dion: a rank-`rank` orthonormalized direction from a warm-started power iteration.

    Per matrix view with momentum ``M`` (``m x n``) and right factor ``Q`` (``n x r``,
    ``r = min(rank, m, n)``): ``B = M + G``; ``P = orth(B Q)`` (QR); ``R = Bᵀ P``; error feedback
    ``M ← B − (1 − mu) P Rᵀ``; ``Q ← R`` with unit columns; direction
    ``sqrt(max(1, m / n)) · P Qᵀ``. Stacked leaves are batches of matrices; other leaves go to
    `fallback`. Place it before `optax.scale_by_learning_rate`.

    Args:
        rank: Rank of the power iteration. Static.
        mu: Momentum ``mu`` (error-feedback coefficient ``1 − mu``).
        matrix_spec: As in `cljax.scale_by_low_rank_projection`. Static.
        fallback: Transform for non-matrix leaves (default `optax.scale_by_adam()`).
        seed: Seed of the random orthonormal initial ``Q``. Static.
        eps: Floor of the column norms of ``R``. Static.

    Returns:
        A transform whose state is `ScaleByDionState`.

    Notes:
        The shape factor uses the matrix view as given (``m`` rows, ``n`` columns); the reference
        applies it to PyTorch ``(d_out, d_in)`` weights. Momentum and ``Q`` are float32.

    Example:
        >>> tx = cljax.scale_by_dion(rank=2)
        >>> state = tx.init({"w": jnp.zeros((8, 4))})
        >>> state.q["w"].shape
        (4, 2)

    References:
        Ahn et al., "Dion: Distributed Orthonormalized Updates", 2025.
        https://arxiv.org/abs/2504.05295
    """
    fn = "scale_by_dion"
    _checks.check_int(fn, "rank", rank, 1)
    _checks.check_in_range(fn, "mu", mu, 0.0, 1.0)
    _checks.check_int(fn, "seed", seed, 0)
    _checks.check_in_range(fn, "eps", eps, 0.0, math.inf, low_inclusive=False)
    if fallback is not None:
        _checks.check_transform(fn, "fallback", fallback)
    if not isinstance(matrix_spec, MatrixSpec) and not callable(matrix_spec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec or a function params -> tree, got {type(matrix_spec).__name__}."
        )
    fallback = optax.with_extra_args_support(
        optax.scale_by_adam() if fallback is None else fallback
    )

    def views(tree):
        leaves, specs, treedef = _resolve_specs(fn, tree, matrix_spec)
        out = []
        for (path, leaf), spec in zip(leaves, specs, strict=True):
            if spec is None:
                out.append(None)
                continue
            name = _checks.leaf_name(path)
            batch_axes, _, _ = spec.axes(jnp.ndim(leaf), name)
            batch, m, n = matrix_shape(jnp.shape(leaf), spec, name)
            batch_shape = tuple(jnp.shape(leaf)[a] for a in batch_axes)
            out.append((spec, name, batch, batch_shape, m, n, min(rank, m, n)))
        return leaves, out, treedef

    def init_fn(params):
        leaves, plan, treedef = views(params)
        momenta, qs, fallback_leaves = [], [], []
        key = jax.random.key(seed)
        for i, ((_, leaf), view) in enumerate(zip(leaves, plan, strict=True)):
            if view is None:
                momenta.append(_MASKED)
                qs.append(_MASKED)
                fallback_leaves.append(leaf)
                continue
            _, _, batch, batch_shape, _, n, r = view
            noise = jax.random.normal(jax.random.fold_in(key, i), (batch, n, r), jnp.float32)
            q = jax.vmap(lambda x: jnp.linalg.qr(x)[0])(noise).reshape(*batch_shape, n, r)
            momenta.append(jnp.zeros(jnp.shape(leaf), jnp.float32))
            qs.append(q)
            fallback_leaves.append(_MASKED)
        return ScaleByDionState(
            count=jnp.zeros([], jnp.int32),
            momentum=treedef.unflatten(momenta),
            q=treedef.unflatten(qs),
            fallback=fallback.init(treedef.unflatten(fallback_leaves)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        leaves, plan, treedef = views(updates)
        momenta = treedef.flatten_up_to(state.momentum)
        qs = treedef.flatten_up_to(state.q)
        param_leaves = None if params is None else treedef.flatten_up_to(params)
        fb_grads = [
            leaf if view is None else _MASKED for (_, leaf), view in zip(leaves, plan, strict=True)
        ]
        fb_params = None
        if param_leaves is not None:
            fb_params = treedef.unflatten(
                [p if view is None else _MASKED for p, view in zip(param_leaves, plan, strict=True)]
            )
        fb_out, fb_state = fallback.update(
            treedef.unflatten(fb_grads), state.fallback, fb_params, **extra_args
        )
        fb_iter = iter(jax.tree.leaves(fb_out))
        outs, new_m, new_q = [], [], []
        mu32 = jnp.asarray(mu, jnp.float32)
        for (_, g), view, m_buf, q in zip(leaves, plan, momenta, qs, strict=True):
            if view is None:
                outs.append(next(fb_iter))
                new_m.append(m_buf)
                new_q.append(q)
                continue
            spec, name, batch, batch_shape, m, n, r = view
            b = as_matrices(m_buf + g.astype(jnp.float32), spec, name)
            p, rr, q_unit, q_new = jax.vmap(lambda bi, qi: _power_step(bi, qi, eps))(
                b, q.reshape(batch, n, r)
            )
            feedback = b - (1.0 - mu32) * jnp.einsum("bmr,bnr->bmn", p, rr)
            direction = math.sqrt(max(1.0, m / n)) * jnp.einsum("bmr,bnr->bmn", p, q_unit)
            outs.append(from_matrices(direction, spec, g.shape, name).astype(g.dtype))
            new_m.append(from_matrices(feedback, spec, g.shape, name))
            new_q.append(q_new.reshape(*batch_shape, n, r))
        return treedef.unflatten(outs), ScaleByDionState(
            count=optax.safe_increment(state.count),
            momentum=treedef.unflatten(new_m),
            q=treedef.unflatten(new_q),
            fallback=fb_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
