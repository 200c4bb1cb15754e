"""Block-wise 8-bit optimizer state (OT-01) as a wrapper around any inner transform.

Each large floating-point state tensor of the inner transform is stored as uint8 codes of a
256-entry code book plus one float32 absmax scale per block of `block_size` consecutive entries
(row-major over the tensor). Every step dequantizes, runs the inner update in float32 and
requantizes. The codes keep the tensor's shape, so they take the parameter's sharding.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks

__all__ = ["QuantizeStateState", "QuantizedTensor", "dynamic_code", "quantize_state"]

Code = Literal["dynamic", "linear"]
_CODES = ("dynamic", "linear")
# State fields that are never negative (second moments): they get the unsigned code.
_UNSIGNED_FIELDS = frozenset({"nu", "nu_max", "sum_of_squares", "v", "exp_avg_sq"})


class QuantizedTensor(NamedTuple):
    """An 8-bit block-wise quantized tensor: ``x ≈ scales[block] · code[codes]``."""

    codes: chex.Array  # uint8, the tensor's shape
    scales: chex.Array  # float32 (ceil(size / block_size),) absmax per block


class QuantizeStateState(NamedTuple):
    """State of `quantize_state`: the inner state with its large tensors as `QuantizedTensor`."""

    inner: optax.OptState


def dynamic_code(signed: bool) -> np.ndarray:
    """The 256-entry dynamic (tree) code in [-1, 1] (signed) or [0, 1] (unsigned), sorted.

    Built from the paper's description: after the sign bit (signed code only), the number of
    leading zero bits ``e`` is a decimal exponent and the bits after the first one bit are a
    linear fraction, so the magnitudes are ``10^-e · (0.1 + 0.9 · j / 2^b)`` for ``b`` fraction
    bits, ``j = 1 … 2^b``. Small values get fine steps, large ones coarse steps; 0 and 1 are exact.

    Example:
        >>> code = cljax.dynamic_code(signed=True)
        >>> code.shape, float(code.min()), float(code.max())
        ((256,), -1.0, 1.0)
    """
    bits = 7 if signed else 8
    mags = [0.0]
    for e in range(bits):
        fraction_bits = bits - 1 - e
        count = 2**fraction_bits
        mags += [10.0**-e * (0.1 + 0.9 * j / count) for j in range(1, count + 1)]
    mags = np.unique(np.asarray(mags, np.float64))
    if signed:
        values = np.concatenate([-mags[1:], mags])
    else:
        values = mags
    values = np.unique(values)
    while len(values) < 256:  # pad with the largest magnitude (harmless duplicates)
        values = np.append(values, values[-1])
    return np.sort(values[:256]).astype(np.float32)


def _linear_code(signed: bool) -> np.ndarray:
    return np.linspace(-1.0 if signed else 0.0, 1.0, 256, dtype=np.float32)


def _quantize(x: jax.Array, code: jax.Array, block_size: int) -> QuantizedTensor:
    size = x.size
    blocks = -(-size // block_size)
    flat = jnp.pad(x.astype(jnp.float32).reshape(-1), (0, blocks * block_size - size)).reshape(
        blocks, block_size
    )
    scales = jnp.max(jnp.abs(flat), axis=1)
    normed = flat / jnp.where(scales > 0, scales, 1.0)[:, None]
    midpoints = (code[1:] + code[:-1]) / 2
    idx = jnp.searchsorted(midpoints, normed.reshape(-1), side="left")
    codes = idx[:size].astype(jnp.uint8).reshape(x.shape)
    return QuantizedTensor(codes=codes, scales=scales)


def _dequantize(q: QuantizedTensor, code: jax.Array, block_size: int) -> jax.Array:
    shape, size = q.codes.shape, q.codes.size
    blocks = q.scales.shape[0]
    values = code[q.codes.reshape(-1).astype(jnp.int32)]
    values = jnp.pad(values, (0, blocks * block_size - size)).reshape(blocks, block_size)
    return (values * q.scales[:, None]).reshape(-1)[:size].reshape(shape)


def _field_names(path) -> set[str]:
    return {getattr(k, "name", getattr(k, "key", None)) for k in path} - {None}


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 2048,
    min_size: int = 4096,
    code: Code = "dynamic",
) -> optax.GradientTransformationExtraArgs:
    """Stores `inner`'s large floating-point state in 8 bits with block-wise absmax scaling.

    A state tensor with at least `min_size` entries is kept as a `QuantizedTensor`: blocks of
    `block_size` entries (the last one shorter), each with scale ``s = max |x|`` (float32) and
    codes ``argmin_k |c_k − x / s|`` (nearest) of a 256-entry code book, unsigned for second
    moments (fields ``nu``, ``nu_max``, ...) and signed otherwise. Each update dequantizes,
    runs ``inner.update`` in float32 and requantizes the new state; the updates come back in the
    gradients' dtype. Smaller tensors, integer counts and non-array state stay as they are.

    Works around any transform, including the inner transform of
    `scale_by_low_rank_projection` (8-bit GaLore).

    Args:
        inner: The transform whose state is stored quantized (e.g. `optax.scale_by_adam()`).
        block_size: Entries per block (2048 in the paper). Static.
        min_size: Tensors with fewer entries stay 32-bit (about 4096 in the reference library,
            by recollection). Static.
        code: ``'dynamic'`` (the paper's dynamic tree code, see `dynamic_code`) or ``'linear'``
            (256 uniform levels). Static.

    Returns:
        A transform whose state is `QuantizeStateState`.

    Example:
        >>> tx = cljax.quantize_state(optax.scale_by_adam(), min_size=16)
        >>> state = tx.init({"w": jnp.zeros((8, 4))})
        >>> state.inner.mu["w"].codes.dtype
        dtype('uint8')

    References:
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
        https://arxiv.org/abs/2110.02861
    """
    fn = "quantize_state"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "block_size", block_size, 1)
    _checks.check_int(fn, "min_size", min_size, 1)
    _checks.check_choice(fn, "code", code, _CODES)
    inner = optax.with_extra_args_support(inner)
    make = dynamic_code if code == "dynamic" else _linear_code
    signed_code, unsigned_code = make(True), make(False)

    def book(path) -> jax.Array:
        return jnp.asarray(unsigned_code if _field_names(path) & _UNSIGNED_FIELDS else signed_code)

    def quantizable(x) -> bool:
        return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.size >= min_size

    def pack(state):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: _quantize(x, book(path), block_size) if quantizable(x) else x, state
        )

    def unpack(state):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (
                _dequantize(x, book(path), block_size) if isinstance(x, QuantizedTensor) else x
            ),
            state,
            is_leaf=lambda x: isinstance(x, QuantizedTensor),
        )

    def init_fn(params):
        return QuantizeStateState(inner=pack(inner.init(params)))

    def update_fn(updates, state, params=None, **extra_args):
        full = unpack(state.inner)
        new_updates, new_state = inner.update(updates, full, params, **extra_args)
        new_updates = jax.tree.map(
            lambda u, g: None if u is None else u.astype(g.dtype),
            new_updates,
            updates,
            is_leaf=lambda x: x is None,
        )
        # Tensors that were kept full-size keep their dtype exactly as `init` made them.
        packed = jax.tree.map(
            lambda new, old: (
                new
                if isinstance(old, QuantizedTensor) or not hasattr(old, "dtype")
                else new.astype(old.dtype)
            ),
            pack(new_state),
            state.inner,
            is_leaf=lambda x: isinstance(x, QuantizedTensor),
        )
        return new_updates, QuantizeStateState(inner=packed)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
