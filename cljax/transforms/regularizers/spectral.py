"""Regularisers that keep properties of the initialisation (RG-05), as coupled gradient transforms.

* `add_spectral_penalty` — pulls each weight matrix's top singular value toward 1:
  ``R = λ Σ_l (σ_max(W_l)^k − 1)²``, ``σ_max`` from one power-iteration step per update on a
  persistent vector held in the state.
* `add_wasserstein_penalty` — pulls each leaf's *distribution* toward its initial one:
  ``R = λ Σ_l mean((sort(vec θ_l) − sort(vec θ⁰_l))²)``.

Both add ``∇R`` to the updates; place them first in the chain (coupled, a loss term).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.regularizers import _common

__all__ = [
    "AddSpectralPenaltyState",
    "AddWassersteinPenaltyState",
    "add_spectral_penalty",
    "add_wasserstein_penalty",
]

_f32 = jnp.float32


class AddSpectralPenaltyState(NamedTuple):
    """State of `add_spectral_penalty`."""

    vectors: (
        optax.Params
    )  # per matrix leaf (batch, n) float32 right singular vector estimates; None elsewhere
    sigma: optax.Params  # per matrix leaf (batch,) float32 latest σ_max estimates; None elsewhere


def _power_step(w, v):
    """One power-iteration step on ``(m, n)`` `w` from unit `v`: returns ``(u, v_new, σ)``."""
    wv = w @ v
    norm_wv = jnp.linalg.norm(wv)
    u = wv / jnp.maximum(norm_wv, jnp.finfo(_f32).tiny)
    wtu = w.T @ u
    sigma = jnp.linalg.norm(wtu)
    v_new = jnp.where(sigma > 0, wtu / jnp.maximum(sigma, jnp.finfo(_f32).tiny), v)
    return u, v_new, sigma


def add_spectral_penalty(
    strength: chex.Numeric,
    *,
    power: int = 2,
    spec: _tree.MatrixSpec = _tree.MatrixSpec(),
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of ``strength · Σ (σ_max(W)^power − 1)²`` over the weight matrices.

    Each leaf with two or more dims is viewed as a batch of ``(m, n)`` matrices (`spec`; stacked
    layers are batch axes). Per matrix, one power-iteration step from the stored unit vector
    ``v``: ``u = W v / ‖W v‖``, ``v ← Wᵀu / ‖Wᵀu‖``, ``σ = ‖Wᵀu‖``; the gradient
    ``2 λ (σ^k − 1) k σ^{k−1} u vᵀ`` is added to the update (``∇σ_max = u vᵀ``). Scalar and 1-D
    leaves pass unchanged. Place it first in the chain (coupled). Computed in float32.

    Args:
        strength: ``λ`` ≥ 0.
        power: ``k`` ≥ 1 (2 in the card). Static.
        spec: Which axes form each matrix's rows and columns. Static.
        seed: Seed of the initial power-iteration vectors. Static.

    Returns:
        A transform whose state is an `AddSpectralPenaltyState`; `update` needs `params`.

    Raises:
        ValueError: for a negative `strength` or ``power < 1``.

    Notes:
        The card marks the exact penalty form as unverified against the paper. The gradient
        uses the current power-iteration estimates, which become exact as ``v`` converges (one
        step per update on slowly changing weights).

    Example:
        >>> tx = cljax.add_spectral_penalty(1e-2)
        >>> state = tx.init({"w": jnp.eye(3), "b": jnp.zeros(3)})

    References:
        Lewandowski et al., "Learning Continually by Spectral Regularization", ICLR 2025.
        https://arxiv.org/abs/2406.06811
    """
    fn = "add_spectral_penalty"
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)
    _checks.check_int(fn, "power", power, 1)
    if not isinstance(spec, _tree.MatrixSpec):
        raise TypeError(f"{fn}(spec=...) must be a cljax.MatrixSpec, got {spec!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}(seed=...) must be an int, got {seed!r}.")

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
        vectors, sigmas = [], []
        for (path, p), k in zip(leaves, keys, strict=False):
            if jnp.ndim(p) < 2:
                vectors.append(None)
                sigmas.append(None)
                continue
            b, _, n = _tree.matrix_shape(jnp.shape(p), spec, _checks.leaf_name(path))
            v = jax.random.normal(k, (b, n), _f32)
            vectors.append(v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-30))
            sigmas.append(jnp.zeros((b,), _f32))
        unflatten = lambda xs: jax.tree.unflatten(jax.tree.structure(params), xs)
        return AddSpectralPenaltyState(vectors=unflatten(vectors), sigma=unflatten(sigmas))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_common.is_none)
        p_leaves = treedef.flatten_up_to(params)
        v_leaves = treedef.flatten_up_to(state.vectors)
        s_leaves = treedef.flatten_up_to(state.sigma)
        out, vs, ss = [], [], []
        for g, p, v, s in zip(leaves, p_leaves, v_leaves, s_leaves, strict=True):
            if g is None or v is None:
                out.append(g)
                vs.append(v)
                ss.append(s)
                continue
            w = _tree.as_matrices(_common.f32(p), spec)
            u, v_new, sigma = jax.vmap(_power_step)(w, v)
            coef = 2.0 * strength * (sigma**power - 1.0) * power * sigma ** (power - 1)
            grad = coef[:, None, None] * u[:, :, None] * v_new[:, None, :]
            grad = _tree.from_matrices(grad, spec, jnp.shape(p))
            out.append((_common.f32(g) + grad).astype(g.dtype))
            vs.append(v_new)
            ss.append(sigma)
        unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
        return unflatten(out), AddSpectralPenaltyState(vectors=unflatten(vs), sigma=unflatten(ss))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AddWassersteinPenaltyState(NamedTuple):
    """State of `add_wasserstein_penalty`."""

    sorted_init: (
        optax.Params
    )  # per leaf, the initial values sorted, flat (size,), in the leaf's dtype


