"""Tests for OGD (OR-06) and PCA-OGD (OR-07).

References: two-pass Gram–Schmidt and the residual SVD written in float64 NumPy on the flattened
parameter vector. Invariants: projected updates orthogonal to every stored vector, orthonormal
basis, empty basis = identity, ``k = n`` PCA-OGD spans OGD's space, predictions on stored
samples move by O(lr^2) after one SGD step, capacity errors, no recompilation across tasks.
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
from cljax.transforms.orthogonal import gradient_subspace as ogd_module
from tests.helpers import assert_trees_equal

SHAPES = {"b": (3,), "w": (4, 3)}  # sorted: the flattening order of the dict
P = 15


def rand_tree(rng, lead=()):
    return {k: jnp.asarray(rng.standard_normal(lead + s), jnp.float32) for k, s in SHAPES.items()}


def flat(tree, lead=0):
    return np.concatenate(
        [
            np.asarray(tree[k], np.float64).reshape(tree[k].shape[:lead] + (-1,))
            for k in sorted(tree)
        ],
        axis=-1,
    )


def np_gs(basis, vecs, rtol=1e-4):
    rows = list(basis)
    for v in vecs:
        b = np.array(rows).reshape(-1, len(v))
        r = v - b.T @ (b @ v)
        r = r - b.T @ (b @ r)
        if np.linalg.norm(r) > rtol * np.linalg.norm(v):
            rows.append(r / np.linalg.norm(r))
    return np.array(rows).reshape(-1, vecs.shape[1])


def np_pca(basis, vecs, k):
    b = basis.reshape(-1, vecs.shape[1])
    resid = vecs.T - b.T @ (b @ vecs.T)
    u, _, _ = np.linalg.svd(resid, full_matrices=False)
    return np.vstack([b, u[:, :k].T])


def basis_rows(state):
    count = int(state.count)
    return flat(state.basis, lead=1)[:count]


def test_gram_schmidt_matches_numpy_and_projection():
    rng = np.random.default_rng(0)
    params = rand_tree(rng)
    tx = cljax.ogd(capacity=8)
    state = tx.init(params)
    ref = np.zeros((0, P))
    for n in (3, 4):
        grads = rand_tree(rng, lead=(n,))
        state = cljax.ogd_add_task(state, grads)
        ref = np_gs(ref, flat(grads, 1))
        rows = basis_rows(state)
        assert rows.shape == ref.shape
        np.testing.assert_allclose(rows, ref, atol=1e-5)
        np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-5)
    g = rand_tree(rng)
    out, _ = jax.jit(tx.update)(g, state)
    want = flat(g) - ref.T @ (ref @ flat(g))
    np.testing.assert_allclose(flat(out), want, atol=1e-5)
    np.testing.assert_allclose(ref @ flat(out), 0.0, atol=1e-5 * np.linalg.norm(flat(g)))


def test_dependent_vectors_are_skipped():
    rng = np.random.default_rng(1)
    tx = cljax.ogd(capacity=4)
    grads = rand_tree(rng, lead=(2,))
    dup = jax.tree.map(lambda x: jnp.concatenate([x, x[:1] * 3.0, x[:1] - x[1:]]), grads)
    state = cljax.ogd_add_task(tx.init(rand_tree(rng)), dup)
    assert int(state.count) == 2


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_pca_ogd_matches_numpy(k):
    rng = np.random.default_rng(2 + k)
    tx = cljax.ogd(capacity=7)
    state = tx.init(rand_tree(rng))
    first = rand_tree(rng, lead=(2,))
    state = cljax.ogd_add_task(state, first)
    ref = np_gs(np.zeros((0, P)), flat(first, 1))
    second = rand_tree(rng, lead=(5,))
    state = cljax.ogd_add_task(state, second, num_components=k)
    want = np_pca(ref, flat(second, 1), k)
    rows = basis_rows(state)
    assert rows.shape == want.shape
    np.testing.assert_allclose(rows.T @ rows, want.T @ want, atol=1e-5)
    np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-5)


def test_pca_with_k_equal_n_spans_ogd_and_low_rank_is_capped():
    rng = np.random.default_rng(5)
    params = rand_tree(rng)
    grads = rand_tree(rng, lead=(4,))
    a = cljax.ogd_add_task(cljax.ogd(6).init(params), grads)
    b = cljax.ogd_add_task(cljax.ogd(6).init(params), grads, num_components=4)
    ra, rb = basis_rows(a), basis_rows(b)
    np.testing.assert_allclose(ra.T @ ra, rb.T @ rb, atol=1e-5)
    # Rank-2 gradients: asking for 4 components stores 2.
    low = jax.tree.map(lambda x: jnp.concatenate([x[:2], x[:2] * 2.0]), grads)
    c = cljax.ogd_add_task(cljax.ogd(6).init(params), low, num_components=4)
    assert int(c.count) == 2


def test_empty_basis_is_identity_and_zero_inputs_are_finite():
    rng = np.random.default_rng(6)
    params = rand_tree(rng)
    tx = cljax.ogd(capacity=3)
    state = tx.init(params)
    g = rand_tree(rng)
    assert_trees_equal(tx.update(g, state)[0], g)
    state = cljax.ogd_add_task(state, jax.tree.map(lambda x: jnp.zeros((2,) + x.shape), params))
    assert int(state.count) == 0
    state = cljax.ogd_add_task(
        state, jax.tree.map(lambda x: jnp.zeros((2,) + x.shape), params), num_components=2
    )
    assert int(state.count) == 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_predictions_on_stored_samples_move_second_order():
    """One SGD step with OGD changes the stored logits by O(lr^2) (first-order term removed)."""
    rng = np.random.default_rng(7)
    params = {
        "w1": jnp.asarray(rng.standard_normal((4, 6)) * 0.5, jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((6, 3)) * 0.5, jnp.float32),
    }
    logit_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    xs = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, 5))
    grads = cljax.ogd_output_gradients(logit_fn, params, xs, ys)
    tx = optax.chain(cljax.ogd(capacity=10), optax.sgd(1.0))
    state = cljax.ogd_add_task(tx.init(params), grads)
    new_grad = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params
    )
    before = jax.vmap(lambda x, y: logit_fn(params, x)[y])(xs, ys)

    @jax.jit
    def moved_logits(lr):
        u, _ = tx.update(new_grad, state, params)
        moved = jax.tree.map(lambda p, d: p + lr * d, params, u)
        return jax.vmap(lambda x, y: logit_fn(moved, x)[y])(xs, ys)

    change = lambda lr: np.max(np.abs(np.asarray(moved_logits(jnp.float32(lr)) - before)))

    plain = np.max(np.abs(flat(grads, 1) @ flat(new_grad)))
    assert plain > 1e-2  # without projection the first-order change is not small
    big, small = change(1e-1), change(1e-2)
    assert small < 2e-3
    assert big / small > 30  # quadratic, not linear, in the step size


@pytest.mark.parametrize("where", ["update", "gradient"])
def test_adam_update_mode_keeps_orthogonality(where):
    rng = np.random.default_rng(8)
    params = rand_tree(rng)
    tx = cljax.ogd(
        capacity=4, inner=optax.adam(1e-2) if where == "update" else optax.sgd(1e-2), where=where
    )
    state = cljax.ogd_add_task(tx.init(params), rand_tree(rng, lead=(3,)))
    rows = basis_rows(state)
    for _ in range(3):
        u, state = tx.update(rand_tree(rng), state, params)
        np.testing.assert_allclose(rows @ flat(u), 0.0, atol=1e-6)


def test_no_recompilation_across_tasks_and_partition():
    rng = np.random.default_rng(9)
    params = {**rand_tree(rng), "frozen": jnp.zeros(2)}
    labels = {"b": "t", "w": "t", "frozen": "f"}
    tx = optax.partition({"t": cljax.ogd(capacity=9), "f": optax.set_to_zero()}, labels)
    traces = []

    @jax.jit
    def step(state, g):
        traces.append(None)
        return tx.update(g, state, params)

    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    before = ogd_module._GRAM_SCHMIDT._cache_size()
    for _ in range(3):
        grads = {**rand_tree(rng, lead=(2,)), "frozen": jnp.ones((2, 2))}  # ignored: not trained
        state = cljax.ogd_add_task(state, grads)
        u, _ = step(state, g)
    assert len(traces) == 1
    assert ogd_module._GRAM_SCHMIDT._cache_size() - before <= 1
    assert int(cljax.find_state(state, cljax.OgdState).count) == 6


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([1, 4]))
def test_property_orthogonal_to_stored_vectors(seed, n):
    rng = np.random.default_rng(seed)
    tx = cljax.ogd(capacity=8)
    state = cljax.ogd_add_task(tx.init(rand_tree(rng)), rand_tree(rng, lead=(n,)))
    rows = basis_rows(state)
    np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-5)
    g = rand_tree(rng)
    out, _ = tx.update(g, state)
    np.testing.assert_allclose(rows @ flat(out), 0.0, atol=1e-5 * np.linalg.norm(flat(g)))


def test_output_gradients_variants():
    rng = np.random.default_rng(10)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)}
    xs = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    logit_fn = lambda p, x: x @ p["w"]
    gtl = cljax.ogd_output_gradients(logit_fn, params, xs, jnp.array([1, 3]))
    want = np.zeros((2, 3, 4))
    want[0, :, 1], want[1, :, 3] = xs[0], xs[1]
    np.testing.assert_allclose(gtl["w"], want, atol=1e-6)
    ave = cljax.ogd_output_gradients(logit_fn, params, xs, variant="ave")
    np.testing.assert_allclose(
        ave["w"], np.repeat(np.asarray(xs)[:, :, None] / 4, 4, axis=2), atol=1e-6
    )
    every = cljax.ogd_output_gradients(logit_fn, params, xs, variant="all")
    assert every["w"].shape == (8, 3, 4)
    np.testing.assert_allclose(every["w"][5, :, 1], xs[1], atol=1e-6)


def test_errors():
    rng = np.random.default_rng(11)
    params = rand_tree(rng)
    state = cljax.ogd(capacity=2).init(params)
    with pytest.raises(ValueError, match=r"ogd\(capacity=...\) must be >= 1"):
        cljax.ogd(0)
    with pytest.raises(ValueError, match=r"ogd\(where=...\) needs `inner`"):
        cljax.ogd(2, where="gradient")
    with pytest.raises(
        ValueError, match=r"ogd_add_task: the basis needs 3 vectors, but the capacity is 2"
    ):
        cljax.ogd_add_task(state, rand_tree(rng, lead=(3,)))
    with pytest.raises(
        ValueError, match=r"ogd_add_task: leaf 'w' has shape \(2, 3, 4\) in `gradients`"
    ):
        cljax.ogd_add_task(state, {"b": jnp.ones((2, 3)), "w": jnp.ones((2, 3, 4))})
    with pytest.raises(ValueError, match=r"ogd_add_task: leaf 'w' has no entry in `gradients`"):
        cljax.ogd_add_task(state, {"b": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"ogd_add_task: `gradients` has leaf 'x'"):
        cljax.ogd_add_task(state, {**rand_tree(rng, lead=(1,)), "x": jnp.ones((1, 2))})
    with pytest.raises(ValueError, match=r"ogd_add_task\(num_components=...\) must be >= 1"):
        cljax.ogd_add_task(state, rand_tree(rng, lead=(1,)), num_components=0)
    with pytest.raises(ValueError, match=r"no OgdState in the optimizer state"):
        cljax.ogd_add_task(optax.sgd(0.1).init(params), rand_tree(rng, lead=(1,)))
    with pytest.raises(TypeError, match=r"ogd_add_task: `gradients` is traced"):
        jax.jit(lambda g: cljax.ogd_add_task(state, g))(rand_tree(rng, lead=(1,)))
    with pytest.raises(ValueError, match=r"ogd_output_gradients\(variant='gtl'\) needs `labels`"):
        cljax.ogd_output_gradients(lambda p, x: x, params, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"ogd_output_gradients\(variant=...\) must be one of"):
        cljax.ogd_output_gradients(lambda p, x: x, params, jnp.ones((2, 3)), variant="max")
    with pytest.raises(TypeError, match=r"ogd_output_gradients\(logit_fn=...\) must be callable"):
        cljax.ogd_output_gradients(3, params, jnp.ones((2, 3)), jnp.zeros(2, int))


def test_many_vectors_in_one_call_equal_one_by_one():
    rng = np.random.default_rng(12)
    params = rand_tree(rng)
    grads = rand_tree(rng, lead=(5,))
    tx = cljax.ogd(capacity=8)
    once = cljax.ogd_add_task(tx.init(params), grads)
    state = tx.init(params)
    for i in range(5):
        state = cljax.ogd_add_task(state, jax.tree.map(lambda x, i=i: x[i : i + 1], grads))
    assert int(state.count) == int(once.count) == 5
    np.testing.assert_allclose(basis_rows(state), basis_rows(once), atol=1e-6)
    np.testing.assert_allclose(basis_rows(once), np_gs(np.zeros((0, P)), flat(grads, 1)), atol=1e-5)
    # Rows beyond the count stay zero.
    assert np.all(flat(once.basis, lead=1)[5:] == 0.0)


@pytest.mark.parametrize("k", [None, 2])
def test_donate_writes_in_place_with_the_same_result(k):
    rng = np.random.default_rng(13)
    params = {**rand_tree(rng), "frozen": jnp.zeros(2)}
    labels = {"b": "t", "w": "t", "frozen": "f"}
    tx = optax.partition({"t": cljax.ogd(capacity=7), "f": optax.set_to_zero()}, labels)
    first = {**rand_tree(rng, lead=(2,)), "frozen": jnp.ones((2, 2))}
    second = {**rand_tree(rng, lead=(3,)), "frozen": jnp.ones((3, 2))}
    plain = cljax.ogd_add_task(cljax.ogd_add_task(tx.init(params), first), second, num_components=k)
    old = cljax.ogd_add_task(tx.init(params), first, donate=True)
    new = cljax.ogd_add_task(old, second, num_components=k, donate=True)
    old_basis = jax.tree.leaves(cljax.find_state(old, cljax.OgdState).basis)
    assert old_basis and all(x.is_deleted() for x in old_basis)
    got, want = cljax.find_state(new, cljax.OgdState), cljax.find_state(plain, cljax.OgdState)
    assert int(got.count) == int(want.count) == (5 if k is None else 4)
    trained = lambda s: {name: s.basis[name] for name in ("b", "w")}
    np.testing.assert_allclose(flat(trained(got), lead=1), flat(trained(want), lead=1), atol=1e-6)


def test_donate_is_skipped_when_the_vectors_may_not_fit():
    rng = np.random.default_rng(14)
    params = rand_tree(rng)
    state = cljax.ogd(capacity=2).init(params)
    with pytest.raises(
        ValueError, match=r"ogd_add_task: the basis needs 3 vectors, but the capacity is 2"
    ):
        cljax.ogd_add_task(state, rand_tree(rng, lead=(3,)), donate=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    # Three vectors of rank two fit in two rows; the state passed in stays valid.
    two = rand_tree(rng, lead=(2,))
    dup = jax.tree.map(lambda x: jnp.concatenate([x, x[:1] * 2.0]), two)
    out = cljax.ogd_add_task(state, dup, donate=True)
    assert int(out.count) == 2
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    np.testing.assert_allclose(basis_rows(out), np_gs(np.zeros((0, P)), flat(two, 1)), atol=1e-5)


@pytest.mark.parametrize("k", [None, 3])
def test_bf16_gradients_match_their_float32_values(k):
    rng = np.random.default_rng(15)
    params = rand_tree(rng)
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), rand_tree(rng, lead=(3,)))
    tx = cljax.ogd(capacity=4)
    a = cljax.ogd_add_task(tx.init(params), grads, num_components=k)
    b = cljax.ogd_add_task(
        tx.init(params), jax.tree.map(lambda x: x.astype(jnp.float32), grads), num_components=k
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(a.basis))
    np.testing.assert_allclose(flat(a.basis, lead=1), flat(b.basis, lead=1), atol=1e-6)


@pytest.mark.parametrize("pca", [False, True])
def test_task_boundary_memory_does_not_grow_with_capacity(pca):
    """XLA's own accounting: the work needs a few model-sized vectors (OGD) or a few copies of
    the given gradients (PCA-OGD) beyond the basis, whatever the capacity, and the donated
    version writes its output into the basis buffers."""
    shapes = [(64, 32), (32,), (4, 2, 8)]
    vector = 4 * sum(int(np.prod(s)) for s in shapes)
    n = 3
    S = jax.ShapeDtypeStruct
    for cap in (2, 24):
        args = (
            tuple(S((cap,) + s, jnp.float32) for s in shapes),
            S((), jnp.int32),
            tuple(S((n,) + s, jnp.float32) for s in shapes),
        )
        if pca:
            plain, donated = ogd_module._PRINCIPAL, ogd_module._PRINCIPAL_DONATED
            args += (S((), jnp.int32),)
        else:
            plain, donated = ogd_module._GRAM_SCHMIDT, ogd_module._GRAM_SCHMIDT_DONATED
        stats = plain.lower(*args).compile().memory_analysis()
        assert stats.temp_size_in_bytes <= ((2 * n + 1) if pca else 3) * vector
        stats = donated.lower(*args).compile().memory_analysis()
        assert stats.alias_size_in_bytes == cap * vector
