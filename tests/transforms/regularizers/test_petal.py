"""Tests for PETAL (CA-10): a float64 NumPy transcription of the reference step (prior gradient,
model-wide quantile of the squared gradient with linear interpolation, Adam step, teacher EMA on
the unrestored weights, restore to the source), then the card's invariants and errors. For
PETAL-SRes every output entry is checked against the two float64 branches (restored / stepped)
and the restored fraction against its Bernoulli(q) distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from cljax.transforms.regularizers.petal import _global_quantile
from tests.helpers import assert_trees_close, assert_trees_equal

SHAPES = {"w": (5, 4), "b": (4,)}


def normal_tree(rng, scale=1.0):
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}


class NpAdam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, b1, b2, eps, 0, {}, {}

    def __call__(self, g):
        self.t += 1
        out = {}
        for k, x in g.items():
            self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * x
            self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * x * x
            out[k] = (
                -self.lr
                * (self.m[k] / (1 - self.b1**self.t))
                / (np.sqrt(self.v[k] / (1 - self.b2**self.t)) + self.eps)
            )
        return out


_TX = cljax.petal(optax.adam(0.01), restore_quantile=0.25, prior_weight=0.05, teacher_decay=0.9)
_STEP = jax.jit(_TX.update)


def test_petal_matches_numpy_reference_over_several_steps():
    rng = np.random.default_rng(0)
    q, wp, m, lr = 0.25, 0.05, 0.9, 0.01
    source = normal_tree(rng)
    mean, var = normal_tree(rng), {k: np.abs(v) + 0.1 for k, v in normal_tree(rng).items()}
    params = jax.tree.map(jnp.asarray, source)
    with jax.numpy_dtype_promotion("standard"):
        state = _TX.init(params)
        state = cljax.petal_set_prior(
            state, jax.tree.map(jnp.asarray, mean), jax.tree.map(jnp.asarray, var)
        )
        adam = NpAdam(lr)
        theta = {k: np.float64(v) for k, v in source.items()}
        teacher = dict(theta)
        for t in range(4):
            g32 = normal_tree(rng)
            out, state = _STEP(jax.tree.map(jnp.asarray, g32), state, params)
            g = {k: np.float64(g32[k]) + wp * (theta[k] - mean[k]) / (var[k] + 1e-6) for k in g32}
            fisher = {k: g[k] ** 2 for k in g}
            tau = np.quantile(np.concatenate([fisher[k].ravel() for k in sorted(fisher)]), q)
            u = adam(g)
            teacher = {k: m * teacher[k] + (1 - m) * (theta[k] + u[k]) for k in theta}
            want = {k: np.where(fisher[k] < tau, np.float64(source[k]) - theta[k], u[k]) for k in u}
            assert_trees_close(out, want, rtol=2e-4, atol=1e-6, err=f"step {t}:")
            assert_trees_close(cljax.petal_teacher(state), teacher, rtol=1e-5, atol=1e-6)
            assert (
                sum(int((fisher[k] < tau).sum()) for k in fisher) == 6
            )  # ⌈0.25 · 24⌉ entries below τ
            params = optax.apply_updates(params, out)
            theta = {k: theta[k] + want[k] for k in theta}


_QUANTILE = jax.jit(_global_quantile)


@pytest.mark.parametrize("q", [0.0, 0.03, 0.5, 0.77, 1.0])
def test_global_quantile_equals_numpy_linear_quantile_with_ties_and_zeros(q):
    rng = np.random.default_rng(5)
    for trial in range(4):
        leaves = [np.square(rng.standard_normal(s)).astype(np.float32) for s in [(5, 3), (7,), ()]]
        if trial % 2:
            leaves = [np.round(x) for x in leaves]  # many ties and zeros
        leaves[0][0, 0] = 0.0
        want = np.quantile(np.concatenate([x.ravel() for x in leaves]).astype(np.float64), q)
        got = _QUANTILE([jnp.asarray(x) for x in leaves], q)
        np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=0)


def test_petal_zero_quantile_restores_nothing_and_restored_entries_land_on_the_source():
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, normal_tree(rng))
    with jax.numpy_dtype_promotion("standard"):
        none = cljax.petal(optax.adam(0.01), restore_quantile=0.0, prior_weight=0.0)
        plain = optax.adam(0.01)
        s, ps = none.init(params), plain.init(params)
        g = jax.tree.map(jnp.asarray, normal_tree(rng))
        out, s = jax.jit(none.update)(g, s, params)
        want, _ = jax.jit(plain.update)(g, ps, params)
        assert_trees_equal(out, want)  # w_p = 0 removes the prior exactly; q = 0 restores nothing

        everything = cljax.petal(optax.adam(0.01), restore_quantile=1.0, prior_weight=0.0)
        s = everything.init(params)
        moved = jax.tree.map(lambda p: p + 0.3, params)
        out, s = everything.update(g, s, moved)
        landed = optax.apply_updates(moved, out)
    # q = 1: τ is the largest squared gradient, so every other entry is restored, to the
    # source up to one rounding of θ + (θ_src − θ).
    top = max(float(jnp.max(jnp.square(x))) for x in jax.tree.leaves(g))
    for k in params:
        mask = np.asarray(jnp.square(g[k])) < top
        np.testing.assert_allclose(
            np.asarray(landed[k])[mask], np.asarray(params[k])[mask], rtol=1e-6, atol=1e-7
        )
        np.testing.assert_array_equal(np.asarray(out[k])[~mask] != 0, True)
    assert sum(int((np.asarray(jnp.square(g[k])) < top).sum()) for k in g) == 23


def test_petal_threshold_is_model_wide():
    params = {"big": jnp.zeros(4), "small": jnp.zeros(4)}
    grads = {"big": jnp.array([10.0, 11.0, 12.0, 13.0]), "small": jnp.array([0.1, 0.2, 0.3, 0.4])}
    tx = cljax.petal(optax.sgd(1.0), restore_quantile=0.5, prior_weight=0.0)
    moved = jax.tree.map(lambda p: p + 1.0, params)
    out, _ = tx.update(grads, tx.init(params), moved)
    # Global median: every "small" entry is restored, no "big" one (a per-leaf quantile would
    # restore half of each).
    np.testing.assert_allclose(out["small"], -1.0)
    np.testing.assert_allclose(out["big"], -np.asarray(grads["big"]))


def test_petal_prior_gradient_and_frozen_teacher():
    params = {"w": jnp.array([1.0, 2.0, 3.0])}
    mean, var = {"w": jnp.array([0.0, 1.0, 5.0])}, {"w": jnp.array([1.0, 0.5, 2.0])}
    tx = cljax.petal(optax.sgd(1.0), restore_quantile=0.0, prior_weight=0.1, teacher_decay=1.0)
    state = cljax.petal_set_prior(tx.init(params), mean, var)
    out, state = tx.update({"w": jnp.zeros(3)}, state, params)
    prior = (
        0.1
        * (np.array([1.0, 2.0, 3.0]) - np.array([0.0, 1.0, 5.0]))
        / (np.array([1.0, 0.5, 2.0]) + 1e-6)
    )
    np.testing.assert_allclose(out["w"], -prior, rtol=1e-6)
    assert_trees_equal(cljax.petal_teacher(state), params)  # m = 1: the teacher never moves


def test_petal_targets_switch_on_source_confidence():
    rng = np.random.default_rng(2)
    teacher = rng.standard_normal((3, 4)).astype(np.float32)
    aug = rng.standard_normal((5, 3, 4)).astype(np.float32)
    softmax = lambda z: (
        np.exp(z - z.max(-1, keepdims=True))
        / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    )
    confident = np.array([[10.0, 0, 0, 0]] * 3, np.float32)
    unsure = np.zeros((3, 4), np.float32)
    got = cljax.petal_targets(teacher, confident, aug)
    np.testing.assert_allclose(got, softmax(np.float64(teacher)), rtol=1e-5)
    got = cljax.petal_targets(teacher, unsure, aug)
    np.testing.assert_allclose(got, softmax(np.float64(aug)).mean(0), rtol=1e-5)
    got = cljax.petal_targets(teacher, confident, aug, confidence_threshold=1.0)
    np.testing.assert_allclose(got, softmax(np.float64(aug)).mean(0), rtol=1e-5)


def test_petal_errors():
    with pytest.raises(ValueError, match=r"petal\(restore_quantile=...\) must be in \[0.0, 1.0\]"):
        cljax.petal(optax.adam(1e-3), restore_quantile=1.5)
    with pytest.raises(ValueError, match=r"petal\(teacher_decay=...\) must be in"):
        cljax.petal(optax.adam(1e-3), teacher_decay=-0.1)
    with pytest.raises(ValueError, match=r"petal\(variance_eps=...\) must be in \(0.0, inf\]"):
        cljax.petal(optax.adam(1e-3), variance_eps=0.0)
    with pytest.raises(
        TypeError, match=r"petal\(inner=...\) must be an optax GradientTransformation"
    ):
        cljax.petal(None)
    params = {"w": jnp.ones(2)}
    state = cljax.petal(optax.adam(1e-3)).init(params)
    with pytest.raises(ValueError, match="leaf 'w' of `variance` has a negative or NaN entry"):
        cljax.petal_set_prior(state, params, {"w": -jnp.ones(2)})
    with pytest.raises(ValueError, match="petal_set_prior: `mean` does not have the structure"):
        cljax.petal_set_prior(state, {"v": jnp.ones(2)}, params)
    with pytest.raises(ValueError, match="petal_teacher: no PetalState"):
        cljax.petal_teacher(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="petal_targets: needs teacher_logits"):
        cljax.petal_targets(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# PETAL-SRes: a random fraction restored instead of the Fisher-selected one.


def _sres_step(q, seed, grads, params, source, steps=1):
    """Runs `steps` PETAL-SRes steps (SGD(1), no prior); returns the outputs of every step."""
    tx = cljax.petal(
        optax.sgd(1.0), restore_quantile=q, prior_weight=0.0, restore="random", seed=seed
    )
    state = tx.init(source)
    outs = []
    for _ in range(steps):
        out, state = jax.jit(tx.update)(grads, state, params)
        outs.append(out)
    return outs, state


def _restored_mask(out, grads, params, source):
    """Per entry: True where the output is `source − params`, False where it is `−grads`.

    Asserts that every entry is one of the two (float64 NumPy reference of both branches).
    """
    masks = {}
    for k in out:
        o = np.asarray(out[k], np.float64)
        back = np.float64(np.asarray(source[k], np.float32) - np.asarray(params[k], np.float32))
        step = -np.asarray(grads[k], np.float64)
        is_back, is_step = np.isclose(o, back, rtol=0, atol=1e-7), np.isclose(o, step, atol=1e-7)
        assert np.all(is_back | is_step), f"leaf {k}: an entry is neither restored nor stepped"
        masks[k] = is_back
    return masks


def _big_trees(rng, n=2000):
    source = {"a": rng.standard_normal(n).astype(np.float32), "b": np.zeros(7, np.float32)}
    params = {k: v + np.float32(0.5) for k, v in source.items()}
    grads = {k: rng.uniform(1.0, 2.0, v.shape).astype(np.float32) for k, v in source.items()}
    return source, params, grads


def test_sres_restores_each_entry_with_probability_q_whatever_its_gradient():
    rng = np.random.default_rng(3)
    source, params, grads = _big_trees(rng)
    q, n = 0.3, 2007
    (out,), _ = _sres_step(q, 0, grads, params, source)
    mask = _restored_mask(out, grads, params, source)
    frac = sum(int(m.sum()) for m in mask.values()) / n
    assert abs(frac - q) < 5 * np.sqrt(q * (1 - q) / n)
    # The draw does not look at the gradient: other gradients, same state -> same mask.
    other = {k: v * 3.0 + 1.0 for k, v in grads.items()}
    (out2,), _ = _sres_step(q, 0, other, params, source)
    mask2 = _restored_mask(out2, other, params, source)
    for k in mask:
        np.testing.assert_array_equal(mask[k], mask2[k])


def test_sres_key_advances_and_seed_decides():
    rng = np.random.default_rng(4)
    source, params, grads = _big_trees(rng, 300)
    outs, state = _sres_step(0.5, 1, grads, params, source, steps=2)
    m1, m2 = (_restored_mask(o, grads, params, source)["a"] for o in outs)
    assert not np.array_equal(m1, m2)
    again, _ = _sres_step(0.5, 1, grads, params, source, steps=1)
    assert_trees_equal(again[0], outs[0])
    other_seed, _ = _sres_step(0.5, 2, grads, params, source, steps=1)
    assert not np.array_equal(np.asarray(other_seed[0]["a"]), np.asarray(outs[0]["a"]))
    assert state.key.dtype == jnp.uint32 and state.key.shape == (2,)


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_sres_extremes_and_teacher_sees_the_unrestored_step(q):
    rng = np.random.default_rng(5)
    source, params, grads = _big_trees(rng, 50)
    (out,), state = _sres_step(q, 0, grads, params, source)
    mask = _restored_mask(out, grads, params, source)
    for m in mask.values():
        assert np.all(m) if q == 1.0 else not np.any(m)
    # Teacher EMA (m = 0.999) on θ + u_SGD, not on the restored weights.
    for k in source:
        want = 0.999 * np.float64(source[k]) + 0.001 * (
            np.float64(params[k]) - np.float64(grads[k])
        )
        np.testing.assert_allclose(cljax.petal_teacher(state)[k], want, rtol=1e-5, atol=1e-6)


def test_fisher_mode_keeps_no_key_and_sres_errors():
    state = cljax.petal(optax.sgd(1.0)).init({"w": jnp.ones(2)})
    assert state.key is None
    with pytest.raises(ValueError, match=r"petal\(restore=...\) must be one of 'fisher', 'random'"):
        cljax.petal(optax.sgd(1.0), restore="uniform")
    with pytest.raises(ValueError, match=r"petal\(seed=...\) must be >= 0"):
        cljax.petal(optax.sgd(1.0), restore="random", seed=-1)
