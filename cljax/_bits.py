"""Bit packing for masks and signs kept long-term (private, shared by the families)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def pack_bits(mask: jax.Array) -> jax.Array:
    """Packs a boolean array into a flat uint8 array, 8 entries a byte (big-endian bit order)."""
    return jnp.packbits(jnp.asarray(mask, jnp.bool_).reshape(-1))


def unpack_bits(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of `pack_bits`: returns a boolean array of `shape`."""
    shape = tuple(shape)
    size = math.prod(shape)
    if packed.dtype != jnp.uint8 or packed.ndim != 1 or packed.shape[0] != -(-size // 8):
        raise ValueError(
            f"unpack_bits: packed array has shape {packed.shape} and dtype {packed.dtype}; shape "
            f"{shape} needs uint8 of shape ({-(-size // 8)},)."
        )
    return jnp.unpackbits(packed, count=size).astype(jnp.bool_).reshape(shape)


def packed_size(shape: Sequence[int]) -> int:
    """Number of bytes `pack_bits` uses for a mask of `shape`."""
    return -(-math.prod(tuple(shape)) // 8)
