"""Tests for `scale_by_frugal` (LR-02) against a float64 NumPy transcription of the FRUGAL step
(SVD projector, Adam on the projection, signSGD on the residual, statistics reset at refresh)
and the card's invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from tests.helpers import assert_trees_close


def _grads(shapes, step):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(11), step), len(shapes))
    return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, shapes.items(), strict=True)}


def _run(tx, shapes, steps):
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    outs, states = [], []
    for t in range(steps):
        u, state = step(_grads(shapes, t), state, params)
        outs.append(u)
        states.append(state)
    return outs, states


def _reference_frugal(grads, rank, gap, s_p, s_free, gauge, b1=0.9, b2=0.999, eps=1e-8):
    """FRUGAL for one tall matrix ('std': right projector), reset_statistics=True, optax Adam."""
    outs = []
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        if t % gap == 0:
            _, _, vh = np.linalg.svd(g, full_matrices=False)
            q = vh[:rank].T
            q = q * np.sign(np.sum(q * np.asarray(gauge(t), np.float64), axis=0))
            mu = np.zeros((g.shape[0], rank))
            nu = np.zeros_like(mu)
            count = 0
        low = g @ q
        count += 1
        mu = b1 * mu + (1 - b1) * low
        nu = b2 * nu + (1 - b2) * low * low
        direction = (mu / (1 - b1**count)) / (np.sqrt(nu / (1 - b2**count)) + eps)
        residual = g - low @ q.T
        outs.append(s_p * (direction @ q.T + s_free * np.sign(residual)))
    return outs


def test_matches_numpy_reference():
    shapes = {"w": (9, 6)}
    tx = cljax.scale_by_frugal(density=0.5, refresh_every=3, scale=0.7, inactive_scale=0.1)
    got, states = _run(tx, shapes, 7)
    want = _reference_frugal(
        [_grads(shapes, t)["w"] for t in range(7)],
        3,
        3,
        0.7,
        0.1,
        gauge=lambda t: states[t].projector["w"],
    )
    for t in range(7):
        np.testing.assert_allclose(got[t]["w"], want[t], rtol=1e-4, atol=5e-5, err_msg=f"step {t}")


def test_no_residual_and_no_reset_is_galore():
    shapes = {"w": (8, 5), "k": (2, 4, 7), "b": (5,)}
    frugal = cljax.scale_by_frugal(
        density=0.4, refresh_every=2, scale=0.25, inactive_update="none", reset_statistics=False
    )
    galore = cljax.scale_by_low_rank_projection(
        rank=2, refresh_every=2, scale=0.25, on_refresh="keep"
    )
    got, _ = _run(frugal, shapes, 5)
    want, _ = _run(galore, shapes, 5)
    for t in range(5):
        assert_trees_close(got[t], want[t], rtol=1e-6, atol=1e-7)


def test_residual_is_orthogonal_to_the_projection_and_sign_has_fixed_magnitude():
    shapes = {"tall": (8, 5), "wide": (3, 9)}
    sgd_rest = cljax.scale_by_frugal(
        optax.set_to_zero(), density=0.4, inactive_update="sgd", scale=2.0
    )
    outs, states = _run(sgd_rest, shapes, 1)
    for name, left in (("tall", False), ("wide", True)):
        q = np.asarray(states[0].projector[name])
        r = np.asarray(outs[0][name])
        down = q.T @ r if left else r @ q
        np.testing.assert_allclose(down, 0.0, atol=1e-5)
        g = np.asarray(_grads(shapes, 0)[name])
        kept = q @ q.T @ g if left else g @ q @ q.T
        np.testing.assert_allclose(r, 2.0 * (g - kept), rtol=1e-5, atol=1e-5)
    signs = cljax.scale_by_frugal(optax.set_to_zero(), density=0.4, scale=2.0, inactive_scale=0.3)
    outs, _ = _run(signs, shapes, 1)
    for leaf in jax.tree.leaves(outs):
        nonzero = np.abs(np.asarray(leaf))[np.asarray(leaf) != 0]
        np.testing.assert_allclose(nonzero, 0.6, rtol=1e-6)


def test_reset_zeroes_moments_and_restarts_bias_correction():
    shapes = {"w": (6, 4)}
    tx = cljax.scale_by_frugal(density=0.5, refresh_every=3)
    _, states = _run(tx, shapes, 4)
    assert [int(s.inner["w"].count) for s in states] == [1, 2, 3, 1]
    g = np.asarray(_grads(shapes, 3)["w"])
    low = g @ np.asarray(states[3].projector["w"])
    np.testing.assert_allclose(states[3].inner["w"].mu, 0.1 * low, rtol=1e-5, atol=1e-6)


def test_state_float_count_is_twice_the_state_full_coordinates():
    params = {"a": jnp.zeros((12, 8)), "k": jnp.zeros((3, 10, 4))}
    state = cljax.scale_by_frugal(density=0.25).init(params)
    moments = sum(x.size for x in jax.tree.leaves(state.inner) if x.dtype == jnp.float32)
    r_a, r_k = round(0.25 * 8), round(0.25 * 4)
    assert moments == 2 * (12 * r_a + 3 * 10 * r_k)


def test_full_density_with_a_linear_inner_equals_the_inner():
    shapes = {"w": (6, 4), "b": (4,)}
    got, _ = _run(
        cljax.scale_by_frugal(optax.trace(0.9), density=1.0, refresh_every=100), shapes, 4
    )
    want, _ = _run(optax.trace(0.9), shapes, 4)
    for t in range(4):
        assert_trees_close(got[t], want[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projector", ["svd", "randomized", "random"])
def test_zero_gradients_stay_finite(projector):
    tx = cljax.scale_by_frugal(density=0.5, projector=projector)
    params = {"w": jnp.zeros((6, 4)), "k": jnp.zeros((2, 3, 5))}
    out, _ = tx.update(params, tx.init(params))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(density=0.0), ValueError, r"scale_by_frugal\(density=...\) must be in \(0.0, 1.0\]"),
        (dict(density=1.5), ValueError, r"scale_by_frugal\(density=...\) must be in"),
        (dict(density="half"), TypeError, r"scale_by_frugal\(density=...\) must be a float"),
        (
            dict(inactive_update="adam"),
            ValueError,
            r"\(inactive_update=...\) must be one of 'sign_sgd'",
        ),
        (
            dict(projector="online_pca"),
            ValueError,
            r"\(projector=...\) must be one of 'svd', 'randomized', 'random'",
        ),
        (dict(reset_statistics=1), TypeError, r"\(reset_statistics=...\) must be a bool"),
        (dict(inactive_scale=-1.0), ValueError, r"\(inactive_scale=...\) must be in"),
        (dict(scale=float("nan")), ValueError, r"scale_by_frugal\(scale=...\) must be in"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        cljax.scale_by_frugal(**kwargs)
