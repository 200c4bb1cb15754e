"""Tests for the layer, module and row selection methods: MIGU (SP-14), bottom-layer freezing
(SP-22), surgical fine-tuning by Fisher layer scores (SP-15), FPF (SP-16), SLCA (SP-23) and IST (SP-19).

References: the MIGU row mask written in NumPy float64 (L1 normalization, `numpy.quantile`) around
optax's own inner update; `optax.partition` with `set_to_zero` for fixed leaf selections; optax run
on the sliced layers of a stack; analytic per-example gradients for the Fisher layer scores; `numpy.mean` / `numpy.cov` for SLCA's
streamed class statistics; a NumPy momentum that skips frozen layers, exact without-replacement
draw probabilities and the score update in NumPy for IST.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cljax
from cljax.transforms.sparse.layer_importance import (
    ist,
    ist_sample_suppressed,
    ist_update_importance,
)
from cljax.transforms.sparse.selection import (
    fpf,
    freeze_bottom_layers,
    migu,
    surgical_fine_tuning,
    surgical_layer_scores,
)
from cljax.transforms.sparse.slow_learner import (
    slca,
    slca_init_stats,
    slca_sample_features,
    slca_update_stats,
)
from tests.helpers import assert_trees_close, assert_trees_equal


def _tree(seed, shapes):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# SP-14 MIGU.

MIGU_SHAPES = {"kernel": (5, 6), "torch": (6, 5), "stack": (2, 3, 6), "bias": (6,), "free": (4,)}


def _np_row_mask(a, q):
    """The card's rule in float64: L1-normalize over the output units, keep ``a >= quantile``."""
    a = np.asarray(a, np.float64)
    total = a.sum(axis=-1, keepdims=True)
    a = np.where(total > 0, a / np.where(total > 0, total, 1.0), a)
    return a >= np.quantile(a, q, axis=-1, keepdims=True)


def _migu_acts(seed):
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(rng.uniform(0, 2, 6), jnp.float32),
        "torch": jnp.asarray(rng.uniform(0, 2, 6), jnp.float32),
        "stack": jnp.asarray(rng.uniform(0, 2, (2, 6)), jnp.float32),
        "bias": jnp.asarray(rng.uniform(0, 2, 6), jnp.float32),
    }


def _migu_leaf_masks(acts, q):
    """Leaf-shaped masks: Flax kernels mask columns, the PyTorch layout masks rows."""
    m = {k: _np_row_mask(v, q) for k, v in acts.items()}
    return {
        "kernel": np.broadcast_to(m["kernel"][None, :], (5, 6)),
        "torch": np.broadcast_to(m["torch"][:, None], (6, 5)),
        "stack": np.broadcast_to(m["stack"][:, None, :], (2, 3, 6)),
        "bias": m["bias"],
        "free": np.ones(4, bool),
    }


def _split_migu(q, inner):
    """MIGU with the PyTorch-layout leaf handled by a second transform (`output_axis=-2`)."""
    labels = {k: "torch" if k == "torch" else "flax" for k in MIGU_SHAPES}
    return optax.partition(
        {
            "flax": migu(inner, threshold=q),
            "torch": migu(inner, threshold=q, output_axis=-2),
        },
        labels,
    )


@pytest.mark.parametrize("q", [0.0, 0.3, 0.75])
def test_migu_matches_numpy_mask_around_the_inner_update(q):
    params = _tree(0, MIGU_SHAPES)
    inner = optax.adamw(0.1, weight_decay=0.1)
    tx = _split_migu(q, inner)
    state = tx.init(params)
    ref_state = inner.init(params)
    for step in range(3):
        grads, acts = _tree(10 + step, MIGU_SHAPES), _migu_acts(20 + step)
        masks = _migu_leaf_masks(acts, q)
        updates, state = tx.update(grads, state, params, activations=acts)
        gated = jax.tree.map(lambda g, m: g * m, grads, masks)
        want, ref_state = inner.update(gated, ref_state, params)
        want = jax.tree.map(lambda u, m: u * m, want, masks)
        assert_trees_close(updates, want, rtol=1e-6, atol=1e-7, err=f"step {step}")
        params = optax.apply_updates(params, updates)


