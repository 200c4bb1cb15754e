"""Tests for GPM (OR-01) and FOT's Gram-based basis extraction (OR-02).

The basis update is checked against a float64 NumPy transcription of the card's rule (first-task
cumulative count, later-task residual loop measured against the original energy), compared as
projectors ``M M^T`` (column signs are arbitrary). Then the card's invariants: projected updates
orthogonal to every stored direction for any inner optimizer, orthonormal bases, non-decreasing
counts, unchanged outputs on old inputs, identity at threshold 0, no recompilation across tasks,
capacity errors.
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
from cljax.transforms.orthogonal import input_subspace as gpm_module
from tests.helpers import assert_trees_equal

# ---------------------------------------------------------------------------------------------
# Float64 NumPy reference of the card's basis update.


def np_grow(basis, rep, threshold, first):
    """One layer: `basis` (d, k) float64 (k may be 0), `rep` = R (d, n). Returns the new basis."""
    if first:
        u, s, _ = np.linalg.svd(rep, full_matrices=False)
        ratio = s**2 / np.sum(s**2)
        r = int(np.sum(np.cumsum(ratio) < threshold))
        return u[:, :r]
    total = np.sum(rep**2)
    hat = rep - basis @ basis.T @ rep
    u, s, _ = np.linalg.svd(hat, full_matrices=False)
    ratio = s**2 / total
    acc = (total - np.sum(s**2)) / total
    r = 0
    for value in ratio:
        if acc < threshold:
            acc += value
            r += 1
        else:
            break
    if r == 0:
        return basis
    out = np.hstack([basis, u[:, :r]])
    return out[:, : rep.shape[0]]


def np_margin(basis, rep, threshold, first):
    """Distance of the criterion's running ratios from the threshold (guards against ties)."""
    if first:
        s = np.linalg.svd(rep, compute_uv=False)
        cum = np.cumsum(s**2) / np.sum(s**2)
        return float(np.min(np.abs(cum - threshold)))
    total = np.sum(rep**2)
    hat = rep - basis @ basis.T @ rep
    s = np.linalg.svd(hat, compute_uv=False)
    acc = (total - np.sum(s**2)) / total + np.concatenate([[0.0], np.cumsum(s**2 / total)])
    return float(np.min(np.abs(acc - threshold)))


