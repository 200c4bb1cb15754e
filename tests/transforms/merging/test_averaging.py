"""Tests for weight averaging and interpolation: MG-07 / MG-12 / MG-13 (parameter EMA), MG-10 /
MG-14 (SWA, ZSCL weight ensemble and distillation loss), MG-11 (LAWA), MG-13 (I-LoRA consistency
loss), MG-18 (CoIN) and MG-19 (BCWI, negative flip rate).

Every rule is checked against an independent float64 NumPy transcription of its card (or of the
authors' reference loop where the card defers to it), then against the card's invariants,
hypothesis properties, jit / sharded-jit equality and every argument error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax import tree as cljax_tree
from cljax.transforms.merging import averaging as avg
from tests.helpers import assert_trees_close, assert_trees_equal

# A matrix, a vector, a 3-D leaf and a scalar leaf.
SHAPES = {"w": (4, 3), "b": (3,), "k": (2, 3, 2), "s": ()}
STEPS = 7
LR = 0.5


def normal_tree(rng, shapes=SHAPES, scale=1.0):
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in shapes.items()}


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def jtree(tree):
    return jax.tree.map(jnp.asarray, tree)


def sgd_trajectory(params, grads_list, lr=LR):
    """float32 post-step parameters of plain SGD (what optax.apply_updates produces)."""
    out, p = [], dict(params)
    for g in grads_list:
        p = {k: np.asarray(p[k] - np.float32(lr) * g[k], np.float32) for k in p}
        out.append(p)
    return out


def run_tx(tx, params, grads_list, jit=True):
    """Runs a transform after SGD; returns (final state, list of updates, post-step params)."""
    chain = optax.chain(optax.sgd(LR), tx)
    update = jax.jit(chain.update) if jit else chain.update
    state = chain.init(params)
    ups, traj = [], []
    for g in grads_list:
        u, state = update(jtree(g), state, params)
        ups.append(u)
        params = optax.apply_updates(params, u)
        traj.append(params)
    return state, ups, traj


# ---------------------------------------------------------------------------------------------
# MG-07 / MG-12: EMA.


def np_ema(init, snapshots, decay, mode="plain"):
    """Float64 EMA of a list of snapshot trees (card rule; debias = zero-start / (1 - tau^n))."""
    ema = f64(init)
    zero = {k: np.zeros_like(v) for k, v in ema.items()}
    for n, snap in enumerate(snapshots, start=1):
        snap = f64(snap)
        if mode == "plain":
            ema = {k: decay * ema[k] + (1 - decay) * snap[k] for k in ema}
        elif mode == "warmup":
            beta = min(decay, 1 - 1 / (n + 1))
            ema = {k: beta * ema[k] + (1 - beta) * snap[k] for k in ema}
        else:
            zero = {k: decay * zero[k] + (1 - decay) * snap[k] for k in zero}
            ema = {k: zero[k] / (1 - decay**n) for k in zero}
    return ema


@pytest.mark.parametrize("mode", ["plain", "debias", "warmup"])
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_update_matches_numpy(mode, decay):
    rng = np.random.default_rng(0)
    init = normal_tree(rng)
    snaps = [normal_tree(rng) for _ in range(STEPS)]
    state = avg.ema_init(jtree(init))
    update = jax.jit(
        functools.partial(
            avg.ema_update, decay=decay, debias=mode == "debias", warmup=mode == "warmup"
        )
    )
    for s in snaps:
        state = update(state, jtree(s))
    assert int(state.count) == int(state.step) == STEPS
    assert_trees_close(
        avg.ema_params(state), np_ema(init, snaps, decay, mode), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("every", [1, 3])
def test_track_ema_matches_numpy_and_passes_updates(every):
    rng = np.random.default_rng(1)
    params = normal_tree(rng)
    grads = [normal_tree(rng) for _ in range(STEPS)]
    state, ups, _ = run_tx(avg.track_ema(0.8, every), jtree(params), grads)
    traj = sgd_trajectory(params, grads)
    snaps = [traj[t - 1] for t in range(1, STEPS + 1) if t % every == 0]
    want = np_ema(params, snaps, 0.8)
    ema_state = cljax_tree.find_state(state, avg.EmaState)
    assert int(ema_state.count) == len(snaps) and int(ema_state.step) == STEPS
    assert_trees_close(avg.ema_params(state), want, rtol=1e-5, atol=1e-6)
    for g, u in zip(grads, ups, strict=True):  # identity on the (SGD) updates
        assert_trees_equal(u, jax.tree.map(lambda x: jnp.asarray(-LR * x, jnp.float32), jtree(g)))


def test_track_ema_schedule_reads_step_count():
    rng = np.random.default_rng(2)
    params = normal_tree(rng)
    grads = [normal_tree(rng) for _ in range(4)]
    schedule = optax.linear_schedule(0.2, 0.9, 4)
    state, _, _ = run_tx(avg.track_ema(schedule), jtree(params), grads)
    ema = f64(params)
    for t, snap in enumerate(sgd_trajectory(params, grads)):
        tau = float(schedule(t))
        ema = {k: tau * ema[k] + (1 - tau) * np.float64(snap[k]) for k in ema}
    assert_trees_close(avg.ema_params(state), ema, rtol=1e-5, atol=1e-6)


def test_ema_invariants_decay_zero_one_and_constant_fast_weights():
    rng = np.random.default_rng(3)
    params = normal_tree(rng)
    grads = [normal_tree(rng) for _ in range(3)]
    traj = sgd_trajectory(params, grads)
    zero, _, _ = run_tx(avg.track_ema(0.0), jtree(params), grads)
    assert_trees_equal(avg.ema_params(zero), jtree(traj[-1]))  # tau = 0: slow = fast
    one, _, _ = run_tx(avg.track_ema(1.0), jtree(params), grads)
    assert_trees_equal(avg.ema_params(one), jtree(params))  # tau = 1: slow = theta_0 forever
    # Constant fast weights: theta_s = theta_f + tau^n (theta_0 - theta_f).
    fast = normal_tree(rng)
    state = avg.ema_init(jtree(params))
    for _ in range(5):
        state = avg.ema_update(state, jtree(fast), decay=0.7)
    want = {k: np.float64(fast[k]) + 0.7**5 * (np.float64(params[k]) - fast[k]) for k in fast}
    assert_trees_close(avg.ema_params(state), want, rtol=1e-5, atol=1e-6)


def test_ema_debias_limits_are_exact_and_finite():
    rng = np.random.default_rng(4)
    init, snaps = normal_tree(rng), [normal_tree(rng) for _ in range(4)]
    for decay, want in [
        (1.0, {k: np.mean([np.float64(s[k]) for s in snaps], axis=0) for k in init}),
        (0.0, f64(snaps[-1])),
    ]:
        state = avg.ema_init(jtree(init))
        for s in snaps:
            state = avg.ema_update(state, jtree(s), decay=decay, debias=True)
        assert_trees_close(avg.ema_params(state), want, rtol=1e-6, atol=1e-6)
    first = avg.ema_update(avg.ema_init(jtree(init)), jtree(snaps[0]), decay=0.999, debias=True)
    assert_trees_equal(avg.ema_params(first), jtree(snaps[0]))  # debiased: forgets the start


def test_ema_bfloat16_average_in_float32_and_params_cast():
    params = {"w": jnp.full((3,), 1.0, jnp.bfloat16), "s": jnp.zeros((), jnp.bfloat16)}
    state = avg.ema_init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema))
    state = avg.ema_update(
        state, jax.tree.map(lambda x: x + jnp.bfloat16(1.0 / 128), params), decay=0.5
    )
    assert float(state.ema["w"][0]) == 1.0 + 1.0 / 256  # not representable in bfloat16
    out = avg.ema_params(state, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    low = avg.ema_init({"w": jnp.ones(2)}, dtype=jnp.bfloat16)
    assert low.ema["w"].dtype == jnp.bfloat16


def test_ilora_slow_adapter_on_lora_leaves_only():
    """MG-13: the EMA runs on LoRA leaves (masked), lambda = 0 makes slow = fast, reads fill base."""
    rng = np.random.default_rng(5)
    params = {
        "base": normal_tree(rng, {"w": (4, 3)}),
        "lora": normal_tree(rng, {"a": (4, 2), "b": (2, 3)}),
    }
    params = jtree(params)
    tx = optax.chain(
        optax.sgd(LR), optax.masked(avg.track_ema(0.0, warmup=True), cljax_tree.select("lora"))
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, u)
    slow = avg.ema_params(state, new)
    assert_trees_equal(slow, new)  # lambda = 0: slow adapter equals the fast one; base from params
    raw = avg.ema_params(state)
    assert isinstance(raw["base"]["w"], optax.MaskedNode)
    # The slow adapter never receives gradients: the consistency loss is constant in `stable`.
    grad_stable = jax.grad(lambda s: avg.ilora_consistency_loss(jnp.ones(3), s))(jnp.arange(3.0))
    np.testing.assert_array_equal(grad_stable, 0.0)


# ---------------------------------------------------------------------------------------------
# MG-10 / MG-14: SWA and ZSCL's weight ensemble.


def test_swa_update_equals_arithmetic_mean():
    rng = np.random.default_rng(6)
    init, snaps = normal_tree(rng), [normal_tree(rng) for _ in range(5)]
    state = avg.swa_init(jtree(init))
    assert_trees_equal(avg.swa_params(state), jtree(init))  # before the first snapshot
    update = jax.jit(avg.swa_update)
    for s in snaps:
        state = update(state, jtree(s))
    want = {k: np.mean([np.float64(s[k]) for s in snaps], axis=0) for k in init}
    assert_trees_close(avg.swa_params(state), want, rtol=1e-5, atol=1e-6)
    with_init = avg.swa_init(jtree(init), include_initial=True)
    for s in snaps:
        with_init = avg.swa_update(with_init, jtree(s))
    want = {k: np.mean([np.float64(s[k]) for s in [init, *snaps]], axis=0) for k in init}
    assert_trees_close(avg.swa_params(with_init), want, rtol=1e-5, atol=1e-6)


def test_track_swa_start_and_period_no_snapshot_before_start():
    rng = np.random.default_rng(7)
    params = normal_tree(rng)
    grads = [normal_tree(rng) for _ in range(10)]
    traj = sgd_trajectory(params, grads)
    tx = avg.track_swa(start_step=3, every=2)
    state, _, _ = run_tx(tx, jtree(params), grads[:2])
    assert int(cljax_tree.find_state(state, avg.SwaState).count) == 0
    assert_trees_equal(avg.swa_params(state), jtree(params))
    state, _, _ = run_tx(tx, jtree(params), grads)
    snaps = [traj[t - 1] for t in (3, 5, 7, 9)]
    want = {k: np.mean([np.float64(s[k]) for s in snaps], axis=0) for k in params}
    assert int(cljax_tree.find_state(state, avg.SwaState).count) == 4
    assert_trees_close(avg.swa_params(state), want, rtol=1e-5, atol=1e-6)


def test_track_swa_matches_swa_algorithm_one_and_zscl_loop():
    rng = np.random.default_rng(8)
    params = normal_tree(rng)
    grads = [normal_tree(rng) for _ in range(9)]
    traj = [f64(t) for t in sgd_trajectory(params, grads)]
    # SWA paper, Algorithm 1 (cycle c = 3): w_swa <- w_hat; at i % c == 0, n = i / c.
    c, w_swa = 3, f64(params)
    for i in range(1, len(grads) + 1):
        if i % c == 0:
            n = i // c
            w_swa = {k: (w_swa[k] * n + traj[i - 1][k]) / (n + 1) for k in w_swa}
    state, _, _ = run_tx(avg.track_swa(0, c, include_initial=True), jtree(params), grads)
    assert_trees_close(avg.swa_params(state), w_swa, rtol=1e-5, atol=1e-6)
    # ZSCL's loop: we <- theta_0; after the step at iteration % I == 0: n += 1, merge.
    interval, we, we_n = 4, f64(params), 0
    for iteration in range(len(grads)):
        if iteration % interval == 0:
            we_n += 1
            we = {k: (we[k] * we_n + traj[iteration][k]) / (1.0 + we_n) for k in we}
    state, _, _ = run_tx(avg.track_swa(1, interval, include_initial=True), jtree(params), grads)
    assert_trees_close(avg.swa_params(state), we, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MG-11: LAWA.


@pytest.mark.parametrize("capacity", [1, 3])
def test_lawa_equals_mean_of_latest_snapshots(capacity):
    rng = np.random.default_rng(9)
    init, snaps = normal_tree(rng), [normal_tree(rng) for _ in range(5)]
    state = avg.lawa_init(jtree(init), capacity=capacity)
    assert_trees_equal(avg.lawa_params(state), jtree(init))
    traces = []

    @jax.jit
    def update(state, s):
        traces.append(None)
        return avg.lawa_update(state, s)

    for i, s in enumerate(snaps, start=1):
        state = update(state, jtree(s))
        last = snaps[max(0, i - capacity) : i]
        want = {k: np.mean([np.float64(x[k]) for x in last], axis=0) for k in init}
        assert_trees_close(avg.lawa_params(state), want, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1, "the ring buffer must not recompile"
    if capacity == 1:
        assert_trees_equal(avg.lawa_params(state), jtree(snaps[-1]))  # k = 1: the latest snapshot


def test_track_lawa_every_matches_numpy():
    rng = np.random.default_rng(10)
    params = normal_tree(rng)
    grads = [normal_tree(rng) for _ in range(9)]
    traj = sgd_trajectory(params, grads)
    state, _, _ = run_tx(avg.track_lawa(capacity=2, every=3), jtree(params), grads)
    want = {k: (np.float64(traj[5][k]) + traj[8][k]) / 2 for k in params}  # steps 6 and 9
    assert_trees_close(avg.lawa_params(state), want, rtol=1e-5, atol=1e-6)
    lawa = cljax_tree.find_state(state, avg.LawaState)
    assert int(lawa.count) == 3 and int(lawa.step) == 9
    assert lawa.snapshots["w"].shape == (2, 4, 3)


def test_lawa_bfloat16_snapshots_exact_mean_in_float32():
    params = {"w": jnp.array([1.0, 2.0], jnp.bfloat16)}
    state = avg.lawa_init(params, capacity=2)
    state = avg.lawa_update(state, {"w": jnp.array([2.0, 2.0], jnp.bfloat16)})
    state = avg.lawa_update(state, {"w": jnp.array([1.0, 1.0 + 1 / 128], jnp.bfloat16)})
    assert state.snapshots["w"].dtype == jnp.bfloat16
    out = avg.lawa_params(state)
    assert out["w"].dtype == jnp.float32
    np.testing.assert_array_equal(out["w"], [1.5, 1.5 + 1 / 256])
    assert avg.lawa_params(state, params)["w"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# MG-18: CoIN.


def np_coin(params, grads_list, fallback=0.99, lr=LR):
    """Per-tensor transcription of the authors' `ema_update` loop (float64)."""
    ema, prev, p, decays = None, None, f64(params), []
    for g in grads_list:
        g = f64(g)
        p = {k: p[k] - lr * g[k] for k in p}
        if ema is None:
            ema = {k: v.copy() for k, v in p.items()}
            ema = {k: ema[k] * fallback + p[k] * (1 - fallback) for k in ema}
            decays.append({k: 0.0 for k in p})
        else:
            step_decay = {}
            for k in p:
                a = np.sum(np.abs(p[k] - ema[k]))
                b = np.sum(np.abs(g[k]))
                c = np.sum(np.abs(g[k] - prev[k]))
                with np.errstate(divide="ignore", invalid="ignore"):
                    alpha = float((1 + b) / (a * c) * 2)
                if not 0 < alpha < 1:
                    alpha = 1 - fallback
                ema[k] = ema[k] * (1 - alpha) + p[k] * alpha
                step_decay[k] = 1 - alpha
            decays.append(step_decay)
        prev = g
    return ema, decays


