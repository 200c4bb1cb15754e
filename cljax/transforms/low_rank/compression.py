"""Low-rank residual compression and spectral edits of weight deltas (LR-06, LR-14, LR-15).

* `compress_low_rank` / `decompress_low_rank` — store a fine-tuned model as its base plus a
  truncated SVD of each matrix residual, with a fixed rank, an energy threshold, the effective
  rank, or a global float budget (ERE).
* `timber` — keep the effective-rank head of each instruct-minus-base delta and shrink its tail.
* `lorc_compensate` — low-rank compensation of a quantization error (LoRC).
* `effective_rank` — ``exp`` of the entropy of the normalised singular values.
* `low_rank_storage_bytes` — the stored size of a compressed tree (quantized factors at ``k``
  bits a code).

These run eagerly: with the energy, effective-rank and budget policies the stored rank depends on
the data, so they cannot be traced by `jit` (the fixed-rank policy can).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax import _checks
from cljax.transforms.low_rank import _bases
from cljax.tree import MatrixSpec, as_matrices, from_matrices

__all__ = [
    "LowRankResidual",
    "compress_low_rank",
    "decompress_low_rank",
    "effective_rank",
    "lorc_compensate",
    "low_rank_storage_bytes",
    "timber",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["left", "right", "left_scale", "right_scale"],
    meta_fields=["spec", "bits"],
)
@dataclasses.dataclass(frozen=True)
class LowRankResidual:
    """A compressed matrix residual ``Δ ≈ left @ right`` in the leaf's matrix view.

    Quantized (``bits = k``): `left` and `right` hold int8 codes ``c`` and the factors are
    ``c · scale``, with one float32 scale per rank component of each factor (a column of `left`,
    a row of `right`).

    Attributes:
        left: ``(*batch, m, r)``: ``U_r Σ_r^½`` (or its codes).
        right: ``(*batch, r, n)``: ``Σ_r^½ V_rᵀ`` (or its codes).
        spec: The `MatrixSpec` of the view. Static.
        left_scale: ``(*batch, r)`` float32 scales of `left`'s columns, or None (not quantized).
        right_scale: ``(*batch, r)`` float32 scales of `right`'s rows, or None.
        bits: Bits ``k`` a code, or None (not quantized). Static.
    """

    left: Any
    right: Any
    spec: MatrixSpec = MatrixSpec()
    left_scale: Any = None
    right_scale: Any = None
    bits: int | None = None


def _is_residual(x: Any) -> bool:
    return isinstance(x, LowRankResidual)


def _entropy_rank(s: jax.Array) -> jax.Array:
    """``exp(−Σ p log p)``, ``p = σ / Σσ``, over the last axis; 0 for an all-zero spectrum."""
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.where(total > 0, total, 1.0)
    logs = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    erank = jnp.exp(-jnp.sum(p * logs, axis=-1))
    return jnp.where(total[..., 0] > 0, erank, 0.0)


def effective_rank(matrix: jax.Array) -> jax.Array:
    """Effective rank ``exp(−Σ pᵢ log pᵢ)``, ``pᵢ = σᵢ / Σσ``, of a matrix or a stack of them.

    1 for a rank-1 matrix, ``n`` for ``c · I_n``, 0 for a zero matrix. Leading axes of an input
    with more than two dims are batch axes.

    Example:
        >>> float(cljax.effective_rank(3.0 * jnp.eye(4)))
        4.0

    References:
        Roy and Vetterli, "The effective rank: A measure of effective dimensionality", 2007.
    """
    x = jnp.asarray(matrix, jnp.float32)
    if x.ndim < 2:
        raise ValueError(
            f"effective_rank: `matrix` has shape {x.shape}; it needs at least two dims."
        )
    s = jnp.linalg.svd(x, compute_uv=False)
    return _entropy_rank(s)


def _matrix_leaves(fn, reference, other, targets, matrix_spec, names=("finetuned", "base")):
    if not isinstance(matrix_spec, MatrixSpec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec, got {type(matrix_spec).__name__}."
        )
    _checks.check_same_structure(fn, **{names[0]: reference, names[1]: other})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(reference)
    if targets is None:
        chosen = [jnp.ndim(x) >= 2 for _, x in leaves]
    else:
        if not callable(targets):
            raise TypeError(
                f"{fn}(targets=...) must be a function params -> tree of bools, got {type(targets).__name__}."
            )
        chosen = [bool(c) for c in treedef.flatten_up_to(targets(reference))]
        for (path, x), sel in zip(leaves, chosen, strict=True):
            if sel and jnp.ndim(x) < 2:
                raise ValueError(
                    f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {jnp.shape(x)}; a compressed leaf needs two or more dims."
                )
    return leaves, treedef, treedef.flatten_up_to(other), chosen


def _quantize(x: jax.Array, bits: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax quantization to ``bits`` bits along `axis` (reduced per component).

    ``scale = max |x| / (2^{k−1} − 1)`` over `axis` (1 for an all-zero component),
    ``code = clip(round(x / scale), −(2^{k−1} − 1), 2^{k−1} − 1)`` as int8.
    """
    levels = 2 ** (bits - 1) - 1
    absmax = jnp.max(jnp.abs(x), axis=axis)
    scale = jnp.where(absmax > 0, absmax / levels, 1.0).astype(jnp.float32)
    codes = jnp.clip(jnp.round(x / jnp.expand_dims(scale, axis)), -levels, levels)
    return codes.astype(jnp.int8), scale


