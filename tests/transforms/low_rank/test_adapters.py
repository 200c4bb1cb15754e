"""Tests for AdaLoRA (LR-11), the periodic momentum reset (LR-07), incremental rank updates
(LR-10) and intrinsic-dimension / SAID fine-tuning (LR-34), against NumPy formulas from the cards."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import cljax
from cljax.transforms.low_rank import intrinsic as _intrinsic
from tests.helpers import assert_trees_close, assert_trees_equal

# ---------------------------------------------------------------------------------------------
# AdaLoRA.

SCHEDULE = dict(initial=24, target=8, total_steps=100, warmup_steps=10, final_steps=20, every=5)


def test_budget_schedule_is_cubic_and_hits_both_ends():
    for step in range(1, 101):
        budget, now = cljax.adalora_budget_schedule(step, **SCHEDULE)
        if step <= 10:
            want, want_now = 24, False
        elif step > 80:
            want, want_now = 8, True
        else:
            progress = (step - 10) / 70
            want, want_now = int(np.floor(16 * (1 - progress) ** 3 + 8)), step % 5 == 0
        assert (int(budget), bool(now)) == (want, want_now), step
    assert int(cljax.adalora_budget_schedule(11, **SCHEDULE)[0]) <= 24
    assert int(cljax.adalora_budget_schedule(80, **SCHEDULE)[0]) == 8


@pytest.mark.slow
def test_orthogonality_penalty():
    lora = cljax.lora_init(
        jax.random.key(0),
        {"w": jnp.zeros((6, 4)), "k": jnp.zeros((2, 5, 7))},
        rank=3,
        init="svd_form",
    )
    want = 0.0
    for x in (lora["w"], lora["k"]):
        a = np.asarray(x.a, np.float64).reshape(-1, *x.a.shape[-2:])
        b = np.asarray(x.b, np.float64).reshape(-1, *x.b.shape[-2:])
        for ai, bi in zip(a, b, strict=True):
            want += np.sum((ai.T @ ai - np.eye(3)) ** 2) + np.sum((bi @ bi.T - np.eye(3)) ** 2)
    np.testing.assert_allclose(cljax.adalora_orthogonality(lora), want, rtol=1e-5)
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (6, 3)))[0]
    ortho = {"w": dataclasses.replace(lora["w"], a=q, b=q.T[:, :4] * 0 + jnp.eye(3, 4))}
    np.testing.assert_allclose(cljax.adalora_orthogonality(ortho), 0.0, atol=1e-10)


def _adalora_run(steps, **kwargs):
    params = {"w": jnp.zeros((6, 5)), "k": jnp.zeros((2, 4, 3)), "bias": jnp.zeros(5)}
    lora = cljax.lora_init(jax.random.key(0), params, rank=3, init="svd_form")
    tx = cljax.mask_adalora_budget(optax.sgd(0.1), **kwargs)
    state = tx.init(lora)
    step = jax.jit(tx.update)
    history = []
    for t in range(steps):
        g = jax.tree.map(
            lambda x, t=t: jax.random.normal(jax.random.fold_in(jax.random.key(1), t), x.shape),
            lora,
        )
        u, state = step(g, state, lora)
        before = lora
        lora = optax.apply_updates(lora, u)
        history.append((before, g, state, lora))
    return history


def test_masking_keeps_the_global_top_budget_triplets():
    kwargs = dict(target_rank=1, total_steps=12, warmup_steps=2, final_steps=3, every=2)
    history = _adalora_run(10, **kwargs)
    n_triplets = 3 + 2 * 3
    for t, (_, _, state, after) in enumerate(history):
        budget, now = cljax.adalora_budget_schedule(
            t + 1,
            initial=n_triplets,
            target=3,
            total_steps=12,
            warmup_steps=2,
            final_steps=3,
            every=2,
        )
        if not bool(now):
            continue
        nonzero = sum(int(jnp.sum(x.gate != 0)) for x in (after["w"], after["k"]))
        assert nonzero == int(budget), t
        # Recompute the scores with NumPy from the state's smoothed statistics.
        scores = []
        for name in ("w", "k"):
            sens, unc = state.sensitivity[name], state.uncertainty[name]
            s = {
                f: np.asarray(getattr(sens, f)) * np.asarray(getattr(unc, f))
                for f in ("a", "b", "gate")
            }
            scores.append((s["gate"] + s["a"].mean(axis=-2) + s["b"].mean(axis=-1)).reshape(-1))
        flat = np.concatenate(scores)
        keep = np.argsort(-flat, kind="stable")[: int(budget)]
        gates = np.concatenate([np.asarray(after[n].gate).reshape(-1) for n in ("w", "k")])
        pruned = np.setdiff1d(np.arange(flat.size), keep)
        assert np.all(gates[pruned] == 0)


def test_sensitivity_and_uncertainty_follow_the_smoothing_rule():
    history = _adalora_run(2, target_rank=1, total_steps=12, warmup_steps=5, final_steps=3, every=2)
    before, grads, state, _ = history[1]
    prev = history[0][2]
    importance = np.abs(np.asarray(before["w"].a) * np.asarray(grads["w"].a))
    sens = 0.85 * np.asarray(prev.sensitivity["w"].a) + 0.15 * importance
    unc = 0.85 * np.asarray(prev.uncertainty["w"].a) + 0.15 * np.abs(importance - sens)
    np.testing.assert_allclose(state.sensitivity["w"].a, sens, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.uncertainty["w"].a, unc, rtol=1e-5, atol=1e-7)


def test_adalora_errors():
    with pytest.raises(
        ValueError, match=r"adalora_budget_schedule\(target=...\) must be <= initial \(4\)"
    ):
        cljax.adalora_budget_schedule(
            1, initial=4, target=8, total_steps=10, warmup_steps=1, final_steps=1, every=1
        )
    with pytest.raises(
        ValueError, match=r"warmup_steps \+ final_steps \(5 \+ 5\) must be below total_steps \(10\)"
    ):
        cljax.mask_adalora_budget(
            optax.sgd(0.1), target_rank=1, total_steps=10, warmup_steps=5, final_steps=5, every=1
        )
    with pytest.raises(ValueError, match=r"mask_adalora_budget\(target_rank=...\) must be >= 0"):
        cljax.mask_adalora_budget(
            optax.sgd(0.1), target_rank=-1, total_steps=10, warmup_steps=1, final_steps=1, every=1
        )
    with pytest.raises(ValueError, match=r"mask_adalora_budget\(initial_rank=...\) must be >= 1"):
        cljax.mask_adalora_budget(
            optax.sgd(0.1),
            target_rank=1,
            initial_rank=0,
            total_steps=10,
            warmup_steps=1,
            final_steps=1,
            every=1,
        )
    with pytest.raises(ValueError, match=r"mask_adalora_budget\(beta1=...\) must be in"):
        cljax.mask_adalora_budget(
            optax.sgd(0.1),
            target_rank=1,
            total_steps=10,
            warmup_steps=1,
            final_steps=1,
            every=1,
            beta1=2.0,
        )
    with pytest.raises(TypeError, match=r"mask_adalora_budget\(inner=...\) must be an optax"):
        cljax.mask_adalora_budget(
            None, target_rank=1, total_steps=10, warmup_steps=1, final_steps=1, every=1
        )
    tx = cljax.mask_adalora_budget(
        optax.sgd(0.1), target_rank=1, total_steps=10, warmup_steps=1, final_steps=1, every=1
    )
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"mask_adalora_budget: `update` needs `params`"):
        tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------------------------
# Periodic momentum reset.


def test_periodic_reset_restarts_the_inner_optimizer():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    grads = [
        jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), params)
        for t in range(7)
    ]
    tx = cljax.with_periodic_reset(optax.adam(1e-2), every=3)
    state = tx.init(params)
    got = []
    for g in grads:
        u, state = tx.update(g, state, params)
        got.append(u)
    fresh = optax.adam(1e-2)
    for start in (0, 3, 6):  # a reset at steps 3 and 6 equals a freshly initialised Adam
        s = fresh.init(params)
        for t in range(start, min(start + 3, 7)):
            u, s = fresh.update(grads[t], s, params)
            assert_trees_close(got[t], u, rtol=1e-6, atol=1e-8, err=f"step {t}")
    never = cljax.with_periodic_reset(optax.adam(1e-2), every=100)
    s_never, s_plain = never.init(params), fresh.init(params)
    for g in grads:
        u1, s_never = never.update(g, s_never, params)
        u2, s_plain = fresh.update(g, s_plain, params)
        assert_trees_equal(u1, u2)


def test_periodic_reset_zeroes_only_the_named_fields():
    state = optax.adam(1e-2).init({"w": jnp.ones(3)})
    state = jax.tree.map(lambda x: x + 1, state)
    from cljax.transforms.low_rank.reset import _reset

    only_mu = _reset(state, frozenset({"mu"}), reset_count=False)
    adam = only_mu[0]
    assert not np.any(adam.mu["w"]) and np.all(adam.nu["w"] == 1) and int(adam.count) == 1
    both = _reset(state, frozenset({"mu", "nu"}), reset_count=True)[0]
    assert int(both.count) == 0 and not np.any(both.nu["w"])


def test_periodic_reset_errors():
    with pytest.raises(ValueError, match=r"with_periodic_reset\(every=...\) must be >= 1"):
        cljax.with_periodic_reset(optax.adam(1e-2), every=0)
    with pytest.raises(
        TypeError, match=r"with_periodic_reset\(fields=...\) must be a non-empty sequence"
    ):
        cljax.with_periodic_reset(optax.adam(1e-2), every=2, fields="mu")
    with pytest.raises(TypeError, match=r"with_periodic_reset\(reset_count=...\) must be a bool"):
        cljax.with_periodic_reset(optax.adam(1e-2), every=2, reset_count=None)
    with pytest.raises(TypeError, match=r"with_periodic_reset\(inner=...\) must be an optax"):
        cljax.with_periodic_reset(3, every=2)


# ---------------------------------------------------------------------------------------------
# Incremental rank updates.


def test_rank_bank_old_tasks_are_frozen_and_reproducible():
    params = {
        "w": jax.random.normal(jax.random.key(0), (5, 4)),
        "k": jnp.zeros((2, 3, 6)),
        "b": jnp.zeros(4),
    }
    bank = cljax.rank_bank_init(jax.random.key(1), params, capacity=4, rank=2)
    assert_trees_equal(cljax.rank_bank_apply(bank, 0), params)
    opt = optax.adam(5e-2)
    state = opt.init(bank)

    @jax.jit
    def train_step(bank, state, task, key):
        def loss(p):
            full = cljax.rank_bank_apply(p, task)
            return sum(
                jnp.sum((x - jax.random.normal(key, x.shape)) ** 2) for x in jax.tree.leaves(full)
            )

        updates, state = opt.update(jax.grad(loss)(bank), state, bank)
        return optax.apply_updates(bank, cljax.rank_bank_mask_updates(updates, task)), state

    snapshots = []
    for task in range(3):
        if task:
            before = cljax.rank_bank_apply(bank, task - 1)
            bank = cljax.rank_bank_add_task(bank, task, jax.random.key(10 + task))
            assert_trees_close(cljax.rank_bank_apply(bank, task), before, rtol=1e-6, atol=1e-6)
        old = bank
        for _ in range(3):
            bank, state = train_step(bank, state, jnp.int32(task), jax.random.key(task))
        for j, snap in enumerate(snapshots):  # zero forgetting for task-incremental evaluation
            now = cljax.rank_bank_apply(bank, j)
            assert_trees_equal({k: now[k] for k in ("w", "k")}, snap)
        for name in ("w", "k"):
            np.testing.assert_array_equal(
                bank[name].u[..., :task, :, :], old[name].u[..., :task, :, :]
            )
            np.testing.assert_array_equal(
                bank[name].selectors[..., :task, :], old[name].selectors[..., :task, :]
            )
            assert np.all(np.asarray(bank[name].selectors)[..., task, task + 1 :] == 0)
        np.testing.assert_array_equal(bank["w"].base, params["w"])
        snapshots.append({k: cljax.rank_bank_apply(bank, task)[k] for k in ("w", "k")})
    assert train_step._cache_size() == 1  # one compilation for every task


def test_rank_bank_apply_formula_and_errors():
    bank = cljax.rank_bank_init(jax.random.key(0), {"w": jnp.zeros((4, 3))}, capacity=3, rank=1)
    w = dataclasses.replace(
        bank["w"],
        u=jax.random.normal(jax.random.key(1), (3, 4, 1)),
        v=jax.random.normal(jax.random.key(2), (3, 1, 3)),
        selectors=jax.random.normal(jax.random.key(3), (3, 3)),
    )
    got = cljax.rank_bank_apply({"w": w}, 2)["w"]
    want = sum(float(w.selectors[2, i]) * np.asarray(w.u[i]) @ np.asarray(w.v[i]) for i in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"rank_bank_apply\(task=...\) must be in \[0, 3\)"):
        cljax.rank_bank_apply(bank, 3)
    with pytest.raises(ValueError, match=r"rank_bank_add_task\(task=...\) must be in \[1, 3\)"):
        cljax.rank_bank_add_task(bank, 0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank_bank_init\(capacity=...\) must be >= 1"):
        cljax.rank_bank_init(jax.random.key(0), {"w": jnp.zeros((4, 3))}, capacity=0)
    with pytest.raises(
        ValueError,
        match=r"rank_bank_init: leaf 'b' has shape \(3,\); a factor bank needs two or more dims",
    ):
        cljax.rank_bank_init(
            jax.random.key(0), {"b": jnp.zeros(3)}, capacity=2, targets=lambda p: {"b": True}
        )
    with pytest.raises(TypeError, match=r"rank_bank_init\(targets=...\) must be a function"):
        cljax.rank_bank_init(jax.random.key(0), {"b": jnp.zeros(3)}, capacity=2, targets=[True])
    with pytest.raises(TypeError, match=r"rank_bank_init\(matrix_spec=...\) must be a MatrixSpec"):
        cljax.rank_bank_init(jax.random.key(0), {"b": jnp.zeros(3)}, capacity=2, matrix_spec=1)


# ---------------------------------------------------------------------------------------------
# Intrinsic dimension and SAID.


def test_fastfood_equals_its_materialized_matrix():
    key = jax.random.key(3)
    d, size = 5, 11
    length = 16
    signs, perm, gauss = (
        np.asarray(x, np.float64) for x in _intrinsic._fastfood_factors(key, length)
    )
    h = scipy.linalg.hadamard(length)
    permutation = np.eye(length)[np.asarray(perm, int)]
    dense = h @ np.diag(gauss) @ permutation @ h @ np.diag(signs)
    dense = dense[:size, :d] / (np.sqrt(length * np.sum(gauss**2)) * np.sqrt(size / length))
    x = jax.random.normal(jax.random.key(4), (d,))
    np.testing.assert_allclose(
        _intrinsic._fastfood(key, x, size), dense @ np.asarray(x, np.float64), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        _intrinsic._fwht(jnp.arange(8.0)), scipy.linalg.hadamard(8) @ np.arange(8.0)
    )


@pytest.mark.parametrize("projection", [pytest.param("fastfood", marks=pytest.mark.slow), "dense"])
def test_said_identity_linearity_and_gradient(projection):
    base = {
        "w": jax.random.normal(jax.random.key(0), (4, 3)),
        "b": jnp.ones(3),
        "h": jnp.zeros((2, 2), jnp.bfloat16),
    }
    trainable = cljax.intrinsic_init(base, dim=9)
    assert trainable.theta.shape == (6,) and trainable.scales.shape == (3,)
    assert_trees_equal(
        cljax.intrinsic_apply(trainable, base, projection=projection), base
    )  # theta = 0
    t1 = trainable._replace(theta=jax.random.normal(jax.random.key(1), (6,)))
    t2 = trainable._replace(theta=jax.random.normal(jax.random.key(2), (6,)))
    f = lambda t: jax.tree.map(  # noqa: E731
        lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32),
        cljax.intrinsic_apply(
            t, jax.tree.map(lambda x: x.astype(jnp.float32), base), projection=projection
        ),
        jax.tree.map(lambda x: x.astype(jnp.float32), base),
    )
    both = f(t1._replace(theta=t1.theta + 2 * t2.theta))
    assert_trees_close(
        both, jax.tree.map(lambda a, b: a + 2 * b, f(t1), f(t2)), rtol=1e-4, atol=1e-5
    )
    assert_trees_close(f(t1), f(t1))  # the same projection on every call
    # Gradient w.r.t. theta = sum_i lambda_i P_i^T g_i, with P_i materialised column by column.
    base32 = jax.tree.map(lambda x: x.astype(jnp.float32), base)
    t = t1._replace(scales=jnp.array([0.5, 2.0, -1.0]))
    loss = lambda tt: sum(
        jnp.sum(jnp.sin(x))
        for x in jax.tree.leaves(cljax.intrinsic_apply(tt, base32, projection=projection))
    )  # noqa: E731
    grad = jax.grad(loss)(t)
    full = cljax.intrinsic_apply(t, base32, projection=projection)
    leaves = jax.tree.leaves(full)
    want = np.zeros(6)
    for i, leaf in enumerate(leaves):
        cols = jax.vmap(
            lambda e, i=i: jax.tree.leaves(f(trainable._replace(theta=e, scales=jnp.ones(3))))[
                i
            ].reshape(-1)
        )(jnp.eye(6))
        want += (
            float(t.scales[i])
            * np.asarray(cols, np.float64)
            @ np.cos(np.asarray(leaf, np.float64)).reshape(-1)
        )
    np.testing.assert_allclose(grad.theta, want, rtol=1e-4, atol=1e-5)
    opt = optax.adam(1e-2)
    assert sum(x.size for x in jax.tree.leaves(opt.init(trainable))) == 1 + 2 * 9


def test_said_dense_projection_matches_explicit_matrices():
    base = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
    trainable = cljax.intrinsic_init(base, dim=7)  # theta: 5 entries, scales: 2
    assert_trees_equal(cljax.intrinsic_apply(trainable, base, projection="dense"), base)
    t = trainable._replace(
        theta=jax.random.normal(jax.random.key(1), (5,)), scales=jnp.array([0.5, -2.0])
    )
    # The documented dense projection of leaf i: N(0, 1/D_i) entries from fold_in(key(seed), i).
    mats = [
        np.asarray(
            jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (size, 5)), np.float64
        )
        / np.sqrt(size)
        for i, size in enumerate((3, 12))  # tree order: b, w
    ]
    out = cljax.intrinsic_apply(t, base, projection="dense")
    theta = np.asarray(t.theta, np.float64)
    np.testing.assert_allclose(out["b"], 1.0 + 0.5 * mats[0] @ theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["w"],
        np.asarray(base["w"]) - 2.0 * (mats[1] @ theta).reshape(4, 3),
        rtol=1e-5,
        atol=1e-5,
    )
    loss = lambda tt: sum(
        jnp.sum(jnp.sin(x))
        for x in jax.tree.leaves(cljax.intrinsic_apply(tt, base, projection="dense"))
    )  # noqa: E731
    grad = jax.grad(loss)(t)
    g_b, g_w = (
        np.cos(np.asarray(out["b"], np.float64)),
        np.cos(np.asarray(out["w"], np.float64)).reshape(-1),
    )
    np.testing.assert_allclose(
        grad.theta, 0.5 * mats[0].T @ g_b - 2.0 * mats[1].T @ g_w, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        grad.scales, [mats[0][:, :] @ theta @ g_b, (mats[1] @ theta) @ g_w], rtol=1e-4, atol=1e-5
    )
    assert sum(x.size for x in jax.tree.leaves(optax.adam(1e-2).init(t))) == 1 + 2 * 7


def test_direct_form_and_d90():
    base = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    trainable = cljax.intrinsic_init(base, dim=4, said=False)
    assert trainable.theta.shape == (4,) and trainable.scales.shape == (0,)
    out = cljax.intrinsic_apply(trainable._replace(theta=jnp.ones(4)), base, projection="dense")
    assert np.any(np.asarray(out["w"])) and np.any(np.asarray(out["b"]))
    assert cljax.intrinsic_dimension([1000, 10, 100], [0.99, 0.3, 0.9], full_score=1.0) == 100
    assert cljax.intrinsic_dimension([10, 100], [0.1, 0.2], full_score=1.0) is None


def test_intrinsic_errors():
    with pytest.raises(
        ValueError, match=r"intrinsic_init\(dim=...\) must exceed the 2 per-leaf SAID scales"
    ):
        cljax.intrinsic_init({"w": jnp.zeros(3), "b": jnp.zeros(2)}, dim=2)
    with pytest.raises(ValueError, match=r"intrinsic_init\(dim=...\) must be >= 1"):
        cljax.intrinsic_init({"w": jnp.zeros(3)}, dim=0)
    with pytest.raises(ValueError, match=r"intrinsic_init: `params` has no leaves"):
        cljax.intrinsic_init({}, dim=3)
    trainable = cljax.intrinsic_init({"w": jnp.zeros(3)}, dim=3)
    with pytest.raises(
        ValueError, match=r"intrinsic_apply\(projection=...\) must be one of 'fastfood', 'dense'"
    ):
        cljax.intrinsic_apply(trainable, {"w": jnp.zeros(3)}, projection="srht")
    with pytest.raises(
        ValueError,
        match=r"intrinsic_apply: `trainable.scales` has 1 entries but `base` has 2 leaves",
    ):
        cljax.intrinsic_apply(trainable, {"w": jnp.zeros(3), "b": jnp.zeros(1)})
    with pytest.raises(TypeError, match=r"intrinsic_apply: `trainable` must be an IntrinsicParams"):
        cljax.intrinsic_apply((jnp.zeros(3),), {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"intrinsic_apply\(seed=...\) must be >= 0"):
        cljax.intrinsic_apply(trainable, {"w": jnp.zeros(3)}, seed=-1)
    with pytest.raises(
        ValueError,
        match=r"intrinsic_dimension: `dims` and `scores` must be non-empty and of one length",
    ):
        cljax.intrinsic_dimension([1, 2], [0.5], full_score=1.0)
    with pytest.raises(ValueError, match=r"intrinsic_dimension\(fraction=...\) must be in"):
        cljax.intrinsic_dimension([1], [0.5], full_score=1.0, fraction=1.5)
