"""Tests for RG-06, hierarchical layer-wise and element-wise regularisation (`hierarchical_reg`).

The reference is a float64 NumPy transcription of the rule over a whole two-phase run with Adam
(path integral ``Σ |g ⊙ Δθ|`` with the unpenalised gradient, ``Ω = w / (Δ² + ξ)``, penalty
gradient ``2 c α_l Ω (θ − θ⁰)`` with ``α = layer_weights(R)``), and `jax.grad` of the loss form
``c Σ_l α_l Σ_i Ω_i (θ_i − θ⁰_i)²``. Card invariants: ``Ω = 0`` is plain fine-tuning; the anchor is
the pre-trained model.
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

SHAPES = {"w": (4, 3), "b": (3,), "s": ()}
KEYS = sorted(SHAPES)  # tree order of a dict


def _tree(rng, scale=1.0):
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}


def _proportional(r):
    return r.shape[0] * r / (jnp.sum(r) + 1e-12)


def _np_proportional(r):
    return len(r) * r / (np.sum(r) + 1e-12)


class NpAdam:
    """Float64 Adam (optax's defaults) on a dict of arrays."""

    def __init__(self, lr):
        self.lr, self.t, self.m, self.v = lr, 0, None, None

    def step(self, g):
        if self.m is None:
            self.m = {k: np.zeros_like(x) for k, x in g.items()}
            self.v = {k: np.zeros_like(x) for k, x in g.items()}
        self.t += 1
        out = {}
        for k, x in g.items():
            self.m[k] = 0.9 * self.m[k] + 0.1 * x
            self.v[k] = 0.999 * self.v[k] + 0.001 * x * x
            mh = self.m[k] / (1 - 0.9**self.t)
            vh = self.v[k] / (1 - 0.999**self.t)
            out[k] = -self.lr * mh / (np.sqrt(vh) + 1e-8)
        return out


@pytest.mark.parametrize("rule", [None, "proportional"])
def test_two_phase_run_matches_numpy(rule):
    rng = np.random.default_rng(0)
    c, xi, lr = 0.5, 0.1, 0.05
    theta0 = _tree(rng)
    grads = [_tree(rng) for _ in range(6)]
    tx = cljax.hierarchical_reg(
        optax.adam(lr), c, xi, layer_weights=None if rule is None else _proportional
    )
    step = jax.jit(tx.update)
    params = jax.tree.map(jnp.asarray, theta0)
    state = tx.init(params)
    ref = {k: np.float64(v) for k, v in theta0.items()}
    adam, w = NpAdam(lr), {k: np.zeros(s) for k, s in SHAPES.items()}
    omega = {k: np.zeros(s) for k, s in SHAPES.items()}
    start = dict(ref)
    for t, g in enumerate(grads):
        if t == 3:  # end of the general phase
            state = cljax.hierarchical_reg_record(state, params)
            for k in KEYS:
                omega[k] = omega[k] + w[k] / ((ref[k] - start[k]) ** 2 + xi)
                w[k] = np.zeros_like(w[k])
            start = dict(ref)
            np.testing.assert_allclose(state.importance["w"], omega["w"], rtol=2e-4)
        r = np.array([np.sum(omega[k] * (ref[k] - np.float64(theta0[k])) ** 2) for k in KEYS])
        alpha = np.ones(3) if rule is None else _np_proportional(r)
        pen = {
            k: np.float64(g[k]) + 2 * c * alpha[i] * omega[k] * (ref[k] - np.float64(theta0[k]))
            for i, k in enumerate(KEYS)
        }
        u_ref = adam.step(pen)
        for k in KEYS:
            w[k] = w[k] + np.abs(np.float64(g[k]) * u_ref[k])
            ref[k] = ref[k] + u_ref[k]
        u, state = step(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, u)
        assert_trees_close(params, ref, rtol=1e-4, atol=1e-5, err=f"step {t}")
        assert_trees_close(state.path_integral, w, rtol=1e-3, atol=1e-6, err=f"step {t}")
    assert_trees_equal(state.anchor, jax.tree.map(jnp.asarray, theta0))  # never moves
    assert float(np.sum(np.abs(np.asarray(state.importance["w"])))) > 0


def test_penalty_gradient_equals_autodiff_of_the_loss_form():
    rng = np.random.default_rng(1)
    c = 0.7
    theta0, theta, g = _tree(rng), _tree(rng), _tree(rng)
    omega = {k: np.abs(v) for k, v in _tree(rng).items()}
    tx = cljax.hierarchical_reg(optax.sgd(1.0), c, layer_weights=_proportional)
    state = tx.init(jax.tree.map(jnp.asarray, theta0))
    state = state._replace(importance=jax.tree.map(jnp.asarray, omega))
    params = jax.tree.map(jnp.asarray, theta)
    r = cljax.hierarchical_layer_penalties(state, params)
    want_r = [np.sum(np.float64(omega[k]) * (np.float64(theta[k]) - theta0[k]) ** 2) for k in KEYS]
    np.testing.assert_allclose(r, want_r, rtol=1e-5)
    alpha = jax.lax.stop_gradient(_proportional(r))

    def penalty(p):
        terms = [
            jnp.sum(jnp.asarray(omega[k]) * (p[k] - jnp.asarray(theta0[k])) ** 2) for k in KEYS
        ]
        return c * jnp.sum(alpha * jnp.stack(terms))

    auto = jax.grad(penalty)(params)
    u, _ = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    got = jax.tree.map(lambda u, g: -u - g, u, jax.tree.map(jnp.asarray, g))
    assert_trees_close(got, auto, rtol=1e-5, atol=1e-6)


def test_zero_importance_is_plain_fine_tuning_bitwise():
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    tx = cljax.hierarchical_reg(optax.adamw(1e-2), 3.0, layer_weights=_proportional)
    ref = optax.adamw(1e-2)
    s, rs = tx.init(params), ref.init(params)
    p, rp = params, params
    for _ in range(3):
        g = jax.tree.map(jnp.asarray, _tree(rng))
        u, s = tx.update(g, s, p)
        ru, rs = ref.update(g, rs, rp)
        assert_trees_equal(u, ru)
        p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ru)


