"""N:M mask selection: keep the `n` largest ``|x|`` of every `m` consecutive entries along an axis.

Ties go to the earlier entry, so every group keeps exactly `n` entries (as `cljax.nm_mask`).
An entry's rank in its group is the number of entries that beat it, ``|x_j| > |x_i|`` or
``|x_j| = |x_i|`` with ``j < i``; it is kept when its rank is below `n`.

The operand is seen as ``(A, L, B)`` around the grouped axis of length ``L`` (a multiple of `m`):
a ``(A, L)`` matrix with groups along its columns when the axis is the last one, else ``A``
matrices ``(L, B)`` with groups along their rows. Blocks hold whole groups. On the GPU a block is
reshaped to ``(..., m, ...)`` and ranked with one ``m x m`` comparison per group; on the TPU,
where reshapes that split the lane or sublane axis are costly, each element meets the other
``m - 1`` members of its group through ``m - 1`` pairs of rotations of the block.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from cljax import _checks
from cljax.kernels import _common, _dispatch
from cljax.kernels._common import pl, pltpu

_F32 = jnp.float32


def _check(fn: str, x: Any, n: Any, m: Any, axis: Any) -> int:
    """Validates the arguments; returns the non-negative axis."""
    _checks.check_int(fn, "n", n, 1)
    _checks.check_int(fn, "m", m, 1)
    if n > m:
        raise ValueError(f"{fn}(n=..., m=...) needs n <= m, got n={n} > m={m}.")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}(axis=...) must be an int, got {axis!r}.")
    shape = tuple(jnp.shape(x))
    if not shape:
        raise ValueError(f"{fn}: `x` is a scalar; N:M groups need at least one axis.")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{fn}(axis={axis}) is out of range for shape {shape}.")
    if shape[axis] % m:
        raise ValueError(
            f"{fn}: axis {axis} of shape {shape} has length {shape[axis]}, not divisible by m={m}."
        )
    return axis % len(shape)


def _beats(other, mine, other_is_earlier):
    return (other > mine) | ((other == mine) & other_is_earlier)


def reference(x: jax.Array, n: int, m: int, *, axis: int = -1) -> jax.Array:
    """Boolean mask of the `n` largest ``|x|`` per group of `m` along `axis` (the specification)."""
    axis = _check("nm_mask", x, n, m, axis)
    scores = jnp.moveaxis(jnp.abs(jnp.asarray(x, _F32)), axis, -1)
    groups = scores.reshape(scores.shape[:-1] + (scores.shape[-1] // m, m))
    mine = groups[..., :, None]  # entry i
    other = groups[..., None, :]  # entry j
    index = jnp.arange(m)
    earlier = (index[None, :] < index[:, None]).reshape((1,) * (mine.ndim - 2) + (m, m))  # j < i
    rank = jnp.sum(_beats(other, mine, earlier), axis=-1, dtype=jnp.int32)
    keep = (rank < n).reshape(scores.shape)
    return jnp.moveaxis(keep, -1, axis)


def _view(shape: tuple[int, ...], axis: int) -> tuple[tuple[int, ...], int]:
    """The ``(A, L)`` or ``(A, L, B)`` view and the grouped axis of its kernel block (1 or 0)."""
    a, length, b = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    if b == 1:
        return (a, length), 1
    return (a, length, b), 0


def _kernel_gpu(x_ref, o_ref, *, n, m, gaxis, bounds, block):
    r, c = block
    if len(bounds) == 3:  # (A, L, B) view: the block's rows are L, its columns B
        starts = (pl.program_id(1) * r, pl.program_id(2) * c)
        bounds = bounds[1:]
    else:
        starts = (pl.program_id(0) * r, pl.program_id(1) * c)
    valid = _common.edge_mask(block, bounds, starts)
    v = jnp.abs(_common.load(x_ref, "gpu", valid).astype(_F32))
    if gaxis == 0:
        g = v.reshape(r // m, m, c)
        mine, other = g[:, :, None, :], g[:, None, :, :]
        i = jax.lax.broadcasted_iota(jnp.int32, (1, m, m, 1), 1)
        j = jax.lax.broadcasted_iota(jnp.int32, (1, m, m, 1), 2)
        rank = jnp.sum(_beats(other, mine, j < i).astype(jnp.int32), axis=2)
    else:
        g = v.reshape(r, c // m, m)
        mine, other = g[:, :, :, None], g[:, :, None, :]
        i = jax.lax.broadcasted_iota(jnp.int32, (1, 1, m, m), 2)
        j = jax.lax.broadcasted_iota(jnp.int32, (1, 1, m, m), 3)
        rank = jnp.sum(_beats(other, mine, j < i).astype(jnp.int32), axis=3)
    keep = (rank < n).astype(jnp.int8).reshape(r, c)
    _common.store(o_ref, keep, "gpu", valid)


def _kernel_tpu(x_ref, o_ref, *, n, m, gaxis):
    v = jnp.abs(x_ref[...].astype(_F32))
    size = v.shape[gaxis]
    place = jax.lax.broadcasted_iota(jnp.int32, v.shape, gaxis) % m  # position in the group
    rank = jnp.zeros(v.shape, jnp.int32)
    for s in range(1, m):
        ahead = pltpu.roll(v, size - s, gaxis)  # the entry s places later
        behind = pltpu.roll(v, m - s, gaxis)  # the entry m - s places earlier
        same_group_ahead = place + s < m
        other = jnp.where(same_group_ahead, ahead, behind)
        rank = rank + _beats(other, v, ~same_group_ahead).astype(jnp.int32)
    o_ref[...] = (rank < n).astype(jnp.int8)


def _blocks(fn, view, gaxis, m, target, block):
    """The kernel block (2-D, over the last two view dims) for a target."""
    rows, cols = view[-2:]
    if block is not None:
        _common.check_block(fn, (rows, cols), block, target, min_rows=32)
        if block[gaxis] % m:
            raise ValueError(
                f"{fn}(block=...) must hold whole groups: block dim {gaxis} = {block[gaxis]} is "
                f"not a multiple of m={m}."
            )
        return tuple(block)
    if target == "gpu":
        budget = max(m, 4096 // m)  # the m x m comparison holds m entries per element
        if gaxis == 1:
            bc = min(_common.next_pow2(cols), max(m, 256))
            return max(1, min(_common.next_pow2(rows), budget // bc)), bc
        bc = min(_common.next_pow2(cols), 256)
        return max(m, min(_common.next_pow2(rows), budget // bc)), bc
    if gaxis == 1:
        lane = math.lcm(128, m)
        bc = cols if cols <= 2048 else max(lane, 2048 // lane * lane)
        return (rows if rows <= 256 else 256), bc
    sub = math.lcm(32, m)
    br = rows if rows <= 256 else max(sub, 256 // sub * sub)
    return br, (cols if cols <= 512 else 512)


def pallas_raw(
    x: jax.Array,
    n: int,
    m: int,
    *,
    axis: int = -1,
    target: Literal["gpu", "tpu"] | None = None,
    block: tuple[int, int] | None = None,
    interpret: Any = None,
) -> jax.Array:
    """The kernel's int8 output (1 keep, 0 drop), before the conversion to booleans."""
    fn = "nm_mask"
    axis = _check(fn, x, n, m, axis)
    target = _common.resolve_target(fn, target)
    if target == "gpu" and not _common.is_pow2(m):
        raise NotImplementedError(
            f"{fn}: the GPU kernel needs a power-of-two group length (Triton), got m={m}."
        )
    shape = tuple(jnp.shape(x))
    if x.size == 0:
        return jnp.zeros(shape, jnp.int8)
    view, gaxis = _view(shape, axis)
    br, bc = _blocks(fn, view, gaxis, m, target, block)
    if target == "gpu":
        kernel = functools.partial(_kernel_gpu, n=n, m=m, gaxis=gaxis, bounds=view, block=(br, bc))
    else:
        kernel = functools.partial(_kernel_tpu, n=n, m=m, gaxis=gaxis)
    if len(view) == 2:
        grid = (pl.cdiv(view[0], br), pl.cdiv(view[1], bc))
        spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
        semantics = ("parallel", "parallel")
    else:
        grid = (view[0], pl.cdiv(view[1], br), pl.cdiv(view[2], bc))
        spec = pl.BlockSpec((None, br, bc), lambda a, i, j: (a, i, j))
        semantics = ("parallel", "parallel", "parallel")
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(view, jnp.int8),
        compiler_params=_common.compiler_params(target, semantics),
        interpret=_common.resolve_interpret(interpret),
    )(x.reshape(view))
    return out.reshape(shape)


