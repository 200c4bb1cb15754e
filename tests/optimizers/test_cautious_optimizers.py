"""Tests for the ready-made cautious-family optimizers: `cautious_adamw`, `cautious_lion`,
`cwd_adamw`, `cwd_lion`, `grams`, `adamp` and `upgd`.

Each is checked end to end (learning rate and decay included) against a float64 NumPy reference
over several steps, and against the optax optimizer it reduces to in the degenerate cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal
from tests.transforms.test_cautious import (
    SHAPES,
    NpAdam,
    NpAdamP,
    NpLion,
    NpUpgd,
    compare_trajectory,
    normal_tree,
    np_cautious,
    np_cwd,
    random_grads,
)

LR = 0.05
# Full updates are η-scaled: 1e-5 of a unit-scale direction. Absolute slack matters where the
# direction and the decay cancel; float32 Adam itself is ~7e-6 off float64 at step 1 (1 − b2 rounds).
FULL_ATOL = LR * 1e-5


def _jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


def _run(opt, params, grads, *, jit=False):
    """Applies `opt` to a list of gradient trees; returns (updates per step, final params, state)."""
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, params, state


def _grads(seed, steps=6, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [_jnp(normal_tree(rng, shapes)) for _ in range(steps)]


def _same_sign_grads(seed, steps=6, shapes=SHAPES):
    """Fresh magnitudes, a fixed sign per coordinate: momentum always agrees with the gradient."""
    rng = np.random.default_rng(seed)
    signs = {k: np.where(rng.standard_normal(s) >= 0, 1.0, -1.0) for k, s in shapes.items()}
    return [
        _jnp(
            {
                k: np.asarray(signs[k] * (0.1 + np.abs(rng.standard_normal(s))), np.float32)
                for k, s in shapes.items()
            }
        )
        for _ in range(steps)
    ]


PARAMS = _jnp(normal_tree(np.random.default_rng(100)))


# ---------------------------------------------------------------------------------------------
# Full optimizers vs NumPy references: u = −η (direction + decay).


def test_cwd_adamw_matches_numpy():
    lam = 0.5
    adam = NpAdam(SHAPES)

    def np_step(t, g, p):
        d = adam.direction(t, g)
        return {k: -LR * np_cwd(d[k], p[k], lam) for k in d}

    opt = cljax.cwd_adamw(LR, weight_decay=lam)
    compare_trajectory(
        opt,
        np_step,
        normal_tree(np.random.default_rng(1)),
        random_grads(2),
        steps=8,
        full=True,
        atol=FULL_ATOL,
        jit=True,
    )


def test_cwd_adamw_scheduled_weight_decay_matches_numpy_and_counts():
    sched = optax.linear_schedule(0.0, 1.0, transition_steps=5)
    adam = NpAdam(SHAPES)

    def np_step(t, g, p):
        d = adam.direction(t, g)
        lam = min((t - 1) / 5, 1.0)  # the schedule sees the count before this step
        return {k: -LR * np_cwd(d[k], p[k], lam) for k in d}

    opt = cljax.cwd_adamw(LR, weight_decay=sched)
    compare_trajectory(
        opt,
        np_step,
        normal_tree(np.random.default_rng(3)),
        random_grads(4),
        steps=7,
        full=True,
        atol=FULL_ATOL,
    )
    _, _, state = _run(opt, PARAMS, _grads(5, steps=3))
    # The fused step keeps the schedule's count in Adam's state.
    assert int(cljax.find_state(state, optax.ScaleByAdamState).count) == 3


def test_cwd_lion_matches_numpy():
    lam = 0.3
    lion = NpLion(SHAPES)

    def np_step(t, g, p):
        d = lion.direction(t, g)
        return {k: -LR * np_cwd(d[k], p[k], lam) for k in d}

    compare_trajectory(
        cljax.cwd_lion(LR, weight_decay=lam),
        np_step,
        normal_tree(np.random.default_rng(6)),
        random_grads(7),
        steps=8,
        full=True,
        atol=FULL_ATOL,
    )


@pytest.mark.parametrize("normalization", ["mean_clamp", "none"])
def test_cautious_adamw_matches_numpy(normalization):
    lam = 0.2
    adam = NpAdam(SHAPES)

    def np_step(t, g, p):
        d = adam.direction(t, g)
        return {k: -LR * (np_cautious(d[k], g[k], normalization, 1e-3) + lam * p[k]) for k in d}

    opt = cljax.cautious_adamw(LR, weight_decay=lam, normalization=normalization)
    compare_trajectory(
        opt,
        np_step,
        normal_tree(np.random.default_rng(8)),
        random_grads(9),
        steps=8,
        full=True,
        atol=FULL_ATOL,
    )


def test_cautious_lion_matches_numpy():
    lam = 0.1
    lion = NpLion(SHAPES)

    def np_step(t, g, p):
        d = lion.direction(t, g)
        return {k: -LR * (np_cautious(d[k], g[k], "numel_sum", 1e-3) + lam * p[k]) for k in d}

    opt = cljax.cautious_lion(LR, weight_decay=lam, normalization="numel_sum")
    compare_trajectory(
        opt,
        np_step,
        normal_tree(np.random.default_rng(10)),
        random_grads(11),
        steps=8,
        full=True,
        atol=FULL_ATOL,
    )


def test_grams_matches_numpy_with_decoupled_decay():
    lam = 0.1
    adam = NpAdam(SHAPES)

    def np_step(t, g, p):
        d = adam.direction(t, g)
        return {k: -LR * (np.sign(g[k]) * np.abs(d[k]) + lam * p[k]) for k in d}

    compare_trajectory(
        cljax.grams(LR, weight_decay=lam),
        np_step,
        normal_tree(np.random.default_rng(12)),
        random_grads(13),
        steps=8,
        full=True,
        atol=FULL_ATOL,
    )


def test_adamp_matches_numpy():
    shapes = {"w": (4, 3), "b": (3,)}
    kw = dict(weight_decay=0.1, delta=0.1, wd_ratio=0.1)
    ref = NpAdamP(shapes, **kw)
    rng = np.random.default_rng(14)

    def grads(t, p):
        g = normal_tree(rng, shapes)
        if t % 2:  # odd steps: orthogonal per channel (Flax: columns), projection triggers
            w = p["w"].astype(np.float64)
            w_hat = w / np.linalg.norm(w, axis=0, keepdims=True)
            r = g["w"].astype(np.float64)
            g["w"] = (r - w_hat * np.sum(w_hat * r, axis=0, keepdims=True)).astype(np.float32)
        else:  # even steps: aligned with the weight, no projection
            g["w"] = (g["w"] + 2.0 * p["w"]).astype(np.float32)
        return g

    np_step = lambda t, g, p: {k: -LR * v for k, v in ref(t, g, p).items()}  # noqa: E731
    compare_trajectory(
        cljax.adamp(LR, **kw),
        np_step,
        normal_tree(np.random.default_rng(15), shapes),
        grads,
        steps=6,
        full=True,
        atol=FULL_ATOL,
    )
    assert [v["w"] for v in ref.views] == ["channel", None] * 3


@pytest.mark.parametrize("protect", [True, False])
def test_upgd_with_schedules_matches_numpy(protect):
    lr_sched = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.8)
    lam = 0.05
    ref = NpUpgd(SHAPES, beta=0.9, protect=protect)

    def np_step(t, g, p):
        eta = 0.1 * 0.8 ** (t - 1)
        out = ref(t, g, p)
        return {k: -eta * (out[k] + lam * p[k]) for k in out}

    opt = cljax.upgd(lr_sched, weight_decay=lam, beta_utility=0.9, sigma=0.0, protect=protect)
    compare_trajectory(
        opt,
        np_step,
        normal_tree(np.random.default_rng(16)),
        random_grads(17),
        steps=7,
        full=True,
        atol=FULL_ATOL,
    )


def test_upgd_scheduled_weight_decay_and_mask():
    opt = cljax.upgd(
        0.1,
        weight_decay=optax.constant_schedule(0.5),
        sigma=0.0,
        mask={"w": True, "b": False, "k": True, "s": False},
    )
    g = jax.tree.map(jnp.zeros_like, PARAMS)
    u, _ = opt.update(g, opt.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(u["w"]), -0.05 * np.asarray(PARAMS["w"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(u["b"]), 0.0)


# ---------------------------------------------------------------------------------------------
# Degenerate cases vs optax.


def test_cwd_adamw_without_decay_is_adam():
    grads = _grads(20)
    a, pa, _ = _run(cljax.cwd_adamw(LR, weight_decay=0.0), PARAMS, grads)
    b, pb, _ = _run(optax.adam(LR), PARAMS, grads)
    assert_trees_close(a, b, rtol=0, atol=0)
    assert_trees_close(pa, pb, rtol=0, atol=0)


def test_cwd_adamw_nesterov_without_decay_is_nesterov_adam():
    grads = _grads(21)
    a, _, _ = _run(cljax.cwd_adamw(LR, weight_decay=0.0, nesterov=True), PARAMS, grads)
    b, _, _ = _run(optax.adam(LR, nesterov=True), PARAMS, grads)
    assert_trees_close(a, b, rtol=0, atol=0)


def test_cwd_lion_without_decay_is_lion():
    grads = _grads(22)
    a, pa, _ = _run(cljax.cwd_lion(LR, weight_decay=0.0), PARAMS, grads)
    b, pb, _ = _run(optax.lion(LR, weight_decay=0.0), PARAMS, grads)
    assert_trees_close(a, b, rtol=0, atol=0)
    assert_trees_close(pa, pb, rtol=0, atol=0)


def test_cwd_adamw_all_signs_agree_is_adamw():
    """Params keep the sign of the (always agreeing) Adam direction: CWD decays everywhere."""
    grads = _same_sign_grads(23, steps=4)
    params = jax.tree.map(lambda g: 5.0 * jnp.sign(g), grads[0])  # far from zero: signs never flip
    a, _, _ = _run(cljax.cwd_adamw(LR, weight_decay=0.1), params, grads)
    b, _, _ = _run(optax.adamw(LR, weight_decay=0.1), params, grads)
    assert_trees_equal(a, b)


def test_cautious_adamw_all_agree_is_adamw():
    grads = _same_sign_grads(24)
    a, pa, sa = _run(cljax.cautious_adamw(LR, weight_decay=0.1), PARAMS, grads)
    b, pb, sb = _run(optax.adamw(LR, weight_decay=0.1), PARAMS, grads)
    assert_trees_equal(a, b)
    assert_trees_equal(pa, pb)
    assert_trees_equal(sa, sb)


def test_cautious_adamw_differs_from_adamw_when_signs_disagree():
    grads = _grads(25)
    a, _, _ = _run(cljax.cautious_adamw(LR), PARAMS, grads)
    b, _, _ = _run(optax.adamw(LR, weight_decay=1e-4), PARAMS, grads)
    assert any(not np.array_equal(a[-1][k], b[-1][k]) for k in SHAPES)


def test_grams_equals_adamw_when_momentum_agrees_with_gradient():
    grads = _same_sign_grads(26)
    a, pa, sa = _run(cljax.grams(LR, weight_decay=0.1), PARAMS, grads)
    b, pb, sb = _run(optax.adamw(LR, weight_decay=0.1), PARAMS, grads)
    assert_trees_equal(a, b)
    assert_trees_equal(pa, pb)
    assert_trees_equal(sa, sb)


def test_adamp_delta_zero_is_adamw():
    grads = _grads(27)
    a, pa, _ = _run(cljax.adamp(LR, weight_decay=0.1, delta=0.0), PARAMS, grads, jit=True)
    b, pb, _ = _run(optax.adamw(LR, weight_decay=0.1), PARAMS, grads, jit=True)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-8)
    assert_trees_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_upgd_is_noisy_unless_sigma_zero():
    grads = _grads(29, steps=2)
    a, _, _ = _run(cljax.upgd(LR, sigma=0.0), PARAMS, grads)
    b, _, _ = _run(cljax.upgd(LR, sigma=0.0), PARAMS, grads)
    c, _, _ = _run(cljax.upgd(LR, sigma=0.1), PARAMS, grads)
    assert_trees_equal(a, b)
    assert not np.array_equal(a[-1]["w"], c[-1]["w"])


# ---------------------------------------------------------------------------------------------
# inject_hyperparams, masks, dtypes.


@pytest.mark.parametrize(
    "factory,kwargs,static",
    [
        (cljax.cwd_adamw, {"learning_rate": LR, "weight_decay": 0.1}, ()),
        (cljax.cwd_lion, {"learning_rate": LR, "weight_decay": 0.1}, ()),
        (cljax.cautious_adamw, {"learning_rate": LR, "weight_decay": 0.1}, ()),
        (cljax.grams, {"learning_rate": LR, "weight_decay": 0.1}, ()),
        # channel_axis and seed are structural: inject_hyperparams would turn their int defaults
        # into arrays, so they are declared static (as in the conformance registry).
        (cljax.adamp, {"learning_rate": LR, "weight_decay": 0.1, "delta": 0.5}, ("channel_axis",)),
        (
            cljax.upgd,
            {"learning_rate": LR, "weight_decay": 0.1, "sigma": 0.0, "beta_utility": 0.9},
            ("seed",),
        ),
    ],
    ids=["cwd_adamw", "cwd_lion", "cautious_adamw", "grams", "adamp", "upgd"],
)
def test_inject_hyperparams_equals_plain(factory, kwargs, static):
    grads = _grads(30, steps=4)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    a, pa, state = _run(injected, PARAMS, grads, jit=True)
    b, pb, _ = _run(factory(**kwargs), PARAMS, grads, jit=True)
    # optax's own inject_hyperparams(optax.adam) differs from optax.adam by ~7e-6 relative.
    assert_trees_close(a, b, rtol=1e-5, atol=FULL_ATOL)
    assert_trees_close(pa, pb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(state.hyperparams["learning_rate"]), LR)


def test_inject_hyperparams_cwd_weight_decay_can_change_between_steps():
    opt = optax.inject_hyperparams(cljax.cwd_adamw)(learning_rate=LR, weight_decay=0.0)
    state = opt.init(PARAMS)
    g = _grads(31, steps=1)[0]
    u0, _ = opt.update(g, state, PARAMS)
    state.hyperparams["weight_decay"] = jnp.asarray(0.5)
    u1, _ = opt.update(g, state, PARAMS)
    ref, _ = cljax.cwd_adamw(LR, weight_decay=0.5).update(
        g, cljax.cwd_adamw(LR, weight_decay=0.5).init(PARAMS), PARAMS
    )
    assert_trees_close(u1, ref, rtol=1e-5, atol=FULL_ATOL)
    assert any(not np.allclose(u0[k], u1[k]) for k in SHAPES)


@pytest.mark.parametrize(
    "factory",
    [
        cljax.cwd_adamw,
        cljax.cwd_lion,
        cljax.cautious_adamw,
        cljax.cautious_lion,
        cljax.grams,
        cljax.upgd,
    ],
    ids=["cwd_adamw", "cwd_lion", "cautious_adamw", "cautious_lion", "grams", "upgd"],
)
def test_decay_mask_skips_masked_leaves(factory):
    mask = {"w": True, "b": False, "k": True, "s": False}
    kw = {"sigma": 0.0} if factory is cljax.upgd else {}
    grads = _grads(32, steps=2)
    a, _, _ = _run(factory(LR, weight_decay=0.3, mask=mask, **kw), PARAMS, grads)
    b, _, _ = _run(factory(LR, weight_decay=0.0, **kw), PARAMS, grads)
    c, _, _ = _run(factory(LR, weight_decay=0.3, **kw), PARAMS, grads)
    for k in ("b", "s"):
        np.testing.assert_allclose(
            np.asarray(a[0][k]), np.asarray(b[0][k]), rtol=1e-6, atol=1e-9, err_msg=k
        )
    np.testing.assert_allclose(np.asarray(a[0]["w"]), np.asarray(c[0]["w"]), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "factory",
    [cljax.cwd_adamw, cljax.cwd_lion, cljax.cautious_adamw, cljax.cautious_lion, cljax.grams],
    ids=["cwd_adamw", "cwd_lion", "cautious_adamw", "cautious_lion", "grams"],
)
def test_mu_dtype_and_bfloat16_params(factory):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    opt = factory(LR, weight_decay=0.1, mu_dtype=jnp.bfloat16)
    grads = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in _grads(33, steps=3)]
    outs, new_params, state = _run(opt, params, grads)
    for k in SHAPES:
        assert outs[-1][k].dtype == jnp.bfloat16 and new_params[k].dtype == jnp.bfloat16, k
        assert np.all(np.isfinite(np.asarray(new_params[k], np.float32))), k
    mus = [s.mu for s in cljax.find_states(state, lambda s: hasattr(s, "mu"))]
    assert mus and all(v.dtype == jnp.bfloat16 for mu in mus for v in jax.tree.leaves(mu))


def test_adamp_and_upgd_bfloat16_params():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    grads = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in _grads(34, steps=3)]
    for opt in (cljax.adamp(LR, weight_decay=0.1), cljax.upgd(LR, weight_decay=0.1, sigma=0.01)):
        _, new_params, _ = _run(opt, params, grads)
        for k in SHAPES:
            assert new_params[k].dtype == jnp.bfloat16, k
            assert np.all(np.isfinite(np.asarray(new_params[k], np.float32))), k


# ---------------------------------------------------------------------------------------------
# Errors surface through the optimizers.


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda: cljax.cwd_adamw(LR, weight_decay=-1.0),
            ValueError,
            r"weight_decay=\.\.\.\) must be in",
        ),
        (
            lambda: cljax.cwd_lion(LR, weight_decay=-1.0),
            ValueError,
            r"weight_decay=\.\.\.\) must be in",
        ),
        (
            lambda: cljax.cautious_adamw(LR, normalization="x"),
            ValueError,
            r"normalization=\.\.\.\) must be one of",
        ),
        (lambda: cljax.cautious_lion(LR, clamp=0.0), ValueError, r"clamp=\.\.\.\) must be in"),
        (lambda: cljax.grams(LR, b1=2.0), ValueError, r"scale_by_grams\(b1=\.\.\.\)"),
        (
            lambda: cljax.adamp(LR, channel_axis="last"),
            TypeError,
            r"channel_axis=\.\.\.\) must be an int",
        ),
        (lambda: cljax.adamp(LR, b2=1.0), ValueError, r"scale_by_adamp\(b2=\.\.\.\)"),
        (lambda: cljax.upgd(LR, sigma=-0.1), ValueError, r"sigma=\.\.\.\) must be in"),
        (lambda: cljax.upgd(LR, beta_utility=1.0), ValueError, r"beta_utility=\.\.\.\) must be in"),
        (lambda: cljax.upgd(LR, protect="yes"), TypeError, r"protect=\.\.\.\) must be a bool"),
    ],
)
def test_optimizer_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "opt",
    [cljax.cwd_adamw(LR), cljax.cwd_lion(LR), cljax.adamp(LR), cljax.upgd(LR)],
    ids=["cwd_adamw", "cwd_lion", "adamp", "upgd"],
)
def test_optimizer_without_params_raises(opt):
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update(PARAMS, opt.init(PARAMS), None)