def test_coin_matches_reference_loop():
    rng = np.random.default_rng(11)
    params = normal_tree(rng)
    scales = {"w": 10.0, "b": 0.01, "k": 10.0, "s": 5.0}  # "b" stays on the fallback
    grads = [
        {k: np.asarray(scales[k] * v, np.float32) for k, v in normal_tree(rng).items()}
        for _ in range(STEPS)
    ]
    want, decays = np_coin(params, grads)
    tx = avg.track_coin_ema(optax.sgd(LR))
    update = jax.jit(tx.update)
    state, p = tx.init(jtree(params)), jtree(params)
    in_range = set()
    for g, d in zip(grads, decays, strict=True):
        u, state = update(jtree(g), state, p)
        p = optax.apply_updates(p, u)
        assert_trees_close(state.decay, d, rtol=1e-4, atol=1e-6)
        in_range |= {k for k, v in d.items() if 0 < 1 - v < 1 - 1e-9 and abs(v - 0.99) > 1e-9}
    assert in_range, "the adaptive weight should be used on some leaves"
    assert_trees_close(avg.ema_params(state), want, rtol=1e-5, atol=1e-6)


def test_coin_constant_weight_reduces_to_ema_and_passes_inner_updates():
    rng = np.random.default_rng(12)
    params = normal_tree(rng)
    g = normal_tree(rng)  # constant gradients: |g_t - g_{t-1}| = 0, so beta = fallback
    inner = optax.sgd(LR)
    tx = avg.track_coin_ema(inner, fallback_decay=0.9)
    state, p = tx.init(jtree(params)), jtree(params)
    inner_state = inner.init(p)
    ema = None
    for t in range(4):
        u, state = tx.update(jtree(g), state, p)
        want_u, inner_state = inner.update(jtree(g), inner_state, p)
        assert_trees_equal(u, want_u)
        p = optax.apply_updates(p, u)
        ema = avg.ema_init(p) if t == 0 else avg.ema_update(ema, p, decay=0.9)
    assert_trees_close(avg.ema_params(state), avg.ema_params(ema), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(state.decay)), 0.9, rtol=1e-6)


