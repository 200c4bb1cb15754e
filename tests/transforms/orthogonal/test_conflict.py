"""Tests for the FedGP conflict-dropping projection (OR-15), against float64 NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close

SHAPES = {"b": (3,), "w": (2, 3)}


def rand_tree(rng, lead=()):
    return {k: jnp.asarray(rng.standard_normal(lead + s), jnp.float32) for k, s in SHAPES.items()}


def flat(tree, lead=0):
    return np.concatenate(
        [
            np.asarray(tree[k], np.float64).reshape(tree[k].shape[:lead] + (-1,))
            for k in sorted(tree)
        ],
        -1,
    )


def unflat(vec):
    return {"b": vec[:3], "w": vec[3:].reshape(2, 3)}


def np_proj_plus(a, b):
    return max(a @ b, 0.0) / (b @ b) * b if b @ b > 0 else np.zeros_like(b)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1))
def test_project_matches_numpy_and_never_conflicts(seed):
    rng = np.random.default_rng(seed)
    a, b = rand_tree(rng), rand_tree(rng)
    out = cljax.fedgp_project(a, b)
    assert_trees_close(out, unflat(np_proj_plus(flat(a), flat(b))), rtol=1e-5, atol=1e-6)
    assert flat(out) @ flat(b) >= 0
    again = cljax.fedgp_project(out, b)  # idempotent
    assert_trees_close(again, out, rtol=1e-5, atol=1e-6)


def test_project_edge_cases_and_global_inner_product():
    rng = np.random.default_rng(0)
    a = rand_tree(rng)
    zero = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    assert_trees_close(cljax.fedgp_project(a, zero), zero, atol=0)
    neg = {k: -v for k, v in a.items()}
    assert_trees_close(cljax.fedgp_project(a, neg), zero, atol=0)
    # leaf 'b' alone conflicts, the whole vector does not
    a = {"b": jnp.array([-1.0, 0.0, 0.0]), "w": jnp.full((2, 3), 1.0)}
    ref = {"b": jnp.array([1.0, 0.0, 0.0]), "w": jnp.full((2, 3), 1.0)}
    out = cljax.fedgp_project(a, ref)
    assert float(out["b"][0]) > 0


def test_aggregate_matches_numpy():
    rng = np.random.default_rng(1)
    target, sources = rand_tree(rng), rand_tree(rng, lead=(4,))
    w = np.array([0.1, 0.2, 0.3, 0.4])
    out = cljax.fedgp_aggregate(target, sources, beta=0.3, weights=jnp.asarray(w))
    t = flat(target)
    want = 0.3 * t + 0.7 * sum(w[i] * np_proj_plus(flat(sources, 1)[i], t) for i in range(4))
    assert_trees_close(out, unflat(want), rtol=1e-5, atol=1e-6)
    uniform = cljax.fedgp_aggregate(target, sources)
    want = 0.5 * t + 0.5 * sum(np_proj_plus(s, t) for s in flat(sources, 1)) / 4
    assert_trees_close(uniform, unflat(want), rtol=1e-5, atol=1e-6)
    assert_trees_close(cljax.fedgp_aggregate(target, sources, beta=1.0), target, atol=0)


def test_errors():
    rng = np.random.default_rng(2)
    target = rand_tree(rng)
    with pytest.raises(ValueError, match=r"fedgp_aggregate\(beta=...\) must be in \[0.0, 1.0\]"):
        cljax.fedgp_aggregate(target, rand_tree(rng, lead=(2,)), beta=2.0)
    with pytest.raises(
        ValueError, match=r"fedgp_aggregate: `weights` has shape \(3,\); it must be \(2,\)"
    ):
        cljax.fedgp_aggregate(target, rand_tree(rng, lead=(2,)), weights=jnp.ones(3))
    with pytest.raises(
        ValueError, match=r"fedgp_aggregate: `sources` must hold arrays with a leading source axis"
    ):
        cljax.fedgp_aggregate(target, {"b": jnp.float32(1.0)})
    with pytest.raises(
        ValueError, match=r"fedgp_aggregate: leaf 'b' has shape \(2, 4\) in `sources`"
    ):
        cljax.fedgp_aggregate(target, {"b": jnp.ones((2, 4)), "w": jnp.ones((2, 2, 3))})
    with pytest.raises(ValueError, match=r"fedgp_project: leaf 'w' has no entry in `reference`"):
        cljax.fedgp_project(target, {"b": target["b"]})
