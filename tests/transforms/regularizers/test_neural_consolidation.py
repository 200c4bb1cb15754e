"""Tests for NC (RG-07's neural counterpart of AQC): `neural_consolidation` and its fit / set.

References: the penalty gradient of a one-hidden-layer tanh regressor written out in float64
NumPy (``∇_θ vᵀ tanh(Wθ + b) = Wᵀ (v ⊙ (1 − tanh²(Wθ + b)))``); a quadratic regressor reproduces
`aqc`'s update exactly; the fit recovers NumPy's least-squares solution for a linear regressor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

SHAPES = {"b": (3,), "w": (2, 3)}  # P = 9, tree order b then w
P = 9


def mlp(weights, theta):
    return weights["v"] @ jnp.tanh(weights["W"] @ theta + weights["c"]) + weights["d"]


def _mlp_weights(rng, hidden=5):
    return {
        "W": np.asarray(rng.standard_normal((hidden, P)) / 3, np.float32),
        "c": np.asarray(rng.standard_normal(hidden), np.float32),
        "v": np.asarray(rng.standard_normal(hidden), np.float32),
        "d": np.float32(0.3),
    }


def _tree(rng):
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def _flat(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(SHAPES)])


def test_penalty_gradient_matches_numpy_mlp_gradient():
    rng = np.random.default_rng(0)
    phi = _mlp_weights(rng)
    tx = cljax.neural_consolidation(mlp, jax.tree.map(np.zeros_like, phi), strength=0.7)
    params, g = _tree(rng), _tree(rng)
    state = cljax.neural_consolidation_set(tx.init(params), phi)
    u, _ = jax.jit(tx.update)(g, state, params)
    theta = _flat(params)
    W, c, v = (np.asarray(phi[k], np.float64) for k in ("W", "c", "v"))
    grad = 0.7 * W.T @ (v * (1.0 - np.tanh(W @ theta + c) ** 2))
    np.testing.assert_allclose(_flat(u) - _flat(g), grad, rtol=1e-5, atol=1e-6)


def test_inactive_is_identity_and_zero_strength_is_identity():
    rng = np.random.default_rng(1)
    phi = _mlp_weights(rng)
    params, g = _tree(rng), _tree(rng)
    tx = cljax.neural_consolidation(mlp, phi)
    assert_trees_equal(tx.update(g, tx.init(params), params)[0], g)
    tx0 = cljax.neural_consolidation(mlp, phi, strength=0.0)
    state = cljax.neural_consolidation_set(tx0.init(params), phi)
    assert_trees_equal(tx0.update(g, state, params)[0], g)


def test_quadratic_regressor_reproduces_aqc():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((P, P))
    hess = np.asarray(a @ a.T / P, np.float32)
    anchor = _tree(rng)
    quad = lambda w, t: 0.5 * (t - w["c"]) @ w["H"] @ (t - w["c"])
    phi = {"H": hess, "c": np.asarray(_flat(anchor), np.float32)}
    nc = cljax.neural_consolidation(quad, jax.tree.map(np.zeros_like, phi))
    params, g = _tree(rng), _tree(rng)
    nc_state = cljax.neural_consolidation_set(nc.init(params), phi)
    aqc = cljax.aqc()
    aqc_state = aqc.init(anchor)._replace(hessian=jnp.asarray(hess))
    assert_trees_close(
        nc.update(g, nc_state, params)[0], aqc.update(g, aqc_state, params)[0], rtol=1e-5
    )


def test_fit_recovers_least_squares_and_sequential_targets():
    rng = np.random.default_rng(3)
    thetas = rng.standard_normal((40, 4))
    true_w, true_b = rng.standard_normal(4), 0.5
    targets = thetas @ true_w + true_b + 0.01 * rng.standard_normal(40)
    lin = lambda w, t: w["a"] @ t + w["b"]
    fit = jax.jit(
        lambda w0, x, y: cljax.neural_consolidation_fit(
            lin, w0, x, y, steps=600, learning_rate=0.05
        )
    )
    w = fit({"a": jnp.zeros(4), "b": jnp.zeros([])}, thetas, targets)
    design = np.hstack([thetas, np.ones((40, 1))])
    ref = np.linalg.lstsq(design, targets, rcond=None)[0]
    np.testing.assert_allclose(np.append(np.asarray(w["a"]), w["b"]), ref, atol=2e-3)
    assert w["a"].dtype == jnp.float32
    # Sequential recursion: the next fit regresses the previous approximation plus a new loss.
    new_loss = thetas @ (2 * true_w)
    prev = jax.vmap(lambda t: lin(w, t))(jnp.asarray(thetas, jnp.float32))
    w2 = fit(w, thetas, np.asarray(prev) + new_loss)
    np.testing.assert_allclose(np.asarray(w2["a"]), ref[:4] + 2 * true_w, atol=5e-3)


def test_under_masked_sees_only_the_head():
    rng = np.random.default_rng(4)
    params = _tree(rng)
    head_only = lambda w, t: jnp.sum(w * t)  # P = 3: only "b"
    tx = optax.masked(cljax.neural_consolidation(head_only, jnp.zeros(3)), {"b": True, "w": False})
    state = tx.init(params)
    inner = cljax.find_state(state, cljax.NeuralConsolidationState)
    state = cljax.neural_consolidation_set(state, jnp.array([1.0, 2.0, 3.0]))
    assert inner.approximator.shape == (3,)
    g = _tree(rng)
    u, _ = jax.jit(tx.update)(g, state, params)
    np.testing.assert_allclose(u["b"], g["b"] + jnp.array([1.0, 2.0, 3.0]), rtol=1e-6)
    assert_trees_equal(u["w"], g["w"])


@given(seed=st.integers(0, 1000), dtype=st.sampled_from(["float32", "bfloat16"]), big=st.booleans())
def test_property_finite_and_keeps_dtype(seed, dtype, big):
    rng = np.random.default_rng(seed)
    phi = _mlp_weights(rng)
    scale = 1e4 if big else 1.0
    params = jax.tree.map(lambda x: (scale * x).astype(dtype), _tree(rng))
    tx = cljax.neural_consolidation(mlp, phi)
    state = cljax.neural_consolidation_set(tx.init(params), phi)
    g = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(g, state, params)
    for leaf in jax.tree.leaves(u):
        assert leaf.dtype == jnp.dtype(dtype)
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_errors():
    params = {"b": jnp.zeros(3)}
    f = lambda w, t: jnp.sum(w * t)
    with pytest.raises(TypeError, match=r"neural_consolidation\(approximator_fn=...\) must be"):
        cljax.neural_consolidation(3, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"neural_consolidation\(strength=...\) must be in"):
        cljax.neural_consolidation(f, jnp.zeros(3), -1.0)
    with pytest.raises(ValueError, match=r"neural_consolidation: .* must return a scalar .*\(3,\)"):
        cljax.neural_consolidation(lambda w, t: w * t, jnp.zeros(3)).init(params)
    tx = cljax.neural_consolidation(f, jnp.zeros(3))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"neural_consolidation: .*params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"neural_consolidation_set: no NeuralConsolidationState"):
        cljax.neural_consolidation_set(optax.sgd(1.0).init(params), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"neural_consolidation_set: `approximator` has structure"):
        cljax.neural_consolidation_set(state, {"a": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"neural_consolidation_set: leaf '.*' .* shape \(4,\)"):
        cljax.neural_consolidation_set(state, jnp.zeros(4))
    fit = cljax.neural_consolidation_fit
    with pytest.raises(TypeError, match=r"neural_consolidation_fit\(approximator_fn=...\)"):
        fit(None, jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"neural_consolidation_fit\(steps=...\) must be >= 1"):
        fit(f, jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros(2), steps=0)
    with pytest.raises(TypeError, match=r"neural_consolidation_fit\(steps=...\) must be an int"):
        fit(f, jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros(2), steps=1.5)
    with pytest.raises(ValueError, match=r"neural_consolidation_fit\(learning_rate=...\) must be"):
        fit(f, jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros(2), learning_rate=0.0)
    with pytest.raises(ValueError, match=r"neural_consolidation_fit: `thetas` has shape \(2, 3\)"):
        fit(f, jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"neural_consolidation_fit: .* must return a scalar"):
        fit(lambda w, t: w * t, jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros(2))
