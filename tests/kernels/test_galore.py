"""Tests of the fused GaLore projection step (`cljax.kernels.galore_adam_step`).

The reference is checked against `cljax.scale_by_low_rank_projection` with an Adam inner
transform (followed by decay and the learning rate) on a step between basis refreshes, against a
float64 NumPy transcription, and against the element-wise Adam step with a full identity basis.
The two Pallas kernels (both target variants, both sides, stacked matrices) are checked against
the reference in interpret mode, with sizes the blocks do not divide.
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

import cljax
from cljax.kernels import _adam_step, _galore
from tests.kernels import kernel_testing as kt

HYPER = dict(learning_rate=0.05, b1=0.9, b2=0.99, eps=1e-8)


def _operands(rng, batch, m, n, r, side, dtype=jnp.float32):
    g = jnp.asarray(rng.standard_normal((*batch, m, n)), dtype)
    d = m if side == "left" else n
    raw = rng.standard_normal((*batch, d, r))
    basis = np.linalg.qr(raw)[0] if r <= d else raw / np.sqrt(d)  # a rank above d: not orthonormal
    low = (*batch, r, n) if side == "left" else (*batch, m, r)
    mu = jnp.asarray(0.1 * rng.standard_normal(low), dtype)
    nu = jnp.asarray(rng.uniform(0.5, 1.5, low) * 0.01, dtype)
    p = jnp.asarray(rng.standard_normal((*batch, m, n)), dtype)
    return g, jnp.asarray(basis, jnp.float32), mu, nu, p


def _np_step(
    g,
    basis,
    mu,
    nu,
    count,
    *,
    side,
    learning_rate,
    b1,
    b2,
    eps,
    eps_root=0.0,
    scale=1.0,
    weight_decay=0.0,
    param=None,
    apply=False,
):
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    g, basis, mu, nu = map(f64, (g, basis, mu, nu))
    t = count + 1
    low = np.einsum("...mr,...mn->...rn", basis, g) if side == "left" else g @ basis
    mu1 = b1 * mu + (1 - b1) * low
    nu1 = b2 * nu + (1 - b2) * low**2
    d = (mu1 / (1 - b1**t)) / (np.sqrt(nu1 / (1 - b2**t) + eps_root) + eps)
    back = basis @ d if side == "left" else d @ np.swapaxes(basis, -1, -2)
    p = 0.0 if param is None else f64(param)
    u = -learning_rate * (scale * back + weight_decay * p)
    return (p + u if apply else u), mu1, nu1


# ---------------------------------------------------------------------------------------------
# The reference.


@pytest.mark.parametrize("side", ["left", pytest.param("right", marks=pytest.mark.slow)])
def test_reference_is_the_projection_transform_between_refreshes(side):
    shape, r, scale, wd = (2, 9, 7), 3, 0.25, 0.1
    tx = optax.chain(
        cljax.scale_by_low_rank_projection(
            optax.scale_by_adam(b1=0.9, b2=0.99), rank=r, side=side, refresh_every=100, scale=scale
        ),
        optax.add_decayed_weights(wd),
        optax.scale_by_learning_rate(0.05),
    )
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for step in range(3):
            grads = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
            before = state[0]
            updates, state = tx.update(grads, state, params)
            if step == 0:
                continue  # the first step builds the basis
            inner = before.inner["w"]
            got = _galore.reference(
                grads["w"],
                before.projector["w"],
                inner.mu,
                inner.nu,
                inner.count,
                side=side,
                **HYPER,
                scale=scale,
                weight_decay=wd,
                param=params["w"],
            )
            np.testing.assert_allclose(got[0], updates["w"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got[1], state[0].inner["w"].mu, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got[2], state[0].inner["w"].nu, rtol=1e-5, atol=1e-9)
            params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("side", ["left", "right"])
def test_reference_matches_numpy(side):
    g, basis, mu, nu, p = _operands(np.random.default_rng(1), (2,), 6, 5, 3, side)
    kwargs = dict(
        side=side, **HYPER, eps_root=1e-4, scale=0.5, weight_decay=0.2, param=p, apply=True
    )
    got = _galore.reference(g, basis, mu, nu, 5, **kwargs)
    want = _np_step(g, basis, mu, nu, 5, **kwargs)
    for name, a, b in zip(("out", "mu", "nu"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_identity_basis_gives_the_element_wise_adam_step(side):
    g, _, _, _, p = _operands(np.random.default_rng(2), (), 5, 4, 4, side)
    basis = jnp.eye(5 if side == "left" else 4)
    mu = nu = jnp.zeros((5, 4))
    got = _galore.reference(g, basis, mu, nu, 2, side=side, **HYPER, weight_decay=0.1, param=p)
    want = _adam_step.reference(g, p, mu, nu, 2, **HYPER, weight_decay=0.1)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@functools.cache
def _jitted_reference(side):
    return jax.jit(
        lambda g, basis, z: _galore.reference(
            g, basis, z, z, 0, side=side, **HYPER, weight_decay=0.1, param=g + 1.0
        )
    )


@settings(max_examples=12, deadline=None)
@given(
    mnr=st.sampled_from([(1, 1, 1), (3, 2, 5), (4, 4, 4)]),  # rank up to and beyond min(m, n)
    zero=st.booleans(),
    side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-30, 1.0, 1e15]),
)
def test_finite_for_zero_gradients_and_rank_beyond_the_matrix(mnr, zero, side, seed, scale):
    m, n, r = mnr
    rng = np.random.default_rng(seed)
    d = m if side == "left" else n
    basis = jnp.asarray(rng.standard_normal((d, r)), jnp.float32)
    g = jnp.zeros((m, n)) if zero else jnp.asarray(scale * rng.standard_normal((m, n)), jnp.float32)
    low = (r, n) if side == "left" else (m, r)
    out = _jitted_reference(side)(g, basis, jnp.zeros(low))
    for x in out:
        assert np.isfinite(np.asarray(x)).all()
    if zero:
        np.testing.assert_allclose(out[0], -0.05 * 0.1 * (g + 1.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The kernels against the reference.

# (m, n, r) and the (down, up) blocks per target; none of the sizes is a multiple of its block.
SIZES = {
    "gpu": ((37, 45, 20), ((16, 16, 16), (16, 32, 16))),
    "tpu": ((300, 200, 130), ((128, 128, 128),) * 2),
}


@functools.cache
def _jitted(target, interpret, side, blocks, apply, with_param):
    kwargs = dict(side=side, **HYPER, eps_root=1e-6, scale=0.25, apply=apply)

    def run(g, basis, mu, nu, p):
        return _galore.pallas(
            g,
            basis,
            mu,
            nu,
            4,
            **kwargs,
            weight_decay=0.1 if with_param else 0.0,
            param=p if with_param else None,
            target=target,
            blocks=blocks,
            interpret=kt.interpret_arg(target, interpret),
        )

    return jax.jit(run, donate_argnums=(2, 3, 4) if apply else ())


class TestGaloreAdamStep:
    interpret = False  # compiled: needs a GPU or TPU

    def check(
        self, request, target, dtype, side, batch=(), apply=False, with_param=True, sizes=None
    ):
        kt.skip_unless_runnable(target, self.interpret)
        (m, n, r), blocks = sizes or SIZES[target]
        g, basis, mu, nu, p = _operands(kt.case_rng(request), batch, m, n, r, side, dtype)
        want = _galore.reference(
            g,
            basis,
            mu,
            nu,
            4,
            side=side,
            **HYPER,
            eps_root=1e-6,
            scale=0.25,
            weight_decay=0.1 if with_param else 0.0,
            param=p if with_param else None,
            apply=apply,
        )
        got = _jitted(target, self.interpret, side, blocks, apply, with_param)(g, basis, mu, nu, p)
        for name, a, b in zip(("out", "mu", "nu"), got, want, strict=True):
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
            scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
            kt.assert_close(a, b, dtype, f"{target} {side} {name}", scale=scale)

    # The GPU variant's right side runs in `test_stacked_matrices_without_param`.
    @pytest.mark.parametrize("target, side", [("gpu", "left"), ("tpu", "left"), ("tpu", "right")])
    def test_matches_reference(self, request, target, side):
        self.check(request, target, jnp.float32, side)

    def test_bf16_in_place_apply_matches_reference(self, request):
        self.check(request, "gpu", jnp.bfloat16, "left", apply=True)

    def test_stacked_matrices_without_param(self, request):
        self.check(request, "gpu", jnp.float32, "right", batch=(2,), with_param=False)

    @pytest.mark.slow
    @pytest.mark.parametrize("apply", [False, True])
    @pytest.mark.parametrize("side", ["left", "right"])
    @pytest.mark.parametrize("dtype", kt.DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("target", kt.TARGETS)
    @pytest.mark.parametrize("size", [(1, 1, 1), (64, 16, 16), (130, 70, 9), (33, 300, 50)])
    def test_matches_reference_many_sizes(self, request, target, dtype, side, apply, size):
        blocks = None if target == "tpu" else ((16, 32, 16), (32, 16, 32))
        self.check(
            request,
            target,
            dtype,
            side,
            apply=apply,
            sizes=(size, blocks),
            batch=(2,) if apply else (),
        )


class TestGaloreAdamStepInterpret(TestGaloreAdamStep):
    interpret = True  # the same tests, on the CPU, in interpret mode


@pytest.mark.slow
def test_tpu_variant_in_the_tpu_interpreter():
    g, basis, mu, nu, p = _operands(np.random.default_rng(3), (), 256, 128, 128, "left")
    kwargs = dict(side="left", **HYPER, scale=0.25, weight_decay=0.1, param=p)
    want = _galore.reference(g, basis, mu, nu, 1, **kwargs)
    got = jax.jit(
        lambda *a: _galore.pallas(
            *a,
            1,
            **kwargs,
            target="tpu",
            blocks=((128, 128, 128),) * 2,
            interpret=kt.tpu_interpreter(),
        )
    )(g, basis, mu, nu)
    for a, b in zip(got, want, strict=True):
        kt.assert_close(a, b, jnp.float32, scale=float(jnp.max(jnp.abs(b))))


# ---------------------------------------------------------------------------------------------
# The dispatcher and argument errors.


def test_dispatch():
    g, basis, mu, nu, p = _operands(np.random.default_rng(4), (), 6, 5, 2, "right")
    kwargs = dict(side="right", **HYPER, weight_decay=0.1, param=p)
    want = _galore.reference(g, basis, mu, nu, 0, **kwargs)
    for impl in ("auto", "xla"):
        for a, b in zip(
            cljax.kernels.galore_adam_step(g, basis, mu, nu, 0, **kwargs, impl=impl),
            want,
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    got = jax.jit(lambda *a: cljax.kernels.galore_adam_step(*a, 0, **kwargs, impl="pallas"))(
        g, basis, mu, nu
    )
    for a, b in zip(got, want, strict=True):
        kt.assert_close(a, b, jnp.float32)


def test_errors():
    g, basis, mu, nu, p = _operands(np.random.default_rng(5), (), 6, 5, 2, "left")
    step = cljax.kernels.galore_adam_step
    with pytest.raises(
        ValueError, match=r"galore_adam_step\(side=...\) must be one of 'left', 'right'"
    ):
        step(g, basis, mu, nu, 0, side="std", learning_rate=0.1)
    with pytest.raises(ValueError, match=r"`grad` has shape \(5,\); it must be a matrix"):
        step(g[0], basis, mu, nu, 0, side="left", learning_rate=0.1)
    with pytest.raises(
        ValueError, match=r"`projector` has shape \(6, 2\) .* side='right' needs \(..., n, r\)"
    ):
        step(g, basis, mu, nu, 0, side="right", learning_rate=0.1)
    with pytest.raises(ValueError, match=r"`nu` has shape \(5, 2\); side='left' .* needs \(2, 5\)"):
        step(g, basis, mu, nu.T, 0, side="left", learning_rate=0.1)
    with pytest.raises(
        ValueError, match=r"`param` has shape \(5, 6\) but `grad` has shape \(6, 5\)"
    ):
        step(g, basis, mu, nu, 0, side="left", learning_rate=0.1, param=p.T)
    with pytest.raises(ValueError, match=r"galore_adam_step\(apply=True\) needs `param`"):
        step(g, basis, mu, nu, 0, side="left", learning_rate=0.1, apply=True)
    with pytest.raises(ValueError, match=r"galore_adam_step\(weight_decay=...\) needs `param`"):
        step(g, basis, mu, nu, 0, side="left", learning_rate=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"galore_adam_step\(impl=...\) must be"):
        step(g, basis, mu, nu, 0, side="left", learning_rate=0.1, impl="triton")
    pallas = functools.partial(_galore.pallas, g, basis, mu, nu, 0, side="left", learning_rate=0.1)
    with pytest.raises(ValueError, match=r"must be powers of two >= 16 for target='gpu'"):
        pallas(target="gpu", blocks=((8, 16, 16), (16, 16, 16)))
    with pytest.raises(
        ValueError, match=r"must be multiples of 128 or whole dims for target='tpu'"
    ):
        pallas(target="tpu", blocks=((2, 5, 64), (6, 5, 2)))
    with pytest.raises(ValueError, match=r"must be three positive ints"):
        pallas(target="tpu", blocks=((2, 5), (6, 5, 2)))
    with pytest.raises(ValueError, match=r"must be a pair of \(bi, bj, bk\) blocks"):
        pallas(target="tpu", blocks=(2, 5, 6))
