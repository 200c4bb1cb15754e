"""The kernels wired into the transforms: `impl='pallas'` against `impl='xla'`, and `auto`'s choice.

Per wired transform: a few jitted steps with ``impl='pallas'`` (Pallas interpret mode on the CPU)
give the updates and states of ``impl='xla'`` (the unchanged XLA path, itself tested against
NumPy and optax in the families' tests), in float32 and bfloat16, on shapes the kernels' blocks do
not divide; ``impl='auto'`` on the CPU runs the XLA path (bit-identical, the kernel never called),
and with a measured entry in the dispatch table (a fake GPU) it runs the kernel; configurations a
kernel does not cover raise for ``impl='pallas'``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cljax
from cljax.kernels import _adam_step, _dispatch, _galore, _nm_mask, _packed_mask
from tests.kernels import kernel_testing as kt

# Element-wise leaves: a scalar, a vector, a (5, 13) view and a (3, 300) view whose rows and
# columns the default blocks do not divide.
ELEMENTWISE = {"s": (), "v": (8,), "m": (5, 13), "w": (3, 300)}
# Leaves of the GaLore step: a vector (the fallback Adam), a tall matrix (right projector) and a
# stack of two wide ones (left projectors, the kernel mapped over the stack).
MATRICES = {"b": (7,), "tall": (20, 6), "stack": (2, 8, 13)}
# Float32 paths differ by rounding order only; bfloat16 by one rounding of the state and output.
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-6), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPE_IDS = ["f32", "bf16"]


def _tree(rng, shapes, dtype):
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _trajectory(opt, params, grads):
    """Jitted steps of `opt`; returns the updates of every step and the final state."""
    state = opt.init(params)
    update = jax.jit(opt.update)
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state


def _assert_paths_agree(a, b, dtype):
    """Same tree structures and dtypes; values equal to the dtype's tolerance, never NaN."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        xf = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        yf = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
        assert not np.isnan(xf).any()
        np.testing.assert_allclose(xf, yf, **TOL[dtype])


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def no_kernels(monkeypatch):
    """Makes every wired kernel raise: a test using it proves the kernel was not called."""

    def boom(*args, **kwargs):
        raise AssertionError("a Pallas kernel ran")

    for module in (_adam_step, _galore, _nm_mask, _packed_mask):
        monkeypatch.setattr(module, "pallas", boom)


@pytest.fixture
def fake_gpu_table(monkeypatch):
    """A fake GPU whose measured table lists `entries` (ops on float32 operands of any size)."""

    def install(*ops):
        big = 2**40
        table = tuple(
            _dispatch.Measurement(
                "gpu",
                "fake",
                op,
                "float32",
                (0,) * len(_dispatch.OPS[op]),
                (big,) * len(_dispatch.OPS[op]),
                1.5,
                "test",
            )
            for op in ops
        )
        monkeypatch.setattr(_dispatch, "_backend", lambda: "gpu")
        monkeypatch.setattr(_dispatch, "_device_kind", lambda: "fake")
        monkeypatch.setattr(_dispatch, "MEASURED", table)

    return install


# ---------------------------------------------------------------------------------------------
# Fused Adam step: cautious_adamw, cwd_adamw.

ADAM_FACTORIES = {"cautious_adamw": cljax.cautious_adamw, "cwd_adamw": cljax.cwd_adamw}


def _adam_kwargs(name, dtype):
    kwargs = dict(learning_rate=0.05, weight_decay=0.1, b2=0.99)
    if dtype == jnp.float32:  # schedules and a decay mask: the state counts and masks the same
        kwargs.update(
            learning_rate=optax.linear_schedule(0.05, 0.01, 4),
            weight_decay=optax.linear_schedule(0.1, 0.3, 4),
            mask={"s": False, "v": True, "m": True, "w": True},
        )
    if name == "cautious_adamw":
        kwargs["normalization"] = "mean_eps" if dtype == jnp.float32 else "mean_clamp"
    return kwargs


@pytest.mark.parametrize("dtype", kt.DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(ADAM_FACTORIES))
def test_adam_optimizers_pallas_equals_xla(name, dtype, request):
    rng = kt.case_rng(request)
    params = _tree(rng, ELEMENTWISE, dtype)
    grads = [_tree(rng, ELEMENTWISE, dtype) for _ in range(3)]
    kwargs = _adam_kwargs(name, dtype)
    xla = _trajectory(ADAM_FACTORIES[name](**kwargs, impl="xla"), params, grads)
    fused = _trajectory(ADAM_FACTORIES[name](**kwargs, impl="pallas"), params, grads)
    _assert_paths_agree(fused, xla, dtype)