def test_migu_masked_rows_are_bit_identical_under_momentum():
    params = _tree(1, MIGU_SHAPES)
    tx = _split_migu(0.5, optax.adamw(0.1, weight_decay=0.1))
    state, step = tx.init(params), jax.jit(functools.partial(tx.update))
    for i in range(5):
        acts = _migu_acts(30 + i)
        masks = _migu_leaf_masks(acts, 0.5)
        updates, state = step(_tree(40 + i, MIGU_SHAPES), state, params, activations=acts)
        new = optax.apply_updates(params, updates)
        for k in ("kernel", "torch", "stack", "bias"):
            np.testing.assert_array_equal(
                np.asarray(new[k])[~masks[k]], np.asarray(params[k])[~masks[k]]
            )
            assert np.all(np.asarray(new[k])[masks[k]] != np.asarray(params[k])[masks[k]])
        params = new


def test_migu_threshold_zero_equals_inner_and_zero_activations_are_finite():
    params = _tree(2, MIGU_SHAPES)
    grads = _tree(3, MIGU_SHAPES)
    inner = optax.adam(0.1)
    want, _ = inner.update(grads, inner.init(params), params)
    tx = _split_migu(0.0, inner)
    got, _ = tx.update(grads, tx.init(params), params, activations=_migu_acts(4))
    assert_trees_close(got, want, rtol=1e-6, atol=0)
    flax_only = migu(inner, threshold=0.0)
    acts = {k: v for k, v in _migu_acts(4).items() if k != "torch"}
    got, _ = flax_only.update(grads, flax_only.init(params), params, activations=acts)
    assert_trees_equal(got, want)
    zeros = jax.tree.map(jnp.zeros_like, acts)
    strict = migu(inner, threshold=0.9)
    got, _ = strict.update(grads, strict.init(params), params, activations=zeros)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(got))
    assert_trees_equal(got, want)  # all units tie at the quantile: every unit is kept


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 40),
    layers=st.integers(1, 3),
    q=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_migu_fraction_of_updated_units_is_one_minus_q(n, layers, q, seed, dtype):
    position = q * (n - 1)  # keep float32 and float64 rounding off an exact order statistic
    assume(q in (0.0, 1.0) or abs(position - round(position)) > 1e-3)
    rng = np.random.default_rng(seed)
    acts = rng.permutation(np.arange(1, layers * n + 1)).reshape(layers, n).astype(np.float32)
    params = {"w": jnp.ones((layers, 3, n), dtype)}
    tx = migu(optax.sgd(1.0), threshold=q)
    updates, _ = _jit_update(tx)(
        {"w": jnp.ones((layers, 3, n), dtype)}, tx.init(params), params, {"w": jnp.asarray(acts)}
    )
    assert updates["w"].dtype == dtype
    kept = np.asarray(updates["w"][:, 0, :] != 0)
    np.testing.assert_array_equal(kept, _np_row_mask(acts, q))
    # distinct values: the units at or above the q-quantile, ``n - ceil(q * (n - 1))`` of them
    np.testing.assert_array_equal(kept.sum(axis=1), n - int(np.ceil(position - 1e-3)))


def _jit_update(tx):
    return jax.jit(lambda u, s, p, a: tx.update(u, s, p, activations=a))


def test_migu_averages_activations_over_a_mapped_axis():
    n_dev = 8
    params = {"w": jnp.ones((2, 6))}
    tx = migu(optax.sgd(1.0), threshold=0.5, axis_name="batch")
    acts = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (n_dev, 6)), jnp.float32)

    @functools.partial(jax.pmap, axis_name="batch")
    def step(a):
        return tx.update({"w": jnp.ones((2, 6))}, tx.init(params), params, activations={"w": a})[0]

    got = np.asarray(step(acts)["w"])
    want = _np_row_mask(np.asarray(acts, np.float64).mean(axis=0), 0.5)
    for r in range(n_dev):
        np.testing.assert_array_equal(got[r][0] != 0, want)