def _factors(part: LowRankResidual) -> tuple[jax.Array, jax.Array]:
    """The float32 ``(left, right)`` factors of a residual, decoding quantized codes."""
    left = part.left.astype(jnp.float32)
    right = part.right.astype(jnp.float32)
    if part.left_scale is not None:
        left = left * part.left_scale[..., None, :]
        right = right * part.right_scale[..., :, None]
    return left, right


def _svd_all(delta: jax.Array):
    k = min(delta.shape[-2:])
    return jax.vmap(lambda d: _bases.svd_factors(d, k))(delta)


def compress_low_rank(
    finetuned: Any,
    base: Any,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    by_effective_rank: bool = False,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
    bits: int | None = None,
) -> Any:
    """Compresses ``finetuned − base`` leaf by leaf: truncated SVD for matrices, exact otherwise.

    Each targeted matrix ``Δ = U Σ Vᵀ`` (float32) keeps ``r`` components as a `LowRankResidual`
    ``(U_r Σ_r^½, Σ_r^½ V_rᵀ)``; other leaves keep their exact residual. Exactly one rank policy:

    * `rank`: ``r = min(rank, m, n)`` per matrix;
    * `energy`: the smallest ``r`` with ``Σ_{i≤r} σᵢ² / Σ σᵢ² ≥ energy``;
    * `by_effective_rank`: ``r = ⌈eRank(σ)⌉`` (the Timber rule);
    * `budget`: singular values of all matrices taken greedily by ``σ²`` while the stored floats
      ``Σ r_l (m_l + n_l)`` stay within `budget` (the first one that does not fit ends it).

    A stack of matrices stores the largest rank of the stack; the others' extra columns are zero.

    With `bits` ``= k`` the factors are stored as ``k``-bit codes (held in int8) with a float32
    absmax scale per rank component (``s_j = max |column_j| / (2^{k−1} − 1)``,
    ``code = round(x / s_j)``): each entry is off by at most ``s_j / 2``. Σ is split as
    ``Σ^½`` on both sides before quantizing, so both factors have the same per-component scale
    range. `low_rank_storage_bytes` gives the stored size, ``r (m + n) k / 8`` bytes plus ``2 r``
    float32 scales per matrix.

    Args:
        finetuned: Fine-tuned parameters.
        base: Base parameters, same structure and shapes.
        rank, energy, budget, by_effective_rank: The rank policy (exactly one).
        targets: Function ``params -> tree of bools`` of the compressed leaves (default: every
            leaf with two or more dims).
        matrix_spec: Matrix view of the compressed leaves.
        bits: Bits ``k`` a factor entry, in [2, 8], or None to keep the factors in the
            parameters' dtype.

    Returns:
        A tree of `LowRankResidual` and exact-residual leaves; `decompress_low_rank` decodes it.

    Raises:
        ValueError, TypeError: no or several rank policies; out-of-range values; trees of
            different structure or shapes.

    Example:
        >>> base = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
        >>> tuned = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
        >>> packed = cljax.compress_low_rank(tuned, base, rank=1)
        >>> packed["w"].left.shape, packed["b"].shape
        ((4, 1), (3,))

    References:
        Ryu et al., "Efficient Storage of Fine-Tuned Models via Low-Rank Approximation of Weight
        Residuals", 2023.
    """
    fn = "compress_low_rank"
    chosen_policies = [
        rank is not None,
        energy is not None,
        budget is not None,
        bool(by_effective_rank),
    ]
    if sum(chosen_policies) != 1:
        raise ValueError(
            f"{fn}: pass exactly one of rank=, energy=, budget= or by_effective_rank=True."
        )
    if rank is not None:
        _checks.check_int(fn, "rank", rank, 0)
    if energy is not None:
        _checks.check_in_range(fn, "energy", energy, 0.0, 1.0)
    if budget is not None:
        _checks.check_int(fn, "budget", budget, 0)
    if bits is not None:
        _checks.check_int(fn, "bits", bits, 2)
        if bits > 8:
            raise ValueError(f"{fn}(bits=...) must be in [2, 8] (int8 codes), got {bits}.")
    leaves, treedef, others, chosen = _matrix_leaves(fn, finetuned, base, targets, matrix_spec)

    decomposed = {}
    for i, ((path, w1), w0, sel) in enumerate(zip(leaves, others, chosen, strict=True)):
        if sel:
            name = _checks.leaf_name(path)
            delta = as_matrices(
                jnp.asarray(w1, jnp.float32) - jnp.asarray(w0, jnp.float32), matrix_spec, name
            )
            decomposed[i] = _svd_all(delta)

    ranks: dict[int, np.ndarray] = {}
    if budget is not None:
        items = []  # (σ², cost, leaf, matrix)
        for i, (u, s, v) in decomposed.items():
            cost = u.shape[1] + v.shape[1]
            s_np = np.asarray(s, np.float64)
            ranks[i] = np.zeros(s_np.shape[0], np.int64)
            for j in range(s_np.shape[0]):
                for k in range(s_np.shape[1]):
                    items.append((s_np[j, k] ** 2, cost, i, j, k))
        items.sort(key=lambda t: (-t[0], t[2], t[3], t[4]))  # by energy; within a matrix, in order
        spent = 0
        for energy_k, cost, i, j, _ in items:
            if energy_k <= 0 or spent + cost > budget:
                break
            spent += cost
            ranks[i][j] += 1
    for i, (_, s, _) in decomposed.items():
        s_np = np.asarray(s, np.float64)
        full = s_np.shape[1]
        if rank is not None:
            ranks[i] = np.full(s_np.shape[0], min(rank, full))
        elif energy is not None:
            sq = s_np**2
            total = sq.sum(axis=1, keepdims=True)
            frac = np.cumsum(sq, axis=1) / np.where(total > 0, total, 1.0)
            need = np.argmax(frac >= energy - 1e-7, axis=1) + 1
            ranks[i] = np.where(total[:, 0] > 0, np.minimum(need, full), 0)
            if energy == 0.0:
                ranks[i] = np.zeros_like(ranks[i])
        elif by_effective_rank:
            erank = np.asarray(_entropy_rank(jnp.asarray(s_np, jnp.float32)), np.float64)
            ranks[i] = np.minimum(np.ceil(erank - 1e-6), full).astype(np.int64)

    out = []
    for i, ((path, w1), w0, sel) in enumerate(zip(leaves, others, chosen, strict=True)):
        dtype = jnp.result_type(w1)
        if not sel:
            out.append((jnp.asarray(w1, jnp.float32) - jnp.asarray(w0, jnp.float32)).astype(dtype))
            continue
        u, s, v = decomposed[i]
        r = int(ranks[i].max()) if ranks[i].size else 0
        keep = (np.arange(r)[None, :] < ranks[i][:, None]).astype(np.float32)  # (batch, r)
        root = jnp.sqrt(s[:, :r]) * jnp.asarray(keep)
        left = u[:, :, :r] * root[:, None, :]
        right = jnp.swapaxes(v[:, :, :r] * root[:, None, :], -1, -2)
        name = _checks.leaf_name(path)
        batch_axes, _, _ = matrix_spec.axes(jnp.ndim(w1), name)
        batch_shape = tuple(jnp.shape(w1)[ax] for ax in batch_axes)
        left = left.reshape(*batch_shape, *left.shape[-2:])
        right = right.reshape(*batch_shape, *right.shape[-2:])
        if bits is None:
            out.append(LowRankResidual(left.astype(dtype), right.astype(dtype), matrix_spec))
            continue
        left_codes, left_scale = _quantize(left, bits, axis=-2)
        right_codes, right_scale = _quantize(right, bits, axis=-1)
        out.append(
            LowRankResidual(left_codes, right_codes, matrix_spec, left_scale, right_scale, bits)
        )
    return treedef.unflatten(out)


