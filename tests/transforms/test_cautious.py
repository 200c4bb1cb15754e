"""Tests for the cautious-decay family: CA-01 (cautious), CA-02 (CWD), CA-03 (UPGD), CA-05 (Grams)
and OR-08 (AdamP).

Every rule is checked against an independent float64 NumPy transcription of its card over several
steps, then against the card's invariants, edge cases, hypothesis properties and argument errors.
All cljax transforms here sit before `optax.scale_by_learning_rate` and see a gradient-aligned
direction ``d``; the reference loops apply ``θ ← θ − η·out`` between steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

# A tree with a matrix, a vector, a 3-D leaf and a scalar leaf.
SHAPES = {"w": (4, 3), "b": (3,), "k": (2, 3, 2), "s": ()}
LR = 0.1
STEPS = 6


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def normal_tree(rng, shapes=SHAPES, scale=1.0):
    """A dict of float32 NumPy arrays drawn from N(0, scale^2)."""
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in shapes.items()}


def _f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def compare_trajectory(
    tx, np_step, params, grad_fn, *, steps=STEPS, lr=LR, full=False, rtol=1e-5, atol=1e-6, jit=False
):
    """Runs the cljax transform (float32; eager, or jitted with `jit`) and a float64 NumPy step
    side by side.

    `grad_fn(t, params_f32)` returns fresh float32 gradients (the same ones feed both sides);
    `np_step(t, grads64, params64)` returns the NumPy output. With ``full=False`` both sides apply
    ``θ ← θ − lr·out``; with ``full=True`` the outputs are final updates and are added.
    Returns the list of cljax outputs.
    """
    jparams = _jnp(params)
    nparams = _f64(params)
    state = tx.init(jparams)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for t in range(1, steps + 1):
        grads = grad_fn(t, jax.tree.map(np.asarray, jparams))
        out, state = update(_jnp(grads), state, jparams)
        expected = np_step(t, _f64(grads), nparams)
        assert_trees_close(out, expected, rtol=rtol, atol=atol, err=f"step {t}:")
        outs.append(out)
        if full:
            jparams = optax.apply_updates(jparams, out)
            nparams = {k: nparams[k] + expected[k] for k in nparams}
        else:
            jparams = jax.tree.map(lambda p, u: p - lr * u, jparams, out)
            nparams = {k: nparams[k] - lr * expected[k] for k in nparams}
    return outs


def random_grads(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return lambda t, params: normal_tree(rng, shapes)


class NpAdam:
    """Float64 Adam moments: returns ``m̂ / (√v̂ + ε)``."""

    def __init__(self, shapes, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}

    def direction(self, t, g):
        b1, b2 = self.b1, self.b2
        out = {}
        for k in g:
            self.m[k] = b1 * self.m[k] + (1 - b1) * g[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * g[k] ** 2
            m_hat = self.m[k] / (1 - b1**t)
            v_hat = self.v[k] / (1 - b2**t)
            out[k] = m_hat / (np.sqrt(v_hat) + self.eps)
        return out


class NpLion:
    """Float64 Lion: ``c = sign(b1 m + (1 − b1) g)``, then ``m ← b2 m + (1 − b2) g``."""

    def __init__(self, shapes, b1=0.9, b2=0.99):
        self.b1, self.b2 = b1, b2
        self.m = {k: np.zeros(s) for k, s in shapes.items()}

    def direction(self, t, g):
        del t
        out = {}
        for k in g:
            out[k] = np.sign(self.b1 * self.m[k] + (1 - self.b1) * g[k])
            self.m[k] = self.b2 * self.m[k] + (1 - self.b2) * g[k]
        return out


def np_cautious(d, g, normalization, clamp, ref=None):
    """CA-01 per tensor: ``φ = 1[ref·g > 0]`` then the chosen normalisation."""
    ref = d if ref is None else ref
    phi = (ref * g > 0).astype(np.float64)
    if normalization == "mean_clamp":
        scale = 1.0 / max(phi.mean(), clamp)
    elif normalization == "mean_eps":
        scale = 1.0 / (phi.mean() + clamp)
    elif normalization == "numel_sum":
        scale = phi.size / (phi.sum() + 1.0)
    else:
        scale = 1.0
    return d * phi * scale


def np_cwd(d, p, lam):
    """CA-02: ``d + λ·1[d·θ ≥ 0]·θ``."""
    return d + lam * (d * p >= 0) * p


# ---------------------------------------------------------------------------------------------
# CA-01: cautious mask, NumPy references.


@pytest.mark.parametrize("normalization", ["mean_clamp", "mean_eps", "numel_sum", "none"])
def test_cautious_adam_matches_numpy(normalization):
    clamp = 0.05 if normalization == "mean_eps" else 1e-3
    adam = NpAdam(SHAPES)

    def np_step(t, g, p):
        del p
        d = adam.direction(t, g)
        return {k: np_cautious(d[k], g[k], normalization, clamp) for k in d}

    tx = cljax.cautious(optax.scale_by_adam(), normalization=normalization, clamp=clamp)
    outs = compare_trajectory(
        tx,
        np_step,
        normal_tree(np.random.default_rng(1)),
        random_grads(2),
        jit=normalization == "mean_clamp",
    )
    # The run exercised the mask: some coordinates were zeroed.
    assert any(np.any(np.asarray(o["w"]) == 0) or np.any(np.asarray(o["k"]) == 0) for o in outs)


@pytest.mark.parametrize("normalization", ["mean_clamp", "numel_sum"])
@pytest.mark.parametrize("mask_source", ["direction", "momentum"])
def test_cautious_lion_matches_numpy(normalization, mask_source):
    lion = NpLion(SHAPES)

    def np_step(t, g, p):
        del p
        d = lion.direction(t, g)  # lion.m is now the updated first moment
        ref = lion.m if mask_source == "momentum" else d
        return {k: np_cautious(d[k], g[k], normalization, 1e-3, ref=ref[k]) for k in d}

    tx = cljax.cautious(optax.scale_by_lion(), normalization=normalization, mask_source=mask_source)
    compare_trajectory(tx, np_step, normal_tree(np.random.default_rng(3)), random_grads(4), steps=8)


def test_cautious_lion_momentum_differs_from_direction():
    """For Lion the two mask sources are genuinely different rules (not equivalent as for Adam)."""
    rng = np.random.default_rng(5)
    params = _jnp(normal_tree(rng))
    outs = {}
    for source in ("direction", "momentum"):
        tx = cljax.cautious(optax.scale_by_lion(b1=0.0, b2=0.99), mask_source=source)
        state = tx.init(params)
        rng_g = np.random.default_rng(6)
        for _ in range(4):
            out, state = tx.update(_jnp(normal_tree(rng_g)), state, params)
        outs[source] = out
    assert any(not np.array_equal(outs["direction"][k], outs["momentum"][k]) for k in SHAPES), (
        "momentum and direction masks should differ for Lion with b1 != b2"
    )


# ---------------------------------------------------------------------------------------------
# CA-01: invariants.


def _adam_direction_and_grads(seed, steps=3, shapes=SHAPES):
    """Returns (d, g, inner_state) after `steps` Adam steps on random gradients (eager)."""
    rng = np.random.default_rng(seed)
    params = _jnp(normal_tree(rng, shapes))
    inner = optax.scale_by_adam()
    state = inner.init(params)
    for _ in range(steps):
        g = _jnp(normal_tree(rng, shapes))
        prev_state = state
        d, state = inner.update(g, state, params)
    return params, g, prev_state, d


@pytest.mark.parametrize("normalization", ["mean_clamp", "mean_eps", "numel_sum", "none"])
def test_cautious_masked_coordinates_are_exactly_zero_and_sum_rule(normalization):
    params, g, prev_state, d = _adam_direction_and_grads(7)
    tx = cljax.cautious(optax.scale_by_adam(), normalization=normalization)
    out, _ = tx.update(g, prev_state, params)
    for k in SHAPES:
        dk, gk, ok = (np.asarray(x, np.float64) for x in (d[k], g[k], out[k]))
        disagree = dk * gk <= 0
        np.testing.assert_array_equal(ok[disagree], 0.0, err_msg=k)
        assert np.all(np.isfinite(ok))
        if normalization == "mean_clamp":
            phi = (~disagree).astype(np.float64)
            np.testing.assert_allclose(
                ok.sum(), (dk * phi).sum() / max(phi.mean(), 1e-3), rtol=1e-5, atol=1e-6
            )
    assert any(np.any(np.asarray(d[k]) * np.asarray(g[k]) <= 0) for k in SHAPES), (
        "no coordinate masked"
    )


@pytest.mark.parametrize("normalization", ["mean_clamp", "none"])
def test_cautious_all_agree_equals_inner_bitwise(normalization):
    rng = np.random.default_rng(8)
    params = _jnp(normal_tree(rng))
    signs = {k: np.where(rng.standard_normal(s) >= 0, 1.0, -1.0) for k, s in SHAPES.items()}
    inner = optax.scale_by_adam()
    tx = cljax.cautious(optax.scale_by_adam(), normalization=normalization)
    s_in, s_tx = inner.init(params), tx.init(params)
    for _ in range(4):
        # Constant signs per coordinate, fresh magnitudes: m, d and g always agree.
        g = _jnp(
            {
                k: np.asarray(signs[k] * (0.1 + np.abs(rng.standard_normal(s))), np.float32)
                for k, s in SHAPES.items()
            }
        )
        d, s_in = inner.update(g, s_in, params)
        out, s_tx = tx.update(g, s_tx, params)
        assert_trees_equal(out, d)
        assert_trees_equal(s_tx, s_in)


@pytest.mark.parametrize("normalization", ["mean_clamp", "mean_eps", "numel_sum", "none"])
def test_cautious_all_disagree_gives_zero_finite_update(normalization):
    params = _jnp(normal_tree(np.random.default_rng(9)))
    tx = cljax.cautious(optax.scale_by_adam(), normalization=normalization)
    state = tx.init(params)
    g = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    _, state = tx.update(g, state, params)
    # A much smaller opposite gradient: the momentum (hence d) keeps the old sign everywhere.
    out, _ = tx.update(jax.tree.map(lambda x: -0.01 * x, g), state, params)
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(out[k]), 0.0, err_msg=k)


def test_cautious_zero_gradient_is_masked_strictly():
    params = {"w": jnp.ones((2, 3))}
    tx = cljax.cautious(optax.scale_by_adam())
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones((2, 3))}, state, params)
    g = {"w": jnp.array([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])}
    out, _ = tx.update(g, state, params)
    w = np.asarray(out["w"])
    np.testing.assert_array_equal(w[np.asarray(g["w"]) == 0], 0.0)
    assert np.all(w[np.asarray(g["w"]) != 0] > 0)


def test_cautious_momentum_source_equals_direction_bitwise_for_adam():
    rng = np.random.default_rng(10)
    params = _jnp(normal_tree(rng))
    a = cljax.cautious(optax.scale_by_adam(), mask_source="direction")
    b = cljax.cautious(optax.scale_by_adam(), mask_source="momentum")
    sa, sb = a.init(params), b.init(params)
    for _ in range(5):
        g = _jnp(normal_tree(rng))
        oa, sa = a.update(g, sa, params)
        ob, sb = b.update(g, sb, params)
        assert_trees_equal(oa, ob)
        assert_trees_equal(sa, sb)


@pytest.mark.parametrize("inner", [optax.scale_by_adam, optax.scale_by_lion], ids=["adam", "lion"])
def test_cautious_state_structure_equals_inner(inner):
    params = _jnp(normal_tree(np.random.default_rng(11)))
    tx = cljax.cautious(inner())
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(inner().init(params))
    assert_trees_equal(tx.init(params), inner().init(params))
    g = _jnp(normal_tree(np.random.default_rng(12)))
    _, s_tx = tx.update(g, tx.init(params), params)
    _, s_in = inner().update(g, inner().init(params), params)
    assert_trees_equal(s_tx, s_in)


def test_cautious_passes_extra_args_and_needs_no_params():
    tx = cljax.cautious(optax.scale_by_adam())
    g = {"w": jnp.ones(3)}
    out, _ = tx.update(g, tx.init(g), None, some_extra=1)
    assert np.all(np.isfinite(np.asarray(out["w"])))


# ---------------------------------------------------------------------------------------------
# CA-02: Cautious Weight Decay.


def test_cwd_transform_matches_numpy_over_steps():
    lam = 0.3
    adam = NpAdam(SHAPES)

    def np_step(t, g, p):
        d = adam.direction(t, g)
        return {k: np_cwd(d[k], p[k], lam) for k in d}

    tx = optax.chain(optax.scale_by_adam(), cljax.add_cautious_weight_decay(lam))
    compare_trajectory(
        tx, np_step, normal_tree(np.random.default_rng(13)), random_grads(14), steps=8
    )


def test_cwd_on_random_directions_matches_paper_formula():
    """Equivalence of the optax placement with ``θ ← θ − η(d + λ 1[dθ ≥ 0] θ)`` for random (d, θ)."""
    rng = np.random.default_rng(15)
    lam, eta = 0.7, 0.05
    d, p = normal_tree(rng), normal_tree(rng)
    d["w"][0, 0], p["w"][0, 1], d["w"][1, 1], p["w"][1, 1] = 0.0, 0.0, 0.0, 0.0  # ties decay
    tx = optax.chain(cljax.add_cautious_weight_decay(lam), optax.scale_by_learning_rate(eta))
    u, _ = tx.update(_jnp(d), tx.init(_jnp(p)), _jnp(p))
    new = optax.apply_updates(_jnp(p), u)
    d64, p64 = _f64(d), _f64(p)
    expected = {k: p64[k] - eta * np_cwd(d64[k], p64[k], lam) for k in SHAPES}
    assert_trees_close(new, expected, rtol=1e-5, atol=1e-7)


def test_cwd_zero_decay_equals_base_exactly():
    rng = np.random.default_rng(16)
    d, p = _jnp(normal_tree(rng)), _jnp(normal_tree(rng))
    tx = cljax.add_cautious_weight_decay(0.0)
    out, _ = tx.update(d, tx.init(p), p)
    assert_trees_close(out, d, rtol=0, atol=0)


def test_cwd_decay_is_exactly_zero_where_signs_oppose_and_full_where_they_agree():
    rng = np.random.default_rng(17)
    d, p = normal_tree(rng), normal_tree(rng)
    tx = cljax.add_cautious_weight_decay(0.4)
    out, _ = tx.update(_jnp(d), tx.init(_jnp(p)), _jnp(p))
    plain, _ = optax.add_decayed_weights(0.4).update(_jnp(d), optax.EmptyState(), _jnp(p))
    for k in SHAPES:
        oppose = np.sign(d[k]) == -np.sign(p[k])
        o, dk, pl = np.asarray(out[k]), d[k], np.asarray(plain[k])
        np.testing.assert_array_equal(o[oppose], dk[oppose], err_msg=k)
        np.testing.assert_array_equal(o[~oppose], pl[~oppose], err_msg=k)
    # All signs agree: equals decoupled AdamW-style decay bitwise.
    agree_d = {k: np.abs(v) * np.sign(p[k]) for k, v in d.items()}
    out, _ = tx.update(_jnp(agree_d), tx.init(_jnp(p)), _jnp(p))
    plain, _ = optax.add_decayed_weights(0.4).update(_jnp(agree_d), optax.EmptyState(), _jnp(p))
    assert_trees_equal(out, plain)


def test_cwd_mask_uses_base_direction_not_decayed_direction():
    # sign(d) = −sign(θ), but d + λθ would have θ's sign: no decay must be applied.
    d = {"w": jnp.array([-0.01, 0.02, 0.0])}
    p = {"w": jnp.array([1.0, -1.0, 3.0])}
    tx = cljax.add_cautious_weight_decay(0.5)
    out, _ = tx.update(d, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray([-0.01, 0.02, 1.5], np.float32))


def test_cwd_schedule_counts_and_applies_scheduled_strength():
    sched = lambda count: 0.1 * (count + 1)  # noqa: E731
    tx = cljax.add_cautious_weight_decay(sched)
    p = {"w": jnp.array([1.0, -2.0, 3.0])}
    d = {"w": jnp.array([1.0, 1.0, -1.0])}
    state = tx.init(p)
    assert isinstance(state, cljax.AddCautiousWeightDecayState)
    step = jax.jit(tx.update)
    for t in range(3):
        assert int(state.count) == t
        out, state = step(d, state, p)
        lam = 0.1 * (t + 1)
        np.testing.assert_allclose(np.asarray(out["w"]), [1.0 + lam, 1.0, -1.0], rtol=1e-6)
    assert int(state.count) == 3


def test_cwd_with_mask_skips_masked_leaves():
    p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    d = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = cljax.add_cautious_weight_decay(0.5, mask={"w": True, "b": False})
    out, _ = tx.update(d, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(out["w"]), 1.5)
    np.testing.assert_array_equal(np.asarray(out["b"]), 1.0)
    tx = cljax.add_cautious_weight_decay(0.5, mask=cljax.exclude("b"))
    out, _ = tx.update(d, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(out["b"]), 1.0)
    np.testing.assert_array_equal(np.asarray(out["w"]), 1.5)


def test_cwd_after_cautious_composes_on_the_masked_direction():
    """Documented order: mask the direction first, then CWD on the masked direction."""
    params, g, prev_state, _ = _adam_direction_and_grads(18)
    masked, _ = cljax.cautious(optax.scale_by_adam()).update(g, prev_state, params)
    tx = optax.chain(cljax.cautious(optax.scale_by_adam()), cljax.add_cautious_weight_decay(0.2))
    out, _ = tx.update(g, (prev_state, optax.EmptyState()), params)
    expected = {
        k: np_cwd(np.asarray(masked[k], np.float64), np.asarray(params[k], np.float64), 0.2)
        for k in SHAPES
    }
    assert_trees_close(out, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# CA-05: Grams.


def test_grams_matches_numpy_over_steps():
    adam = NpAdam(SHAPES, b2=0.99, eps=1e-7)

    def np_step(t, g, p):
        del p
        d = adam.direction(t, g)
        return {k: np.sign(g[k]) * np.abs(d[k]) for k in d}

    tx = cljax.scale_by_grams(b2=0.99, eps=1e-7)
    compare_trajectory(
        tx, np_step, normal_tree(np.random.default_rng(19)), random_grads(20), steps=8
    )


def test_grams_sign_magnitude_and_zero_gradient():
    params, g, prev_state, d = _adam_direction_and_grads(21)
    g = dict(g)
    g["w"] = g["w"].at[0, :].set(0.0)
    d, _ = optax.scale_by_adam().update(g, prev_state, params)
    out, _ = cljax.scale_by_grams().update(g, prev_state, params)
    flipped = 0
    for k in SHAPES:
        o, dk, gk = np.asarray(out[k]), np.asarray(d[k]), np.asarray(g[k])
        nz = gk != 0
        np.testing.assert_array_equal(np.sign(o[nz]), np.sign(gk[nz]), err_msg=k)
        np.testing.assert_array_equal(np.abs(o[nz]), np.abs(dk[nz]), err_msg=k)
        np.testing.assert_array_equal(o[~nz], 0.0, err_msg=k)
        flipped += int(np.sum(np.sign(dk) == -np.sign(gk)))
    assert np.any(np.asarray(d["w"])[0] != 0), "the zero-gradient row should have nonzero momentum"
    assert flipped > 0, "the case should flip some coordinates"


def test_grams_state_is_adam_state():
    params = _jnp(normal_tree(np.random.default_rng(22)))
    state = cljax.scale_by_grams().init(params)
    assert isinstance(state, optax.ScaleByAdamState)


# ---------------------------------------------------------------------------------------------
# OR-08: AdamP.


def _np_rows(x, axis):
    """Channel view: rows are the slices along `axis` (Flax: the last axis), flattened."""
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _np_unrows(rows, axis, shape):
    moved = np.moveaxis(np.zeros(shape), axis, 0).shape
    return np.moveaxis(rows.reshape(moved), 0, axis)


def _np_abs_cos_rows(a, b, eps):
    dot = np.sum(a * b, axis=1)
    na = np.maximum(np.linalg.norm(a, axis=1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=1), eps)
    return np.abs(dot / (na * nb))


class NpAdamP:
    """Float64 transcription of OR-08 (reference code rule), Flax channel axis by default."""

    def __init__(
        self,
        shapes,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        delta=0.1,
        wd_ratio=0.1,
        nesterov=False,
        channel_axis=-1,
    ):
        self.__dict__.update(
            b1=b1,
            b2=b2,
            eps=eps,
            wd=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            axis=channel_axis,
        )
        self.m = {k: np.zeros(s) for k, s in shapes.items()}
        self.v = {k: np.zeros(s) for k, s in shapes.items()}
        self.views = []  # per step: {leaf: 'channel' | 'layer' | None}

    def __call__(self, t, g, w):
        b1, b2, eps = self.b1, self.b2, self.eps
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out, views = {}, {}
        for k in g:
            self.m[k] = b1 * self.m[k] + (1 - b1) * g[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(self.v[k]) / math.sqrt(bc2) + eps
            numer = b1 * self.m[k] + (1 - b1) * g[k] if self.nesterov else self.m[k]
            p = numer / denom
            wd_scale, views[k] = 1.0, None
            if g[k].ndim >= 2:
                shape = g[k].shape
                candidates = [
                    (
                        "channel",
                        lambda x: _np_rows(x, self.axis),
                        lambda r, shape=shape: _np_unrows(r, self.axis, shape),
                    ),
                    ("layer", lambda x: x.reshape(1, -1), lambda r, shape=shape: r.reshape(shape)),
                ]
                for name, to_rows, from_rows in candidates:
                    gr, wr, pr = to_rows(g[k]), to_rows(w[k]), to_rows(p)
                    if np.max(_np_abs_cos_rows(gr, wr, eps)) < self.delta / math.sqrt(gr.shape[1]):
                        w_hat = wr / (np.linalg.norm(wr, axis=1, keepdims=True) + eps)
                        pr = pr - w_hat * np.sum(w_hat * pr, axis=1, keepdims=True)
                        p, wd_scale, views[k] = from_rows(pr), self.wd_ratio, name
                        break
            out[k] = p / bc1 + self.wd * wd_scale * w[k]
        self.views.append(views)
        return out


def _orthogonal_rows(r, w, axis):
    """Removes from each channel row of `r` its component along the same row of `w`."""
    rr, wr = _np_rows(r.astype(np.float64), axis), _np_rows(w.astype(np.float64), axis)
    w_hat = wr / np.linalg.norm(wr, axis=1, keepdims=True)
    return _np_unrows(rr - w_hat * np.sum(w_hat * rr, axis=1, keepdims=True), axis, r.shape).astype(
        np.float32
    )


def _orthogonal_layer(r, w):
    r64, w64 = r.astype(np.float64).ravel(), w.astype(np.float64).ravel()
    w_hat = w64 / np.linalg.norm(w64)
    return (r64 - w_hat * (w_hat @ r64)).reshape(r.shape).astype(np.float32)


ADAMP_SHAPES = {"w": (4, 3), "k": (2, 3, 5), "b": (3,), "s": ()}


def _adamp_grad_fn(seed, mode, axis=-1):
    """Gradients built from the current params: 'channel' orthogonal per channel row, 'layer'
    orthogonal to the whole leaf only, 'none' clearly aligned with the weight."""
    rng = np.random.default_rng(seed)

    def fn(t, params):
        g = normal_tree(rng, ADAMP_SHAPES)
        for k in ("w", "k"):
            if mode == "channel":
                g[k] = _orthogonal_rows(g[k], params[k], axis)
            elif mode == "layer":
                g[k] = _orthogonal_layer(g[k], params[k])
            else:
                g[k] = (g[k] + 2.0 * params[k]).astype(np.float32)
        return g

    return fn


@pytest.mark.parametrize(
    "mode,nesterov",
    [("channel", False), ("channel", True), ("layer", False), ("none", False), ("none", True)],
)
def test_adamp_matches_numpy(mode, nesterov):
    kw = dict(b2=0.99, weight_decay=0.05, delta=0.1, wd_ratio=0.2, nesterov=nesterov)
    ref = NpAdamP(ADAMP_SHAPES, **kw)
    tx = cljax.scale_by_adamp(**kw)
    params = normal_tree(np.random.default_rng(23), ADAMP_SHAPES)
    compare_trajectory(
        tx,
        ref,
        params,
        _adamp_grad_fn(24, mode),
        lr=0.05,
        atol=2e-6,
        jit=mode == "channel" and not nesterov,
    )
    expected_view = {"channel": "channel", "layer": "layer", "none": None}[mode]
    for t, views in enumerate(ref.views):
        assert views["w"] == expected_view and views["k"] == expected_view, f"step {t + 1}: {views}"
        assert views["b"] is None and views["s"] is None


def test_adamp_channel_axis_zero_is_the_transposed_layout():
    rng = np.random.default_rng(25)
    shapes = {"w": (4, 3)}
    params = normal_tree(rng, shapes)
    ref = NpAdamP(shapes, channel_axis=0, weight_decay=0.01)
    tx = cljax.scale_by_adamp(channel_axis=0, weight_decay=0.01)
    grad_rng = np.random.default_rng(26)

    def grads(t, p):
        return {"w": _orthogonal_rows(normal_tree(grad_rng, shapes)["w"], p["w"], 0)}

    compare_trajectory(tx, ref, params, grads, lr=0.05)
    assert all(v["w"] == "channel" for v in ref.views)
    # Same numbers as the Flax layout on the transposed leaf.
    g = {"w": jnp.asarray(_orthogonal_rows(normal_tree(rng, shapes)["w"], params["w"], 0))}
    p = _jnp(params)
    a, _ = cljax.scale_by_adamp(channel_axis=0).update(
        g, cljax.scale_by_adamp(channel_axis=0).init(p), p
    )
    gt, pt = {"w": g["w"].T}, {"w": p["w"].T}
    b, _ = cljax.scale_by_adamp().update(gt, cljax.scale_by_adamp().init(pt), pt)
    np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(b["w"]).T, rtol=1e-6, atol=1e-7)


def test_adamp_projected_rows_are_orthogonal_to_weights():
    rng = np.random.default_rng(27)
    shapes = {"w": (6, 4), "k": (3, 2, 5)}
    params = _jnp(normal_tree(rng, shapes))
    tx = cljax.scale_by_adamp(weight_decay=0.0)
    state = tx.init(params)
    update = tx.update
    for _ in range(5):
        np_params = jax.tree.map(np.asarray, params)
        g = {k: _orthogonal_rows(normal_tree(rng, shapes)[k], np_params[k], -1) for k in shapes}
        out, state = update(_jnp(g), state, params)
        for k in shapes:
            w_rows = _np_rows(np.asarray(params[k], np.float64), -1)
            w_hat = w_rows / np.linalg.norm(w_rows, axis=1, keepdims=True)
            u_rows = _np_rows(np.asarray(out[k], np.float64), -1)
            np.testing.assert_allclose(np.sum(w_hat * u_rows, axis=1), 0.0, atol=1e-6, err_msg=k)
            assert np.max(np.abs(u_rows)) > 0.1
        params = jax.tree.map(lambda p, u: p - 0.05 * u, params, out)


def test_adamp_delta_zero_equals_adamw():
    rng = np.random.default_rng(28)
    params = _jnp(normal_tree(rng, ADAMP_SHAPES))
    a = cljax.scale_by_adamp(delta=0.0, weight_decay=0.1)
    b = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1))
    sa, sb = a.init(params), b.init(params)
    grads = _adamp_grad_fn(29, "channel")  # would trigger if delta > 0
    for t in range(1, 6):
        g = _jnp(grads(t, jax.tree.map(np.asarray, params)))
        oa, sa = a.update(g, sa, params)
        ob, sb = b.update(g, sb, params)
        assert_trees_close(oa, ob, rtol=1e-5, atol=1e-6, err=f"step {t}:")
        params = jax.tree.map(lambda p, u: p - 0.05 * u, params, oa)


def test_adamp_one_dimensional_leaves_equal_adamw():
    shapes = {"b": (5,), "s": (), "c": (1,)}
    rng = np.random.default_rng(30)
    params = _jnp(normal_tree(rng, shapes))
    a = cljax.scale_by_adamp(weight_decay=0.2, delta=10.0)  # a huge delta: would trigger on 2-D
    b = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.2))
    sa, sb = a.init(params), b.init(params)
    for t in range(1, 6):
        g = _jnp(normal_tree(rng, shapes))
        oa, sa = a.update(g, sa, params)
        ob, sb = b.update(g, sb, params)
        assert_trees_close(oa, ob, rtol=1e-5, atol=1e-6, err=f"step {t}:")
        params = jax.tree.map(lambda p, u: p - 0.05 * u, params, oa)


def test_adamp_slows_norm_growth_on_scale_invariant_loss():
    target = jnp.asarray(np.random.default_rng(31).standard_normal((6, 4)), jnp.float32)

    def loss(params):
        w = params["w"]
        w_n = w / jnp.linalg.norm(w, axis=0, keepdims=True)  # per output channel (Flax layout)
        return -jnp.sum(w_n * target)

    w0 = {"w": jnp.asarray(np.random.default_rng(32).standard_normal((6, 4)), jnp.float32)}
    grad = jax.grad(loss)

    def run(opt):
        params, state = w0, opt.init(w0)

        @jax.jit
        def step(params, state):
            u, state = opt.update(grad(params), state, params)
            return optax.apply_updates(params, u), state

        for _ in range(50):
            params, state = step(params, state)
        return float(jnp.linalg.norm(params["w"])), float(loss(params))

    norm0 = float(jnp.linalg.norm(w0["w"]))
    norm_p, loss_p = run(cljax.adamp(0.05))
    norm_w, loss_w = run(optax.adamw(0.05, weight_decay=0.0))
    assert norm_p - norm0 < 0.5 * (norm_w - norm0), (norm0, norm_p, norm_w)
    assert loss_p < float(loss(w0))  # AdamP still optimises the loss


# ---------------------------------------------------------------------------------------------
# CA-03: UPGD.


class NpUpgd:
    """Float64 transcription of CA-03 (first order). Returns the pre-learning-rate output."""

    def __init__(self, shapes, beta, protect=True, normalization="global"):
        self.beta, self.protect, self.normalization = beta, protect, normalization
        self.u = {k: np.zeros(s) for k, s in shapes.items()}
        self.gates = []

    def __call__(self, t, g, w, xi=None):
        beta = self.beta
        xi = xi or {k: np.zeros_like(v) for k, v in g.items()}
        for k in g:
            self.u[k] = beta * self.u[k] + (1 - beta) * (-g[k] * w[k])
        m = max(float(np.max(u)) for u in self.u.values() if u.size)
        bc = 1 - beta**t
        out, gates = {}, {}
        for k in g:
            u_bc = self.u[k] / bc
            if self.normalization == "global":
                ratio = u_bc / m if m != 0 else np.zeros_like(u_bc)
            else:
                flat = u_bc.reshape(-1) if u_bc.ndim == 0 else u_bc
                norm = np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
                ratio = (flat / norm).reshape(u_bc.shape)
            s = _sigmoid(ratio)
            gates[k] = s
            out[k] = (g[k] + xi[k]) * (1 - s) if self.protect else g[k] + xi[k] * (1 - s)
        self.gates.append(gates)
        return out


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("normalization", ["global", "local"])
def test_upgd_matches_numpy_without_noise(protect, normalization):
    ref = NpUpgd(SHAPES, beta=0.9, protect=protect, normalization=normalization)
    tx = cljax.scale_by_upgd(0.9, 0.0, protect=protect, normalization=normalization)
    compare_trajectory(
        tx,
        ref,
        normal_tree(np.random.default_rng(33)),
        random_grads(34),
        steps=7,
        jit=protect and normalization == "global",
    )


def _upgd_noise(seed, shapes, steps, sigma, protect=True):
    """Recovers cljax's noise ξ_t exactly: θ = 0 and g = 0 give utility 0, hence M = 0 and the
    documented guard s = 1/2, so the output is (g + ξ)/2 = ξ/2 (protect) or g + ξ/2 = ξ/2
    (non-protect). The noise stream depends only on the seed and the tree structure, so the
    same ξ_t feed any run with that seed and tree."""
    zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    tx = cljax.scale_by_upgd(0.9, sigma, protect=protect, seed=seed)
    state = tx.init(zeros)
    update = tx.update
    noises = []
    for _ in range(steps):
        out, state = update(zeros, state, zeros)
        noises.append({k: 2.0 * np.asarray(v, np.float64) for k, v in out.items()})
    return noises


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("normalization", ["global", "local"])
def test_upgd_matches_numpy_with_recovered_noise(protect, normalization):
    sigma, seed, steps = 0.3, 7, 6
    noises = _upgd_noise(seed, SHAPES, steps, sigma, protect=protect)
    ref = NpUpgd(SHAPES, beta=0.9, protect=protect, normalization=normalization)
    tx = cljax.scale_by_upgd(0.9, sigma, protect=protect, normalization=normalization, seed=seed)
    np_step = lambda t, g, w: ref(t, g, w, xi=noises[t - 1])  # noqa: E731
    compare_trajectory(
        tx, np_step, normal_tree(np.random.default_rng(35)), random_grads(36), steps=steps
    )
    # The noise is really there and really is fresh per step.
    assert np.std(noises[0]["w"]) > 0.05
    assert not np.array_equal(noises[0]["w"], noises[1]["w"])


def test_upgd_noise_statistics_and_seeds():
    sigma, shapes = 0.5, {"a": (100, 100), "b": (100, 100)}
    noises = _upgd_noise(0, shapes, 2, sigma)
    for step in noises:
        for k, xi in step.items():
            assert abs(np.std(xi) / sigma - 1.0) < 0.03, (k, np.std(xi))
            assert abs(np.mean(xi)) < 5 * sigma / 100
    assert not np.array_equal(noises[0]["a"], noises[0]["b"]), "leaves must get independent noise"
    assert not np.array_equal(noises[0]["a"], noises[1]["a"]), "each step must draw fresh noise"


def test_upgd_same_seed_identical_trajectory_different_seed_differs():
    def trajectory(seed):
        rng = np.random.default_rng(37)
        params = _jnp(normal_tree(rng))
        opt = cljax.upgd(0.1, weight_decay=0.01, beta_utility=0.9, sigma=0.1, seed=seed)
        state = opt.init(params)
        step = opt.update
        for _ in range(5):
            u, state = step(_jnp(normal_tree(rng)), state, params)
            params = optax.apply_updates(params, u)
        return params

    assert_trees_equal(trajectory(3), trajectory(3))
    assert_trees_equal(trajectory(3), trajectory(jax.random.key(3)))
    assert_trees_equal(trajectory(3), trajectory(jax.random.key_data(jax.random.key(3))))
    a, b = trajectory(3), trajectory(4)
    assert all(not np.array_equal(a[k], b[k]) for k in SHAPES)


def test_upgd_gate_in_open_unit_interval_and_max_utility_factor():
    rng = np.random.default_rng(38)
    beta, t_max = 0.9, 4
    params = _jnp(normal_tree(rng))
    tx = cljax.scale_by_upgd(beta, 0.0)
    state = tx.init(params)
    for t in range(1, t_max + 1):
        g = _jnp(normal_tree(rng))
        out, state = tx.update(g, state, params)
        one_minus_s = {
            k: np.asarray(out[k], np.float64) / np.asarray(g[k], np.float64) for k in SHAPES
        }
        for k, v in one_minus_s.items():
            assert np.all((v > 0) & (v < 1)), k
        # The weight holding the global maximum of the trace gets 1 − sigmoid(1 / (1 − β^t)).
        util = state.utility
        k_max = max(SHAPES, key=lambda k: float(jnp.max(util[k])))
        idx = np.unravel_index(int(jnp.argmax(util[k_max])), SHAPES[k_max])
        np.testing.assert_allclose(
            one_minus_s[k_max][idx], 1 - _sigmoid(1 / (1 - beta**t)), rtol=1e-5
        )


def test_upgd_global_max_spans_leaves():
    # Leaf 'a' holds the global maximum; leaf 'b' would normalise very differently on its own.
    params = {"a": jnp.array([2.0, -1.0]), "b": jnp.array([0.1, 0.3, -0.2])}
    g = {"a": jnp.array([-3.0, 0.5]), "b": jnp.array([-0.2, -0.1, 0.4])}
    out, _ = cljax.scale_by_upgd(0.0, 0.0).update(
        g, cljax.scale_by_upgd(0.0, 0.0).init(params), params
    )
    util = {k: -np.asarray(g[k], np.float64) * np.asarray(params[k], np.float64) for k in params}
    m_global = max(u.max() for u in util.values())
    m_leaf_b = util["b"].max()
    assert m_global == 6.0 and m_leaf_b < 0.1
    expected = np.asarray(g["b"], np.float64) * (1 - _sigmoid(util["b"] / m_global))
    per_leaf = np.asarray(g["b"], np.float64) * (1 - _sigmoid(util["b"] / m_leaf_b))
    np.testing.assert_allclose(np.asarray(out["b"]), expected, rtol=1e-6)
    assert np.max(np.abs(expected - per_leaf)) > 1e-2


def test_upgd_zero_and_negative_max_utility_are_finite():
    # M = 0: θ = 0 ⇒ utility 0 everywhere ⇒ s = 1/2 (documented guard).
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(())}
    g = {"a": jnp.ones((3, 2)), "b": jnp.asarray(-2.0)}
    tx = cljax.scale_by_upgd(0.99, 0.0)
    out, state = tx.update(g, tx.init(params), params)
    assert_trees_close(out, {"a": np.full((3, 2), 0.5), "b": np.asarray(-1.0)}, rtol=0, atol=0)
    out, _ = tx.update(g, state, params)
    assert_trees_close(out, {"a": np.full((3, 2), 0.5), "b": np.asarray(-1.0)}, rtol=0, atol=0)
    # M < 0: every utility negative (g = θ); follows the reference, finite.
    params = {"a": jnp.array([[1.0, 2.0], [3.0, -1.0]]), "b": jnp.asarray(0.5)}
    out, _ = tx.update(params, tx.init(params), params)
    ref = NpUpgd({"a": (2, 2), "b": ()}, 0.99)
    expected = ref(
        1, _f64(jax.tree.map(np.asarray, params)), _f64(jax.tree.map(np.asarray, params))
    )
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-7)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())


def test_upgd_zero_gate_is_sgd_with_noise_and_decay():
    """A coordinate with very negative utility has s = 0: plain SGD + noise + decoupled decay."""
    sigma, seed, lr, wd = 0.2, 11, 0.1, 0.05
    shapes = {"w": (5,)}
    noise = _upgd_noise(seed, shapes, 1, sigma)[0]["w"]
    # Utility −g·θ (β = 0): coordinate 0 holds M = 1, the others about −200 ⇒ sigmoid(−200) = 0.
    params = {"w": jnp.array([-1.0, 100.0, -100.0, 50.0, 100.0])}
    g = {"w": jnp.array([1.0, 2.0, -2.0, 4.0, 2.0])}
    opt = cljax.upgd(lr, weight_decay=wd, beta_utility=0.0, sigma=sigma, seed=seed)
    u, _ = opt.update(g, opt.init(params), params)
    p, gg = np.asarray(params["w"], np.float64), np.asarray(g["w"], np.float64)
    expected = -lr * (gg + noise) - lr * wd * p
    np.testing.assert_allclose(np.asarray(u["w"])[1:], expected[1:], rtol=1e-5, atol=1e-7)
    s0 = _sigmoid(1.0)
    np.testing.assert_allclose(
        np.asarray(u["w"])[0], -lr * (gg[0] + noise[0]) * (1 - s0) - lr * wd * p[0], rtol=1e-5
    )


def test_upgd_state_fields():
    params = _jnp(normal_tree(np.random.default_rng(39)))
    tx = cljax.scale_by_upgd(0.9, 0.1, seed=5)
    state = tx.init(params)
    assert isinstance(state, cljax.ScaleByUpgdState)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert state.key.dtype == jnp.uint32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.utility))
    _, new = tx.update(_jnp(normal_tree(np.random.default_rng(40))), state, params)
    assert int(new.count) == 1 and not np.array_equal(new.key, state.key)
    assert jax.tree.structure(new) == jax.tree.structure(state)


def test_upgd_utility_dtype_follows_argument():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16)}
    assert (
        cljax.scale_by_upgd(utility_dtype=jnp.bfloat16).init(params).utility["w"].dtype
        == jnp.bfloat16
    )
    assert cljax.scale_by_upgd().init(params).utility["w"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Edge cases shared by all transforms.


def _all_transforms():
    return {
        "cautious": cljax.cautious(optax.scale_by_adam()),
        "cautious_lion": cljax.cautious(optax.scale_by_lion(), normalization="numel_sum"),
        "cwd": optax.chain(optax.scale_by_adam(), cljax.add_cautious_weight_decay(0.1)),
        "grams": cljax.scale_by_grams(),
        "adamp": cljax.scale_by_adamp(weight_decay=0.1),
        "upgd": cljax.scale_by_upgd(0.9, 0.01),
        "upgd_local": cljax.scale_by_upgd(0.9, 0.01, normalization="local", protect=False),
    }


@pytest.mark.parametrize("name", list(_all_transforms()))
def test_bfloat16_keeps_dtype_and_is_close_to_float32(name):
    rng = np.random.default_rng(41)
    p32 = {
        k: jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32)
        for k, v in normal_tree(rng).items()
    }
    grads = [
        {
            k: jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32)
            for k, v in normal_tree(rng).items()
        }
        for _ in range(2)
    ]
    # Same signs both steps: masks and gradient signs are not borderline between precisions.
    grads[1] = jax.tree.map(lambda a, b: jnp.abs(a) * jnp.sign(b), grads[1], grads[0])
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        tx = _all_transforms()[name]
        params = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), p32)
        state = tx.init(params)
        for g in grads:
            out, state = tx.update(
                jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), g), state, params
            )
        results[dtype] = out
    for k in SHAPES:
        assert results[jnp.bfloat16][k].dtype == jnp.bfloat16, k
        assert np.all(np.isfinite(np.asarray(results[jnp.bfloat16][k], np.float32))), k
    scale = max(float(jnp.max(jnp.abs(v))) for v in results[jnp.float32].values())
    assert_trees_close(results[jnp.bfloat16], results[jnp.float32], rtol=3e-2, atol=3e-2 * scale)


@pytest.mark.parametrize("name", list(_all_transforms()))
def test_zero_params_zero_grads_scalar_and_empty_leaves(name):
    params = {
        "w": jnp.zeros((3, 2)),
        "s": jnp.zeros(()),
        "e": jnp.zeros((0,)),
        "e2": jnp.zeros((2, 0)),
    }
    tx = _all_transforms()[name]
    state = tx.init(params)
    update = tx.update
    out, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    for k, v in params.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        assert np.all(np.isfinite(np.asarray(out[k]))), k
    if not name.startswith("upgd"):  # no noise: zero gradients give a zero direction
        for k in params:
            np.testing.assert_array_equal(np.asarray(out[k]), 0.0, err_msg=k)
    # Nonzero gradients on zero params: finite.
    g = {
        "w": jnp.ones((3, 2)),
        "s": jnp.asarray(-1.0),
        "e": jnp.zeros((0,)),
        "e2": jnp.zeros((2, 0)),
    }
    out, _ = update(g, state, params)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())


@pytest.mark.parametrize("name", list(_all_transforms()))
def test_none_leaves_and_optax_masked(name):
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
    g = {"a": jnp.full((2, 3), 0.5), "b": jnp.full((3,), -0.5)}
    # None leaves pass through as None.
    p_none, g_none = {"a": params["a"], "b": None}, {"a": g["a"], "b": None}
    tx = _all_transforms()[name]
    out, _ = tx.update(g_none, tx.init(p_none), p_none)
    assert out["b"] is None and out["a"].shape == (2, 3)
    # optax.masked: the unmasked leaf passes through unchanged; the masked one matches the bare run.
    masked = optax.masked(_all_transforms()[name], {"a": True, "b": False})
    out_m, _ = masked.update(g, masked.init(params), params)
    np.testing.assert_array_equal(np.asarray(out_m["b"]), np.asarray(g["b"]))
    bare = _all_transforms()[name]
    out_a, _ = bare.update({"a": g["a"]}, bare.init({"a": params["a"]}), {"a": params["a"]})
    if not name.startswith("upgd"):  # noise keys depend on the tree, the rest must agree
        np.testing.assert_allclose(np.asarray(out_m["a"]), np.asarray(out_a["a"]), rtol=1e-6)


def test_cautious_every_coordinate_masked_leaf_by_leaf():
    """One leaf fully masked, another untouched: the per-tensor normalisation is per leaf."""
    params = {"a": jnp.ones(4), "b": jnp.ones(4)}
    tx = cljax.cautious(optax.scale_by_adam())
    state = tx.init(params)
    _, state = tx.update({"a": jnp.ones(4), "b": jnp.ones(4)}, state, params)
    inner_d, _ = optax.scale_by_adam().update(
        {"a": jnp.full(4, -1e-3), "b": jnp.ones(4)}, state, params
    )
    out, _ = tx.update({"a": jnp.full(4, -1e-3), "b": jnp.ones(4)}, state, params)
    np.testing.assert_array_equal(np.asarray(out["a"]), 0.0)
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(inner_d["b"]))


# ---------------------------------------------------------------------------------------------
# Hypothesis properties.

_EXTREMES = [0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, 1.0, -1.0, 3e-5, -7e3]
_HYP_SHAPES = [(1,), (5,), (2, 3), (2, 2, 2)]


def _values(max_abs=1e30, extremes=_EXTREMES):
    return st.one_of(
        st.floats(-10.0, 10.0, width=32),
        st.sampled_from([x for x in extremes if abs(x) <= max_abs]),
    )


def _array_pair(max_abs=1e30, extremes=_EXTREMES):
    return st.sampled_from(_HYP_SHAPES).flatmap(
        lambda shape: st.tuples(
            *(hnp.arrays(np.float32, shape, elements=_values(max_abs, extremes)) for _ in range(3))
        )
    )


_CAUTIOUS = {
    n: cljax.cautious(optax.scale_by_adam(), normalization=n) for n in ("mean_clamp", "numel_sum")
}
_ADAM = optax.scale_by_adam()
_GRAMS = cljax.scale_by_grams()
_CWD = cljax.add_cautious_weight_decay(0.1)


@settings(max_examples=15)
@given(arrays=_array_pair(), normalization=st.sampled_from(["mean_clamp", "numel_sum"]))
def test_property_cautious_zero_where_disagree_and_finite(arrays, normalization):
    g1, g2, p = (jnp.asarray(a) for a in arrays)
    state = _ADAM.init(p)
    _, state = _ADAM.update(g1, state, p)
    d, _ = _ADAM.update(g2, state, p)
    out, _ = _CAUTIOUS[normalization].update(g2, state, p)
    o, d64, g64 = np.asarray(out), np.asarray(d, np.float64), np.asarray(g2, np.float64)
    assert np.all(np.isfinite(o))
    disagree = d64 * g64 <= 0
    np.testing.assert_array_equal(o[disagree], 0.0)
    if np.all(np.isfinite(d64)):
        expected = np_cautious(d64, g64, normalization, 1e-3)
        np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-30)


@settings(max_examples=15)
@given(arrays=_array_pair())
def test_property_cwd_decay_zero_where_signs_oppose(arrays):
    d, p, _ = (jnp.asarray(a) for a in arrays)
    out, _ = _CWD.update(d, optax.EmptyState(), p)
    o, d32, p32 = np.asarray(out), np.asarray(d), np.asarray(p)
    oppose = np.sign(d32) * np.sign(p32) < 0
    np.testing.assert_array_equal(o[oppose], d32[oppose])
    # Decayed where signs agree or tie (XLA may flush float32 subnormals, hence the tiny atol).
    np.testing.assert_allclose(
        o[~oppose], (d32 + np.float32(0.1) * p32)[~oppose], rtol=1e-6, atol=1e-37
    )


@settings(max_examples=15)
@given(arrays=_array_pair())
def test_property_grams_sign_follows_gradient(arrays):
    g1, g2, p = (jnp.asarray(a) for a in arrays)
    state = _ADAM.init(p)
    _, state = _ADAM.update(g1, state, p)
    d, _ = _ADAM.update(g2, state, p)
    out, _ = _GRAMS.update(g2, state, p)
    o, d32, g32 = np.asarray(out), np.asarray(d), np.asarray(g2)
    np.testing.assert_array_equal(np.abs(o), np.where(g32 == 0, 0.0, np.abs(d32)))
    live = d32 != 0
    np.testing.assert_array_equal(np.sign(o)[live], np.sign(g32)[live])


# Values whose products stay finite in float32 (|g·θ| ≤ 1e30): the utility is representable.
_UPGD_EXTREMES = [0.0, 1e15, -1e15, 1e-30, -1e-30, 1e-20, 1.0, -3e-5, 7e3]
_UPGD = {
    (n, pr): cljax.scale_by_upgd(0.9, 0.1, normalization=n, protect=pr)
    for n in ("global", "local")
    for pr in (True, False)
}


@settings(max_examples=20)
@given(
    arrays=_array_pair(1e15, _UPGD_EXTREMES),
    normalization=st.sampled_from(["global", "local"]),
    protect=st.booleans(),
)
def test_property_upgd_finite_for_finite_input(arrays, normalization, protect):
    g1, g2, p = (jnp.asarray(a) for a in arrays)
    tx = _UPGD[(normalization, protect)]
    update = tx.update
    state = tx.init(p)
    out1, state = update(g1, state, p)
    out2, state = update(g2, state, p)
    for o in (out1, out2):
        assert np.all(np.isfinite(np.asarray(o)))
    assert np.all(np.isfinite(np.asarray(state.utility)))


# ---------------------------------------------------------------------------------------------
# Argument errors.

_P = {"w": jnp.ones(3)}


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: cljax.cautious(lambda g: g), TypeError, "must be an optax GradientTransformation"),
        (
            lambda: cljax.cautious(optax.scale_by_adam(), normalization="mean"),
            ValueError,
            r"normalization=\.\.\.\) must be one of",
        ),
        (
            lambda: cljax.cautious(optax.scale_by_adam(), mask_source="grad"),
            ValueError,
            r"mask_source=\.\.\.\) must be one of",
        ),
        (
            lambda: cljax.cautious(optax.scale_by_adam(), clamp=0.0),
            ValueError,
            r"clamp=\.\.\.\) must be in \(0",
        ),
        (
            lambda: cljax.cautious(optax.scale_by_adam(), clamp=-1.0),
            ValueError,
            r"clamp=\.\.\.\) must be in",
        ),
        (lambda: cljax.cautious(optax.scale_by_adam(), clamp=float("nan")), ValueError, r"got nan"),
        (
            lambda: cljax.add_cautious_weight_decay(-0.1),
            ValueError,
            r"weight_decay=\.\.\.\) must be in",
        ),
        (lambda: cljax.scale_by_grams(b1=1.5), ValueError, r"scale_by_grams\(b1=\.\.\.\)"),
        (lambda: cljax.scale_by_grams(b1=-0.1), ValueError, r"scale_by_grams\(b1=\.\.\.\)"),
        (lambda: cljax.scale_by_grams(b2=2.0), ValueError, r"scale_by_grams\(b2=\.\.\.\)"),
        (lambda: cljax.scale_by_grams(eps=-1e-8), ValueError, r"scale_by_grams\(eps=\.\.\.\)"),
        (
            lambda: cljax.scale_by_adamp(b1=1.0),
            ValueError,
            r"scale_by_adamp\(b1=\.\.\.\) must be in \[0.0, 1.0\)",
        ),
        (lambda: cljax.scale_by_adamp(b2=-0.5), ValueError, r"scale_by_adamp\(b2=\.\.\.\)"),
        (lambda: cljax.scale_by_adamp(eps=-1.0), ValueError, r"scale_by_adamp\(eps=\.\.\.\)"),
        (
            lambda: cljax.scale_by_adamp(weight_decay=-0.1),
            ValueError,
            r"scale_by_adamp\(weight_decay=\.\.\.\)",
        ),
        (lambda: cljax.scale_by_adamp(delta=-0.1), ValueError, r"scale_by_adamp\(delta=\.\.\.\)"),
        (
            lambda: cljax.scale_by_adamp(wd_ratio=-1.0),
            ValueError,
            r"scale_by_adamp\(wd_ratio=\.\.\.\)",
        ),
        (
            lambda: cljax.scale_by_adamp(channel_axis=1.0),
            TypeError,
            r"channel_axis=\.\.\.\) must be an int",
        ),
        (
            lambda: cljax.scale_by_adamp(channel_axis=True),
            TypeError,
            r"channel_axis=\.\.\.\) must be an int",
        ),
        (
            lambda: cljax.scale_by_upgd(beta_utility=1.0),
            ValueError,
            r"beta_utility=\.\.\.\) must be in \[0.0, 1.0\)",
        ),
        (lambda: cljax.scale_by_upgd(beta_utility=-0.1), ValueError, r"beta_utility=\.\.\.\)"),
        (lambda: cljax.scale_by_upgd(sigma=-1.0), ValueError, r"sigma=\.\.\.\) must be in"),
        (
            lambda: cljax.scale_by_upgd(normalization="layer"),
            ValueError,
            r"normalization=\.\.\.\) must be one of",
        ),
        (lambda: cljax.scale_by_upgd(protect=1), TypeError, r"protect=\.\.\.\) must be a bool"),
    ],
)
def test_factory_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "tx,name",
    [
        (cljax.add_cautious_weight_decay(0.1), "add_cautious_weight_decay"),
        (cljax.scale_by_adamp(), "scale_by_adamp"),
        (cljax.scale_by_upgd(), "scale_by_upgd"),
    ],
)
def test_missing_params_raises(tx, name):
    with pytest.raises(ValueError, match=rf"{name}: `update` needs `params`"):
        tx.update(_P, tx.init(_P), None)


@pytest.mark.parametrize(
    "inner,found",
    [(optax.scale_by_rms(), 0), (optax.chain(optax.scale_by_adam(), optax.scale_by_adam()), 2)],
    ids=["no_mu", "two_mu"],
)
def test_cautious_momentum_source_needs_exactly_one_mu(inner, found):
    tx = cljax.cautious(inner, mask_source="momentum")
    with pytest.raises(ValueError, match=rf"exactly one state with a `mu` field.*found {found}"):
        tx.update(_P, tx.init(_P), _P)
