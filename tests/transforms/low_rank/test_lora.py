"""Tests for the LoRA pytree functions: LR-05 (init, apply, merge and reset, extract), LR-07
(refactorization), LR-08 (PeriodicLoRA stages), LR-09 (CoDyRA gates and prox), LR-12 (FedEx-LoRA).
References are float64 NumPy formulas from the cards."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import cljax
from tests.helpers import assert_trees_close

PARAMS = {
    "dense": jax.random.normal(jax.random.key(0), (6, 4)),
    "stack": jax.random.normal(jax.random.key(1), (2, 5, 3)),
    "bias": jnp.ones(4),
}


def _np(x):
    return np.asarray(x, np.float64)


def _trained(lora, key=5):
    """Random nonzero factors and gates, as after some training."""
    leaves, treedef = jax.tree.flatten(lora, is_leaf=lambda x: isinstance(x, cljax.LoraWeight))
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, cljax.LoraWeight):
            k1, k2, k3 = jax.random.split(jax.random.fold_in(jax.random.key(key), i), 3)
            x = dataclasses.replace(
                x,
                a=jax.random.normal(k1, x.a.shape),
                b=jax.random.normal(k2, x.b.shape),
                gate=None if x.gate is None else jax.random.normal(k3, x.gate.shape),
            )
        out.append(x)
    return treedef.unflatten(out)


def test_init_shapes_scale_and_identity_at_init():
    lora = cljax.lora_init(jax.random.key(2), PARAMS, rank=2, alpha=8.0)
    assert isinstance(lora["dense"], cljax.LoraWeight) and not isinstance(
        lora["bias"], cljax.LoraWeight
    )
    assert lora["dense"].a.shape == (6, 2) and lora["dense"].b.shape == (2, 4)
    assert lora["stack"].a.shape == (2, 5, 2) and lora["stack"].b.shape == (2, 2, 3)
    assert lora["dense"].scale == 4.0
    assert (
        cljax.lora_init(jax.random.key(2), PARAMS, rank=4, alpha=8.0, rslora=True)["dense"].scale
        == 4.0
    )
    bound = 1 / np.sqrt(6)  # kaiming-uniform(a=sqrt(5)) over fan_in = rows = d_in
    assert np.all(np.abs(lora["dense"].a) <= bound) and np.all(lora["dense"].b == 0)
    # B = 0: the adapted model equals the base model exactly.
    for init in ("kaiming_uniform", "gaussian", "svd_form"):
        out = cljax.lora_apply(cljax.lora_init(jax.random.key(2), PARAMS, rank=2, init=init))
        for k in PARAMS:
            np.testing.assert_array_equal(out[k], PARAMS[k])


def test_apply_matches_the_formula_and_a_factored_forward():
    lora = _trained(cljax.lora_init(jax.random.key(2), PARAMS, rank=2, alpha=3.0, gates=True))
    out = cljax.lora_apply(lora)
    w = lora["dense"]
    want = _np(w.base) + 1.5 * _np(w.a) @ np.diag(_np(w.gate)) @ _np(w.b)
    np.testing.assert_allclose(out["dense"], want, rtol=1e-5, atol=1e-5)
    s = lora["stack"]
    for i in range(2):
        want = _np(s.base[i]) + 1.5 * _np(s.a[i]) @ np.diag(_np(s.gate[i])) @ _np(s.b[i])
        np.testing.assert_allclose(out["stack"][i], want, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(9), (3, 6))
    factored = x @ w.base + 1.5 * ((x @ w.a) * w.gate[None, :]) @ w.b
    np.testing.assert_allclose(x @ out["dense"], factored, rtol=1e-5, atol=1e-5)


def test_merge_and_reset_keeps_the_function_and_zeroes_b():
    lora = _trained(cljax.lora_init(jax.random.key(2), PARAMS, rank=2, alpha=2.0, gates=True))
    merged = cljax.lora_merge_and_reset(lora, jax.random.key(3))
    assert_trees_close(cljax.lora_apply(merged), cljax.lora_apply(lora), rtol=1e-5, atol=1e-5)
    for k in ("dense", "stack"):
        assert np.all(merged[k].b == 0) and np.all(merged[k].gate == 1)
        assert not np.allclose(merged[k].a, lora[k].a)
    half = cljax.lora_merge_and_reset(lora, jax.random.key(3), fraction=0.5)
    want = 0.5 * (_np(cljax.lora_apply(lora)["dense"]) + _np(lora["dense"].base))
    np.testing.assert_allclose(half["dense"].base, want, rtol=1e-5, atol=1e-5)


def test_periodic_lora_stages_accumulate_rank_at_most_k_r():
    params = {"w": jnp.zeros((8, 7))}
    lora = cljax.lora_init(jax.random.key(0), params, rank=2)
    for stage in range(3):
        lora = _trained(lora, key=10 + stage)
        lora = cljax.lora_merge_and_reset(lora, jax.random.key(stage))
        rank = np.linalg.matrix_rank(_np(lora["w"].base), tol=1e-4)
        assert rank <= 2 * (stage + 1)
    assert rank == 6


def _np_delta(w):
    """``scale · a diag(gate) b`` per matrix in float64, in the base leaf's shape."""
    a, b = _np(w.a), _np(w.b)
    if w.gate is not None:
        a = a * _np(w.gate)[..., None, :]
    return w.scale * (a @ b)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_partial_unloading_keeps_the_function_and_scales_the_adapter(fraction):
    lora = _trained(cljax.lora_init(jax.random.key(2), PARAMS, rank=2, alpha=2.0, gates=True))
    out = cljax.lora_merge_and_reset(lora, jax.random.key(3), fraction=fraction, remainder="keep")
    assert_trees_close(cljax.lora_apply(out), cljax.lora_apply(lora), rtol=1e-5, atol=1e-5)
    for k in ("dense", "stack"):
        want_base = _np(lora[k].base) + fraction * _np_delta(lora[k])
        np.testing.assert_allclose(out[k].base, want_base, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[k].b, (1 - fraction) * _np(lora[k].b), rtol=1e-6)
        np.testing.assert_array_equal(out[k].a, lora[k].a)
        np.testing.assert_array_equal(out[k].gate, lora[k].gate)
    np.testing.assert_array_equal(out["bias"], lora["bias"])