def test_coin_zero_gradients_and_zero_params_are_finite():
    params = jax.tree.map(jnp.zeros, SHAPES)
    tx = avg.track_coin_ema(optax.sgd(LR))
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------
# MG-13 / MG-14 losses.


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def test_zscl_distillation_matches_numpy_and_reference_gradient():
    rng = np.random.default_rng(13)
    cur, ref = rng.standard_normal((5, 7)) * 3, rng.standard_normal((5, 7)) * 3
    t = 2.0
    p, q = np_softmax(ref / t), np_softmax(cur / t)
    want = t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    loss = jax.jit(functools.partial(avg.zscl_distillation_loss, temperature=t))
    got = loss(jnp.asarray(cur, jnp.float32), jnp.asarray(ref, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The reference's cross-entropy has the same gradient: T^2 * d/ds CE(s/T, p) = T (q - p) / N.
    grad = jax.grad(avg.zscl_distillation_loss)(
        jnp.asarray(cur, jnp.float32), jnp.asarray(ref, jnp.float32)
    )
    np.testing.assert_allclose(grad, t * (q - p) / cur.shape[0], rtol=1e-4, atol=1e-6)
    # Transposed (text-side) call and a 3-D batch.
    got_t = avg.zscl_distillation_loss(
        jnp.asarray(cur.T, jnp.float32), jnp.asarray(ref.T, jnp.float32)
    )
    p_t, q_t = np_softmax(ref.T / t), np_softmax(cur.T / t)
    np.testing.assert_allclose(
        got_t, t * t * np.mean(np.sum(p_t * np.log(p_t / q_t), -1)), rtol=1e-5
    )
    x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    assert float(avg.zscl_distillation_loss(x, x)) == 0.0  # zero at initialization


@pytest.mark.parametrize("one_sided", [True, False])
def test_ilora_consistency_matches_numpy(one_sided):
    rng = np.random.default_rng(14)
    plastic = [rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))]
    stable = [rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))]
    if one_sided:  # the reference: MSE(h_p, where(h_p > h_s, h_p, h_s)) over the concatenation
        diffs = [hp - np.where(hp > hs, hp, hs) for hp, hs in zip(plastic, stable, strict=True)]
    else:
        diffs = [hp - hs for hp, hs in zip(plastic, stable, strict=True)]
    want = np.mean(np.concatenate([d.ravel() for d in diffs]) ** 2)
    fn = jax.jit(functools.partial(avg.ilora_consistency_loss, one_sided=one_sided))
    got = fn(jtree(plastic), jtree(stable))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grad = jax.grad(lambda h: avg.ilora_consistency_loss(h, jtree(stable), one_sided=one_sided))(
        jtree(plastic)
    )
    for g, d in zip(grad, diffs, strict=True):
        np.testing.assert_allclose(g, 2 * d / (2 * d.size), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# MG-19: BCWI and the negative flip rate.


def test_bcwi_matches_numpy_and_endpoints():
    rng = np.random.default_rng(15)
    old, new1, new2 = normal_tree(rng), normal_tree(rng), normal_tree(rng)
    fn = jax.jit(avg.bcwi_interpolate)
    got = fn(jtree(old), jtree(new1), jtree(new2), alpha=0.3)
    want = {k: 0.3 * np.float64(old[k]) + 0.7 * (np.float64(new1[k]) + new2[k]) / 2 for k in old}
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    # Order of the new models does not matter.
    assert_trees_close(
        fn(jtree(old), jtree(new2), jtree(new1), alpha=0.3), got, rtol=1e-6, atol=1e-7
    )
    assert_trees_equal(avg.bcwi_interpolate(jtree(old), jtree(new1), alpha=1.0), jtree(old))
    assert_trees_equal(avg.bcwi_interpolate(jtree(old), jtree(new1), alpha=0.0), jtree(new1))


def test_bcwi_importance_weighting_matches_numpy_and_stays_in_unit_interval():
    rng = np.random.default_rng(16)
    old, new = normal_tree(rng), normal_tree(rng)
    i_old = {k: np.abs(v) * 1e3 for k, v in normal_tree(rng).items()}
    i_new = {k: np.abs(v) for k, v in normal_tree(rng).items()}
    i_old["b"][0], i_new["b"][0] = 0.0, 0.0  # both zero: plain alpha
    i_new["w"][0, 0] = -5.0  # negative counts as zero: weight 1 on the old model
    alpha = 0.4
    got = avg.bcwi_interpolate(
        jtree(old),
        jtree(new),
        alpha=alpha,
        old_importance=jtree(i_old),
        new_importance=jtree(i_new),
    )
    want = {}
    for k in old:
        a, b = np.maximum(np.float64(i_old[k]), 0), np.maximum(np.float64(i_new[k]), 0)
        den = alpha * a + (1 - alpha) * b
        w = np.where(den > 0, alpha * a / np.where(den > 0, den, 1), alpha)
        assert np.all((w >= 0) & (w <= 1))
        want[k] = w * np.float64(old[k]) + (1 - w) * np.float64(new[k])
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["w"][0, 0], old["w"][0, 0])
    # Only one importance tree: the other counts as ones; equal importances give plain alpha.
    ones = jax.tree.map(jnp.ones_like, jtree(old))
    plain = avg.bcwi_interpolate(jtree(old), jtree(new), alpha=alpha)
    assert_trees_close(
        avg.bcwi_interpolate(jtree(old), jtree(new), alpha=alpha, old_importance=ones), plain
    )