def decompress_low_rank(base: Any, compressed: Any) -> Any:
    """Decodes `compress_low_rank`: ``base + left @ right`` or ``base + Δ``, leaf by leaf.

    Example:
        >>> base = {"w": jnp.zeros((4, 3))}
        >>> packed = cljax.compress_low_rank({"w": jnp.ones((4, 3))}, base, rank=1)
        >>> bool(jnp.allclose(cljax.decompress_low_rank(base, packed)["w"], 1.0, atol=1e-5))
        True
    """
    fn = "decompress_low_rank"
    leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    try:
        parts = treedef.flatten_up_to(compressed)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{fn}: `compressed` must have the structure of `base` ({err}).") from err
    out = []
    for (path, w0), part in zip(leaves, parts, strict=True):
        dtype = jnp.result_type(w0)
        if _is_residual(part):
            left, right = _factors(part)
            batch = math.prod(left.shape[:-2])
            prod = jnp.einsum(
                "bmr,brn->bmn",
                left.reshape(batch, *left.shape[-2:]),
                right.reshape(batch, *right.shape[-2:]),
            )
            delta = from_matrices(prod, part.spec, jnp.shape(w0), _checks.leaf_name(path))
        else:
            if jnp.shape(part) != jnp.shape(w0):
                raise ValueError(
                    f"{fn}: leaf '{_checks.leaf_name(path)}' has residual shape {jnp.shape(part)} but base shape {jnp.shape(w0)}."
                )
            delta = jnp.asarray(part, jnp.float32)
        out.append((jnp.asarray(w0, jnp.float32) + delta).astype(dtype))
    return treedef.unflatten(out)