def test_migu_errors():
    with pytest.raises(ValueError, match=r"migu\(threshold=...\) must be in \[0.0, 1.0\]"):
        migu(optax.sgd(1.0), threshold=1.5)
    with pytest.raises(ValueError, match=r"migu\(output_axis=...\) must be one of -1, -2"):
        migu(optax.sgd(1.0), threshold=0.5, output_axis=0)
    tx = migu(optax.sgd(1.0), threshold=0.5)
    params = {"w": jnp.ones((3, 4)), "s": jnp.ones(())}
    state = tx.init(params)
    with pytest.raises(
        ValueError,
        match=r"migu: leaf 'w' has shape \(3, 4\); its activations must have shape \(4,\)",
    ):
        tx.update(params, state, activations={"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"migu: leaf 's' is a scalar"):
        tx.update(params, state, activations={"s": jnp.ones(())})
    with pytest.raises(TypeError, match="activations"):
        tx.update(params, state)


# ---------------------------------------------------------------------------------------------
# SP-22 freeze the bottom layers.

FREEZE_SHAPES = {"embed": (6, 4), "block0": (4, 4), "block1": (4, 4), "head": (4, 3), "norm": (4,)}
FREEZE_DEPTH = {"embed": None, "block0": 0, "block1": 1, "head": None, "norm": None}


def _run(tx, params, steps, seed=50, **extra):
    state, step = tx.init(params), jax.jit(tx.update)
    for i in range(steps):
        grads = jax.tree.map(
            lambda p, k=i: jnp.asarray(
                np.random.default_rng(seed + k).standard_normal(p.shape), p.dtype
            ),
            params,
        )
        updates, state = step(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


def test_freeze_bottom_layers_matches_optax_partition():
    params = _tree(6, FREEZE_SHAPES)
    inner = optax.adamw(0.05, weight_decay=0.1)
    tx = freeze_bottom_layers(
        inner, num_frozen=1, depth=FREEZE_DEPTH, embeddings=cljax.select("embed")
    )
    labels = {
        "embed": "frozen",
        "block0": "frozen",
        "block1": "train",
        "head": "train",
        "norm": "train",
    }
    ref = optax.partition({"train": inner, "frozen": optax.set_to_zero()}, labels)
    got, state = _run(tx, params, 4)
    want, ref_state = _run(ref, params, 4)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    for k in ("embed", "block0"):
        assert_trees_equal(got[k], params[k])
    assert _size(state) == _size(ref_state)  # frozen leaves hold no state


def test_freeze_bottom_layers_stacked_blocks_keep_state_for_trained_blocks_only():
    params = {
        "embed": jnp.ones((6, 4)),
        "blocks": _tree(7, {"b": (4, 3, 3)})["b"],
        "head": jnp.ones(3),
    }
    depth = {"embed": None, "blocks": 1, "head": None}  # the stack holds blocks 1..4
    inner = optax.adam(0.1)
    tx = freeze_bottom_layers(inner, num_frozen=3, depth=depth, stacked=cljax.select("blocks"))
    got, state = _run(tx, params, 3)
    mu = cljax.find_state(state, optax.ScaleByAdamState).mu
    assert mu["blocks"].shape == (2, 3, 3)  # blocks 3 and 4
    np.testing.assert_array_equal(got["blocks"][:2], params["blocks"][:2])
    sliced = {"embed": params["embed"], "blocks": params["blocks"][2:], "head": params["head"]}
    # optax on the sliced stack, with the same gradients (rows 2: of the full draw)
    ref_state, ref = inner.init(sliced), sliced
    for i in range(3):
        full = jax.tree.map(
            lambda p, k=i: jnp.asarray(
                np.random.default_rng(50 + k).standard_normal(p.shape), p.dtype
            ),
            params,
        )
        grads = {**full, "blocks": full["blocks"][2:]}
        u, ref_state = inner.update(grads, ref_state, ref)
        ref = optax.apply_updates(ref, u)
    np.testing.assert_allclose(got["blocks"][2:], ref["blocks"], rtol=1e-6)
    np.testing.assert_allclose(got["embed"], ref["embed"], rtol=1e-6)


def test_freeze_bottom_layers_with_nothing_frozen_is_the_inner_optimizer():
    params = _tree(8, FREEZE_SHAPES)
    inner = optax.adam(0.1)
    got, _ = _run(freeze_bottom_layers(inner, num_frozen=0, depth=FREEZE_DEPTH), params, 3)
    want, _ = _run(inner, params, 3)
    assert_trees_equal(got, want)


def test_freeze_bottom_layers_errors():
    with pytest.raises(ValueError, match=r"freeze_bottom_layers\(num_frozen=...\) must be >= 0"):
        freeze_bottom_layers(optax.sgd(1.0), num_frozen=-1, depth=FREEZE_DEPTH)
    params = {"a": jnp.ones(2), "s": jnp.ones(())}
    with pytest.raises(
        TypeError, match=r"freeze_bottom_layers: `depth` of leaf 'a' must be an int or None"
    ):
        freeze_bottom_layers(optax.sgd(1.0), num_frozen=1, depth={"a": "x", "s": None}).init(params)
    with pytest.raises(ValueError, match=r"freeze_bottom_layers: `depth` of leaf 'a' must be >= 0"):
        freeze_bottom_layers(optax.sgd(1.0), num_frozen=1, depth={"a": -1, "s": None}).init(params)
    with pytest.raises(ValueError, match=r"freeze_bottom_layers: leaf 's' is a scalar"):
        freeze_bottom_layers(
            optax.sgd(1.0), num_frozen=1, depth={"a": 0, "s": 0}, stacked=cljax.select("s")
        ).init(params)
    with pytest.raises(
        ValueError, match=r"freeze_bottom_layers: `depth` has no label for leaf 's'"
    ):
        freeze_bottom_layers(optax.sgd(1.0), num_frozen=1, depth={"a": 0}).init(params)


# ---------------------------------------------------------------------------------------------
# SP-15 surgical fine-tuning.


def _np_per_example_grads(w1, w2, x, y):
    """Gradients of ``0.5 * ||x w1 w2 - y||^2`` per example, in float64."""
    h = x @ w1
    r = h @ w2 - y
    g2 = np.einsum("ni,nj->nij", h, r)
    g1 = np.einsum("ni,nj->nij", x, r @ w2.T)
    return g1, g2


def test_surgical_layer_scores_are_layer_sums_of_the_fisher():
    rng = np.random.default_rng(9)
    params = {
        "l1": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "l2": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
        "stack": jnp.asarray(rng.standard_normal((2, 2, 2)), jnp.float32),
    }
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))

    def loss(p, ex):
        out = ex["x"] @ p["l1"] @ p["l2"] + 0.0 * jnp.sum(p["stack"])
        return 0.5 * jnp.sum((out - ex["y"]) ** 2)

    batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
    fisher = cljax.fisher_diagonal(loss, params, batch)
    fisher = {**fisher, "stack": jnp.asarray(rng.uniform(0, 1, (2, 2, 2)), jnp.float32)}
    layers = {"l1": "a", "l2": "b", "stack": "s"}
    scores = surgical_layer_scores(fisher, layers=layers, stacked=cljax.select("stack"))
    g1, g2 = _np_per_example_grads(
        np.asarray(params["l1"], np.float64), np.asarray(params["l2"], np.float64), x, y
    )
    want = {
        "a": (g1**2).mean(axis=0).sum(),
        "b": (g2**2).mean(axis=0).sum(),
        ("s", 0): np.asarray(fisher["stack"][0], np.float64).sum(),
        ("s", 1): np.asarray(fisher["stack"][1], np.float64).sum(),
    }
    assert list(scores) == list(want)
    for k in want:
        assert float(scores[k]) >= 0
        np.testing.assert_allclose(float(scores[k]), want[k], rtol=1e-5)
    # two leaves with one label form one layer
    merged = surgical_layer_scores(fisher, layers={"l1": "a", "l2": "a", "stack": None})
    np.testing.assert_allclose(float(merged["a"]), want["a"] + want["b"], rtol=1e-5)


def test_surgical_fine_tuning_trains_the_top_layers_only():
    params = {
        "a": jnp.ones(3),
        "b": jnp.ones((2, 2)),
        "c": jnp.ones(2),
        "stack": _tree(10, {"s": (3, 2)})["s"],
    }
    layers = {"a": "a", "b": "b", "c": None, "stack": "s"}
    scores = {"a": 1.0, "b": 4.0, ("s", 0): 4.0, ("s", 1): 0.5, ("s", 2): 2.0}
    inner = optax.adam(0.1)
    tx = surgical_fine_tuning(
        inner, scores=scores, num_layers=3, layers=layers, stacked=cljax.select("stack")
    )
    got, state = _run(tx, params, 3)
    # top 3: "b" and ("s", 0) (tie at 4.0, both in), then ("s", 2)
    for k in ("a", "c"):
        assert_trees_equal(got[k], params[k])
    np.testing.assert_array_equal(got["stack"][1], params["stack"][1])
    assert np.all(np.asarray(got["stack"])[[0, 2]] != np.asarray(params["stack"])[[0, 2]])
    assert cljax.find_state(state, optax.ScaleByAdamState).mu["stack"].shape == (2, 2)
    labels = {"a": "frozen", "b": "train", "c": "frozen", "stack": "train"}
    ref = optax.partition({"train": inner, "frozen": optax.set_to_zero()}, labels)
    want, _ = _run(ref, {**params}, 3)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)
    # ties go to the earlier layer
    tie = surgical_fine_tuning(
        inner, scores={"x": 1.0, "y": 1.0}, num_layers=1, layers={"x": "x", "y": "y"}
    )
    u, _ = tie.update(
        {"x": jnp.ones(1), "y": jnp.ones(1)}, tie.init({"x": jnp.ones(1), "y": jnp.ones(1)})
    )
    assert float(u["x"][0]) != 0 and float(u["y"][0]) == 0


