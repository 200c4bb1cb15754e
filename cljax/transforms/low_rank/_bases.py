"""Orthonormal bases for low-rank projections (private): exact, randomized, warm-started, random.

Every builder works on one float32 matrix and returns a ``(d, r)`` basis with orthonormal
columns; callers `vmap` them over stacked matrices inside a `lax.cond`, never the other way
round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def svd_factors(g: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-`r` singular triplets ``(U_r, s_r, V_r)`` of an ``(m, n)`` matrix.

    The SVD runs on the tall orientation (``g`` when ``m >= n``, else ``g.T``), which is several
    times faster for wide matrices and spans the same subspaces.
    """
    m, n = g.shape
    if m >= n:
        u, s, vh = jnp.linalg.svd(g, full_matrices=False)
        return u[:, :r], s[:r], vh[:r].T
    u, s, vh = jnp.linalg.svd(g.T, full_matrices=False)
    return vh[:r].T, s[:r], u[:, :r]


def svd_basis(g: jax.Array, r: int, left: bool) -> jax.Array:
    """Top-`r` left (``(m, r)``) or right (``(n, r)``) singular vectors of `g`."""
    u, _, v = svd_factors(g, r)
    return u if left else v


def _orthonormal(y: jax.Array) -> jax.Array:
    q, _ = jnp.linalg.qr(y)
    return q


def _lu_normalized(y: jax.Array) -> jax.Array:
    """The unit lower-triangular factor of ``y = P L U`` with its rows put back: ``y U⁻¹``.

    Keeps the column space of a full-rank `y` and conditions it like a QR would, at a fraction of
    the cost of a Householder QR (the normaliser of Li et al. 2017 between power iterations).
    Always finite, also for zero or rank-deficient `y`: ``L`` has a unit diagonal and, with
    partial pivoting, entries of magnitude at most 1.
    """
    lu, _, perm = jax.lax.linalg.lu(y)
    rows, cols = y.shape
    low = jnp.tril(lu[:, :cols], -1) + jnp.eye(rows, cols, dtype=y.dtype)
    return low[jnp.argsort(perm)]


def _cholesky_qr2_r(z: jax.Array) -> jax.Array:
    """The ``(l, l)`` triangular factor ``R`` of ``z = Q R`` by shifted Cholesky-QR, twice.

    Each pass factors the small Gram ``ZᵀZ + s I = C Cᵀ`` and replaces ``Z`` by ``Z C⁻ᵀ``; the
    shift ``s = l · eps · tr(ZᵀZ)`` (plus the smallest normal float) keeps the Cholesky defined for
    ill-conditioned, rank-deficient and zero `z`, and the second pass restores the orthogonality
    the first one lost (Fukaya et al. 2020), so that the singular vectors of ``R`` are those of
    `z` to working accuracy, not to the squared condition number a plain Gram would give.
    """
    width = z.shape[1]
    eye = jnp.eye(width, dtype=z.dtype)
    eps, tiny = jnp.finfo(z.dtype).eps, jnp.finfo(z.dtype).tiny
    r = eye
    for _ in range(2):
        gram = z.T @ z
        shift = width * eps * jnp.trace(gram) + tiny
        c = jnp.linalg.cholesky(gram + shift * eye)  # lower: gram + s I = C Cᵀ
        c_inv = jax.scipy.linalg.solve_triangular(c, eye, lower=True)
        z = z @ c_inv.T  # one (k, l) × (l, l) matmul instead of a long triangular solve
        r = c.T @ r
    return r


def _rotate_to_top(a: jax.Array, q: jax.Array, r: int) -> jax.Array:
    """Rayleigh–Ritz: rotates the orthonormal range basis `q` of `a` to its top-`r` directions.

    The left singular vectors of the small ``B = qᵀ a`` (``(l, k)``) are those of ``Rᵀ`` for the
    Cholesky-QR2 factor ``Bᵀ = Q_B R``: no QR or SVD of the long ``(k, l)`` matrix.
    """
    z = a.T @ q
    z = z / jnp.maximum(jnp.max(jnp.abs(z)), jnp.finfo(z.dtype).tiny)  # no overflow in the Gram
    u_r, _, _ = jnp.linalg.svd(_cholesky_qr2_r(z).T)
    return q @ u_r[:, :r]


