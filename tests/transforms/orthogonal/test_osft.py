"""Tests for OSFT (OR-05): the full-gradient transform and the factorized form.

References are float64 NumPy SVDs and the two-sided projection written out; invariants are the
card's: ``U_h^T dW = 0`` and ``dW V_h = 0`` for any inner optimizer (update mode), the high part
unchanged during a task, factor-gradient orthogonality, reconstruction to 1e-5, non-decreasing
preserved rank, rank 0 = plain fine-tuning.
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


def gapped(rng, m, n, spectrum=None):
    """A random (m, n) matrix with a well separated singular spectrum."""
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.asarray(spectrum if spectrum is not None else 2.0 ** -np.arange(r) * 4)
    return (u * s) @ v.T


def np_high(w, k):
    u, _, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return u[:, :k], vt[:k].T


def test_projection_matches_numpy_two_sided():
    rng = np.random.default_rng(0)
    for m, n in [(6, 4), (4, 6)]:
        w = gapped(rng, m, n)
        params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(n)}
        tx = cljax.osft(capacity=3)
        state = cljax.osft_decompose(tx.init(params), params, rank=2)
        u, v = np_high(w, 2)
        np.testing.assert_allclose(
            np.abs(np.asarray(state.left["w"])[:, :2].T @ u), np.eye(2), atol=1e-5
        )
        np.testing.assert_array_equal(np.asarray(state.left["w"])[:, 2], 0.0)
        g = rng.standard_normal((m, n))
        out, _ = tx.update({"w": jnp.asarray(g, jnp.float32), "b": jnp.ones(n)}, state)
        want = (np.eye(m) - u @ u.T) @ g @ (np.eye(n) - v @ v.T)
        np.testing.assert_allclose(out["w"], want, atol=1e-5)
        np.testing.assert_array_equal(out["b"], 1.0)


@pytest.mark.parametrize("where", ["update", "gradient"])
def test_constraints_hold_and_high_part_is_frozen(where):
    rng = np.random.default_rng(1)
    w0 = gapped(rng, 7, 5)
    params = {"w": jnp.asarray(w0, jnp.float32)}
    inner = optax.adamw(1e-2, weight_decay=0.0) if where == "update" else optax.sgd(1e-2)
    tx = cljax.osft(capacity=3, inner=inner, where=where)
    state = cljax.osft_decompose(tx.init(params), params, rank=3)
    u, v = np_high(w0, 3)
    high0 = u @ u.T @ w0 @ v @ v.T
    step = jax.jit(tx.update)
    for _ in range(5):
        du, state = step(
            {"w": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)}, state, params
        )
        d = np.asarray(du["w"], np.float64)
        np.testing.assert_allclose(u.T @ d, 0.0, atol=1e-5)
        np.testing.assert_allclose(d @ v, 0.0, atol=1e-5)
        params = optax.apply_updates(params, du)
    w = np.asarray(params["w"], np.float64)
    np.testing.assert_allclose(u @ u.T @ w @ v @ v.T, high0, atol=1e-5)


def test_rank_zero_is_identity_and_redecomposition_tracks_weights():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(gapped(rng, 5, 5), jnp.float32)}
    tx = cljax.osft(capacity=None)
    state = tx.init(params)
    g = {"w": jnp.asarray(rng.standard_normal((5, 5)), jnp.float32)}
    assert_trees_equal(tx.update(g, state)[0], g)  # nothing frozen before the first decompose
    state = cljax.osft_decompose(state, params, rank=0)
    assert_trees_equal(tx.update(g, state)[0], g)
    assert state.left["w"].shape == (5, 5)
    # After the weights change, re-decomposition freezes the new top subspace; rank may grow.
    state = cljax.osft_decompose(state, params, rank=1)
    new = {"w": jnp.asarray(gapped(rng, 5, 5, spectrum=[9.0, 5.0, 1.0, 0.5, 0.1]), jnp.float32)}
    state = cljax.osft_decompose(state, new, rank=0.4)  # floor(0.4 * 5) = 2
    assert int(state.ranks["w"]) == 2
    u, v = np_high(new["w"], 2)
    np.testing.assert_allclose(
        np.abs(np.asarray(state.left["w"])[:, :2].T @ u), np.eye(2), atol=1e-5
    )
    np.testing.assert_allclose(
        np.abs(np.asarray(state.right["w"])[:, :2].T @ v), np.eye(2), atol=1e-5
    )


def test_stacked_leaves_and_per_leaf_ranks():
    rng = np.random.default_rng(3)
    stack = np.stack([gapped(rng, 4, 6), gapped(rng, 4, 6)])
    params = {
        "s": jnp.asarray(stack, jnp.float32),
        "w": jnp.asarray(gapped(rng, 3, 3), jnp.float32),
    }
    tx = cljax.osft(capacity=2)
    state = cljax.osft_decompose(tx.init(params), params, rank={"s": 2, "w": None})
    np.testing.assert_array_equal(state.ranks["s"], [2, 2])
    assert int(state.ranks["w"]) == 0
    g = rng.standard_normal((2, 4, 6))
    out, _ = tx.update({"s": jnp.asarray(g, jnp.float32), "w": jnp.ones((3, 3))}, state)
    for layer in range(2):
        u, v = np_high(stack[layer], 2)
        want = (np.eye(4) - u @ u.T) @ g[layer] @ (np.eye(6) - v @ v.T)
        np.testing.assert_allclose(out["s"][layer], want, atol=1e-5)
    np.testing.assert_array_equal(out["w"], 1.0)


def test_custom_spec_pytorch_conv_layout():
    rng = np.random.default_rng(4)
    spec = cljax.MatrixSpec(rows=(0, 1, 2), cols=3)
    k = rng.standard_normal((2, 2, 3, 4))
    params = {"k": jnp.asarray(k, jnp.float32)}
    tx = cljax.osft(capacity=2, spec=spec)
    state = cljax.osft_decompose(tx.init(params), params, rank=2, spec=spec)
    u, v = np_high(k.reshape(12, 4), 2)
    g = rng.standard_normal((2, 2, 3, 4))
    out, _ = tx.update({"k": jnp.asarray(g, jnp.float32)}, state)
    want = ((np.eye(12) - u @ u.T) @ g.reshape(12, 4) @ (np.eye(4) - v @ v.T)).reshape(2, 2, 3, 4)
    np.testing.assert_allclose(out["k"], want, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"osft_decompose: leaf 'k' has shape \(2, 2, 3, 4\), whose matrix view"
    ):
        cljax.osft_decompose(tx.init(params), params, rank=2)


def test_bf16_and_zero_weights_stay_finite():
    params = {"w": jnp.zeros((4, 3), jnp.bfloat16)}
    tx = cljax.osft(capacity=3)
    state = cljax.osft_decompose(tx.init(params), params, rank=3)
    out, _ = tx.update({"w": jnp.ones((4, 3), jnp.bfloat16)}, state)
    assert out["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out["w"], np.float32)))
    assert state.left["w"].dtype == jnp.float32


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(0, 3))
def test_property_projection_is_idempotent_and_two_sided(seed, k):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)}
    tx = cljax.osft(capacity=3)
    state = cljax.osft_decompose(tx.init(params), params, rank=k)
    g = {"w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)}
    once, _ = tx.update(g, state)
    twice, _ = tx.update(once, state)
    assert_trees_close(twice, once, atol=1e-5)
    u = np.asarray(state.left["w"])
    v = np.asarray(state.right["w"])
    np.testing.assert_allclose(u.T @ np.asarray(once["w"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(once["w"]) @ v, 0.0, atol=1e-5)
    np.testing.assert_allclose(u.T @ u, np.diag((np.arange(3) < k).astype(float)), atol=1e-5)


def test_importance_matches_numpy():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    got = cljax.osft_importance({"a": jnp.asarray(x), "b": None}, {"a": jnp.asarray(y), "b": None})
    want = np.mean(np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    np.testing.assert_allclose(got["a"], want, rtol=1e-5)
    assert got["b"] is None


# ---------------------------------------------------------------------------------------------
# Factorized form.


def test_factorize_materialize_round_trip_and_factor_projection():
    rng = np.random.default_rng(6)
    params = {
        "w": jnp.asarray(gapped(rng, 6, 4), jnp.float32),
        "s": jnp.asarray(np.stack([gapped(rng, 3, 5)] * 2), jnp.float32),
        "b": jnp.ones(4),
    }
    f = cljax.osft_factorize(params, rank={"w": 2, "s": 0.34, "b": None})
    assert (
        f["w"].u_high.shape == (6, 2)
        and f["w"].u_low.shape == (6, 2)
        and f["w"].s_low.shape == (2,)
    )
    assert f["s"].u_high.shape == (2, 3, 1) and f["s"].v_low.shape == (2, 5, 2)
    assert_trees_close(cljax.osft_materialize(f), params, atol=1e-5)

    def loss(fp):
        p = cljax.osft_materialize(fp)
        return jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["s"] ** 3) + jnp.sum(p["b"])

    tx = optax.chain(cljax.osft_factored(), optax.adam(1e-2))
    state = tx.init(f)
    start = f

    @jax.jit
    def step(f, state):
        grads = jax.grad(loss)(f)
        out, state = tx.update(grads, state, f)
        projected, _ = cljax.osft_factored().update(grads, optax.EmptyState(), f)
        return optax.apply_updates(f, out), state, grads, projected

    for _ in range(3):
        new_f, state, grads, projected = step(f, state)
        for name in ("w", "s"):
            uh, ul = np.asarray(f[name].u_high), np.asarray(projected[name].u_low)
            vh, vl = np.asarray(f[name].v_high), np.asarray(projected[name].v_low)
            np.testing.assert_allclose(np.swapaxes(uh, -1, -2) @ ul, 0.0, atol=1e-5)
            np.testing.assert_allclose(np.swapaxes(vh, -1, -2) @ vl, 0.0, atol=1e-5)
            np.testing.assert_array_equal(projected[name].s_low, grads[name].s_low)
        f = new_f
    for name in ("w", "s"):  # the high part is bit-identical during the task
        for field in ("u_high", "s_high", "v_high"):
            np.testing.assert_array_equal(getattr(f[name], field), getattr(start[name], field))
        assert not np.allclose(f[name].u_low, start[name].u_low)


def test_factorized_high_part_of_materialized_weight_is_untouched():
    """U_h^T dW V_h = 0 to first order: the factorized step satisfies the two constraints."""
    rng = np.random.default_rng(7)
    w = jnp.asarray(gapped(rng, 5, 4), jnp.float32)
    f = cljax.osft_factorize({"w": w}, rank=2)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), f)
    projected, _ = cljax.osft_factored().update(grads, optax.EmptyState(), f)
    eps = 1e-4
    moved = cljax.osft_materialize(jax.tree.map(lambda p, d: p - eps * d, f, projected))
    dw = (np.asarray(moved["w"], np.float64) - np.asarray(w, np.float64)) / eps
    uh, vh = np.asarray(f["w"].u_high, np.float64), np.asarray(f["w"].v_high, np.float64)
    np.testing.assert_allclose(uh.T @ dw @ vh, 0.0, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_errors():
    params = {"w": jnp.eye(4), "b": jnp.ones(4)}
    tx = cljax.osft(capacity=2)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"osft\(capacity=...\) must be >= 1"):
        cljax.osft(0)
    with pytest.raises(ValueError, match=r"osft\(where=...\) needs `inner`"):
        cljax.osft(2, where="update")
    with pytest.raises(
        ValueError, match=r"osft_decompose: leaf 'w' would preserve rank 3, above its capacity 2"
    ):
        cljax.osft_decompose(state, params, rank=3)
    grown = cljax.osft_decompose(state, params, rank=2)
    with pytest.raises(
        ValueError, match=r"osft_decompose: leaf 'w' would preserve rank 1, below the rank 2"
    ):
        cljax.osft_decompose(grown, params, rank=1)
    with pytest.raises(
        ValueError, match=r"osft_decompose\(rank=...\) for leaf 'w' must be in \[0, 4\]"
    ):
        cljax.osft_decompose(state, params, rank=5)
    with pytest.raises(ValueError, match=r"osft_decompose\(rank=...\) must be in \[0.0, 1.0\]"):
        cljax.osft_decompose(state, params, rank=1.5)
    with pytest.raises(
        TypeError, match=r"osft_decompose\(rank=...\) for leaf 'w' must be an int or a float"
    ):
        cljax.osft_decompose(state, params, rank=True)
    with pytest.raises(ValueError, match=r"osft_decompose: `params` does not have the structure"):
        cljax.osft_decompose(state, {"w": jnp.eye(4)}, rank=1)
    with pytest.raises(ValueError, match=r"no OsftState in the optimizer state"):
        cljax.osft_decompose(optax.sgd(0.1).init(params), params, rank=1)
    with pytest.raises(TypeError, match=r"osft_decompose: `params` is traced"):
        jax.jit(lambda p: cljax.osft_decompose(state, p, rank=1))(params)
    with pytest.raises(
        ValueError, match=r"osft_importance: leaf 'a' has inputs \(3, 2\) and outputs \(3, 4\)"
    ):
        cljax.osft_importance({"a": jnp.ones((3, 2))}, {"a": jnp.ones((3, 4))})
    f = cljax.osft_factorize({"w": jnp.eye(3)}, rank=1)
    with pytest.raises(ValueError, match=r"osft_factored: `update` needs `params`"):
        cljax.osft_factored().update(f, optax.EmptyState())
    with pytest.raises(
        ValueError, match=r"osft_factored: an OsftFactors update has no OsftFactors"
    ):
        cljax.osft_factored().update(f, optax.EmptyState(), {"w": jnp.eye(3)})
    with pytest.raises(
        ValueError, match=r"osft_factorize\(rank=...\) for leaf 'w' must be in \[0, 3\]"
    ):
        cljax.osft_factorize({"w": jnp.eye(3)}, rank=4)
