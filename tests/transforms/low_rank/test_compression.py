"""Tests for low-rank residual compression (LR-06 ERE), Timber (LR-14) and LoRC (LR-15) against
float64 NumPy SVD formulas (Eckart–Young errors, energy and effective-rank rules)."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import cljax
from tests.helpers import assert_trees_close

BASE = {
    "w": jax.random.normal(jax.random.key(0), (9, 6)),
    "k": jax.random.normal(jax.random.key(1), (2, 5, 7)),
    "b": jnp.zeros(6),
}


def _tuned(rank=None):
    def delta(key, shape):
        if rank is None:
            return jax.random.normal(key, shape)
        k1, k2 = jax.random.split(key)
        return jax.random.normal(k1, (*shape[:-1], rank)) @ jax.random.normal(
            k2, (*shape[:-2], rank, shape[-1])
        )

    return {
        "w": BASE["w"] + delta(jax.random.key(2), (9, 6)),
        "k": BASE["k"] + delta(jax.random.key(3), (2, 5, 7)),
        "b": jnp.arange(6.0),
    }


def _np(x):
    return np.asarray(x, np.float64)


def _sigma(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def test_exact_rank_reconstructs_and_vectors_are_exact():
    tuned = _tuned(rank=2)
    packed = cljax.compress_low_rank(tuned, BASE, rank=2)
    assert packed["w"].left.shape == (9, 2) and packed["w"].right.shape == (2, 6)
    assert packed["k"].left.shape == (2, 5, 2)
    np.testing.assert_array_equal(packed["b"], tuned["b"])
    assert_trees_close(cljax.decompress_low_rank(BASE, packed), tuned, rtol=1e-4, atol=1e-4)
    # Sigma^(1/2) on both sides: column norms of left equal row norms of right.
    np.testing.assert_allclose(
        np.linalg.norm(packed["w"].left, axis=0),
        np.linalg.norm(packed["w"].right, axis=1),
        rtol=1e-5,
    )


def test_error_is_eckart_young_and_non_increasing_in_rank():
    tuned = _tuned()
    delta = np.asarray(tuned["w"] - BASE["w"], np.float64)
    s = _sigma(delta)
    errors = []
    for r in range(0, 7):
        packed = cljax.compress_low_rank(tuned, BASE, rank=r)
        approx = np.asarray(cljax.decompress_low_rank(BASE, packed)["w"], np.float64) - np.asarray(
            BASE["w"]
        )
        err = np.sum((delta - approx) ** 2)
        np.testing.assert_allclose(err, np.sum(s[r:] ** 2), rtol=1e-4, atol=1e-4)
        errors.append(err)
        stored = sum(x.size for x in jax.tree.leaves(packed["w"]))
        assert stored == r * (9 + 6)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))


def test_energy_policy_picks_the_smallest_rank_reaching_the_threshold():
    tuned = _tuned()
    for energy in (0.5, 0.9, 0.99, 1.0):
        packed = cljax.compress_low_rank(tuned, BASE, energy=energy)
        s = _sigma(tuned["w"] - BASE["w"])
        frac = np.cumsum(s**2) / np.sum(s**2)
        assert packed["w"].left.shape[-1] == int(np.argmax(frac >= energy - 1e-7) + 1)
        for i in range(2):
            s_i = _sigma(tuned["k"][i] - BASE["k"][i])
            frac_i = np.cumsum(s_i**2) / np.sum(s_i**2)
            r_i = int(np.argmax(frac_i >= energy - 1e-7) + 1)
            kept = np.sum(np.any(np.asarray(packed["k"].left[i]) != 0, axis=0))
            assert kept == r_i  # the stack stores the largest rank; the rest is zero padding
    zero = cljax.compress_low_rank(BASE, BASE, energy=0.9)
    assert zero["w"].left.shape == (9, 0)


def test_effective_rank_policy_and_metric():
    tuned = _tuned()
    packed = cljax.compress_low_rank(tuned, BASE, by_effective_rank=True)
    s = _sigma(tuned["w"] - BASE["w"])
    p = s / s.sum()
    assert packed["w"].left.shape[-1] == int(np.ceil(np.exp(-np.sum(p * np.log(p)))))
    np.testing.assert_allclose(
        cljax.effective_rank(jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3))), 1.0, rtol=1e-5
    )
    np.testing.assert_allclose(cljax.effective_rank(2.5 * jnp.eye(5)), 5.0, rtol=1e-5)
    assert float(cljax.effective_rank(jnp.zeros((3, 3)))) == 0.0
    assert cljax.effective_rank(jnp.ones((4, 3, 2))).shape == (4,)


def test_budget_policy_is_greedy_by_energy():
    tuned = _tuned()
    budget = 6 * (9 + 6) // 2 + 3 * (5 + 7)
    packed = cljax.compress_low_rank(tuned, BASE, budget=budget)
    items = [(v**2, 15, "w") for v in _sigma(tuned["w"] - BASE["w"])]
    for i in range(2):
        items += [(v**2, 12, f"k{i}") for v in _sigma(tuned["k"][i] - BASE["k"][i])]
    items.sort(key=lambda t: -t[0])
    spent, taken = 0, {"w": 0, "k0": 0, "k1": 0}
    for _, cost, name in items:
        if spent + cost > budget:
            break
        spent += cost
        taken[name] += 1
    assert packed["w"].left.shape[-1] == taken["w"]
    kept = [int(np.sum(np.any(np.asarray(packed["k"].left[i]) != 0, axis=0))) for i in range(2)]
    assert kept == [taken["k0"], taken["k1"]]
    stored = taken["w"] * 15 + (taken["k0"] + taken["k1"]) * 12
    assert stored <= budget


def test_encode_decode_is_idempotent_at_fixed_rank():
    tuned = _tuned()
    once = cljax.decompress_low_rank(BASE, cljax.compress_low_rank(tuned, BASE, rank=3))
    twice = cljax.decompress_low_rank(BASE, cljax.compress_low_rank(once, BASE, rank=3))
    assert_trees_close(twice, once, rtol=1e-4, atol=1e-4)


def test_timber():
    base = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5)}
    s = np.array([5.0, 1.0, 0.5, 0.2, 0.1])
    u, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (6, 5))))
    v, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(1), (5, 5))))
    instruct = {"w": jnp.asarray((u * s) @ v.T, jnp.float32), "b": jnp.ones(5)}
    p = s / s.sum()
    k = int(np.ceil(np.exp(-np.sum(p * np.log(p)))))
    for gamma in (0.0, 0.2, 1.0):
        out = cljax.timber(instruct, base, gamma=gamma)
        want = (u * np.where(np.arange(5) < k, s, gamma * s)) @ v.T
        np.testing.assert_allclose(out["w"], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["b"], instruct["b"])
    truncated = cljax.timber(instruct, base, gamma=0.0)["w"]
    assert np.linalg.matrix_rank(np.asarray(truncated), tol=1e-4) == k
    assert_trees_close(cljax.timber(instruct, base, gamma=1.0), instruct, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def _np_quantize(x, bits, axis):
    """Reference symmetric absmax quantizer (float64): codes and per-component scales."""
    x = np.asarray(x, np.float64)
    levels = 2 ** (bits - 1) - 1
    absmax = np.max(np.abs(x), axis=axis)
    scale = np.where(absmax > 0, absmax / levels, 1.0)
    codes = np.clip(np.round(x / np.expand_dims(scale, axis)), -levels, levels)
    return codes, scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_factors_match_a_numpy_quantizer_and_bound_the_error(bits):
    tuned = _tuned()
    plain = cljax.compress_low_rank(tuned, BASE, rank=3)
    packed = cljax.compress_low_rank(tuned, BASE, rank=3, bits=bits)
    out = cljax.decompress_low_rank(BASE, packed)
    np.testing.assert_array_equal(out["b"], tuned["b"])  # vectors stay exact
    for k in ("w", "k"):
        q = packed[k]
        assert q.left.dtype == jnp.int8 and q.right.dtype == jnp.int8 and q.bits == bits
        lc, ls = _np_quantize(plain[k].left, bits, axis=-2)
        rc, rs = _np_quantize(plain[k].right, bits, axis=-1)
        np.testing.assert_allclose(q.left_scale, ls, rtol=1e-6)
        np.testing.assert_allclose(q.right_scale, rs, rtol=1e-6)
        for got, want in ((q.left, lc), (q.right, rc)):  # a rounding tie may go either way
            assert np.max(np.abs(np.asarray(got) - want)) <= 1
            assert np.mean(np.asarray(got) == want) > 0.99
        # Entry-wise error at most half a step; the product error by the triangle inequality.
        left, right = _np(plain[k].left), _np(plain[k].right)
        left_q = np.asarray(q.left, np.float64) * _np(q.left_scale)[..., None, :]
        right_q = np.asarray(q.right, np.float64) * _np(q.right_scale)[..., :, None]
        assert np.all(np.abs(left - left_q) <= 0.5 * _np(q.left_scale)[..., None, :] * (1 + 1e-6))
        assert np.all(
            np.abs(right - right_q) <= 0.5 * _np(q.right_scale)[..., :, None] * (1 + 1e-6)
        )
        delta = (_np(tuned[k]) - _np(BASE[k])).reshape(-1, *tuned[k].shape[-2:])
        left, right = left.reshape(-1, *left.shape[-2:]), right.reshape(-1, *right.shape[-2:])
        left_q, right_q = left_q.reshape(left.shape), right_q.reshape(right.shape)
        decoded = (_np(out[k]) - _np(BASE[k])).reshape(delta.shape)
        for j in range(delta.shape[0]):
            truncation = np.sqrt(np.sum(_sigma(delta[j])[3:] ** 2))
            fro = np.linalg.norm
            bound = (
                truncation
                + fro(left[j] - left_q[j]) * fro(right[j])
                + fro(left_q[j]) * fro(right[j] - right_q[j])
            )
            assert fro(delta[j] - decoded[j]) <= bound * (1 + 1e-5) + 1e-5
            np.testing.assert_allclose(decoded[j], left_q[j] @ right_q[j], rtol=1e-5, atol=1e-5)


def test_more_bits_give_a_smaller_error_and_zero_deltas_stay_exact():
    tuned = _tuned()
    errors = []
    for bits in (2, 4, 8, None):
        out = cljax.decompress_low_rank(
            BASE, cljax.compress_low_rank(tuned, BASE, rank=4, bits=bits)
        )
        errors.append(sum(float(jnp.sum((out[k] - tuned[k]) ** 2)) for k in ("w", "k")))
    assert errors[0] > errors[1] > errors[2] > errors[3] * (1 - 1e-6)
    same = cljax.decompress_low_rank(BASE, cljax.compress_low_rank(BASE, BASE, rank=2, bits=3))
    assert_trees_close(same, BASE, rtol=0, atol=0)


def test_storage_bytes_formula():
    tuned = _tuned()
    # rank 2, 4 bits: w (9, 6): ceil(2·15·4/8) = 15 code bytes + 2·2 scales · 4 = 16 -> 31;
    # k (2, 5, 7): 2·2·12 = 48 codes -> 24 bytes + 2·2·2 scales · 4 = 32 -> 56; b: 6 · 4 = 24.
    packed = cljax.compress_low_rank(tuned, BASE, rank=2, bits=4)
    assert cljax.low_rank_storage_bytes(packed) == 31 + 56 + 24
    # float32 factors: (2·15 + 48) · 4 + 24.
    plain = cljax.compress_low_rank(tuned, BASE, rank=2)
    assert cljax.low_rank_storage_bytes(plain) == (30 + 48) * 4 + 24
    stored = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(plain))
    assert cljax.low_rank_storage_bytes(plain) == stored


def test_lorc_compensates_quantization_error():
    w = {"w": jax.random.normal(jax.random.key(4), (12, 8))}
    q = jax.tree.map(lambda x: jnp.round(x * 2) / 2, w)
    errors = []
    for r in (1, 4, 8):
        fixed = cljax.decompress_low_rank(q, cljax.lorc_compensate(w, q, rank=r))
        errors.append(float(jnp.sum((fixed["w"] - w["w"]) ** 2)))
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < 1e-8
    same = cljax.decompress_low_rank(w, cljax.lorc_compensate(w, w, rank=2))
    np.testing.assert_allclose(same["w"], w["w"], atol=1e-6)


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), rank=st.integers(0, 7), seed=st.integers(0, 1000))
def test_compression_shapes_and_error_property(m, n, rank, seed):
    base = {"w": jnp.zeros((m, n))}
    tuned = {"w": jax.random.normal(jax.random.key(seed), (m, n))}
    packed = cljax.compress_low_rank(tuned, base, rank=rank)
    r = min(rank, m, n)
    assert packed["w"].left.shape == (m, r) and packed["w"].right.shape == (r, n)
    out = cljax.decompress_low_rank(base, packed)["w"]
    s = _sigma(tuned["w"])
    np.testing.assert_allclose(
        np.sum((np.asarray(out) - np.asarray(tuned["w"])) ** 2),
        np.sum(s[r:] ** 2),
        rtol=1e-3,
        atol=1e-4,
    )


def test_errors():
    with pytest.raises(
        ValueError, match=r"compress_low_rank: pass exactly one of rank=, energy=, budget="
    ):
        cljax.compress_low_rank(BASE, BASE)
    with pytest.raises(ValueError, match=r"compress_low_rank: pass exactly one of"):
        cljax.compress_low_rank(BASE, BASE, rank=1, energy=0.5)
    with pytest.raises(ValueError, match=r"compress_low_rank\(energy=...\) must be in"):
        cljax.compress_low_rank(BASE, BASE, energy=1.5)
    with pytest.raises(ValueError, match=r"compress_low_rank\(budget=...\) must be >= 0"):
        cljax.compress_low_rank(BASE, BASE, budget=-1)
    with pytest.raises(ValueError, match=r"compress_low_rank\(rank=...\) must be >= 0"):
        cljax.compress_low_rank(BASE, BASE, rank=-1)
    with pytest.raises(ValueError, match=r"compress_low_rank\(bits=...\) must be >= 2"):
        cljax.compress_low_rank(BASE, BASE, rank=1, bits=1)
    with pytest.raises(ValueError, match=r"compress_low_rank\(bits=...\) must be in \[2, 8\]"):
        cljax.compress_low_rank(BASE, BASE, rank=1, bits=9)
    with pytest.raises(
        ValueError, match=r"compress_low_rank: leaf 'b' has shape \(5,\) in `base` but \(6,\)"
    ):
        cljax.compress_low_rank(BASE, {**BASE, "b": jnp.zeros(5)}, rank=1)
    with pytest.raises(
        TypeError, match=r"compress_low_rank\(matrix_spec=...\) must be a MatrixSpec"
    ):
        cljax.compress_low_rank(BASE, BASE, rank=1, matrix_spec=1)
    with pytest.raises(TypeError, match=r"compress_low_rank\(targets=...\) must be a function"):
        cljax.compress_low_rank(BASE, BASE, rank=1, targets={"w": True})
    with pytest.raises(
        ValueError,
        match=r"compress_low_rank: leaf 'b' has shape \(6,\); a compressed leaf needs two or more dims",
    ):
        cljax.compress_low_rank(
            BASE, BASE, rank=1, targets=lambda p: {"w": True, "k": True, "b": True}
        )
    with pytest.raises(
        ValueError, match=r"decompress_low_rank: `compressed` must have the structure of `base`"
    ):
        cljax.decompress_low_rank(BASE, {"w": 1})
    with pytest.raises(
        ValueError,
        match=r"decompress_low_rank: leaf 'b' has residual shape \(3,\) but base shape \(6,\)",
    ):
        cljax.decompress_low_rank(
            BASE, {**cljax.compress_low_rank(BASE, BASE, rank=1), "b": jnp.zeros(3)}
        )
    with pytest.raises(
        ValueError, match=r"effective_rank: `matrix` has shape \(3,\); it needs at least two dims"
    ):
        cljax.effective_rank(jnp.ones(3))
    with pytest.raises(ValueError, match=r"timber\(gamma=...\) must be in"):
        cljax.timber(BASE, BASE, gamma=2.0)
    with pytest.raises(ValueError, match=r"lorc_compensate\(rank=...\) must be >= 1"):
        cljax.lorc_compensate(BASE, BASE, rank=0)