def test_periodic_lora_partial_unloading_over_stages():
    params = {"w": jnp.zeros((8, 7))}
    lora = cljax.lora_init(jax.random.key(0), params, rank=2)
    tx = optax.partition(
        {"lora": optax.adam(1e-2), "frozen": optax.set_to_zero()}, cljax.lora_labels(lora)
    )
    base = np.zeros((8, 7))
    for stage in range(3):
        lora = _trained(lora, key=10 + stage)
        state = tx.init(lora)
        grads = jax.tree.map(jnp.ones_like, lora)
        for _ in range(2):
            _, state = tx.update(grads, state, lora)
        before = cljax.lora_apply(lora)
        base = base + 0.5 * _np_delta(lora["w"])
        lora = cljax.lora_merge_and_reset(
            lora, jax.random.key(stage), fraction=0.5, remainder="keep"
        )
        assert_trees_close(cljax.lora_apply(lora), before, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lora["w"].base, base, rtol=1e-5, atol=1e-5)
        assert np.linalg.matrix_rank(_np(lora["w"].base), tol=1e-4) <= 2 * (stage + 1)
        trained = cljax.find_state(state, optax.ScaleByAdamState)
        assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(trained.mu))
        adam = cljax.find_state(cljax.lora_reset_state(state, lora), optax.ScaleByAdamState)
        assert int(adam.count) == 0
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves((adam.mu, adam.nu)))


def test_only_factors_train_in_a_partition_and_reset_clears_their_state():
    lora = cljax.lora_init(jax.random.key(0), PARAMS, rank=2)
    tx = optax.partition(
        {"lora": optax.adam(1e-2), "frozen": optax.set_to_zero()}, cljax.lora_labels(lora)
    )
    state = tx.init(lora)
    frozen_size = sum(x.size for x in jax.tree.leaves(state.inner_states["frozen"]))
    assert frozen_size == 0  # bases (and the bias) hold no optimizer state

    def loss(p):
        full = cljax.lora_apply(p)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(full))

    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(lora), state, lora)
        lora = optax.apply_updates(lora, updates)
    np.testing.assert_array_equal(lora["dense"].base, PARAMS["dense"])
    np.testing.assert_array_equal(lora["bias"], PARAMS["bias"])
    assert np.any(lora["dense"].b != 0)
    adam = cljax.find_state(state, optax.ScaleByAdamState)
    assert int(adam.count) == 3 and np.any(adam.mu["dense"].b != 0)
    reset = cljax.lora_reset_state(state, lora)
    adam = cljax.find_state(reset, optax.ScaleByAdamState)
    assert int(adam.count) == 0
    for leaf in jax.tree.leaves((adam.mu, adam.nu)):
        assert not np.any(np.asarray(leaf))


