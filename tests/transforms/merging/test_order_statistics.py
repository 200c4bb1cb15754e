"""Tests for the order statistics behind TIES, Breadcrumbs, PCB and ComPEFT: the three-pass radix
select of `task_vectors._order_keys` (and its 16-bit-limb bisection kept for rows beyond int32)
and the exact top-k windows of `_window_masks`.

The reference is plain NumPy: the float32 -> uint32 order-preserving key written from the IEEE-754
bit layout (``-0 == +0``, NaN with the sign bit clear above +inf), sorted per row; windows of a
stable descending order (ties to the earlier leaf, then the earlier index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.transforms.merging import task_vectors as tvm

SPECIAL = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 1e-30, -1e-30, 3e38, 2.0, 2.0000002],
    np.float32,
)


def _np_keys(x) -> np.ndarray:
    x = np.asarray(x, np.float32).copy()
    x[x == 0] = 0.0
    bits = x.view(np.uint32).astype(np.uint64)
    return np.where(bits >= 2**31, (2**32 - 1) - bits, bits + 2**31).astype(np.uint32)


def _values(rng, shape, kind: str) -> np.ndarray:
    if kind == "distinct":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "ties":
        return (np.round(rng.standard_normal(shape) * 2) / 2).astype(np.float32)
    if kind == "equal":
        return np.full(shape, -1.5, np.float32)
    return rng.choice(SPECIAL, size=shape)


# Leaf row sizes: two share a padded small-leaf bucket, one is alone, one is empty-free scalar.
ROW_SHAPES = [(5, 7), (40,), (3,), ()]
K = 3  # batch rows (tasks) for batch_ndim=1


def _leaves(rng, kind: str, batch_ndim: int) -> list:
    lead = (K,) * batch_ndim
    return [_values(rng, lead + s, kind) for s in ROW_SHAPES]


@functools.partial(jax.jit, static_argnames=("ranks", "batch_ndim", "method"))
def _order(leaves, ranks, batch_ndim, method="radix"):
    buckets = tvm._pack(list(leaves), batch_ndim)
    rank = dict(ranks) if isinstance(ranks, tuple) and isinstance(ranks[0], tuple) else ranks
    fn = tvm._order_keys if method == "radix" else tvm._order_keys_bisect
    keys = fn([(buckets, rank)], batch_ndim)[0]
    if isinstance(rank, dict):  # per leaf: one (K,)-shaped key per leaf
        return {i: keys[j][b.ids.index(i)] for j, b in enumerate(buckets) for i in b.ids}
    return keys


def _rows(x, batch_ndim):
    return np.asarray(x).reshape((K,) * batch_ndim + (-1,))


@pytest.mark.parametrize("kind", ["distinct", "ties", "equal", "special"])
@pytest.mark.parametrize("batch_ndim", [0, 1])
@pytest.mark.parametrize("method", ["radix", "bisect"])
def test_order_keys_match_numpy(kind, batch_ndim, method):
    rng = np.random.default_rng(len(kind) + 10 * batch_ndim)
    leaves = _leaves(rng, kind, batch_ndim)
    sizes = [int(np.prod(s)) for s in ROW_SHAPES]
    keys = [_np_keys(_rows(x, batch_ndim)) for x in leaves]
    whole = np.sort(np.concatenate(keys, axis=-1), axis=-1)
    for rank in (0, 1, 17, sum(sizes) - 2, sum(sizes) - 1):
        got = _order(tuple(jnp.asarray(x) for x in leaves), rank, batch_ndim, method)
        np.testing.assert_array_equal(np.asarray(got), whole[..., rank], err_msg=f"rank {rank}")
    for pick in (lambda n: 0, lambda n: n // 2, lambda n: n - 1):
        ranks = tuple((i, pick(n)) for i, n in enumerate(sizes))
        got = _order(tuple(jnp.asarray(x) for x in leaves), ranks, batch_ndim, method)
        for i, r in ranks:
            want = np.sort(keys[i], axis=-1)[..., r]
            np.testing.assert_array_equal(np.asarray(got[i]), want, err_msg=f"leaf {i}")


def test_order_keys_at_digit_boundaries():
    # Keys that differ only in one 11-, 11- or 10-bit digit, and the extreme keys 0 and 2**32 - 1.
    pool = np.array(
        [0, 1, 0x3FF, 0x400, 0x1FFFFF, 0x200000, 0x80000000, 0xFFDFFFFF, 0xFFE00000, 2**32 - 1],
        np.uint32,
    )
    rng = np.random.default_rng(3)
    data = rng.choice(pool, size=(2, 64))
    for rank in range(0, 64, 5):
        got = _order_keys_on_keys(jnp.asarray(data), jnp.int32(rank))
        np.testing.assert_array_equal(np.asarray(got), np.sort(data, axis=-1)[:, rank])


@jax.jit
def _order_keys_on_keys(keys, rank):  # a traced global rank: one compile
    # Rank raw uint32 keys: the bucket's score maps its data to the floats of those keys (no
    # arithmetic, so NaN payloads survive; the pool avoids subnormal floats).
    bucket = tvm._Bucket((0,), (64,), 64, jnp.zeros((1, 2, 64), jnp.float32))
    bucket = bucket._replace(score=lambda d: jnp.broadcast_to(tvm._from_sortable(keys), d.shape))
    return tvm._order_keys([([bucket], rank)], batch_ndim=1)[0]


def _np_window(values: np.ndarray, start: int, stop: int) -> np.ndarray:
    order = np.lexsort((np.arange(values.size), -values.astype(np.float64)))
    mask = np.zeros(values.size, bool)
    mask[order[start:stop]] = True
    return mask


TOTAL = sum(int(np.prod(s)) for s in ROW_SHAPES)


@pytest.mark.parametrize("window", [(0, 20), (7, 33), (0, TOTAL)])
@settings(deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["distinct", "ties", "equal"]))
def test_window_masks_global_property(window, seed, kind):
    rng = np.random.default_rng(seed)
    leaves = [_values(rng, s, kind) for s in ROW_SHAPES]
    got = _window(tuple(jnp.asarray(x) for x in leaves), window)
    flat = np.concatenate([np.abs(x).reshape(-1) for x in leaves])
    want = _np_window(flat, *window)
    np.testing.assert_array_equal(np.concatenate([np.asarray(g).reshape(-1) for g in got]), want)
    assert int(sum(np.asarray(g).sum() for g in got)) == window[1] - window[0]


@functools.partial(jax.jit, static_argnames=("windows",))
def _window(leaves, windows):
    buckets = tvm._with_score(tvm._pack(list(leaves), 0), jnp.abs)
    masks = tvm._window_masks(buckets, windows, batch_ndim=0)
    return tvm._unpack(buckets, masks, [x.shape for x in leaves], jnp.bool_)
