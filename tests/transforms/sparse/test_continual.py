"""Tests for the continual-learning masks: SPU (SP-01), ExSSNeT exclusive masks (SP-02), HFT (SP-03)
and LISA (SP-04).

References: NumPy top-k for SPU's selection (floor count, per tensor), set algebra on NumPy booleans
for ExSSNeT's exclusive sets, and `optax.adam` run on the gathered slices for LISA.
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


def _tree(seed, shapes):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _np_topk(values: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((np.arange(values.size), -values))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    return mask


def _train(tx, params, state, grads_seq, step=None):
    step = step or jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# ---------------------------------------------------------------------------------------------
# SP-01 SPU.

SPU_SHAPES = {"fc": (5, 8), "fc2": (3, 7), "bias": (8,), "frozen": (4, 4)}


def _spu():
    return cljax.spu(
        optax.adamw(0.05, weight_decay=0.1),
        targets=cljax.select("^fc"),
        train_fully=cljax.select("bias"),
    )


def test_spu_changes_exactly_the_selected_entries():
    params = _tree(0, SPU_SHAPES)
    tx = _spu()
    batches = [_tree(10 + b, SPU_SHAPES) for b in range(4)]
    importance = None
    for g in batches:
        importance = cljax.spu_accumulate(importance, g)
    state = cljax.spu_set_task(tx.init(params), importance, density=0.1)
    trained, state = _train(tx, params, state, [_tree(20 + t, SPU_SHAPES) for t in range(5)])
    for name in ("fc", "fc2"):
        score = np.abs(sum(np.asarray(g[name], np.float64) for g in batches)).reshape(-1)
        k = math.floor(0.1 * score.size)
        want = _np_topk(score, k).reshape(SPU_SHAPES[name])
        moved = np.asarray(trained[name]) != np.asarray(params[name])
        np.testing.assert_array_equal(
            moved, want, err_msg=name
        )  # decay included: nothing else moves
    assert np.all(np.asarray(trained["bias"]) != np.asarray(params["bias"]))
    np.testing.assert_array_equal(trained["frozen"], params["frozen"])
    adam = cljax.find_state(state, optax.ScaleByAdamState)
    assert jax.tree.leaves(adam.mu["frozen"]) == [] and jax.tree.leaves(adam.nu["frozen"]) == []


def test_spu_signed_sum_differs_from_sum_of_magnitudes():
    g1 = {"fc": jnp.array([3.0, 1.0, -2.0, 0.0])}
    g2 = {"fc": jnp.array([-3.0, 1.0, -2.0, 0.5])}
    signed = cljax.spu_accumulate(cljax.spu_accumulate(None, g1), g2)
    absolute = cljax.spu_accumulate(cljax.spu_accumulate(None, g1, signed=False), g2, signed=False)
    np.testing.assert_array_equal(signed["fc"], [0.0, 2.0, -4.0, 0.5])
    np.testing.assert_array_equal(absolute["fc"], [6.0, 2.0, 4.0, 0.5])
    tx = cljax.spu(optax.sgd(0.1), targets=cljax.select("fc"))
    params = {"fc": jnp.zeros(4)}

    def trained_entries(importance):
        state = cljax.spu_set_task(tx.init(params), importance, density=0.25)
        updates, _ = tx.update({"fc": jnp.ones(4)}, state, params)
        return np.asarray(updates["fc"]) != 0

    np.testing.assert_array_equal(trained_entries(signed), [False, False, True, False])
    np.testing.assert_array_equal(trained_entries(absolute), [True, False, False, False])


def test_spu_density_one_equals_the_inner_optimizer_on_targets():
    params = _tree(1, SPU_SHAPES)
    tx = _spu()
    ones = jax.tree.map(jnp.ones_like, params)
    state = cljax.spu_set_task(tx.init(params), ones, density=1.0)
    grads = [_tree(30 + t, SPU_SHAPES) for t in range(3)]
    got, _ = _train(tx, params, state, grads)
    trainable = {k: params[k] for k in ("fc", "fc2", "bias")}
    inner = optax.adamw(0.05, weight_decay=0.1)
    want, _ = _train(
        inner, trainable, inner.init(trainable), [{k: g[k] for k in trainable} for g in grads]
    )
    assert_trees_close({k: got[k] for k in trainable}, want, rtol=1e-6, atol=1e-7)


def test_spu_before_any_task_trains_no_target_entry_and_is_deterministic():
    params = _tree(2, SPU_SHAPES)
    tx = _spu()
    trained, _ = _train(tx, params, tx.init(params), [_tree(3, SPU_SHAPES)])
    np.testing.assert_array_equal(trained["fc"], params["fc"])
    imp = _tree(4, SPU_SHAPES)
    a = cljax.spu_set_task(tx.init(params), imp, density=0.3)
    b = cljax.spu_set_task(tx.init(params), imp, density=0.3)
    assert_trees_equal(a.masks, b.masks)


def test_spu_errors():
    params = _tree(5, SPU_SHAPES)
    tx = _spu()
    state = tx.init(params)
    with pytest.raises(ValueError, match="density"):
        cljax.spu_set_task(state, params, density=0.0)
    with pytest.raises(ValueError, match="no scores for target leaf 'fc2'"):
        cljax.spu_set_task(state, {"fc": params["fc"]})
    with pytest.raises(ValueError, match="leaf 'fc' has importance of shape"):
        cljax.spu_set_task(state, {**params, "fc": jnp.ones((8, 5))})
    with pytest.raises(ValueError, match="spu_set_task: no SpuState"):
        cljax.spu_set_task(optax.sgd(0.1).init(params), params)
    both = cljax.spu(optax.sgd(0.1), targets=cljax.select("fc"), train_fully=cljax.select("fc2"))
    with pytest.raises(ValueError, match="leaf 'fc2' is selected by both"):
        both.init(params)
    with pytest.raises(ValueError, match="no entry for leaf"):
        cljax.spu(optax.sgd(0.1), targets={"fc": True}).init(params)
    with pytest.raises(TypeError, match="signed"):
        cljax.spu_accumulate(None, params, signed="yes")
    with pytest.raises(ValueError, match="structure"):
        cljax.spu_accumulate({"fc": jnp.ones(1)}, params)


# ---------------------------------------------------------------------------------------------
# SP-02 ExSSNeT.

EX_SHAPES = {"w": (6, 8), "v": (10,)}


def test_exclusive_masks_protect_every_earlier_task():
    params = _tree(6, EX_SHAPES)
    tx = cljax.exclusive_masks(optax.adamw(0.05, weight_decay=0.1), capacity=4)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(grads, state, params):
        traces.append(None)
        return tx.update(grads, state, params)

    x = _tree(7, {"x": (3, 6)})["x"]
    task_masks, outputs, union = [], [], {k: np.zeros(s, bool) for k, s in EX_SHAPES.items()}
    for t in range(3):
        masks = cljax.random_mask(params, 0.4, jax.random.key(t))
        state = cljax.exclusive_masks_start_task(state, masks)
        before = jax.tree.map(np.asarray, params)
        params, state = _train(
            tx, params, state, [_tree(100 * t + i, EX_SHAPES) for i in range(3)], step
        )
        for name in EX_SHAPES:
            m, p0, p1 = np.asarray(masks[name]), before[name], np.asarray(params[name])
            exclusive = m & ~union[name]
            np.testing.assert_array_equal(p1[~exclusive], p0[~exclusive])  # U and non-mask entries
            assert np.all(p1[exclusive] != p0[exclusive])
        for j, mj in enumerate(task_masks):  # earlier tasks' forward passes are unchanged
            np.testing.assert_array_equal(x @ jnp.where(mj["w"], params["w"], 0.0), outputs[j])
        state = cljax.exclusive_masks_commit_task(state)
        task_masks.append(masks)
        outputs.append(x @ jnp.where(masks["w"], params["w"], 0.0))
        union = {k: union[k] | np.asarray(masks[k]) for k in union}
    assert len(traces) == 1, "a new task recompiled the step"
    assert int(state.count) == 3
    for j, mj in enumerate(task_masks):
        stored = cljax.exclusive_masks_lookup(state, params, j)
        assert_trees_equal(stored, jax.tree.map(lambda m: np.asarray(m), mj))
    assert_trees_equal(cljax.exclusive_masks_lookup(state, params), union)


def test_exclusive_sets_are_pairwise_disjoint_and_union_monotone():
    params = {"w": jnp.zeros((4, 8))}
    tx = cljax.exclusive_masks(optax.sgd(1.0), capacity=5)
    state = tx.init(params)
    seen, previous = np.zeros((4, 8), bool), np.zeros((4, 8), bool)
    for t in range(5):
        masks = cljax.random_mask(params, 0.5, jax.random.key(10 + t))
        state = cljax.exclusive_masks_start_task(state, masks)
        updates, _ = tx.update({"w": jnp.ones((4, 8))}, state, params)
        trained = np.asarray(updates["w"]) != 0
        assert not np.any(trained & seen)  # disjoint from every earlier exclusive set
        seen |= trained
        state = cljax.exclusive_masks_commit_task(state)
        union = np.asarray(cljax.exclusive_masks_lookup(state, params)["w"])
        assert np.all(union >= previous)
        previous = union
    with pytest.raises(ValueError, match="capacity exceeded"):
        cljax.exclusive_masks_commit_task(state)


def test_exclusive_masks_default_and_moment_reset():
    params = {"w": jnp.zeros((2, 4))}
    tx = cljax.exclusive_masks(optax.adam(0.1), capacity=2)
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones((2, 4))}, state, params)
    assert np.all(np.asarray(updates["w"]) != 0)  # before any start_task: every free entry
    first = jnp.asarray(np.arange(8).reshape(2, 4) < 4)
    state = cljax.exclusive_masks_start_task(state, {"w": first})
    mu = np.asarray(cljax.find_state(state, optax.ScaleByAdamState).mu["w"])
    assert not np.any(mu[~np.asarray(first)]) and np.all(mu[np.asarray(first)] != 0)
    state = cljax.exclusive_masks_start_task(cljax.exclusive_masks_commit_task(state))
    updates, _ = tx.update({"w": jnp.ones((2, 4))}, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]) != 0, ~np.asarray(first))


def test_exclusive_masks_errors():
    params = {"w": jnp.zeros((2, 4))}
    state = cljax.exclusive_masks(optax.sgd(0.1), capacity=1).init(params)
    with pytest.raises(ValueError, match="capacity"):
        cljax.exclusive_masks(optax.sgd(0.1), capacity=0)
    with pytest.raises(ValueError, match=r"task=0\) must be in \[0, 0\)"):
        cljax.exclusive_masks_lookup(state, params, 0)
    with pytest.raises(TypeError, match="task"):
        cljax.exclusive_masks_lookup(state, params, 0.5)
    with pytest.raises(ValueError, match="leaf 'w' has a mask of shape"):
        cljax.exclusive_masks_start_task(state, {"w": jnp.ones((4, 2), bool)})
    with pytest.raises(ValueError, match="exclusive_masks_commit_task: no ExclusiveMasksState"):
        cljax.exclusive_masks_commit_task(optax.sgd(0.1).init(params))


def test_supermask_forward_count_and_straight_through_gradient():
    scores = _tree(8, {"w": (5, 6), "b": (7,)})
    masks = cljax.supermask(scores, 0.3)
    for name, s in scores.items():
        flat = np.abs(np.asarray(s, np.float64)).reshape(-1)
        want = _np_topk(flat, math.ceil(0.3 * flat.size)).reshape(s.shape)
        np.testing.assert_array_equal(np.asarray(masks[name]), want.astype(np.float32))
    weights = _tree(9, {"w": (5, 6)})["w"]
    loss = lambda s: jnp.sum(jnp.sin(weights * cljax.supermask({"w": s}, 0.3)["w"]))
    mask = np.asarray(masks["w"])
    upstream = np.cos(np.asarray(weights) * mask) * np.asarray(weights)
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss))(scores["w"]), upstream * np.sign(np.asarray(scores["w"])), rtol=1e-5
    )
    with pytest.raises(ValueError, match="density"):
        cljax.supermask(scores, 1.5)


# ---------------------------------------------------------------------------------------------
# SP-03 HFT.

HFT_SHAPES = {
    f"l{i}_{kind}_{j}": (3, 2) for i in range(2) for kind in ("attn", "ffn") for j in range(4)
}
HFT_SHAPES["norm"] = (2,)


def _hft_groups(params):
    return {k: None if k == "norm" else k.rsplit("_", 1)[0] for k in params}


def test_hft_trains_exactly_half_of_each_group_per_stage():
    params = _tree(10, HFT_SHAPES)
    tx = cljax.hft(
        optax.adamw(0.05, weight_decay=0.1), groups=_hft_groups, resample_every=3, seed=4
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    selections = []
    for stage in range(4):
        start = jax.tree.map(np.asarray, params)
        params, state = _train(
            tx, params, state, [_tree(40 + 3 * stage + i, HFT_SHAPES) for i in range(3)], step
        )
        moved = {k: bool(np.all(np.asarray(params[k]) != start[k])) for k in HFT_SHAPES}
        still = {k: bool(np.array_equal(np.asarray(params[k]), start[k])) for k in HFT_SHAPES}
        assert all(moved[k] or still[k] for k in HFT_SHAPES)  # whole leaves train or freeze
        assert moved["norm"]
        for group in {v for v in _hft_groups(HFT_SHAPES).values() if v}:
            members = [k for k in HFT_SHAPES if k.startswith(group)]
            assert sum(moved[k] for k in members) == 2, group
        selections.append(tuple(sorted(k for k in HFT_SHAPES if moved[k])))
    assert len(set(selections)) > 1, "the selection never changed across stages"


def test_hft_keeps_the_state_of_unselected_leaves():
    params = _tree(11, HFT_SHAPES)
    tx = cljax.hft(optax.adam(0.05), groups=_hft_groups, seed=0)
    state = tx.init(params)
    params, state = _train(tx, params, state, [_tree(60 + i, HFT_SHAPES) for i in range(2)])
    mu = cljax.find_state(state, optax.ScaleByAdamState).mu
    leaves = jax.tree.leaves(params)
    for i, name in enumerate(sorted(HFT_SHAPES)):
        assert leaves[i] is params[name]
        if bool(state.selected[i]):
            assert np.any(np.asarray(mu[name]))
        else:
            assert not np.any(np.asarray(mu[name]))


def test_hft_fraction_one_equals_full_fine_tuning():
    params = _tree(12, HFT_SHAPES)
    inner = optax.adamw(0.05, weight_decay=0.1)
    tx = cljax.hft(inner, fraction=1.0, groups=_hft_groups, resample_every=2)
    grads = [_tree(70 + i, HFT_SHAPES) for i in range(4)]
    got, _ = _train(tx, params, tx.init(params), grads)
    want, _ = _train(inner, params, inner.init(params), grads)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_hft_half_reset_and_errors():
    ft, base = _tree(13, HFT_SHAPES), _tree(14, HFT_SHAPES)
    out = cljax.hft_half_reset(ft, base, jax.random.key(3), groups=_hft_groups)
    kept = {k: bool(np.array_equal(out[k], ft[k])) for k in HFT_SHAPES}
    for k in HFT_SHAPES:
        assert kept[k] or np.array_equal(out[k], base[k])
    assert kept["norm"]
    for group in {v for v in _hft_groups(HFT_SHAPES).values() if v}:
        assert sum(kept[k] for k in HFT_SHAPES if k.startswith(group)) == 2
    again = cljax.hft_half_reset(ft, base, jax.random.key(3), groups=_hft_groups)
    assert_trees_equal(out, again)
    with pytest.raises(ValueError, match="fraction"):
        cljax.hft_half_reset(ft, base, jax.random.key(0), fraction=0.0)
    with pytest.raises(ValueError, match="shape"):
        cljax.hft_half_reset(ft, {**base, "norm": jnp.zeros(3)}, jax.random.key(0))
    with pytest.raises(ValueError, match="resample_every"):
        cljax.hft(optax.sgd(0.1), resample_every=0)
    with pytest.raises(ValueError, match="no label for leaf 'l0_attn_1'"):
        cljax.hft(optax.sgd(0.1), groups={"l0_attn_0": "a"}).init(ft)


@settings(deadline=None)
@given(fraction=st.floats(0.05, 1.0), seed=st.integers(0, 10_000), size=st.sampled_from([1, 3, 8]))
def test_hft_selection_count_property(fraction, seed, size):
    params = {f"p{i}": jnp.zeros(2) for i in range(size)}
    out = cljax.hft_half_reset(
        params, jax.tree.map(jnp.ones_like, params), jax.random.key(seed), fraction=fraction
    )
    kept = sum(int(not np.any(np.asarray(v))) for v in out.values())
    assert kept == min(size, math.ceil(fraction * size - 1e-9))


# ---------------------------------------------------------------------------------------------
# SP-04 LISA.

N_LAYERS = 5
LISA_SHAPES = {
    "embed": (6, 3),
    "blocks": {"w": (N_LAYERS, 3, 3), "b": (N_LAYERS, 3)},
    "head": (3, 6),
}


def _lisa_tree(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
        LISA_SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def test_lisa_trains_the_sampled_layers_and_always_on_leaves():
    params = _lisa_tree(0)
    inner = optax.adam(0.05)
    tx = cljax.lisa(inner, layers=cljax.select("blocks"), num_active=2, interval=4, seed=5)
    state = tx.init(params)
    assert cljax.find_state(state, optax.ScaleByAdamState).mu["blocks"]["w"].shape == (2, 3, 3)
    step = jax.jit(tx.update)
    actives = []
    for period in range(4):
        start = params
        for i in range(4):
            grads = _lisa_tree(100 + 4 * period + i)
            updates, state = step(grads, state, params)
            if i == 0:
                active = np.asarray(state.active)  # drawn at the period's first step
                assert len(set(active.tolist())) == 2
            np.testing.assert_array_equal(np.asarray(state.active), active)
            if period == 0:  # reference: optax.adam on the gathered slices
                if i == 0:
                    sliced = {
                        **params,
                        "blocks": jax.tree.map(lambda x, a=active: x[a], params["blocks"]),
                    }
                    ref_state = inner.init(sliced)
                g_sliced = {
                    **grads,
                    "blocks": jax.tree.map(lambda x, a=active: x[a], grads["blocks"]),
                }
                ref_updates, ref_state = inner.update(g_sliced, ref_state)
                np.testing.assert_allclose(
                    updates["blocks"]["w"][active], ref_updates["blocks"]["w"], rtol=1e-5, atol=1e-8
                )
                np.testing.assert_allclose(updates["embed"], ref_updates["embed"], rtol=1e-6)
            params = optax.apply_updates(params, updates)
        for layer in range(N_LAYERS):
            for name in ("w", "b"):
                same = np.array_equal(
                    np.asarray(params["blocks"][name][layer]),
                    np.asarray(start["blocks"][name][layer]),
                )
                assert same == (layer not in active), (period, layer, name)
        assert not np.array_equal(params["embed"], start["embed"])
        assert not np.array_equal(params["head"], start["head"])
        actives.append(tuple(active.tolist()))
    assert len(set(actives)) > 1


def test_lisa_resets_the_state_of_newly_activated_slots():
    params = _lisa_tree(1)
    tx = cljax.lisa(
        optax.adam(0.05, b1=0.9), layers=cljax.select("blocks"), num_active=2, interval=2, seed=0
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    fresh = 0
    for t in range(12):
        before = np.asarray(state.active)
        mu_before = np.asarray(cljax.find_state(state, optax.ScaleByAdamState).mu["blocks"]["w"])
        grads = _lisa_tree(200 + t)
        _, state = step(grads, state, params)
        after = np.asarray(state.active)
        mu = np.asarray(cljax.find_state(state, optax.ScaleByAdamState).mu["blocks"]["w"])
        g = np.asarray(grads["blocks"]["w"])
        for slot in range(2):
            history = 0.0 if before[slot] != after[slot] else mu_before[slot]
            fresh += int(before[slot] != after[slot])
            np.testing.assert_allclose(
                mu[slot], 0.9 * history + 0.1 * g[after[slot]], rtol=1e-5, atol=1e-7
            )
    assert fresh > 0


def test_lisa_all_layers_equals_plain_adamw():
    params = _lisa_tree(2)
    inner = optax.adamw(0.05, weight_decay=0.1)
    tx = cljax.lisa(inner, layers=cljax.select("blocks"), num_active=N_LAYERS, interval=2)
    grads = [_lisa_tree(300 + i) for i in range(5)]
    got, _ = _train(tx, params, tx.init(params), grads)
    want, _ = _train(inner, params, inner.init(params), grads)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_lisa_errors():
    params = _lisa_tree(3)
    with pytest.raises(ValueError, match="num_active=6"):
        cljax.lisa(optax.sgd(0.1), layers=cljax.select("blocks"), num_active=6).init(params)
    with pytest.raises(ValueError, match="share their leading"):
        cljax.lisa(optax.sgd(0.1), layers=cljax.select("blocks|embed")).init(params)
    with pytest.raises(ValueError, match="scalar"):
        cljax.lisa(optax.sgd(0.1), layers=cljax.select("s")).init({"s": jnp.ones(())})
    with pytest.raises(ValueError, match="num_active"):
        cljax.lisa(optax.sgd(0.1), layers=cljax.select("blocks"), num_active=0)
    with pytest.raises(ValueError, match="interval"):
        cljax.lisa(optax.sgd(0.1), layers=cljax.select("blocks"), interval=0)