def pallas(
    x: jax.Array,
    n: int,
    m: int,
    *,
    axis: int = -1,
    target: Literal["gpu", "tpu"] | None = None,
    block: tuple[int, int] | None = None,
    interpret: Any = None,
) -> jax.Array:
    """`reference` as a Pallas kernel (see the module docstring).

    Tested in interpret mode against the reference, and lowered to Triton IR (GPU) and Mosaic
    (TPU) in the tests; not yet compiled or run on a GPU or TPU.

    Args:
        x, n, m, axis: As in `nm_mask`.
        target: ``'gpu'`` or ``'tpu'`` variant; default from the back end. The GPU variant needs
            a power-of-two `m` (else NotImplementedError).
        block: 2-D block over the last two dims of the view, holding whole groups.
        interpret: Interpret mode (default: on the CPU only).

    Returns:
        A boolean array of `x`'s shape.
    """
    return pallas_raw(x, n, m, axis=axis, target=target, block=block, interpret=interpret) == 1


def nm_mask(
    x: jax.Array,
    n: int,
    m: int,
    *,
    axis: int = -1,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> jax.Array:
    """Keeps the `n` largest ``|x|`` of every `m` consecutive entries along `axis`.

    The kernel-backed form of `cljax.nm_mask`, with the same result: exactly `n` kept per group,
    ties to the earlier entry (NaN scores are kept, as they beat nothing and nothing beats them).

    Args:
        x: An array with at least one axis.
        n: Entries kept per group. Static.
        m: Group length. Static.
        axis: The grouped axis; its length must be a multiple of `m`. Static.
        impl: ``'auto'`` (Pallas only where `cljax.kernels` has a measured win for this back
            end and shape, else XLA), ``'xla'`` or ``'pallas'`` (on the CPU: interpret mode).
            Static.

    Returns:
        A boolean array of `x`'s shape.

    Raises:
        ValueError: ``n > m``, ``n < 1``, a scalar `x`, or an axis length not divisible by `m`.
        NotImplementedError: ``impl='pallas'`` on a GPU with a group length that is not a power
            of two.

    Example:
        >>> cljax.kernels.nm_mask(jnp.array([[0.1, -3.0, 2.0, 0.5]]), 2, 4)
        Array([[False,  True,  True, False]], dtype=bool)

    References:
        Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
        ICLR 2021. https://arxiv.org/abs/2102.04010
    """
    fn = "nm_mask"
    _check(fn, x, n, m, axis)
    chosen = _dispatch.resolve(fn, impl, "nm_mask", (jnp.size(x), m), str(jnp.result_type(x)))
    if chosen == "pallas":
        try:
            return pallas(x, n, m, axis=axis)
        except NotImplementedError:
            if impl == "pallas":
                raise  # asked for explicitly: never fall back silently
    return reference(x, n, m, axis=axis)