@pytest.mark.slow
def test_reset_state_leaves_shared_counts_and_other_moments():
    lora = _trained(
        cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3)), "v": jnp.ones(3)}, rank=2)
    )
    opt = optax.adam(1e-2)
    state = opt.init(lora)
    grads = jax.tree.map(jnp.ones_like, lora)
    _, state = opt.update(grads, state, lora)
    reset = cljax.lora_reset_state(state, lora)
    adam = cljax.find_state(reset, optax.ScaleByAdamState)
    assert int(adam.count) == 1  # shared with non-adapter leaves: kept
    assert not np.any(adam.mu["w"].a) and not np.any(adam.mu["w"].b)
    assert np.all(adam.mu["v"] != 0) and np.all(adam.mu["w"].base != 0)


def test_extract_reproduces_a_low_rank_delta():
    base = {
        "w": jax.random.normal(jax.random.key(0), (7, 5)),
        "k": jnp.zeros((2, 4, 6)),
        "b": jnp.zeros(5),
    }
    u = jax.random.normal(jax.random.key(1), (7, 2))
    delta_k = jax.random.normal(jax.random.key(2), (2, 4, 3)) @ jax.random.normal(
        jax.random.key(3), (2, 3, 6)
    )
    tuned = {
        "w": base["w"] + u @ jax.random.normal(jax.random.key(4), (2, 5)),
        "k": delta_k,
        "b": jnp.ones(5),
    }
    lora = cljax.lora_extract(base, tuned, rank=3)
    assert lora["w"].a.shape == (7, 3) and lora["k"].b.shape == (2, 3, 6)
    assert_trees_close(cljax.lora_apply(lora), tuned, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        jnp.linalg.norm(lora["w"].a, axis=0), jnp.linalg.norm(lora["w"].b, axis=1), rtol=1e-5
    )


def test_fedex_average_is_exact():
    clients = [
        _trained(cljax.lora_init(jax.random.key(0), PARAMS, rank=2, alpha=4.0, gates=True), key=k)
        for k in (1, 2, 3)
    ]
    weights = [0.5, 0.3, 0.2]
    merged = cljax.fedex_lora_average(clients, weights=[5, 3, 2])
    want = jax.tree.map(
        lambda *xs: sum(w * _np(x) for w, x in zip(weights, xs, strict=True)),
        *[cljax.lora_apply(c) for c in clients],
    )
    assert_trees_close(cljax.lora_apply(merged), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        merged["dense"].a,
        sum(w * _np(c["dense"].a) for w, c in zip(weights, clients, strict=True)),
        rtol=1e-5,
    )
    # Identical adapters: no residual, the base is unchanged.
    same = cljax.fedex_lora_average([clients[0], clients[0]])
    np.testing.assert_allclose(same["dense"].base, clients[0]["dense"].base, rtol=1e-6, atol=1e-6)


def test_refactorize_keeps_the_product_and_balances_the_factors():
    lora = _trained(cljax.lora_init(jax.random.key(0), PARAMS, rank=2, gates=True))
    out = cljax.lora_refactorize(lora)
    assert_trees_close(cljax.lora_apply(out), cljax.lora_apply(lora), rtol=1e-4, atol=1e-4)
    for k in ("dense", "stack"):
        a = _np(out[k].a).reshape(-1, *out[k].a.shape[-2:])
        b = _np(out[k].b).reshape(-1, *out[k].b.shape[-2:])
        for ai, bi in zip(a, b, strict=True):
            np.testing.assert_allclose(np.linalg.norm(ai), np.linalg.norm(bi), rtol=1e-4)
        assert np.all(out[k].gate == 1)


def test_gate_prox_and_effective_rank():
    lora = cljax.lora_init(jax.random.key(0), {"w": jnp.zeros((4, 3))}, rank=3, gates=True)
    lora = {"w": dataclasses.replace(lora["w"], gate=jnp.array([0.05, -0.3, 0.1]))}
    out = cljax.lora_gate_prox(lora, 0.1)
    np.testing.assert_allclose(out["w"].gate, [0.0, -0.2, 0.0], atol=1e-7)
    assert int(cljax.lora_effective_rank(out)["w"]) == 1
    assert (
        int(cljax.lora_effective_rank(cljax.lora_init(jax.random.key(0), PARAMS, rank=2))["dense"])
        == 2
    )
    merged = cljax.lora_merge_and_reset(out, jax.random.key(1))
    np.testing.assert_allclose(cljax.lora_apply(merged)["w"], cljax.lora_apply(out)["w"], atol=1e-6)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(threshold=st.floats(0.0, 2.0), values=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=6))
