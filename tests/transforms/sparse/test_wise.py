"""Tests for WISE (SP-17): shard masks, shard training through `mask_updates`, the TIES merge of
shards and the routing score.

References: TIES (trim, elect, disjoint mean) and ``‖A (W' − W)‖₂`` written in float64 NumPy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax import mask_updates, mask_updates_set, select
from cljax.transforms.sparse.wise import wise_activation_score, wise_merge, wise_shard_masks

SHAPES = {"side": (6, 5), "stack": (2, 4, 3), "bias": (5,)}


def _tree(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def test_shard_masks_have_exact_density_and_regenerate_bit_for_bit():
    params = _tree(0)
    key = jax.random.key(7)
    masks = wise_shard_masks(params, 0.3, key, 2, targets=select("side|stack"))
    for name in ("side", "stack"):
        assert masks[name].dtype == jnp.bool_
        assert int(masks[name].sum()) == math.ceil(0.3 * params[name].size)
    assert not bool(masks["bias"].any())  # not side memory: frozen
    again = wise_shard_masks(params, 0.3, key, 2, targets=select("side|stack"))
    traced = jax.jit(lambda s: wise_shard_masks(params, 0.3, key, s, targets=select("side|stack")))(
        2
    )
    other = wise_shard_masks(params, 0.3, key, 3, targets=select("side|stack"))
    for name in SHAPES:
        np.testing.assert_array_equal(again[name], masks[name])
        np.testing.assert_array_equal(traced[name], masks[name])
    assert not np.array_equal(other["side"], masks["side"])


@settings(max_examples=6, deadline=None)
@given(
    m=st.integers(1, 8),
    n=st.integers(1, 8),
    density=st.floats(0.01, 1.0),
    shard=st.integers(0, 100),
)
def test_shard_masks_count_property(m, n, density, shard):
    masks = wise_shard_masks({"w": jnp.zeros((m, n))}, density, jax.random.key(0), shard)
    assert int(masks["w"].sum()) == min(m * n, math.ceil(density * m * n - 1e-9))


def test_each_shard_changes_only_its_masked_entries():
    start = _tree(1)
    key, density = jax.random.key(3), 0.4
    targets = select("side|stack")
    tx = mask_updates(optax.sgd(0.1), wise_shard_masks(start, density, key, 0, targets=targets))
    state = tx.init(start)
    step = jax.jit(
        lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p))
    )
    shards = []
    for shard in range(2):
        if shard:
            state = mask_updates_set(
                state, wise_shard_masks(start, density, key, shard, targets=targets)
            )
        params = start  # every shard starts from the same side memory
        for i in range(3):
            params, state = step(params, state, _tree(10 * shard + i))
        masks = wise_shard_masks(start, density, key, shard, targets=targets)
        for name in SHAPES:
            changed = np.asarray(params[name]) != np.asarray(start[name])
            np.testing.assert_array_equal(changed & ~np.asarray(masks[name]), False, err_msg=name)
        assert np.asarray(params["side"] != start["side"]).any()
        shards.append(params)
    merged = wise_merge(start, shards)
    assert jax.tree.structure(merged) == jax.tree.structure(start)


def _np_ties(edits, density):
    """TIES in float64: per-tensor trim to floor(density n) (ties to the earlier entry), sign of
    the sum (zero -> +1), mean over the agreeing nonzero entries."""
    stacked = np.stack([np.asarray(e, np.float64).ravel() for e in edits])
    k = math.floor(density * stacked.shape[1])
    if density < 1.0:
        trimmed = np.zeros_like(stacked)
        for i, row in enumerate(stacked):
            keep = np.argsort(-np.abs(row), kind="stable")[:k]
            trimmed[i, keep] = row[keep]
        stacked = trimmed
    sign = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    out = (stacked * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return out.reshape(np.shape(edits[0]))


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_merge_matches_numpy_ties(density):
    start = _tree(2)
    shards = [_tree(20 + i) for i in range(3)]
    got = wise_merge(start, shards, density=density)
    for name in SHAPES:
        edits = [
            np.asarray(s[name], np.float64) - np.asarray(start[name], np.float64) for s in shards
        ]
        want = np.asarray(start[name], np.float64) + _np_ties(edits, density)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_merge_of_disjoint_shards_is_their_sum():
    start = _tree(3)
    rng = np.random.default_rng(4)
    owner = {k: rng.integers(0, 3, s) for k, s in SHAPES.items()}  # each entry edited by one shard
    shards = [
        {
            k: start[k]
            + jnp.asarray(np.where(owner[k] == i, rng.standard_normal(s), 0.0), jnp.float32)
            for k, s in SHAPES.items()
        }
        for i in range(3)
    ]
    got = wise_merge(start, shards)
    for name in SHAPES:
        total = np.asarray(start[name], np.float64) + sum(
            np.asarray(s[name], np.float64) - np.asarray(start[name], np.float64) for s in shards
        )
        np.testing.assert_allclose(got[name], total, rtol=1e-6, atol=1e-6)


def test_merge_keeps_bf16():
    start = {"w": jnp.zeros((2, 2), jnp.bfloat16)}
    merged = wise_merge(start, [{"w": jnp.ones((2, 2), jnp.bfloat16)}])
    assert merged["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged["w"], np.float32), 1.0)


def test_activation_score_matches_numpy():
    rng = np.random.default_rng(5)
    main = rng.standard_normal((4, 3))
    side = main + rng.standard_normal((4, 3))
    acts = rng.standard_normal((2, 5, 4))
    got = wise_activation_score(jnp.asarray(acts), jnp.asarray(side), jnp.asarray(main))
    assert got.shape == (2, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.linalg.norm(acts @ (side - main), axis=-1), rtol=1e-5)
    zero = wise_activation_score(jnp.asarray(acts), jnp.asarray(main), jnp.asarray(main))
    np.testing.assert_array_equal(zero, 0.0)


def test_wise_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"wise_shard_masks\(density=\.\.\.\) must be in"):
        wise_shard_masks({"w": jnp.ones(3)}, 0.0, jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"`targets` has no entry for leaf 'b'"):
        wise_shard_masks(
            {"w": jnp.ones(3), "b": jnp.ones(2)}, 0.5, jax.random.key(0), 0, targets={"w": True}
        )
    with pytest.raises(ValueError, match=r"`shards` is empty"):
        wise_merge({"w": jnp.ones(3)}, [])
    with pytest.raises(
        ValueError, match=r"leaf 'w' has shape \(2,\) in `shard` but \(3,\) in `start`"
    ):
        wise_merge({"w": jnp.ones(3)}, [{"w": jnp.ones(2)}])
    with pytest.raises(ValueError, match=r"both must be the same \(d_in, d_out\) matrix"):
        wise_activation_score(jnp.ones((1, 3)), jnp.ones((3, 2)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"its last dim must be d_in = 3"):
        wise_activation_score(jnp.ones((1, 2)), jnp.ones((3, 2)), jnp.ones((3, 2)))