def test_surgical_fine_tuning_errors():
    layers = {"a": "a"}
    with pytest.raises(
        ValueError, match=r"surgical_fine_tuning\(scores=...\) must be a non-empty mapping"
    ):
        surgical_fine_tuning(optax.sgd(1.0), scores={}, num_layers=1, layers=layers)
    with pytest.raises(
        ValueError,
        match=r"surgical_fine_tuning\(num_layers=2\) must be <= the number of scored layers 1",
    ):
        surgical_fine_tuning(optax.sgd(1.0), scores={"a": 1.0}, num_layers=2, layers=layers)
    with pytest.raises(ValueError, match=r"surgical_fine_tuning: the score of layer 'a' is nan"):
        surgical_fine_tuning(
            optax.sgd(1.0), scores={"a": float("nan")}, num_layers=1, layers=layers
        )
    with pytest.raises(
        TypeError, match=r"surgical_fine_tuning: the score of layer 'a' must be a concrete number"
    ):
        jax.jit(
            lambda s: (
                surgical_fine_tuning(
                    optax.sgd(1.0), scores={"a": s}, num_layers=1, layers=layers
                ).init
            )
        )(1.0)
    with pytest.raises(ValueError, match=r"surgical_layer_scores: leaf 'a' is a scalar"):
        surgical_layer_scores({"a": jnp.ones(())}, layers=layers, stacked=cljax.select("a"))


