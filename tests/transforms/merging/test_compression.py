"""Tests for ComPEFT (MG-08): the dense ternary form against a float64 NumPy transcription of the
card, the bit-packed format (exact round trip, bit order, storage bound), the card's invariants,
hypothesis properties, jit + sharding, and every argument error.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax.transforms.merging.compression import (
    CompeftLeaf,
    compeft,
    compeft_compress,
    compeft_decompress,
)
from tests.helpers import assert_trees_close, assert_trees_equal

SHAPES = {"enc": {"w": (4, 6), "k": (4, 2, 6)}, "b": (6,), "s": ()}
SPECS = {"enc": {"w": P("data", "model"), "k": P("data", "model", None)}, "b": P("model"), "s": P()}


def normal_tree(seed, shapes=SHAPES, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def kept(fraction, n):
    return min(n, max(0, math.floor(fraction * n + 1e-6)))


def np_compeft(tree, density, alpha):
    """Card: per tensor keep the top-k |tau| (stable order), value alpha * std(tau) * sign(tau)."""

    def leaf(x):
        x = np.asarray(x, np.float64)
        flat = x.reshape(-1)
        n = flat.size
        order = np.argsort(-np.abs(flat), kind="stable")
        mask = np.zeros(n, bool)
        mask[order[: kept(density, n)]] = True
        mask &= flat != 0
        sigma = np.std(flat, ddof=1) if n > 1 else 0.0
        return np.where(mask, np.sign(flat) * alpha * sigma, 0.0).reshape(x.shape)

    return jax.tree.map(leaf, tree)


def nbytes(compressed):
    return sum(int(x.nbytes) for x in jax.tree.leaves(compressed))


def compressed_leaves(compressed):
    return jax.tree.leaves(compressed, is_leaf=lambda x: isinstance(x, CompeftLeaf))


# ---------------------------------------------------------------------------------------------
# Reference and format.


@pytest.mark.parametrize("density,alpha", [(0.3, 1.0), (0.1, 2.5), (1.0, 0.5)])
def test_compeft_matches_numpy(density, alpha):
    tv = normal_tree(0)
    want = np_compeft(tv, density, alpha)
    assert_trees_close(compeft(tv, density, alpha), want, rtol=1e-5, atol=1e-7)
    if density == 0.3:
        assert_trees_close(
            compeft_decompress(compeft_compress(tv, density, alpha)), want, rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bitwise_exact(dtype):
    tv = normal_tree(1, dtype=dtype)
    c = compeft_compress(tv, 0.3, 1.7)
    out = compeft_decompress(c)
    assert_trees_equal(out, compeft(tv, 0.3, 1.7))
    assert all(o.dtype == dtype for o in jax.tree.leaves(out))
    assert_trees_equal(compeft_compress(tv, 0.3, 1.7), c)  # deterministic
    if dtype != jnp.float32:
        return
    # The round trip stays bitwise on a tree with zeros, ties and a padded-bucket layout.
    mixed = {
        "t": jnp.asarray([[1.0, -1.0, 0.0], [2.0, -2.0, 1.0]], dtype),
        "z": jnp.zeros(5, dtype),
    }
    assert_trees_equal(
        compeft_decompress(compeft_compress(mixed, 0.5, 1.0)), compeft(mixed, 0.5, 1.0)
    )


def test_bit_order_and_storage_bound():
    tv = normal_tree(2)
    density = 0.3
    c = compeft_compress(tv, density, 1.0)
    total_bits_bound = 0
    for leaf, x in zip(compressed_leaves(c), jax.tree.leaves(tv), strict=True):
        flat = np.asarray(x).reshape(-1)
        n, k = flat.size, kept(density, flat.size)
        mask = np.unpackbits(np.asarray(leaf.mask))[:n].astype(bool)  # big-endian bit order
        order = np.argsort(-np.abs(flat), kind="stable")
        want = np.zeros(n, bool)
        want[order[:k]] = True
        np.testing.assert_array_equal(mask, want)
        signs = np.unpackbits(np.asarray(leaf.signs))[:k].astype(bool)
        np.testing.assert_array_equal(signs, flat[mask] > 0)  # row-major order of kept entries
        assert leaf.mask.dtype == jnp.uint8 and leaf.signs.dtype == jnp.uint8
        assert leaf.scale.dtype == jnp.float32 and leaf.scale.shape == ()
        assert leaf.shape == x.shape and leaf.dtype == x.dtype
        stored = int(leaf.mask.nbytes + leaf.signs.nbytes + leaf.scale.nbytes)
        assert stored == -(-n // 8) + -(-k // 8) + 4
        assert stored * 8 <= n + k + 32 + 16  # card: n mask bits + k sign bits + one float
        total_bits_bound += n + k + 32 + 16
    assert nbytes(c) * 8 <= total_bits_bound


def test_compression_ratio_on_a_large_tensor():
    tv = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((512, 512)), jnp.float32)}
    c = compeft_compress(tv, 0.1, 1.0)
    ratio = nbytes(c) / (512 * 512 * 4)
    assert ratio == pytest.approx((512 * 512 / 8 + math.ceil(26214 / 8) + 4) / (512 * 512 * 4))
    assert ratio < 1.1 / 32 + 1e-3  # about (1 + density) bits per parameter


# ---------------------------------------------------------------------------------------------
# Card invariants.


def test_compeft_invariants():
    tv = normal_tree(4)
    density, alpha = 0.4, 1.3
    out = compeft(tv, density, alpha)
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(tv), strict=True):
        o, x = np.asarray(o), np.asarray(x, np.float64)
        n = x.size
        nz = o != 0
        assert int(nz.sum()) == kept(density, n)  # exactly k nonzeros (no zeros in tau)
        if nz.any():
            sigma = np.std(x, ddof=1) if n > 1 else 0.0
            np.testing.assert_allclose(np.abs(o[nz]), alpha * sigma, rtol=1e-5)  # one magnitude
            assert np.all(np.sign(o[nz]) == np.sign(x[nz]))  # signs of tau on kept entries
            assert np.abs(x[nz]).min() >= np.abs(x[~nz]).max(initial=0.0)  # the largest kept


def test_zero_and_constant_tensors_stay_finite():
    tv = {
        "z": jnp.zeros((3, 5)),
        "c": jnp.full((4,), 2.0),
        "s": jnp.array(-1.0),
        "e": jnp.zeros((0, 3)),
    }
    out = compeft_decompress(compeft_compress(tv, 0.5, 1.0))
    assert_trees_equal(out, compeft(tv, 0.5, 1.0))
    for o in jax.tree.leaves(out):
        assert bool(jnp.all(o == 0))  # zero or zero-variance tensors compress to zero
    assert out["e"].shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Hypothesis properties.


@settings(max_examples=6, deadline=None)
@given(
    rows=st.sampled_from([1, 3]),
    density=st.sampled_from([0.05, 0.5, 1.0]),
    kind=st.sampled_from(["zeros", "tiny", "huge", "ties", "normal"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_compeft_is_finite_and_round_trips(rows, density, kind, dtype, seed):
    shapes = {"m": (rows, 5), "c": (2, rows, 2), "v": (3,), "s": ()}
    rng = np.random.default_rng(seed)

    def leaf(s):
        if kind == "zeros":
            v = np.zeros(s)
        elif kind == "ties":
            v = rng.integers(-1, 2, s).astype(float)
        else:
            v = {"tiny": 1e-30, "huge": 1e30, "normal": 1.0}[kind] * rng.standard_normal(s)
        return jnp.asarray(v, dtype)

    tv = jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
    out = compeft_decompress(compeft_compress(tv, density, 2.0))
    if kind in ("normal", "ties", "zeros"):  # float64 sigma: tiny/huge differ only by rounding
        assert_trees_close(
            out, np_compeft(tv, density, 2.0), rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=0
        )
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(tv), strict=True):
        assert o.shape == x.shape and o.dtype == x.dtype
        assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))
        assert int(jnp.sum(o != 0)) <= kept(density, x.size)


# ---------------------------------------------------------------------------------------------
# jit and sharding.


def test_jit_and_sharded_match_unsharded():
    # Same options and shapes as test_compeft_matches_numpy: the eager baseline is cached.
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    tv = normal_tree(5)
    sharded = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tv, SPECS)
    plain = compeft_compress(tv, 0.3, 1.0)
    on_mesh = jax.jit(functools.partial(compeft_compress, density=0.3, alpha=1.0))(sharded)
    for a, b in zip(compressed_leaves(plain), compressed_leaves(on_mesh), strict=True):
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        np.testing.assert_array_equal(np.asarray(a.signs), np.asarray(b.signs))
        np.testing.assert_allclose(np.asarray(a.scale), np.asarray(b.scale), rtol=1e-6)
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    on_mesh = jax.tree.map(  # shard the compressed arrays too
        lambda x: jax.device_put(x, NamedSharding(mesh, P())), on_mesh
    )
    assert_trees_close(
        jax.jit(compeft_decompress)(on_mesh), compeft_decompress(plain), rtol=1e-6, atol=0
    )
    dense = jax.jit(functools.partial(compeft, density=0.3, alpha=1.0))(sharded)
    assert_trees_close(dense, compeft(tv, 0.3, 1.0), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Argument errors.


def test_errors():
    tv = normal_tree(6)
    with pytest.raises(
        ValueError, match=r"compeft_compress\(density=\.\.\.\) must be in \(0.0, 1.0\], got 0.0"
    ):
        compeft_compress(tv, 0.0, 1.0)
    with pytest.raises(
        ValueError, match=r"compeft\(density=\.\.\.\) must be in \(0.0, 1.0\], got 2.0"
    ):
        compeft(tv, 2.0, 1.0)
    with pytest.raises(
        ValueError, match=r"compeft_compress\(alpha=\.\.\.\) must be in \[0.0, inf\], got -1.0"
    ):
        compeft_compress(tv, 0.5, -1.0)
    with pytest.raises(
        TypeError, match=r"compeft_compress\(density=\.\.\.\) must be a Python float"
    ):
        jax.jit(lambda t, d: compeft_compress(t, d, 1.0))(tv, 0.5)
    with pytest.raises(TypeError, match=r"compeft: leaf 'w' of `task_vector` has dtype int32"):
        compeft({"w": jnp.zeros(3, jnp.int32)}, 0.5, 1.0)
    with pytest.raises(
        TypeError, match=r"compeft_decompress: leaf 'b' is a ArrayImpl, not a CompeftLeaf"
    ):
        compeft_decompress(tv)
    c = compeft_compress({"w": jnp.ones((4, 4))}, 0.5, 1.0)
    bad = {"w": c["w"]._replace(mask=jnp.zeros((1,), jnp.uint8))}
    with pytest.raises(
        ValueError,
        match=r"compeft_decompress: leaf 'w' has a packed mask of shape \(1,\); its shape \(4, 4\) needs \(2,\)",
    ):
        compeft_decompress(bad)
