"""Tests for DSEE (SP-41): data-free supports, the sparse-plus-low-rank delta, stage-2 masks.

References: GreBsmo written from the card in float64 NumPy (a ``V`` that grows by appended
rows), the delta ``W₀ + s (a b + S)`` with ``S`` scattered by loops, and top-``N`` by `np.argsort`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax import magnitude_mask, select
from cljax.transforms.sparse.dsee import (
    DseeWeight,
    dsee_grebsmo,
    dsee_init,
    dsee_labels,
    dsee_materialize,
    dsee_support,
)


def _np_grebsmo(w, v0, *, rank_steps, alternations, rows_per_step=1, threshold=0.01):
    """The card's GreBsmo in float64, with V growing row by row and S₀ restarted per increment."""
    w = np.asarray(w, np.float64)
    v = np.asarray(v0, np.float64).reshape(1, -1)
    s = np.zeros_like(w)
    cap = min(w.shape)
    for _ in range(rank_steps):
        s = np.zeros_like(w)
        for _ in range(alternations):
            u, _ = np.linalg.qr((w - s) @ v.T)
            v = u.T @ (w - s)
            uv = u @ v
            s = w - uv
            s[np.abs(s) < threshold] = 0.0
        r = np.linalg.qr(w - uv - s, mode="r")
        v = np.concatenate([v, r[: max(0, min(rows_per_step, cap - v.shape[0]))]], axis=0)
    return s


def _low_rank_plus_spikes(seed, m=48, n=32, rank=2, spikes=8):
    rng = np.random.default_rng(seed)
    low = 0.3 * rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    where = np.sort(rng.choice(m * n, spikes, replace=False))
    sparse = np.zeros(m * n)
    sparse[where] = rng.choice([-1.0, 1.0], spikes)
    return low + sparse.reshape(m, n), where


def test_grebsmo_matches_numpy():
    w, _ = _low_rank_plus_spikes(0)
    key = jax.random.key(3)
    v0 = jax.random.normal(key, (w.shape[1],), jnp.float32)  # the start `dsee_grebsmo` draws
    got = np.asarray(dsee_grebsmo(jnp.asarray(w, jnp.float32), key, rank_steps=3, alternations=10))
    want = _np_grebsmo(w, v0, rank_steps=3, alternations=10)
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_grebsmo_support_recovers_the_spikes(seed):
    # The rank reaches the true rank (2) in the last increment; a threshold between the
    # low-rank residual and the spikes.
    w, spikes = _low_rank_plus_spikes(seed)
    params = {"w": jnp.asarray(w, jnp.float32)}
    support = dsee_support(params, 8, key=jax.random.key(seed), rank_steps=2, threshold=0.1)["w"]
    np.testing.assert_array_equal(support, spikes)


def test_grebsmo_with_several_rows_per_step_matches_numpy():
    w, _ = _low_rank_plus_spikes(1, m=10, n=8, rank=3)
    key = jax.random.key(0)
    v0 = jax.random.normal(key, (8,), jnp.float32)
    got = dsee_grebsmo(
        jnp.asarray(w, jnp.float32), key, rank_steps=4, alternations=2, rows_per_step=3
    )
    want = _np_grebsmo(w, v0, rank_steps=4, alternations=2, rows_per_step=3)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3)
    assert np.all(np.isfinite(np.asarray(got)))  # the rank saturates at min(m, n) = 8