def _rayleigh_ritz(a: jax.Array, y: jax.Array, r: int) -> jax.Array:
    """Rotates the range basis `y` of `a` (orthonormalised here) to its top-`r` singular directions."""
    return _rotate_to_top(a, _orthonormal(y), r)


def _rademacher(key: jax.Array, rows: int, cols: int) -> jax.Array:
    """A ``(rows, cols)`` float32 matrix of independent ±1 entries, 32 of them per random word."""
    words = -(-cols // 32)
    bits = jax.random.bits(key, (rows, words), jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)[None, None, :]
    signs = ((bits[:, :, None] >> shifts) & jnp.uint32(1)).reshape(rows, words * 32)[:, :cols]
    return 1.0 - 2.0 * signs.astype(jnp.float32)


def randomized_basis(
    a: jax.Array, r: int, key: jax.Array, *, oversample: int, power_iters: int
) -> jax.Array:
    """Top-`r` left singular vectors of ``a`` (``(d, k)``) by a randomized range finder.

    Halko, Martinsson and Tropp (2011), Algorithms 4.4 and 5.1, with ``l = r + oversample``:
    sketch ``Y = a Ω`` with a Rademacher test matrix ``Ω`` (``(k, l)``, 32 signs per random word;
    a Gaussian one costs more than the sketch itself for long `k`), `power_iters` rounds of
    ``Y ← a N(aᵀ N(Y))`` with the LU normaliser ``N`` between the products (Li et al. 2017), a
    Householder QR of the last ``Y``, and a Rayleigh–Ritz step on ``B = Qᵀ a`` through the
    Cholesky-QR2 factor of ``Bᵀ`` and the SVD of an ``(l, l)`` matrix. Every product is with
    `a` or `aᵀ` (``2 · power_iters + 2`` passes over `a`); no QR or SVD of a ``(k, l)`` matrix.
    The columns of the result are orthonormal for every finite `a` (zero and rank-deficient
    ones included): they are a Householder ``Q`` times an orthogonal ``(l, l)`` rotation.

    References:
        Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
        Li, Linderman, Szlam, Stanton, Kluger, Tygert, "Algorithm 971: An implementation of a
        randomized algorithm for principal component analysis", ACM TOMS 2017.
        Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa, "Shifted Cholesky QR for computing the
        QR factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 2020.
    """
    a = a.astype(jnp.float32)
    d, k = a.shape
    width = min(r + oversample, d, k)
    if width >= min(d, k):  # the sketch would be as large as the matrix: decompose it exactly
        return svd_basis(a, r, left=True)
    y = a @ _rademacher(key, k, width)
    for _ in range(power_iters):
        y = a @ _lu_normalized(a.T @ _lu_normalized(y))
    return _rayleigh_ritz(a, y, r)


def subspace_iteration_basis(a: jax.Array, previous: jax.Array, *, power_iters: int) -> jax.Array:
    """Refines the ``(d, r)`` basis `previous` towards the top-`r` left singular subspace of `a`.

    `power_iters` rounds of ``Y ← orth(a aᵀ Y)`` started from `previous`, then a Rayleigh–Ritz
    step, so that the columns come out ordered by singular value like an SVD basis.
    """
    r = previous.shape[1]
    y = previous
    for _ in range(max(power_iters, 1)):
        y = _orthonormal(a @ (a.T @ y))
    return _rotate_to_top(a, y, r)


def random_basis(key: jax.Array, d: int, r: int) -> jax.Array:
    """A random ``(d, r)`` orthonormal basis (QR of a Gaussian matrix), a pure function of `key`."""
    return _orthonormal(jax.random.normal(key, (d, r), jnp.float32))


def subspace_error(basis: jax.Array, reference: jax.Array) -> jax.Array:
    """Sine of the largest principal angle between two orthonormal bases' column spaces.

    ``‖(I − B Bᵀ) R‖₂``: 0 for the same subspace, 1 when some direction of `reference` is
    orthogonal to `basis`.
    """
    residual = reference - basis @ (basis.T @ reference)
    return jnp.linalg.norm(residual, ord=2)