@pytest.mark.parametrize("name", sorted(ADAM_FACTORIES))
def test_adam_optimizers_auto_is_xla_on_cpu(name, no_kernels, request):
    rng = kt.case_rng(request)
    params = _tree(rng, ELEMENTWISE, jnp.float32)
    grads = [_tree(rng, ELEMENTWISE, jnp.float32) for _ in range(2)]
    kwargs = _adam_kwargs(name, jnp.float32)
    assert _dispatch.choose("adam_step", (2**24,), "float32") == "xla"
    auto = _trajectory(ADAM_FACTORIES[name](**kwargs), params, grads)
    xla = _trajectory(ADAM_FACTORIES[name](**kwargs, impl="xla"), params, grads)
    _assert_identical(auto, xla)


def test_adam_optimizer_auto_uses_kernel_where_measured(fake_gpu_table, request):
    rng = kt.case_rng(request)
    params = _tree(rng, ELEMENTWISE, jnp.float32)
    grads = [_tree(rng, ELEMENTWISE, jnp.float32) for _ in range(2)]
    xla = _trajectory(cljax.cwd_adamw(0.05, weight_decay=0.1, impl="xla"), params, grads)
    fake_gpu_table("adam_step")
    calls = []
    real = _adam_step.pallas
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_adam_step, "pallas", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
        auto = _trajectory(cljax.cwd_adamw(0.05, weight_decay=0.1), params, grads)
    assert sorted(calls) == sorted(ELEMENTWISE.values())  # traced once, every leaf
    _assert_paths_agree(auto, xla, jnp.float32)


def test_adam_optimizers_unsupported_configurations_raise():
    with pytest.raises(ValueError, match=r"cautious_adamw\(impl='pallas'\).*nesterov=True"):
        cljax.cautious_adamw(1e-3, nesterov=True, impl="pallas")
    with pytest.raises(ValueError, match=r"cwd_adamw\(impl='pallas'\).*nesterov=True"):
        cljax.cwd_adamw(1e-3, nesterov=True, impl="pallas")
    with pytest.raises(
        ValueError, match=r"cwd_adamw\(impl=\.\.\.\) must be 'auto', 'xla' or 'pallas'"
    ):
        cljax.cwd_adamw(1e-3, impl="triton")
    # `auto` with nesterov is the XLA chain, not an error.
    opt = cljax.cautious_adamw(1e-3, nesterov=True)
    params = {"w": jnp.ones(3)}
    opt.update(params, opt.init(params), params)


def test_adam_optimizer_pallas_without_params_raises():
    opt = cljax.cautious_adamw(1e-3, impl="pallas")
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params), None)


# ---------------------------------------------------------------------------------------------
# Packed-mask apply: mask_updates.


def _masks(rng):
    return {
        "s": jnp.array(True),
        "v": None,  # dense
        "m": jnp.asarray(rng.random((5, 13)) < 0.5),
        "w": jnp.asarray(rng.random((3, 300)) < 0.3),
        "f": jnp.zeros(4, bool),  # frozen
    }


@pytest.mark.parametrize("dtype", kt.DTYPES, ids=DTYPE_IDS)
def test_mask_updates_pallas_equals_xla(dtype, request):
    rng = kt.case_rng(request)
    shapes = {**ELEMENTWISE, "f": (4,)}
    params = _tree(rng, shapes, dtype)
    grads = [_tree(rng, shapes, dtype) for _ in range(2)]
    masks = _masks(rng)
    inner = optax.adamw(0.1, weight_decay=0.1)
    xla = _trajectory(cljax.mask_updates(inner, masks, impl="xla"), params, grads)
    fused = _trajectory(cljax.mask_updates(inner, masks, impl="pallas"), params, grads)
    _assert_identical(fused, xla)  # a select: exact in every dtype


def test_mask_updates_auto_is_xla_on_cpu_and_kernel_where_measured(
    no_kernels, fake_gpu_table, request
):
    rng = kt.case_rng(request)
    params = _tree(rng, ELEMENTWISE, jnp.float32)
    grads = [_tree(rng, ELEMENTWISE, jnp.float32)]
    masks = {k: v for k, v in _masks(rng).items() if k in ELEMENTWISE}
    xla = _trajectory(cljax.mask_updates(optax.sgd(0.1), masks, impl="xla"), params, grads)
    auto = _trajectory(cljax.mask_updates(optax.sgd(0.1), masks), params, grads)
    _assert_identical(auto, xla)
    fake_gpu_table("apply_packed_mask")
    with pytest.raises(AssertionError, match="a Pallas kernel ran"):
        _trajectory(cljax.mask_updates(optax.sgd(0.1), masks), params, grads)


def test_mask_updates_unsupported_configurations_raise():
    masks = {"w": jnp.ones(3, bool)}
    with pytest.raises(ValueError, match=r"mask_updates\(impl='pallas'\).*prune=True"):
        cljax.mask_updates(optax.sgd(0.1), masks, prune=True, impl="pallas")
    with pytest.raises(ValueError, match=r"mask_updates\(impl=\.\.\.\) must be"):
        cljax.mask_updates(optax.sgd(0.1), masks, impl="gpu")


