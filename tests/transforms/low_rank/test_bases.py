"""The randomized range finder and its building blocks against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.transforms.low_rank import _bases

R, OVERSAMPLE = 6, 4


def _np_top_left(a: np.ndarray, r: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u[:, :r]


def _np_subspace_error(basis, reference) -> float:
    basis, reference = np.asarray(basis, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(reference - basis @ (basis.T @ reference), 2))


def _with_spectrum(seed: int, d: int, k: int, s: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((k, len(s))))
    return ((u * s) @ v.T).astype(np.float32)


def _steep_gapped(seed: int, d: int = 40, k: int = 90, decay: float = 1e-3) -> np.ndarray:
    """Top-`R` singular values from 1 down to `decay`, then a gap of 0.3 and a tail."""
    m = min(d, k)
    s = np.concatenate([np.geomspace(1.0, decay, R), 0.3 * decay * np.geomspace(1.0, 1e-2, m - R)])
    return _with_spectrum(seed, d, k, s)


_randomized = jax.jit(
    lambda a, key, q: _bases.randomized_basis(a, R, key, oversample=OVERSAMPLE, power_iters=q),
    static_argnums=2,
)


def _orthonormality_error(b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(b.T @ b - np.eye(b.shape[1]))))


# ---------------------------------------------------------------------------------------------
# Building blocks.


def test_rademacher_entries_are_signs_and_a_pure_function_of_the_key():
    om = _bases._rademacher(jax.random.key(0), 500, 40)  # 40 columns: two words per row
    assert om.shape == (500, 40) and om.dtype == jnp.float32
    assert set(np.unique(np.asarray(om)).tolist()) == {-1.0, 1.0}
    assert abs(float(jnp.mean(om))) < 0.02  # 20,000 fair signs: 4.5 standard deviations
    # Columns are uncorrelated: the Gram is close to 500·I.
    gram = np.asarray(om.T @ om) / 500.0
    assert np.max(np.abs(gram - np.eye(40))) < 0.25
    np.testing.assert_array_equal(om, _bases._rademacher(jax.random.key(0), 500, 40))
    assert not np.array_equal(om, _bases._rademacher(jax.random.key(1), 500, 40))


@pytest.mark.parametrize("rank", [5, 2, 0])
def test_lu_normalized_keeps_the_column_space_and_stays_bounded(rank):
    rng = np.random.default_rng(rank)
    y = (rng.standard_normal((30, rank)) @ rng.standard_normal((rank, 5))).astype(np.float32)
    low = np.asarray(_bases._lu_normalized(jnp.asarray(y)), np.float64)
    assert low.shape == (30, 5) and np.all(np.isfinite(low))
    assert np.max(np.abs(low)) <= 1.0 + 1e-6  # partial pivoting
    if rank:  # y lies in the span of the normalised columns
        q, _ = np.linalg.qr(low)
        np.testing.assert_allclose(q @ (q.T @ y), y, atol=1e-4)


def test_cholesky_qr2_factor_matches_numpy_on_an_ill_conditioned_matrix():
    s = np.geomspace(1.0, 1e-4, 8)  # condition 1e4: a plain Gram (1e8) is past float32
    z = _with_spectrum(0, 200, 8, s)  # (200, 8)
    r = np.asarray(_bases._cholesky_qr2_r(jnp.asarray(z)), np.float64)
    assert np.allclose(r, np.triu(r))
    _, s_np, vt_np = np.linalg.svd(np.asarray(z, np.float64), full_matrices=False)
    _, s_r, vt_r = np.linalg.svd(r)
    np.testing.assert_allclose(s_r, s_np, rtol=1e-3)
    # The right singular vectors of z are those of R: the top four agree closely.
    assert _np_subspace_error(vt_r[:4].T, vt_np[:4].T) < 1e-3


def test_cholesky_qr2_factor_is_finite_for_zero_and_rank_deficient_input():
    rng = np.random.default_rng(1)
    low_rank = (rng.standard_normal((50, 2)) @ rng.standard_normal((2, 6))).astype(np.float32)
    for z in (np.zeros((50, 6), np.float32), low_rank):
        r = np.asarray(_bases._cholesky_qr2_r(jnp.asarray(z)))
        assert np.all(np.isfinite(r))
    r = np.asarray(_bases._cholesky_qr2_r(jnp.asarray(low_rank)), np.float64)
    np.testing.assert_allclose(
        np.linalg.svd(r, compute_uv=False)[:2],
        np.linalg.svd(low_rank.astype(np.float64), compute_uv=False)[:2],
        rtol=1e-3,
    )


# ---------------------------------------------------------------------------------------------
# The range finder against the exact float64 SVD.


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
@pytest.mark.parametrize("decay", [1e-1, 1e-3])
def test_randomized_basis_is_within_the_stated_subspace_error(shape, decay):
    """Stated accuracy on gapped spectra (gap 0.3 after r, oversample 4): power_iters=1 within
    0.05, power_iters=2 within 5e-3; steep top spectra (1e-3) included, which a plain Gram
    (squared condition number) would get wrong."""
    a = _steep_gapped(3, *shape, decay=decay)
    exact = _np_top_left(a, R)
    for q, bound in ((1, 5e-2), (2, 5e-3)):
        basis = _randomized(jnp.asarray(a), jax.random.key(2), q)
        assert basis.shape == (shape[0], R) and basis.dtype == jnp.float32
        assert _orthonormality_error(basis) < 1e-5
        assert _np_subspace_error(basis, exact) < bound, (q, decay)


def test_randomized_basis_resolves_a_spectrum_a_plain_gram_cannot():
    """Top 24 singular values from 1 to 1e-4 (squared: 1e-8, below float32 resolution), gap 0.3:
    the Rayleigh–Ritz step through Cholesky-QR2 stays within 1e-2 of the exact subspace, where
    eigenvectors of the plain ``B Bᵀ`` are off by more than 0.5 on this matrix."""
    r = 24
    s = np.concatenate([np.geomspace(1.0, 1e-4, r), 3e-5 * np.geomspace(1.0, 1e-2, 200 - r)])
    a = _with_spectrum(11, 200, 600, s)
    basis = jax.jit(lambda a, key: _bases.randomized_basis(a, r, key, oversample=8, power_iters=2))(
        jnp.asarray(a), jax.random.key(1)
    )
    assert _orthonormality_error(basis) < 1e-5
    assert _np_subspace_error(basis, _np_top_left(a, r)) < 1e-2


def test_randomized_basis_energy_on_a_spectrum_without_gap():
    """On a Gaussian matrix (no gap) the captured energy ``‖Bᵀ A‖²_F / ‖U_rᵀ A‖²_F`` is at least
    0.9 with two power iterations, and more iterations never lose energy here."""
    a = np.random.default_rng(5).standard_normal((40, 90)).astype(np.float32)
    a64 = a.astype(np.float64)
    best = np.sum((_np_top_left(a, R).T @ a64) ** 2)
    energy = [
        np.sum(
            (np.asarray(_randomized(jnp.asarray(a), jax.random.key(4), q), np.float64).T @ a64) ** 2
        )
        / best
        for q in (0, 1, 2)
    ]
    assert energy[0] <= energy[1] + 1e-6 <= energy[2] + 2e-6
    assert 0.9 <= energy[2] <= 1.0 + 1e-6


def test_randomized_basis_zero_matrix_gives_an_orthonormal_basis():
    for q in (0, 2):
        basis = _randomized(jnp.zeros((30, 70), jnp.float32), jax.random.key(0), q)
        assert np.all(np.isfinite(np.asarray(basis)))
        assert _orthonormality_error(basis) < 1e-5


def test_randomized_basis_rank_deficient_matrix_contains_its_range():
    """Rank 3 < r: the basis is orthonormal and spans the whole range of the matrix."""
    rng = np.random.default_rng(6)
    a = (rng.standard_normal((30, 3)) @ rng.standard_normal((3, 70))).astype(np.float32)
    for q in (0, 2):
        basis = _randomized(jnp.asarray(a), jax.random.key(1), q)
        assert _orthonormality_error(basis) < 1e-5
        assert _np_subspace_error(basis, _np_top_left(a, 3)) < 1e-4


def test_randomized_basis_bf16_input_is_computed_in_float32():
    a = _steep_gapped(8, decay=1e-1)
    a16 = jnp.asarray(a).astype(jnp.bfloat16)
    basis = _randomized(a16, jax.random.key(3), 2)
    assert basis.dtype == jnp.float32
    assert _orthonormality_error(basis) < 1e-5
    np.testing.assert_allclose(
        basis, _randomized(a16.astype(jnp.float32), jax.random.key(3), 2), atol=1e-6
    )
    exact = _np_top_left(np.asarray(a16.astype(jnp.float32)), R)
    assert _np_subspace_error(basis, exact) < 5e-3


def test_subspace_iteration_matches_the_float64_reference_on_a_steep_spectrum():
    a = _steep_gapped(9, decay=1e-3)
    exact = _np_top_left(a, R)
    start = jnp.asarray(
        np.linalg.qr(np.random.default_rng(0).standard_normal((40, R)))[0], jnp.float32
    )
    basis = jnp.asarray(start)
    for _ in range(12):
        basis = _bases.subspace_iteration_basis(jnp.asarray(a), basis, power_iters=1)
    assert _orthonormality_error(basis) < 1e-5
    assert _np_subspace_error(basis, exact) < 1e-2


@settings(deadline=None, max_examples=10)
@given(
    d=st.integers(1, 10),
    k=st.integers(1, 10),
    r=st.integers(1, 10),
    oversample=st.integers(0, 3),
    power_iters=st.integers(0, 2),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
)
def test_randomized_basis_is_finite_and_orthonormal_for_any_shape_and_scale(
    d, k, r, oversample, power_iters, scale
):
    r = min(r, d, k)
    a = jax.random.normal(jax.random.key(d * 11 + k), (d, k)) * scale
    basis = _bases.randomized_basis(
        a, r, jax.random.key(0), oversample=oversample, power_iters=power_iters
    )
    assert basis.shape == (d, r) and basis.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(basis)))
    assert _orthonormality_error(basis) < 1e-5
