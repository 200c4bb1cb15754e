"""Tests for the regularizers family's ready-made optimizers: `ewc_adamw`, `l2_anchor_adamw` and
`mas_adamw`, coupled (the penalty is a loss term: optax.adamw on the penalised gradient) and
decoupled (a float64 NumPy AdamW whose direction gets the penalty gradient added).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from tests.helpers import assert_trees_close

SHAPES = {"w": (4, 3), "b": (3,)}
LR, WD = 0.05, 0.01


def normal_tree(rng):
    return {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}


def run(opt, params, grads_seq, prepare=lambda s: s):
    with jax.numpy_dtype_promotion("standard"):
        state = prepare(opt.init(params))
        for g in grads_seq:
            u, state = opt.update(g, state, params)
            params = optax.apply_updates(params, u)
    return params


def coupled_reference(params, grads_seq, penalty_grad):
    opt = optax.adamw(LR, weight_decay=WD)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        for g in grads_seq:
            g = jax.tree.map(jnp.add, g, penalty_grad(params))
            u, state = opt.update(g, state, params)
            params = optax.apply_updates(params, u)
    return params


def decoupled_reference(params, grads_seq, penalty_grad):
    p = {k: np.float64(v) for k, v in params.items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    for t, g in enumerate(grads_seq, start=1):
        pen = penalty_grad(p)
        for k in p:
            gk = np.float64(g[k])
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.999 * v[k] + 0.001 * gk * gk
            d = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
            p[k] = p[k] - LR * (d + pen[k] + WD * p[k])
    return p


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, normal_tree(rng))
    anchor = normal_tree(rng)
    importance = {k: np.abs(v) for k, v in normal_tree(rng).items()}
    grads = [jax.tree.map(jnp.asarray, normal_tree(rng)) for _ in range(4)]
    return params, anchor, importance, grads


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_ewc_and_mas_adamw(problem, decoupled):
    params, anchor, importance, grads = problem
    lam = 0.7
    for name, factory, boundary, factor in (
        ("ewc", cljax.ewc_adamw, cljax.ewc_consolidate, 1.0),
        ("mas", cljax.mas_adamw, cljax.mas_consolidate, 2.0),
    ):
        opt = factory(LR, lam, weight_decay=WD, decoupled=decoupled)
        prepare = lambda s, b=boundary: b(
            s, jax.tree.map(jnp.asarray, anchor), jax.tree.map(jnp.asarray, importance)
        )
        got = run(opt, params, grads, prepare)
        pen = lambda p, factor=factor: {
            k: factor * lam * importance[k] * (p[k] - anchor[k]) for k in p
        }
        want = (
            decoupled_reference(params, grads, pen)
            if decoupled
            else coupled_reference(params, grads, pen)
        )
        assert_trees_close(got, want, rtol=2e-5, atol=1e-6, err=f"{name}:")


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_l2_anchor_adamw_pulls_toward_the_initial_parameters(problem, decoupled):
    params, _, _, grads = problem
    lam = 0.3
    start = {k: np.asarray(v) for k, v in params.items()}
    opt = cljax.l2_anchor_adamw(LR, lam, weight_decay=WD, decoupled=decoupled)
    got = run(opt, params, grads)
    pen = lambda p: {k: lam * (p[k] - start[k]) for k in p}
    want = (
        decoupled_reference(params, grads, pen)
        if decoupled
        else coupled_reference(params, grads, pen)
    )
    assert_trees_close(got, want, rtol=2e-5, atol=1e-6)
    masked = cljax.l2_anchor_adamw(LR, lam, anchor_mask={"w": False, "b": True})
    plain = optax.adamw(LR, weight_decay=0.0)
    got = run(masked, params, grads)
    ref = run(plain, params, grads)
    np.testing.assert_allclose(got["w"], ref["w"], rtol=1e-6)  # no penalty where the mask is False
    assert not np.allclose(np.asarray(got["b"]), np.asarray(ref["b"]))


def test_optimizer_errors():
    with pytest.raises(TypeError, match=r"ewc_adamw\(decoupled=...\) must be a bool"):
        cljax.ewc_adamw(1e-3, 1.0, decoupled="yes")
    with pytest.raises(ValueError, match=r"ewc\(strength=...\) must be in"):
        cljax.ewc_adamw(1e-3, -1.0)
