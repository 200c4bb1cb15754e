"""Private building blocks of the sparse family: exact top-k selection, row-wise bit packing,
path matching of masks to parameters, and inner-state surgery tied to parameter leaves.

Top-k never sorts a leaf: the k-th largest score is found by a radix select over the float's
order-preserving uint32 key (two histogram passes of 16-bit digits), then ties at the threshold
are resolved by position (earlier leaf in tree order, then earlier row-major index; two more
histogram passes, only when a tie straddles the cut), so "keep the top k" keeps exactly k
entries. Histograms are scatter-adds and reductions, so the selection is correct under sharded
`jit`; `k` may be a traced int32 (a scheduled density). Totals beyond int32 use a 32-step
bisection with counts in 16-bit limbs.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cljax import _checks

_INT32_MAX = 2**31 - 1
_F32 = jnp.float32


def key_data(seed: Any) -> jax.Array:
    """Raw uint32 key data from an int seed, a typed key or raw key data."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    arr = jnp.asarray(seed)
    if arr.ndim == 0:
        return jax.random.key_data(jax.random.key(arr))
    return arr.astype(jnp.uint32)


def is_none(x: Any) -> bool:
    return x is None


def is_none_or_masked(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def path_name(path) -> str:
    """``'enc/w'`` for a key path; ``''`` for a bare-array root."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def path_hash(path) -> int:
    """A hash of a key path that is the same in every process (unlike `hash`)."""
    return zlib.crc32(path_name(path).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Counts.


def count_of(density: float, size: int, *, rounding: str = "ceil") -> int:
    """Number of kept entries for a static density: ``ceil(density * size)`` (at least one entry
    for any positive density) or ``floor``; products within 1e-9 of an integer are that integer."""
    exact = density * size
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, abs(exact)):
        return int(min(size, max(0, nearest)))
    value = math.ceil(exact) if rounding == "ceil" else math.floor(exact)
    return int(min(size, max(0, value)))


def traced_count_of(density: Any, size: int, *, rounding: str = "ceil") -> Any:
    """`count_of` for a density that may be traced: a Python int when `density` is concrete, an
    int32 scalar computed in float32 otherwise (exact for leaves below 2**24 entries)."""
    number = _checks._as_float(density)
    if number is not None:
        return count_of(number, size, rounding=rounding)
    exact = jnp.asarray(density, _F32) * size
    nearest = jnp.round(exact)
    close = jnp.abs(exact - nearest) <= 1e-6 * jnp.maximum(1.0, jnp.abs(exact))
    value = jnp.where(close, nearest, jnp.ceil(exact) if rounding == "ceil" else jnp.floor(exact))
    return jnp.clip(value, 0, size).astype(jnp.int32)


def check_density(fn: str, density: Any, arg: str = "density") -> None:
    """Density must lie in (0, 1] (checked when concrete)."""
    _checks.check_in_range(fn, arg, density, 0.0, 1.0, low_inclusive=False)


# ---------------------------------------------------------------------------------------------
# Order-preserving keys and exact top-k.


def sortable(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values of `x` (``-0 == +0``)."""
    x = jnp.asarray(x, _F32)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = bits >= jnp.uint32(0x80000000)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _wide(count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A non-negative int32 count as exact (high, low) 16-bit limbs."""
    return count >> 16, count & 0xFFFF


def _wide_add(a, b):
    high, low = a[0] + b[0], a[1] + b[1]
    return high + (low >> 16), low & 0xFFFF


def _wide_target(k: Any):
    """(high, low) limbs of a count that is a Python int or a traced int32."""
    if isinstance(k, int):
        return k >> 16, k & 0xFFFF
    k = jnp.asarray(k, jnp.int32)
    return k >> 16, k & 0xFFFF


def _wide_at_least(a, target) -> jax.Array:
    return (a[0] > target[0]) | ((a[0] == target[0]) & (a[1] >= target[1]))


def _wide_minus(target, a) -> jax.Array:
    """``clip(target - a, 0, 2**31 - 1)`` as int32."""
    diff_high = target[0] - a[0]
    diff_low = target[1] - a[1]
    saturated = diff_high >= (1 << 15) - 1
    value = jnp.clip(diff_high, -1, (1 << 15) - 2) * 65536 + diff_low
    return jnp.where(saturated, _INT32_MAX, jnp.clip(value, 0, _INT32_MAX)).astype(jnp.int32)


def _count(pred: jax.Array) -> jax.Array:
    return jnp.sum(pred, dtype=jnp.int32)


def _upper_mid(lo, hi):
    span = hi - lo
    return lo + (span >> 1) + (span & jnp.uint32(1))


def top_k_from_keys(keys: Sequence[jax.Array], k: Any, *, scope: str) -> list[jax.Array]:
    """Boolean masks of the `k` largest uint32 `keys`, exact, ties to the earlier position.

    With ``scope='layer'``, `k` is a sequence with one count per array (Python ints or traced
    int32 scalars); with ``scope='global'``, one count over all arrays together, ties going to
    the earlier array in the sequence, then to the earlier row-major index.
    """
    keys = [jnp.asarray(x, jnp.uint32) for x in keys]
    if not keys:
        return []
    total = sum(x.size for x in keys)
    counts = list(k) if scope == "layer" else [k]
    too_big = any(isinstance(c, int) and c > _INT32_MAX for c in counts)
    if total > _INT32_MAX or too_big:  # int32 histograms would overflow: 64-bit limbs
        return _top_k_bisect(keys, k, scope=scope)
    return _top_k_radix(keys, k, scope=scope)


# Radix select: a key is two 16-bit digits. One histogram pass over the high digits finds the
# threshold's high digit, a second over the low digits of the entries with that high digit finds
# the rest, and the same histograms give the counts above and at the threshold. Ties across the
# cut are resolved by two more histogram passes over the positions of the tied entries (only when
# some quota is partial). Histograms are scatter-adds of int32 ones; their prefix sums are taken
# in two levels of 256 so that only small arrays are scanned.

_DIGIT = 16
_BINS = 1 << _DIGIT


def _histogram(index: jax.Array, bins: int) -> jax.Array:
    """int32 counts of the int32 `index` values in ``[0, bins)``; other values are dropped."""
    flat = index.reshape(-1)
    return jnp.zeros((bins,), jnp.int32).at[flat].add(jnp.ones_like(flat), mode="drop")


def _suffix(x: jax.Array) -> jax.Array:
    """``out[..., d] = sum(x[..., d:])`` along the last axis."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1, dtype=jnp.int32), -1)


def _take(x: jax.Array, i: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]


def _locate(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For digit counts ``hist (..., 65536)`` and int32 targets ``k (...)``: the largest digit
    `d` with ``#{digit >= d} >= k`` (0 when there is none), ``#{digit > d}`` and ``#{digit == d}``."""
    lead = hist.shape[:-1]
    blocks = hist.reshape(lead + (256, 256))
    rows = jnp.sum(blocks, axis=-1, dtype=jnp.int32)
    row_suffix = _suffix(rows)
    r = jnp.maximum(jnp.sum(row_suffix >= k[..., None], axis=-1, dtype=jnp.int32) - 1, 0)
    above_row = _take(row_suffix, r) - _take(rows, r)
    inner = jnp.take_along_axis(blocks, r[..., None, None], axis=-2)[..., 0, :]
    inner_suffix = _suffix(inner) + above_row[..., None]
    c = jnp.maximum(jnp.sum(inner_suffix >= k[..., None], axis=-1, dtype=jnp.int32) - 1, 0)
    at = _take(inner, c)
    return r * 256 + c, _take(inner_suffix, c) - at, at


def _thresholds(keys: list, k: Any, per_leaf: bool):
    """(thresholds, greater, tied): per array, the uint32 threshold (the k-th largest key, of the
    array or of all arrays) and the int32 counts of the array's keys above and at it."""
    high = [(x >> _DIGIT).astype(jnp.int32) for x in keys]
    low = [(x & jnp.uint32(_BINS - 1)).astype(jnp.int32) for x in keys]
    hist1 = jnp.stack([_histogram(h, _BINS) for h in high])
    if per_leaf:
        target = jnp.stack([jnp.asarray(kk, jnp.int32) for kk in k])
        d1, above1, _ = _locate(hist1, target)
        hist2 = jnp.stack(
            [
                _histogram(jnp.where(h == d1[i], lo, _BINS), _BINS)
                for i, (h, lo) in enumerate(zip(high, low, strict=True))
            ]
        )
        d2, above2, tied = _locate(hist2, target - above1)
        threshold = (d1.astype(jnp.uint32) << _DIGIT) | d2.astype(jnp.uint32)
        return list(threshold), list(above1 + above2), list(tied)
    target = jnp.asarray(k, jnp.int32)
    d1, above1, _ = _locate(jnp.sum(hist1, axis=0, dtype=jnp.int32), target)
    hist2 = jnp.stack(
        [_histogram(jnp.where(h == d1, lo, _BINS), _BINS) for h, lo in zip(high, low, strict=True)]
    )
    d2, _, _ = _locate(jnp.sum(hist2, axis=0, dtype=jnp.int32), target - above1)
    threshold = (d1.astype(jnp.uint32) << _DIGIT) | d2.astype(jnp.uint32)
    digits = jnp.arange(_BINS, dtype=jnp.int32)
    greater = jnp.sum(jnp.where(digits > d1, hist1, 0), axis=-1, dtype=jnp.int32) + jnp.sum(
        jnp.where(digits > d2, hist2, 0), axis=-1, dtype=jnp.int32
    )
    tied = hist2[:, d2]
    return [threshold] * len(keys), list(greater), list(tied)


def _tie_cut(x: jax.Array, t: jax.Array, q: jax.Array) -> jax.Array:
    """The smallest flat position `p` with ``#{i < p: x[i] == t} >= q`` (``0 <= q <= #ties``),
    from two histograms of the tied positions (by block, then within the chosen block)."""
    size = x.size
    bits = max(1, (size - 1).bit_length())
    shift = (bits + 1) // 2
    n_blocks = -(-size // (1 << shift))
    flat = x.reshape(-1) == t
    pos = lax.iota(jnp.int32, size)
    block_count = _histogram(jnp.where(flat, pos >> shift, n_blocks), n_blocks)
    upto = jnp.cumsum(block_count, dtype=jnp.int32)
    j = jnp.minimum(jnp.sum(upto < q, dtype=jnp.int32), n_blocks - 1)
    before = upto[j] - block_count[j]
    inside = jnp.where(flat & ((pos >> shift) == j), pos & ((1 << shift) - 1), 1 << shift)
    offset_upto = jnp.cumsum(_histogram(inside, 1 << shift), dtype=jnp.int32) + before
    o = jnp.sum(offset_upto < q, dtype=jnp.int32)
    return jnp.where(q <= 0, 0, j * (1 << shift) + o + 1)


def _top_k_radix(keys: list, k: Any, *, scope: str) -> list[jax.Array]:
    per_leaf = scope == "layer"
    thresholds, greater, tied = _thresholds(keys, k, per_leaf)
    if per_leaf:
        quotas = [
            jnp.clip(jnp.asarray(kk, jnp.int32) - g, 0, n)
            for kk, g, n in zip(k, greater, tied, strict=True)
        ]
    else:
        left = jnp.clip(jnp.asarray(k, jnp.int32) - sum(greater), 0, _INT32_MAX)
        quotas, before = [], jnp.zeros((), jnp.int32)
        for n in tied:
            quotas.append(jnp.clip(left - before, 0, n))
            before = jnp.minimum(before + n, _INT32_MAX)
    partial = jnp.stack([(q > 0) & (q < n) for q, n in zip(quotas, tied, strict=True)])

    def positions(x):
        return lax.broadcasted_iota(jnp.int32, (x.size,), 0).reshape(x.shape)

    def by_position(_):
        return [
            (x > t) | ((x == t) & (positions(x) < _tie_cut(x, t, q)))
            for x, t, q in zip(keys, thresholds, quotas, strict=True)
        ]

    def whole(_):
        return [
            (x > t) | ((x == t) & (q > 0)) for x, t, q in zip(keys, thresholds, quotas, strict=True)
        ]

    return lax.cond(jnp.any(partial), by_position, whole, None)


def _top_k_bisect(keys: list, k: Any, *, scope: str) -> list[jax.Array]:
    """`top_k_from_keys` by a 32-step bisection with counts in (high, low) 16-bit limbs, for
    totals beyond int32."""
    per_leaf = scope == "layer"
    if per_leaf:
        ks = [
            jnp.asarray(kk, jnp.int32) if not isinstance(kk, int) else min(kk, _INT32_MAX)
            for kk in k
        ]
    else:
        target = _wide_target(k)

    def counts_at_least(values):
        return [_count(x >= v) for x, v in zip(keys, values, strict=True)]

    def body(_, carry):
        lo, hi = carry
        mid = _upper_mid(lo, hi)
        mids = list(mid) if per_leaf else [mid] * len(keys)
        counts = counts_at_least(mids)
        if per_leaf:
            enough = jnp.stack([c >= kk for c, kk in zip(counts, ks, strict=True)])
        else:
            total = _wide(counts[0])
            for c in counts[1:]:
                total = _wide_add(total, _wide(c))
            enough = _wide_at_least(total, target)
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - jnp.uint32(1))

    shape = (len(keys),) if per_leaf else ()
    init = (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32))
    threshold, _ = lax.fori_loop(0, 32, body, init)
    thresholds = list(threshold) if per_leaf else [threshold] * len(keys)

    greater = [_count(x > t) for x, t in zip(keys, thresholds, strict=True)]
    tied = [_count(x == t) for x, t in zip(keys, thresholds, strict=True)]
    if per_leaf:
        quotas = [jnp.clip(kk - g, 0, n) for kk, g, n in zip(ks, greater, tied, strict=True)]
    else:
        total = _wide(greater[0])
        for g in greater[1:]:
            total = _wide_add(total, _wide(g))
        left = _wide_minus(target, total)
        quotas, before = [], jnp.zeros((), jnp.int32)
        for n in tied:
            quotas.append(jnp.clip(left - before, 0, n))
            before = jnp.minimum(before + n, _INT32_MAX)
    partial = jnp.stack([(q > 0) & (q < n) for q, n in zip(quotas, tied, strict=True)])

    def positions(x):
        return lax.broadcasted_iota(jnp.int32, (x.size,), 0).reshape(x.shape)

    def by_position(_):
        # Per array: the smallest cut p with #{ties at flat positions < p} >= quota (bisection).
        def body(_, carry):
            out = []
            for x, t, q, (lo, hi) in zip(keys, thresholds, quotas, carry, strict=True):
                mid = (lo + hi) // 2
                enough = _count((x == t) & (positions(x) < mid)) >= q
                out.append((jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)))
            return tuple(out)

        start = tuple((jnp.zeros((), jnp.int32), jnp.asarray(x.size, jnp.int32)) for x in keys)
        steps = max(x.size for x in keys).bit_length() + 1
        cuts = lax.fori_loop(0, steps, body, start)
        return [
            (x > t) | ((x == t) & (positions(x) < hi))
            for x, t, (_, hi) in zip(keys, thresholds, cuts, strict=True)
        ]

    def whole(_):
        return [
            (x > t) | ((x == t) & (q > 0)) for x, t, q in zip(keys, thresholds, quotas, strict=True)
        ]

    return lax.cond(jnp.any(partial), by_position, whole, None)


@functools.partial(jax.jit, static_argnames=("scope",))
def _top_k_jit(scores: tuple, k: jax.Array, scope: str) -> list[jax.Array]:
    ks = list(k) if scope == "layer" else k
    return top_k_from_keys([sortable(s) for s in scores], ks, scope=scope)


def top_k_masks(scores: Sequence[jax.Array], k: Any, *, scope: str) -> list[jax.Array]:
    """`top_k_from_keys` on float scores (compared in float32); compiled once per set of shapes
    (the counts are traced)."""
    counts = list(k) if scope == "layer" else [k]
    if not scores:
        return []
    if any(isinstance(c, int) and c > _INT32_MAX for c in counts):  # beyond int32: static limbs
        return top_k_from_keys([sortable(s) for s in scores], k, scope=scope)
    if scope == "layer":
        k_arr = jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])
    else:
        k_arr = jnp.asarray(counts[0], jnp.int32)
    return _top_k_jit(tuple(scores), k_arr, scope)