def test_omp_is_top_n_of_abs_w_and_rp_is_a_pure_function_of_the_key():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32), "b": jnp.ones(4)}
    omp = dsee_support(params, 3, method="omp")
    assert omp["b"] is None and omp["w"].dtype == jnp.int32
    for layer in range(2):
        flat = np.abs(np.asarray(params["w"][layer])).ravel()
        np.testing.assert_array_equal(omp["w"][layer], np.sort(np.argsort(-flat)[:3]))
    a = dsee_support(params, 3, method="rp", key=jax.random.key(1))["w"]
    b = dsee_support(params, 3, method="rp", key=jax.random.key(1))["w"]
    c = dsee_support(params, 3, method="rp", key=jax.random.key(2))["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for idx in np.asarray(a):
        assert len(set(idx.tolist())) == 3 and idx.min() >= 0 and idx.max() < 20


@settings(max_examples=6, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_omp_keeps_exactly_n_of_the_largest(m, n, frac, seed):
    k = max(1, int(frac * m * n))
    w = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    idx = np.asarray(
        dsee_support({"w": jnp.asarray(w)}, k, method="omp", targets=lambda p: {"w": True})["w"]
    )
    assert idx.shape == (k,) and len(np.unique(idx)) == k
    inside = np.zeros(m * n, bool)
    inside[idx] = True
    if k < m * n:
        assert np.abs(w.ravel()[inside]).min() >= np.abs(w.ravel()[~inside]).max()


def _np_delta(t: DseeWeight, idx):
    a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
    sparse = np.zeros(t.base.shape)
    for layer in np.ndindex(*t.base.shape[:-2]):
        n = t.base.shape[-1]
        for j, flat in enumerate(np.asarray(idx)[layer]):
            sparse[layer + (flat // n, flat % n)] += float(t.values[layer + (j,)])
    return np.asarray(t.base, np.float64) + t.scale * (a @ b + sparse)


def _random_factors(t: DseeWeight, seed):
    rng = np.random.default_rng(seed)
    draw = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return DseeWeight(t.base, draw(t.a), draw(t.b), draw(t.values), t.scale, t.spec)


def test_materialize_matches_numpy_delta_and_init_is_bitwise_the_pretrained_model():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((2, 6, 5)), jnp.float32), "h": jnp.ones(3)}
    support = dsee_support(params, 4, method="rp", key=jax.random.key(0))
    tuned = dsee_init(jax.random.key(1), params, support, rank=2, alpha=8.0)
    assert tuned["w"].scale == 4.0 and tuned["h"] is params["h"]
    assert float(jnp.std(tuned["w"].a)) == pytest.approx(0.02, rel=0.5)
    at_init = dsee_materialize(tuned, support)
    np.testing.assert_array_equal(at_init["w"], params["w"])
    moved = {**tuned, "w": _random_factors(tuned["w"], 4)}
    np.testing.assert_allclose(
        dsee_materialize(moved, support)["w"], _np_delta(moved["w"], support["w"]), atol=1e-5
    )


def test_init_is_bitwise_for_bf16():
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((4, 4)), jnp.bfloat16)}
    support = dsee_support(params, 3, method="omp")
    out = dsee_materialize(dsee_init(jax.random.key(0), params, support), support)["w"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(params["w"], np.float32))


def test_gather_form_gives_the_dense_masked_gradients():
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)}
    support = dsee_support(params, 5, method="omp")
    tuned = {
        "w": _random_factors(
            dsee_init(jax.random.key(0), params, support, rank=2, alpha=3.0)["w"], 7
        )
    }
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    t = tuned["w"]
    omega = np.zeros(20, bool)
    omega[np.asarray(support["w"])] = True
    omega = jnp.asarray(omega.reshape(5, 4))

    def loss_gather(values):
        w = dsee_materialize({"w": DseeWeight(t.base, t.a, t.b, values, t.scale, t.spec)}, support)[
            "w"
        ]
        return jnp.sum(jnp.tanh(x @ w))

    def loss_dense(s):
        return jnp.sum(jnp.tanh(x @ (t.base + t.scale * (t.a @ t.b + jnp.where(omega, s, 0.0)))))

    dense_s = jnp.zeros(20).at[support["w"]].set(t.values).reshape(5, 4)
    np.testing.assert_allclose(loss_gather(t.values), loss_dense(dense_s), rtol=1e-5)
    g_dense = jax.grad(loss_dense)(dense_s)
    np.testing.assert_array_equal(np.asarray(g_dense)[~np.asarray(omega)], 0.0)
    np.testing.assert_allclose(
        jax.grad(loss_gather)(t.values), g_dense.reshape(-1)[support["w"]], rtol=1e-5
    )