# ---------------------------------------------------------------------------------------------
# GaLore fused projection: scale_by_low_rank_projection, galore_adamw.


@pytest.mark.parametrize("dtype", kt.DTYPES, ids=DTYPE_IDS)
def test_galore_adamw_pallas_equals_xla(dtype, request):
    rng = kt.case_rng(request)
    params = _tree(rng, MATRICES, dtype)
    grads = [_tree(rng, MATRICES, dtype) for _ in range(3)]
    kwargs = dict(rank=3, refresh_every=2, weight_decay=0.1, b2=0.99)
    if dtype == jnp.float32:
        kwargs.update(scale=optax.linear_schedule(0.25, 0.5, 4), on_refresh="reproject")
    xla = _trajectory(cljax.galore_adamw(0.1, **kwargs, impl="xla"), params, grads)
    fused = _trajectory(cljax.galore_adamw(0.1, **kwargs, impl="pallas"), params, grads)
    _assert_paths_agree(fused, xla, dtype)


def test_low_rank_projection_pallas_equals_xla_and_auto_is_xla(no_kernels, request):
    rng = kt.case_rng(request)
    shapes = {"wide": (8, 20), "tall": (20, 6)}
    params = _tree(rng, shapes, jnp.float32)
    grads = [_tree(rng, shapes, jnp.float32) for _ in range(2)]
    make = lambda impl: cljax.scale_by_low_rank_projection(rank=2, side="left", impl=impl)  # noqa: E731
    xla = _trajectory(make("xla"), params, grads)
    auto = _trajectory(make("auto"), params, grads)
    _assert_identical(auto, xla)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_galore, "pallas", _galore_pallas)
        fused = _trajectory(make("pallas"), params, grads)
    _assert_paths_agree(fused, xla, jnp.float32)


_galore_pallas = _galore.pallas  # the real kernel, kept before `no_kernels` replaces it


def test_low_rank_projection_unsupported_configurations_raise():
    with pytest.raises(
        ValueError, match=r"scale_by_low_rank_projection\(impl='pallas'\).*Adam only"
    ):
        cljax.scale_by_low_rank_projection(optax.scale_by_lion(), rank=2, impl="pallas")
    with pytest.raises(ValueError, match=r"scale_by_low_rank_projection\(impl=\.\.\.\) must be"):
        cljax.scale_by_low_rank_projection(rank=2, impl="mosaic")
    # A user-built Adam is not recognised as the kernel's; `auto` runs it through XLA.
    tx = cljax.scale_by_low_rank_projection(optax.scale_by_adam(), rank=2)
    params = {"w": jnp.ones((4, 3))}
    tx.update(params, tx.init(params))


@pytest.mark.slow
@settings(max_examples=6)
@given(
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=20),
    dtype=st.sampled_from(kt.DTYPES),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e4]),
)
def test_cwd_and_mask_pallas_equal_xla_on_random_shapes(shape, dtype, scale):
    """Any leaf shape and dtype, zero and extreme gradients: the same finite step on both paths."""
    rng = np.random.default_rng(len(shape) + sum(shape))
    params = {"w": jnp.asarray(rng.standard_normal(shape), dtype)}
    grads = [{"w": jnp.asarray(scale * rng.standard_normal(shape), dtype)}]
    opts = {impl: cljax.cwd_adamw(0.05, weight_decay=0.1, impl=impl) for impl in ("xla", "pallas")}
    fused, xla = (_trajectory(opts[impl], params, grads) for impl in ("pallas", "xla"))
    _assert_paths_agree(fused, xla, dtype)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(fused))
    masks = {"w": jnp.asarray(rng.random(shape) < 0.5)}
    sgd = optax.sgd(0.1)
    fused, xla = (
        _trajectory(cljax.mask_updates(sgd, masks, impl=impl), params, grads)
        for impl in ("pallas", "xla")
    )
    _assert_identical(fused, xla)


@pytest.mark.parametrize("dtype", kt.DTYPES, ids=DTYPE_IDS)
def test_nm_mask_pallas_equals_xla(dtype, request):
    x = jnp.asarray(kt.case_rng(request).standard_normal((12, 20)), dtype).at[0, :4].set(1.0)
    for axis in (0, -1):  # groups across rows and along them; row 0 holds a four-way tie
        np.testing.assert_array_equal(
            cljax.nm_mask(x, 2, 4, axis, impl="pallas"), cljax.nm_mask(x, 2, 4, axis, impl="xla")
        )


def test_nm_mask_auto_is_xla_on_cpu(no_kernels):
    x = jnp.arange(16.0).reshape(2, 8)
    np.testing.assert_array_equal(cljax.nm_mask(x, 2, 4), cljax.nm_mask(x, 2, 4, impl="xla"))
    with pytest.raises(ValueError, match=r"nm_mask\(impl=\.\.\.\) must be"):
        cljax.nm_mask(x, 2, 4, impl="gpu")
