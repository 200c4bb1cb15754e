"""Tests for AuON (OR-11): a float64 NumPy transcription of the card's rule over several steps,
optax's Adam for the fallback leaves, the spectral bound and edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax

SHAPES = {"b": (3,), "s": (2, 4, 6), "w": (5, 3)}


def np_direction(d, fan_in, fan_out):
    g = d / (np.linalg.norm(d) + 1e-7)
    u = g / (np.sqrt(np.mean(np.cosh(g) ** 2)) + 1e-8)
    return np.sqrt(max(1.0, fan_out / fan_in)) * u


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_numpy_and_adam_fallback(nesterov):
    rng = np.random.default_rng(0)
    tx = cljax.scale_by_auon(beta=0.9, nesterov=nesterov)
    adam = optax.scale_by_adam()
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state, adam_state = tx.init(params), adam.init({"b": params["b"]})
    mu = {k: np.zeros(s) for k, s in SHAPES.items()}
    step = jax.jit(tx.update)
    for _ in range(4):
        g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        out, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state)
        want_b, adam_state = adam.update({"b": jnp.asarray(g["b"], jnp.float32)}, adam_state)
        np.testing.assert_allclose(out["b"], want_b["b"], rtol=1e-5, atol=1e-7)
        for k in ("s", "w"):
            mu[k] = 0.9 * mu[k] + 0.1 * g[k]
            d = 0.9 * mu[k] + 0.1 * g[k] if nesterov else mu[k]
            if k == "w":
                want = np_direction(d, 5, 3)
            else:
                want = np.stack([np_direction(d[i], 4, 6) for i in range(2)])
            np.testing.assert_allclose(out[k], want, rtol=2e-5, atol=1e-6)


@settings(max_examples=6)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
    shape=st.sampled_from([(4, 9), (9, 4)]),
)
def test_spectral_norm_bound(seed, scale, shape):
    rng = np.random.default_rng(seed)
    tx = cljax.scale_by_auon()
    g = {"w": jnp.asarray(scale * rng.standard_cauchy(shape), jnp.float32)}
    out, _ = tx.update(g, tx.init(g))
    bound = np.sqrt(max(1.0, shape[1] / shape[0]))
    assert np.linalg.norm(np.asarray(out["w"], np.float64), 2) <= bound * (1 + 1e-5)
    assert np.all(np.isfinite(np.asarray(out["w"])))


def test_zero_momentum_pytorch_spec_and_bf16():
    tx = cljax.scale_by_auon()
    zeros = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    out, _ = tx.update(zeros, tx.init(zeros))
    np.testing.assert_array_equal(out["w"], 0.0)
    # PyTorch layout (d_out, d_in) = (12, 3): fan_in 3, fan_out 12, shape factor 2.
    spec = cljax.MatrixSpec(rows=-1, cols=-2)
    tx_t = cljax.scale_by_auon(beta=0.0, nesterov=False, spec=spec)
    g = np.random.default_rng(1).standard_normal((12, 3))
    out_t, _ = tx_t.update({"w": jnp.asarray(g, jnp.float32)}, tx_t.init({"w": jnp.zeros((12, 3))}))
    np.testing.assert_allclose(out_t["w"], np_direction(g, 3, 12), rtol=1e-5, atol=1e-7)
    bf = {"w": jnp.ones((3, 4), jnp.bfloat16)}
    out_b, state = tx.update(bf, tx.init(bf))
    assert out_b["w"].dtype == jnp.bfloat16 and state.mu["w"].dtype == jnp.bfloat16


def test_errors():
    with pytest.raises(ValueError, match=r"scale_by_auon\(beta=...\) must be in \[0.0, 1.0\)"):
        cljax.scale_by_auon(beta=1.0)
    with pytest.raises(TypeError, match=r"scale_by_auon\(nesterov=...\) must be a bool"):
        cljax.scale_by_auon(nesterov=1)
    with pytest.raises(
        TypeError, match=r"scale_by_auon\(fallback=...\) must be an optax GradientTransformation"
    ):
        cljax.scale_by_auon(fallback="adam")
    with pytest.raises(TypeError, match=r"scale_by_auon\(spec=...\) must be a MatrixSpec"):
        cljax.scale_by_auon(spec=3)