def test_two_stage_training_keeps_base_frozen_and_pruned_entries_zero():
    rng = np.random.default_rng(8)
    params = {"w": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32), "head": jnp.zeros(6)}
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    support = dsee_support(params, 4, key=jax.random.key(0), rank_steps=2, alternations=2)

    def train(tuned, masks=None):
        labels = dsee_labels(tuned, others="dsee")
        tx = optax.partition({"dsee": optax.adam(0.05), "frozen": optax.set_to_zero()}, labels)
        state = tx.init(tuned)
        loss = lambda t: jnp.sum(
            (x @ dsee_materialize(t, support, masks=masks)["w"] + t["head"][None, :] - 1.0) ** 2
        )

        @jax.jit
        def step(tuned, state):
            updates, state = tx.update(jax.grad(loss)(tuned), state, tuned)
            return optax.apply_updates(tuned, updates), state

        for _ in range(3):
            tuned, state = step(tuned, state)
        return tuned, state

    tuned, state = train(dsee_init(jax.random.key(1), params, support, rank=2))
    np.testing.assert_array_equal(tuned["w"].base, params["w"])  # the base is frozen
    adam = state.inner_states["dsee"].inner_state[0]
    assert adam.mu["w"].values.shape == (4,)  # moments of S only on the support
    merged = dsee_materialize(tuned, support)
    assert np.abs(np.asarray(merged["w"]) - np.asarray(params["w"])).max() > 0
    masks = {"w": magnitude_mask(merged, {"w": 0.5, "head": None})["w"], "head": None}
    stage2, _ = train(dsee_init(jax.random.key(2), merged, support, rank=2), masks)
    final = np.asarray(dsee_materialize(stage2, support, masks=masks)["w"])
    np.testing.assert_array_equal(final[~np.asarray(masks["w"])], 0.0)
    assert np.count_nonzero(final) == int(np.asarray(masks["w"]).sum())


def test_dsee_rejects_bad_arguments():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"method=\.\.\.\) must be one of"):
        dsee_support(params, 2, method="svd")
    with pytest.raises(ValueError, match=r"num_entries=13 is larger than it"):
        dsee_support(params, 13, method="omp")
    with pytest.raises(ValueError, match=r"method='rp' needs a `key`"):
        dsee_support(params, 2, method="rp")
    with pytest.raises(TypeError, match=r"targets=\.\.\.\) must be a function"):
        dsee_support(params, 2, method="omp", targets={"w": True, "b": False})
    with pytest.raises(
        ValueError, match=r"leaf 'b' has shape \(4,\); a DSEE leaf needs at least two dims"
    ):
        dsee_support(params, 2, method="omp", targets=select("w|b"))
    with pytest.raises(TypeError, match=r"matrix_spec=\.\.\.\) must be a MatrixSpec"):
        dsee_support(params, 2, method="omp", matrix_spec=(0, 1))
    with pytest.raises(ValueError, match=r"pass one \(m, n\) matrix"):
        dsee_grebsmo(jnp.ones(3), jax.random.key(0))
    with pytest.raises(ValueError, match=r"alternations=\.\.\.\) must be >= 1"):
        dsee_grebsmo(jnp.ones((3, 3)), jax.random.key(0), alternations=0)
    with pytest.raises(ValueError, match=r"threshold=\.\.\.\) must be in"):
        dsee_grebsmo(jnp.ones((3, 3)), jax.random.key(0), threshold=-1.0)
    with pytest.raises(ValueError, match=r"num_entries=\.\.\.\) must be >= 1"):
        dsee_support(params, 0, method="omp")
    with pytest.raises(ValueError, match=r"alpha=\.\.\.\) must be in"):
        dsee_init(jax.random.key(0), params, {"w": None, "b": None}, alpha=0.0)
    with pytest.raises(ValueError, match=r"rank=\.\.\.\) must be >= 1"):
        dsee_init(jax.random.key(0), params, {"w": None, "b": None}, rank=0)
    with pytest.raises(ValueError, match=r"its support has shape \(2, 2\)"):
        dsee_init(jax.random.key(0), params, {"w": jnp.zeros((2, 2), jnp.int32), "b": None})
    support = dsee_support(params, 2, method="omp")
    tuned = dsee_init(jax.random.key(0), params, support)
    with pytest.raises(ValueError, match=r"leaf 'w' has values of shape \(2,\) but support \(3,\)"):
        dsee_materialize(tuned, {"w": jnp.arange(3), "b": None})
    with pytest.raises(
        ValueError, match=r"leaf 'w' has shape \(3, 4\) but its mask has shape \(4, 3\)"
    ):
        dsee_materialize(tuned, support, masks={"w": jnp.ones((4, 3), bool), "b": None})


def test_grebsmo_is_finite_on_zero_and_rank_one_matrices():
    for w in (jnp.zeros((5, 4)), jnp.ones((5, 4))):
        s0 = np.asarray(dsee_grebsmo(w, jax.random.key(0), rank_steps=6, alternations=2))
        assert np.all(np.isfinite(s0))
        np.testing.assert_allclose(s0, 0.0, atol=1e-5)  # nothing sparse in a rank <= 1 matrix