def test_bcwi_keeps_dtypes_and_structure():
    old = {"a": jnp.ones(3, jnp.bfloat16), "b": [jnp.zeros((2, 2)), jnp.zeros(())]}
    new = jax.tree.map(lambda x: x + 1, old)
    out = avg.bcwi_interpolate(old, new, alpha=0.5)
    assert jax.tree.structure(out) == jax.tree.structure(old)
    assert [x.dtype for x in jax.tree.leaves(out)] == [x.dtype for x in jax.tree.leaves(old)]


def test_negative_flip_rate_matches_numpy_and_invariants():
    rng = np.random.default_rng(17)
    labels = rng.integers(0, 4, 50)
    old_scores, new_scores = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    old_pred, new_pred = old_scores.argmax(-1), new_scores.argmax(-1)
    want = np.mean((old_pred == labels) & (new_pred != labels))
    fn = jax.jit(avg.negative_flip_rate)
    np.testing.assert_allclose(
        fn(jnp.asarray(old_scores), jnp.asarray(new_scores), jnp.asarray(labels)), want
    )
    np.testing.assert_allclose(
        fn(jnp.asarray(old_pred), jnp.asarray(new_pred), jnp.asarray(labels)), want
    )
    assert (
        float(
            avg.negative_flip_rate(
                jnp.asarray(old_pred), jnp.asarray(old_pred), jnp.asarray(labels)
            )
        )
        == 0.0
    )
    assert float(
        fn(jnp.asarray(old_pred), jnp.asarray(new_pred), jnp.asarray(labels))
    ) <= 1 - np.mean(new_pred == labels)
    assert (
        float(
            avg.negative_flip_rate(
                jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32)
            )
        )
        == 0.0
    )