def timber(
    instruct: Any, base: Any, *, gamma: float = 0.0, matrix_spec: MatrixSpec = MatrixSpec()
) -> Any:
    """Timber: keeps the effective-rank head of each ``instruct − base`` delta, shrinks the rest.

    For every leaf with two or more dims: ``Δ = U S Vᵀ``, ``k = ⌈eRank(S)⌉``; singular values
    beyond the first ``k`` are multiplied by `gamma`; returns ``base + U S' Vᵀ``. 1-D leaves keep
    their instruct values.

    Args:
        instruct: Instruction-tuned parameters.
        base: Base parameters (same structure and shapes).
        gamma: Factor on the tail (0 truncates to rank ``k``; 1 returns `instruct`).
        matrix_spec: Matrix view of the leaves with two or more dims.

    Example:
        >>> out = cljax.timber({"w": jnp.eye(3)}, {"w": jnp.zeros((3, 3))}, gamma=0.2)

    References:
        Wu et al., "Timber: Training-free Instruct Model Refining with Base via Effective Rank",
        2025. https://arxiv.org/abs/2509.23595
    """
    fn = "timber"
    _checks.check_in_range(fn, "gamma", gamma, 0.0, 1.0)
    leaves, treedef, others, chosen = _matrix_leaves(
        fn, instruct, base, None, matrix_spec, names=("instruct", "base")
    )
    out = []
    for (path, wi), wb, sel in zip(leaves, others, chosen, strict=True):
        if not sel:
            out.append(wi)
            continue
        name = _checks.leaf_name(path)
        delta = as_matrices(
            jnp.asarray(wi, jnp.float32) - jnp.asarray(wb, jnp.float32), matrix_spec, name
        )
        u, s, v = _svd_all(delta)
        k = jnp.ceil(_entropy_rank(s) - 1e-6)[:, None]  # (batch, 1)
        idx = jnp.arange(s.shape[1])[None, :]
        s_new = jnp.where(idx < k, s, gamma * s)
        edited = jnp.einsum("bmr,bnr->bmn", u * s_new[:, None, :], v)
        new = jnp.asarray(wb, jnp.float32) + from_matrices(edited, matrix_spec, jnp.shape(wi), name)
        out.append(new.astype(jnp.result_type(wi)))
    return treedef.unflatten(out)


