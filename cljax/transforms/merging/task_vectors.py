"""Task vectors and the merges built on them: soups, task arithmetic, TIES, DARE, Breadcrumbs,
MagMax and PCB-Merging.

A *task vector* is ``tau = finetuned - base``, a pytree shaped like the parameters. Every merge here
takes a Python list (or tuple) of task vectors and returns one merged task vector in the dtypes of
the first; add it to the base with `apply_task_vector`, which holds the paper's global scale
(``lambda`` / ``alpha``). Sums and scores accumulate in float32, also for bfloat16 inputs.

* `task_vector`, `apply_task_vector`, `task_arithmetic` — MG-02.
* `uniform_soup`, `greedy_soup` and the streaming `uniform_soup_init` / `uniform_soup_add` /
  `uniform_soup_result` — MG-01.
* `ties_merge` — MG-03 (trim, elect sign, disjoint mean).
* `dare` — drop-and-rescale (DARE).
* `breadcrumbs` — MG-04 (drop the smallest entries and the largest outliers, per tensor).
* `magmax`, `magmax_init`, `magmax_update` — MG-05 (maximum-magnitude selection).
* `pcb_merge` — MG-44 (parameter competition balancing).

Top-k style selections never sort: the k-th largest magnitude is found by a radix select on the
float's bit pattern (three histogram passes), which is far faster than `jnp.sort` or `lax.top_k`
on large leaves on CPU, works across many leaves without concatenating them ("global" scope), and
is correct under sharded `jit` (histograms are scatter-adds and reductions). Ties at
the threshold are broken by position (earlier leaf in tree order, then earlier row-major index), so
"keep the top k" keeps exactly k entries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cljax import _checks

__all__ = [
    "UniformSoupState",
    "apply_task_vector",
    "breadcrumbs",
    "dare",
    "greedy_soup",
    "magmax",
    "magmax_init",
    "magmax_update",
    "pcb_merge",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "uniform_soup",
    "uniform_soup_add",
    "uniform_soup_init",
    "uniform_soup_result",
]

_F32 = jnp.float32
_INT32_MAX = 2**31 - 1
# Sums of per-leaf int32 counts switch to exact two-limb arithmetic above this many entries.
_WIDE_COUNT_THRESHOLD = _INT32_MAX

SignMethod = Literal["total", "frequency"]
Scope = Literal["per_tensor", "global"]
ZeroSign = Literal["positive", "majority"]
_SIGN_METHODS = ("total", "frequency")
_SCOPES = ("per_tensor", "global")
_ZERO_SIGNS = ("positive", "majority")


# ---------------------------------------------------------------------------------------------
# Validation helpers.


def _dtype_of(leaf: Any):
    dtype = getattr(leaf, "dtype", None)
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(leaf)


def _check_float_leaves(fn: str, arg: str, tree: Any) -> None:
    """Raises a TypeError naming the first leaf of `tree` that is not floating point."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = _dtype_of(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' of `{arg}` has dtype {dtype}; merges need "
                "floating-point leaves. Cast the tree or leave integer leaves (counters, indices) out."
            )


def _as_list(fn: str, arg: str, trees: Any) -> list:
    """Checks a non-empty list/tuple of pytrees with one structure and shapes; returns a list."""
    if not isinstance(trees, (list, tuple)) or hasattr(trees, "_fields"):
        raise TypeError(
            f"{fn}({arg}=...) must be a list or tuple of pytrees, got {type(trees).__name__}. "
            "Wrap a single pytree in a list."
        )
    if len(trees) == 0:
        raise ValueError(
            f"{fn}({arg}=...) must hold at least one pytree, got an empty {type(trees).__name__}."
        )
    _checks.check_same_structure(fn, **{f"{arg}[{i}]": t for i, t in enumerate(trees)})
    for i, tree in enumerate(trees):
        _check_float_leaves(fn, f"{arg}[{i}]", tree)
    return list(trees)


def _static_fraction(
    fn: str,
    arg: str,
    value: Any,
    *,
    low_inclusive: bool = False,
    high: float = 1.0,
    high_inclusive: bool = True,
) -> float:
    """Returns `value` as a Python float in (0, high] (bounds configurable); it fixes a count."""
    number = _checks._as_float(value)
    if number is None:
        raise TypeError(
            f"{fn}({arg}=...) must be a Python float: it fixes how many entries are kept, which "
            f"must be static under jax.jit; got {type(value).__name__}. Bind it with "
            "functools.partial instead of passing it as a traced argument."
        )
    _checks.check_in_range(
        fn, arg, number, 0.0, high, low_inclusive=low_inclusive, high_inclusive=high_inclusive
    )
    return number


def _count_of(fraction: float, size: int) -> int:
    """``floor(fraction * size)`` clipped to [0, size], robust to float error (0.29 * 100 -> 29)."""
    return min(size, max(0, math.floor(fraction * size + 1e-6)))


def _weight_list(fn: str, weights: Any, count: int) -> list | None:
    """Returns one weight per task vector (or None): a scalar is repeated, a sequence is checked."""
    if weights is None:
        return None
    if isinstance(weights, (list, tuple)):
        if len(weights) != count:
            raise ValueError(
                f"{fn}(weights=...) must hold one weight per task vector ({count}), got "
                f"{len(weights)}."
            )
        return list(weights)
    shape = jnp.shape(weights)
    if shape == ():
        return [weights] * count
    if shape == (count,):
        return [weights[i] for i in range(count)]
    raise ValueError(
        f"{fn}(weights=...) must be a scalar or hold one weight per task vector ({count}), got "
        f"an array of shape {shape}."
    )


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, _F32)


def _task_leaves(trees: list):
    """Returns (per-leaf lists of the K tasks' leaves, leaf shapes, treedef of the first)."""
    leaves, treedef = jax.tree.flatten(trees[0])
    per_leaf = [list(xs) for xs in zip(*[jax.tree.leaves(t) for t in trees], strict=True)]
    return per_leaf, [jnp.shape(x) for x in leaves], treedef


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, ref: x.astype(_dtype_of(ref)), tree, like)


# ---------------------------------------------------------------------------------------------
# Order statistics without sorting (shared with `compression.py`).
#
# A float32 is mapped to a uint32 "sortable key" whose unsigned order is the float order (-0.0 is
# folded onto +0.0). The k-th smallest key is found by a radix select (`_order_stats`: three
# histogram passes of 11, 11 and 10 bits; rows beyond int32 counts use a 32-step bisection over
# the key range with 16-bit-limb counts). Leaves are first packed into
# buckets: leaves with the same (large) size are stacked, small leaves are zero-padded to a common
# width, so the number of compiled kernels grows with the number of distinct leaf sizes, not of
# leaves. Every leaf shares `batch_ndim` leading batch axes (e.g. K stacked task vectors); each
# batch row is ranked separately, either per leaf or over all leaves together ("global").

_SMALL_LEAF = 1 << 16  # leaves below this many entries per row share padded buckets


def _sortable(x: jax.Array) -> jax.Array:
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = bits >= jnp.uint32(0x80000000)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _from_sortable(key: jax.Array) -> jax.Array:
    negative = key < jnp.uint32(0x80000000)
    bits = jnp.where(negative, ~key, key & jnp.uint32(0x7FFFFFFF))
    return lax.bitcast_convert_type(bits, jnp.float32)


def _row_size(leaf: jax.Array, batch_ndim: int) -> int:
    return math.prod(leaf.shape[batch_ndim:])


class _Bucket(NamedTuple):
    ids: tuple  # indices (tree order) of the leaves stacked in this bucket
    sizes: tuple  # their entries per batch row
    width: int  # padded row width
    data: jax.Array  # float32 (B, *batch, width); padding is 0
    score: Callable | None = None  # ranks `score(data)` (e.g. jnp.abs) instead of `data`


def _scores(b: _Bucket) -> jax.Array:
    """The values a bucket is ranked by, computed on the fly (fused into each pass)."""
    return b.data if b.score is None else b.score(b.data)