def test_bcwi_alpha_one_has_no_negative_flips():
    rng = np.random.default_rng(18)
    x, labels = (
        jnp.asarray(rng.standard_normal((40, 5)), jnp.float32),
        jnp.asarray(rng.integers(0, 3, 40)),
    )
    old = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.zeros(3)}
    new = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.ones(3)}
    predict = lambda p: x @ p["w"] + p["b"][None]  # noqa: E731
    merged = avg.bcwi_interpolate(old, new, alpha=1.0)
    assert float(avg.negative_flip_rate(predict(old), predict(merged), labels)) == 0.0


# ---------------------------------------------------------------------------------------------
# Hypothesis properties: finite output, shapes and dtypes preserved.

_shapes = st.lists(
    st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
)
_scales = st.sampled_from([0.0, 1e-30, 1.0, 1e30])


def _tree(shapes, scale, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": jnp.asarray(scale * rng.standard_normal(s), np.float32).astype(dtype)
        for i, s in enumerate(shapes)
    }


@settings(max_examples=10, deadline=None)
@given(
    shapes=_shapes,
    scale=_scales,
    decay=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    mode=st.sampled_from(["plain", "debias", "warmup"]),
)
def test_property_ema_swa_lawa_finite_and_shape_preserving(shapes, scale, decay, seed, dtype, mode):
    params, other = _tree(shapes, scale, seed, dtype), _tree(shapes, scale, seed + 1, dtype)
    ema = avg.ema_init(params)
    swa = avg.swa_init(params)
    lawa = avg.lawa_init(params, capacity=2)
    for p in (other, params, other):
        ema = avg.ema_update(ema, p, decay=decay, debias=mode == "debias", warmup=mode == "warmup")
        swa = avg.swa_update(swa, p)
        lawa = avg.lawa_update(lawa, p)
    for out in (
        avg.ema_params(ema, params),
        avg.swa_params(swa, params),
        avg.lawa_params(lawa, params),
    ):
        assert jax.tree.structure(out) == jax.tree.structure(params)
        for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
            assert o.shape == p.shape and o.dtype == p.dtype
            assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))