# ---------------------------------------------------------------------------------------------
# SP-16 FPF.


def test_fpf_trains_only_the_selected_modules_statelessly_elsewhere():
    params = _tree(11, {"conv1": (3, 3), "bn": (3,), "conv2": (3, 3), "fc": (3, 2)})
    inner = optax.sgd(0.1, momentum=0.9)
    tx = fpf(inner, modules=cljax.select("bn|fc"))
    labels = {"conv1": "frozen", "bn": "train", "conv2": "frozen", "fc": "train"}
    ref = optax.partition({"train": inner, "frozen": optax.set_to_zero()}, labels)
    got, state = _run(tx, params, 4)
    want, ref_state = _run(ref, params, 4)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert_trees_equal(got["conv1"], params["conv1"])
    assert _size(state) == _size(ref_state)


@settings(max_examples=15, deadline=None)
@given(
    n_layers=st.integers(1, 5),
    num_frozen=st.integers(0, 6),
    offset=st.integers(0, 2),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_freeze_bottom_layers_property_exact_frozen_blocks(n_layers, num_frozen, offset, dtype):
    params = {"stack": jnp.ones((n_layers, 2), dtype), "head": jnp.ones((2,), dtype)}
    tx = freeze_bottom_layers(
        optax.sgd(1.0),
        num_frozen=num_frozen,
        depth={"stack": offset, "head": None},
        stacked=cljax.select("stack"),
    )
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    assert updates["stack"].dtype == dtype
    trained = np.asarray(updates["stack"][:, 0] != 0)
    np.testing.assert_array_equal(trained, offset + np.arange(n_layers) >= num_frozen)
    assert np.all(np.asarray(updates["head"]) == -1)


# ---------------------------------------------------------------------------------------------
# SP-23 SLCA.


def test_slca_equals_two_learning_rates_in_optax_partition():
    params = _tree(12, {"body": (4, 3), "norm": (3,), "head": (3, 2)})
    eta, rho = 0.1, 0.01
    tx = slca(optax.sgd(eta, momentum=0.9), head=cljax.select("head"), ratio=rho)
    labels = {"body": "slow", "norm": "slow", "head": "fast"}
    ref = optax.partition(
        {"slow": optax.sgd(eta * rho, momentum=0.9), "fast": optax.sgd(eta, momentum=0.9)}, labels
    )
    got, _ = _run(tx, params, 4)
    want, _ = _run(ref, params, 4)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    adamw = optax.adamw(eta, weight_decay=0.1)
    got, _ = _run(slca(adamw, head=cljax.select("head"), ratio=rho), params, 3)
    ref = optax.partition({"slow": optax.adamw(eta * rho, weight_decay=0.1), "fast": adamw}, labels)
    want, _ = _run(ref, params, 3)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_slca_ratio_one_is_plain_fine_tuning():
    params = _tree(13, {"body": (4, 3), "head": (3, 2)})
    inner = optax.adam(0.1)
    got, _ = _run(slca(inner, head=cljax.select("head"), ratio=1.0), params, 3)
    want, _ = _run(inner, params, 3)
    assert_trees_equal(got, want)


def _np_class_stats(x, y, num_classes):
    means, covs = [], []
    for c in range(num_classes):
        xc = x[y == c].astype(np.float64)
        means.append(xc.mean(axis=0) if len(xc) else np.zeros(x.shape[1]))
        covs.append(
            np.cov(xc, rowvar=False, ddof=1) if len(xc) > 1 else np.zeros((x.shape[1],) * 2)
        )
    return np.stack(means), np.stack(covs)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 30),
    cuts=st.lists(st.integers(0, 30), max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_slca_streamed_class_statistics_equal_batch_statistics(n, cuts, seed):
    rng = np.random.default_rng(seed)
    num_classes, dim = 4, 3
    x = rng.standard_normal((n, dim)).astype(np.float32) * 3 + 1
    y = rng.integers(0, num_classes, n)
    full, diag = (
        slca_init_stats(num_classes, dim),
        slca_init_stats(num_classes, dim, covariance="diag"),
    )
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            full = slca_update_stats(full, x[lo:hi], y[lo:hi])
            diag = slca_update_stats(diag, x[lo:hi], y[lo:hi])
    means, covs = _np_class_stats(x, y, num_classes)
    counts = np.bincount(y, minlength=num_classes)
    np.testing.assert_array_equal(np.asarray(full.count), counts)
    np.testing.assert_allclose(np.asarray(full.mean), means, rtol=1e-5, atol=1e-5)
    got_cov = np.asarray(full.m2) / np.maximum(counts - 1, 1)[:, None, None]
    np.testing.assert_allclose(got_cov, covs, rtol=1e-4, atol=1e-4)
    got_var = np.asarray(diag.m2) / np.maximum(counts - 1, 1)[:, None]
    np.testing.assert_allclose(got_var, np.diagonal(covs, axis1=1, axis2=2), rtol=1e-4, atol=1e-4)


def test_slca_samples_follow_the_class_gaussians():
    rng = np.random.default_rng(14)
    a = rng.standard_normal((3, 3))
    x0 = rng.standard_normal((400, 3)) @ a.T + np.array([1.0, -2.0, 0.5])
    x = np.concatenate([x0, np.ones((5, 3)) * 4.0]).astype(np.float32)  # class 1: a point mass
    y = np.concatenate([np.zeros(400, int), np.ones(5, int)])
    means, covs = _np_class_stats(x, y, 3)
    for covariance in ("full", "diag"):
        stats = slca_update_stats(slca_init_stats(3, 3, covariance=covariance), x, y)
        feats, labels, valid = jax.jit(slca_sample_features, static_argnums=2)(
            stats, jax.random.key(0), 20000
        )
        feats = np.asarray(feats, np.float64)
        np.testing.assert_array_equal(np.asarray(labels), np.repeat(np.arange(3), 20000))
        np.testing.assert_array_equal(np.asarray(valid), np.repeat([True, True, False], 20000))
        assert np.isfinite(feats).all()
        c0 = feats[:20000]
        np.testing.assert_allclose(c0.mean(axis=0), means[0], atol=0.1)
        want = covs[0] if covariance == "full" else np.diag(np.diag(covs[0]))
        np.testing.assert_allclose(np.cov(c0, rowvar=False), want, atol=0.1 * np.abs(covs[0]).max())
        np.testing.assert_allclose(feats[20000:40000], 4.0, atol=1e-5)  # zero covariance
        np.testing.assert_array_equal(feats[40000:], 0.0)  # never seen


def test_slca_errors():
    with pytest.raises(ValueError, match=r"slca\(ratio=...\) must be in \[0.0, inf\]"):
        slca(optax.sgd(1.0), head=cljax.select("head"), ratio=-0.1)
    with pytest.raises(ValueError, match=r"slca: `head` has no entry for leaf 'b'"):
        tx = slca(optax.sgd(1.0), head={"a": True}, ratio=0.1)
        tx.update(
            {"a": jnp.ones(1), "b": jnp.ones(1)}, tx.init({"a": jnp.ones(1), "b": jnp.ones(1)})
        )
    with pytest.raises(
        ValueError, match=r"slca_init_stats\(covariance=...\) must be one of 'full', 'diag'"
    ):
        slca_init_stats(2, 2, covariance="low")
    with pytest.raises(ValueError, match=r"slca_init_stats\(num_classes=...\) must be >= 1"):
        slca_init_stats(0, 2)
    stats = slca_init_stats(2, 3)
    with pytest.raises(
        ValueError,
        match=r"slca_update_stats\(features=...\) must have shape \(N, 3\), got \(4, 2\)",
    ):
        slca_update_stats(stats, jnp.ones((4, 2)), jnp.zeros(4, int))
    with pytest.raises(
        ValueError, match=r"slca_update_stats\(labels=...\) must have shape \(4,\), got \(3,\)"
    ):
        slca_update_stats(stats, jnp.ones((4, 3)), jnp.zeros(3, int))
    with pytest.raises(ValueError, match=r"slca_sample_features\(num_per_class=...\) must be >= 1"):
        slca_sample_features(stats, jax.random.key(0), 0)


# ---------------------------------------------------------------------------------------------
# SP-19 IST.


def _ist(inner, n_layers=4, num_active=2, interval=1, seed=0):
    return ist(
        inner,
        layers=cljax.select("lora"),
        num_active=num_active,
        num_layers=n_layers,
        interval=interval,
        seed=seed,
    )


def test_ist_updates_only_active_layers_like_momentum_that_skips_frozen_layers():
    rng = np.random.default_rng(15)
    params = {"lora": jnp.asarray(rng.standard_normal((4, 2, 3)), jnp.float32), "head": jnp.ones(3)}
    lr, m = 0.1, 0.9
    tx = _ist(optax.sgd(lr, momentum=m), num_active=2, interval=2)
    state, step = tx.init(params), jax.jit(tx.update)
    p_ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p_ref.items()}
    actives = []
    for i in range(6):
        grads = _tree(60 + i, {"lora": (4, 2, 3), "head": (3,)})
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        active = np.asarray(state.active)
        actives.append(tuple(active))
        rows = np.zeros(4, bool)
        rows[active] = True
        g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        buf["lora"][rows] = (
            m * buf["lora"][rows] + g["lora"][rows]
        )  # frozen layers keep their buffer
        buf["head"] = m * buf["head"] + g["head"]
        p_ref["lora"][rows] -= lr * buf["lora"][rows]
        p_ref["head"] -= lr * buf["head"]
        assert len(set(active.tolist())) == 2
        assert np.count_nonzero(np.any(np.asarray(updates["lora"]) != 0, axis=(1, 2))) == 2
    assert actives[0] == actives[1] and actives[2] == actives[3]  # a draw every 2 steps
    np.testing.assert_allclose(np.asarray(params["lora"]), p_ref["lora"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["head"]), p_ref["head"], rtol=1e-5, atol=1e-6)