def decaying_acts(rng, n, d, decay=0.6):
    """(n, d) activations whose spectrum decays geometrically, in a random rotation."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = decay ** np.arange(d)
    return (rng.standard_normal((n, d)) * scales) @ q.T


def projector(basis, count):
    m = np.asarray(basis, np.float64)[:, : int(count)]
    return m @ m.T


# ---------------------------------------------------------------------------------------------
# Basis update against the reference.


@pytest.mark.parametrize("n", [5, 30], ids=["n<d", "n>d"])
def test_bases_match_reference_over_tasks(n):
    rng = np.random.default_rng(0)
    d = 12
    params = {"w": jnp.zeros((d, 3)), "b": jnp.zeros(3)}
    tx = cljax.gpm(capacity=d)
    state = tx.init(params)
    ref = np.zeros((d, 0))
    counts = []
    for task, thr in enumerate([0.9, 0.95, 0.99]):
        acts = decaying_acts(rng, n, d)
        assert np_margin(ref, acts.T, thr, task == 0) > 1e-4, "test data too close to a tie"
        state = cljax.gpm_add_task(state, {"w": jnp.asarray(acts, jnp.float32), "b": None}, thr)
        ref = np_grow(ref, acts.T, thr, task == 0)
        assert int(state.counts["w"]) == ref.shape[1]
        np.testing.assert_allclose(
            projector(state.bases["w"], state.counts["w"]), ref @ ref.T, atol=2e-5
        )
        counts.append(int(state.counts["w"]))
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0
    assert int(state.num_tasks) == 3


def test_per_leaf_thresholds_and_skipped_layers():
    rng = np.random.default_rng(1)
    params = {"a": jnp.zeros((6, 2)), "b": jnp.zeros((5, 2)), "head": jnp.zeros((4, 2))}
    state = cljax.gpm(capacity=None).init(params)
    acts = {"a": decaying_acts(rng, 20, 6), "b": decaying_acts(rng, 20, 5), "head": None}
    thr = {"a": 0.5, "b": 0.97, "head": None}
    state = cljax.gpm_add_task(state, jax.tree.map(jnp.asarray, acts), thr)
    for name in ("a", "b"):
        ref = np_grow(None, acts[name].T, thr[name], True)
        assert int(state.counts[name]) == ref.shape[1]
    assert int(state.counts["head"]) == 0
    assert state.bases["a"].shape == (6, 6)  # capacity None = d_in


def test_threshold_zero_is_identity_bitwise():
    rng = np.random.default_rng(2)
    params = {"w": jnp.zeros((6, 3))}
    tx = cljax.gpm(capacity=6)
    state = cljax.gpm_add_task(tx.init(params), {"w": jnp.asarray(decaying_acts(rng, 9, 6))}, 0.0)
    assert int(state.counts["w"]) == 0
    g = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}
    out, _ = tx.update(g, state)
    assert_trees_equal(out, g)


# ---------------------------------------------------------------------------------------------
# Projection and invariants.


def _grown_state(tx, params, rng, d_key="w", thr=0.9, tasks=2):
    state = tx.init(params)
    for _ in range(tasks):
        acts = {
            k: (
                jnp.asarray(decaying_acts(rng, 10, v.shape[-2]), jnp.float32)
                if v.ndim == 2
                else None
            )
            for k, v in params.items()
        }
        state = cljax.gpm_add_task(state, acts, thr)
    return state


def test_projection_matches_numpy_flax_and_pytorch_layouts():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((7, 4))
    # Flax (d_in, d_out): left side.
    params = {"w": jnp.zeros((7, 4))}
    tx = cljax.gpm(capacity=7)
    state = _grown_state(tx, params, rng)
    p = projector(state.bases["w"], state.counts["w"])
    out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
    np.testing.assert_allclose(out["w"], g - p @ g, atol=1e-5)
    # PyTorch (d_out, d_in): right side, through the spec.
    spec = cljax.MatrixSpec(rows=-1, cols=-2)
    tx_t = cljax.gpm(capacity=4, spec=spec)
    state_t = tx_t.init({"w": jnp.zeros((7, 4))})
    acts = jnp.asarray(decaying_acts(rng, 10, 4), jnp.float32)
    state_t = cljax.gpm_add_task(state_t, {"w": acts}, 0.9)
    p_t = projector(state_t.bases["w"], state_t.counts["w"])
    assert state_t.bases["w"].shape == (4, 4)
    out_t, _ = tx_t.update({"w": jnp.asarray(g, jnp.float32)}, state_t)
    np.testing.assert_allclose(out_t["w"], g - g @ p_t, atol=1e-5)


@pytest.mark.parametrize("where", ["update", "gradient"])
def test_updates_orthogonal_to_bases_for_adam_and_sgd(where):
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32), "b": jnp.zeros(5)}
    inner = optax.adam(1e-2) if where == "update" else optax.sgd(1e-2)
    tx = cljax.gpm(capacity=8, inner=inner, where=where)
    state = _grown_state(tx, params, rng)
    m = np.asarray(state.bases["w"])[:, : int(state.counts["w"])]
    assert m.shape[1] > 0
    np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-5)
    step = jax.jit(tx.update)
    for _ in range(4):
        grads = {"w": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32), "b": jnp.ones(5)}
        u, state = step(grads, state, params)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(m.T @ np.asarray(u["w"]), 0.0, atol=1e-5)
        # outputs on inputs in the stored span do not move: x^T (K + u) = x^T K
        x = m @ rng.standard_normal(m.shape[1])
        np.testing.assert_allclose(x @ np.asarray(u["w"]), 0.0, atol=1e-5)


@pytest.mark.slow
def test_adam_before_projection_breaks_orthogonality_without_update_mode():
    """Rule OR-P: projecting the gradient before Adam does not keep the update orthogonal."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.zeros((6, 4))}
    tx = cljax.gpm(capacity=6, inner=optax.adam(1e-2), where="gradient")
    state = _grown_state(tx, params, rng)
    m = np.asarray(state.bases["w"])[:, : int(state.counts["w"])]
    u = None
    for _ in range(3):
        u, state = tx.update(
            {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}, state, params
        )
    assert np.max(np.abs(m.T @ np.asarray(u["w"]))) > 1e-3


