"""Tests for A-GEM (OR-04) and GEM (OR-03).

A-GEM is checked against its closed form in float64 NumPy; GEM's dual QP against an independent
float64 brute-force KKT enumeration over active sets (small T). Invariants: bitwise identity
without conflict, every constraint satisfied (ridge 0), GEM with one task, margin 0 and ridge 0
equal to A-GEM, invalid task slots have no effect, inner products over all leaves jointly, the
sign rule for final updates (``where='update'``).
"""

from __future__ import annotations

import itertools

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


def rand_tree(rng, lead=(), scale=1.0):
    return {
        k: jnp.asarray(scale * rng.standard_normal(lead + s), jnp.float32)
        for k, s in SHAPES.items()
    }


def flat(tree, lead=0):
    """Concatenates the leaves in sorted key order (the dict's pytree order)."""
    parts = [
        np.asarray(tree[k], np.float64).reshape(tree[k].shape[:lead] + (-1,)) for k in sorted(tree)
    ]
    return np.concatenate(parts, axis=-1)


def unflat(vec):
    out, i = {}, 0
    for k in sorted(SHAPES):
        n = int(np.prod(SHAPES[k]))
        out[k] = vec[i : i + n].reshape(SHAPES[k])
        i += n
    return out


# ---------------------------------------------------------------------------------------------
# References.


def np_agem(g, ref):
    dot = g @ ref
    if dot < 0 and ref @ ref > 0:
        return g - dot / (ref @ ref) * ref
    return g


def np_gem_dual(G, g, margin, ridge):
    """Exact solution of min 1/2 v^T P v + q^T v s.t. v >= margin, by KKT enumeration."""
    t = G.shape[0]
    P = G @ G.T + ridge * np.eye(t)
    q = G @ g
    for free in itertools.product([False, True], repeat=t):
        free = np.array(free)
        v = np.full(t, float(margin))
        if free.any():
            fixed = ~free
            rhs = -q[free] - P[np.ix_(free, fixed)] @ v[fixed]
            v[free] = np.linalg.solve(P[np.ix_(free, free)], rhs)
        lam = P @ v + q
        if np.all(v[free] >= margin - 1e-10) and np.all(lam[~free] >= -1e-10):
            return v
    raise AssertionError("no KKT point found")


def np_gem(G, g, margin, ridge):
    if np.all(G @ g >= 0):
        return g
    return g + G.T @ np_gem_dual(G, g, margin, ridge)


# ---------------------------------------------------------------------------------------------
# A-GEM.


def test_agem_matches_closed_form_and_is_global():
    rng = np.random.default_rng(0)
    tx = cljax.agem()
    hits = 0
    for _ in range(6):
        g, ref = rand_tree(rng), rand_tree(rng)
        out, _ = jax.jit(tx.update)(g, tx.init(g), memory_grads=ref)
        want = np_agem(flat(g), flat(ref))
        assert_trees_close(out, unflat(want), rtol=1e-5, atol=1e-6)
        hits += flat(g) @ flat(ref) < 0
    assert 0 < hits < 6
    # Per-leaf projection would differ: the first leaf conflicts, the tree as a whole does not.
    g = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([3.0])}
    ref = {"a": jnp.array([-1.0, 0.0]), "b": jnp.array([1.0])}
    out, _ = tx.update(g, tx.init(g), memory_grads=ref)
    assert_trees_equal(out, g)


def test_agem_identity_without_conflict_and_zero_reference():
    rng = np.random.default_rng(1)
    tx = cljax.agem()
    g = rand_tree(rng)
    aligned = jax.tree.map(lambda x: 2.0 * x, g)
    out, _ = tx.update(g, tx.init(g), memory_grads=aligned)
    assert_trees_equal(out, g)
    out, _ = tx.update(g, tx.init(g), memory_grads=jax.tree.map(jnp.zeros_like, g))
    assert_trees_equal(out, g)
    zeros = jax.tree.map(jnp.zeros_like, g)
    out, _ = tx.update(zeros, tx.init(g), memory_grads=zeros)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_agem_constraint_and_idempotence(seed, scale):
    rng = np.random.default_rng(seed)
    tx = cljax.agem()
    g, ref = rand_tree(rng, scale=scale), rand_tree(rng)
    once, _ = tx.update(g, tx.init(g), memory_grads=ref)
    twice, _ = tx.update(once, tx.init(g), memory_grads=ref)
    f1, fr = flat(once), flat(ref)
    assert f1 @ fr >= -1e-6 * np.linalg.norm(flat(g)) * np.linalg.norm(fr)
    assert_trees_close(twice, once, rtol=1e-5, atol=1e-6 * scale)