def test_ist_with_every_layer_active_is_the_inner_optimizer():
    params = _tree(16, {"lora": (3, 2, 2), "head": (2,)})
    inner = optax.adamw(0.1, weight_decay=0.1)
    got, _ = _run(_ist(inner, n_layers=3, num_active=3), params, 3)
    want, _ = _run(inner, params, 3)
    assert_trees_equal(got, want)


def _np_pair_probs(w):
    """Exact probabilities of each unordered pair under two weighted draws without replacement."""
    w = np.asarray(w, np.float64)
    total, n = w.sum(), len(w)
    return {
        (a, b): w[a] / total * w[b] / (total - w[a]) + w[b] / total * w[a] / (total - w[b])
        for a in range(n)
        for b in range(a + 1, n)
    }


def test_ist_draws_follow_the_scores():
    params = {"lora": jnp.ones((4, 2))}
    score = jnp.asarray([-2.0, 0.0, 1.0, 3.0], jnp.float32)
    tx = _ist(optax.sgd(0.1), num_active=1)
    state = tx.init(params)._replace(score=score)

    def body(s, _):
        _, s = tx.update({"lora": jnp.ones((4, 2))}, s)
        return s, s.active[0]

    _, drawn = jax.jit(lambda s: jax.lax.scan(body, s, None, length=4000))(state)
    freq = np.bincount(np.asarray(drawn), minlength=4) / 4000
    w = 1 / (1 + np.exp(np.asarray(score, np.float64)))  # sigmoid(-s): trained more when low
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.03)

    sets = jax.vmap(lambda k: ist_sample_suppressed(state, k, num_sets=1, num_suppressed=2))(
        jax.random.split(jax.random.key(1), 6000)
    )
    sets = np.asarray(sets)[:, 0]
    probs = _np_pair_probs(1 / (1 + np.exp(-np.asarray(score, np.float64))))
    for pair, p in probs.items():
        np.testing.assert_allclose(np.mean(np.all(sets == pair, axis=1)), p, atol=0.02)


