"""Tests for the anchored penalties: RG-01 (EWC, online EWC), RG-02 (L2 to an anchor), RG-03 (SI)
and RG-04 (MAS) with their task-boundary functions.

References are float64 NumPy transcriptions of each card's rule (the penalty gradient, the
boundary updates, SI's path integral over a whole trajectory) and `jax.grad` of the paper's loss
form; then the cards' invariants, errors and a few hypothesis properties.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

SHAPES = {"w": (4, 3), "b": (3,), "s": ()}


def normal_tree(rng, shapes=SHAPES, scale=1.0):
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in shapes.items()}


def positive_tree(rng, shapes=SHAPES):
    return {k: np.asarray(rng.uniform(0.1, 2.0, s), np.float32) for k, s in shapes.items()}


def jnp_tree(tree):
    return jax.tree.map(jnp.asarray, tree)


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# RG-01: EWC.


def np_ewc_grad(g, theta, pairs, lam):
    """Σ_k λ F_k (θ − θ*_k) added to g, float64."""
    out = {k: np.asarray(g[k], np.float64).copy() for k in g}
    for anchor, fisher in pairs:
        for k in out:
            out[k] += lam * np.float64(fisher[k]) * (np.float64(theta[k]) - np.float64(anchor[k]))
    return out


def test_ewc_penalty_gradient_equals_fisher_times_offset_and_autodiff():
    rng = np.random.default_rng(0)
    anchor, fisher, theta, g = (
        normal_tree(rng),
        positive_tree(rng),
        normal_tree(rng),
        normal_tree(rng),
    )
    lam = 3.0
    tx = cljax.ewc(lam)
    state = cljax.ewc_consolidate(tx.init(jnp_tree(theta)), jnp_tree(anchor), jnp_tree(fisher))
    out, _ = tx.update(jnp_tree(g), state, jnp_tree(theta))
    assert_trees_close(out, np_ewc_grad(g, theta, [(anchor, fisher)], lam))

    def loss(params):  # the paper's form, with the 1/2
        return sum(0.5 * lam * jnp.sum(fisher[k] * (params[k] - anchor[k]) ** 2) for k in params)

    autodiff = jax.grad(loss)(jnp_tree(theta))
    penalty = jax.tree.map(lambda o, gg: o - gg, out, jnp_tree(g))
    assert_trees_close(penalty, autodiff, rtol=1e-5, atol=1e-5)


def test_ewc_is_identity_before_consolidation_at_the_anchor_and_for_zero_strength():
    rng = np.random.default_rng(1)
    theta, g, fisher = (
        jnp_tree(normal_tree(rng)),
        jnp_tree(normal_tree(rng)),
        jnp_tree(positive_tree(rng)),
    )
    tx = cljax.ewc(5.0)
    state = tx.init(theta)
    assert_trees_equal(tx.update(g, state, theta)[0], g)  # nothing consolidated yet
    at_anchor = cljax.ewc_consolidate(state, theta, fisher)
    assert_trees_equal(tx.update(g, at_anchor, theta)[0], g)  # θ = θ*
    zero = cljax.ewc(0.0)
    moved = jax.tree.map(lambda x: x + 1.0, theta)
    assert_trees_equal(
        zero.update(g, cljax.ewc_consolidate(zero.init(theta), theta, fisher), moved)[0], g
    )


def test_ewc_separate_mode_sums_one_penalty_per_task():
    rng = np.random.default_rng(2)
    lam, tasks = 0.7, [(normal_tree(rng), positive_tree(rng)) for _ in range(3)]
    theta, g = normal_tree(rng), normal_tree(rng)
    tx = cljax.ewc(lam, capacity=3)
    state = tx.init(jnp_tree(theta))
    for i, (anchor, fisher) in enumerate(tasks):
        state = cljax.ewc_consolidate(state, jnp_tree(anchor), jnp_tree(fisher))
        assert int(state.count) == i + 1
        out, _ = tx.update(jnp_tree(g), state, jnp_tree(theta))
        assert_trees_close(out, np_ewc_grad(g, theta, tasks[: i + 1], lam), err=f"after task {i}:")


def test_ewc_online_accumulates_decayed_fisher_and_moves_the_anchor():
    rng = np.random.default_rng(3)
    lam, gamma = 2.0, 0.8
    tasks = [(normal_tree(rng), positive_tree(rng)) for _ in range(3)]
    theta, g = normal_tree(rng), normal_tree(rng)
    tx = cljax.ewc(lam, online=True, decay=gamma)
    state = tx.init(jnp_tree(theta))
    fisher_ref = {k: np.zeros(s) for k, s in SHAPES.items()}
    for anchor, fisher in tasks:
        state = cljax.ewc_consolidate(state, jnp_tree(anchor), jnp_tree(fisher))
        fisher_ref = {k: gamma * fisher_ref[k] + f64(fisher)[k] for k in fisher_ref}
        assert int(state.count) == 1
        assert_trees_close(jax.tree.map(lambda x: x[0], state.fishers), fisher_ref)
        assert_trees_equal(jax.tree.map(lambda x: x[0], state.anchors), jnp_tree(anchor))
        out, _ = tx.update(jnp_tree(g), state, jnp_tree(theta))
        assert_trees_close(out, np_ewc_grad(g, theta, [(anchor, fisher_ref)], lam))


def test_ewc_separate_with_one_task_equals_online():
    rng = np.random.default_rng(4)
    anchor, fisher, theta, g = (jnp_tree(normal_tree(rng)) for _ in range(4))
    fisher = jax.tree.map(jnp.abs, fisher)
    outs = []
    for tx in (cljax.ewc(1.5), cljax.ewc(1.5, online=True, decay=0.5)):
        state = cljax.ewc_consolidate(tx.init(theta), anchor, fisher)
        outs.append(tx.update(g, state, theta)[0])
    assert_trees_equal(outs[0], outs[1])


_EWC3 = cljax.ewc(1.0, capacity=3)
_EWC3_TRACES: list = []


@jax.jit
def _ewc3_step(params, state, grads):
    _EWC3_TRACES.append(None)
    updates, state = _EWC3.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_ewc_adding_tasks_never_recompiles_and_jit_consolidation_past_capacity_is_a_no_op():
    rng = np.random.default_rng(5)
    params = jnp_tree(normal_tree(rng))
    state = _EWC3.init(params)
    consolidate = jax.jit(cljax.ewc_consolidate)
    for _ in range(3):
        params, state = _ewc3_step(params, state, jnp_tree(normal_tree(rng)))
        state = consolidate(state, params, jnp_tree(positive_tree(rng)))
    params, state = _ewc3_step(params, state, jnp_tree(normal_tree(rng)))
    assert len(_EWC3_TRACES) == 1
    assert int(state.count) == 3
    full = consolidate(state, params, jnp_tree(positive_tree(rng)))  # traced: cannot raise
    assert_trees_equal(full, state)
    with pytest.raises(ValueError, match="already holds 3 of its 3 task pairs"):
        cljax.ewc_consolidate(state, params, jnp_tree(positive_tree(rng)))


def test_ewc_in_a_chain_equals_adam_on_the_penalised_loss():
    """Coupled form: chain(ewc, adam) is Adam on the gradient of loss + (λ/2) Σ F (θ − θ*)²."""
    rng = np.random.default_rng(6)
    target, anchor, fisher = normal_tree(rng), normal_tree(rng), positive_tree(rng)
    lam = 0.5
    task_loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
    full_loss = lambda p: (
        task_loss(p) + sum(0.5 * lam * jnp.sum(fisher[k] * (p[k] - anchor[k]) ** 2) for k in p)
    )
    params = jnp_tree(normal_tree(rng))
    with jax.numpy_dtype_promotion("standard"):
        tx = optax.chain(cljax.ewc(lam), optax.adam(0.05))
        state = cljax.ewc_consolidate(tx.init(params), jnp_tree(anchor), jnp_tree(fisher))
        ref, ref_state, p = optax.adam(0.05), None, params
        ref_state = ref.init(p)
        for _ in range(4):
            u, state = tx.update(jax.grad(task_loss)(params), state, params)
            params = optax.apply_updates(params, u)
            v, ref_state = ref.update(jax.grad(full_loss)(p), ref_state, p)
            p = optax.apply_updates(p, v)
    assert_trees_close(params, p, rtol=1e-5, atol=1e-6)


def test_ewc_under_masked_skips_unmasked_leaves():
    rng = np.random.default_rng(7)
    theta, g = jnp_tree(normal_tree(rng)), jnp_tree(normal_tree(rng))
    mask = {"w": True, "b": False, "s": True}
    tx = optax.masked(cljax.ewc(1.0), mask)
    state = tx.init(theta)
    inner = cljax.find_state(state, cljax.EwcState)
    assert isinstance(inner.anchors["b"], optax.MaskedNode)
    anchor = jax.tree.map(jnp.zeros_like, theta)
    fisher = jax.tree.map(jnp.ones_like, theta)
    state = cljax.ewc_consolidate(state, anchor, fisher)
    out, _ = tx.update(g, state, theta)
    np.testing.assert_array_equal(out["b"], g["b"])
    np.testing.assert_allclose(out["w"], g["w"] + theta["w"], rtol=1e-6)


_EWC1 = cljax.ewc(1.0)


@jax.jit
def _ewc1_consolidated_update(params, fisher, grads):
    state = cljax.ewc_consolidate(_EWC1.init(params), jax.tree.map(jnp.zeros_like, params), fisher)
    return _EWC1.update(grads, state, params)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=6, deadline=None)
@given(scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]), seed=st.integers(0, 2**31 - 1))
def test_ewc_output_is_finite_and_keeps_the_dtype(dtype, scale, seed):
    rng = np.random.default_rng(seed)
    params = {"x": jnp.asarray(rng.standard_normal((3, 2)), dtype)}
    fisher = {"x": jnp.asarray(scale * rng.uniform(size=(3, 2)), jnp.float32)}
    out = _ewc1_consolidated_update(params, fisher, {"x": jnp.zeros((3, 2), dtype)})
    assert out["x"].dtype == jnp.dtype(dtype)
    if scale <= 1.0:
        assert bool(jnp.all(jnp.isfinite(out["x"].astype(jnp.float32))))


def test_ewc_argument_errors():
    with pytest.raises(ValueError, match=r"ewc\(strength=...\) must be in"):
        cljax.ewc(-1.0)
    with pytest.raises(ValueError, match=r"ewc\(decay=...\) must be in"):
        cljax.ewc(1.0, online=True, decay=1.5)
    with pytest.raises(ValueError, match="must be 1.0 in separate mode"):
        cljax.ewc(1.0, decay=0.5)
    with pytest.raises(ValueError, match="must be 1 in online mode"):
        cljax.ewc(1.0, online=True, capacity=2)
    with pytest.raises(TypeError, match=r"ewc\(online=...\) must be a bool"):
        cljax.ewc(1.0, online=1)
    with pytest.raises(TypeError, match=r"ewc\(capacity=...\) must be an int"):
        cljax.ewc(1.0, capacity=2.0)
    with pytest.raises(ValueError, match=r"ewc\(capacity=...\) must be >= 1"):
        cljax.ewc(1.0, capacity=0)
    with pytest.raises(TypeError, match=r"ewc\(fisher_dtype=...\) must be a dtype"):
        cljax.ewc(1.0, fisher_dtype=object())
    with pytest.raises(ValueError, match=r"ewc\(fisher_dtype=...\) must be a floating dtype"):
        cljax.ewc(1.0, fisher_dtype="int32")
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="ewc: `update` needs `params`"):
        cljax.ewc(1.0).update(params, cljax.ewc(1.0).init(params), None)


def test_ewc_consolidate_errors():
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    state = cljax.ewc(1.0).init(params)
    with pytest.raises(ValueError, match="ewc_consolidate: no EwcState in `opt_state`"):
        cljax.ewc_consolidate(optax.sgd(0.1).init(params), params, params)
    two = (state, state)
    with pytest.raises(ValueError, match="holds 2 states of type EwcState; pass `index=`"):
        cljax.ewc_consolidate(two, params, params)
    out = cljax.ewc_consolidate(two, params, params, index=1)
    assert int(out[1].count) == 1 and int(out[0].count) == 0
    with pytest.raises(ValueError, match=r"ewc_consolidate\(index=...\) must be in \[0, 2\)"):
        cljax.ewc_consolidate(two, params, params, index=2)
    with pytest.raises(TypeError, match=r"ewc_consolidate\(index=...\) must be an int"):
        cljax.ewc_consolidate(two, params, params, index="0")
    with pytest.raises(ValueError, match="`fisher` does not have the structure"):
        cljax.ewc_consolidate(state, params, {"w": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"leaf 'b' has shape \(4,\) in `params` but the state holds \(3,\)"
    ):
        cljax.ewc_consolidate(state, {"w": jnp.ones(2), "b": jnp.ones(4)}, params)
    with pytest.raises(ValueError, match="leaf 'w' of `fisher` has minimum -1.0"):
        cljax.ewc_consolidate(state, params, {"w": -jnp.ones(2), "b": jnp.ones(3)})


# ---------------------------------------------------------------------------------------------
# RG-02: L2 to an anchor.


def test_l2_anchor_gradient_equals_autodiff_and_the_anchor_is_replaced_exactly():
    rng = np.random.default_rng(10)
    start, theta, g, later = (jnp_tree(normal_tree(rng)) for _ in range(4))
    lam = 0.3
    tx = cljax.l2_anchor(lam)
    state = tx.init(start)
    out, _ = tx.update(g, state, theta)
    want = {k: f64(g)[k] + lam * (f64(theta)[k] - f64(start)[k]) for k in g}
    assert_trees_close(out, want)
    autodiff = jax.grad(lambda p: sum(0.5 * lam * jnp.sum((p[k] - start[k]) ** 2) for k in p))(
        theta
    )
    assert_trees_close(jax.tree.map(jnp.subtract, out, g), autodiff, atol=1e-6)
    state = cljax.l2_anchor_consolidate(state, later)
    assert_trees_equal(state.anchor, later)
    assert_trees_equal(tx.update(g, state, later)[0], g)  # θ = θ*: identity


def test_l2_anchor_state_does_not_alias_donated_params():
    params = {"w": jnp.ones((4, 3))}
    tx = cljax.l2_anchor(1.0)
    state = tx.init(params)
    assert state.anchor["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
    state = cljax.l2_anchor_consolidate(state, params)
    assert state.anchor["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0,))
    new_params, state = step(params, state)
    np.testing.assert_array_equal(state.anchor["w"], np.ones((4, 3)))  # still readable


def test_l2_anchor_mask_leaves_unmasked_leaves_untouched_and_stores_no_anchor():
    rng = np.random.default_rng(11)
    theta, g = jnp_tree(normal_tree(rng)), jnp_tree(normal_tree(rng))
    tx = cljax.l2_anchor(1.0, mask=cljax.select("^w$"))
    state = tx.init(jax.tree.map(jnp.zeros_like, theta))
    inner = cljax.find_state(state, cljax.L2AnchorState)
    assert isinstance(inner.anchor["b"], optax.MaskedNode)
    out, _ = tx.update(g, state, theta)
    np.testing.assert_array_equal(out["b"], g["b"])
    np.testing.assert_array_equal(out["s"], g["s"])
    np.testing.assert_allclose(out["w"], g["w"] + theta["w"], rtol=1e-6)
    state = cljax.l2_anchor_consolidate(state, theta)
    np.testing.assert_array_equal(
        cljax.find_state(state, cljax.L2AnchorState).anchor["w"], theta["w"]
    )
    np.testing.assert_array_equal(tx.update(g, state, theta)[0]["w"], g["w"])


def test_l2_anchor_errors():
    with pytest.raises(ValueError, match=r"l2_anchor\(strength=...\) must be in"):
        cljax.l2_anchor(-0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="l2_anchor_consolidate: no L2AnchorState"):
        cljax.l2_anchor_consolidate(cljax.ewc(1.0).init(params), params)
    with pytest.raises(
        ValueError, match="l2_anchor_consolidate: `params` does not have the structure"
    ):
        cljax.l2_anchor_consolidate(cljax.l2_anchor(1.0).init(params), {"v": jnp.ones(2)})


# ---------------------------------------------------------------------------------------------
# RG-04: MAS.


def test_mas_penalty_gradient_has_factor_two_and_importance_accumulates():
    rng = np.random.default_rng(20)
    lam = 0.4
    theta, g = normal_tree(rng), normal_tree(rng)
    tx = cljax.mas(lam)
    state = tx.init(jnp_tree(theta))
    assert_trees_equal(tx.update(jnp_tree(g), state, jnp_tree(theta))[0], jnp_tree(g))
    omega_ref = {k: np.zeros(s) for k, s in SHAPES.items()}
    for _ in range(2):
        anchor, omega = normal_tree(rng), positive_tree(rng)
        state = cljax.mas_consolidate(state, jnp_tree(anchor), jnp_tree(omega))
        omega_ref = {k: omega_ref[k] + f64(omega)[k] for k in omega_ref}
        assert_trees_close(state.importance, omega_ref)
        assert_trees_equal(state.anchor, jnp_tree(anchor))
        out, _ = tx.update(jnp_tree(g), state, jnp_tree(theta))
        want = {k: f64(g)[k] + 2 * lam * omega_ref[k] * (f64(theta)[k] - f64(anchor)[k]) for k in g}
        assert_trees_close(out, want)
        loss = lambda p, a=anchor, w=omega_ref: sum(
            lam * jnp.sum(w[k] * (p[k] - a[k]) ** 2) for k in p
        )
        autodiff = jax.grad(loss)(jnp_tree(theta))
        assert_trees_close(
            jax.tree.map(jnp.subtract, out, jnp_tree(g)), autodiff, rtol=1e-5, atol=1e-5
        )


def test_mas_errors():
    with pytest.raises(ValueError, match=r"mas\(strength=...\) must be in"):
        cljax.mas(-1.0)
    params = {"w": jnp.ones(2)}
    state = cljax.mas(1.0).init(params)
    with pytest.raises(ValueError, match="leaf 'w' of `importance` has minimum -1.0"):
        cljax.mas_consolidate(state, params, {"w": -jnp.ones(2)})
    with pytest.raises(ValueError, match="mas_consolidate: no MasState"):
        cljax.mas_consolidate(optax.sgd(1.0).init(params), params, params)


# ---------------------------------------------------------------------------------------------
# RG-03: SI.


class NpAdamUpdate:
    """Float64 Adam returning the final update ``−η m̂ / (√v̂ + ε)``."""

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m, self.v = {}, {}

    def __call__(self, g):
        self.t += 1
        out = {}
        for k, x in g.items():
            self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * x
            self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * x * x
            m_hat = self.m[k] / (1 - self.b1**self.t)
            v_hat = self.v[k] / (1 - self.b2**self.t)
            out[k] = -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return out


def test_si_matches_a_numpy_path_integral_over_two_tasks_with_adam():
    rng = np.random.default_rng(30)
    c, xi, lr = 0.5, 0.1, 0.05
    theta0 = normal_tree(rng)
    targets = [normal_tree(rng), normal_tree(rng)]
    grad_of = lambda p, tgt: {k: 2.0 * (p[k] - tgt[k]) for k in p}

    with jax.numpy_dtype_promotion("standard"):
        tx = cljax.si(optax.adam(lr), strength=c, damping=xi)
        params = jnp_tree(theta0)
        state = tx.init(params)
        adam = NpAdamUpdate(lr)
        p = f64(theta0)
        w = {k: np.zeros(s) for k, s in SHAPES.items()}
        omega = {k: np.zeros(s) for k, s in SHAPES.items()}
        anchor, start = dict(p), dict(p)
        for task, target in enumerate(targets):
            for step in range(5):
                g32 = {
                    k: np.asarray(v, np.float32)
                    for k, v in grad_of(jax.tree.map(np.asarray, params), target).items()
                }
                out, state = tx.update(jnp_tree(g32), state, params)
                params = optax.apply_updates(params, out)
                g = f64(g32)
                penalised = {k: g[k] + 2 * c * omega[k] * (p[k] - anchor[k]) for k in g}
                u = adam(penalised)
                assert_trees_close(out, u, rtol=2e-4, atol=1e-6, err=f"task {task} step {step}:")
                w = {k: w[k] - g[k] * u[k] for k in w}
                p = {k: p[k] + u[k] for k in p}
                assert_trees_close(state.path_integral, w, rtol=1e-4, atol=1e-7)
            state = cljax.si_consolidate(state, params)
            omega = {k: omega[k] + w[k] / ((p[k] - start[k]) ** 2 + xi) for k in omega}
            w = {k: np.zeros_like(w[k]) for k in w}
            anchor, start = dict(p), dict(p)
            assert_trees_close(state.importance, omega, rtol=1e-4, atol=1e-6)
            assert_trees_equal(
                state.path_integral, jax.tree.map(jnp.zeros_like, state.path_integral)
            )
            assert_trees_equal(state.anchor, params)
            assert_trees_equal(state.start, params)


def test_si_one_sgd_step_gives_eta_g_squared_with_the_unpenalised_gradient():
    lr, c = 0.1, 2.0
    params = {"x": jnp.array([1.0, -2.0, 0.5])}
    g = {"x": jnp.array([0.3, -1.0, 2.0])}
    tx = cljax.si(optax.sgd(lr), strength=c)
    state = tx.init(params)
    _, fresh = tx.update(g, state, params)
    np.testing.assert_allclose(fresh.path_integral["x"], lr * np.asarray(g["x"]) ** 2, rtol=1e-6)
    # With a nonzero penalty, w must use g, not g + penalty.
    omega = jnp.array([1.0, 0.5, 2.0])
    state = state._replace(importance={"x": omega}, anchor={"x": jnp.zeros(3)})
    out, new = tx.update(g, state, params)
    penalty = 2 * c * np.asarray(omega) * np.asarray(params["x"])
    np.testing.assert_allclose(out["x"], -lr * (np.asarray(g["x"]) + penalty), rtol=1e-6)
    np.testing.assert_allclose(
        new.path_integral["x"], lr * np.asarray(g["x"]) * (np.asarray(g["x"]) + penalty), rtol=1e-6
    )


def test_si_with_zero_strength_is_the_inner_optimizer():
    rng = np.random.default_rng(31)
    params, g = jnp_tree(normal_tree(rng)), jnp_tree(normal_tree(rng))
    with jax.numpy_dtype_promotion("standard"):
        tx = cljax.si(optax.adam(0.1), strength=0.0)
        state = tx.init(params)
        state = state._replace(
            importance=jax.tree.map(lambda x: jnp.ones_like(x, jnp.float32), params)
        )
        ref = optax.adam(0.1)
        ref_state = ref.init(params)
        for _ in range(2):
            out, state = tx.update(g, state, jax.tree.map(lambda x: x + 1.0, params))
            want, ref_state = ref.update(g, ref_state, params)
            assert_trees_equal(out, want)


def test_si_errors():
    with pytest.raises(TypeError, match=r"si\(inner=...\) must be an optax GradientTransformation"):
        cljax.si(lambda g: g, strength=1.0)
    with pytest.raises(ValueError, match=r"si\(damping=...\) must be in \(0.0, inf\]"):
        cljax.si(optax.sgd(0.1), strength=1.0, damping=0.0)
    with pytest.raises(ValueError, match=r"si\(strength=...\) must be in"):
        cljax.si(optax.sgd(0.1), strength=-1.0)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="si_consolidate: no SiState"):
        cljax.si_consolidate(optax.sgd(0.1).init(params), params)
    with pytest.raises(
        ValueError, match=r"leaf 'w' has shape \(3,\) in `params` but the state holds \(2,\)"
    ):
        cljax.si_consolidate(cljax.si(optax.sgd(0.1), 1.0).init(params), {"w": jnp.ones(3)})