def _pack(leaves: list, batch_ndim: int) -> list:
    """Packs leaves into `_Bucket`s of float32 rows; empty leaves are left out.

    Each element of `leaves` is an array with `batch_ndim` leading batch axes, or (with
    ``batch_ndim=1``) a list of same-shaped arrays, one per task, stacked in the same copy.
    """

    def row_size(leaf):
        return leaf[0].size if isinstance(leaf, list) else _row_size(leaf, batch_ndim)

    def flat_row(leaf, n, width):
        if isinstance(leaf, list):
            flat = jnp.stack([jnp.asarray(x, _F32).reshape(n) for x in leaf])
        else:
            flat = jnp.asarray(leaf, _F32).reshape(leaf.shape[:batch_ndim] + (n,))
        if n < width:
            flat = jnp.pad(flat, [(0, 0)] * batch_ndim + [(0, width - n)])
        return flat

    groups: dict = {}
    for i, leaf in enumerate(leaves):
        n = row_size(leaf)
        if n:
            key = ("exact", n) if n >= _SMALL_LEAF else ("small", (n - 1).bit_length() // 4)
            groups.setdefault(key, []).append(i)
    buckets = []
    for ids in groups.values():
        sizes = tuple(row_size(leaves[i]) for i in ids)
        width = max(sizes)
        data = jnp.stack([flat_row(leaves[i], n, width) for i, n in zip(ids, sizes, strict=True)])
        buckets.append(_Bucket(tuple(ids), sizes, width, data))
    return buckets


def _with_data(buckets: list, data: list) -> list:
    return [b._replace(data=d, score=None) for b, d in zip(buckets, data, strict=True)]


def _with_score(buckets: list, score: Callable) -> list:
    return [b._replace(score=score) for b in buckets]


def _unpack(buckets: list, arrays: list, shapes: list, dtype=_F32) -> list:
    """Inverse of `_pack` for per-bucket arrays ``(B, *rest, width)``: leaf i gets shape
    ``shapes[i]`` (its row entries last); leaves missing from every bucket get zeros."""
    out: list = [None] * len(shapes)
    for b, arr in zip(buckets, arrays, strict=True):
        for j, (i, n) in enumerate(zip(b.ids, b.sizes, strict=True)):
            out[i] = arr[j, ..., :n].reshape(shapes[i])
    return [
        jnp.zeros(shape, dtype) if o is None else o for o, shape in zip(out, shapes, strict=True)
    ]


def _valid(b: _Bucket, batch_ndim: int):
    """Constant mask of the real (unpadded) entries of a bucket, or None without padding."""
    if all(n == b.width for n in b.sizes):
        return None
    valid = np.arange(b.width)[None, :] < np.asarray(b.sizes)[:, None]
    return jnp.asarray(valid.reshape((len(b.ids),) + (1,) * batch_ndim + (b.width,)))


def _masked(b: _Bucket, pred: jax.Array, batch_ndim: int) -> jax.Array:
    valid = _valid(b, batch_ndim)
    return pred if valid is None else pred & valid


def _leaf_counts(b: _Bucket, pred: jax.Array, batch_ndim: int) -> jax.Array:
    """int32 ``(B, *batch)`` counts of True real entries per leaf row."""
    return jnp.sum(_masked(b, pred, batch_ndim), axis=-1, dtype=jnp.int32)


def _per_leaf(values: dict, b: _Bucket, batch_ndim: int) -> jax.Array:
    """A constant int32 ``(B, 1, ..., 1)`` array of per-leaf static ints."""
    return jnp.asarray(
        np.asarray([values[i] for i in b.ids], np.int32).reshape((-1,) + (1,) * batch_ndim)
    )


def _total_size(buckets: list) -> int:
    return sum(sum(b.sizes) for b in buckets)


def _wide_sum(counts: list, total: int):
    """Sums int32 ``(B, *batch)`` counts over leaves (axis 0 and the list); above int32 range
    (`total` entries) returns exact (high, low) 16-bit limbs instead of one int32 array."""
    if total <= _WIDE_COUNT_THRESHOLD:
        return sum(jnp.sum(c, axis=0) for c in counts)
    high = sum(jnp.sum(c >> 16, axis=0) for c in counts)
    low = sum(jnp.sum(c & 0xFFFF, axis=0) for c in counts)
    return high + (low >> 16), low & 0xFFFF


def _wide_at_least(value, target: int) -> jax.Array:
    """``value >= target`` for a `_wide_sum` result and a static Python int."""
    if not isinstance(value, tuple):
        return value >= target
    high, low = value
    t_high, t_low = target >> 16, target & 0xFFFF
    return (high > t_high) | ((high == t_high) & (low >= t_low))


def _wide_from(target: int, value) -> jax.Array:
    """``target - value`` for a `_wide_sum` result, as int32 saturated to [0, 2**31 - 1]."""
    if not isinstance(value, tuple):
        return jnp.clip(target - value, 0, _INT32_MAX)
    high, low = value
    diff_high = (target >> 16) - high
    diff_low = (target & 0xFFFF) - low
    too_big = diff_high >= (1 << 15) - 1
    exact = jnp.clip(diff_high, -1, (1 << 15) - 2) * 65536 + diff_low
    return jnp.where(too_big, _INT32_MAX, jnp.clip(exact, 0, _INT32_MAX))


# Radix select: a sortable key is three digits of 11, 11 and 10 bits. A pass histograms, per batch
# row (and per leaf row for per-leaf ranks), the next digit of the entries that match the digits
# found so far; the digit holding the rank-th entry is read off the histogram's prefix sums, taken
# in two levels of 32 so that only small arrays are scanned. Three scatter-add passes replace 32
# counting passes.
_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits), most significant first


