"""Tests for the closed-form edits of OR-20 (MEMIT, EMMET / ROME), in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cljax


def problem(rng, d_in=6, d_out=4, b=3):
    kernel = rng.standard_normal((d_in, d_out))
    keys = rng.standard_normal((b, d_in))
    values = rng.standard_normal((b, d_out))
    x = rng.standard_normal((50, d_in))
    c0 = x.T @ x / 50
    return kernel, keys, values, c0


def np_memit(k, kr, v, c):
    return np.linalg.solve(c + kr.T @ kr, kr.T @ (v - kr @ k))


def np_emmet(k, kr, v, c, eps):
    ci = np.linalg.inv(c)
    d = kr @ ci @ kr.T + (eps * np.eye(len(kr)) if len(kr) > 1 else 0.0)
    return ci @ kr.T @ np.linalg.solve(d, v - kr @ k)


def test_match_numpy_float64_and_emmet_is_exact():
    rng = np.random.default_rng(0)
    k, kr, v, c0 = problem(rng)
    with jax.enable_x64(True):
        memit = np.asarray(cljax.memit_delta(k, kr, v, c0, cov_scale=3.0, ridge=0.1))
        emmet = np.asarray(cljax.emmet_delta(k, kr, v, c0, cov_scale=3.0, ridge=0.1, eps=0.0))
        emmet_reg = np.asarray(cljax.emmet_delta(k, kr, v, c0, cov_scale=3.0, eps=0.1))
    c = 3.0 * c0 + 0.1 * np.eye(6)
    np.testing.assert_allclose(memit, np_memit(k, kr, v, c), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(emmet, np_emmet(k, kr, v, c, 0.0), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(emmet_reg, np_emmet(k, kr, v, 3.0 * c0, 0.1), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(kr @ (k + emmet), v, atol=1e-8)  # the edits are memorised exactly
    # Among all dK with keys dK = R, EMMET's minimises tr(dK^T C dK).
    null = np.linalg.svd(kr)[2][3:].T  # (d_in, d_in - B): keys @ null = 0
    cost = lambda d: np.trace(d.T @ c @ d)
    for _ in range(5):
        other = emmet + null @ rng.standard_normal((3, 4))
        np.testing.assert_allclose(kr @ other, kr @ emmet, atol=1e-10)
        assert cost(other) >= cost(emmet) - 1e-10


def test_memit_equals_emmet_with_unit_eps_and_rome_special_case():
    rng = np.random.default_rng(1)
    k, kr, v, c0 = problem(rng)
    with jax.enable_x64(True):
        a = np.asarray(cljax.memit_delta(k, kr, v, c0, cov_scale=2.0))
        b = np.asarray(cljax.emmet_delta(k, kr, v, c0, cov_scale=2.0, eps=1.0))
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)  # push-through identity
        one = np.asarray(cljax.emmet_delta(k, kr[:1], v[:1], np.eye(6)))
    r = v[0] - kr[0] @ k
    np.testing.assert_allclose(one, np.outer(kr[0], r) / (kr[0] @ kr[0]), rtol=1e-9, atol=1e-12)


def test_zero_residual_float32_and_singular_covariance():
    rng = np.random.default_rng(2)
    k, kr, _, _ = problem(rng)
    zero = cljax.emmet_delta(jnp.asarray(k, jnp.float32), kr, kr @ k, np.eye(6))
    np.testing.assert_allclose(zero, 0.0, atol=1e-5)
    assert zero.dtype == jnp.float32
    # A rank-deficient C0 with no ridge: the pseudo-inverse keeps everything finite.
    x = rng.standard_normal((2, 6))
    singular = x.T @ x
    out = cljax.memit_delta(jnp.asarray(k, jnp.float32), kr[:1], np.ones((1, 4)), singular)
    assert np.all(np.isfinite(np.asarray(out)))
    out = cljax.emmet_delta(jnp.asarray(k, jnp.float32), kr[:1], np.ones((1, 4)), singular)
    assert np.all(np.isfinite(np.asarray(out)))
    f32 = cljax.memit_delta(jnp.asarray(k, jnp.float32), kr, np.ones((3, 4)), np.eye(6))
    want = np_memit(k, kr, np.ones((3, 4)), np.eye(6))
    np.testing.assert_allclose(f32, want, rtol=1e-4, atol=1e-5)


def test_errors():
    k, kr, v, c0 = problem(np.random.default_rng(3))
    with pytest.raises(
        ValueError, match=r"memit_delta: `kernel` has shape \(6,\); it must be \(d_in, d_out\)"
    ):
        cljax.memit_delta(k[:, 0], kr, v, c0)
    with pytest.raises(
        ValueError, match=r"memit_delta: `keys` has shape \(3, 5\); it must be \(B, 6\)"
    ):
        cljax.memit_delta(k, kr[:, :5], v, c0)
    with pytest.raises(
        ValueError, match=r"emmet_delta: `values` has shape \(3, 3\); it must be \(3, 4\)"
    ):
        cljax.emmet_delta(k, kr, v[:, :3], c0)
    with pytest.raises(ValueError, match=r"emmet_delta: `key_second_moment` has shape \(5, 5\)"):
        cljax.emmet_delta(k, kr, v, c0[:5, :5])
    with pytest.raises(ValueError, match=r"emmet_delta\(eps=...\) must be in"):
        cljax.emmet_delta(k, kr, v, c0, eps=-1.0)
    with pytest.raises(ValueError, match=r"memit_delta\(cov_scale=...\) must be in"):
        cljax.memit_delta(k, kr, v, c0, cov_scale=-1.0)
    with pytest.raises(ValueError, match=r"memit_delta\(ridge=...\) must be in"):
        cljax.memit_delta(k, kr, v, c0, ridge=-1.0)
