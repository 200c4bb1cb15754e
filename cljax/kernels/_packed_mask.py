"""Applying a row-wise bit-packed mask: ``where(unpack(packed), x, 0)`` without unpacking in memory.

The packed format is the sparse family's: the mask is packed along its last axis, 8 entries a
byte, most significant bit first (`jnp.packbits`), the last byte of a row padded with zeros; a
scalar's mask is ``(1,)`` bytes. Leading axes are kept, so ``x`` of shape ``(..., C)`` has a
packed mask of shape ``(..., ceil(C / 8))``. The kernel reads ``x`` and one bit per entry and
writes ``x`` once: 1/8 byte of mask traffic per entry instead of the unpacked mask's one byte
(plus its write and read when XLA materialises it).

Bits are expanded inside the kernel: by a broadcast and reshape on the GPU, and by a 0/1
matrix product on the TPU (the MXU repeats each byte 8 times along the lanes, exactly, since the
bytes are integers below 256).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from cljax.kernels import _common, _dispatch
from cljax.kernels._common import pl


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The packed mask's shape for an operand of `shape`."""
    shape = tuple(shape)
    if not shape:
        return (1,)
    return shape[:-1] + (-(-shape[-1] // 8),)


def _check(fn: str, x: jax.Array, packed: jax.Array) -> None:
    want = packed_shape(jnp.shape(x))
    if tuple(jnp.shape(packed)) != want or jnp.result_type(packed) != jnp.uint8:
        raise ValueError(
            f"{fn}: `packed` has shape {jnp.shape(packed)} and dtype {jnp.result_type(packed)}; "
            f"`x` of shape {jnp.shape(x)} needs uint8 of shape {want} (packed along the last axis)."
        )


def reference(x: jax.Array, packed: jax.Array) -> jax.Array:
    """``x`` where the packed bit is set, zero elsewhere (the kernel's specification)."""
    _check("apply_packed_mask", x, packed)
    shape = jnp.shape(x)
    last = shape[-1] if shape else 1
    keep = jnp.unpackbits(packed, axis=-1, count=last).astype(jnp.bool_).reshape(shape)
    return jnp.where(keep, x, jnp.zeros_like(x))


def _bit_shifts(width: int) -> jax.Array:
    """``(1, width)`` int32 shifts ``7 - c mod 8`` (most significant bit first)."""
    return 7 - jax.lax.broadcasted_iota(jnp.int32, (1, width), 1) % 8


def _kernel_gpu(x_ref, b_ref, o_ref, *, view, block):
    br, bc = block
    i, j = pl.program_id(0), pl.program_id(1)
    valid = _common.edge_mask(block, view, (i * br, j * bc))
    bytes_valid = _common.edge_mask(
        (br, bc // 8), (view[0], -(-view[1] // 8)), (i * br, j * (bc // 8))
    )
    x = _common.load(x_ref, "gpu", valid)
    b = _common.load(b_ref, "gpu", bytes_valid).astype(jnp.int32)
    repeated = jnp.broadcast_to(b[:, :, None], (br, bc // 8, 8)).reshape(br, bc)
    keep = (repeated >> _bit_shifts(bc)) & 1
    _common.store(o_ref, jnp.where(keep != 0, x, jnp.zeros_like(x)), "gpu", valid)


def _kernel_tpu(x_ref, b_ref, o_ref):
    bc, nb = x_ref.shape[-1], b_ref.shape[-1]
    b = b_ref[...].astype(jnp.int32).astype(jnp.float32)  # (br, nb)
    # (nb, bc) 0/1 matrix: column c takes byte c // 8 of the block.
    rows = jax.lax.broadcasted_iota(jnp.int32, (nb, bc), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (nb, bc), 1)
    spread = (cols // 8 == rows).astype(jnp.float32)
    repeated = jnp.dot(b, spread, preferred_element_type=jnp.float32).astype(jnp.int32)
    keep = (repeated >> _bit_shifts(bc)) & 1
    x = x_ref[...]
    o_ref[...] = jnp.where(keep != 0, x, jnp.zeros_like(x))


def _view(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _block(fn: str, view: tuple[int, int], target: str, block: tuple[int, int] | None):
    rows, cols = view
    if block is None:
        if target == "gpu":
            bc = max(8, min(_common.next_pow2(cols), 1024))
            return max(1, min(_common.next_pow2(rows), 4096 // bc)), bc
        bc = cols if cols <= 1024 else 1024
        return (rows if rows <= 256 else 256), bc
    _common.check_block(fn, view, block, target, min_rows=32)
    if target == "gpu" and block[1] < 8:
        raise ValueError(
            f"{fn}(block=...) must have at least 8 columns for target='gpu', got {block}."
        )
    if target == "tpu" and block[1] != cols and block[1] % 1024:
        raise ValueError(
            f"{fn}(block=...) must have a multiple of 1024 columns (128 packed bytes) or all "
            f"{cols} for target='tpu', got {block}."
        )
    return block


def pallas(
    x: jax.Array,
    packed: jax.Array,
    *,
    target: Literal["gpu", "tpu"] | None = None,
    block: tuple[int, int] | None = None,
    interpret: Any = None,
) -> jax.Array:
    """`reference` as a Pallas kernel over ``(rows, C)`` blocks of ``x`` and their packed bytes.

    Tested in interpret mode against the reference, and lowered to Triton IR (GPU) and Mosaic
    (TPU) in the tests; not yet compiled or run on a GPU or TPU.

    Args:
        x: The operand, any shape.
        packed: Its packed mask (see the module docstring).
        target: ``'gpu'`` or ``'tpu'`` variant; default from the back end.
        block: ``(rows, cols)`` block of the ``(prod(leading), C)`` view of `x`; `cols` a multiple
            of 8 (GPU: powers of two; TPU: a multiple of 1024 or all of ``C``).
        interpret: Interpret mode (default: on the CPU only).

    Returns:
        The masked `x`.
    """
    fn = "apply_packed_mask"
    _check(fn, x, packed)
    target = _common.resolve_target(fn, target)
    shape = tuple(jnp.shape(x))
    if x.size == 0:
        return reference(x, packed)
    view = _view(shape)
    bview = (view[0], -(-view[1] // 8))
    block = _block(fn, view, target, block)
    br, bc = block
    # Packed bytes per block; a block of all of C may end in a partial byte.
    bbc = bview[1] if target == "tpu" and bc == view[1] else bc // 8
    if target == "gpu":
        kernel = functools.partial(_kernel_gpu, view=view, block=block)
    else:
        kernel = _kernel_tpu
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(view[0], br), pl.cdiv(view[1], bc)),
        in_specs=[
            pl.BlockSpec(block, lambda i, j: (i, j)),
            pl.BlockSpec((br, bbc), lambda i, j: (i, j)),
        ],
        out_specs=pl.BlockSpec(block, lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct(view, x.dtype),
        compiler_params=_common.compiler_params(target, ("parallel", "parallel")),
        interpret=_common.resolve_interpret(interpret),
    )(x.reshape(view), packed.reshape(bview))
    return out.reshape(shape)


def apply_packed_mask(
    x: jax.Array, packed: jax.Array, *, impl: Literal["auto", "xla", "pallas"] = "auto"
) -> jax.Array:
    """Zeroes the entries of `x` whose bit in the row-wise packed mask `packed` is 0.

    Args:
        x: The operand, shape ``(..., C)`` (or a scalar).
        packed: uint8 ``(..., ceil(C / 8))``: the mask packed along the last axis with
            ``jnp.packbits`` (most significant bit first), as the sparse family stores masks.
        impl: ``'auto'`` (Pallas only where `cljax.kernels` has a measured win for this back
            end and shape, else XLA), ``'xla'`` or ``'pallas'`` (on the CPU: interpret mode).
            Static.

    Returns:
        ``where(mask, x, 0)`` in `x`'s dtype.

    Example:
        >>> packed = jnp.packbits(jnp.array([[True, False, True]]), axis=-1)
        >>> cljax.kernels.apply_packed_mask(jnp.ones((1, 3)), packed)
        Array([[1., 0., 1.]], dtype=float32)
    """
    fn = "apply_packed_mask"
    _check(fn, x, packed)
    chosen = _dispatch.resolve(
        fn, impl, "apply_packed_mask", (jnp.size(x),), str(jnp.result_type(x))
    )
    if chosen == "pallas":
        return pallas(x, packed)
    return reference(x, packed)