def _digit_of(hist: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For digit counts ``hist (..., bins)`` and int32 ranks ``(...)`` (0-based, ascending): the
    digit holding the rank-th smallest entry and the number of entries with a smaller digit."""
    bins = hist.shape[-1]
    blocks = hist.reshape(hist.shape[:-1] + (32, bins // 32))
    sums = jnp.sum(blocks, axis=-1, dtype=jnp.int32)
    upto = jnp.cumsum(sums, axis=-1, dtype=jnp.int32)
    c = jnp.minimum(jnp.sum(upto <= rank[..., None], axis=-1, dtype=jnp.int32), 31)
    take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
    below_block = take(upto, c) - take(sums, c)
    inner = jnp.take_along_axis(blocks, c[..., None, None], axis=-2)[..., 0, :]
    inner_upto = jnp.cumsum(inner, axis=-1, dtype=jnp.int32) + below_block[..., None]
    o = jnp.minimum(
        jnp.sum(inner_upto <= rank[..., None], axis=-1, dtype=jnp.int32), bins // 32 - 1
    )
    return c * (bins // 32) + o, take(inner_upto, o) - take(inner, o)


def _row_histogram(b: _Bucket, key: jax.Array, select, shift: int, bits: int, batch_ndim: int):
    """int32 ``(B, *batch, 2**bits)`` counts, per leaf row, of the digit ``key >> shift`` of the
    real entries where `select` holds (all when None)."""
    bins = 1 << bits
    lead = b.data.shape[:-1]
    n_rows = math.prod(lead)
    digit = ((key >> shift) & jnp.uint32(bins - 1)).astype(jnp.int32)
    row = jnp.arange(n_rows, dtype=jnp.int32).reshape(lead)
    index = row[..., None] * bins + digit
    keep = _valid(b, batch_ndim)
    if select is not None:
        keep = select if keep is None else select & keep
    if keep is not None:
        index = jnp.where(keep, index, n_rows * bins)
    flat = index.reshape(-1)
    hist = jnp.zeros((n_rows * bins,), jnp.int32).at[flat].add(jnp.ones_like(flat), mode="drop")
    return hist.reshape(lead + (bins,))


def _order_keys(queries: list, batch_ndim: int) -> list:
    """Sortable keys of order statistics, by a three-pass radix select.

    Each query is ``(buckets, rank)``: an int `rank` asks, per batch row, for the rank-th smallest
    (0-based) entry over all leaves of the buckets and gives a ``batch``-shaped uint32; a dict
    ``{leaf id: rank}`` asks per leaf and gives one ``(B, *batch)`` uint32 per bucket. Rows of
    more than `_WIDE_COUNT_THRESHOLD` entries use `_order_keys_bisect` (counts in 16-bit limbs).
    """
    if not queries:
        return []
    if any(_total_size(buckets) > _WIDE_COUNT_THRESHOLD for buckets, _ in queries):
        return _order_keys_bisect(queries, batch_ndim)
    return [key for key, _ in _order_stats(queries, batch_ndim)]


def _order_stats(queries: list, batch_ndim: int) -> list:
    """`_order_keys` by radix select (rows of at most 2**31 - 1 entries), with, per query and
    bucket, the int32 ``(B, *batch)`` counts of real entries below and at the found key in each
    leaf row (read off the same histograms)."""
    out = []
    for buckets, rank in queries:
        keys = [_sortable(_scores(b)) for b in buckets]
        per_leaf = isinstance(rank, dict)
        if per_leaf:
            left = [
                _per_leaf(rank, b, batch_ndim) + jnp.zeros(b.data.shape[:-1], jnp.int32)
                for b in buckets
            ]
            prefix = [jnp.zeros(b.data.shape[:-1], jnp.uint32) for b in buckets]
        else:
            batch_shape = buckets[0].data.shape[1:-1]
            left = jnp.full(batch_shape, rank, jnp.int32)
            prefix = jnp.zeros(batch_shape, jnp.uint32)
        below = [jnp.zeros(b.data.shape[:-1], jnp.int32) for b in buckets]

        def digit_at(d, j, per_leaf=per_leaf):  # bucket j's digit, shaped (B or 1, *batch)
            return d[j] if per_leaf else d.reshape((1,) + d.shape)

        for step, (shift, bits) in enumerate(_DIGITS):
            hists = []
            for j, (b, key) in enumerate(zip(buckets, keys, strict=True)):
                select = None
                if step:
                    select = (key >> (shift + bits)) == digit_at(prefix, j)[..., None]
                hists.append(_row_histogram(b, key, select, shift, bits, batch_ndim))
            if per_leaf:
                found = [_digit_of(h, r) for h, r in zip(hists, left, strict=True)]
                digits = [d for d, _ in found]
                left = [r - n for r, (_, n) in zip(left, found, strict=True)]
                prefix = [
                    (p << bits) | d.astype(jnp.uint32) for p, d in zip(prefix, digits, strict=True)
                ]
            else:
                total = sum(jnp.sum(h, axis=0, dtype=jnp.int32) for h in hists)
                digits, n = _digit_of(total, left)
                left = left - n
                prefix = (prefix << bits) | digits.astype(jnp.uint32)
            for j, h in enumerate(hists):
                bins = lax.broadcasted_iota(jnp.int32, h.shape, h.ndim - 1)
                d = digit_at(digits, j)[..., None]
                below[j] = below[j] + jnp.sum(jnp.where(bins < d, h, 0), axis=-1, dtype=jnp.int32)
                if step == len(_DIGITS) - 1:
                    hists[j] = jnp.sum(jnp.where(bins == d, h, 0), axis=-1, dtype=jnp.int32)
        out.append((prefix, list(zip(below, hists, strict=True))))
    return out


def _order_keys_bisect(queries: list, batch_ndim: int) -> list:
    """`_order_keys` by one 32-step bisection loop with counts beyond int32 in 16-bit limbs."""
    if not queries:
        return []

    def expand(mid, b, per_leaf):
        return mid[..., None] if per_leaf else mid.reshape((1,) + mid.shape + (1,))

    def body(_, carry):
        out = []
        for (buckets, rank), state in zip(queries, carry, strict=True):
            per_leaf = isinstance(rank, dict)
            if per_leaf:
                new = []
                for b, (lo, hi) in zip(buckets, state, strict=True):
                    mid = lo + (hi - lo) // 2
                    counts = _leaf_counts(
                        b, _sortable(_scores(b)) <= expand(mid, b, True), batch_ndim
                    )
                    enough = counts >= _per_leaf(rank, b, batch_ndim) + 1
                    new.append(
                        (jnp.where(enough, lo, mid + jnp.uint32(1)), jnp.where(enough, mid, hi))
                    )
                out.append(tuple(new))
            else:
                lo, hi = state
                mid = lo + (hi - lo) // 2
                counts = [
                    _leaf_counts(b, _sortable(_scores(b)) <= expand(mid, b, False), batch_ndim)
                    for b in buckets
                ]
                enough = _wide_at_least(_wide_sum(counts, _total_size(buckets)), rank + 1)
                out.append((jnp.where(enough, lo, mid + jnp.uint32(1)), jnp.where(enough, mid, hi)))
        return tuple(out)

    def start(shape):
        return jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32)

    init = []
    for buckets, rank in queries:
        batch_shape = buckets[0].data.shape[1:-1]
        if isinstance(rank, dict):
            init.append(tuple(start(b.data.shape[:-1]) for b in buckets))
        else:
            init.append(start(batch_shape))
    final = lax.fori_loop(0, 32, body, tuple(init))
    return [
        [hi for _, hi in state] if isinstance(rank, dict) else state[1]
        for (_, rank), state in zip(queries, final, strict=True)
    ]


def _order_values(queries: list, batch_ndim: int) -> list:
    """Like `_order_keys` but float32 values; all-minimum / all-maximum ranks use min / max."""
    out: list = [None] * len(queries)
    searched = []
    for q, (buckets, rank) in enumerate(queries):
        ranks = rank if isinstance(rank, dict) else None
        sizes = {i: n for b in buckets for i, n in zip(b.ids, b.sizes, strict=True)}
        if ranks is not None:
            lowest = all(ranks[i] <= 0 for i in sizes)
            highest = all(ranks[i] >= sizes[i] - 1 for i in sizes)
        else:
            lowest, highest = rank <= 0, rank >= _total_size(buckets) - 1
        if lowest or highest:
            fill, reduce = (jnp.inf, jnp.min) if lowest else (-jnp.inf, jnp.max)
            per_bucket = []
            for b in buckets:
                valid = _valid(b, batch_ndim)
                data = _scores(b) if valid is None else jnp.where(valid, _scores(b), fill)
                per_bucket.append(reduce(data, axis=-1))
            if ranks is None:
                per_bucket = reduce(jnp.stack([reduce(v, axis=0) for v in per_bucket]), axis=0)
            out[q] = per_bucket
        else:
            searched.append(q)
    keys = _order_keys([queries[q] for q in searched], batch_ndim)
    for q, key in zip(searched, keys, strict=True):
        out[q] = [_from_sortable(k) for k in key] if isinstance(key, list) else _from_sortable(key)
    return out


def _window_masks(buckets: list, windows, batch_ndim: int) -> list:
    """Boolean masks (one ``(B, *batch, width)`` per bucket) of the entries whose descending
    stable rank lies in ``[start, stop)``.

    `windows` is one ``(start, stop)`` over all leaves together (ranks are global), or a dict
    ``{leaf id: (start, stop)}`` (ranks within each leaf). The descending stable rank of an entry
    is the number of entries of its batch row with a larger score plus the number of equal
    entries before it (earlier leaves in tree order, then row-major order), so ``[0, k)`` is an
    exact top-k with ties to the earlier entry. The thresholds, and the counts above and at them,
    come from a three-pass radix select (`_order_stats`). Tied thresholds are resolved by a
    position cutoff per leaf row, found from two histograms of the tied positions, only when some
    threshold value is tied across the cut (one `lax.cond`).
    Only small per-row statistics are materialized; the masks are elementwise expressions.
    """
    per_leaf = isinstance(windows, dict)
    sizes = {i: n for b in buckets for i, n in zip(b.ids, b.sizes, strict=True)}
    total = sum(sizes.values())
    if per_leaf:
        win = {i: (max(0, windows[i][0]), min(n, windows[i][1])) for i, n in sizes.items()}
        empty = {i: int(win[i][1] <= win[i][0]) for i in sizes}
        upper = any(not empty[i] and win[i][1] < sizes[i] for i in sizes)
        lower = any(not empty[i] and win[i][0] > 0 for i in sizes)
        # Neutral ranks keep everything on a side: rank 0 from the top or the last rank.
        upper_rank = {i: (win[i][1] - 1 if not empty[i] else sizes[i] - 1) for i in sizes}
        lower_rank = {i: (win[i][0] if not empty[i] else 0) for i in sizes}
        fills = [_per_leaf(empty, b, batch_ndim)[..., None] == 0 for b in buckets]
    else:
        start, stop = max(0, windows[0]), min(total, windows[1])
        fills = [jnp.asarray(stop > start)] * len(buckets)
        upper, lower = bool(stop > start and stop < total), bool(stop > start and start > 0)
        upper_rank, lower_rank = stop - 1, start
    sides = [(True, upper_rank)] * upper + [(False, lower_rank)] * lower
    if not sides:
        return [jnp.broadcast_to(f, b.data.shape) for f, b in zip(fills, buckets, strict=True)]

    def ascending(rank):  # descending rank r is the (size - 1 - r)-th smallest
        if per_leaf:
            return {i: sizes[i] - 1 - r for i, r in rank.items()}
        return total - 1 - rank

    def at(value, j):  # a per-row statistic, broadcast against bucket j
        if per_leaf or isinstance(value, list):
            return value[j][..., None]
        return value.reshape((1,) + value.shape + (1,))

    queries = [(buckets, ascending(r)) for _, r in sides]
    if total > _WIDE_COUNT_THRESHOLD:
        stats = [(t, None) for t in _order_keys_bisect(queries, batch_ndim)]
    else:  # the radix select's histograms also count each leaf row below and at the key
        stats = _order_stats(queries, batch_ndim)
    cuts = []  # per side: threshold, and for every bucket a (quota, tie count) per leaf row
    for (is_upper, rank), (t, counts) in zip(sides, stats, strict=True):
        greater, n_equal = [], []
        for j, b in enumerate(buckets):
            if counts is None:
                key = _sortable(_scores(b))
                greater.append(_leaf_counts(b, key > at(t, j), batch_ndim))
                n_equal.append(_leaf_counts(b, key == at(t, j), batch_ndim))
            else:
                below, equal = counts[j]
                size = _per_leaf(dict(zip(b.ids, b.sizes, strict=True)), b, batch_ndim)
                greater.append(size - below - equal)
                n_equal.append(equal)
        # quota: how many tied entries (in position order) come before the cut, per leaf row.
        if per_leaf:
            target = {i: r + 1 if is_upper else r for i, r in rank.items()}
            quota = [
                jnp.clip(_per_leaf(target, b, batch_ndim) - g, 0, n)
                for b, g, n in zip(buckets, greater, n_equal, strict=True)
            ]
        else:
            left = _wide_from(rank + 1 if is_upper else rank, _wide_sum(greater, total))
            rows = {
                i: n[j] for b, n in zip(buckets, n_equal, strict=True) for j, i in enumerate(b.ids)
            }
            before, running = {}, jnp.zeros(left.shape, jnp.int32)
            for i in sorted(rows):  # distribute the quota over the leaves in tree order
                before[i] = running
                running = _saturating_add(running, rows[i])
            quota = [
                jnp.clip(left[None] - jnp.stack([before[i] for i in b.ids]), 0, n)
                for b, n in zip(buckets, n_equal, strict=True)
            ]
        cuts.append((t, quota, n_equal))

    def trivial(_):  # every quota is 0 (cut before all ties) or all of them (cut after)
        return [
            [jnp.where(q == 0, 0, b.width) for q, b in zip(quota, buckets, strict=True)]
            for _, quota, _ in cuts
        ]

    def search(_):  # position of the cut: smallest p with #{ties at positions < p} >= quota
        return [
            [
                _tie_cuts(b, (_sortable(_scores(b)) == at(t, j)), q, batch_ndim)
                for j, (b, q) in enumerate(zip(buckets, quota, strict=True))
            ]
            for t, quota, _ in cuts
        ]

    partial = jnp.stack(
        [
            jnp.any((q > 0) & (q < n))
            for _, quota, n_equal in cuts
            for q, n in zip(quota, n_equal, strict=True)
        ]
    )
    positions = lax.cond(jnp.any(partial), search, trivial, None)

    masks = []
    for j, b in enumerate(buckets):
        key = _sortable(_scores(b))
        pos = lax.broadcasted_iota(jnp.int32, b.data.shape, b.data.ndim - 1)
        mask = fills[j]
        for (is_upper, _), (t, _, _), p in zip(sides, cuts, positions, strict=True):
            tb, pb = at(t, j), p[j][..., None]
            if is_upper:
                mask = mask & ((key > tb) | ((key == tb) & (pos < pb)))
            else:
                mask = mask & ((key < tb) | ((key == tb) & (pos >= pb)))
        masks.append(jnp.broadcast_to(mask, b.data.shape))
    return masks


def _tie_cuts(b: _Bucket, tied: jax.Array, quota: jax.Array, batch_ndim: int) -> jax.Array:
    """Per leaf row, the smallest position `p` with ``#{tied real entries at positions < p} >=
    quota`` (``0 <= quota <= #tied``): two histograms per row of the tied positions, by block
    and then within the block holding the quota-th one."""
    width = b.data.shape[-1]
    lead = b.data.shape[:-1]
    n_rows = math.prod(lead)
    shift = (max(1, (width - 1).bit_length()) + 1) // 2
    n_blocks = -(-width // (1 << shift))
    valid = _valid(b, batch_ndim)
    tied = tied if valid is None else tied & valid
    pos = lax.broadcasted_iota(jnp.int32, b.data.shape, b.data.ndim - 1)
    row = jnp.arange(n_rows, dtype=jnp.int32).reshape(lead + (1,))

    def histogram(index, bins, keep):
        flat = jnp.where(keep, row * bins + index, n_rows * bins).reshape(-1)
        hist = jnp.zeros((n_rows * bins,), jnp.int32).at[flat].add(jnp.ones_like(flat), mode="drop")
        return hist.reshape(lead + (bins,))

    per_block = histogram(pos >> shift, n_blocks, tied)
    upto = jnp.cumsum(per_block, axis=-1, dtype=jnp.int32)
    q = quota[..., None]
    j = jnp.minimum(jnp.sum(upto < q, axis=-1, dtype=jnp.int32), n_blocks - 1)
    take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
    before = take(upto, j) - take(per_block, j)
    inside = tied & ((pos >> shift) == j[..., None])
    offsets = histogram(pos & ((1 << shift) - 1), 1 << shift, inside)
    inner = jnp.cumsum(offsets, axis=-1, dtype=jnp.int32) + before[..., None]
    o = jnp.sum(inner < q, axis=-1, dtype=jnp.int32)
    return jnp.where(quota <= 0, 0, j * (1 << shift) + o + 1)


def _saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    out = a + b  # both non-negative int32
    return jnp.where(out < 0, _INT32_MAX, out)


def _top_k_masks(buckets: list, density: float, scope: str, batch_ndim: int) -> list:
    """Per-bucket masks of the top-`density` fraction of entries by magnitude (`buckets` hold
    values), per leaf (``scope='per_tensor'``) or over all leaves (``'global'``)."""
    magnitudes = _with_score(buckets, jnp.abs)
    if scope == "global":
        return _window_masks(magnitudes, (0, _count_of(density, _total_size(buckets))), batch_ndim)
    windows = {
        i: (0, _count_of(density, n)) for b in buckets for i, n in zip(b.ids, b.sizes, strict=True)
    }
    return _window_masks(magnitudes, windows, batch_ndim)


# ---------------------------------------------------------------------------------------------
# MG-02: task vectors and task arithmetic.


def task_vector(finetuned: Any, base: Any, *, dtype: Any = None) -> Any:
    """Returns the task vector ``finetuned - base``, leaf by leaf.

    The difference is computed in float32 and returned in `finetuned`'s leaf dtypes, or in `dtype`
    when given (e.g. ``jnp.float32`` keeps the exact difference of two bfloat16 models).

    Args:
        finetuned: The fine-tuned parameters.
        base: The pre-trained parameters, with the same structure and shapes.
        dtype: Optional dtype for every leaf of the result. Static.

    Returns:
        A pytree shaped like `finetuned`.

    Raises:
        ValueError: If the trees differ in structure or in a leaf's shape.
        TypeError: If a leaf is not floating point.

    Example:
        >>> from cljax.transforms.merging.task_vectors import task_vector
        >>> task_vector({"w": jnp.array([1.5, 2.0])}, {"w": jnp.array([1.0, 1.0])})["w"]
        Array([0.5, 1. ], dtype=float32)

    References:
        Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
        https://arxiv.org/abs/2212.04089
    """
    _checks.check_same_structure("task_vector", finetuned=finetuned, base=base)
    _check_float_leaves("task_vector", "finetuned", finetuned)
    _check_float_leaves("task_vector", "base", base)
    return jax.tree.map(
        lambda f, b: (_f32(f) - _f32(b)).astype(dtype if dtype is not None else _dtype_of(f)),
        finetuned,
        base,
    )


def apply_task_vector(base: Any, tau: Any, scale: jax.typing.ArrayLike = 1.0) -> Any:
    """Returns ``base + scale * tau`` in `base`'s leaf dtypes (the edited model).

    With a merged task vector this is the paper-level model ``theta_0 + lambda * tau_m``; a
    negative `scale` negates a task (forgetting).

    Args:
        base: The pre-trained parameters.
        tau: A task vector with the same structure and shapes.
        scale: The scaling coefficient (``lambda``, ``alpha``); may be traced.

    Returns:
        A pytree shaped like `base`, in `base`'s dtypes; computed in float32.

    Raises:
        ValueError: If the trees differ in structure or in a leaf's shape.
        TypeError: If a leaf is not floating point.

    Example:
        >>> from cljax.transforms.merging.task_vectors import apply_task_vector
        >>> apply_task_vector({"w": jnp.ones(2)}, {"w": jnp.array([2.0, -2.0])}, 0.5)["w"]
        Array([2., 0.], dtype=float32)

    References:
        Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
        https://arxiv.org/abs/2212.04089
    """
    _checks.check_same_structure("apply_task_vector", base=base, tau=tau)
    _check_float_leaves("apply_task_vector", "base", base)
    _check_float_leaves("apply_task_vector", "tau", tau)
    scale = _f32(scale)
    return jax.tree.map(lambda b, t: (_f32(b) + scale * _f32(t)).astype(_dtype_of(b)), base, tau)


def task_arithmetic(task_vectors: Sequence[Any], weights: Any = 1.0) -> Any:
    """Returns ``sum_k weights[k] * tau_k``, the task-arithmetic merge (per leaf).

    Args:
        task_vectors: A list or tuple of task-vector pytrees with one structure and shapes.
        weights: One float for all vectors, or one per vector (floats or a ``(K,)`` array; may be
            traced). ``1.0`` gives the plain sum; use `apply_task_vector`'s `scale` for ``lambda``.

    Returns:
        The merged task vector, in the first vector's dtypes (accumulated in float32).

    Raises:
        TypeError: If `task_vectors` is not a list/tuple, or a leaf is not floating point.
        ValueError: If it is empty, the trees mismatch, or `weights` has the wrong length.

    Example:
        >>> from cljax.transforms.merging.task_vectors import task_arithmetic
        >>> tvs = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}]
        >>> task_arithmetic(tvs, [1.0, 0.5])["w"]
        Array([1., 1.], dtype=float32)

    References:
        Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
        https://arxiv.org/abs/2212.04089
    """
    tvs = _as_list("task_arithmetic", "task_vectors", task_vectors)
    w = _weight_list("task_arithmetic", 1.0 if weights is None else weights, len(tvs))
    total = jax.tree.map(
        lambda *xs: sum(_f32(wk) * _f32(x) for wk, x in zip(w, xs, strict=True)), *tvs
    )
    return _cast_like(total, tvs[0])


# ---------------------------------------------------------------------------------------------
# MG-01: model soups.


class UniformSoupState(NamedTuple):
    """Running state of a streaming uniform soup (`uniform_soup_init` / `uniform_soup_add`)."""

    total: Any  # float32 running sum of the models added so far
    count: jax.Array  # int32 number of models added


def uniform_soup(models: Sequence[Any]) -> Any:
    """Returns the uniform soup ``(1/K) sum_k theta_k`` of models sharing one initialization.

    Args:
        models: A list or tuple of parameter pytrees with one structure and shapes.

    Returns:
        The leaf-wise mean, in the first model's dtypes (accumulated in float32).

    Raises:
        TypeError: If `models` is not a list/tuple, or a leaf is not floating point.
        ValueError: If it is empty or the trees mismatch.

    Example:
        >>> from cljax.transforms.merging.task_vectors import uniform_soup
        >>> uniform_soup([{"w": jnp.array([0.0, 2.0])}, {"w": jnp.array([2.0, 2.0])}])["w"]
        Array([1., 2.], dtype=float32)

    Notes:
        Batch-norm statistics must be recomputed after averaging (the paper does so); this
        function only averages the leaves it is given.

    References:
        Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
        accuracy without increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482
    """
    models = _as_list("uniform_soup", "models", models)
    total = jax.tree.map(lambda *xs: sum(_f32(x) for x in xs), *models)
    return jax.tree.map(lambda t, m: (t / len(models)).astype(_dtype_of(m)), total, models[0])


def uniform_soup_init(params: Any) -> UniformSoupState:
    """Returns an empty streaming soup for models shaped like `params` (float32 zeros, count 0).

    Memory is one float32 copy of the parameters, whatever the number of models added.

    Example:
        >>> from cljax.transforms.merging import task_vectors as tv
        >>> state = tv.uniform_soup_init({"w": jnp.zeros(2)})
        >>> state = tv.uniform_soup_add(state, {"w": jnp.array([1.0, 3.0])})
        >>> tv.uniform_soup_result(tv.uniform_soup_add(state, {"w": jnp.array([3.0, 3.0])}))["w"]
        Array([2., 3.], dtype=float32)
    """
    _check_float_leaves("uniform_soup_init", "params", params)
    return UniformSoupState(
        total=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _F32), params),
        count=jnp.zeros([], jnp.int32),
    )


def uniform_soup_add(state: UniformSoupState, params: Any) -> UniformSoupState:
    """Adds one model to a streaming uniform soup (see `uniform_soup_init`).

    Raises:
        ValueError: If `params` does not match the soup's structure and shapes.
    """
    _checks.check_same_structure("uniform_soup_add", total=state.total, params=params)
    _check_float_leaves("uniform_soup_add", "params", params)
    total = jax.tree.map(lambda t, p: t + _f32(p), state.total, params)
    return UniformSoupState(total=total, count=state.count + 1)


def uniform_soup_result(state: UniformSoupState, like: Any = None) -> Any:
    """Returns the mean of the models added to a streaming soup.

    Args:
        state: A `UniformSoupState` holding at least one model.
        like: Optional pytree whose leaf dtypes the result takes (e.g. one of the models);
            float32 when omitted.

    Returns:
        The mean; an empty soup gives zeros (never NaN).
    """
    mean = jax.tree.map(lambda t: t / jnp.maximum(state.count, 1).astype(_F32), state.total)
    return mean if like is None else _cast_like(mean, like)


_soup_add_jit = jax.jit(lambda total, params: jax.tree.map(lambda t, p: t + _f32(p), total, params))
_soup_mean_jit = jax.jit(
    lambda total, count, like: jax.tree.map(
        lambda t, ref: (t / count).astype(ref.dtype), total, like
    )
)


def greedy_soup(
    models: Sequence[Any],
    evaluate: Callable[[Any], Any],
    *,
    scores: Sequence[float] | None = None,
    accept_ties: bool = False,
) -> tuple[Any, list[int]]:
    """Builds a greedy soup: adds models best-first while the held-out score improves.

    Models are sorted by their own held-out score, descending; the soup starts as the best one.
    Each next candidate is averaged in tentatively (uniform mean of the ingredients so far plus the
    candidate) and kept only if ``evaluate(candidate_soup) > best_score`` (strict, as in the
    authors' code; ``accept_ties=True`` uses ``>=``, the paper's Recipe 1 "does not get worse").
    A host-side loop around jitted averaging; `evaluate` runs once per model (twice counting the
    individual scores unless `scores` is given). Not itself jittable.

    Args:
        models: A list or tuple of parameter pytrees fine-tuned from one initialization.
        evaluate: ``evaluate(params) -> float``, a held-out score where higher is better.
        scores: Optional individual held-out scores of `models` (skips evaluating them).
        accept_ties: Accept a candidate whose soup scores equal to the best so far. Static.

    Returns:
        ``(soup, chosen)``: the soup in the first model's dtypes, and the indices of its
        ingredients into `models` in the order they were added (``chosen[0]`` is the best model).

    Raises:
        TypeError: If `models` is not a list/tuple, a leaf is not floating point, or `evaluate`
            is not callable.
        ValueError: If `models` is empty, the trees mismatch, or `scores` has the wrong length.

    Example:
        >>> from cljax.transforms.merging.task_vectors import greedy_soup
        >>> models = [{"w": jnp.array(1.0)}, {"w": jnp.array(0.0)}, {"w": jnp.array(3.0)}]
        >>> soup, chosen = greedy_soup(models, lambda p: -abs(float(p["w"]) - 0.6))
        >>> chosen, float(soup["w"])
        ([0, 1], 0.5)

    Notes:
        Ties between individual scores keep the authors' order: their code sorts ascending (a
        stable sort) and reverses, so among equal scores the later model comes first. The
        running average is kept as a float32 sum; the paper's code updates a running mean.

    References:
        Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
        accuracy without increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482
    """
    models = _as_list("greedy_soup", "models", models)
    if not callable(evaluate):
        raise TypeError(
            f"greedy_soup(evaluate=...) must be a callable params -> float, got "
            f"{type(evaluate).__name__}."
        )
    if scores is None:
        scores = [float(evaluate(m)) for m in models]
    elif len(scores) != len(models):
        raise ValueError(
            f"greedy_soup(scores=...) must hold one score per model ({len(models)}), got "
            f"{len(scores)}."
        )
    scores = [float(s) for s in scores]
    order = sorted(range(len(models)), key=lambda i: scores[i])[::-1]  # authors: sort, reverse
    like = models[0]
    chosen = [order[0]]
    total = _soup_add_jit(
        jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _F32), like), models[order[0]]
    )
    best = scores[order[0]]
    for i in order[1:]:
        candidate_total = _soup_add_jit(total, models[i])
        candidate = _soup_mean_jit(candidate_total, _f32(len(chosen) + 1), like)
        score = float(evaluate(candidate))
        if score > best or (accept_ties and score == best):
            chosen.append(i)
            total, best = candidate_total, score
    return _soup_mean_jit(total, _f32(len(chosen)), like), chosen


# ---------------------------------------------------------------------------------------------
# MG-03: TIES-Merging.


def ties_merge(
    task_vectors: Sequence[Any],
    weights: Any = None,
    *,
    density: float = 0.2,
    sign: SignMethod = "total",
    scope: Scope = "per_tensor",
    zero_sign: ZeroSign = "positive",
) -> Any:
    """Merges task vectors with TIES: trim, elect a sign per entry, disjoint mean.

    1. *Trim*: each task vector keeps its ``k = floor(density * n)`` largest-magnitude entries,
       per tensor (``scope='per_tensor'``, PEFT / mergekit) or over the whole flattened vector
       (``scope='global'``, the reference code); exactly k, ties to the earlier entry.
    2. *Elect*: ``'total'`` takes the sign of ``sum_k trimmed_k``, ``'frequency'`` the sign of
       ``#positive - #negative``; a zero gives +1 (``zero_sign='positive'``, PEFT / mergekit) or
       the majority of the elected signs in the scope (``'majority'``, the reference code; +1 on an
       even split).
    3. *Disjoint mean*: ``sum_k w_k trimmed_k [agrees] / max(1, #agreeing)``, where zeros never
       agree. As in PEFT, the sign is elected on the unweighted trimmed vectors and the divisor
       counts agreeing entries (not their weights).

    Args:
        task_vectors: A list or tuple of task-vector pytrees with one structure and shapes.
        weights: Optional per-vector weights (a float, a sequence, or a ``(K,)`` array; may be
            traced); None means 1.
        density: Kept fraction in (0, 1]; 1 skips the trim. Static.
        sign: ``'total'`` (sum of values, TIES "mass") or ``'frequency'`` (count of signs). Static.
        scope: ``'per_tensor'`` or ``'global'`` trimming (and majority sign). Static.
        zero_sign: Sign elected where the vote is exactly zero. Static.

    Returns:
        The merged task vector ``tau_m``, in the first vector's dtypes. Apply it with
        ``apply_task_vector(base, tau_m, lam)``; the reference scripts sweep ``lam`` in 0.8 … 2.5.

    Raises:
        TypeError: On a bad `task_vectors` container, non-float leaves, or a traced `density`.
        ValueError: On mismatched trees, an out-of-range `density`, an unknown choice, or
            `weights` of the wrong length.

    Example:
        >>> from cljax.transforms.merging.task_vectors import ties_merge
        >>> tvs = [{"w": jnp.array([1.0, -2.0, 0.1])}, {"w": jnp.array([3.0, 1.0, 0.2])}]
        >>> ties_merge(tvs, density=1.0)["w"]
        Array([ 2.  , -2.  ,  0.15], dtype=float32)

    Notes:
        The reference code keeps every entry ``>=`` the ``(n - floor(density n))``-th smallest
        magnitude, i.e. ``floor(density n) + 1`` entries plus any ties; here exactly
        ``floor(density n)`` are kept (as PEFT's ``magnitude_prune``), so tiny leaves can be
        trimmed to zero. mergekit instead elects on weighted values and divides by the sum of the
        agreeing weights; with equal weights all three agree.

    References:
        Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
        https://arxiv.org/abs/2306.01708
    """
    fn = "ties_merge"
    tvs = _as_list(fn, "task_vectors", task_vectors)
    density = _static_fraction(fn, "density", density)
    _checks.check_choice(fn, "sign", sign, _SIGN_METHODS)
    _checks.check_choice(fn, "scope", scope, _SCOPES)
    _checks.check_choice(fn, "zero_sign", zero_sign, _ZERO_SIGNS)
    w = _weight_array(_weight_list(fn, weights, len(tvs)))
    return _ties_core(tvs, w, density=density, sign=sign, scope=scope, zero_sign=zero_sign)


def _weight_array(weights: list | None) -> jax.Array | None:
    return None if weights is None else jnp.stack([_f32(w) for w in weights])


@functools.partial(jax.jit, static_argnames=("density", "sign", "scope", "zero_sign"))
def _ties_core(tvs, w, *, density, sign, scope, zero_sign):
    per_leaf, shapes, treedef = _task_leaves(tvs)
    buckets = _pack(per_leaf, batch_ndim=1)  # data: (B, K, width)
    data = [b.data for b in buckets]
    if density < 1.0:
        masks = _top_k_masks(buckets, density, scope, batch_ndim=1)
        data = [jnp.where(m, x, 0.0) for m, x in zip(masks, data, strict=True)]
    if sign == "total":
        votes = [jnp.sum(x, axis=1) for x in data]  # (B, width)
    else:
        votes = [jnp.sum(jnp.sign(x), axis=1) for x in data]
    if zero_sign == "positive":
        tie_positive = [jnp.ones((), jnp.bool_)] * len(votes)
    else:  # majority of the elected signs over the scope (padding votes 0); a split gives +1
        elected = [jnp.sum(jnp.sign(v), axis=-1, keepdims=True) for v in votes]  # (B, 1)
        if scope == "global":
            total = sum(jnp.sum(e) for e in elected)
            elected = [jnp.broadcast_to(total, e.shape) for e in elected]
        tie_positive = [e >= 0 for e in elected]
    out = []
    for x, v, tie in zip(data, votes, tie_positive, strict=True):
        positive = (v > 0) | ((v == 0) & tie)
        agree = jnp.where(positive[:, None], x > 0, x < 0)
        weighted = x if w is None else x * w.reshape(1, -1, 1)
        count = jnp.sum(agree, axis=1, dtype=jnp.int32)
        out.append(jnp.sum(jnp.where(agree, weighted, 0.0), axis=1) / jnp.maximum(count, 1))
    merged = _unpack(buckets, out, shapes)
    return _cast_like(jax.tree.unflatten(treedef, merged), tvs[0])


# ---------------------------------------------------------------------------------------------
# DARE.


def dare(
    task_vector: Any, density: jax.typing.ArrayLike, key: jax.Array, rescale: bool = True
) -> Any:
    """Drops task-vector entries at random and rescales the rest (DARE).

    Each entry is kept independently with probability `density` and, with ``rescale=True``,
    divided by `density`, so the expectation of every entry is unchanged. Each leaf draws from
    its own key, split from `key` in tree-flatten order.

    Args:
        task_vector: A task-vector pytree.
        density: Keep probability in (0, 1]; may be traced.
        key: A JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
        rescale: Divide kept entries by `density`. Static.

    Returns:
        A pytree like `task_vector`, in its dtypes (computed in float32).

    Raises:
        ValueError: If `density` is outside (0, 1].
        TypeError: If a leaf is not floating point.

    Example:
        >>> from cljax.transforms.merging.task_vectors import dare
        >>> out = dare({"w": jnp.ones(4)}, 0.5, jax.random.key(0))
        >>> bool(jnp.all((out["w"] == 0) | (out["w"] == 2)))
        True

    Notes:
        Merging methods built on it (DARE + task arithmetic, DARE + TIES) are compositions:
        ``task_arithmetic([dare(t, p, k) for t, k in zip(tvs, keys)], w)``.

    References:
        Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
        as a Free Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
    """
    _checks.check_in_range("dare", "density", density, 0.0, 1.0, low_inclusive=False)
    _check_float_leaves("dare", "task_vector", task_vector)
    return _dare_core(task_vector, _f32(density), key, rescale=bool(rescale))


@functools.partial(jax.jit, static_argnames="rescale")
def _dare_core(task_vector, p, key, *, rescale):
    leaves, treedef = jax.tree.flatten(task_vector)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for leaf, k in zip(leaves, keys, strict=False):  # keys has max(1, len) entries
        keep = jax.random.bernoulli(k, p, jnp.shape(leaf))
        x = _f32(leaf) / p if rescale else _f32(leaf)
        out.append(jnp.where(keep, x, 0.0).astype(_dtype_of(leaf)))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# MG-04: Model Breadcrumbs.


def breadcrumbs(
    task_vectors: Sequence[Any],
    beta: float = 0.85,
    gamma: float = 0.993,
    *,
    weights: Any = None,
) -> Any:
    """Merges task vectors with Model Breadcrumbs: drop tiny entries and large outliers, then sum.

    Per tensor of each task vector, entries are ranked by magnitude; the ``floor((1 - gamma) n)``
    largest (outliers) and the ``floor(beta n)`` smallest are zeroed, keeping the entries ranked
    between the ``beta`` and ``gamma`` quantiles (a fraction ``gamma - beta``; 14.3% with the
    defaults). The masked vectors are summed (optionally weighted): ``sum_t w_t M_t * tau_t``.
    The paper's ``alpha`` is the scale of `apply_task_vector`.

    Args:
        task_vectors: A list or tuple of task-vector pytrees with one structure and shapes.
        beta: Fraction of smallest-magnitude entries removed, in [0, 1]. Static.
        gamma: Upper quantile kept, in [beta, 1]; ``1 - gamma`` is the fraction of largest
            entries removed. Static.
        weights: Optional per-vector weights (float, sequence or ``(K,)`` array); None means 1.

    Returns:
        The merged (summed) task vector, in the first vector's dtypes.

    Raises:
        TypeError: On a bad `task_vectors` container, non-float leaves, or traced `beta`/`gamma`.
        ValueError: On mismatched trees, ``beta`` or ``gamma`` out of range, ``beta > gamma``,
            or `weights` of the wrong length.

    Example:
        >>> from cljax.transforms.merging.task_vectors import breadcrumbs
        >>> tv = {"w": jnp.arange(1.0, 11.0)}
        >>> breadcrumbs([tv], beta=0.3, gamma=0.9)["w"]
        Array([0., 0., 0., 4., 5., 6., 7., 8., 9., 0.], dtype=float32)

    Notes:
        mergekit's ``breadcrumbs`` takes ``density = gamma - beta`` and its own ``gamma`` equal to
        ``1 - gamma`` here. The authors' code ranks along the last axis of each tensor (row by
        row) and leaves scalars untouched; this follows the card and mergekit and ranks each
        tensor as a whole (exact counts, ties to the earlier entry).

    References:
        Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
        Masks", ECCV 2024. https://arxiv.org/abs/2312.06795
    """
    fn = "breadcrumbs"
    tvs = _as_list(fn, "task_vectors", task_vectors)
    beta = _static_fraction(fn, "beta", beta, low_inclusive=True)
    gamma = _static_fraction(fn, "gamma", gamma, low_inclusive=True)
    if beta > gamma:
        raise ValueError(
            f"{fn}(beta=...) must be <= gamma: entries between the beta and gamma magnitude "
            f"quantiles are kept; got beta={beta}, gamma={gamma}."
        )
    w = _weight_array(_weight_list(fn, weights, len(tvs)))
    return _breadcrumbs_core(tvs, w, beta=beta, gamma=gamma)


@functools.partial(jax.jit, static_argnames=("beta", "gamma"))
def _breadcrumbs_core(tvs, w, *, beta, gamma):
    per_leaf, shapes, treedef = _task_leaves(tvs)
    buckets = _pack(per_leaf, batch_ndim=1)  # data: (B, K, width)
    windows = {
        i: (_count_of(1.0 - gamma, n), n - _count_of(beta, n))
        for b in buckets
        for i, n in zip(b.ids, b.sizes, strict=True)
    }
    masks = _window_masks(_with_score(buckets, jnp.abs), windows, batch_ndim=1)
    out = []
    for m, b in zip(masks, buckets, strict=True):
        x = jnp.where(m, b.data, 0.0)
        out.append(jnp.sum(x if w is None else x * w.reshape(1, -1, 1), axis=1))
    merged = _unpack(buckets, out, shapes)
    return _cast_like(jax.tree.unflatten(treedef, merged), tvs[0])


# ---------------------------------------------------------------------------------------------
# MG-05: MagMax.


def magmax_init(params: Any) -> Any:
    """Returns the empty running maximum-magnitude vector (zeros shaped and typed like `params`).

    ``magmax_update(magmax_init(p), tau)`` is ``tau``; memory stays one copy of the parameters.
    """
    _check_float_leaves("magmax_init", "params", params)
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _dtype_of(p)), params)


def magmax_update(running: Any, task_vector: Any) -> Any:
    """Folds one task vector into a running MagMax vector: entries with ``|tau| >= |running|``
    are replaced by ``tau`` (ties go to the newer task).

    Args:
        running: The running maximum-magnitude vector (from `magmax_init` or a previous update).
        task_vector: The next task vector ``theta_t - theta_0`` (relative to the pre-trained
            model, also under sequential fine-tuning).

    Returns:
        The updated running vector, in `running`'s dtypes.

    Raises:
        ValueError: If the trees differ in structure or a leaf's shape.
        TypeError: If a leaf is not floating point.
    """
    _checks.check_same_structure("magmax_update", running=running, task_vector=task_vector)
    _check_float_leaves("magmax_update", "task_vector", task_vector)
    return jax.tree.map(
        lambda r, t: jnp.where(jnp.abs(_f32(t)) >= jnp.abs(_f32(r)), _f32(t), _f32(r)).astype(
            _dtype_of(r)
        ),
        running,
        task_vector,
    )


def magmax(task_vectors: Sequence[Any]) -> Any:
    """Merges task vectors by keeping, per entry, the value of largest magnitude (MagMax).

    ``tau_max[j] = tau_{t*}[j]`` with ``t* = argmax_t |tau_t[j]|``; ties go to the later task (as
    in the authors' ``merge_max_abs``). The result is unscaled: the paper's model is
    ``apply_task_vector(base, tau_max, 0.5)``. Equal to folding `magmax_update` over the list.

    Args:
        task_vectors: A list or tuple of task-vector pytrees, each relative to the pre-trained
            model (in MagMax, from sequential fine-tuning).

    Returns:
        The merged task vector, in the first vector's dtypes.

    Raises:
        TypeError: If `task_vectors` is not a list/tuple, or a leaf is not floating point.
        ValueError: If it is empty or the trees mismatch.

    Example:
        >>> from cljax.transforms.merging.task_vectors import magmax
        >>> magmax([{"w": jnp.array([1.0, -3.0])}, {"w": jnp.array([-2.0, 3.0])}])["w"]
        Array([-2.,  3.], dtype=float32)

    References:
        Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
        ECCV 2024. https://arxiv.org/abs/2407.06322
    """
    tvs = _as_list("magmax", "task_vectors", task_vectors)
    running = jax.tree.map(jnp.asarray, tvs[0])
    for tv in tvs[1:]:
        running = magmax_update(running, tv)
    return running


# ---------------------------------------------------------------------------------------------
# MG-44: PCB-Merging.


def _min_max_normalize(x, low, high):
    """``(x - low) / (high - low)``, 0 where the range is empty (constant rows never give NaN)."""
    span = high - low
    ok = span > 0
    return jnp.where(ok, (x - low) / jnp.where(ok, span, 1.0), 0.0)


def _pcb(buckets: list, ratio: float, clip_ratio: float, scope: str) -> list:
    """PCB-Merging on packed stacked task vectors (`_Bucket` data ``(B, K, width)``); returns one
    ``(B, width)`` merged array per bucket."""
    n_tasks = buckets[0].data.shape[1]
    sizes = {i: n for b in buckets for i, n in zip(b.ids, b.sizes, strict=True)}
    total = sum(sizes.values())

    def ranks(fraction_rank):  # static order-statistic ranks, per leaf or over the whole scope
        if scope == "global":
            return max(0, min(total - 1, fraction_rank(total)))
        return {i: max(0, min(n - 1, fraction_rank(n))) for i, n in sizes.items()}

    def per_row(value, j):  # a per-row statistic, broadcast against bucket j's (B, K, width)
        return value[j][..., None] if scope != "global" else value.reshape(1, -1, 1)

    # 1. Outlier clip of the magnitudes at the clip_ratio order statistics (per task).
    magnitudes = _with_score(buckets, jnp.abs)
    low, high = _order_values(
        [
            (magnitudes, ranks(lambda d: int(d * clip_ratio))),
            (magnitudes, ranks(lambda d: int(d * (1 - clip_ratio) - 1))),
        ],
        batch_ndim=1,
    )
    shift = 0.0 if n_tasks <= 80 else 1.0  # exp(n) overflows float32 past n = 88
    clipped_tvs, scores = [], []
    for j, b in enumerate(buckets):
        lo, hi = per_row(low, j), per_row(high, j)
        c = jnp.minimum(jnp.maximum(jnp.abs(b.data), lo), hi)
        clipped_tvs.append(jnp.sign(b.data) * c)
        # 2. Intra-balancing exp(n Norm(|tau~|)^2) times inter-balancing tanh(tau sum_j tau_j);
        # min and max of the clipped magnitudes are min(lo, hi) and hi.
        intra = jnp.exp(
            n_tasks * (jnp.square(_min_max_normalize(c, jnp.minimum(lo, hi), hi)) - shift)
        )
        inter = jnp.tanh(b.data * jnp.sum(b.data, axis=1, keepdims=True))
        scores.append(intra * inter)
    # 3. Drop the lowest (1 - ratio) fraction of scores and min-max rescale the rest to [0, 1].
    score_buckets = _with_data(buckets, scores)
    threshold, top = _order_values(
        [
            (score_buckets, ranks(lambda d: int(d * (1 - ratio)))),
            (score_buckets, ranks(lambda d: d - 1)),
        ],
        batch_ndim=1,
    )
    out = []
    for j, (s, c) in enumerate(zip(scores, clipped_tvs, strict=True)):
        t = per_row(threshold, j)
        weight = _min_max_normalize(jnp.maximum(s, t), t, per_row(top, j))
        # 4. Score-weighted average of the clipped task vectors.
        out.append(jnp.sum(weight * c, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1e-12))
    return out


def pcb_merge(
    task_vectors: Sequence[Any],
    *,
    ratio: float = 0.1,
    clip_ratio: float = 1e-4,
    scope: Scope = "global",
) -> Any:
    """Merges task vectors with PCB-Merging (parameter competition balancing).

    Per task ``i`` over the scope (``D`` entries, ``n`` tasks; ``x_(k)`` the k-th smallest):

    1. clip magnitudes to ``[|tau_i|_(floor(c D)), |tau_i|_(floor((1 - c) D) - 1)]`` with
       ``c = clip_ratio``, ``tau~_i = sign(tau_i) * clipped``;
    2. score ``beta_i = exp(n * Norm(|tau~_i|)^2) * tanh(tau_i * sum_j tau_j)`` (intra- times
       inter-balancing; the inter term uses the unclipped vectors; ``Norm`` is min-max);
    3. ``s_i = Norm(max(beta_i, t_i))`` with ``t_i = (beta_i)_(floor((1 - ratio) D))``, so about
       a `ratio` fraction of entries keeps a nonzero weight;
    4. ``tau_m = sum_i s_i tau~_i / max(sum_i s_i, 1e-12)``.

    Args:
        task_vectors: A list or tuple of task-vector pytrees with one structure and shapes.
        ratio: Kept fraction ``r`` in (0, 1] (0.1 in the paper, 0.05 with the search). Static.
        clip_ratio: Fraction clipped at each end of the magnitudes, in [0, 0.5). Static.
        scope: ``'global'`` (order statistics over the whole flattened model, the reference
            code) or ``'per_tensor'``. Static.

    Returns:
        The merged task vector ``tau_m``, in the first vector's dtypes; apply it with
        ``apply_task_vector(base, tau_m, lam)``.

    Raises:
        TypeError: On a bad `task_vectors` container, non-float leaves, or traced fractions.
        ValueError: On mismatched trees, out-of-range fractions, or an unknown `scope`.

    Example:
        >>> from cljax.transforms.merging.task_vectors import pcb_merge
        >>> tvs = [{"w": jnp.array([1.0, -2.0, 3.0, 0.5])}] * 2
        >>> pcb_merge(tvs, ratio=0.5, clip_ratio=0.0)["w"]
        Array([0., 0., 3., 0.], dtype=float32)

    Notes:
        Order statistics are exact (radix select on the bit pattern) and computed per task over
        the scope without flattening the model. Min-max normalization of a constant row gives 0
        instead of NaN. For more than 80 tasks, ``exp(n (Norm^2 - 1))`` replaces ``exp(n Norm^2)``
        (a common factor per task that the min-max step removes) to avoid float32 overflow. The
        optional per-task ``lambda_i`` search (NGOpt on validation accuracy) is not included.

    References:
        Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
        https://arxiv.org/abs/2410.02396
    """
    fn = "pcb_merge"
    tvs = _as_list(fn, "task_vectors", task_vectors)
    ratio = _static_fraction(fn, "ratio", ratio)
    clip_ratio = _static_fraction(
        fn, "clip_ratio", clip_ratio, low_inclusive=True, high=0.5, high_inclusive=False
    )
    _checks.check_choice(fn, "scope", scope, _SCOPES)
    return _pcb_core(tvs, ratio=ratio, clip_ratio=clip_ratio, scope=scope)


@functools.partial(jax.jit, static_argnames=("ratio", "clip_ratio", "scope"))
def _pcb_core(tvs, *, ratio, clip_ratio, scope):
    per_leaf, shapes, treedef = _task_leaves(tvs)
    buckets = _pack(per_leaf, batch_ndim=1)
    merged = _pcb(buckets, ratio, clip_ratio, scope) if buckets else []
    out = _unpack(buckets, merged, shapes)
    return _cast_like(jax.tree.unflatten(treedef, out), tvs[0])
