"""The SLTrain product ``x @ (scale · a b + S)`` without materialising ``S``, with its gradient.

``a`` is ``(m, r)``, ``b`` is ``(r, n)`` and ``S`` is ``(m, n)`` with ``k`` values on a fixed
support of sorted flat row-major indices (as `cljax.sltrain_init` keeps them). The XLA reference
is `cljax.sltrain_apply`'s formula: ``scale · (x a) b`` plus a gather of ``x`` at the support's
rows and a segment sum into its columns.

The kernel never writes ``W`` or ``S`` to memory. The support is bucketed once, outside the
training step, into tiles of a ``(bk, bn)`` grid over ``S`` (`sltrain_tiles`): per tile, up to
``C`` entries with their in-tile row, column and position in `values`. A program owning a
``(bt, bn)`` output tile walks the contraction in ``bk`` chunks, builds the ``(bk, bn)`` tile of
``W = scale · a b + S`` on chip (the sparse part as a product of two one-hot matrices, exact in
float32) and accumulates ``x_chunk @ W_tile``. The gradient is a custom VJP:

* ``dx = dy Wᵀ``: the same kernel on the transposed tiles;
* ``da = scale · xᵀ (dy bᵀ)``, ``db = scale · (x a)ᵀ dy``: XLA products of rank-``r`` size;
* ``dvalues = (xᵀ dy)`` sampled at the support: a sampled product kernel that accumulates each
  ``(bk, bn)`` tile of ``xᵀ dy`` on chip and reads it at the tile's entries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cljax.kernels import _common, _dispatch
from cljax.kernels._common import pl, pltpu

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["rows", "cols", "src"],
    meta_fields=["shape", "block"],
)
@dataclasses.dataclass(frozen=True)
class SparseTiles:
    """A fixed sparse support bucketed by ``(bk, bn)`` tiles of its ``(m, n)`` matrix.

    Attributes:
        rows: int32 ``(Nt, Kt, C)``: in-tile row of each entry of tile ``(row tile, col tile)``
            stored at ``[col tile, row tile]``; 0 for padding.
        cols: int32 ``(Nt, Kt, C)``: in-tile column; 0 for padding.
        src: int32 ``(Nt, Kt, C)``: the entry's position in `values`; -1 for padding.
        shape: ``(m, n)``. Static.
        block: ``(bk, bn)``. Static.

    Example:
        >>> tiles = cljax.kernels.sltrain_tiles(jnp.array([0, 5, 7]), (4, 4), block=(2, 2))
        >>> tiles.transpose().shape, tiles.capacity
        ((4, 4), 16)
    """

    rows: Any
    cols: Any
    src: Any
    shape: tuple[int, int] = (0, 0)
    block: tuple[int, int] = (1, 1)

    @property
    def capacity(self) -> int:
        return int(self.src.shape[-1])

    def transpose(self) -> SparseTiles:
        """The tiles of ``Sᵀ`` (``(n, m)``, blocks ``(bn, bk)``)."""
        swap = lambda t: jnp.swapaxes(t, 0, 1)
        return SparseTiles(
            rows=swap(self.cols),
            cols=swap(self.rows),
            src=swap(self.src),
            shape=(self.shape[1], self.shape[0]),
            block=(self.block[1], self.block[0]),
        )


def _default_block() -> tuple[int, int]:
    return (256, 256) if jax.default_backend() == "tpu" else (64, 64)


def sltrain_tiles(
    support: Any,
    shape: tuple[int, int],
    *,
    block: tuple[int, int] | None = None,
    capacity: int | None = None,
) -> SparseTiles:
    """Buckets a fixed SLTrain support by tiles, for `sltrain_matmul`'s kernel. Call it once.

    Runs eagerly on the concrete support (it is fixed for the whole training run), never under
    `jit`. Each tile of the ``(m, n)`` matrix gets the same capacity ``C`` (a power of two
    >= 16, at least the fullest tile's count, or `capacity`).

    Args:
        support: The ``(k,)`` sorted flat row-major indices of one matrix (e.g. one entry of
            `cljax.sltrain_support`).
        shape: ``(m, n)`` of the matrix.
        block: ``(bk, bn)`` tile (default ``(64, 64)``; ``(256, 256)`` on a TPU), powers of two
            for the GPU kernel, multiples of 128 or whole dims for the TPU kernel.
        capacity: Entries per tile; default the fullest tile's count rounded up.

    Returns:
        A `SparseTiles`.

    Raises:
        TypeError: a traced `support`.
        ValueError: a support out of range, or a tile holding more than `capacity` entries.

    Example:
        >>> tiles = cljax.kernels.sltrain_tiles(jnp.array([0, 5, 7]), (4, 4), block=(2, 2))
        >>> tiles.src.shape
        (2, 2, 16)
    """
    fn = "sltrain_tiles"
    try:
        idx = np.asarray(support).astype(np.int64).reshape(-1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            f"{fn}: `support` is traced; build the tiles once, outside `jit`, from the concrete "
            "support."
        ) from err
    m, n = (int(s) for s in shape)
    bk, bn = block if block is not None else _default_block()
    if idx.size and (idx.min() < 0 or idx.max() >= m * n):
        raise ValueError(f"{fn}: `support` has indices outside [0, {m * n}) for shape {(m, n)}.")
    kt, nt = -(-m // bk), -(-n // bn)
    rows, cols = idx // n, idx % n
    tile = (cols // bn) * kt + rows // bk  # tiles ordered [col tile, row tile]
    counts = np.bincount(tile, minlength=nt * kt)
    fullest = int(counts.max()) if counts.size else 0
    if capacity is None:
        capacity = max(16, _common.next_pow2(fullest))
    elif fullest > capacity:
        raise ValueError(
            f"{fn}(capacity={capacity}) is too small: a ({bk}, {bn}) tile holds {fullest} entries."
        )
    order = np.argsort(tile, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(idx.size) - starts[tile[order]]
    out = {name: np.zeros((nt * kt, capacity), np.int32) for name in ("rows", "cols")}
    src = np.full((nt * kt, capacity), -1, np.int32)
    out["rows"][tile[order], slot] = rows[order] % bk
    out["cols"][tile[order], slot] = cols[order] % bn
    src[tile[order], slot] = order
    arrays = {k: jnp.asarray(v.reshape(nt, kt, capacity)) for k, v in {**out, "src": src}.items()}
    return SparseTiles(**arrays, shape=(m, n), block=(int(bk), int(bn)))


def _check(fn: str, x, a, b, values, support=None) -> tuple[int, int, int, int]:
    if jnp.ndim(a) != 2 or jnp.ndim(b) != 2 or jnp.shape(a)[1] != jnp.shape(b)[0]:
        raise ValueError(
            f"{fn}: `a` {jnp.shape(a)} and `b` {jnp.shape(b)} must be (m, r) and (r, n) factors."
        )
    m, r = jnp.shape(a)
    n = jnp.shape(b)[1]
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != m:
        raise ValueError(
            f"{fn}: `x` has shape {jnp.shape(x)}; its last dim must be the {m} rows of `a`."
        )
    if jnp.ndim(values) != 1 or (support is not None and jnp.shape(support) != jnp.shape(values)):
        raise ValueError(
            f"{fn}: `values` {jnp.shape(values)} and `support` "
            f"{None if support is None else jnp.shape(support)} must be (k,) vectors of one length."
        )
    return math.prod(jnp.shape(x)[:-1]), m, n, r


def reference(x, a, b, values, support, *, scale: Any = 1.0) -> jax.Array:
    """``x @ (scale · a b + S)`` in `jnp` (`cljax.sltrain_apply`'s formula), in float32."""
    _check("sltrain_matmul", x, a, b, values, support)
    n = b.shape[1]
    xf = jnp.asarray(x, _F32)
    low = scale * ((xf @ a.astype(_F32)) @ b.astype(_F32))
    rows, cols = support // n, support % n
    vals = values.astype(_F32).reshape((1,) * (xf.ndim - 1) + (-1,))
    contrib = xf[..., rows] * vals
    sparse = jnp.zeros((*xf.shape[:-1], n), _F32).at[..., cols].add(contrib)
    return (low + sparse).astype(jnp.result_type(x))


# ---------------------------------------------------------------------------------------------
# Kernels.


def _sparse_tile(rows, cols, vals, bk: int, bn: int) -> jax.Array:
    """The dense ``(bk, bn)`` tile of S from ``(1, C)`` in-tile rows, columns and values."""
    cap = rows.shape[-1]
    hit_rows = (jax.lax.broadcasted_iota(jnp.int32, (bk, cap), 0) == rows).astype(_F32)
    hit_cols = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (bn, cap), 0) == cols, vals, 0.0)
    return jax.lax.dot_general(
        hit_rows,
        hit_cols,
        (((1,), (1,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=_F32,
    )


def _sample_tile(tile, rows, cols) -> jax.Array:
    """``(1, C)``: a dense ``(bk, bn)`` tile read at the in-tile positions of its entries."""
    bk, bn = tile.shape
    cap = rows.shape[-1]
    hit_rows = (jax.lax.broadcasted_iota(jnp.int32, (bk, cap), 0) == rows).astype(_F32)
    hit_cols = (jax.lax.broadcasted_iota(jnp.int32, (bn, cap), 0) == cols).astype(_F32)
    picked = jnp.dot(tile, hit_cols, precision=_HIGHEST, preferred_element_type=_F32)  # (bk, C)
    return jnp.sum(picked * hit_rows, axis=0, keepdims=True)


def _fwd_gpu(x_ref, a_ref, b_ref, r_ref, c_ref, v_ref, o_ref, *, dims, block, scale):
    t_size, m, n = dims
    bt, bk, bn = block
    t0, n0 = pl.program_id(0) * bt, pl.program_id(1) * bn
    rank = a_ref.shape[1]
    b_valid = (jax.lax.broadcasted_iota(jnp.int32, (rank, bn), 1) + n0) < n
    b = _common.plgpu.load(b_ref, mask=b_valid, other=0).astype(_F32)

    def body(kk, acc):
        k0 = pl.multiple_of(kk * bk, bk)
        x_valid = _common.edge_mask((bt, bk), (t_size, m), (t0, k0))
        x = _common.plgpu.load(x_ref.at[:, pl.ds(k0, bk)], mask=x_valid, other=0).astype(_F32)
        a_valid = (jax.lax.broadcasted_iota(jnp.int32, (bk, rank), 0) + k0) < m
        a = _common.plgpu.load(a_ref.at[pl.ds(k0, bk), :], mask=a_valid, other=0).astype(_F32)
        entries = (r_ref[pl.ds(kk, 1), :], c_ref[pl.ds(kk, 1), :], v_ref[pl.ds(kk, 1), :])
        w = scale * jnp.dot(a, b, preferred_element_type=_F32) + _sparse_tile(*entries, bk, bn)
        return acc + jnp.dot(x, w, preferred_element_type=_F32)

    acc = jax.lax.fori_loop(0, pl.cdiv(m, bk), body, jnp.zeros((bt, bn), _F32))
    _common.store(o_ref, acc, "gpu", _common.edge_mask((bt, bn), (t_size, n), (t0, n0)))


def _fwd_tpu(x_ref, a_ref, b_ref, r_ref, c_ref, v_ref, o_ref, acc_ref, *, dims, block, scale):
    _, m, _ = dims
    _, bk, bn = block
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, a = x_ref[...].astype(_F32), a_ref[...].astype(_F32)
    if m % bk:  # zero the padding of the last chunk on both sides of the contraction
        x = jnp.where(kk * bk + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < m, x, 0.0)
        a = jnp.where(kk * bk + jax.lax.broadcasted_iota(jnp.int32, a.shape, 0) < m, a, 0.0)
    entries = (r_ref[pl.ds(kk, 1), :], c_ref[pl.ds(kk, 1), :], v_ref[pl.ds(kk, 1), :])
    w = scale * jnp.dot(a, b_ref[...].astype(_F32), preferred_element_type=_F32)
    w = w + _sparse_tile(*entries, bk, bn)
    acc_ref[...] += jnp.dot(x, w, preferred_element_type=_F32)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _sddmm_gpu(x_ref, dy_ref, r_ref, c_ref, o_ref, *, dims, block):
    t_size, m, n = dims
    bt, bk, bn = block
    n0, k0 = pl.program_id(0) * bn, pl.program_id(1) * bk

    def body(tt, acc):
        t0 = pl.multiple_of(tt * bt, bt)
        x_valid = _common.edge_mask((bt, bk), (t_size, m), (t0, k0))
        x = _common.plgpu.load(x_ref.at[pl.ds(t0, bt), :], mask=x_valid, other=0).astype(_F32)
        dy_valid = _common.edge_mask((bt, bn), (t_size, n), (t0, n0))
        dy = _common.plgpu.load(dy_ref.at[pl.ds(t0, bt), :], mask=dy_valid, other=0).astype(_F32)
        return acc + jax.lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=_F32
        )

    tile = jax.lax.fori_loop(0, pl.cdiv(t_size, bt), body, jnp.zeros((bk, bn), _F32))
    o_ref[...] = _sample_tile(tile, r_ref[...], c_ref[...])


def _sddmm_tpu(x_ref, dy_ref, r_ref, c_ref, o_ref, acc_ref, *, dims, block):
    t_size, m, n = dims
    bt, bk, bn = block
    n0, k0, tt = pl.program_id(0) * bn, pl.program_id(1) * bk, pl.program_id(2)

    @pl.when(tt == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, dy = x_ref[...].astype(_F32), dy_ref[...].astype(_F32)
    # Padding (rows beyond T, columns beyond m or n) must not reach the tile: zero it.
    x = jnp.where(_common.edge_mask((bt, bk), (t_size, m), (tt * bt, k0)), x, 0.0)
    dy = jnp.where(_common.edge_mask((bt, bn), (t_size, n), (tt * bt, n0)), dy, 0.0)
    acc_ref[...] += jax.lax.dot_general(
        x, dy, (((0,), (0,)), ((), ())), preferred_element_type=_F32
    )

    @pl.when(tt == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = _sample_tile(acc_ref[...], r_ref[...], c_ref[...])


def _tile_values(values, tiles: SparseTiles) -> jax.Array:
    safe = jnp.maximum(tiles.src, 0)
    return jnp.where(tiles.src >= 0, values.astype(_F32)[safe], 0.0)


def _pad_rank(a, b, target):
    """GPU dots need power-of-two dims >= 16: zero-pad the rank (adds nothing)."""
    r = a.shape[1]
    if target != "gpu":
        return a, b
    width = max(16, _common.next_pow2(r))
    return jnp.pad(a, ((0, 0), (0, width - r))), jnp.pad(b, ((0, width - r), (0, 0)))


def _forward(x2, a, b, tile_vals, tiles: SparseTiles, *, scale, target, bt, interpret):
    """``x2 @ (scale · a b + S)`` for ``x2`` of shape ``(T, m)``, in float32."""
    t_size, m = x2.shape
    n = b.shape[1]
    bk, bn = tiles.block
    kt, nt, cap = tiles.src.shape[1], tiles.src.shape[0], tiles.capacity
    a, b = _pad_rank(a.astype(_F32), b.astype(_F32), target)
    rank = a.shape[1]
    dims, block = (t_size, m, n), (bt, bk, bn)
    entry_arrays = (tiles.rows, tiles.cols, tile_vals)
    if target == "gpu":
        grid = (pl.cdiv(t_size, bt), nt)
        in_specs = [
            pl.BlockSpec((bt, m), lambda i, j: (i, 0)),
            pl.BlockSpec((m, rank), lambda i, j: (0, 0)),
            pl.BlockSpec((rank, bn), lambda i, j: (0, j)),
        ] + [pl.BlockSpec((None, kt, cap), lambda i, j: (j, 0, 0))] * 3
        out_spec = pl.BlockSpec((bt, bn), lambda i, j: (i, j))
        kernel = functools.partial(_fwd_gpu, dims=dims, block=block, scale=scale)
        scratch, semantics = [], None
    else:
        grid = (pl.cdiv(t_size, bt), nt, kt)
        in_specs = [
            pl.BlockSpec((bt, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk, rank), lambda i, j, k: (k, 0)),
            pl.BlockSpec((rank, bn), lambda i, j, k: (0, j)),
        ] + [pl.BlockSpec((None, kt, cap), lambda i, j, k: (j, 0, 0))] * 3
        out_spec = pl.BlockSpec((bt, bn), lambda i, j, k: (i, j))
        kernel = functools.partial(_fwd_tpu, dims=dims, block=block, scale=scale)
        scratch = [pltpu.VMEM((bt, bn), _F32)]
        semantics = ("parallel", "parallel", "arbitrary")
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((t_size, n), _F32),
        scratch_shapes=scratch,
        compiler_params=_common.compiler_params(target, semantics),
        interpret=interpret,
    )(x2, a, b, *entry_arrays)


def _sampled_product(x2, dy2, tiles: SparseTiles, *, target, bt, interpret) -> jax.Array:
    """``(xᵀ dy)`` at every tile entry: ``(Nt, Kt, C)`` float32 (padding entries read 0)."""
    t_size, m = x2.shape
    n = dy2.shape[1]
    bk, bn = tiles.block
    nt, kt, cap = tiles.src.shape
    dims, block = (t_size, m, n), (bt, bk, bn)
    out_spec_block = (None, None, 1, cap)
    if target == "gpu":
        grid = (nt, kt)
        in_specs = [
            pl.BlockSpec((t_size, bk), lambda j, k: (0, k)),
            pl.BlockSpec((t_size, bn), lambda j, k: (0, j)),
        ] + [pl.BlockSpec((None, None, 1, cap), lambda j, k: (j, k, 0, 0))] * 2
        out_spec = pl.BlockSpec(out_spec_block, lambda j, k: (j, k, 0, 0))
        kernel = functools.partial(_sddmm_gpu, dims=dims, block=block)
        scratch, semantics = [], None
    else:
        grid = (nt, kt, pl.cdiv(t_size, bt))
        in_specs = [
            pl.BlockSpec((bt, bk), lambda j, k, t: (t, k)),
            pl.BlockSpec((bt, bn), lambda j, k, t: (t, j)),
        ] + [pl.BlockSpec((None, None, 1, cap), lambda j, k, t: (j, k, 0, 0))] * 2
        out_spec = pl.BlockSpec(out_spec_block, lambda j, k, t: (j, k, 0, 0))
        kernel = functools.partial(_sddmm_tpu, dims=dims, block=block)
        scratch = [pltpu.VMEM((bk, bn), _F32)]
        semantics = ("parallel", "parallel", "arbitrary")
    entries = [t.reshape(nt, kt, 1, cap) for t in (tiles.rows, tiles.cols)]
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((nt, kt, 1, cap), _F32),
        scratch_shapes=scratch,
        compiler_params=_common.compiler_params(target, semantics),
        interpret=interpret,
    )(x2, dy2, *entries)
    return out.reshape(nt, kt, cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _product(x2, a, b, values, tiles, scale, target, bt, interpret):
    return _forward(
        x2,
        a,
        b,
        _tile_values(values, tiles),
        tiles,
        scale=scale,
        target=target,
        bt=bt,
        interpret=interpret,
    )


def _product_fwd(x2, a, b, values, tiles, scale, target, bt, interpret):
    out = _product(x2, a, b, values, tiles, scale, target, bt, interpret)
    return out, (x2, a, b, values, tiles)


def _product_bwd(scale, target, bt, interpret, res, dy):
    x2, a, b, values, tiles = res
    xf, af, bf, dyf = (t.astype(_F32) for t in (x2, a, b, dy))
    dx = _forward(
        dyf,
        bf.T,
        af.T,
        _tile_values(values, tiles.transpose()),
        tiles.transpose(),
        scale=scale,
        target=target,
        bt=bt,
        interpret=interpret,
    )
    da = scale * (xf.T @ (dyf @ bf.T))
    db = scale * ((xf @ af).T @ dyf)
    sampled = _sampled_product(xf, dyf, tiles, target=target, bt=bt, interpret=interpret)
    k = values.shape[0]
    where = jnp.where(tiles.src >= 0, tiles.src, k).reshape(-1)  # padding goes out of range
    dvalues = jnp.zeros((k,), _F32).at[where].add(sampled.reshape(-1), mode="drop")
    dtiles = jax.tree.map(lambda t: np.zeros(t.shape, jax.dtypes.float0), tiles)
    return (
        dx.astype(x2.dtype),
        da.astype(a.dtype),
        db.astype(b.dtype),
        dvalues.astype(values.dtype),
        dtiles,
    )


_product.defvjp(_product_fwd, _product_bwd)


def _check_tiles(fn: str, tiles: Any, m: int, n: int, k: int, target: str) -> None:
    if not isinstance(tiles, SparseTiles):
        raise TypeError(
            f"{fn}(tiles=...) must be the SparseTiles of `sltrain_tiles`, got {type(tiles).__name__}."
        )
    if tuple(tiles.shape) != (m, n):
        raise ValueError(
            f"{fn}: `tiles` were built for a {tiles.shape} matrix, but `a` and `b` give {(m, n)}."
        )
    bk, bn = tiles.block
    if target == "gpu" and not (_common.is_pow2(bk) and _common.is_pow2(bn) and min(bk, bn) >= 16):
        raise ValueError(
            f"{fn}: target='gpu' needs tile blocks that are powers of two >= 16, got {tiles.block}; "
            "rebuild the tiles with another `block`."
        )
    if target == "tpu" and not ((bk % 128 == 0 or bk == m) and (bn % 128 == 0 or bn == n)):
        raise ValueError(
            f"{fn}: target='tpu' needs tile blocks that are multiples of 128 or whole dims, got "
            f"{tiles.block}; rebuild the tiles with another `block`."
        )


def pallas(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    values: jax.Array,
    tiles: SparseTiles,
    *,
    scale: float = 1.0,
    target: Literal["gpu", "tpu"] | None = None,
    block_tokens: int | None = None,
    interpret: Any = None,
) -> jax.Array:
    """`reference` through the tiled kernels, differentiable (see the module docstring).

    Tested in interpret mode against the reference, and lowered to Triton IR (GPU) and Mosaic
    (TPU) in the tests; not yet compiled or run on a GPU or TPU.

    Args:
        x, a, b, values, scale: As in `sltrain_matmul` (`scale` a Python float here).
        tiles: `sltrain_tiles` of the support.
        target: ``'gpu'`` or ``'tpu'`` variant; default from the back end.
        block_tokens: Rows of `x` per output tile (default 64 on the GPU, 256 on the TPU; a
            power of two on the GPU, a multiple of 8 on the TPU).
        interpret: Interpret mode (default: on the CPU only).

    Returns:
        ``(..., n)`` in `x`'s dtype.
    """
    fn = "sltrain_matmul"
    t_size, m, n, _ = _check(fn, x, a, b, values)
    target = _common.resolve_target(fn, target)
    _check_tiles(fn, tiles, m, n, values.shape[0], target)
    bt = block_tokens if block_tokens is not None else (64 if target == "gpu" else 256)
    if target == "gpu" and not (_common.is_pow2(bt) and bt >= 16):
        raise ValueError(
            f"{fn}(block_tokens=...) must be a power of two >= 16 for target='gpu', got {bt}."
        )
    if target == "tpu" and bt % 8:
        raise ValueError(
            f"{fn}(block_tokens=...) must be a multiple of 8 for target='tpu', got {bt}."
        )
    if not isinstance(scale, (int, float)):
        raise TypeError(
            f"{fn}: the kernel path needs a Python float `scale`, got {type(scale).__name__}."
        )
    x2 = jnp.asarray(x).reshape(t_size, m)
    out = _product(
        x2, a, b, values, tiles, float(scale), target, bt, _common.resolve_interpret(interpret)
    )
    return out.reshape(*jnp.shape(x)[:-1], n).astype(jnp.result_type(x))


def sltrain_matmul(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    values: jax.Array,
    support: jax.Array,
    *,
    scale: float = 1.0,
    tiles: SparseTiles | None = None,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> jax.Array:
    """Returns ``x @ (scale · a b + S)`` for an SLTrain weight without forming ``W`` or ``S``.

    ``S`` holds `values` at the flat row-major `support` of an ``(m, n)`` matrix. The XLA path
    is `cljax.sltrain_apply`'s formula; the Pallas path builds tiles of ``W`` on chip from
    `tiles` and has a custom VJP (gradients for `x`, `a`, `b` and `values`).

    Args:
        x: Inputs ``(..., m)``.
        a: ``(m, r)`` factor.
        b: ``(r, n)`` factor.
        values: ``(k,)`` values of ``S``.
        support: ``(k,)`` int32 sorted flat indices of ``S`` (`cljax.sltrain_support`).
        scale: ``alpha / r``.
        tiles: ``sltrain_tiles(support, (m, n))``, built once outside `jit`; the Pallas path
            needs it (``'auto'`` without it runs XLA).
        impl: ``'auto'`` (Pallas only where `cljax.kernels` has a measured win for this back
            end and shape, else XLA), ``'xla'`` or ``'pallas'`` (on the CPU: interpret mode).
            Static.

    Returns:
        ``(..., n)`` in `x`'s dtype, accumulated in float32.

    Example:
        >>> a, b = jnp.ones((4, 2)), jnp.ones((2, 3))
        >>> support, values = jnp.array([1, 6]), jnp.array([1.0, 2.0])
        >>> cljax.kernels.sltrain_matmul(jnp.ones((1, 4)), a, b, values, support, scale=0.5)
        Array([[6., 5., 4.]], dtype=float32)

    References:
        Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
        pretraining", 2024.
    """
    fn = "sltrain_matmul"
    t_size, m, n, r = _check(fn, x, a, b, values, support)
    chosen = _dispatch.resolve(
        fn, impl, "sltrain_matmul", (t_size, m, n, r), str(jnp.result_type(x))
    )
    if chosen == "pallas":
        if tiles is None:
            if impl == "pallas":
                raise ValueError(
                    f"{fn}(impl='pallas') needs `tiles`: build them once with "
                    "cljax.kernels.sltrain_tiles(support, (m, n))."
                )
        else:
            return pallas(x, a, b, values, tiles, scale=scale)
    return reference(x, a, b, values, support, scale=scale)
