"""Tests for `merged_lora`: LoRA trained on merged weights, adapters in the optimizer state.

References: training `lora_init` factors through `lora_apply` with autodiff (optax on the
factors, the bases frozen), and a float64 NumPy transcription of one step with SGD.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import cljax

PARAMS = {
    "w1": jax.random.normal(jax.random.key(0), (6, 5)),
    "b": jnp.zeros(5),
    "w2": jax.random.normal(jax.random.key(1), (5, 3)),
}
X = jax.random.normal(jax.random.key(2), (16, 6))
Y = jax.random.normal(jax.random.key(3), (16, 3))


def _loss(p):
    return jnp.mean((jnp.tanh(X @ p["w1"] + p["b"][None]) @ p["w2"] - Y) ** 2)


_grad = jax.jit(jax.grad(_loss))


def _lora_reference(steps, inner, rank, alpha, seed, lora=None):
    """Trains `lora_init` factors through `lora_apply` (the re-parameterised model)."""
    if lora is None:
        lora = cljax.lora_init(jax.random.key(seed), PARAMS, rank=rank, alpha=alpha)
    tx = optax.multi_transform(
        {"lora": inner, "frozen": optax.set_to_zero()}, cljax.lora_labels(lora)
    )
    state = tx.init(lora)
    grad = jax.jit(jax.grad(lambda q: _loss(cljax.lora_apply(q))))
    for _ in range(steps):
        u, state = tx.update(grad(lora), state, lora)
        lora = optax.apply_updates(lora, u)
    return lora


def _merged(steps, tx, params=PARAMS, state=None):
    state = tx.init(params) if state is None else state
    update = jax.jit(tx.update)
    for _ in range(steps):
        u, state = update(_grad(params), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_lora_trained_through_the_reparameterised_model(rslora):
    steps = 30
    lora = cljax.lora_init(jax.random.key(7), PARAMS, rank=2, alpha=4.0, rslora=rslora)
    ref = cljax.lora_apply(_lora_reference(steps, optax.adam(1e-2), 2, 4.0, 7, lora))
    tx = cljax.merged_lora(optax.adam(1e-2), rank=2, alpha=4.0, rslora=rslora, seed=7)
    got, state = _merged(steps, tx)
    for k in PARAMS:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5, err_msg=k)
    np.testing.assert_array_equal(got["b"], PARAMS["b"])  # frozen: no adapter on vectors
    assert float(_loss(got)) < 0.7 * float(_loss(PARAMS))
    # The state's factors are the reference's.
    trained = _lora_reference(steps, optax.adam(1e-2), 2, 4.0, 7, lora)
    np.testing.assert_allclose(state.a["w1"], trained["w1"].a, atol=1e-5)
    np.testing.assert_allclose(state.b["w2"], trained["w2"].b, atol=1e-5)


def test_one_sgd_step_against_numpy():
    lr, alpha, r = 0.1, 3.0, 2
    tx = cljax.merged_lora(optax.sgd(lr), rank=r, alpha=alpha, seed=3)
    state = tx.init(PARAMS)
    g = _grad(PARAMS)
    u, new = tx.update(g, state)
    s = alpha / r
    for k in ("w1", "w2"):
        a, b, G = (np.asarray(t, np.float64) for t in (state.a[k], state.b[k], g[k]))
        a1 = a - lr * s * G @ b.T
        b1 = b - lr * s * a.T @ G
        np.testing.assert_allclose(u[k], s * (a1 @ b1 - a @ b), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(new.a[k], a1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(new.b[k], b1, rtol=1e-6, atol=1e-7)
    assert u["w1"].dtype == PARAMS["w1"].dtype


def test_stacked_leaves_get_one_adapter_per_matrix_and_the_update_has_rank_r():
    params = {"stack": jax.random.normal(jax.random.key(4), (3, 7, 5))}
    tx = cljax.merged_lora(optax.sgd(1.0), rank=2, seed=1)
    state = tx.init(params)
    assert state.a["stack"].shape == (3, 7, 2) and state.b["stack"].shape == (3, 2, 5)
    g = {"stack": jax.random.normal(jax.random.key(5), (3, 7, 5))}
    u, _ = tx.update(g, state)
    for i in range(3):
        assert np.linalg.matrix_rank(np.asarray(u["stack"][i], np.float64), tol=1e-5) <= 2
        # b = 0 at init: the first step is s * (-lr s G b0^T ... ) = s * a0 db = -s^2 a0 a0^T G.
        a0 = np.asarray(state.a["stack"][i], np.float64)
        want = -(a0 @ a0.T @ np.asarray(g["stack"][i], np.float64))
        np.testing.assert_allclose(u["stack"][i], want, rtol=1e-5, atol=1e-6)


def test_reset_starts_a_fresh_adapter_and_inner_state_without_changing_the_model():
    tx = cljax.merged_lora(optax.adam(1e-2), rank=2, seed=0)
    params, state = _merged(5, tx)
    assert int(cljax.find_state(state, optax.ScaleByAdamState).count) == 5
    reset = cljax.merged_lora_reset(state)
    assert bool(reset.pending) and not bool(state.pending)
    # The next update is LoRA's first step from a new adapter on the merged model: factors drawn
    # from fold_in(key(seed), 1) (`lora_init`'s draw), a fresh Adam state.
    u, after = tx.update(_grad(params), reset, params)
    assert int(after.resets) == 1 and not bool(after.pending)
    lora = cljax.lora_init(jax.random.fold_in(jax.random.key(0), 1), params, rank=2)
    trained = _lora_reference(1, optax.adam(1e-2), 2, None, 0, lora)
    ref = cljax.lora_apply(trained)
    got = optax.apply_updates(params, u)
    for k in PARAMS:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, err_msg=k)
    for k in ("w1", "w2"):
        np.testing.assert_allclose(after.a[k], trained[k].a, atol=1e-6)
        np.testing.assert_allclose(after.b[k], trained[k].b, atol=1e-6)
    assert int(cljax.find_state(after, optax.ScaleByAdamState).count) == 1


def test_reset_finds_its_state_in_a_chain_and_raises_without_one():
    tx = optax.chain(optax.clip(1.0), cljax.merged_lora(optax.sgd(0.1), rank=1))
    state = cljax.merged_lora_reset(tx.init(PARAMS))
    assert bool(cljax.find_state(state, cljax.MergedLoraState).pending)
    with pytest.raises(ValueError, match="merged_lora_reset: .*MergedLoraState"):
        cljax.merged_lora_reset(optax.adam(1e-3).init(PARAMS))


def test_others_train_runs_inner_on_the_leaves_without_an_adapter_and_keeps_it_over_resets():
    tx = cljax.merged_lora(optax.sgd(0.5), rank=1, others="train", targets=cljax.select("w1"))
    state = tx.init(PARAMS)
    g = _grad(PARAMS)
    u, state = tx.update(g, state)
    np.testing.assert_allclose(u["b"], -0.5 * g["b"], rtol=1e-6)
    np.testing.assert_allclose(u["w2"], -0.5 * g["w2"], rtol=1e-6)
    assert state.a["w2"] is None and state.a["w1"].shape == (6, 1)
    frozen = cljax.merged_lora(optax.sgd(0.5), rank=1, targets=cljax.select("w1"))
    u, _ = frozen.update(g, frozen.init(PARAMS))
    np.testing.assert_array_equal(u["w2"], 0.0)


def test_bfloat16_parameters_keep_float32_factors_and_their_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = cljax.merged_lora(optax.adam(1e-2), rank=2)
    state = tx.init(params)
    assert state.a["w1"].dtype == jnp.float32
    u, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@settings(deadline=None, max_examples=4)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    rank=st.integers(1, 8),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
)
def test_finite_for_any_shape_rank_and_gradient_scale(m, n, rank, scale):
    params = {"w": jnp.ones((m, n))}
    tx = cljax.merged_lora(optax.adam(1e-2), rank=rank, alpha=2.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(2):
        u, state = update({"w": jnp.full((m, n), scale, jnp.float32)}, state)
        assert u["w"].shape == (m, n)
        assert bool(jnp.all(jnp.isfinite(u["w"])))
    if scale == 0.0:
        np.testing.assert_array_equal(u["w"], 0.0)


def test_validation():
    with pytest.raises(ValueError, match=r"merged_lora\(rank=...\)"):
        cljax.merged_lora(optax.sgd(0.1), rank=0)
    with pytest.raises(ValueError, match=r"merged_lora\(init=...\) must be"):
        cljax.merged_lora(optax.sgd(0.1), rank=1, init="svd_form")
    with pytest.raises(ValueError, match=r"merged_lora\(others=...\)"):
        cljax.merged_lora(optax.sgd(0.1), rank=1, others="some")
    with pytest.raises(ValueError, match=r"merged_lora\(alpha=...\)"):
        cljax.merged_lora(optax.sgd(0.1), rank=1, alpha=0.0)
    with pytest.raises(ValueError, match="leaf 'b' has shape \\(5,\\)"):
        cljax.merged_lora(
            optax.sgd(0.1), rank=1, targets=lambda p: jax.tree.map(lambda _: True, p)
        ).init(PARAMS)
