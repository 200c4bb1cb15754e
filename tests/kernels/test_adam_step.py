"""Tests of the fused element-wise optimizer step (`cljax.kernels.adam_step`).

The `jnp` reference is checked against optax (`optax.adamw`) and the cljax optimizers it fuses
(`cautious_adamw`, `cwd_adamw`, `cautious` + `add_cautious_weight_decay`) over several steps, and
against a float64 NumPy transcription of the formula (mask, `eps_root`, `apply`, every cautious
normalisation). The Pallas kernel (both target variants) is checked against the reference in
interpret mode on random shapes that the block shape does not divide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cljax
from cljax.kernels import _adam_step
from tests.kernels import kernel_testing as kt

HYPER = dict(learning_rate=0.05, b1=0.9, b2=0.99, eps=1e-8)


def _np_step(
    g,
    p,
    mu,
    nu,
    count,
    *,
    learning_rate,
    b1,
    b2,
    eps,
    eps_root=0.0,
    weight_decay=0.0,
    cautious=None,
    clamp=1e-3,
    cautious_weight_decay=False,
    mask=None,
    apply=False,
):
    """The module docstring's formula in float64 NumPy (the CWD test reads the direction)."""
    g, p, mu, nu = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (g, p, mu, nu))
    t = count + 1
    mu1 = b1 * mu + (1 - b1) * g
    nu1 = b2 * nu + (1 - b2) * g * g
    d = (mu1 / (1 - b1**t)) / (np.sqrt(nu1 / (1 - b2**t) + eps_root) + eps)
    if cautious is not None:
        phi = (mu1 * g > 0).astype(np.float64)
        scale = {
            "mean_clamp": 1 / max(phi.mean(), clamp),
            "mean_eps": 1 / (phi.mean() + clamp),
            "numel_sum": phi.size / (phi.sum() + 1),
            "none": 1.0,
        }[cautious]
        d = d * phi * scale
    if cautious_weight_decay:
        d = d + weight_decay * (d * p >= 0) * p
    else:
        d = d + weight_decay * p
    u = -learning_rate * d
    if mask is not None:
        u = u * (np.asarray(mask) != 0)
    return (p + u if apply else u), mu1, nu1


def _random_operands(rng, shape, dtype=jnp.float32):
    g, p, mu = (rng.standard_normal(shape) for _ in range(3))
    nu = rng.standard_normal(shape) ** 2
    return tuple(jnp.asarray(x, dtype) for x in (g, p, mu, nu))


# ---------------------------------------------------------------------------------------------
# The reference against optax and the cljax optimizers it fuses.


def _trajectory(opt, ref_kwargs, steps=5, shape=(6, 5)):
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    state = opt.init(p)
    mu = nu = jnp.zeros(shape, jnp.float32)
    for t in range(steps):
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        with jax.numpy_dtype_promotion("standard"):
            want, state = opt.update(g, state, p)
        got, mu, nu = _adam_step.reference(g, p, mu, nu, t, **ref_kwargs)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
        p = p + want


def test_reference_is_optax_adamw():
    _trajectory(optax.adamw(0.05, b1=0.9, b2=0.99, weight_decay=0.1), dict(HYPER, weight_decay=0.1))


def test_reference_is_cautious_adamw():
    _trajectory(
        cljax.cautious_adamw(0.05, b1=0.9, b2=0.99, weight_decay=0.1),
        dict(HYPER, weight_decay=0.1, cautious="mean_clamp"),
    )


def test_reference_is_cwd_adamw():
    _trajectory(
        cljax.cwd_adamw(0.05, b1=0.9, b2=0.99, weight_decay=0.3),
        dict(HYPER, weight_decay=0.3, cautious_weight_decay=True),
    )


def test_reference_is_cautious_then_cautious_decay():
    opt = optax.chain(
        cljax.cautious(optax.scale_by_adam(b1=0.9, b2=0.99), normalization="mean_eps", clamp=0.01),
        cljax.add_cautious_weight_decay(0.3),
        optax.scale_by_learning_rate(0.05),
    )
    _trajectory(
        opt,
        dict(HYPER, weight_decay=0.3, cautious="mean_eps", clamp=0.01, cautious_weight_decay=True),
    )