def low_rank_storage_bytes(compressed: Any) -> int:
    """Bytes to store a `compress_low_rank` tree.

    A `LowRankResidual` of ``b`` matrices of rank ``r`` takes ``b r (m + n) · itemsize`` bytes,
    or, quantized to ``k`` bits, ``⌈b r (m + n) k / 8⌉`` bytes of packed codes plus ``2 b r``
    float32 scales (``8 b r`` bytes); an exact residual takes its size times its itemsize.
    In memory the codes are held one per int8; this counts them packed, as stored on disk.

    Args:
        compressed: A tree from `compress_low_rank`.

    Returns:
        The number of bytes (a Python int).

    Example:
        >>> base = {"w": jnp.zeros((4, 3))}
        >>> packed = cljax.compress_low_rank({"w": jnp.ones((4, 3))}, base, rank=1, bits=4)
        >>> cljax.low_rank_storage_bytes(packed)  # ceil(1 · 7 · 4 / 8) + 2 · 4
        12
    """
    total = 0
    for x in jax.tree.leaves(compressed, is_leaf=_is_residual):
        if not _is_residual(x):
            total += int(np.prod(jnp.shape(x))) * jnp.dtype(jnp.result_type(x)).itemsize
            continue
        codes = int(np.prod(jnp.shape(x.left))) + int(np.prod(jnp.shape(x.right)))
        if x.bits is None:
            total += codes * jnp.dtype(jnp.result_type(x.left)).itemsize
        else:
            total += -(-codes * x.bits // 8) + 4 * (
                int(np.prod(jnp.shape(x.left_scale))) + int(np.prod(jnp.shape(x.right_scale)))
            )
    return total


def lorc_compensate(
    params: Any,
    quantized: Any,
    *,
    rank: int = 8,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> Any:
    """LoRC: rank-`rank` factors of each quantization error ``E = W − Q(W)``.

    ``compress_low_rank(params, quantized, rank=rank)``: serve
    ``decompress_low_rank(quantized, factors) = Q(W) + U_r Σ_r^½ Σ_r^½ V_rᵀ``. The quantizer is
    yours; the factors stay in the parameters' dtype (the paper may quantize them too).

    Example:
        >>> w = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
        >>> q = jax.tree.map(lambda x: jnp.round(x * 4) / 4, w)
        >>> fixed = cljax.decompress_low_rank(q, cljax.lorc_compensate(w, q, rank=1))

    References:
        Yao et al., "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from
        Comprehensive Study to Low Rank Compensation", 2023. https://arxiv.org/abs/2303.08302
    """
    _checks.check_int("lorc_compensate", "rank", rank, 1)
    return compress_low_rank(params, quantized, rank=rank, targets=targets, matrix_spec=matrix_spec)
