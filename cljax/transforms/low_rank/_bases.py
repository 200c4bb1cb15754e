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


def _rayleigh_ritz(a: jax.Array, y: jax.Array, r: int) -> jax.Array:
    """Rotates the orthonormal range basis `y` of `a` to its top-`r` singular directions."""
    b = y.T @ a  # (l, k)
    u_b, _, _ = svd_factors(b, r)
    return y @ u_b


def randomized_basis(
    a: jax.Array, r: int, key: jax.Array, *, oversample: int, power_iters: int
) -> jax.Array:
    """Top-`r` left singular vectors of ``a`` (``(d, k)``) by a randomized range finder.

    Sketch ``Y = a Ω`` with ``r + oversample`` Gaussian columns, `power_iters` rounds of
    ``Y ← orth(a orth(aᵀ Y))``, then a Rayleigh–Ritz step on the small ``Yᵀ a``.
    """
    d, k = a.shape
    width = min(r + oversample, d, k)
    if width >= min(d, k):  # the sketch would be as large as the matrix: decompose it exactly
        return svd_basis(a, r, left=True)
    omega = jax.random.normal(key, (k, width), jnp.float32)
    y = _orthonormal(a @ omega)
    for _ in range(power_iters):
        y = _orthonormal(a @ _orthonormal(a.T @ y))
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
    return _rayleigh_ritz(a, y, r)


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