def test_agem_where_update_and_gradient_sign():
    rng = np.random.default_rng(2)
    params = rand_tree(rng)
    g, ref = rand_tree(rng), rand_tree(rng)
    if flat(g) @ flat(ref) >= 0:
        ref = jax.tree.map(lambda x: -x, ref)
    # The paper: project the gradient, then SGD.
    tx = cljax.agem(inner=optax.sgd(0.1), where="gradient")
    u, _ = tx.update(g, tx.init(params), params, memory_grads=ref)
    assert_trees_close(u, unflat(-0.1 * np_agem(flat(g), flat(ref))), rtol=1e-5, atol=1e-6)
    # Projecting SGD's final update is the same for plain SGD.
    tx = cljax.agem(inner=optax.sgd(0.1))
    u2, _ = tx.update(g, tx.init(params), params, memory_grads=ref)
    assert_trees_close(u2, u, rtol=1e-5, atol=1e-6)
    # Adam's final update satisfies <u, g_ref> <= 0 when projected after it.
    tx = cljax.agem(inner=optax.adam(0.1))
    state = tx.init(params)
    for _ in range(3):
        u3, state = tx.update(rand_tree(rng), state, params, memory_grads=ref)
        assert flat(u3) @ flat(ref) <= 1e-6 * np.linalg.norm(flat(u3)) * np.linalg.norm(flat(ref))


# ---------------------------------------------------------------------------------------------
# GEM.


GEM_STEP = jax.jit(
    lambda g, refs, n, margin, ridge: cljax.gem(margin, ridge).update(
        g, optax.EmptyState(), task_grads=refs, num_tasks=n
    )[0]
)


_QP_CASES = [(t, m, r) for t in (1, 2, 4) for m, r in [(0.5, 1e-3), (0.0, 0.0), (0.1, 0.05)]]
_QP_FAST = {(1, 0.5, 1e-3), (2, 0.0, 0.0), (4, 0.5, 1e-3), (4, 0.1, 0.05)}


@pytest.mark.parametrize(
    "t,margin,ridge",
    [pytest.param(*c, marks=[] if c in _QP_FAST else [pytest.mark.slow]) for c in _QP_CASES],
)
def test_gem_matches_brute_force_qp(t, margin, ridge):
    rng = np.random.default_rng(10 * t + int(100 * margin))
    checked = 0
    for trial in range(4):
        g = rand_tree(rng)
        refs = rand_tree(rng, lead=(t,))
        # make the new gradient conflict with the first memory task
        refs = (
            jax.tree.map(lambda r, x: r.at[0].set(-x + 0.3 * r[0]), refs, g) if trial % 2 else refs
        )
        out = GEM_STEP(g, refs, t, margin, ridge)
        want = np_gem(flat(refs, 1), flat(g), margin, ridge)
        assert_trees_close(out, unflat(want), rtol=1e-4, atol=1e-4)
        checked += bool(np.any(flat(refs, 1) @ flat(g) < 0))
    assert checked >= 2


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), t=st.sampled_from([2, 3]))
def test_gem_satisfies_every_constraint_with_zero_ridge(seed, t):
    rng = np.random.default_rng(seed)
    g = rand_tree(rng)
    refs = rand_tree(rng, lead=(t,), scale=rng.uniform(0.1, 10))
    out = GEM_STEP(g, refs, t, 0.0, 0.0)
    G, gt = flat(refs, 1), flat(out)
    slack = G @ gt
    tol = 1e-5 * np.linalg.norm(gt) * np.linalg.norm(G, axis=1) + 1e-6
    assert np.all(slack >= -tol), slack


def test_gem_identity_without_violation_and_invalid_slots():
    rng = np.random.default_rng(3)
    g = rand_tree(rng)
    refs = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x, -x]), g)  # slot 2 conflicts
    out = GEM_STEP(g, refs, 2, 0.5, 1e-3)  # only slots 0 and 1 are valid: no violation
    assert_trees_equal(out, g)
    out_all = GEM_STEP(g, refs, 3, 0.5, 1e-3)
    assert not np.allclose(flat(out_all), flat(g))
    # Garbage in invalid slots has no effect.
    refs2 = rand_tree(rng, lead=(3,))
    refs2 = jax.tree.map(lambda r, x: r.at[0].set(-x), refs2, g)
    a = GEM_STEP(g, refs2, 1, 0.5, 1e-3)
    b = GEM_STEP(g, jax.tree.map(lambda r: r.at[1:].set(1e3), refs2), 1, 0.5, 1e-3)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-6)
    # no task at all
    assert_trees_equal(GEM_STEP(g, refs2, 0, 0.5, 1e-3), g)


def test_gem_one_task_no_margin_equals_agem():
    rng = np.random.default_rng(4)
    agem = cljax.agem()
    for _ in range(4):
        g, ref = rand_tree(rng), rand_tree(rng)
        a, _ = agem.update(g, agem.init(g), memory_grads=ref)
        b = GEM_STEP(g, jax.tree.map(lambda x: x[None], ref), 1, 0.0, 0.0)
        assert_trees_close(b, a, rtol=1e-5, atol=1e-6)