def test_stacked_and_conv_leaves():
    rng = np.random.default_rng(6)
    # Stacked (L, d_in, d_out): one basis per layer, activations (L, n, d_in).
    params = {"s": jnp.zeros((2, 5, 3))}
    tx = cljax.gpm(capacity=5)
    state = tx.init(params)
    acts = np.stack([decaying_acts(rng, 12, 5), decaying_acts(rng, 12, 5, decay=0.9)])
    state = cljax.gpm_add_task(state, {"s": jnp.asarray(acts, jnp.float32)}, 0.9)
    g = rng.standard_normal((2, 5, 3))
    out, _ = tx.update({"s": jnp.asarray(g, jnp.float32)}, state)
    for layer in range(2):
        ref = np_grow(None, acts[layer].T, 0.9, True)
        assert int(state.counts["s"][layer]) == ref.shape[1]
        np.testing.assert_allclose(out["s"][layer], g[layer] - ref @ ref.T @ g[layer], atol=1e-5)
    # Flax conv (kh, kw, c_in, c_out): rows are the flattened (kh, kw, c_in) patch.
    spec = cljax.MatrixSpec(rows=(0, 1, 2), cols=3)
    conv = {"k": jnp.zeros((2, 2, 3, 4))}
    tx_c = cljax.gpm(capacity=12, spec=spec)
    patches = decaying_acts(rng, 20, 12)
    state_c = cljax.gpm_add_task(tx_c.init(conv), {"k": jnp.asarray(patches, jnp.float32)}, 0.9)
    gk = rng.standard_normal((2, 2, 3, 4))
    out_c, _ = tx_c.update({"k": jnp.asarray(gk, jnp.float32)}, state_c)
    ref = np_grow(None, patches.T, 0.9, True)
    want = (gk.reshape(12, 4) - ref @ ref.T @ gk.reshape(12, 4)).reshape(2, 2, 3, 4)
    np.testing.assert_allclose(out_c["k"], want, atol=1e-5)


def test_spec_function_selects_leaves():
    spec = lambda path, shape: cljax.MatrixSpec() if path.startswith("enc") else None
    params = {"enc": jnp.zeros((4, 2)), "head": jnp.zeros((4, 2))}
    state = cljax.gpm(capacity=2, spec=spec).init(params)
    assert state.bases["head"] is None and state.bases["enc"].shape == (4, 2)


def test_no_recompilation_across_tasks():
    rng = np.random.default_rng(7)
    params = {"w": jnp.zeros((9, 4)), "s": jnp.zeros((2, 9, 4)), "b": jnp.zeros(4)}
    tx = cljax.gpm(capacity=9, inner=optax.sgd(0.1))
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(None)
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    acts = lambda: {
        "w": jnp.asarray(decaying_acts(rng, 7, 9), jnp.float32),
        "s": jnp.asarray(np.stack([decaying_acts(rng, 7, 9)] * 2), jnp.float32),
        "b": None,
    }
    state = cljax.gpm_add_task(state, acts(), 0.8)
    before = {k: f._cache_size() for k, f in gpm_module._GROW.items()}
    counts = []
    for _ in range(3):
        params, state = step(params, state, grads)
        state = cljax.gpm_add_task(state, acts(), 0.8)
        counts.append(int(state.counts["w"]))
    assert len(traces) == 1
    assert {k: f._cache_size() for k, f in gpm_module._GROW.items()} == before
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_freeze_non_matrix_after_first_task():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = cljax.gpm(capacity=3, freeze_non_matrix=True)
    state = tx.init(params)
    g = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    out, _ = tx.update(g, state)
    np.testing.assert_array_equal(out["b"], 1.0)
    state = cljax.gpm_add_task(state, {"w": jnp.eye(3)[:2], "b": None}, 0.4)
    out, _ = tx.update(g, state)
    np.testing.assert_array_equal(out["b"], 0.0)