def add_wasserstein_penalty(strength: chex.Numeric) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of ``strength · mean((sort(vec θ) − sort(vec θ⁰))²)`` per leaf.

    ``θ⁰`` are the parameters given to `init` (kept sorted in the state). With ``r`` the rank of
    each entry in the current leaf, the gradient is ``2 λ / n · (θ − sort(θ⁰)[r])`` — the
    permutation is held fixed within the step (the sort-based gradient is piecewise). The penalty
    is zero at `init` and invariant to permutations of a leaf's entries. Place it first in the
    chain (coupled).

    Args:
        strength: ``λ`` ≥ 0.

    Returns:
        A transform whose state is an `AddWassersteinPenaltyState`; `update` needs `params`.

    Raises:
        ValueError: for a negative `strength`.

    Notes:
        The card marks the exact form (from an earlier version of the paper) as unverified.

    Example:
        >>> tx = cljax.add_wasserstein_penalty(1.0)
        >>> state = tx.init({"w": jnp.array([0.0, 1.0])})
        >>> updates, _ = tx.update({"w": jnp.zeros(2)}, state, {"w": jnp.array([1.0, 0.0])})
        >>> updates["w"]  # a permutation of the initial values: zero penalty gradient
        Array([0., 0.], dtype=float32)

    References:
        Lewandowski et al., "Learning Continually by Spectral Regularization", ICLR 2025.
        https://arxiv.org/abs/2406.06811
    """
    fn = "add_wasserstein_penalty"
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)

    def init_fn(params):
        return AddWassersteinPenaltyState(
            sorted_init=jax.tree.map(lambda p: jnp.sort(jnp.ravel(p)), params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)

        def leaf(g, p, ref):
            if g is None:
                return None
            if g.size == 0:
                return g
            flat = _common.f32(p).ravel()
            order = jnp.argsort(flat)
            target = jnp.zeros_like(flat).at[order].set(_common.f32(ref))
            grad = (2.0 * strength / flat.size) * (flat - target)
            return (_common.f32(g) + grad.reshape(g.shape)).astype(g.dtype)

        out = jax.tree.map(leaf, updates, params, state.sorted_init, is_leaf=_common.is_none)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