@settings(max_examples=10, deadline=None)
@given(
    shapes=_shapes,
    scale=_scales,
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
    imp_scale=_scales,
)
def test_property_bcwi_and_coin_finite(shapes, scale, alpha, seed, weighted, imp_scale):
    old, new = _tree(shapes, scale, seed), _tree(shapes, scale, seed + 1)
    imp = jax.tree.map(jnp.abs, _tree(shapes, imp_scale, seed + 2)) if weighted else None
    out = avg.bcwi_interpolate(old, new, new, alpha=alpha, old_importance=imp)
    for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(old), strict=True):
        assert o.shape == p.shape and o.dtype == p.dtype and bool(jnp.all(jnp.isfinite(o)))
    tx = avg.track_coin_ema(optax.identity())
    state = tx.init(old)
    for g in (new, old, new):
        _, state = tx.update(g, state, old)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
    assert all(0.0 <= float(d) <= 1.0 for d in jax.tree.leaves(state.decay))


@settings(max_examples=8, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 5),
    scale=st.sampled_from([0.0, 1.0, 1e15]),
    temperature=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_property_losses_finite_and_nonnegative(rows, cols, scale, temperature, seed):
    a, b = jnp.asarray(
        np.random.default_rng(seed).standard_normal((2, rows, cols)) * scale, jnp.float32
    )
    kl = avg.zscl_distillation_loss(a, b, temperature=temperature)
    mse = avg.ilora_consistency_loss({"h": a}, {"h": b})
    for value in (kl, mse):
        assert value.shape == () and bool(jnp.isfinite(value)) and float(value) >= 0.0


# ---------------------------------------------------------------------------------------------
# jit on a sharded tree equals the unsharded result.

SHARD_SHAPES = {"w": (8, 4), "b": (8,), "k": (2, 8, 4), "s": ()}
SHARD_SPECS = {"w": P("data", "model"), "b": P("data"), "k": P(None, "data", "model"), "s": P()}