def test_bfloat16_updates_keep_dtype_and_projection():
    rng = np.random.default_rng(8)
    params = {"w": jnp.zeros((6, 3), jnp.bfloat16)}
    tx = cljax.gpm(capacity=6)
    state = _grown_state(tx, params, rng)
    assert state.bases["w"].dtype == jnp.float32
    out, _ = tx.update({"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.bfloat16)}, state)
    assert out["w"].dtype == jnp.bfloat16
    m = np.asarray(state.bases["w"])[:, : int(state.counts["w"])]
    assert np.max(np.abs(m.T @ np.asarray(out["w"], np.float64))) < 2e-2  # bf16 rounding


def test_zero_activations_add_nothing_and_stay_finite():
    params = {"w": jnp.zeros((4, 2))}
    tx = cljax.gpm(capacity=4)
    state = cljax.gpm_add_task(tx.init(params), {"w": jnp.zeros((3, 4))}, 0.99)
    assert int(state.counts["w"]) == 0
    assert np.all(np.isfinite(np.asarray(state.bases["w"])))
    # full rank: threshold 1 keeps every direction but never more than d_in
    state = cljax.gpm_add_task(
        state,
        {"w": jnp.asarray(np.random.default_rng(0).standard_normal((9, 4)), jnp.float32)},
        1.0,
    )
    m = np.asarray(state.bases["w"])[:, : int(state.counts["w"])]
    assert int(state.counts["w"]) <= 4
    np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-5)


@settings(max_examples=6)
@given(
    d=st.sampled_from([2, 7]),
    n=st.sampled_from([1, 9]),
    thr=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_orthonormal_and_orthogonal(d, n, thr, seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.zeros((d, 3))}
    tx = cljax.gpm(capacity=d)
    state = tx.init(params)
    for _ in range(2):
        acts = jnp.asarray(rng.standard_normal((n, d)) * rng.uniform(0, 3), jnp.float32)
        state = cljax.gpm_add_task(state, {"w": acts}, thr)
    k = int(state.counts["w"])
    basis = np.asarray(state.bases["w"])
    m = basis[:, :k]
    assert 0 <= k <= d
    np.testing.assert_allclose(m.T @ m, np.eye(k), atol=1e-5)
    np.testing.assert_array_equal(basis[:, k:], 0.0)
    g = rng.standard_normal((d, 3))
    out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
    np.testing.assert_allclose(
        m.T @ np.asarray(out["w"]), 0.0, atol=1e-5 * max(1.0, np.abs(g).max())
    )


# ---------------------------------------------------------------------------------------------
# FOT: Gram sums.


def test_summed_client_grams_give_the_pooled_activation_basis():
    rng = np.random.default_rng(9)
    d = 8
    params = {"w": jnp.zeros((d, 3))}
    tx = cljax.gpm(capacity=d)
    clients = [{"w": jnp.asarray(decaying_acts(rng, 6, d), jnp.float32)} for _ in range(3)]
    pooled = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-2), *clients)
    grams = jax.tree.map(lambda *xs: sum(xs), *[cljax.fot_client_grams(c) for c in clients])
    np.testing.assert_allclose(
        grams["w"], np.asarray(pooled["w"]).T @ np.asarray(pooled["w"]), rtol=1e-5, atol=1e-5
    )
    by_acts = by_grams = tx.init(params)
    for thr in (0.9, 0.97):
        by_acts = cljax.gpm_add_task(by_acts, pooled, thr)
        by_grams = cljax.fot_add_task(by_grams, grams, thr)
        np.testing.assert_array_equal(by_acts.counts["w"], by_grams.counts["w"])
        np.testing.assert_allclose(
            projector(by_acts.bases["w"], by_acts.counts["w"]),
            projector(by_grams.bases["w"], by_grams.counts["w"]),
            atol=1e-5,
        )
        pooled = jax.tree.map(lambda x: x * 0.5 + 0.1, pooled)  # the second task differs
        grams = cljax.fot_client_grams(pooled)


