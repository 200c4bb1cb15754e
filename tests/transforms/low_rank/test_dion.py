"""Tests for `scale_by_dion` (LR-13) against a float64 NumPy transcription of the Dion step, the
orthonormality of P and the polar-factor limit of the power iteration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from cljax.transforms.low_rank import dion as _dion


def _reference_dion(grads, q0, mu, gauge):
    """Dion for one (m, n) matrix: B = M + G; P = orth(B Q); R = Bᵀ P; M = B − (1 − mu) P Rᵀ;
    Q = R / ‖R‖_col; d = sqrt(max(1, m/n)) P Qᵀ. `gauge(t)` gives the implementation's P at step
    t: a QR factor is defined up to column signs, fixed here to match."""
    m, n = grads[0].shape
    mom = np.zeros((m, n))
    q = np.asarray(q0, np.float64)
    outs = []
    for t, g in enumerate(grads):
        b = mom + np.asarray(g, np.float64)
        p, _ = np.linalg.qr(b @ q)
        p = p * np.sign(np.sum(p * np.asarray(gauge(t), np.float64), axis=0))
        r = b.T @ p
        mom = b - (1 - mu) * p @ r.T
        q = r / np.linalg.norm(r, axis=0, keepdims=True)
        outs.append(np.sqrt(max(1.0, m / n)) * p @ q.T)
    return outs


@pytest.mark.parametrize("shape", [(8, 5), (4, 9)])
def test_matches_numpy_reference(shape):
    tx = cljax.scale_by_dion(rank=3, mu=0.9)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    q0 = state.q["w"]
    step = jax.jit(tx.update)
    grads, got, ps = [], [], []
    for t in range(4):
        g = jax.random.normal(jax.random.key(t), shape)
        # The implementation's P: orth(B Q) for this step, recomputed from the state.
        b = state.momentum["w"] + g
        ps.append(jnp.linalg.qr(b @ state.q["w"])[0])
        u, state = step({"w": g}, state)
        grads.append(g)
        got.append(u["w"])
    want = _reference_dion(grads, q0, 0.9, gauge=lambda t: ps[t])
    for t in range(4):
        np.testing.assert_allclose(got[t], want[t], rtol=1e-4, atol=1e-5, err_msg=f"step {t}")


def test_p_is_orthonormal_and_full_rank_power_iteration_gives_the_polar_factor():
    b = jax.random.normal(jax.random.key(0), (6, 4))
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (4, 4)))[0]
    for _ in range(60):
        p, _, q, _ = _dion._power_step(b, q, 1e-8)
    np.testing.assert_allclose(p.T @ p, np.eye(4), atol=1e-5)
    u, _, vh = np.linalg.svd(np.asarray(b, np.float64), full_matrices=False)
    np.testing.assert_allclose(p @ q.T, u @ vh, atol=1e-4)


@pytest.mark.slow
def test_stacked_leaves_state_shapes_and_fallback():
    params = {"k": jnp.zeros((2, 6, 3)), "b": jnp.zeros(3)}
    tx = cljax.scale_by_dion(rank=2, fallback=optax.scale(-1.0))
    state = tx.init(params)
    assert state.momentum["k"].shape == (2, 6, 3) and state.q["k"].shape == (2, 3, 2)
    g = {"k": jax.random.normal(jax.random.key(0), (2, 6, 3)), "b": jnp.ones(3)}
    u, state = tx.update(g, state)
    np.testing.assert_array_equal(u["b"], -g["b"])
    for i in range(2):  # each stacked matrix is its own Dion matrix: a rank-2 direction
        assert np.linalg.matrix_rank(np.asarray(u["k"][i]), tol=1e-5) == 2


@pytest.mark.slow
def test_zero_gradients_keep_q_and_stay_finite():
    params = {"w": jnp.zeros((5, 4))}
    tx = cljax.scale_by_dion(rank=4)
    state = tx.init(params)
    u, new = tx.update({"w": jnp.zeros((5, 4))}, state)
    assert not np.any(np.asarray(u["w"]))
    np.testing.assert_array_equal(new.q["w"], state.q["w"])
    u, _ = tx.update({"w": jnp.ones((5, 4))}, new)
    assert bool(jnp.all(jnp.isfinite(u["w"]))) and np.any(np.asarray(u["w"]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, r"scale_by_dion\(rank=...\) must be >= 1"),
        (dict(mu=1.5), ValueError, r"scale_by_dion\(mu=...\) must be in"),
        (dict(seed=-2), ValueError, r"scale_by_dion\(seed=...\) must be >= 0"),
        (dict(eps=0.0), ValueError, r"scale_by_dion\(eps=...\) must be in \(0.0"),
        (dict(fallback=1), TypeError, r"scale_by_dion\(fallback=...\) must be an optax"),
        (dict(matrix_spec=3), TypeError, r"scale_by_dion\(matrix_spec=...\) must be a MatrixSpec"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        cljax.scale_by_dion(**kwargs)