@functools.partial(jax.jit, static_argnames=("shape",))
def random_leaf(key: jax.Array, k: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A boolean array of `shape` with exactly `k` True entries at uniformly random positions
    (the first `k` entries of a random permutation)."""
    size = math.prod(shape)
    order = jax.random.permutation(key, size)
    flat = jnp.zeros(size, jnp.bool_).at[order].set(jnp.arange(size) < k)
    return flat.reshape(shape)


# ---------------------------------------------------------------------------------------------
# N:M groups.


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def nm_leaf(x: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """Keeps the `n` largest ``|x|`` of every `m` consecutive entries along `axis` (ties to the
    earlier entry)."""
    scores = jnp.abs(jnp.asarray(x, _F32))
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    if m <= 16:
        rank = jnp.zeros(groups.shape, jnp.int32)
        position = lax.broadcasted_iota(jnp.int32, groups.shape, groups.ndim - 1)
        for j in range(m):
            other = groups[..., j : j + 1]
            beats = (other > groups) | ((other == groups) & (position > j))
            rank = rank + beats.astype(jnp.int32)
        keep = rank < n
    else:
        _, index = lax.top_k(groups, n)
        keep = jnp.any(jax.nn.one_hot(index, m, dtype=jnp.bool_), axis=-2)
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


# ---------------------------------------------------------------------------------------------
# Row-wise bit packing (one bit per entry; leading axes kept so packed masks shard like params).


def packed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if not shape:
        return (1,)
    return shape[:-1] + (-(-shape[-1] // 8),)


def pack(mask: jax.Array) -> jax.Array:
    """Packs a boolean array along its last axis, 8 entries a byte (a scalar becomes ``(1,)``)."""
    mask = jnp.asarray(mask, jnp.bool_)
    if mask.ndim == 0:
        mask = mask.reshape(1)
    return jnp.packbits(mask, axis=-1)


def unpack(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of `pack`: a boolean array of `shape`."""
    shape = tuple(shape)
    last = shape[-1] if shape else 1
    out = jnp.unpackbits(packed, axis=-1, count=last).astype(jnp.bool_)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Matching trees by path.


def by_path(tree: Any, fn: str, arg: str) -> dict[str, Any]:
    """``{path string: leaf}`` for a tree whose leaves may be None."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]
    return {path_name(path): leaf for path, leaf in leaves}


def bool_tree(fn: str, arg: str, spec: Any, params: Any) -> Any:
    """Evaluates a bool-tree-or-callable selection against `params` and returns a tree of Python
    bools with the structure of `params` (None where the param is None; MaskedNode kept)."""
    if spec is None:
        return jax.tree.map(lambda p: None if p is None else True, params, is_leaf=is_none)
    chosen = spec(params) if callable(spec) else spec
    lookup = by_path(chosen, fn, arg)

    def leaf(path, p):
        if p is None:
            return None
        name = path_name(path)
        if name not in lookup:
            raise ValueError(
                f"{fn}: `{arg}` has no entry for leaf '{name or '<root>'}'; give one bool per parameter leaf."
            )
        value = lookup[name]
        if value is None:
            return False
        try:
            return bool(value)
        except (TypeError, jax.errors.ConcretizationTypeError) as err:
            raise TypeError(
                f"{fn}: `{arg}` must hold Python bools per leaf, got {value!r} at leaf '{name or '<root>'}'."
            ) from err

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_none)


def label_tree(fn: str, arg: str, spec: Any, params: Any) -> Any:
    """Evaluates a label-tree-or-callable against `params`: one hashable label (or None) per leaf."""
    chosen = spec(params) if callable(spec) else spec
    lookup = by_path(chosen, fn, arg)

    def leaf(path, p):
        if p is None:
            return None
        name = path_name(path)
        if name not in lookup:
            raise ValueError(
                f"{fn}: `{arg}` has no label for leaf '{name or '<root>'}'; give one label (or None) per parameter leaf."
            )
        return lookup[name]

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_none)


def concrete_bool(x: Any) -> np.ndarray | None:
    """`x` as a NumPy bool array, or None when it is traced."""
    try:
        return np.asarray(x).astype(bool)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Inner-state surgery: state leaves tied to parameter leaves by path suffix and shape.


def tie_table(params_like: Any, payload: Callable[[Any, Any], Any]) -> dict:
    """``{param key path: (shape, payload(path, leaf))}`` for the array leaves of `params_like`
    whose payload is not None (the state leaf must have exactly that shape)."""
    table = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params_like, is_leaf=is_none)[0]:
        if leaf is None:
            continue
        value = payload(path, leaf)
        if value is not None:
            shape = tuple(jnp.shape(leaf))
            table[tuple(path)] = (lambda s, shape=shape: s == shape, lambda s, value=value: value)
    return table


def packed_tie_table(packed_tree: Any, payload: Callable[[jax.Array, tuple], Any]) -> dict:
    """Like `tie_table` for a tree of row-packed masks: a state leaf of shape ``s`` is tied when
    ``packed_shape(s)`` equals the packed mask's shape; ``payload(packed, s)`` builds the value."""
    table = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(packed_tree, is_leaf=is_none_or_masked)[
        0
    ]:
        if leaf is None or isinstance(leaf, optax.MaskedNode):
            continue
        pshape = tuple(leaf.shape)
        cache: dict = {}  # one unpacked mask per shape, shared by every tied state leaf

        def make(s, leaf=leaf, cache=cache):
            if s not in cache:
                cache[s] = payload(leaf, s)
            return cache[s]

        table[tuple(path)] = (lambda s, pshape=pshape: packed_shape(s) == pshape, make)
    return table


def _tied_payload(table: dict, lengths: list[int], path: tuple, leaf: Any) -> tuple[bool, Any]:
    """``(True, payload)`` when the state leaf at `path` is tied to a table entry, else
    ``(False, None)``. Only floating leaves are tied; the longest matching path suffix wins."""
    if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return False, None
    for n in lengths:
        if n > len(path):
            continue
        entry = table.get(path[len(path) - n :])
        if entry is not None:
            shape = tuple(leaf.shape)
            return (True, entry[1](shape)) if entry[0](shape) else (False, None)
    return False, None


def map_tied(inner_state: Any, table: dict, fn: Callable[[jax.Array, Any], jax.Array]) -> Any:
    """Applies ``fn(state_leaf, payload)`` to every floating state leaf tied to a parameter leaf.

    A state leaf is tied to a parameter when the parameter's key path is a suffix of the state
    leaf's path (``mu/enc/w`` belongs to ``enc/w``, as optax and cljax states mirror parameters;
    the longest such suffix wins) and its shape passes the entry's check. `table` comes from
    `tie_table` or `packed_tie_table`. Works for any inner state type: there is no list of known
    optimizer states.
    """
    if not table:
        return inner_state
    lengths = sorted({len(p) for p in table}, reverse=True)

    def visit(path, leaf):
        tied, payload = _tied_payload(table, lengths, tuple(path), leaf)
        return fn(leaf, payload) if tied else leaf

    return jax.tree_util.tree_map_with_path(visit, inner_state)


def map_tied_pair(
    old: Any, new: Any, table: dict, fn: Callable[[jax.Array, jax.Array, Any], jax.Array]
) -> Any:
    """Like `map_tied` over two states of one structure: ``fn(old_leaf, new_leaf, payload)`` on
    the tied leaves, the `new` leaf elsewhere."""
    if not table:
        return new
    lengths = sorted({len(p) for p in table}, reverse=True)

    def visit(path, new_leaf, old_leaf):
        tied, payload = _tied_payload(table, lengths, tuple(path), new_leaf)
        return fn(old_leaf, new_leaf, payload) if tied else new_leaf

    return jax.tree_util.tree_map_with_path(visit, new, old)


def zero_where(leaf: jax.Array, where: jax.Array) -> jax.Array:
    return jnp.where(where, jnp.zeros_like(leaf), leaf)


def compiled_update(update_fn: Callable) -> Callable:
    """Runs `update_fn` through one cached `jax.jit` (inlined when already under a trace), so
    eager calls do not re-trace and re-compile its `lax.cond` branches every step. Extra args
    that are not arrays or numbers fall back to the plain call."""
    jitted = jax.jit(update_fn)

    def update(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves(extra_args)
        if all(
            isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)) for x in leaves
        ):
            return jitted(updates, state, params, **extra_args)
        return update_fn(updates, state, params, **extra_args)

    return update