def test_fot_server_projection_of_aggregated_update():
    """FedProject: the server's `gpm` removes the stored subspace from the aggregated update."""
    rng = np.random.default_rng(10)
    params = {"w": jnp.zeros((6, 2))}
    server = cljax.gpm(capacity=6)
    state = server.init(params)
    delta = {"w": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)}
    same, _ = server.update(delta, state)
    assert_trees_equal(same, delta)  # no stored basis: unchanged
    grams = cljax.fot_client_grams({"w": jnp.asarray(decaying_acts(rng, 10, 6), jnp.float32)})
    state = cljax.fot_add_task(state, grams, 0.95)
    projected, _ = server.update(delta, state)
    m = np.asarray(state.bases["w"])[:, : int(state.counts["w"])]
    np.testing.assert_allclose(m.T @ np.asarray(projected["w"]), 0.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Composition.


def test_boundary_function_inside_chain_and_partition():
    rng = np.random.default_rng(11)
    params = {"w": jnp.zeros((5, 2)), "frozen": jnp.zeros((5, 2))}
    labels = {"w": "train", "frozen": "frozen"}
    tx = optax.chain(
        optax.partition({"train": cljax.gpm(capacity=5), "frozen": optax.set_to_zero()}, labels),
        optax.scale(-0.1),
    )
    state = tx.init(params)
    acts = {"w": jnp.asarray(decaying_acts(rng, 8, 5), jnp.float32), "frozen": jnp.ones((8, 5))}
    state = cljax.gpm_add_task(state, acts, 0.9)  # activations of leaves gpm does not see: ignored
    found = cljax.find_state(state, cljax.GpmState)
    assert int(found.counts["w"]) > 0
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    m = np.asarray(found.bases["w"])[:, : int(found.counts["w"])]
    np.testing.assert_allclose(m.T @ np.asarray(u["w"]), 0.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_capacity_exceeded_is_an_error_and_state_is_untouched():
    rng = np.random.default_rng(12)
    params = {"w": jnp.zeros((8, 2))}
    state = cljax.gpm(capacity=2).init(params)
    acts = {"w": jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)}
    with pytest.raises(
        ValueError, match=r"gpm_add_task: leaf 'w' needs \d+ basis columns .* capacity is 2"
    ):
        cljax.gpm_add_task(state, acts, 0.99)
    grams = cljax.fot_client_grams(acts)
    with pytest.raises(ValueError, match=r"fot_add_task: leaf 'w' needs"):
        cljax.fot_add_task(state, grams, 0.99)


def test_argument_errors():
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"gpm\(capacity=...\) must be >= 1"):
        cljax.gpm(0)
    with pytest.raises(TypeError, match=r"gpm\(capacity=...\) must be an int"):
        cljax.gpm(2.0)
    with pytest.raises(ValueError, match=r"gpm\(where=...\) needs `inner`"):
        cljax.gpm(2, where="gradient")
    with pytest.raises(ValueError, match=r"gpm\(where=...\) must be one of"):
        cljax.gpm(2, inner=optax.sgd(0.1), where="after")
    with pytest.raises(
        TypeError, match=r"gpm\(inner=...\) must be an optax GradientTransformation"
    ):
        cljax.gpm(2, inner=3)
    with pytest.raises(TypeError, match=r"gpm\(spec=...\) must be a MatrixSpec"):
        cljax.gpm(2, spec=(0, 1))
    with pytest.raises(TypeError, match=r"gpm\(freeze_non_matrix=...\) must be a bool"):
        cljax.gpm(2, freeze_non_matrix=1)
    with pytest.raises(TypeError, match=r"gpm\(spec=...\) returned 3 for leaf 'b'"):
        cljax.gpm(2, spec=lambda p, s: 3).init(params)
    state = cljax.gpm(2).init(params)
    with pytest.raises(
        ValueError, match=r"gpm_add_task: leaf 'w' has shape \(3, 5\) in `activations`"
    ):
        cljax.gpm_add_task(state, {"w": jnp.ones((3, 5)), "b": None}, 0.9)
    with pytest.raises(ValueError, match=r"gpm_add_task: leaf 'b' has no input-subspace basis"):
        cljax.gpm_add_task(state, {"w": None, "b": jnp.ones((3, 2))}, 0.9)
    with pytest.raises(ValueError, match=r"gpm_add_task: `activations` has leaf 'x'"):
        cljax.gpm_add_task(state, {"x": jnp.ones((3, 4))}, 0.9)
    with pytest.raises(ValueError, match=r"gpm_add_task\(threshold=...\) must be in \[0.0, 1.0\]"):
        cljax.gpm_add_task(state, {"w": jnp.ones((3, 4))}, 1.5)
    with pytest.raises(ValueError, match=r"gpm_add_task\(threshold\['w'\]=...\) must be in"):
        cljax.gpm_add_task(state, {"w": jnp.ones((3, 4))}, {"w": -0.1})
    with pytest.raises(ValueError, match=r"gpm_add_task: `threshold` has no value for leaf 'w'"):
        cljax.gpm_add_task(state, {"w": jnp.ones((3, 4))}, {"b": 0.5})
    with pytest.raises(TypeError, match=r"gpm_add_task\(threshold\['w'\]=...\) must be a number"):
        cljax.gpm_add_task(state, {"w": jnp.ones((3, 4))}, {"w": "high"})
    with pytest.raises(ValueError, match=r"fot_add_task: leaf 'w' has shape \(3, 4\) in `grams`"):
        cljax.fot_add_task(state, {"w": jnp.ones((3, 4))}, 0.9)
    with pytest.raises(ValueError, match=r"fot_client_grams: leaf 'w' has shape \(4,\)"):
        cljax.fot_client_grams({"w": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"no GpmState in the optimizer state"):
        cljax.gpm_add_task(optax.adam(1e-3).init(params), {"w": jnp.ones((3, 4))}, 0.9)
    with pytest.raises(TypeError, match=r"gpm_add_task: `activations` is traced"):
        jax.jit(lambda a: cljax.gpm_add_task(state, {"w": a}, 0.9))(jnp.ones((3, 4)))
