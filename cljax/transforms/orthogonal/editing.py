"""Closed-form preservation–memorization edits of a linear layer: MEMIT and EMMET / ROME (OR-20).

A Flax dense layer ``y = x K`` with kernel ``K`` ``(d_in, d_out)`` receives new key -> value
associations (rows of `keys` ``(B, d_in)`` -> rows of `values` ``(B, d_out)``) while keeping its
outputs on generic inputs, whose uncentred second moment ``C0 = E[x x^T]`` ``(d_in, d_in)`` is
given. With ``R = values - keys K`` and ``C = cov_scale * C0 + ridge * I``:

* MEMIT (least squares):        ``dK = (C + keys^T keys)^-1 keys^T R``;
* EMMET (equality constraints): ``dK = C^-1 keys^T (keys C^-1 keys^T + eps I)^-1 R`` (``eps`` only
  when ``B > 1``); ROME is EMMET with ``B = 1``.

These are the transposes of the reference's PyTorch ``(d_out, d_in)`` formulas. Computing the
keys and target values (averaging over prefixes, optimising values) is model-specific and stays
outside; so does spreading ``R / (L - i)`` over ``L`` edited layers.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from cljax import _checks

__all__ = ["emmet_delta", "memit_delta"]


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _psd_solve(a, b):
    """Solves ``a x = b`` for symmetric PSD `a`: Cholesky, or a pseudo-inverse if it fails."""
    a = 0.5 * (a + a.T)
    chol = jnp.linalg.cholesky(a)
    ok = jnp.all(jnp.isfinite(chol))

    def by_cholesky(_):
        y = jax.scipy.linalg.solve_triangular(chol, b, lower=True)
        return jax.scipy.linalg.solve_triangular(chol.T, y, lower=False)

    def by_pinv(_):
        w, v = jnp.linalg.eigh(a)
        cutoff = jnp.finfo(a.dtype).eps * a.shape[0] * jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
        inv = jnp.where(w > cutoff, 1.0 / jnp.where(w > cutoff, w, 1.0), 0.0)
        return _mm(v, inv[:, None] * _mm(v.T, b))

    return jax.lax.cond(ok, by_cholesky, by_pinv, None)


@jax.jit
def _memit(kr, resid, c):
    return _psd_solve(c + _mm(kr.T, kr), _mm(kr.T, resid))


@jax.jit
def _emmet(kr, resid, c, eps):
    c_inv_kt = _psd_solve(c, kr.T)  # (d_in, B)
    d = _mm(kr, c_inv_kt)
    if kr.shape[0] > 1:  # static: eps regularises batched edits only
        d = d + eps * jnp.eye(kr.shape[0], dtype=d.dtype)
    return _mm(c_inv_kt, _psd_solve(d, resid))


def _prepare(fn, kernel, keys, values, key_second_moment, cov_scale, ridge):
    kernel, keys, values, c0 = (jnp.asarray(x) for x in (kernel, keys, values, key_second_moment))
    if kernel.ndim != 2:
        raise ValueError(
            f"{fn}: `kernel` has shape {tuple(kernel.shape)}; it must be (d_in, d_out)."
        )
    d_in, d_out = kernel.shape
    if keys.ndim != 2 or keys.shape[1] != d_in:
        raise ValueError(f"{fn}: `keys` has shape {tuple(keys.shape)}; it must be (B, {d_in}).")
    if values.shape != (keys.shape[0], d_out):
        raise ValueError(
            f"{fn}: `values` has shape {tuple(values.shape)}; it must be ({keys.shape[0]}, {d_out})."
        )
    if c0.shape != (d_in, d_in):
        raise ValueError(
            f"{fn}: `key_second_moment` has shape {tuple(c0.shape)}; it must be ({d_in}, {d_in})."
        )
    _checks.check_in_range(fn, "cov_scale", cov_scale, 0.0)
    _checks.check_in_range(fn, "ridge", ridge, 0.0)
    dt = _dtype()
    k, kr, v, c0 = kernel.astype(dt), keys.astype(dt), values.astype(dt), c0.astype(dt)
    resid = v - _mm(kr, k)
    c = jnp.asarray(cov_scale, dt) * c0 + jnp.asarray(ridge, dt) * jnp.eye(d_in, dtype=dt)
    return kernel.dtype, kr, resid, c


def memit_delta(
    kernel: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    key_second_moment: jax.Array,
    *,
    cov_scale: chex.Numeric = 1.0,
    ridge: chex.Numeric = 0.0,
) -> jax.Array:
    """MEMIT's batched least-squares edit ``dK = (C + keys^T keys)^-1 keys^T (values - keys K)``.

    Args:
        kernel: ``(d_in, d_out)`` Flax kernel of the edited layer.
        keys: ``(B, d_in)`` edit keys (layer inputs).
        values: ``(B, d_out)`` target outputs.
        key_second_moment: ``(d_in, d_in)`` uncentred ``E[x x^T]`` of generic inputs (sum it over
            data-parallel replicas before calling).
        cov_scale: ``lambda`` multiplying it (10,000 for GPT-J, 1,000 for GPT2-XL in the
            reference configurations).
        ridge: ``mu`` added to the diagonal (0 in the reference).

    Returns:
        ``dK`` ``(d_in, d_out)`` in the kernel's dtype; ``kernel + dK`` is the edited kernel.
        Solves run in float64 when ``jax_enable_x64`` is on, else float32 (Cholesky, with a
        pseudo-inverse fallback).

    Example:
        >>> delta = cljax.memit_delta(jnp.zeros((2, 1)), jnp.array([[1.0, 0.0]]), jnp.array([[2.0]]), jnp.eye(2))
        >>> delta[:, 0].round(5)  # half way: the edit is balanced against C = I
        Array([1., 0.], dtype=float32)

    References:
        Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023.
        Gupta, Sajnani and Anumanchipalli, "A Unified Framework for Model Editing", 2024.
    """
    dtype, kr, resid, c = _prepare(
        "memit_delta", kernel, keys, values, key_second_moment, cov_scale, ridge
    )
    return _memit(kr, resid, c).astype(dtype)


def emmet_delta(
    kernel: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    key_second_moment: jax.Array,
    *,
    cov_scale: chex.Numeric = 1.0,
    ridge: chex.Numeric = 0.0,
    eps: chex.Numeric = 0.1,
) -> jax.Array:
    """EMMET's equality-constrained edit (ROME for one key).

    ``dK = C^-1 keys^T D^-1 (values - keys K)`` with ``D = keys C^-1 keys^T`` (plus ``eps I`` when
    ``B > 1``): with ``eps = 0`` and independent keys, ``keys (K + dK) = values`` exactly, and
    ``dK`` is the smallest such change in the ``C`` metric (``tr(dK^T C dK)``).

    Args:
        kernel, keys, values, key_second_moment, cov_scale, ridge: As in `memit_delta`.
        eps: Regulariser of ``D`` for batched edits (0.1 in the reference); unused for ``B = 1``.

    Returns:
        ``dK`` ``(d_in, d_out)`` in the kernel's dtype.

    Example:
        >>> delta = cljax.emmet_delta(jnp.zeros((2, 1)), jnp.array([[1.0, 0.0]]), jnp.array([[2.0]]), jnp.eye(2))
        >>> delta[:, 0].round(5)  # the key now maps exactly to its value
        Array([2., 0.], dtype=float32)

    References:
        Gupta, Sajnani and Anumanchipalli, "A Unified Framework for Model Editing", 2024.
        Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022.
    """
    fn = "emmet_delta"
    _checks.check_in_range(fn, "eps", eps, 0.0)
    dtype, kr, resid, c = _prepare(fn, kernel, keys, values, key_second_moment, cov_scale, ridge)
    return _emmet(kr, resid, c, jnp.asarray(eps, c.dtype)).astype(dtype)
