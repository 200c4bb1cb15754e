"""Tests for RG-05 (spectral and Wasserstein penalties), RG-07 (AQC) and RG-08 (LwF).

References: NumPy's SVD for the spectral norm, `jax.grad` of each penalty's loss form (through
`jnp.linalg.norm(·, 2)` and `jnp.sort`), a NumPy rank-matching gradient, exact Hessians of
quadratic losses, and the float64 KL divergence of the softened distributions.
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

# ---------------------------------------------------------------------------------------------
# RG-05: spectral penalty.

_SPEC = cljax.add_spectral_penalty(0.3)
_SPEC_STEP = jax.jit(_SPEC.update)


def test_power_iteration_converges_to_the_spectral_norm_and_the_gradient_to_autodiff():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
        "stack": jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
    }
    grads = jax.tree.map(jnp.zeros_like, params)
    state = _SPEC.init(params)
    for _ in range(60):
        out, state = _SPEC_STEP(grads, state, params)
    np.testing.assert_allclose(
        state.sigma["w"], [np.linalg.norm(np.float64(params["w"]), 2)], rtol=1e-5
    )
    np.testing.assert_allclose(
        state.sigma["stack"], [np.linalg.norm(np.float64(m), 2) for m in params["stack"]], rtol=1e-5
    )
    assert state.vectors["b"] is None
    assert_trees_equal(out["b"], grads["b"])  # 1-D leaves pass unchanged

    def penalty(p):
        sig_w = jnp.linalg.norm(p["w"], 2)
        sig_s = jnp.stack([jnp.linalg.norm(m, 2) for m in p["stack"]])
        return 0.3 * ((sig_w**2 - 1) ** 2 + jnp.sum((sig_s**2 - 1) ** 2))

    autodiff = jax.jit(jax.grad(penalty))(params)
    assert_trees_close(
        {k: out[k] for k in ("w", "stack")},
        {k: autodiff[k] for k in ("w", "stack")},
        rtol=1e-3,
        atol=1e-4,
    )


def test_spectral_penalty_vanishes_at_unit_spectral_norm_and_stays_finite_at_zero():
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((5, 5)))
    params = {"w": jnp.asarray(q[:, :3], jnp.float32), "z": jnp.zeros((3, 2))}
    state = _SPEC.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        out, state = _SPEC_STEP(grads, state, params)
    np.testing.assert_allclose(out["w"], 1.0, atol=1e-5)  # σ_max = 1 for orthonormal columns
    np.testing.assert_array_equal(out["z"], 1.0)  # zero matrix: zero penalty gradient, finite
    assert bool(jnp.all(jnp.isfinite(state.vectors["z"])))


def test_spectral_penalty_errors():
    with pytest.raises(ValueError, match=r"add_spectral_penalty\(strength=...\) must be in"):
        cljax.add_spectral_penalty(-1.0)
    with pytest.raises(ValueError, match=r"add_spectral_penalty\(power=...\) must be >= 1"):
        cljax.add_spectral_penalty(1.0, power=0)
    with pytest.raises(
        TypeError, match=r"add_spectral_penalty\(spec=...\) must be a cljax.MatrixSpec"
    ):
        cljax.add_spectral_penalty(1.0, spec=(0, 1))
    with pytest.raises(TypeError, match=r"add_spectral_penalty\(seed=...\) must be an int"):
        cljax.add_spectral_penalty(1.0, seed=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# RG-05: Wasserstein penalty.


@pytest.mark.parametrize("n", [1, 7])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_wasserstein_gradient_matches_rank_matching_and_autodiff(n, seed):
    rng = np.random.default_rng(seed)
    init = {"x": jnp.asarray(rng.standard_normal((n, 2)), jnp.float32)}
    theta = {"x": jnp.asarray(rng.standard_normal((n, 2)), jnp.float32)}
    lam = 0.7
    tx = cljax.add_wasserstein_penalty(lam)
    state = tx.init(init)
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, theta), state, theta)
    flat, ref = np.float64(theta["x"]).ravel(), np.sort(np.float64(init["x"]).ravel())
    target = np.empty_like(flat)
    target[np.argsort(flat, kind="stable")] = ref
    want = (2 * lam / flat.size) * (flat - target)
    np.testing.assert_allclose(np.asarray(out["x"]).ravel(), want, rtol=1e-5, atol=1e-7)
    loss = lambda p: lam * jnp.mean((jnp.sort(p["x"].ravel()) - jnp.sort(init["x"].ravel())) ** 2)
    np.testing.assert_allclose(out["x"], jax.grad(loss)(theta)["x"], rtol=1e-5, atol=1e-7)
    # Zero at init and for any permutation of the initial values.
    perm = {"x": jnp.asarray(rng.permutation(np.asarray(init["x"]).ravel()).reshape(n, 2))}
    for p in (init, perm):
        out, _ = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
        np.testing.assert_array_equal(out["x"], 0.0)


def test_wasserstein_errors():
    with pytest.raises(ValueError, match=r"add_wasserstein_penalty\(strength=...\) must be in"):
        cljax.add_wasserstein_penalty(-0.5)


# ---------------------------------------------------------------------------------------------
# RG-07: AQC.


def test_aqc_reproduces_a_quadratic_previous_loss_and_accumulates_hessians():
    rng = np.random.default_rng(2)
    a1, a2 = (rng.standard_normal((5, 5)) for _ in range(2))
    h1, h2 = a1 @ a1.T, a2 @ a2.T  # positive semi-definite
    c1, c2 = rng.standard_normal(5), rng.standard_normal(5)
    split = lambda v: {
        "a": jnp.asarray(v[:3].reshape(3, 1), jnp.float32),
        "b": jnp.asarray(v[3:], jnp.float32),
    }
    flat = lambda p: jnp.concatenate([p["a"].ravel(), p["b"]])
    loss1 = lambda p, _: 0.5 * (flat(p) - c1) @ jnp.asarray(h1, jnp.float32) @ (flat(p) - c1)
    loss2 = lambda p, _: 0.5 * (flat(p) - c2) @ jnp.asarray(h2, jnp.float32) @ (flat(p) - c2)
    tx = cljax.aqc()
    add_task = jax.jit(cljax.aqc_add_task, static_argnums=(2,), static_argnames=("damping",))
    state = tx.init(split(c1))
    state = add_task(state, split(c1), loss1, None)
    np.testing.assert_allclose(state.hessian, h1, rtol=1e-5, atol=1e-5)
    theta = rng.standard_normal(5)
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, split(theta)), state, split(theta))
    np.testing.assert_allclose(
        flat(out), h1 @ (theta - c1), rtol=1e-4, atol=1e-4
    )  # = ∇ loss1 exactly
    end2 = rng.standard_normal(5)
    state = add_task(state, split(end2), loss2, None, damping=0.5)
    np.testing.assert_allclose(state.hessian, h1 + h2 + 0.5 * np.eye(5), rtol=1e-5, atol=1e-5)
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, split(theta)), state, split(theta))
    np.testing.assert_allclose(
        flat(out), (h1 + h2 + 0.5 * np.eye(5)) @ (theta - end2), rtol=1e-4, atol=1e-4
    )


def test_aqc_on_a_masked_head_takes_the_hessian_over_the_head_only():
    rng = np.random.default_rng(3)
    params = {
        "body": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "head": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
    }
    x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 6))

    def loss(p, batch):
        feats = jnp.tanh(batch[0] @ p["body"])
        logp = jax.nn.log_softmax(feats @ p["head"])
        return -jnp.mean(logp[jnp.arange(6), batch[1]])

    tx = optax.masked(cljax.aqc(), {"body": False, "head": True})
    state = jax.jit(cljax.aqc_add_task, static_argnums=(2,))(tx.init(params), params, loss, (x, y))
    head_only = lambda h: loss({"body": params["body"], "head": h.reshape(4, 2)}, (x, y))
    want = jax.jit(jax.hessian(head_only))(params["head"].ravel())
    np.testing.assert_allclose(
        cljax.find_state(state, cljax.AqcState).hessian, want, rtol=1e-5, atol=1e-6
    )
    g = jax.tree.map(jnp.ones_like, params)
    out, _ = tx.update(g, state, params)
    assert_trees_equal(out, g)  # at the anchor: identity


def test_aqc_errors():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"aqc\(strength=...\) must be in"):
        cljax.aqc(-1.0)
    with pytest.raises(ValueError, match=r"aqc_add_task\(damping=...\) must be in"):
        cljax.aqc_add_task(cljax.aqc().init(params), params, lambda p, b: 0.0, None, damping=-1.0)
    with pytest.raises(ValueError, match="aqc_add_task: no AqcState"):
        cljax.aqc_add_task(optax.sgd(0.1).init(params), params, lambda p, b: 0.0, None)


# ---------------------------------------------------------------------------------------------
# RG-08: LwF.


def np_kl(new, old, t):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(old / t), log_softmax(new / t)
    return np.mean(np.sum(np.exp(lp) * (lp - lq), -1))


def test_lwf_distillation_loss_matches_kl_and_has_the_softened_gradient():
    rng = np.random.default_rng(4)
    new = rng.standard_normal((5, 3)).astype(np.float32)
    old = rng.standard_normal((5, 3)).astype(np.float32)
    got = cljax.lwf_distillation_loss(new, old)
    np.testing.assert_allclose(got, np_kl(np.float64(new), np.float64(old), 2.0), rtol=1e-5)
    scaled = cljax.lwf_distillation_loss(
        new, old, temperature=3.0, scale_by_temperature_squared=True
    )
    np.testing.assert_allclose(
        scaled, 9.0 * np_kl(np.float64(new), np.float64(old), 3.0), rtol=1e-5
    )
    assert float(cljax.lwf_distillation_loss(new, new)) == pytest.approx(0.0, abs=1e-7)
    d_new, d_old = jax.grad(lambda a, b: cljax.lwf_distillation_loss(a, b), argnums=(0, 1))(
        new, old
    )
    soft = lambda z: np.exp(z / 2) / np.exp(z / 2).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        d_new, (soft(np.float64(new)) - soft(np.float64(old))) / (2 * 5), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_array_equal(d_old, 0.0)


def test_lwf_errors():
    with pytest.raises(ValueError, match=r"lwf_distillation_loss\(temperature=...\) must be in"):
        cljax.lwf_distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=0.0)
    with pytest.raises(
        ValueError,
        match="lwf_distillation_loss: `logits` has shape \\(2, 3\\) and `old_logits` \\(2, 4\\)",
    ):
        cljax.lwf_distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match=r"scale_by_temperature_squared=...\) must be a bool"):
        cljax.lwf_distillation_loss(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), scale_by_temperature_squared=1
        )