def test_gem_ill_conditioned_and_degenerate_memories():
    rng = np.random.default_rng(5)
    g = rand_tree(rng)
    base = jax.tree.map(lambda x: -x, g)
    # two nearly identical memory gradients and one zero gradient
    refs = jax.tree.map(lambda b: jnp.stack([b, b * (1 + 1e-4), jnp.zeros_like(b)]), base)
    out = GEM_STEP(g, refs, 3, 0.0, 0.0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
    G = flat(refs, 1)
    assert np.all(
        G @ flat(out) >= -1e-4 * np.linalg.norm(flat(out)) * np.linalg.norm(G, axis=1) - 1e-5
    )
    want = np_gem(G[:1], flat(g), 0.0, 0.0)  # the constraint set is the same as with one copy
    np.testing.assert_allclose(flat(out), want, atol=1e-3)


def test_gem_traced_count_does_not_recompile_and_bf16():
    rng = np.random.default_rng(6)
    tx = cljax.gem()
    traces = []

    @jax.jit
    def step(g, refs, n):
        traces.append(None)
        return tx.update(g, optax.EmptyState(), task_grads=refs, num_tasks=n)[0]

    g, refs = rand_tree(rng), rand_tree(rng, lead=(4,))
    for n in range(5):
        step(g, refs, jnp.asarray(n, jnp.int32))
    assert len(traces) == 1
    gb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
    out, _ = tx.update(gb, optax.EmptyState(), task_grads=refs, num_tasks=2)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_gem_where_update_constrains_final_adam_update():
    rng = np.random.default_rng(7)
    params = rand_tree(rng)
    tx = cljax.gem(margin=0.0, ridge=0.0, inner=optax.adam(0.1))
    state = tx.init(params)
    refs = rand_tree(rng, lead=(3,))
    for _ in range(3):
        u, state = tx.update(rand_tree(rng), state, params, task_grads=refs)
        G = flat(refs, 1)
        assert np.all(
            G @ flat(u) <= 1e-5 * np.linalg.norm(flat(u)) * np.linalg.norm(G, axis=1) + 1e-7
        )


@pytest.mark.slow
def test_box_qp_reports_convergence():
    from cljax.transforms.orthogonal.episodic import box_qp

    rng = np.random.default_rng(8)
    G = rng.standard_normal((5, 9))
    g = rng.standard_normal(9)
    v, done = box_qp(
        jnp.asarray(G @ G.T, jnp.float32),
        jnp.asarray(G @ g, jnp.float32),
        jnp.float32(0.2),
        jnp.ones(5, bool),
        40,
    )
    assert bool(done)
    np.testing.assert_allclose(v, np_gem_dual(G, g, 0.2, 0.0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_errors():
    rng = np.random.default_rng(9)
    g = rand_tree(rng)
    with pytest.raises(ValueError, match=r"gem\(margin=...\) must be in \[0.0, inf\]"):
        cljax.gem(margin=-1.0)
    with pytest.raises(ValueError, match=r"gem\(ridge=...\) must be in"):
        cljax.gem(ridge=-1.0)
    with pytest.raises(ValueError, match=r"gem\(qp_iters=...\) must be >= 1"):
        cljax.gem(qp_iters=0)
    with pytest.raises(ValueError, match=r"agem\(where=...\) needs `inner`"):
        cljax.agem(where="update")
    tx = cljax.gem()
    with pytest.raises(ValueError, match=r"gem: `num_tasks` must be in \[0, 2\]"):
        tx.update(g, optax.EmptyState(), task_grads=rand_tree(rng, lead=(2,)), num_tasks=3)
    with pytest.raises(
        ValueError, match=r"gem: `task_grads` must hold arrays with a leading task axis"
    ):
        tx.update(g, optax.EmptyState(), task_grads={"w": jnp.float32(1.0)})
    with pytest.raises(
        ValueError,
        match=r"gem: leaf 'w' has shape \(2, 4, 3\) in `task_grads`; it must be \(3, 4, 3\)",
    ):
        tx.update(
            g,
            optax.EmptyState(),
            task_grads={"b": jnp.ones((3, 3)), "s": jnp.ones(3), "w": jnp.ones((2, 4, 3))},
        )
    with pytest.raises(TypeError, match="memory_grads"):
        cljax.agem().update(g, optax.EmptyState())
    agem = cljax.agem()
    with pytest.raises(ValueError, match=r"agem: leaf 'b' has no entry in `memory_grads`"):
        agem.update(g, optax.EmptyState(), memory_grads={"w": g["w"], "s": g["s"]})
    with pytest.raises(
        ValueError, match=r"agem: `memory_grads` has leaf 'x', which the updates do not have"
    ):
        agem.update(g, optax.EmptyState(), memory_grads={**g, "x": g["s"]})