def test_every_function_jits_and_matches_on_a_sharded_tree():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    shard = lambda tree: jax.device_put(
        tree, {k: NamedSharding(mesh, SHARD_SPECS[k]) for k in tree}
    )  # noqa: E731
    rng = np.random.default_rng(19)
    trees = [jtree(normal_tree(rng, SHARD_SHAPES)) for _ in range(4)]
    logits = [jnp.asarray(rng.standard_normal((8, 4)), jnp.float32) for _ in range(2)]
    labels = jnp.asarray(rng.integers(0, 4, 8))
    logit_sharding = NamedSharding(mesh, P("data", "model"))

    def everything(t0, t1, t2, t3, l0, l1, labels):
        ema = avg.ema_update(avg.ema_init(t0), t1, decay=0.9, debias=True)
        swa = avg.swa_update(avg.swa_update(avg.swa_init(t0), t1), t2)
        lawa = avg.lawa_update(avg.lawa_update(avg.lawa_init(t0, capacity=3), t1), t2)
        out = {
            "ema": avg.ema_params(ema),
            "swa": avg.swa_params(swa),
            "lawa": avg.lawa_params(lawa),
            "bcwi": avg.bcwi_interpolate(
                t0, t1, t2, alpha=0.3, old_importance=jax.tree.map(jnp.abs, t3)
            ),
            "zscl": avg.zscl_distillation_loss(l0, l1, temperature=2.0),
            "ilora": avg.ilora_consistency_loss(t0, t1),
            "nfr": avg.negative_flip_rate(l0, l1, labels),
        }
        for name, tx in [
            ("t_ema", avg.track_ema(0.9, 2)),
            ("t_swa", avg.track_swa(1, 1)),
            ("t_lawa", avg.track_lawa(2, 1)),
            ("t_coin", avg.track_coin_ema(optax.sgd(0.1))),
        ]:
            state, params = tx.init(t0), t0
            for g in (t1, t2, t3):
                u, state = tx.update(g, state, params)
                params = optax.apply_updates(params, u)
            out[name] = state
        return out

    plain = jax.jit(everything)(*trees, *logits, labels)
    sharded = jax.jit(everything)(
        *map(shard, trees), *(jax.device_put(x, logit_sharding) for x in logits), labels
    )
    assert_trees_close(sharded, plain, rtol=1e-5, atol=1e-6)
    assert_trees_close(
        plain["ema"],
        avg.ema_params(avg.ema_update(avg.ema_init(trees[0]), trees[1], decay=0.9, debias=True)),
    )


# ---------------------------------------------------------------------------------------------
# Errors: every raise.


def test_errors_states_and_readers():
    params = {"w": jnp.ones(3)}
    ema, swa, lawa = avg.ema_init(params), avg.swa_init(params), avg.lawa_init(params, capacity=2)
    with pytest.raises(TypeError, match=r"ema_update\(state=...\) must be an EmaState"):
        avg.ema_update(swa, params, decay=0.5)
    with pytest.raises(TypeError, match=r"swa_update\(state=...\) must be a SwaState"):
        avg.swa_update(ema, params)
    with pytest.raises(TypeError, match=r"lawa_update\(state=...\) must be a LawaState"):
        avg.lawa_update(ema, params)
    with pytest.raises(ValueError, match="ema_params: no EmaState or TrackCoinEmaState"):
        avg.ema_params(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="swa_params: found 2 states"):
        avg.swa_params((swa, swa))
    assert_trees_equal(avg.swa_params((swa, swa), index=1), swa.average)
    with pytest.raises(TypeError, match=r"lawa_params\(index=...\)"):
        avg.lawa_params((lawa, lawa), index="first")
    with pytest.raises(ValueError, match="ema_params: `params` does not have the structure"):
        avg.ema_params(ema, {"v": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=r"swa_params: leaf 'w' has shape \(4,\) in `params` but \(3,\)"
    ):
        avg.swa_params(swa, {"w": jnp.ones(4)})


def test_errors_ema():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"ema_init\(dtype=...\) must be None or a floating dtype"):
        avg.ema_init(params, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"ema_init\(dtype=...\) must be None or a floating dtype"):
        avg.ema_init(params, dtype="not a dtype")
    state = avg.ema_init(params)
    with pytest.raises(
        ValueError, match=r"ema_update\(decay=...\) must be in \[0.0, 1.0\], got 1.5"
    ):
        avg.ema_update(state, params, decay=1.5)
    with pytest.raises(ValueError, match=r"ema_update\(debias=..., warmup=...\) are exclusive"):
        avg.ema_update(state, params, decay=0.5, debias=True, warmup=True)
    with pytest.raises(
        ValueError, match=r"ema_update: leaf 'w' has shape \(2,\) in `params` but \(3,\) in `ema`"
    ):
        avg.ema_update(state, {"w": jnp.ones(2)}, decay=0.5)
    with pytest.raises(
        ValueError, match=r"track_ema\(decay=...\) must be in \[0.0, 1.0\], got -0.1"
    ):
        avg.track_ema(-0.1)
    with pytest.raises(TypeError, match=r"track_ema\(every=...\) must be an int"):
        avg.track_ema(0.9, 2.0)
    with pytest.raises(ValueError, match=r"track_ema\(every=...\) must be >= 1, got 0"):
        avg.track_ema(0.9, 0)
    with pytest.raises(ValueError, match=r"track_ema\(debias=..., warmup=...\) are exclusive"):
        avg.track_ema(0.9, debias=True, warmup=True)
    with pytest.raises(ValueError, match=r"track_ema\(dtype=...\)"):
        avg.track_ema(0.9, dtype=jnp.int8)


