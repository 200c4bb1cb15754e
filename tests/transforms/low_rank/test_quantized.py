"""Tests for `quantize_state` (OT-01, 8-bit block-wise optimizer state): round-trip error bounds
computed in NumPy from the code book, exact block absmax, zero blocks, the identity case, a small
regression task against 32-bit Adam, and 8-bit GaLore."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import cljax
from cljax.transforms.low_rank import quantized as _quantized
from tests.helpers import assert_trees_equal


def _bound(x, code, block):
    """Per-entry bound: half the gap between the code values around x / s, times s (NumPy)."""
    x = np.asarray(x, np.float64).reshape(-1)
    blocks = -(-x.size // block)
    padded = np.pad(x, (0, blocks * block - x.size)).reshape(blocks, block)
    s = np.abs(padded).max(axis=1)
    y = padded / np.where(s > 0, s, 1.0)[:, None]
    code = np.unique(np.asarray(code, np.float64))
    hi = np.clip(np.searchsorted(code, y, side="left"), 1, len(code) - 1)
    gap = code[hi] - code[hi - 1]
    return (0.5 * gap * s[:, None]).reshape(-1)[: x.size], s


@settings(max_examples=8, deadline=None)
@given(
    size=st.sampled_from([1, 37, 300]),
    block=st.sampled_from([16, 64, 128]),
    signed=st.booleans(),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 1000),
)
def test_round_trip_error_is_within_half_the_local_code_gap(size, block, signed, scale, seed):
    x = scale * jax.random.normal(jax.random.key(seed), (size,))
    if not signed:
        x = jnp.abs(x)
    code = jnp.asarray(cljax.dynamic_code(signed))
    q = _quantized._quantize(x, code, block)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape and q.scales.dtype == jnp.float32
    back = _quantized._dequantize(q, code, block)
    bound, absmax = _bound(x, code, block)
    np.testing.assert_allclose(q.scales, absmax, rtol=0)  # block absmax is exact
    err = np.abs(np.asarray(back, np.float64) - np.asarray(x, np.float64))
    assert np.all(err <= bound * (1 + 1e-5) + 1e-30)


def test_zero_blocks_round_trip_to_zero():
    x = jnp.concatenate([jnp.zeros(64), jnp.ones(10)])
    code = jnp.asarray(cljax.dynamic_code(True))
    q = _quantized._quantize(x, code, 32)
    back = _quantized._dequantize(q, code, 32)
    np.testing.assert_array_equal(q.scales[:2], 0.0)
    np.testing.assert_array_equal(back[:64], 0.0)
    assert bool(jnp.all(jnp.isfinite(back)))


def test_codes_are_sorted_exact_at_zero_and_one_and_denser_near_zero():
    for signed in (True, False):
        code = cljax.dynamic_code(signed)
        assert code.shape == (256,) and np.all(np.diff(code) >= 0)
        assert 0.0 in code and 1.0 in code and (not signed or -1.0 in code)
        positive = np.unique(code[code > 0])
        gaps = np.diff(positive)
        assert gaps[0] < 1e-5 < gaps[-1]


def test_state_layout_and_unsigned_second_moment():
    tx = cljax.quantize_state(optax.scale_by_adam(), block_size=16, min_size=32)
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}
    state = tx.init(params)
    adam = state.inner
    assert isinstance(adam.mu["w"], cljax.QuantizedTensor) and adam.mu["w"].scales.shape == (3,)
    assert adam.mu["b"].dtype == jnp.float32  # 6 < min_size: stays 32-bit
    step = jax.jit(tx.update)
    first = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for t in range(3):
        g = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), params)
        _, state = step(g, state, params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == first
    nu = _quantized._dequantize(state.inner.nu["w"], jnp.asarray(cljax.dynamic_code(False)), 16)
    assert bool(jnp.all(nu >= 0))


def test_without_quantized_tensors_it_is_the_inner_transform_bitwise():
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}
    plain = optax.adam(1e-2)
    wrapped = cljax.quantize_state(optax.adam(1e-2), min_size=10**6)
    s_plain, s_wrapped = plain.init(params), wrapped.init(params)
    step_p, step_w = jax.jit(plain.update), jax.jit(wrapped.update)
    for t in range(3):
        g = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), params)
        u_p, s_plain = step_p(g, s_plain, params)
        u_w, s_wrapped = step_w(g, s_wrapped, params)
        assert_trees_equal(u_w, u_p)
    assert_trees_equal(s_wrapped.inner, s_plain)


def _regression_loss(tx, steps=150):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (128, 64))
    y = x @ jax.random.normal(kw, (64, 32))
    loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)  # noqa: E731
    params = {"w": jnp.zeros((64, 32))}

    def body(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return float(loss(params))


def test_small_regression_task_matches_32_bit_adam():
    full = _regression_loss(optax.adam(3e-2))
    eight = _regression_loss(cljax.quantize_state(optax.adam(3e-2), block_size=256, min_size=256))
    assert eight < 1.25 * full + 1e-3, (eight, full)


def test_eight_bit_galore():
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
    inner = cljax.quantize_state(optax.scale_by_adam(), block_size=8, min_size=16)
    tx = cljax.scale_by_low_rank_projection(inner, rank=4, refresh_every=3)
    ref = cljax.scale_by_low_rank_projection(optax.scale_by_adam(), rank=4, refresh_every=3)
    state, ref_state = tx.init(params), ref.init(params)
    assert state.inner["w"].inner.mu.codes.shape == (16, 4)  # projected moments, 8-bit
    step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(5):
        g = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), params)
        u, state = step(g, state, params)
        u_ref, ref_state = ref_step(g, ref_state, params)
        cos = jnp.sum(u["w"] * u_ref["w"]) / (jnp.linalg.norm(u["w"]) * jnp.linalg.norm(u_ref["w"]))
        assert float(cos) > 0.95


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_size=0), ValueError, r"quantize_state\(block_size=...\) must be >= 1"),
        (dict(min_size=0), ValueError, r"quantize_state\(min_size=...\) must be >= 1"),
        (
            dict(code="fp8"),
            ValueError,
            r"quantize_state\(code=...\) must be one of 'dynamic', 'linear'",
        ),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        cljax.quantize_state(optax.scale_by_adam(), **kwargs)
    with pytest.raises(TypeError, match=r"quantize_state\(inner=...\) must be an optax"):
        cljax.quantize_state("adam")
