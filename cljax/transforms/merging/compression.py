"""Residual compression of task vectors: ComPEFT (MG-08).

* `compeft` — the sparse ternary task vector ``alpha * sigma * sign(tau)`` on the top-k entries.
* `compeft_compress` / `compeft_decompress` — the same, stored as bit-packed positions and signs
  plus one scale per tensor (`CompeftLeaf`); decompression reproduces `compeft` bitwise.

Storage per tensor of ``n`` entries with ``k`` kept: ``ceil(n / 8)`` bytes of position mask,
``ceil(k / 8)`` bytes of signs and 4 bytes of scale, i.e. at most ``n + k + 32`` bits plus two
bytes of padding: about ``1 + density`` bits per parameter instead of 32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax import _bits, _checks
from cljax.transforms.merging import task_vectors as _tv

__all__ = ["CompeftLeaf", "compeft", "compeft_compress", "compeft_decompress"]

_F32 = jnp.float32


class CompeftLeaf(NamedTuple):
    """One ComPEFT-compressed tensor; a pytree whose children are the three arrays.

    Bit order (fixed for interchange): position ``j`` of the row-major flattened tensor is bit
    ``7 - j % 8`` of ``mask[j // 8]`` (`numpy.packbits` big-endian order). ``signs`` holds one bit
    per kept entry, in row-major order of the kept positions, 1 for positive; unused trailing bits
    (kept entries that were exactly zero are not stored) are 0.
    """

    mask: jax.Array  # uint8[ceil(n / 8)]: bit-packed positions of the kept entries
    signs: jax.Array  # uint8[ceil(k / 8)]: bit-packed signs of the kept entries, 1 = positive
    scale: jax.Array  # float32 scalar: alpha * sigma, rounded to `dtype`
    shape: tuple[int, ...]  # static: the tensor's shape
    dtype: Any  # static: the tensor's dtype


jax.tree_util.register_pytree_node(
    CompeftLeaf,
    lambda c: ((c.mask, c.signs, c.scale), (c.shape, c.dtype)),
    lambda aux, children: CompeftLeaf(*children, *aux),
)


def _select(leaves: list, density: float, alpha: jax.Array):
    """Packs the leaves into buckets and selects per leaf, in bucket layout ``(B, width)``.

    Returns ``(buckets, kept, positive, scales)``: per bucket the kept-entry masks (top-k by
    magnitude, nonzero), the positive-sign masks and the float32 scales ``alpha * sigma`` per
    leaf row ``(B, 1)``, each rounded to its leaf's dtype.
    """
    flats = [jnp.asarray(x, _F32).reshape(-1) for x in leaves]
    buckets = _tv._pack(flats, batch_ndim=0)
    windows = {
        i: (0, _tv._count_of(density, n))
        for b in buckets
        for i, n in zip(b.ids, b.sizes, strict=True)
    }
    masks = _tv._window_masks(_tv._with_score(buckets, jnp.abs), windows, batch_ndim=0)
    kept, positive, scales = [], [], []
    for b, m in zip(buckets, masks, strict=True):
        kept.append(m & (b.data != 0))  # padding is 0, so never kept
        positive.append(b.data > 0)
        # Bessel-corrected standard deviation of each original leaf (torch.std), computed on the
        # leaf scaled by its largest magnitude so that squares neither overflow nor underflow.
        valid = _tv._valid(b, 0)
        n = jnp.asarray(b.sizes, _F32)[:, None]
        peak = jnp.max(jnp.abs(b.data), axis=-1, keepdims=True)
        y = b.data / jnp.where(peak > 0, peak, 1.0)
        dev = y - jnp.sum(y, axis=-1, keepdims=True) / n
        sq = jnp.square(dev) if valid is None else jnp.where(valid, jnp.square(dev), 0.0)
        var = jnp.sum(sq, axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
        sigma = jnp.where(n > 1, peak * jnp.sqrt(var), 0.0)  # (B, 1)
        rounded = [
            (alpha * sigma[j]).astype(leaves[i].dtype).astype(_F32) for j, i in enumerate(b.ids)
        ]
        scales.append(jnp.stack(rounded))
    return buckets, kept, positive, scales


def _ternary(mask, positive, scale, dtype, shape) -> jax.Array:
    s = scale.astype(dtype)
    return jnp.where(mask, jnp.where(positive, s, -s), jnp.zeros((), dtype)).reshape(shape)


@functools.partial(jax.jit, static_argnames="density")
def _compeft_core(task_vector, alpha, *, density):
    leaves, treedef = jax.tree.flatten(task_vector)
    leaves = [jnp.asarray(x) for x in leaves]
    buckets, kept, positive, scales = _select(leaves, density, alpha)
    # float32 values are exact in every leaf dtype: the scales are already rounded to it.
    dense = [
        jnp.where(k, jnp.where(p, s, -s), 0.0)
        for k, p, s in zip(kept, positive, scales, strict=True)
    ]
    flat = _tv._unpack(buckets, dense, [(x.size,) for x in leaves])
    out = [f.astype(x.dtype).reshape(x.shape) for f, x in zip(flat, leaves, strict=True)]
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames="density")
def _compress_core(task_vector, alpha, *, density):
    leaves, treedef = jax.tree.flatten(task_vector)
    leaves = [jnp.asarray(x) for x in leaves]
    buckets, kept, positive, scales = _select(leaves, density, alpha)
    out: list = [None] * len(leaves)
    for b, k, p, s in zip(buckets, kept, positive, scales, strict=True):
        counts = [_tv._count_of(density, n) for n in b.sizes]
        width = max(counts)
        slot = jnp.cumsum(k, axis=-1, dtype=jnp.int32) - 1
        rows = jnp.broadcast_to(jnp.arange(len(b.ids))[:, None], k.shape)
        signs = jnp.zeros((len(b.ids), width), jnp.bool_)
        signs = signs.at[rows, jnp.where(k, slot, width)].set(p, mode="drop")
        for j, (i, n, count) in enumerate(zip(b.ids, b.sizes, counts, strict=True)):
            x = leaves[i]
            out[i] = CompeftLeaf(
                mask=_bits.pack_bits(k[j, :n]),
                signs=_bits.pack_bits(signs[j, :count]),
                scale=s[j, 0],
                shape=tuple(x.shape),
                dtype=x.dtype,
            )
    for i, x in enumerate(leaves):  # empty leaves
        if out[i] is None:
            out[i] = CompeftLeaf(
                mask=jnp.zeros((0,), jnp.uint8),
                signs=jnp.zeros((0,), jnp.uint8),
                scale=jnp.zeros((), _F32),
                shape=tuple(x.shape),
                dtype=x.dtype,
            )
    return jax.tree.unflatten(treedef, out)


def _check_density_alpha(fn: str, task_vector: Any, density: Any, alpha: Any) -> float:
    _tv._check_float_leaves(fn, "task_vector", task_vector)
    density = _tv._static_fraction(fn, "density", density)
    _checks.check_in_range(fn, "alpha", alpha, 0.0, math.inf)
    return density


def compeft(task_vector: Any, density: float, alpha: jax.typing.ArrayLike) -> Any:
    """Returns the ComPEFT ternary task vector (dense): ``alpha * sigma * sign(tau)`` on the top-k.

    Per tensor (pytree leaf) of ``n`` entries: keep the ``k = floor(density * n)`` entries of
    largest magnitude (exactly k; ties to the earlier row-major entry), replace each by
    ``alpha * sigma * sign(tau)`` where ``sigma`` is the standard deviation of the *original*
    tensor, and zero the rest. Equal, bit for bit, to ``compeft_decompress(compeft_compress(...))``.

    Args:
        task_vector: A task-vector pytree ``theta_ft - theta_base``.
        density: Kept fraction in (0, 1]. Static.
        alpha: The scale multiplier, >= 0 (chosen on a small validation grid); may be traced.

    Returns:
        A pytree like `task_vector`, in its dtypes; each leaf has values in ``{-s, 0, s}``.

    Raises:
        TypeError: If a leaf is not floating point or `density` is traced.
        ValueError: If `density` is outside (0, 1] or `alpha` is negative.

    Example:
        >>> from cljax.transforms.merging.compression import compeft
        >>> [round(float(v), 4) for v in compeft({"w": jnp.array([0.5, -2.0, 1.0, 0.0])}, 0.5, 1.0)["w"]]
        [0.0, -1.315, 1.315, 0.0]

    Notes:
        The authors' code flattens all adapter tensors into one vector (one top-k and one sigma for
        the whole update) and keeps ``floor(density n) + 1`` entries plus ties at the threshold;
        here both are per tensor with exactly ``floor(density n)`` entries, which is what makes the
        per-tensor compressed format static. ``sigma`` is Bessel-corrected (``torch.std``); a tensor
        with one entry has ``sigma = 0``. Kept entries that are exactly zero stay zero.

    References:
        Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
        Sparsification and Quantization", 2023. https://arxiv.org/abs/2311.13171
    """
    density = _check_density_alpha("compeft", task_vector, density, alpha)
    return _compeft_core(task_vector, jnp.asarray(alpha, _F32), density=density)


def compeft_compress(task_vector: Any, density: float, alpha: jax.typing.ArrayLike) -> Any:
    """Compresses a task vector with ComPEFT into bit-packed positions, signs and one scale.

    Same selection as `compeft` (per tensor, exactly ``floor(density * n)`` largest magnitudes,
    scale ``alpha * sigma`` of the original tensor), stored as a `CompeftLeaf` per leaf:
    ``ceil(n / 8) + ceil(k / 8) + 4`` bytes instead of ``4 n``. Jittable (``density`` static).

    Args:
        task_vector: A task-vector pytree.
        density: Kept fraction in (0, 1]. Static.
        alpha: The scale multiplier, >= 0; may be traced.

    Returns:
        A pytree with `task_vector`'s structure whose leaves are `CompeftLeaf` nodes.

    Raises:
        TypeError: If a leaf is not floating point or `density` is traced.
        ValueError: If `density` is outside (0, 1] or `alpha` is negative.

    Example:
        >>> from cljax.transforms.merging.compression import compeft_compress, compeft_decompress
        >>> c = compeft_compress({"w": jnp.arange(-8.0, 8.0)}, 0.25, 1.0)
        >>> [int(x.nbytes) for x in jax.tree.leaves(c)]
        [2, 1, 4]
        >>> [round(float(v), 3) for v in compeft_decompress(c)["w"][jnp.array([0, 2, 3, 15])]]
        [-4.761, -4.761, 0.0, 4.761]

    Notes:
        See `compeft` for the departures from the authors' code (per-tensor scope and count).

    References:
        Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
        Sparsification and Quantization", 2023. https://arxiv.org/abs/2311.13171
    """
    density = _check_density_alpha("compeft_compress", task_vector, density, alpha)
    return _compress_core(task_vector, jnp.asarray(alpha, _F32), density=density)


def _is_compeft_leaf(x: Any) -> bool:
    return isinstance(x, CompeftLeaf)


def compeft_decompress(compressed: Any) -> Any:
    """Decompresses the output of `compeft_compress` into the dense ternary task vector.

    The result is bitwise equal to `compeft` with the same arguments; add it to the base model
    with `apply_task_vector`.

    Args:
        compressed: A pytree whose leaves are `CompeftLeaf` nodes.

    Returns:
        The dense task vector, each leaf in its original shape and dtype.

    Raises:
        TypeError: If a leaf is not a `CompeftLeaf`.
        ValueError: If a leaf's packed mask does not match its shape.
    """
    paths = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=_is_compeft_leaf)[0]
    for path, c in paths:
        if not _is_compeft_leaf(c):
            raise TypeError(
                f"compeft_decompress: leaf '{_checks.leaf_name(path)}' is a "
                f"{type(c).__name__}, not a CompeftLeaf. Pass the output of compeft_compress."
            )
        expected = _bits.packed_size(c.shape)
        if tuple(c.mask.shape) != (expected,):
            raise ValueError(
                f"compeft_decompress: leaf '{_checks.leaf_name(path)}' has a packed mask of shape "
                f"{tuple(c.mask.shape)}; its shape {c.shape} needs ({expected},). Pass the output "
                "of compeft_compress unchanged."
            )

    return _decompress_core(compressed)


def _decompress_leaf(c: CompeftLeaf) -> jax.Array:
    n = math.prod(c.shape)
    n_signs = c.signs.shape[0] * 8
    if n == 0 or n_signs == 0:
        return jnp.zeros(c.shape, c.dtype)
    mask = _bits.unpack_bits(c.mask, (n,))
    bits = _bits.unpack_bits(c.signs, (n_signs,))
    slot = jnp.clip(jnp.cumsum(mask.astype(jnp.int32)) - 1, 0, n_signs - 1)
    return _ternary(mask, bits[slot], c.scale, c.dtype, c.shape)


_decompress_core = jax.jit(
    lambda compressed: jax.tree.map(_decompress_leaf, compressed, is_leaf=_is_compeft_leaf)
)
