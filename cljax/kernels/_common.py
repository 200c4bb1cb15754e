"""Pieces shared by the kernel modules: lazy Pallas imports, argument checks and block layouts.

Pallas is imported on first use, so ``import cljax`` does not load it. Every kernel comes in two
variants of one algorithm, chosen by ``target``:

* ``'gpu'`` (Pallas Triton): power-of-two block shapes; loads and stores at the array's edges are
  masked explicitly (Triton would otherwise read and write out of bounds).
* ``'tpu'`` (Pallas Mosaic): the last two block dims are multiples of (8, 128) (32 rows for 8-bit
  data) or the whole array dim; scalars live in SMEM; edge blocks are padded by the pipeline, so
  the kernel never lets a padded value reach a written element or a reduction.

On the CPU both variants run in interpret mode.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "pallas")
TARGETS = ("gpu", "tpu")


class _LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


pl = _LazyModule("jax.experimental.pallas")
plgpu = _LazyModule("jax.experimental.pallas.triton")
pltpu = _LazyModule("jax.experimental.pallas.tpu")


def check_impl(fn: str, impl: Any) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{fn}(impl=...) must be 'auto', 'xla' or 'pallas', got {impl!r}.")


def resolve_target(fn: str, target: Any) -> str:
    """``'tpu'`` on a TPU back end and ``'gpu'`` elsewhere, unless `target` names one."""
    if target is None:
        return "tpu" if jax.default_backend() == "tpu" else "gpu"
    if target not in TARGETS:
        raise ValueError(f"{fn}(target=...) must be 'gpu', 'tpu' or None, got {target!r}.")
    return target


def resolve_interpret(interpret: Any) -> Any:
    """Interpret mode by default on the CPU, where compiled Pallas does not run."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def rows_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """A 2-D ``(rows, cols)`` view of an element-wise operand that reshaping gives for free.

    Lane-dense when the size allows: ``cols`` is 1024, 512, 256 or 128 when it divides the size;
    otherwise the leading dims are collapsed and ``cols`` is the last dim (``(1, 1)`` for a scalar).
    """
    size = math.prod(shape)
    for cols in (1024, 512, 256, 128):
        if size >= cols and size % cols == 0:
            return size // cols, cols
    if not shape or size == 0:
        return 1, max(size, 1)
    return size // shape[-1], shape[-1]


def elementwise_block(
    fn: str, rows: int, cols: int, target: str, block: tuple[int, int] | None, *, min_rows: int = 8
) -> tuple[int, int]:
    """Checks a user block shape, or picks one, for a ``(rows, cols)`` element-wise view."""
    if block is None:
        if target == "gpu":
            bc = min(next_pow2(cols), 1024)
            return max(1, min(next_pow2(rows), 4096 // bc)), bc
        bc = cols if cols <= 512 else 512
        br = rows if rows <= 256 else 256
        return br, bc
    check_block(fn, (rows, cols), tuple(block), target, min_rows=min_rows)
    return tuple(block)


def check_block(
    fn: str, shape: tuple[int, ...], block: tuple[int, ...], target: str, *, min_rows: int = 8
) -> None:
    """Raises a ValueError for a block shape the target cannot lower."""
    if (
        not isinstance(block, tuple)
        or len(block) != len(shape)
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)
    ):
        raise ValueError(
            f"{fn}(block=...) must be {len(shape)} positive ints for a view of shape {shape}, "
            f"got {block!r}."
        )
    if target == "gpu":
        if not all(is_pow2(b) for b in block):
            raise ValueError(
                f"{fn}(block=...) must be powers of two for target='gpu' (Triton), got {block}."
            )
        return
    rows, cols = shape[-2:]
    br, bc = block[-2:]
    if not (bc == cols or bc % 128 == 0) or not (br == rows or br % min_rows == 0):
        raise ValueError(
            f"{fn}(block=...) must have its last two dims multiples of ({min_rows}, 128) or equal "
            f"to the view's {(rows, cols)} for target='tpu' (Mosaic), got {block}."
        )


def edge_mask(
    block: tuple[int, int], bounds: tuple[int, int], starts: tuple[Any, Any]
) -> jax.Array:
    """``(br, bc)`` booleans: which elements of a block at `starts` lie inside `bounds`."""
    rows = starts[0] + jax.lax.broadcasted_iota(jnp.int32, block, 0)
    cols = starts[1] + jax.lax.broadcasted_iota(jnp.int32, block, 1)
    return (rows < bounds[0]) & (cols < bounds[1])


def scalar_operand(values: list[Any], target: str) -> tuple[jax.Array, Any]:
    """Packs float scalars into a float32 vector and returns it with its BlockSpec.

    GPU: a power-of-two vector loaded whole; TPU: an SMEM vector.
    """
    vec = jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in values])
    if target == "tpu":
        return vec, pl.BlockSpec(memory_space=pltpu.SMEM)
    size = max(2, next_pow2(len(values)))
    vec = jnp.pad(vec, (0, size - len(values)))
    return vec, pl.BlockSpec((size,), lambda *_: (0,))


def load(ref: Any, target: str, mask: jax.Array | None, other: Any = 0) -> jax.Array:
    """Reads a whole block: masked on the GPU (`other` outside `mask`), plain on the TPU."""
    if target == "gpu" and mask is not None:
        return plgpu.load(ref, mask=mask, other=other)
    return ref[...]


def store(ref: Any, value: jax.Array, target: str, mask: jax.Array | None) -> None:
    """Writes a whole block: masked on the GPU, plain on the TPU (the pipeline drops padding)."""
    if target == "gpu" and mask is not None:
        plgpu.store(ref, value.astype(ref.dtype), mask=mask)
    else:
        ref[...] = value.astype(ref.dtype)


def compiler_params(target: str, dimension_semantics: tuple[str, ...] | None = None) -> Any:
    """Target compiler parameters: the TPU grid's parallel / arbitrary axes, or Triton on the GPU.

    The GPU variant names Triton explicitly: without compiler parameters, ``pallas_call`` lowers
    GPU kernels with Mosaic GPU (JAX's default since 0.7), which rejects masked loads and the
    small-block copies these kernels make.
    """
    if target == "tpu":
        if dimension_semantics is None:
            return None
        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
    return plgpu.CompilerParams()