def test_gate_prox_is_soft_thresholding(threshold, values):
    lora = cljax.lora_init(
        jax.random.key(0), {"w": jnp.zeros((4, len(values)))}, rank=len(values), gates=True
    )
    gate = jnp.asarray(values, jnp.float32)
    out = cljax.lora_gate_prox({"w": dataclasses.replace(lora["w"], gate=gate)}, threshold)[
        "w"
    ].gate
    v = np.asarray(gate, np.float64)
    want = np.sign(v) * np.maximum(np.abs(v) - threshold, 0.0)
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert np.all(out[np.abs(v) <= threshold] == 0)


def test_errors():
    with pytest.raises(ValueError, match=r"lora_init\(rank=...\) must be >= 1"):
        cljax.lora_init(jax.random.key(0), PARAMS, rank=0)
    with pytest.raises(ValueError, match=r"lora_init\(init=...\) must be one of"):
        cljax.lora_init(jax.random.key(0), PARAMS, rank=2, init="zeros")
    with pytest.raises(ValueError, match=r"lora_init\(alpha=...\) must be in"):
        cljax.lora_init(jax.random.key(0), PARAMS, rank=2, alpha=0.0)
    with pytest.raises(TypeError, match=r"lora_init\(matrix_spec=...\) must be a MatrixSpec"):
        cljax.lora_init(jax.random.key(0), PARAMS, rank=2, matrix_spec=(0, 1))
    with pytest.raises(TypeError, match=r"lora_init\(targets=...\) must be a function"):
        cljax.lora_init(jax.random.key(0), PARAMS, rank=2, targets={"dense": True})
    with pytest.raises(
        ValueError,
        match=r"lora_init: leaf 'bias' has shape \(4,\); an adapted leaf needs at least two dims",
    ):
        cljax.lora_init(
            jax.random.key(0),
            PARAMS,
            rank=2,
            targets=lambda p: {"dense": True, "stack": False, "bias": True},
        )
    with pytest.raises(
        ValueError, match=r"lora_init: `targets\(params\)` must return a bool per parameter leaf"
    ):
        cljax.lora_init(jax.random.key(0), PARAMS, rank=2, targets=lambda p: [True])
    with pytest.raises(ValueError, match=r"lora_merge_and_reset\(fraction=...\) must be in"):
        cljax.lora_merge_and_reset(PARAMS, jax.random.key(0), fraction=2.0)
    with pytest.raises(ValueError, match=r"lora_merge_and_reset\(remainder=...\) must be one of"):
        cljax.lora_merge_and_reset(PARAMS, jax.random.key(0), remainder="scale")
    with pytest.raises(ValueError, match=r"lora_gate_prox\(threshold=...\) must be in"):
        cljax.lora_gate_prox(PARAMS, -1.0)
    with pytest.raises(ValueError, match=r"fedex_lora_average: `adapters` is empty"):
        cljax.fedex_lora_average([])
    one = cljax.lora_init(jax.random.key(0), PARAMS, rank=2)
    with pytest.raises(
        ValueError, match=r"fedex_lora_average\(weights=...\) must be 2 non-negative numbers"
    ):
        cljax.fedex_lora_average([one, one], weights=[1.0, -1.0])
    with pytest.raises(
        ValueError, match=r"fedex_lora_average: adapter 1 has a different tree structure"
    ):
        cljax.fedex_lora_average(
            [one, cljax.lora_init(jax.random.key(0), PARAMS, rank=2, alpha=4.0)]
        )
    with pytest.raises(ValueError, match=r"fedex_lora_average: leaf 'dense/a' has shape \(6, 3\)"):
        cljax.fedex_lora_average([one, cljax.lora_init(jax.random.key(0), PARAMS, rank=3)])
    with pytest.raises(ValueError, match=r"lora_extract\(rank=...\) must be >= 1"):
        cljax.lora_extract(PARAMS, PARAMS, rank=0)
    with pytest.raises(
        ValueError, match=r"lora_extract: leaf 'bias' has shape \(3,\) in `finetuned` but \(4,\)"
    ):
        cljax.lora_extract(PARAMS, {**PARAMS, "bias": jnp.ones(3)}, rank=1)
