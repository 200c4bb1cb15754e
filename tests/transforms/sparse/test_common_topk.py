"""Tests for the exact top-k selection of the sparse family (`_common.top_k_from_keys`,
`_common.top_k_masks`): the radix select (two 16-bit digit histograms, then two histograms of
the tied positions) and the 64-bit-limb bisection kept for totals beyond int32.

The reference is plain NumPy: the float32 -> uint32 order-preserving key written from its
definition (``-0 == +0``; negative floats reversed below the positives; NaN with the sign bit
clear above +inf, with it set below -inf), then a stable descending sort with the position (leaf
order, then row-major index) as tie-break.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.transforms.sparse import _common


def _np_keys(x) -> np.ndarray:
    """The order-preserving uint32 key of float32 values, from the IEEE-754 bit layout."""
    x = np.asarray(x, np.float32).copy()
    x[x == 0] = 0.0
    bits = x.view(np.uint32).astype(np.uint64)
    key = np.where(bits >= 2**31, (2**32 - 1) - bits, bits + 2**31)
    return key.astype(np.uint32)


def _np_top_k(keys: list, k, scope: str) -> list:
    """Exact top-k masks of uint32 key arrays, ties to the earlier array, then earlier index."""

    def flat_top(flat, kk):
        order = np.lexsort((np.arange(flat.size), -flat.astype(np.int64)))
        mask = np.zeros(flat.size, bool)
        mask[order[: max(0, int(kk))]] = True
        return mask

    if scope == "layer":
        return [
            flat_top(np.asarray(x).reshape(-1), kk).reshape(np.shape(x))
            for x, kk in zip(keys, k, strict=True)
        ]
    flat = np.concatenate([np.asarray(x).reshape(-1) for x in keys])
    mask = flat_top(flat, k)
    out, start = [], 0
    for x in keys:
        out.append(mask[start : start + np.size(x)].reshape(np.shape(x)))
        start += np.size(x)
    return out


@functools.partial(jax.jit, static_argnames=("scope", "method"))
def _select(keys, k, scope, method="radix"):
    fn = _common._top_k_radix if method == "radix" else _common._top_k_bisect
    ks = list(k) if scope == "layer" else k
    return fn(list(keys), ks, scope=scope)


SHAPES = [(37,), (5, 9), (3, 4, 10)]

SPECIAL = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 1e-38, -1e-38, 3e38], np.float32
)


def _values(rng, shape, kind: str) -> np.ndarray:
    if kind == "distinct":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "ties":  # few distinct values: every threshold is tied
        return (np.round(rng.standard_normal(shape) * 2) / 2).astype(np.float32)
    if kind == "equal":
        return np.full(shape, 0.75, np.float32)
    return rng.choice(SPECIAL, size=shape)  # signed zeros, infinities, NaN


def _check(keys, k, scope, method="radix"):
    got = _select(tuple(jnp.asarray(x) for x in keys), k, scope, method)
    kk = [int(v) for v in np.asarray(k)] if scope == "layer" else int(k)
    for g, w in zip(got, _np_top_k(keys, kk, scope), strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("kind", ["distinct", "ties", "equal", "special"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["radix", "bisect"])
def test_top_k_from_keys_matches_numpy(kind, scope, method):
    rng = np.random.default_rng(hash(kind) % 1000)
    keys = [_np_keys(_values(rng, s, kind)) for s in SHAPES]
    sizes = [int(np.prod(s)) for s in SHAPES]
    total = sum(sizes)
    if scope == "layer":
        # k = 0, 1, a middle value, size and beyond size, across the leaves
        for ks in ([0, 1, 7], [s // 2 for s in sizes], [s - 1 for s in sizes], [s for s in sizes]):
            _check(keys, jnp.asarray(ks, jnp.int32), scope, method)
        _check(keys, jnp.asarray([sizes[0] + 5, 0, sizes[2]], jnp.int32), scope, method)
    else:
        for k in (0, 1, 20, total // 2, total - 1, total, total + 3):
            _check(keys, jnp.int32(k), scope, method)


def test_top_k_from_keys_extreme_keys_and_digit_boundaries():
    # 0 and 2**32 - 1 (masked-out and NaN-like extremes) and keys across a 16-bit digit boundary.
    pool = np.array([0, 1, 0xFFFF, 0x10000, 0x1FFFF, 0x80000000, 0xFFFEFFFF, 0xFFFF0000, 2**32 - 1])
    rng = np.random.default_rng(0)
    keys = [rng.choice(pool, size=s).astype(np.uint32) for s in SHAPES]
    for k in range(0, 40, 3):
        _check(keys, jnp.int32(k), "global")
        _check(keys, jnp.asarray([k, k // 2, k + 30], jnp.int32), "layer")


def test_tie_cut_across_many_position_blocks():
    # One leaf of 5000 equal keys with a few larger ones: the cut falls inside the ties, at every
    # block of the position histogram.
    keys = np.full((50, 100), 7, np.uint32)
    keys.reshape(-1)[[3, 999, 4999]] = 9
    for k in (1, 3, 4, 64, 65, 2500, 4097, 4999, 5000):
        _check([keys], jnp.asarray([k], jnp.int32), "layer")
        _check([keys[:10], keys[10:]], jnp.int32(k), "global")


def test_top_k_masks_traced_count_compiles_once_and_matches():
    rng = np.random.default_rng(4)
    scores = [jnp.asarray(_values(rng, s, "ties")) for s in SHAPES]
    keys = [_np_keys(np.asarray(s)) for s in scores]
    before = _common._top_k_jit._cache_size()
    for k in (0, 5, 50, 177):
        got = _common.top_k_masks(scores, k, scope="global")
        for g, w in zip(got, _np_top_k(keys, k, "global"), strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)
    assert _common._top_k_jit._cache_size() == before + 1


def test_top_k_from_keys_routes_counts_beyond_int32_to_the_limb_bisection():
    keys = [jnp.asarray(_np_keys(np.arange(6, dtype=np.float32)))]
    got = _common.top_k_from_keys(keys, 2**31 + 5, scope="global")  # a static k above int32
    np.testing.assert_array_equal(np.asarray(got[0]), np.ones(6, bool))
    assert _common.top_k_from_keys([], 3, scope="global") == []


@settings(deadline=None)
@given(
    data=st.data(),
    scope=st.sampled_from(["layer", "global"]),
    distinct=st.integers(1, 6),
)
def test_top_k_from_keys_property(data, scope, distinct):
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**32, size=distinct, dtype=np.uint64).astype(np.uint32)
    keys = [rng.choice(pool, size=s) for s in SHAPES]
    sizes = [int(np.prod(s)) for s in SHAPES]
    if scope == "layer":
        k = jnp.asarray([data.draw(st.integers(0, n)) for n in sizes], jnp.int32)
    else:
        k = jnp.int32(data.draw(st.integers(0, sum(sizes))))
    got = _select(tuple(jnp.asarray(x) for x in keys), k, scope)
    for g, kk in zip(got, (np.asarray(k) if scope == "layer" else [None] * 3), strict=True):
        assert g.dtype == jnp.bool_
        if kk is not None:
            assert int(g.sum()) == int(kk)  # exactly k per leaf
    if scope == "global":
        assert sum(int(g.sum()) for g in got) == int(k)
    want = _np_top_k(keys, [int(v) for v in np.asarray(k)] if scope == "layer" else int(k), scope)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