def test_ist_sample_suppressed_gives_distinct_sorted_sets():
    params = {"lora": jnp.ones((4, 2))}
    state = _ist(optax.sgd(0.1)).init(params)
    sets = np.asarray(ist_sample_suppressed(state, jax.random.key(2), num_sets=6, num_suppressed=2))
    assert len({tuple(s) for s in sets}) == 6  # all C(4, 2) sets
    assert np.all(np.diff(sets, axis=1) > 0)


def test_ist_update_importance_matches_numpy():
    params = {"lora": jnp.ones((5, 2))}
    state = _ist(optax.sgd(0.1), n_layers=5).init(params)
    score0 = np.asarray([0.5, -1.0, 0.0, 2.0, 0.3])
    state = state._replace(score=jnp.asarray(score0, jnp.float32))
    wrapped = (optax.EmptyState(), state)  # found by type inside any opt_state
    sets = np.asarray([[0, 2], [1, 3], [2, 4]])
    losses = np.asarray([0.7, 1.9, 1.1])
    new = ist_update_importance(wrapped, sets, losses, rate=10.0)[1]
    r = np.exp(-losses)
    r = r - r.mean()
    p = 1 / (1 + np.exp(-score0))
    want = score0.copy()
    for k in range(3):
        for i in sets[k]:
            want[i] += 10.0 * r[k] * p[i] * (1 - p[i])
    np.testing.assert_allclose(np.asarray(new.score), want, rtol=1e-5, atol=1e-6)
    assert_trees_equal(new.inner_state, state.inner_state)


