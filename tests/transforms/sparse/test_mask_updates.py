"""Tests for the element-mask core (SP-MASK rules, SP-06 densify, SP-10 masked decay, SP-11/SP-21
sparse merges, SR-STE's straight-through mask).

The reference for `mask_updates` is AdamW written in float64 NumPy with the card's rule 1 (mask the
gradient before, the update after) and rule 2 (``u = -p`` outside the mask when pruning).
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

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

SHAPES = {"w": (4, 3), "b": (5,), "k": (2, 3, 9), "s": ()}
LR, B1, B2, EPS, WD = 0.05, 0.9, 0.99, 1e-8, 0.1


def _tree(seed, shapes=SHAPES, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _masks(seed=0):
    rng = np.random.default_rng(100 + seed)
    return {
        "w": jnp.asarray(rng.random((4, 3)) < 0.5),
        "b": jnp.zeros(5, bool),  # fully frozen: no inner state
        "k": jnp.asarray(rng.random((2, 3, 9)) < 0.3),
        "s": None,  # dense
    }


def _np_masked_adamw(params, grads_seq, masks, *, prune):
    """Float64 AdamW with the SP-MASK rules, leaf by leaf."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    trajectory = []
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            m = np.ones(p[k].shape, bool) if masks[k] is None else np.asarray(masks[k])
            g = np.where(m, np.asarray(grads[k], np.float64), 0.0)
            mu[k] = B1 * mu[k] + (1 - B1) * g
            nu[k] = B2 * nu[k] + (1 - B2) * g * g
            direction = (mu[k] / (1 - B1**t)) / (np.sqrt(nu[k] / (1 - B2**t)) + EPS)
            u = -LR * (direction + WD * p[k])
            u = np.where(m, u, -p[k] if prune else 0.0)
            p[k] = p[k] + u
        trajectory.append({k: v.copy() for k, v in p.items()})
    return trajectory


def _run(tx, params, grads_seq, *, jit=True):
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    out = []
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


GRADS = [_tree(10 + t) for t in range(6)]


@pytest.mark.parametrize("prune", [False, True], ids=["freeze", "prune"])
def test_mask_updates_matches_numpy_masked_adamw(prune):
    params, masks = _tree(0), _masks()
    tx = cljax.mask_updates(optax.adamw(LR, B1, B2, EPS, weight_decay=WD), masks, prune=prune)
    got, _ = _run(tx, params, GRADS)
    want = _np_masked_adamw(params, GRADS, masks, prune=prune)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_trees_close(g, w, rtol=1e-5, atol=1e-6, err=f"step {t}:")


def test_masked_coordinates_never_move_over_many_steps():
    params, masks = _tree(1), _masks(1)
    tx = cljax.mask_updates(optax.adamw(0.1, weight_decay=0.5), masks)
    grads = [_tree(50 + t) for t in range(25)]
    got, _ = _run(tx, params, grads)
    for name, m in masks.items():
        if m is None:
            continue
        outside = ~np.asarray(m)
        np.testing.assert_array_equal(
            np.asarray(got[-1][name])[outside], np.asarray(params[name])[outside]
        )
        assert np.all(
            np.asarray(got[-1][name])[np.asarray(m)] != np.asarray(params[name])[np.asarray(m)]
        )


def test_prune_mode_keeps_pruned_entries_exactly_zero_in_bf16():
    params = _tree(2, dtype=jnp.bfloat16)
    masks = _masks(2)
    tx = cljax.mask_updates(optax.adamw(0.1, weight_decay=0.1), masks, prune=True)
    grads = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in GRADS]
    got, _ = _run(tx, params, grads)
    for p in got:
        for name, m in masks.items():
            assert p[name].dtype == jnp.bfloat16
            if m is not None:
                assert not np.any(np.asarray(p[name], np.float32)[~np.asarray(m)])


def test_all_true_masks_equal_the_inner_optimizer():
    params = _tree(3)
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    inner = optax.adamw(LR, weight_decay=WD)
    want_eager, _ = _run(inner, params, GRADS[:2], jit=False)
    want, _ = _run(inner, params, GRADS)
    for prune in (False, True):
        tx = cljax.mask_updates(inner, ones, prune=prune)
        # Op by op the arithmetic is the inner optimizer's: bitwise equal.
        got, _ = _run(tx, params, GRADS[:2], jit=False)
        assert_trees_equal(got[-1], want_eager[-1])
        # Compiled, XLA may fuse differently (one rounding of a fused multiply-add).
        got, _ = _run(tx, params, GRADS)
        assert_trees_close(got[-1], want[-1], rtol=1e-6, atol=1e-7)


