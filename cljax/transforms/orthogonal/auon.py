"""AuON: linear-time, spectrally bounded momentum directions (OR-11).

A Muon alternative without Newton–Schulz iterations: per matrix, the (Nesterov) momentum is
normalised by its Frobenius norm and then divided by the root-mean-square of its element-wise
hyperbolic cosine, which bounds the spectral norm of the direction by 1 in ``O(mn)`` time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal.input_subspace import SpecArg, _check_spec, _leaf_spec

__all__ = ["ScaleByAuonState", "scale_by_auon"]

_NORM_EPS = 1e-7
_RMS_EPS = 1e-8


class ScaleByAuonState(NamedTuple):
    """State of `scale_by_auon`."""

    mu: optax.Params  # momentum of the matrix leaves (None elsewhere)
    fallback: optax.OptState  # state of the fallback transform on the other leaves


def _auon_direction(m, fan_in: int, fan_out: int):
    """``sqrt(max(1, fan_out / fan_in)) * G / (rms(cosh(G)) + eps)``, ``G = m / (|m|_F + eps)``."""
    m = m.astype(jnp.float32)  # (B, rows, cols)
    norm = jnp.sqrt(jnp.sum(m * m, axis=(1, 2), keepdims=True))
    g = m / (norm + _NORM_EPS)
    rms = jnp.sqrt(jnp.mean(jnp.cosh(g) ** 2, axis=(1, 2), keepdims=True))
    scale = max(1.0, fan_out / fan_in) ** 0.5
    return scale * g / (rms + _RMS_EPS)


def scale_by_auon(
    beta: chex.Numeric = 0.95,
    nesterov: bool = True,
    *,
    spec: SpecArg = _tree.MatrixSpec(),
    fallback: optax.GradientTransformation | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescales each matrix's momentum to a spectrally bounded direction in linear time (AuON).

    Per matrix (rows = the input dimension ``fan_in``, as in `gpm`): momentum
    ``m <- beta m + (1 - beta) g`` (Nesterov: ``d = beta m + (1 - beta) g``, else ``d = m``),
    ``G = d / (||d||_F + 1e-7)``, ``U = G / (sqrt(mean(cosh(G)^2)) + 1e-8)`` and the emitted direction
    is ``sqrt(max(1, fan_out / fan_in)) * U``. Since ``||G||_2 <= ||G||_F <= 1`` and the RMS of
    ``cosh`` is at least 1, ``||U||_2 <= 1``. Leaves without a matrix view (biases, norms, scalars)
    go to `fallback` (default `optax.scale_by_adam()`). Place it before
    `optax.scale_by_learning_rate`. Stacked leaves: one normalisation per matrix.

    Notes:
        The momentum is an EMA (optax's convention); Muon-style sums differ only by a scale,
        which the normalisation removes. The hybrid variant (one Newton–Schulz step first) is not
        implemented.

    Args:
        beta: Momentum decay.
        nesterov: Use the Nesterov direction. Static.
        spec: Which axes form each matrix (rows = inputs), or a function ``(path, shape) ->
            MatrixSpec | None``. Static.
        fallback: Transform for the non-matrix leaves (default `optax.scale_by_adam()`).
        mu_dtype: Dtype of the momentum (default: the parameter's).

    Returns:
        A transform whose state is `ScaleByAuonState`.

    Example:
        >>> tx = cljax.scale_by_auon()
        >>> d, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init({"w": jnp.zeros((2, 2))}))
        >>> float(jnp.linalg.norm(d["w"], 2)) <= 1.0
        True

    References:
        Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", 2025.
        https://arxiv.org/abs/2509.24320
    """
    fn = "scale_by_auon"
    _checks.check_in_range(fn, "beta", beta, 0.0, 1.0, high_inclusive=False)
    _check_spec(fn, spec)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{fn}(nesterov=...) must be a bool, got {nesterov!r}.")
    fallback = optax.scale_by_adam() if fallback is None else fallback
    _checks.check_transform(fn, "fallback", fallback)
    mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None

    def non_matrix(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, p: _leaf_spec(fn, spec, _common.path_name(path), tuple(p.shape)) is None,
            params,
        )

    masked_fallback = optax.masked(fallback, non_matrix)

    def init_fn(params):
        def mu(path, p):
            if _leaf_spec(fn, spec, _common.path_name(path), tuple(p.shape)) is None:
                return None
            return jnp.zeros(p.shape, mu_dtype or p.dtype)

        return ScaleByAuonState(
            mu=jax.tree_util.tree_map_with_path(mu, params), fallback=masked_fallback.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        out, fb_state = optax.with_extra_args_support(masked_fallback).update(
            updates, state.fallback, params, **extra_args
        )

        def leaf(path, g, o, m):
            if _common.is_empty(g) or m is None:
                return o, m
            name = _common.path_name(path)
            s = _leaf_spec(fn, spec, name, tuple(g.shape))
            g32 = g.astype(jnp.float32)
            new_m = beta * m.astype(jnp.float32) + (1.0 - beta) * g32
            d = beta * new_m + (1.0 - beta) * g32 if nesterov else new_m
            _, fan_in, fan_out = _tree.matrix_shape(g.shape, s, name)
            mats = _auon_direction(_tree.as_matrices(d, s, name), fan_in, fan_out)
            return _tree.from_matrices(mats, s, g.shape, name).astype(g.dtype), new_m.astype(
                m.dtype
            )

        pairs = jax.tree_util.tree_map_with_path(
            leaf, updates, out, state.mu, is_leaf=_common.is_empty
        )
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not hasattr(x, "_fields")
        directions = jax.tree.map(lambda x: x[0], pairs, is_leaf=is_pair)
        mu = jax.tree.map(lambda x: x[1], pairs, is_leaf=is_pair)
        return directions, ScaleByAuonState(mu=mu, fallback=fb_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