def test_errors_swa_lawa():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"swa_init\(dtype=...\)"):
        avg.swa_init(params, dtype=jnp.bool_)
    with pytest.raises(
        ValueError,
        match=r"swa_update: leaf 'w' has shape \(2,\) in `params` but \(3,\) in `average`",
    ):
        avg.swa_update(avg.swa_init(params), {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"track_swa\(start_step=...\) must be >= 0, got -1"):
        avg.track_swa(-1)
    with pytest.raises(ValueError, match=r"track_swa\(every=...\) must be >= 1, got 0"):
        avg.track_swa(0, 0)
    with pytest.raises(ValueError, match=r"track_swa\(dtype=...\)"):
        avg.track_swa(dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"lawa_init\(capacity=...\) must be >= 1, got 0"):
        avg.lawa_init(params, capacity=0)
    with pytest.raises(TypeError, match=r"lawa_init\(capacity=...\) must be an int"):
        avg.lawa_init(params, capacity=2.5)
    state = avg.lawa_init(params, capacity=2)
    with pytest.raises(ValueError, match="lawa_update: `params` has a different tree structure"):
        avg.lawa_update(state, {"v": jnp.ones(3)})
    with pytest.raises(
        ValueError,
        match=r"lawa_update: leaf 'w' has shape \(4,\) in `params` but \(3,\) in the snapshots",
    ):
        avg.lawa_update(state, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"track_lawa\(capacity=...\) must be >= 1"):
        avg.track_lawa(0)
    with pytest.raises(ValueError, match=r"track_lawa\(every=...\) must be >= 1"):
        avg.track_lawa(2, 0)


@pytest.mark.parametrize(
    "tx",
    [avg.track_ema(0.9), avg.track_swa(), avg.track_lawa(2), avg.track_coin_ema(optax.sgd(0.1))],
    ids=["ema", "swa", "lawa", "coin"],
)
def test_errors_transforms_need_params(tx):
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r": `update` needs `params`"):
        tx.update(params, tx.init(params), None)


def test_errors_coin_losses_bcwi():
    with pytest.raises(
        TypeError, match=r"track_coin_ema\(inner=...\) must be an optax GradientTransformation"
    ):
        avg.track_coin_ema(0.9)
    with pytest.raises(
        ValueError, match=r"track_coin_ema\(fallback_decay=...\) must be in \[0.0, 1.0\]"
    ):
        avg.track_coin_ema(optax.sgd(0.1), fallback_decay=1.5)
    with pytest.raises(ValueError, match=r"track_coin_ema\(dtype=...\)"):
        avg.track_coin_ema(optax.sgd(0.1), dtype=jnp.int32)
    with pytest.raises(
        ValueError, match=r"ilora_consistency_loss: leaf 'h' has shape \(2,\) in `stable_hidden`"
    ):
        avg.ilora_consistency_loss({"h": jnp.ones(3)}, {"h": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"zscl_distillation_loss\(temperature=...\) must be in \(0.0, inf\]"
    ):
        avg.zscl_distillation_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.0)
    with pytest.raises(
        ValueError,
        match=r"zscl_distillation_loss: `logits` has shape \(2, 3\) but `reference_logits` has \(3, 2\)",
    ):
        avg.zscl_distillation_loss(jnp.ones((2, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="zscl_distillation_loss: `logits` is a scalar"):
        avg.zscl_distillation_loss(jnp.ones(()), jnp.ones(()))
    old = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="bcwi_interpolate: no new model given"):
        avg.bcwi_interpolate(old, alpha=0.5)
    with pytest.raises(
        ValueError, match=r"bcwi_interpolate\(alpha=...\) must be in \[0.0, 1.0\], got 2.0"
    ):
        avg.bcwi_interpolate(old, old, alpha=2.0)
    with pytest.raises(
        ValueError,
        match=r"bcwi_interpolate: leaf 'w' has shape \(2,\) in `new\[1\]` but \(3,\) in `old`",
    ):
        avg.bcwi_interpolate(old, old, {"w": jnp.ones(2)}, alpha=0.5)
    with pytest.raises(
        ValueError, match=r"bcwi_interpolate: leaf 'w' has shape \(2,\) in `old_importance`"
    ):
        avg.bcwi_interpolate(old, old, alpha=0.5, old_importance={"w": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"bcwi_interpolate: `new_importance` has a different tree structure"
    ):
        avg.bcwi_interpolate(old, old, alpha=0.5, new_importance={"v": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=r"negative_flip_rate: `new_predictions` has shape \(4, 2, 3\)"
    ):
        avg.negative_flip_rate(jnp.zeros(4), jnp.zeros((4, 2, 3)), jnp.zeros(4))