def test_record_accumulates_and_resets_the_path_integral():
    params = {"w": jnp.zeros(2)}
    tx = cljax.hierarchical_reg(optax.sgd(1.0), 1.0, damping=1.0)
    state = tx.init(params)
    u, state = tx.update({"w": jnp.array([1.0, -2.0])}, state, params)
    params = optax.apply_updates(params, u)  # [-1, 2]; w = [1, 4]
    state = cljax.hierarchical_reg_record(state, params)
    np.testing.assert_allclose(state.importance["w"], [1 / 2, 4 / 5], rtol=1e-6)
    np.testing.assert_array_equal(state.path_integral["w"], 0.0)
    np.testing.assert_array_equal(state.start["w"], params["w"])
    state = cljax.hierarchical_reg_record(state, params)  # no movement, no path: unchanged
    np.testing.assert_allclose(state.importance["w"], [1 / 2, 4 / 5], rtol=1e-6)


def test_under_masked_and_in_a_chain():
    rng = np.random.default_rng(3)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    mask = {"w": True, "b": False, "s": True}
    tx = optax.chain(
        optax.masked(
            cljax.hierarchical_reg(optax.sgd(0.1), 1.0, layer_weights=_proportional), mask
        ),
        optax.masked(optax.sgd(0.1), {k: not v for k, v in mask.items()}),
    )
    state = tx.init(params)
    g = jax.tree.map(jnp.asarray, _tree(rng))
    u, state = jax.jit(tx.update)(g, state, params)
    np.testing.assert_allclose(u["b"], -0.1 * g["b"], rtol=1e-6)
    found = cljax.find_state(state, cljax.HierarchicalRegState)
    assert isinstance(found.importance["b"], optax.MaskedNode)
    # Boundary functions take the full parameters and skip the masked leaf.
    moved = optax.apply_updates(params, u)
    state = cljax.hierarchical_reg_record(state, moved)
    found = cljax.find_state(state, cljax.HierarchicalRegState)
    assert isinstance(found.importance["b"], optax.MaskedNode)
    w_ref = np.abs(np.float64(g["w"]) * np.float64(u["w"])) / (np.float64(u["w"]) ** 2 + 0.1)
    np.testing.assert_allclose(found.importance["w"], w_ref, rtol=1e-5)
    r = cljax.hierarchical_layer_penalties(state, moved)
    assert r.shape == (2,)  # "s" and "w" only
    np.testing.assert_allclose(r[1], np.sum(w_ref * np.float64(u["w"]) ** 2), rtol=1e-5)


@given(
    seed=st.integers(0, 1000), zero=st.booleans(), dtype=st.sampled_from(["float32", "bfloat16"])
)
def test_property_finite_dtype_nonnegative_importance(seed, zero, dtype):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), _tree(rng))
    tx = cljax.hierarchical_reg(optax.adam(1e-2), 1e3, layer_weights=_proportional)
    state = tx.init(params)
    for _ in range(2):
        g = jax.tree.map(lambda x: jnp.asarray(0 * x if zero else x, dtype), _tree(rng, 10.0))
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        state = cljax.hierarchical_reg_record(state, params)
    for leaf in jax.tree.leaves(u):
        assert leaf.dtype == jnp.dtype(dtype)
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    for leaf in jax.tree.leaves(state.importance):
        assert np.all(np.asarray(leaf) >= 0) and np.all(np.isfinite(np.asarray(leaf)))


def test_errors():
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"hierarchical_reg\(strength=...\) must be in"):
        cljax.hierarchical_reg(optax.sgd(1.0), -1.0)
    with pytest.raises(ValueError, match=r"hierarchical_reg\(damping=...\) must be in"):
        cljax.hierarchical_reg(optax.sgd(1.0), 1.0, 0.0)
    with pytest.raises(TypeError, match=r"hierarchical_reg\(inner=...\) must be an optax"):
        cljax.hierarchical_reg(3, 1.0)
    with pytest.raises(
        TypeError, match=r"hierarchical_reg\(layer_weights=...\) must be a function"
    ):
        cljax.hierarchical_reg(optax.sgd(1.0), 1.0, layer_weights=2.0)
    tx = cljax.hierarchical_reg(optax.sgd(1.0), 1.0, layer_weights=lambda r: jnp.ones(3))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"`layer_weights` returned shape \(3,\) for 1 layers"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match=r"hierarchical_reg: .*params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"hierarchical_reg_record: no HierarchicalRegState"):
        cljax.hierarchical_reg_record(optax.sgd(1.0).init(params), params)
    with pytest.raises(ValueError, match=r"hierarchical_reg_record: leaf 'w' has shape \(3,\)"):
        cljax.hierarchical_reg_record(state, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"hierarchical_layer_penalties: `params` does not have"):
        cljax.hierarchical_layer_penalties(state, {"v": jnp.zeros(2)})
