"""Tests for dynamic sparse training inside the free capacity of a continual learner (SP-08):
`set_rigl(restrict_growth=True)`, `set_rigl_restrict`, `set_rigl_set_masks`,
`set_rigl_get_masks` and `dst_task_masks`.

The reference is a float64 NumPy loop of RigL with growth restricted to ``inactive & allowed``
(drop and grow sets by sorting, ties to the earlier index), Adam with moments zeroed at changed
entries, pruning inside the allowed set and frozen weights outside it; plus the SP-02 invariant
(earlier tasks' weights bit-identical) over a multi-task run and the SP-07 invariant (constant
active count) in all three growth modes.
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

SHAPES = {"w": (8, 8), "k": (4, 8), "b": (4,)}
LR, B1, B2, EPS = 0.05, 0.9, 0.99, 1e-8
OPTIONS = dict(drop_fraction=0.5, update_every=3, end_step=30, seed=1)


def _tree(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _np_topk(values, k):
    order = np.lexsort((np.arange(values.size), -values.reshape(-1)))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def _masks_and_allowed(seed, extra=None):
    """Initial masks (density 1/4) and an allowed set holding them plus a few (`extra`, default
    random) free entries per leaf."""
    rng = np.random.default_rng(seed)
    masks, allowed = {"b": None}, {"b": None}
    for name in ("w", "k"):
        shape = SHAPES[name]
        size = math.prod(shape)
        order = rng.permutation(size)
        m = np.zeros(size, bool)
        m[order[: size // 4]] = True
        a = m.copy()
        n = int(rng.integers(0, size // 2)) if extra is None else extra
        a[order[size // 4 : size // 4 + n]] = True
        masks[name] = jnp.asarray(m.reshape(shape))
        allowed[name] = jnp.asarray(a.reshape(shape))
    return masks, allowed


def _build(grow, masks, restrict=True, **kwargs):
    options = dict(OPTIONS, grow=grow, restrict_growth=restrict)
    options.update(kwargs)
    return cljax.set_rigl(optax.adam(LR, B1, B2, EPS), masks, **options)


# One transform (and one compiled step) per growth mode, shared by the tests; the masks passed at
# build time only seed `init` and are replaced through `set_rigl_restrict`.
_SEED_MASKS, _ = _masks_and_allowed(0)
TXS = {grow: _build(grow, _SEED_MASKS) for grow in ("gradient", "random", "momentum")}
STEPS = {grow: jax.jit(tx.update) for grow, tx in TXS.items()}


def _start(grow, params, masks, allowed):
    state = TXS[grow].init(params)
    return cljax.set_rigl_restrict(state, allowed, masks=masks)


def _np(tree):
    return {k: None if v is None else np.asarray(v) for k, v in tree.items()}


def test_restricted_growth_matches_numpy():
    params = _tree(1)
    masks, allowed = _masks_and_allowed(1, extra=5)
    state = _start("gradient", params, masks, allowed)
    m, a = _np(masks), _np(allowed)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    capped = 0
    for t in range(10):
        grads = _tree(100 + t)
        updates, state = STEPS["gradient"](grads, state, params)
        params = optax.apply_updates(params, updates)
        due = t > 0 and t % 3 == 0
        fraction = 0.5 * 0.5 * (1 + math.cos(math.pi * t / 30))
        changed = {}
        for k in ("w", "k"):
            old = m[k]
            if due:
                active = int(old.sum())
                room = int((~old & a[k]).sum())
                drop = min(math.floor(fraction * active), room)
                capped += drop < math.floor(fraction * active)
                keep = _np_topk(np.where(old, np.abs(p[k]), -1.0), active - drop)
                grown = _np_topk(np.where(~old & a[k], np.abs(np.asarray(grads[k])), -1.0), drop)
                m[k] = keep | grown
            changed[k] = old ^ m[k]
            mu[k][changed[k]] = 0.0
            nu[k][changed[k]] = 0.0
        for k in p:
            g = np.asarray(grads[k], np.float64)
            mask = m.get(k)
            if mask is None:  # dense leaf
                mask, steady, outside = np.ones(p[k].shape, bool), np.ones(p[k].shape, bool), 0.0
            else:
                steady = mask & ~changed[k]
                outside = np.where(a[k], -p[k], 0.0)  # pruned where allowed, frozen elsewhere
            mu[k] = B1 * mu[k] + (1 - B1) * np.where(steady, g, 0.0)
            nu[k] = B2 * nu[k] + (1 - B2) * np.where(steady, g, 0.0) ** 2
            u = -LR * (mu[k] / (1 - B1 ** (t + 1))) / (np.sqrt(nu[k] / (1 - B2 ** (t + 1))) + EPS)
            u = np.where(mask, 0.0 if due else u, outside)  # skip_update on mask-update steps
            p[k] = p[k] + u
        got = {k: cljax.set_rigl_get_masks(state, params)[k] for k in ("w", "k")}
        assert_trees_equal(got, {k: m[k] for k in ("w", "k")}, err=f"step {t} masks:")
        assert_trees_close(params, p, rtol=2e-5, atol=1e-6, err=f"step {t}:")
    assert capped > 0  # the cap by the allowed candidates was exercised


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), grow=st.sampled_from(["gradient", "random", "momentum"]))
def test_growth_stays_inside_allowed_and_frozen_weights_never_move(seed, grow):
    params = _tree(seed)
    masks, allowed = _masks_and_allowed(seed)
    state = _start(grow, params, masks, allowed)
    m0, a = _np(masks), _np(allowed)
    owned = {k: ~m0[k] & ~a[k] for k in ("w", "k")}
    frozen = {k: np.asarray(params[k])[owned[k]] for k in ("w", "k")}
    counts = {k: int(m0[k].sum()) for k in ("w", "k")}
    for t in range(10):
        updates, state = STEPS[grow](_tree(seed + 1000 + t), state, params)
        params = optax.apply_updates(params, updates)
        now = cljax.set_rigl_get_masks(state, params)
        for k in ("w", "k"):
            mask = np.asarray(now[k])
            assert not np.any(mask & owned[k]), f"{grow}: grew outside `allowed` at step {t}"
            np.testing.assert_array_equal(np.asarray(params[k])[owned[k]], frozen[k])
            assert not np.any(np.asarray(params[k])[~mask & a[k]])  # pruned, inside allowed
        if grow == "momentum":  # the total is constant; leaves may trade entries
            assert sum(int(np.asarray(now[k]).sum()) for k in counts) == sum(counts.values())
        else:
            assert {k: int(np.asarray(now[k]).sum()) for k in counts} == counts


@pytest.mark.parametrize("grow", ["gradient", "random", "momentum"])
def test_all_allowed_is_bit_identical_to_unrestricted(grow):
    params0 = _tree(2)
    masks, _ = _masks_and_allowed(2)
    plain = _build(grow, masks, restrict=False)
    restricted = _build(grow, masks, restrict=True)
    s_plain, s_restricted = plain.init(params0), restricted.init(params0)
    assert s_plain.allowed is None and restricted.init(params0).allowed is not None
    assert [x.shape for x in jax.tree.leaves(s_plain)] == [
        x.shape for x in jax.tree.leaves(s_restricted._replace(allowed=None))
    ]
    step_plain, step_restricted = jax.jit(plain.update), jax.jit(restricted.update)
    got, want = params0, params0
    for t in range(7):
        grads = _tree(200 + t)
        u, s_restricted = step_restricted(grads, s_restricted, got)
        got = optax.apply_updates(got, u)
        u, s_plain = step_plain(grads, s_plain, want)
        want = optax.apply_updates(want, u)
    assert_trees_equal(got, want)
    assert_trees_equal(s_restricted.masks, s_plain.masks)


def test_set_rigl_set_masks_changes_topology_and_resets_moments():
    params = _tree(3)
    masks, _ = _masks_and_allowed(3)
    tx = _build("gradient", masks, restrict=False)
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(_tree(300), state, params)
    params = optax.apply_updates(params, updates)
    new = {"w": ~masks["w"], "k": masks["k"], "b": None}
    state = cljax.set_rigl_set_masks(state, new)
    got = cljax.set_rigl_get_masks(state, params)
    np.testing.assert_array_equal(np.asarray(got["w"]), ~np.asarray(masks["w"]))
    assert got["b"] is None
    mu = np.asarray(cljax.find_state(state, optax.ScaleByAdamState).mu["w"])
    assert not np.any(mu)  # every entry of "w" changed: moments zeroed
    mu_k = np.asarray(cljax.find_state(state, optax.ScaleByAdamState).mu["k"])
    assert np.any(mu_k)  # "k" unchanged: moments kept
    updates, state = step(_tree(301), state, params)
    params = optax.apply_updates(params, updates)
    assert not np.any(np.asarray(params["w"])[np.asarray(masks["w"])])  # old support pruned


def test_multi_task_protocol_keeps_earlier_tasks_bit_identical():
    shapes = {"w": (8, 16), "k": (4, 8, 8)}
    params = _tree(4, shapes)
    union = {k: jnp.zeros(s, bool) for k, s in shapes.items()}
    committed, snapshots = [], []
    for task, allocation in enumerate(("uniform", "erk", "uniform")):
        # Task start: a random topology inside the free capacity, growth restricted to it.
        free = {k: ~v for k, v in union.items()}
        masks = cljax.dst_task_masks(free, 0.25, jax.random.key(task), allocation=allocation)
        if task == 0:
            tx = cljax.set_rigl(optax.adam(LR), masks, restrict_growth=True, **OPTIONS)
            state, step = tx.init(params), jax.jit(tx.update)
        state = cljax.set_rigl_restrict(state, free, masks=masks)
        counts = {k: int(v.sum()) for k, v in masks.items()}
        before = params
        for t in range(7):  # DST (RigL) within the task: mask updates at steps 3 and 6
            updates, state = step(_tree(400 + 10 * task + t, shapes), state, params)
            params = optax.apply_updates(params, updates)
        final = cljax.set_rigl_get_masks(state, params)
        for k in shapes:
            u, f = np.asarray(union[k]), np.asarray(final[k])
            # SP-02: every weight an earlier task owns is bit-identical after this task.
            np.testing.assert_array_equal(np.asarray(params[k])[u], np.asarray(before[k])[u])
            assert not np.any(f & u) and int(f.sum()) == counts[k]  # SP-07: constant count
            assert not np.array_equal(f, np.asarray(masks[k]))  # the topology did move
        # Commit: the task's final mask joins the union.
        committed.append(final)
        snapshots.append(params)
        union = {k: union[k] | final[k] for k in shapes}
    for j, (mask, snap) in enumerate(zip(committed, snapshots, strict=True)):
        for k in shapes:  # each task's weights are unchanged since its own end
            m = np.asarray(mask[k])
            np.testing.assert_array_equal(
                np.asarray(params[k])[m], np.asarray(snap[k])[m], err_msg=f"task {j} '{k}'"
            )
    free = {k: ~v for k, v in union.items()}
    with pytest.raises(ValueError, match=r"needs \d+ active entries .* but only \d+ are free"):
        cljax.dst_task_masks(free, 0.3, jax.random.key(9))


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.05, 0.25),
    allocation=st.sampled_from(["erk", "uniform"]),
)
def test_dst_task_masks_exact_counts_inside_free(seed, density, allocation):
    shapes = {"w": (8, 16), "k": (2, 4, 8), "v": (32,)}
    rng = np.random.default_rng(seed)
    free = {k: jnp.asarray(rng.random(s) < 0.9) for k, s in shapes.items()}
    free["skip"] = None
    split = cljax.erk_densities if allocation == "erk" else cljax.uniform_densities
    include = {"w": True, "k": True, "v": True, "skip": False}
    densities = split(
        {k: jnp.zeros(s) for k, s in shapes.items()} | {"skip": None}, density, include=include
    )
    want = {k: math.ceil(densities[k] * math.prod(s) - 1e-9) for k, s in shapes.items()}
    if any(want[k] > int(free[k].sum()) for k in shapes):
        with pytest.raises(ValueError, match="are free"):
            cljax.dst_task_masks(free, density, jax.random.key(seed), allocation=allocation)
        return
    masks = cljax.dst_task_masks(free, density, jax.random.key(seed), allocation=allocation)
    assert masks["skip"] is None
    for k in shapes:
        m = np.asarray(masks[k])
        assert m.dtype == bool and m.shape == shapes[k]
        assert int(m.sum()) == want[k]
        assert not np.any(m & ~np.asarray(free[k]))


def test_dst_task_masks_is_uniform_over_free_entries_and_keyed():
    free = {"w": jnp.arange(16) % 3 != 0}  # 10 free entries, draw 4
    hits = np.zeros(16)
    for i in range(300):
        hits += np.asarray(cljax.dst_task_masks(free, 0.25, jax.random.key(i))["w"])
    rate = hits[np.asarray(free["w"])] / 300
    np.testing.assert_allclose(rate, 0.4, atol=0.1)
    assert not np.any(hits[~np.asarray(free["w"])])
    a = cljax.dst_task_masks(free, 0.25, jax.random.key(1))["w"]
    np.testing.assert_array_equal(a, cljax.dst_task_masks(free, 0.25, jax.random.key(1))["w"])
    assert not np.array_equal(a, cljax.dst_task_masks(free, 0.25, jax.random.key(2))["w"])
    explicit = cljax.dst_task_masks(free, {"w": 0.5}, jax.random.key(1))["w"]
    assert int(explicit.sum()) == 8


def test_sp08_errors():
    params = _tree(5)
    masks, allowed = _masks_and_allowed(5)
    with pytest.raises(TypeError, match="restrict_growth"):
        cljax.set_rigl(optax.sgd(0.1), masks, restrict_growth=1)
    plain = _build("gradient", masks, restrict=False).init(params)
    with pytest.raises(ValueError, match=r"restrict_growth=True"):
        cljax.set_rigl_restrict(plain, allowed)
    state = TXS["gradient"].init(params)
    with pytest.raises(ValueError, match="outside `allowed`"):
        cljax.set_rigl_restrict(state, allowed, masks=jax.tree.map(jnp.logical_not, masks))
    state = cljax.set_rigl_restrict(state, allowed, masks=masks)
    with pytest.raises(ValueError, match="set_rigl_set_masks: leaf 'w' has .* outside `allowed`"):
        cljax.set_rigl_set_masks(state, {**masks, "w": ~masks["w"]})
    lifted = cljax.set_rigl_restrict(state, None)  # None: every entry allowed again
    assert all(bool(np.all(np.asarray(x) == 0xFF)) for x in jax.tree.leaves(lifted.allowed))
    cljax.set_rigl_set_masks(lifted, {**masks, "w": ~masks["w"]})  # no longer outside `allowed`
    with pytest.raises(ValueError, match="set_rigl_restrict: "):
        cljax.set_rigl_restrict(optax.adam(0.1).init(params), allowed)
    with pytest.raises(ValueError, match="set_rigl_get_masks: `params` has no leaf 'w'"):
        cljax.set_rigl_get_masks(state, {"k": params["k"], "b": params["b"]})
    free = {"w": jnp.ones((4, 4), bool)}
    with pytest.raises(ValueError, match="allocation"):
        cljax.dst_task_masks(free, 0.5, jax.random.key(0), allocation="random")
    with pytest.raises(ValueError, match="density"):
        cljax.dst_task_masks(free, 1.5, jax.random.key(0))
    with pytest.raises(ValueError, match=r"density\['w'\]"):
        cljax.dst_task_masks(free, {"w": 0.0}, jax.random.key(0))
    with pytest.raises(ValueError, match="`density` has no entry for leaf 'w'"):
        cljax.dst_task_masks(free, {"v": 0.5}, jax.random.key(0))
    with pytest.raises(TypeError, match="leaf 'w' of `free` is bool"):
        cljax.dst_task_masks({"w": True}, 0.5, jax.random.key(0))
    with pytest.raises(ValueError, match=r"leaf 'w' needs 9 active entries .* only 8 are free"):
        cljax.dst_task_masks({"w": jnp.arange(16) < 8}, 0.55, jax.random.key(0))


def test_restricted_growth_never_recompiles_across_tasks():
    params = _tree(6)
    traces = []
    tx = TXS["random"]

    @jax.jit
    def run(params, state):
        traces.append(None)
        updates, state = tx.update(_tree(7), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for seed in (6, 7):
        masks, allowed = _masks_and_allowed(seed)
        state = cljax.set_rigl_restrict(state, allowed, masks=masks)
        params, state = run(params, state)
    assert len(traces) == 1