def test_frozen_leaves_have_no_inner_state_and_masks_are_one_bit():
    params, masks = _tree(4), _masks()
    state = cljax.mask_updates(optax.adam(LR), masks).init(params)
    adam = cljax.find_state(state, optax.ScaleByAdamState)
    assert isinstance(adam.mu["b"], optax.MaskedNode) and adam.mu["s"].shape == ()
    assert state.masks["s"] is None and isinstance(state.masks["b"], optax.MaskedNode)
    for name in ("w", "k"):
        packed = state.masks[name]
        assert packed.dtype == jnp.uint8
        rows = math.prod(SHAPES[name][:-1])
        assert packed.size == rows * -(-SHAPES[name][-1] // 8)  # one bit per entry, rows padded
    big = {**params, "w": jnp.zeros((64, 64))}
    full = cljax.mask_updates(optax.adam(LR), {**masks, "w": jnp.ones((64, 64), bool)}).init(big)
    assert full.masks["w"].nbytes * 8 == 64 * 64


def test_mask_updates_set_replaces_masks_and_resets_changed_moments():
    params, masks = _tree(5), _masks()
    tx = cljax.mask_updates(optax.adam(LR), masks)
    _, state = _run(tx, params, GRADS[:3])
    new_w = ~np.asarray(masks["w"]) | (np.arange(12).reshape(4, 3) < 4)
    new = {**masks, "w": jnp.asarray(new_w)}
    updated = cljax.mask_updates_set(state, new)
    np.testing.assert_array_equal(cljax.mask_updates_get(updated, params)["w"], new_w)
    before = cljax.find_state(state, optax.ScaleByAdamState)
    after = cljax.find_state(updated, optax.ScaleByAdamState)
    changed = np.asarray(masks["w"]) ^ new_w
    for moment in ("mu", "nu"):
        b, a = np.asarray(getattr(before, moment)["w"]), np.asarray(getattr(after, moment)["w"])
        assert not np.any(a[changed])
        np.testing.assert_array_equal(a[~changed], b[~changed])
        np.testing.assert_array_equal(getattr(after, moment)["k"], getattr(before, moment)["k"])
    # The next step trains exactly the new support.
    step = jax.jit(tx.update)
    updates, _ = step(GRADS[3], updated, params)
    assert np.all((np.asarray(updates["w"]) != 0) == new_w)


def test_mask_updates_set_and_get_errors():
    params, masks = _tree(6), _masks()
    state = cljax.mask_updates(optax.adam(LR), masks).init(params)
    with pytest.raises(ValueError, match="leaf 'b' was fully frozen"):
        cljax.mask_updates_set(state, {**masks, "b": jnp.ones(5, bool)})
    with pytest.raises(ValueError, match="leaf 's' was dense"):
        cljax.mask_updates_set(state, {**masks, "s": jnp.zeros((), bool)})
    with pytest.raises(ValueError, match="leaf 'w' holds a mask"):
        cljax.mask_updates_set(state, {**masks, "w": None})
    with pytest.raises(ValueError, match="leaf 'w' has a mask of shape"):
        cljax.mask_updates_set(state, {**masks, "w": jnp.ones((4, 9), bool)})
    with pytest.raises(ValueError, match="no entry for leaf 'k'"):
        cljax.mask_updates_set(state, {k: v for k, v in masks.items() if k != "k"})
    with pytest.raises(ValueError, match="mask_updates_set: no MaskUpdatesState"):
        cljax.mask_updates_set(optax.adam(LR).init(params), masks)
    with pytest.raises(ValueError, match="`params` has no leaf 'w'"):
        cljax.mask_updates_get(state, {k: v for k, v in params.items() if k != "w"})
    with pytest.raises(ValueError, match="does not match its stored mask"):
        cljax.mask_updates_get(state, {**params, "w": jnp.zeros((4, 12))})
    np.testing.assert_array_equal(cljax.mask_updates_get(state, params)["b"], np.zeros(5, bool))


def test_mask_updates_densify_trains_everything_from_fresh_moments():
    params, masks = _tree(7), _masks()
    tx = cljax.mask_updates(optax.adam(LR), masks, prune=True)
    trained, state = _run(tx, params, GRADS[:3])
    dense = cljax.mask_updates_densify(state)
    got = cljax.mask_updates_get(dense, params)
    assert bool(got["w"].all()) and bool(got["k"].all()) and not bool(got["b"].any())
    adam = cljax.find_state(dense, optax.ScaleByAdamState)
    assert not np.any(np.asarray(adam.mu["w"])[~np.asarray(masks["w"])])
    updates, _ = jax.jit(tx.update)(GRADS[3], dense, trained[-1])
    assert np.all(np.asarray(updates["w"]) != 0) and np.all(np.asarray(updates["k"]) != 0)
    assert not np.any(np.asarray(updates["b"]))


def test_mask_updates_build_and_update_errors():
    params, masks = _tree(8), _masks()
    with pytest.raises(ValueError, match="no mask for leaf 'w'"):
        cljax.mask_updates(optax.sgd(0.1), {k: v for k, v in masks.items() if k != "w"}).init(
            params
        )
    with pytest.raises(ValueError, match="leaf 'w' has shape"):
        cljax.mask_updates(optax.sgd(0.1), {**masks, "w": jnp.ones((3, 4), bool)}).init(params)
    with pytest.raises(TypeError, match="inner"):
        cljax.mask_updates(lambda g: g, masks)
    with pytest.raises(TypeError, match="prune"):
        cljax.mask_updates(optax.sgd(0.1), masks, prune=1)
    with pytest.raises(TypeError, match="boolean array or None"):
        cljax.mask_updates(optax.sgd(0.1), {**masks, "w": "all"})
    tx = cljax.mask_updates(optax.sgd(0.1), masks, prune=True)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@settings(deadline=None)
@given(density=st.floats(0.05, 1.0), seed=st.integers(0, 10_000), prune=st.booleans())
def test_property_support_is_respected_for_random_masks(density, seed, prune):
    params = _tree(seed % 7, shapes={"a": (6, 5), "c": (3, 8)})
    masks = cljax.random_mask(params, density, jax.random.key(seed))
    tx = cljax.mask_updates(optax.sgd(0.5, momentum=0.9), masks, prune=prune)
    state = tx.init(params)
    p = params
    for t in range(3):
        updates, state = tx.update(
            jax.tree.map(lambda x, t=t: jnp.full_like(x, 1.0 + t), p), state, p
        )
        p = optax.apply_updates(p, updates)
    for name, m in masks.items():
        m = np.asarray(m)
        if prune:
            assert not np.any(np.asarray(p[name])[~m])
        else:
            np.testing.assert_array_equal(np.asarray(p[name])[~m], np.asarray(params[name])[~m])
        assert np.all(np.asarray(p[name])[m] != np.asarray(params[name])[m])


# ---------------------------------------------------------------------------------------------
# masked_decay, masked_merge, straight_through_mask.


def test_masked_decay_matches_numpy_and_nm_complement():
    params = _tree(9, shapes={"w": (8, 4), "b": (4,)})
    mask_fn = lambda p: {"w": ~cljax.nm_mask(p["w"], 2, 4, axis=0), "b": None}
    tx = cljax.masked_decay(0.3, mask_fn=mask_fn)
    grads = _tree(10, shapes={"w": (8, 4), "b": (4,)})
    out, _ = tx.update(grads, tx.init(params), params)
    w = np.asarray(params["w"], np.float64)
    pruned = ~np.asarray(cljax.nm_mask(params["w"], 2, 4, axis=0))
    np.testing.assert_allclose(
        out["w"], np.asarray(grads["w"]) + 0.3 * np.where(pruned, w, 0.0), rtol=1e-6
    )
    np.testing.assert_array_equal(out["b"], grads["b"])
    plain, _ = cljax.masked_decay(0.3).update(grads, optax.EmptyState(), params)
    want, _ = optax.add_decayed_weights(0.3).update(grads, optax.EmptyState(), params)
    assert_trees_close(plain, want, rtol=1e-6)


def test_masked_decay_schedule_and_errors():
    params = {"w": jnp.ones(3)}
    tx = cljax.masked_decay(optax.linear_schedule(1.0, 0.0, 2))
    state = tx.init(params)
    first, state = tx.update({"w": jnp.zeros(3)}, state, params)
    second, state = tx.update({"w": jnp.zeros(3)}, state, params)
    np.testing.assert_allclose(first["w"], 1.0)
    np.testing.assert_allclose(second["w"], 0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        cljax.masked_decay(-1.0)
    with pytest.raises(TypeError, match="mask_fn"):
        cljax.masked_decay(0.1, mask_fn={"w": True})
    with pytest.raises(ValueError, match="params"):
        cljax.masked_decay(0.1).update({"w": jnp.ones(3)}, optax.EmptyState())


def test_masked_merge_keeps_the_support():
    params = _tree(11, shapes={"w": (6, 4), "b": (4,)})
    masks = cljax.magnitude_mask(params, 0.5)
    sparse = {k: jnp.where(masks[k], v, 0.0) for k, v in params.items()}
    a, b = _tree(12, shapes={"a": (6, 2)})["a"], _tree(13, shapes={"b": (2, 4)})["b"]
    delta = {"w": a @ b, "b": None}
    merged = cljax.masked_merge(sparse, delta, {"w": masks["w"], "b": None})
    want = np.where(
        np.asarray(masks["w"]),
        np.asarray(sparse["w"], np.float64) + np.asarray(a @ b, np.float64),
        0,
    )
    np.testing.assert_allclose(merged["w"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["b"], sparse["b"])
    sqft = jnp.asarray(sparse["w"]) + delta["w"] * (sparse["w"] != 0)  # SQFT's form, same support
    np.testing.assert_allclose(merged["w"], sqft, rtol=1e-6)
    with pytest.raises(ValueError, match="leaf 'w' has shape"):
        cljax.masked_merge(sparse, {"w": jnp.ones((4, 6)), "b": None}, masks)


def test_straight_through_mask_forward_and_gradient():
    w = _tree(14, shapes={"w": (4, 4)})["w"]
    m = cljax.nm_mask(w, 2, 4)
    x = _tree(15, shapes={"x": (3, 4)})["x"]
    loss = lambda w: jnp.sum(jnp.tanh(x @ cljax.straight_through_mask({"w": w}, {"w": m})["w"]))
    sparse_loss = lambda ws: jnp.sum(jnp.tanh(x @ ws))
    ws = jnp.where(m, w, 0.0)
    np.testing.assert_allclose(loss(w), sparse_loss(ws), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(w), jax.grad(sparse_loss)(ws), rtol=1e-6)
    assert cljax.straight_through_mask({"w": w, "b": None}, {"w": None, "b": None})["w"] is w


def test_sparse_soup_keeps_the_shared_support():
    base = _tree(16, shapes={"w": (5, 4), "b": (4,)})
    masks = cljax.magnitude_mask(base, 0.4)
    models = [
        {
            k: jnp.where(masks[k], v + 0.1 * i, 0.0)
            for k, v in _tree(20 + i, shapes={"w": (5, 4), "b": (4,)}).items()
        }
        for i in range(3)
    ]
    soup = cljax.sparse_soup(models, masks)
    for k in ("w", "b"):
        want = np.mean([np.asarray(m[k], np.float64) for m in models], axis=0)
        np.testing.assert_allclose(
            soup[k], np.where(np.asarray(masks[k]), want, 0.0), rtol=1e-6, atol=1e-7
        )
        assert not np.any(np.asarray(soup[k])[~np.asarray(masks[k])])
    assert_trees_equal(cljax.sparse_soup(models[:1]), models[0])  # m = 1: plain IMP
    assert_trees_close(cljax.sparse_soup(models), soup)  # support read from the first model
    leaky = [models[0], {**models[1], "w": models[1]["w"].at[~masks["w"]].set(1.0)}]
    with pytest.raises(ValueError, match=r"models\[1\] leaf 'w' is nonzero at"):
        cljax.sparse_soup(leaky, masks)
    with pytest.raises(ValueError, match=r"models\[1\] leaf 'w' is nonzero at"):
        cljax.sparse_soup(leaky)
    sparser = [models[0], {**models[1], "b": jnp.zeros(4)}]
    with pytest.raises(ValueError, match="different zero pattern"):
        cljax.sparse_soup(sparser)
    with pytest.raises(ValueError, match="non-empty"):
        cljax.sparse_soup([])
    with pytest.raises(ValueError, match="shape"):
        cljax.sparse_soup([models[0], {**models[1], "b": jnp.zeros(5)}])
