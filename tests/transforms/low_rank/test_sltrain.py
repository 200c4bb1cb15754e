"""Tests for SLTrain (LR-04): support, init distributions, factored forward against the dense
``W = s·a b + S`` written in NumPy, gradients of the sparse values, parameter counts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax

PARAMS = {"w": jnp.zeros((16, 12)), "k": jnp.zeros((2, 10, 8)), "b": jnp.zeros(12)}


def _dense_reference(w, idx):
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    s = np.zeros(a.shape[0] * b.shape[1])
    np.add.at(s, np.asarray(idx), np.asarray(w.values, np.float64))
    return w.scale * a @ b + s.reshape(a.shape[0], b.shape[1])


def _trained(w, key=3):
    return dataclasses.replace(w, b=jax.random.normal(jax.random.key(key), w.b.shape))


def test_support_is_fixed_unique_in_range_and_regenerable():
    trainable, support = cljax.sltrain_init(jax.random.key(0), PARAMS, rank=3, density=0.1)
    k_w, k_k = int(0.1 * 16 * 12), int(0.1 * 10 * 8)
    assert support["w"].shape == (k_w,) and support["k"].shape == (2, k_k) and support["b"] is None
    for idx, size in ((support["w"], 192), (support["k"][0], 80), (support["k"][1], 80)):
        idx = np.asarray(idx)
        assert idx.dtype == np.int32 and len(np.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < size and np.all(np.diff(idx) > 0)
    assert not np.array_equal(support["k"][0], support["k"][1])
    again = cljax.sltrain_support(jax.random.key(0), PARAMS, density=0.1)
    for a, b in zip(jax.tree.leaves(support), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # Trainable floats: r (m + n) + delta m n per matrix; the support is not in the tree.
    floats = sum(x.size for x in jax.tree.leaves(trainable))
    assert floats == (3 * (16 + 12) + k_w) + 2 * (3 * (10 + 8) + k_k) + 12


def test_init_distributions_and_output_at_init():
    trainable, support = cljax.sltrain_init(
        jax.random.key(1), PARAMS, rank=4, density=0.2, alpha=2.0
    )
    w = trainable["w"]
    assert w.scale == 0.5 and np.all(w.b == 0)
    bound = 1 / np.sqrt(16)  # d_in = rows of the flax kernel
    assert np.all(np.abs(w.a) <= bound) and np.all(np.abs(w.values) <= bound)
    x = jax.random.normal(jax.random.key(2), (3, 16))
    s_dense = np.zeros(16 * 12)
    s_dense[np.asarray(support["w"])] = np.asarray(w.values)
    # B = 0: the layer output is x S exactly.
    np.testing.assert_allclose(
        cljax.sltrain_apply(x, w, support["w"]),
        np.asarray(x) @ s_dense.reshape(16, 12),
        rtol=1e-5,
        atol=1e-6,
    )


def test_factored_forward_and_materialize_equal_the_dense_reference():
    trainable, support = cljax.sltrain_init(
        jax.random.key(1), PARAMS, rank=3, density=0.15, alpha=6.0
    )
    trainable = {**trainable, "w": _trained(trainable["w"]), "k": _trained(trainable["k"], 4)}
    dense = cljax.sltrain_materialize(trainable, support)
    np.testing.assert_allclose(
        dense["w"], _dense_reference(trainable["w"], support["w"]), rtol=1e-5, atol=1e-5
    )
    for i in range(2):
        wi = jax.tree.map(lambda x, i=i: x[i], trainable["k"])
        np.testing.assert_allclose(
            dense["k"][i], _dense_reference(wi, support["k"][i]), rtol=1e-5, atol=1e-5
        )
    x = jax.random.normal(jax.random.key(5), (2, 3, 16))
    np.testing.assert_allclose(
        cljax.sltrain_apply(x, trainable["w"], support["w"]), x @ dense["w"], rtol=1e-5, atol=1e-5
    )


def test_value_gradient_is_the_dense_gradient_at_the_support():
    trainable, support = cljax.sltrain_init(jax.random.key(1), PARAMS, rank=2, density=0.1)
    w = _trained(trainable["w"])
    x = jax.random.normal(jax.random.key(6), (5, 16))
    y = jax.random.normal(jax.random.key(7), (5, 12))
    loss = lambda weight: jnp.sum((cljax.sltrain_apply(x, weight, support["w"]) - y) ** 2)  # noqa: E731
    grad = jax.grad(loss)(w)
    dense_w = cljax.sltrain_materialize({"w": w}, {"w": support["w"]})["w"]
    dense_grad = jax.grad(lambda d: jnp.sum((x @ d - y) ** 2))(dense_w)
    np.testing.assert_allclose(
        grad.values, dense_grad.reshape(-1)[support["w"]], rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_an_optimizer_step_never_touches_the_support():
    trainable, support = cljax.sltrain_init(
        jax.random.key(1), {"w": jnp.zeros((8, 6))}, rank=2, density=0.25
    )
    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    x = jnp.ones((4, 8))
    before = np.asarray(support["w"]).copy()
    for _ in range(2):
        grads = jax.grad(lambda t: jnp.sum(cljax.sltrain_apply(x, t["w"], support["w"]) ** 2))(
            trainable
        )
        updates, state = opt.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    np.testing.assert_array_equal(support["w"], before)
    assert sum(x.size for x in jax.tree.leaves(state)) == 1 + 2 * sum(
        x.size for x in jax.tree.leaves(trainable)
    )


def test_errors():
    with pytest.raises(ValueError, match=r"sltrain_init\(rank=...\) must be >= 1"):
        cljax.sltrain_init(jax.random.key(0), PARAMS, rank=0)
    with pytest.raises(ValueError, match=r"sltrain_init\(density=...\) must be in \(0.0, 1.0\]"):
        cljax.sltrain_init(jax.random.key(0), PARAMS, rank=2, density=0.0)
    with pytest.raises(ValueError, match=r"sltrain_init\(alpha=...\) must be in"):
        cljax.sltrain_init(jax.random.key(0), PARAMS, rank=2, alpha=-1.0)
    with pytest.raises(
        ValueError,
        match=r"sltrain_support: leaf 'k' has a 10 x 8 matrix view; density 0.001 gives no sparse entry",
    ):
        cljax.sltrain_support(jax.random.key(0), PARAMS, density=0.001)
    with pytest.raises(TypeError, match=r"sltrain_support\(matrix_spec=...\) must be a MatrixSpec"):
        cljax.sltrain_support(jax.random.key(0), PARAMS, matrix_spec=0)
    with pytest.raises(TypeError, match=r"sltrain_support\(targets=...\) must be a function"):
        cljax.sltrain_support(jax.random.key(0), PARAMS, targets=[True])
    with pytest.raises(
        ValueError,
        match=r"sltrain_support: leaf 'b' has shape \(12,\); a sparse plus low-rank leaf needs",
    ):
        cljax.sltrain_support(
            jax.random.key(0), PARAMS, targets=lambda p: {"w": False, "k": False, "b": True}
        )
    trainable, support = cljax.sltrain_init(jax.random.key(0), PARAMS, rank=2, density=0.1)
    with pytest.raises(
        ValueError,
        match=r"sltrain_materialize: leaf 'w' has values of shape \(19,\) but support None",
    ):
        cljax.sltrain_materialize(trainable, {**support, "w": None})
    with pytest.raises(
        ValueError, match=r"sltrain_apply: `weight` must be a 2-D SparseLowRankWeight"
    ):
        cljax.sltrain_apply(jnp.ones(10), trainable["k"], support["k"])
    with pytest.raises(
        ValueError,
        match=r"sltrain_apply: `x` has shape \(5,\); its last dim must be the weight's 16 rows",
    ):
        cljax.sltrain_apply(jnp.ones(5), trainable["w"], support["w"])