@settings(max_examples=10, deadline=None)
@given(
    n_layers=st.integers(1, 6),
    data=st.data(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_ist_property_exactly_num_active_layers_change(n_layers, data, dtype):
    num_active = data.draw(st.integers(1, n_layers))
    seed = data.draw(st.integers(0, 2**31 - 1))
    params = {"lora": jnp.ones((n_layers, 3), dtype), "head": jnp.ones(2, dtype)}
    tx = _ist(optax.adam(0.1), n_layers=n_layers, num_active=num_active, seed=seed)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    assert updates["lora"].dtype == dtype
    changed = np.asarray(jnp.any(updates["lora"] != 0, axis=1))
    np.testing.assert_array_equal(np.flatnonzero(changed), np.asarray(state.active))
    assert np.all(np.asarray(updates["head"]) != 0)


def test_ist_errors():
    with pytest.raises(ValueError, match=r"ist\(num_active=3\) must be <= num_layers=2"):
        _ist(optax.sgd(0.1), n_layers=2, num_active=3)
    with pytest.raises(
        ValueError, match=r"ist: layer leaves have a leading axis of size 3; expected num_layers=4"
    ):
        _ist(optax.sgd(0.1)).init({"lora": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match=r"ist: leaf 'lora' is a scalar"):
        _ist(optax.sgd(0.1)).init({"lora": jnp.ones(())})
    with pytest.raises(
        ValueError, match=r"ist: layer leaves must share their leading \(layer\) axis"
    ):
        _ist(optax.sgd(0.1)).init({"lora": {"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))}})
    state = _ist(optax.sgd(0.1)).init({"lora": jnp.ones((4, 2))})
    with pytest.raises(
        ValueError,
        match=r"ist_sample_suppressed\(num_suppressed=5\) must be <= the number of layers 4",
    ):
        ist_sample_suppressed(state, jax.random.key(0), num_suppressed=5)
    with pytest.raises(
        ValueError, match=r"ist_sample_suppressed\(num_sets=7\) must be <= the 6 distinct sets"
    ):
        ist_sample_suppressed(state, jax.random.key(0), num_sets=7, num_suppressed=2)
    with pytest.raises(
        ValueError, match=r"ist_update_importance\(suppressed=...\) must have shape \(R, n_s\)"
    ):
        ist_update_importance(state, jnp.zeros(3, int), jnp.zeros(3))
    with pytest.raises(
        ValueError, match=r"ist_update_importance\(losses=...\) must have shape \(2,\)"
    ):
        ist_update_importance(state, jnp.zeros((2, 1), int), jnp.zeros(3))
    with pytest.raises(ValueError, match="IstState"):
        ist_update_importance(optax.EmptyState(), jnp.zeros((2, 1), int), jnp.zeros(2))