@pytest.mark.parametrize(
    "cautious, cwd",
    [(None, False), ("mean_clamp", True), ("numel_sum", False), ("none", True)]
    + [
        pytest.param(c, w, marks=pytest.mark.slow)
        for c, w in [(None, True), ("mean_clamp", False), ("mean_eps", False), ("mean_eps", True),
                     ("numel_sum", True), ("none", False)]
    ],
)  # fmt: skip
def test_reference_matches_numpy_formula(cautious, cwd):
    rng = np.random.default_rng(1)
    g, p, mu, nu = _random_operands(rng, (5, 7))
    mask = rng.random((5, 7)) < 0.6
    kwargs = dict(
        HYPER,
        eps_root=1e-3,
        weight_decay=0.2,
        cautious=cautious,
        clamp=0.5,
        cautious_weight_decay=cwd,
        mask=mask,
        apply=True,
    )
    got = _adam_step.reference(g, p, mu, nu, 4, **kwargs)
    want = _np_step(g, p, mu, nu, 4, **kwargs)
    for name, a, b in zip(("out", "mu", "nu"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_mask_keeps_masked_weights_and_updates_moments():
    rng = np.random.default_rng(2)
    g, p, mu, nu = _random_operands(rng, (4, 9))
    mask = jnp.asarray(rng.random((4, 9)) < 0.5)
    new_p, new_mu, _ = _adam_step.reference(
        g, p, mu, nu, 0, **HYPER, weight_decay=0.1, mask=mask, apply=True
    )
    np.testing.assert_array_equal(np.where(mask, 0.0, new_p - p), 0.0)
    assert np.all(np.asarray(new_p != p)[np.asarray(mask)])
    _, plain_mu, _ = _adam_step.reference(g, p, mu, nu, 0, **HYPER, weight_decay=0.1)
    np.testing.assert_array_equal(new_mu, plain_mu)


@settings(max_examples=15, deadline=None)
@given(
    # |g| stays below sqrt(float32 max): the second moment holds g², as in optax.
    values=hnp.arrays(
        np.float32, (4, 6), elements=st.sampled_from([0.0, -0.0, 1e-30, -1e18, 1e18, 1.0, -2.5])
    ),
    count=st.integers(0, 2**31 - 1),
    cautious=st.sampled_from([None, "mean_clamp", "numel_sum"]),
)
def test_finite_input_gives_finite_output(values, count, cautious):
    g = jnp.asarray(values)
    p = jnp.asarray(values[::-1] * 3e20)  # parameters up to 3e38
    zeros = jnp.zeros_like(g)
    out = _adam_step.reference(
        g,
        p,
        zeros,
        zeros,
        count,
        **HYPER,
        weight_decay=0.1,
        cautious=cautious,
        cautious_weight_decay=True,
    )
    for x in out:
        assert np.isfinite(np.asarray(x)).all()


def test_zero_gradient_with_zero_state_is_pure_decay():
    p = jnp.arange(-3.0, 3.0).reshape(2, 3)
    z = jnp.zeros_like(p)
    u, mu, nu = _adam_step.reference(z, p, z, z, 0, **HYPER, weight_decay=0.5)
    np.testing.assert_allclose(u, -0.05 * 0.5 * p, rtol=1e-6)
    np.testing.assert_array_equal(mu, 0.0)
    np.testing.assert_array_equal(nu, 0.0)


# ---------------------------------------------------------------------------------------------
# The kernel against the reference.

CONFIGS = {
    "adamw": dict(weight_decay=0.1),
    "cautious_cwd_mask": dict(weight_decay=0.1, cautious="mean_clamp", cautious_weight_decay=True),
    "apply_in_place": dict(weight_decay=0.1, apply=True),
}
BLOCKS = {"gpu": (8, 128), "tpu": (32, 128)}


@functools.cache
def _jitted_pallas(target, interpret, block, config, with_mask, donate):
    kwargs = dict(CONFIGS[config])
    interp = kt.interpret_arg(target, interpret)

    def run(g, p, mu, nu, mask):
        return _adam_step.pallas(
            g,
            p,
            mu,
            nu,
            7,
            **HYPER,
            **kwargs,
            mask=mask if with_mask else None,
            target=target,
            block=block,
            interpret=interp,
        )

    return jax.jit(run, donate_argnums=(1, 2, 3) if donate else ())


class TestAdamStep:
    interpret = False  # compiled: needs a GPU or TPU

    def check(self, request, target, dtype, config, shape, *, with_mask=False, block=None):
        kt.skip_unless_runnable(target, self.interpret)
        rng = kt.case_rng(request)
        g, p, mu, nu = _random_operands(rng, shape, dtype)
        mask = jnp.asarray(rng.random(shape) < 0.7)
        want = _adam_step.reference(
            g, p, mu, nu, 7, **HYPER, **CONFIGS[config], mask=mask if with_mask else None
        )
        donate = CONFIGS[config].get("apply", False)
        block = BLOCKS[target] if block is None else block
        fn = _jitted_pallas(target, self.interpret, block, config, with_mask, donate)
        got = fn(g, p, mu, nu, mask)
        if donate and jax.default_backend() != "cpu":  # the CPU ignores donation
            assert p.is_deleted() and mu.is_deleted() and nu.is_deleted()
        for name, a, b in zip(("out", "mu", "nu"), got, want, strict=True):
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
            kt.assert_close(a, b, dtype, f"{target} {config} {shape} {name}")

    @pytest.mark.parametrize("target, dtype", kt.DEFAULT_TARGET_DTYPES, ids=kt.DEFAULT_IDS)
    def test_matches_reference(self, request, target, dtype):
        rows = int(kt.case_rng(request).integers(33, 70))
        self.check(request, target, dtype, "cautious_cwd_mask", (rows, 3, 100), with_mask=True)

    @pytest.mark.parametrize("target", kt.TARGETS)
    def test_in_place_apply_matches_reference(self, request, target):
        self.check(request, target, jnp.float32, "apply_in_place", (3, 5, 7))

    @pytest.mark.slow
    @pytest.mark.parametrize("config", sorted(CONFIGS))
    @pytest.mark.parametrize("dtype", kt.DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("target", kt.TARGETS)
    @pytest.mark.parametrize("shape", [(), (1,), (129,), (1000, 3), (4, 256), (2, 3, 4, 5)])
    def test_matches_reference_many_shapes(self, request, target, dtype, config, shape):
        self.check(request, target, dtype, config, shape, with_mask=config != "apply_in_place")

    @pytest.mark.slow
    @pytest.mark.parametrize("target", kt.TARGETS)
    def test_default_blocks(self, request, target):
        self.check(request, target, jnp.float32, "adamw", (300, 700), block=None)


class TestAdamStepInterpret(TestAdamStep):
    interpret = True  # the same tests, on the CPU, in interpret mode


def test_tpu_variant_in_the_tpu_interpreter():
    g, p, mu, nu = _random_operands(np.random.default_rng(5), (64, 256))
    kwargs = dict(HYPER, weight_decay=0.1, cautious="mean_clamp", apply=True)
    want = _adam_step.reference(g, p, mu, nu, 3, **kwargs)
    got = jax.jit(
        lambda *a: _adam_step.pallas(
            *a, 3, **kwargs, target="tpu", block=(16, 256), interpret=kt.tpu_interpreter()
        )
    )(g, p, mu, nu)
    for a, b in zip(got, want, strict=True):
        kt.assert_close(a, b, jnp.float32)


# ---------------------------------------------------------------------------------------------
# The dispatcher and argument errors.


def test_dispatch_xla_and_auto_are_the_reference_on_cpu():
    g, p, mu, nu = _random_operands(np.random.default_rng(3), (3, 4))
    want = _adam_step.reference(g, p, mu, nu, 2, **HYPER, weight_decay=0.1)
    for impl in ("xla", "auto"):
        got = cljax.kernels.adam_step(g, p, mu, nu, 2, **HYPER, weight_decay=0.1, impl=impl)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_dispatch_pallas_runs_the_kernel_in_interpret_mode_on_cpu():
    g, p, mu, nu = _random_operands(np.random.default_rng(4), (3, 4))
    want = _adam_step.reference(g, p, mu, nu, 2, **HYPER, weight_decay=0.1)
    got = jax.jit(
        lambda *a: cljax.kernels.adam_step(*a, 2, **HYPER, weight_decay=0.1, impl="pallas")
    )(g, p, mu, nu)
    for a, b in zip(got, want, strict=True):
        kt.assert_close(a, b, jnp.float32)


def test_errors():
    x = jnp.zeros((3, 4))
    with pytest.raises(
        ValueError, match=r"adam_step\(impl=...\) must be 'auto', 'xla' or 'pallas'"
    ):
        cljax.kernels.adam_step(x, x, x, x, 0, learning_rate=0.1, impl="triton")
    with pytest.raises(
        ValueError, match="adam_step: `nu` has shape \\(4, 3\\) but `grad` has shape"
    ):
        cljax.kernels.adam_step(x, x, x, x.T, 0, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"adam_step\(cautious=...\) must be one of"):
        cljax.kernels.adam_step(x, x, x, x, 0, learning_rate=0.1, cautious="mean")
    with pytest.raises(ValueError, match=r"adam_step\(target=...\) must be 'gpu', 'tpu' or None"):
        _adam_step.pallas(x, x, x, x, 0, learning_rate=0.1, target="cuda")
    with pytest.raises(ValueError, match=r"must be powers of two for target='gpu'"):
        _adam_step.pallas(x, x, x, x, 0, learning_rate=0.1, target="gpu", block=(3, 128))
    with pytest.raises(ValueError, match=r"multiples of \(16, 128\) or equal to the view's"):
        _adam_step.pallas(x, x, x, x, 0, learning_rate=0.1, target="tpu", block=(8, 128))
    with pytest.raises(ValueError, match=r"must be 2 positive ints"):
        _adam_step.pallas(x, x, x, x, 0, learning_rate=0.1, target="tpu", block=(8,))
