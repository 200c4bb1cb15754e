"""Tests for masks that change during training: gradual magnitude / N:M pruning (SP-05) and SET /
RigL (SP-07).

References are float64 NumPy loops: magnitude top-k (index tie-break) recomputed on schedule, Adam
with the moments zeroed at changed entries, and RigL's drop/grow sets computed by sorting.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from tests.helpers import assert_trees_close

SHAPES = {"w": (6, 8), "k": (2, 4, 4), "b": (8,)}
LR, B1, B2, EPS = 0.05, 0.9, 0.99, 1e-8


def _tree(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _np_topk(values, k):
    order = np.lexsort((np.arange(values.size), -values.reshape(-1)))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def _np_adam_step(p, g, mu, nu, t):
    mu = B1 * mu + (1 - B1) * g
    nu = B2 * nu + (1 - B2) * g * g
    return -LR * (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS), mu, nu


# ---------------------------------------------------------------------------------------------
# SP-05 magnitude pruning.


def test_gradual_magnitude_pruning_matches_numpy():
    schedule = cljax.gradual_pruning_schedule(0.8, 0, 6, update_every=2)
    tx = cljax.magnitude_pruning(optax.adam(LR, B1, B2, EPS), schedule, update_every=2)
    params = _tree(0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    masks = {k: np.ones(v.shape, bool) for k, v in p.items() if v.ndim >= 2}
    for t in range(9):
        grads = _tree(10 + t)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        if t % 2 == 0:
            density = 1.0 - float(schedule(t))
            for k in masks:
                new = _np_topk(np.abs(p[k]), math.ceil(density * p[k].size - 1e-6))
                changed = new ^ masks[k]
                mu[k][changed] = 0.0
                nu[k][changed] = 0.0
                masks[k] = new
        for k in p:
            m = masks.get(k, np.ones(p[k].shape, bool))
            g = np.where(m, np.asarray(grads[k], np.float64), 0.0)
            u, mu[k], nu[k] = _np_adam_step(p[k], g, mu[k], nu[k], t + 1)
            p[k] = p[k] + np.where(m, u, -p[k])
        assert_trees_close(params, p, rtol=2e-5, atol=1e-6, err=f"step {t}:")
        for k in masks:  # density exact, pruned weights exactly zero
            assert int(np.count_nonzero(np.asarray(params[k]))) == int(masks[k].sum())
    assert all(int(m.sum()) == math.ceil(0.2 * m.size - 1e-6) for m in masks.values())


def test_global_and_nm_pruning_counts():
    params = _tree(1)
    total = sum(params[k].size for k in ("w", "k"))
    tx = cljax.magnitude_pruning(optax.sgd(0.01), 0.7, scope="global", update_every=3)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(4):
        updates, state = step(_tree(20 + t), state, params)
        params = optax.apply_updates(params, updates)
        kept = sum(int(np.count_nonzero(np.asarray(params[k]))) for k in ("w", "k"))
        assert kept == math.ceil(0.3 * total - 1e-9)
    params = _tree(2)
    tx = cljax.magnitude_pruning(optax.adam(0.01), n_m=(2, 4), axis=-1)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(3):
        updates, state = step(_tree(30 + t), state, params)
        params = optax.apply_updates(params, updates)
        for k in ("w", "k"):
            groups = (np.asarray(params[k]) != 0).reshape(-1, 4)
            assert (groups.sum(axis=1) == 2).all()
        assert np.all(np.asarray(params["b"]) != 0)  # 1-D leaves stay dense by default


def test_zero_sparsity_equals_the_inner_optimizer():
    params = _tree(3)
    inner = optax.adamw(LR, weight_decay=0.1)
    tx = cljax.magnitude_pruning(inner, 0.0, update_every=2)
    got, want = params, params
    s_got, s_want = tx.init(params), inner.init(params)
    step = jax.jit(tx.update)
    for t in range(4):
        grads = _tree(40 + t)
        u, s_got = step(grads, s_got, got)
        got = optax.apply_updates(got, u)
        u, s_want = inner.update(grads, s_want, want)
        want = optax.apply_updates(want, u)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_magnitude_pruning_errors():
    with pytest.raises(ValueError, match="sparsity"):
        cljax.magnitude_pruning(optax.sgd(0.1), 1.0)
    with pytest.raises(ValueError, match="n <= m"):
        cljax.magnitude_pruning(optax.sgd(0.1), n_m=(4, 2))
    with pytest.raises(TypeError, match="n_m"):
        cljax.magnitude_pruning(optax.sgd(0.1), n_m=[2, 4])
    with pytest.raises(TypeError, match="axis"):
        cljax.magnitude_pruning(optax.sgd(0.1), axis="last")
    with pytest.raises(ValueError, match="scope"):
        cljax.magnitude_pruning(optax.sgd(0.1), scope="row")
    with pytest.raises(ValueError, match="leaf 'k' has shape"):
        cljax.magnitude_pruning(optax.sgd(0.1), n_m=(2, 3)).init(_tree(0))
    tx = cljax.magnitude_pruning(optax.sgd(0.1))
    with pytest.raises(ValueError, match="params"):
        tx.update(_tree(0), tx.init(_tree(0)))


# ---------------------------------------------------------------------------------------------
# SP-07 SET and RigL.

RIGL_SHAPES = {"w": (8, 8), "b": (4,)}


def _rigl(grow="gradient", **kwargs):
    params = _tree(4, RIGL_SHAPES)
    masks = {"w": cljax.random_mask({"w": params["w"]}, 0.25, jax.random.key(0))["w"], "b": None}
    options = dict(grow=grow, drop_fraction=0.5, update_every=3, end_step=30, seed=1)
    options.update(kwargs)
    return params, masks, cljax.set_rigl(optax.adam(LR), masks, **options)


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_rigl_drop_and_grow_sets(grow):
    params, masks, tx = _rigl(grow)
    state = tx.init(params)
    step = jax.jit(tx.update)
    mask = np.asarray(masks["w"])
    updates_seen = 0
    for t in range(10):
        grads = _tree(50 + t, RIGL_SHAPES)
        before = np.asarray(params["w"])
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        after = np.asarray(params["w"])
        new = np.asarray(_unpack(state.masks["w"], (8, 8)))
        assert new.sum() == mask.sum()  # active count constant
        if t > 0 and t % 3 == 0:
            updates_seen += 1
            active = int(mask.sum())
            fraction = 0.5 * 0.5 * (1 + math.cos(math.pi * t / 30))
            drop = min(math.floor(fraction * active), mask.size - active)
            keep_scores = np.where(mask, np.abs(before), -1.0)
            keep = _np_topk(keep_scores, active - drop)
            dropped, grown = mask & ~new, new & ~mask
            np.testing.assert_array_equal(mask & new, keep)
            assert dropped.sum() == grown.sum() == drop and not np.any(dropped & grown)
            if grow == "gradient":
                np.testing.assert_array_equal(
                    grown, _np_topk(np.where(mask, -1.0, np.abs(np.asarray(grads["w"]))), drop)
                )
            assert not np.any(after[grown]) and not np.any(after[dropped])  # grown start at zero
            np.testing.assert_array_equal(after[keep], before[keep])  # skip_update: no step
            mu = np.asarray(cljax.find_state(state, optax.ScaleByAdamState).mu["w"])
            assert not np.any(mu[grown]) and not np.any(mu[dropped])
        else:
            np.testing.assert_array_equal(new, mask)
        assert not np.any(after[~new])
        mask = new
    assert updates_seen == 3


def _unpack(packed, shape):
    return np.unpackbits(np.asarray(packed), axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def test_set_is_deterministic_per_seed():
    runs = []
    params0, _, tx = _rigl("random", seed=1)
    step = jax.jit(tx.update)
    for seed in (1, 1, 2):
        params = params0
        state = tx.init(params)._replace(
            key=jax.random.key_data(jax.random.key(seed))
        )  # = seed=seed
        for t in range(4):
            updates, state = step(_tree(60 + t, RIGL_SHAPES), state, params)
            params = optax.apply_updates(params, updates)
        runs.append(np.asarray(state.masks["w"]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_zero_drop_fraction_reduces_to_static_sparse_training():
    params, masks, tx = _rigl(drop_fraction=0.0, skip_update=False)
    static = cljax.mask_updates(optax.adam(LR), masks, prune=True)
    got, want = params, params
    s_got, s_want = tx.init(params), static.init(params)
    step, static_step = jax.jit(tx.update), jax.jit(static.update)
    for t in range(7):
        grads = _tree(70 + t, RIGL_SHAPES)
        u, s_got = step(grads, s_got, got)
        got = optax.apply_updates(got, u)
        u, s_want = static_step(grads, s_want, want)
        want = optax.apply_updates(want, u)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_masks_stay_fixed_after_end_step():
    params, masks, tx = _rigl(end_step=4)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(10):
        updates, state = step(_tree(80 + t, RIGL_SHAPES), state, params)
        params = optax.apply_updates(params, updates)
        if t == 3:
            frozen = np.asarray(state.masks["w"])
    np.testing.assert_array_equal(np.asarray(state.masks["w"]), frozen)


def test_set_rigl_errors():
    params, masks, _ = _rigl()
    with pytest.raises(ValueError, match="grow"):
        cljax.set_rigl(optax.sgd(0.1), masks, grow="magnitude")
    with pytest.raises(ValueError, match="drop_fraction"):
        cljax.set_rigl(optax.sgd(0.1), masks, drop_fraction=1.5)
    with pytest.raises(ValueError, match="update_every"):
        cljax.set_rigl(optax.sgd(0.1), masks, update_every=0)
    with pytest.raises(TypeError, match="cosine_decay"):
        cljax.set_rigl(optax.sgd(0.1), masks, cosine_decay=1)
    with pytest.raises(ValueError, match="no mask for leaf 'b'"):
        cljax.set_rigl(optax.sgd(0.1), {"w": masks["w"]}).init(params)
    tx = cljax.set_rigl(optax.sgd(0.1), masks)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------------------------
# SP-09 sparse momentum (set_rigl with grow="momentum").


def test_sparse_momentum_redistributes_by_mean_momentum():
    shapes = {"a": (8, 8), "b": (4, 16), "c": (6, 6)}
    params = _tree(5, shapes)
    masks = cljax.random_mask(params, 0.3, jax.random.key(2))
    b1 = 0.9
    tx = cljax.set_rigl(
        optax.sgd(LR, momentum=b1),
        masks,
        grow="momentum",
        drop_fraction=0.5,
        update_every=3,
        end_step=30,
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    mask = {k: np.asarray(v) for k, v in masks.items()}
    for t in range(7):
        grads = {k: v * (1.0 + 2.0 * (k == "b")) for k, v in _tree(90 + t, shapes).items()}
        before = {k: np.asarray(v, np.float64) for k, v in params.items()}
        mu_before = {
            k: np.asarray(v) for k, v in cljax.find_state(state, optax.TraceState).trace.items()
        }
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        new = {k: _unpack(state.masks[k], shapes[k]) for k in shapes}
        assert sum(int(new[k].sum()) for k in shapes) == sum(int(mask[k].sum()) for k in shapes)
        if t > 0 and t % 3 == 0:
            fraction = 0.5 * 0.5 * (1 + math.cos(math.pi * t / 30))
            drops = {
                k: min(math.floor(fraction * mask[k].sum()), mask[k].size - mask[k].sum())
                for k in shapes
            }
            weights = {k: np.abs(mu_before[k])[mask[k]].mean() for k in shapes}
            grown = {k: new[k] & ~mask[k] for k in shapes}
            budget = {k: int(grown[k].sum()) for k in shapes}
            assert sum(budget.values()) == sum(drops.values())  # budgets sum to the pruned total
            total = sum(drops.values())
            for k in (
                shapes
            ):  # proportional to the mean momentum (integer split: within one unit per leaf)
                assert abs(budget[k] - total * weights[k] / sum(weights.values())) <= len(shapes)
                kept = mask[k] & new[k]
                np.testing.assert_array_equal(
                    kept,
                    _np_topk(
                        np.where(mask[k], np.abs(before[k]), -1.0), int(mask[k].sum()) - drops[k]
                    ),
                )
                want = _np_topk(np.where(mask[k], -1.0, np.abs(mu_before[k])), budget[k])
                np.testing.assert_array_equal(grown[k], want)  # the largest |momentum| regrow
                assert not np.any(np.asarray(params[k])[grown[k]])  # regrown weights start at zero
        for k in shapes:
            assert not np.any(np.asarray(params[k])[~new[k]])
        mask = new
    with pytest.raises(ValueError, match="first moment"):
        cljax.set_rigl(optax.sgd(0.1), masks, grow="momentum").init(params)
