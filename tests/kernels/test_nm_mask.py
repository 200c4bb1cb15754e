"""Tests of N:M mask selection (`cljax.kernels.nm_mask`).

The reference is checked against a NumPy stable sort per group and against the sparse family's
`nm_mask` (bitwise, ties included); the Pallas kernel (both target variants, groups along the
last axis and along another axis) against the reference in interpret mode. The kernel's raw int8
output must be exactly 0 or 1 everywhere, so a poisoned (unwritten) element fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cljax
from cljax.kernels import _dispatch, _nm_mask
from tests.kernels import kernel_testing as kt


def _np_nm(x, n, m, axis):
    """Keeps the first `n` of each group of `m` in a stable sort by decreasing ``|x|``."""
    moved = np.moveaxis(np.abs(np.asarray(x, np.float64)), axis, -1)
    groups = moved.reshape(-1, m)
    keep = np.zeros(groups.shape, bool)
    for row, g in enumerate(groups):
        keep[row, np.argsort(-g, kind="stable")[:n]] = True
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def _tied(rng, shape, dtype=jnp.float32):
    """Few distinct values, so ties are common."""
    return jnp.asarray(rng.integers(-3, 4, shape), dtype)


CASES = [
    ((4, 8), -1, 2, 4),
    pytest.param((8, 6), 0, 1, 2, marks=pytest.mark.slow),
    ((2, 12, 3), 1, 2, 3),
    ((3, 32), -1, 5, 32),  # m > 16: the sparse family's top-k path
    pytest.param((16,), 0, 4, 8, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape, axis, n, m", CASES)
def test_reference_matches_numpy_and_the_sparse_family(shape, axis, n, m):
    x = _tied(np.random.default_rng(0), shape)
    got = _nm_mask.reference(x, n, m, axis=axis)
    np.testing.assert_array_equal(got, _np_nm(x, n, m, axis))
    np.testing.assert_array_equal(got, cljax.nm_mask(x, n, m, axis=axis))


@settings(max_examples=20, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        (8, 8),
        elements=st.floats(width=32, allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0]),
    ),
    n=st.integers(1, 4),
    axis=st.sampled_from([0, 1]),
)
def test_exactly_n_per_group_and_kept_beat_dropped(x, n, axis):
    keep = np.asarray(_nm_mask.reference(jnp.asarray(x), n, 4, axis=axis))
    groups = np.moveaxis(keep, axis, -1).reshape(-1, 4)
    scores = np.moveaxis(np.abs(x), axis, -1).reshape(-1, 4)
    np.testing.assert_array_equal(groups.sum(-1), n)
    for k, s in zip(groups, scores, strict=True):
        if 0 < n < 4:
            assert s[k].min() >= s[~k].max()


# ---------------------------------------------------------------------------------------------
# The kernel against the reference.

# (shape, axis, n, m, GPU block, TPU block): groups along the last axis, then along another one.
LAYOUTS = {
    "last_axis": ((45, 200), -1, 2, 4, (8, 16), (32, 128)),
    "other_axis": ((2, 20, 150), 1, 1, 4, (8, 64), (20, 128)),
}


@functools.cache
def _jitted(target, interpret, n, m, axis, block):
    return jax.jit(
        lambda x: _nm_mask.pallas_raw(
            x,
            n,
            m,
            axis=axis,
            target=target,
            block=block,
            interpret=kt.interpret_arg(target, interpret),
        )
    )


class TestNmMask:
    interpret = False  # compiled: needs a GPU or TPU

    def check(self, request, target, dtype, shape, axis, n, m, block):
        kt.skip_unless_runnable(target, self.interpret)
        rng = kt.case_rng(request)
        x = (
            jnp.asarray(rng.standard_normal(shape), dtype)
            if dtype == jnp.float32
            else _tied(rng, shape, dtype)
        )
        raw = np.asarray(_jitted(target, self.interpret, n, m, axis, block)(x))
        assert np.isin(raw, [0, 1]).all(), f"{np.sum(~np.isin(raw, [0, 1]))} unwritten entries"
        np.testing.assert_array_equal(raw == 1, _nm_mask.reference(x, n, m, axis=axis))

    @pytest.mark.parametrize("layout", sorted(LAYOUTS))
    @pytest.mark.parametrize("target, dtype", kt.DEFAULT_TARGET_DTYPES, ids=kt.DEFAULT_IDS)
    def test_matches_reference(self, request, target, dtype, layout):
        shape, axis, n, m, gpu_block, tpu_block = LAYOUTS[layout]
        self.check(
            request, target, dtype, shape, axis, n, m, gpu_block if target == "gpu" else tpu_block
        )

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", kt.DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("target", kt.TARGETS)
    @pytest.mark.parametrize(
        "shape, axis, n, m",
        [
            ((8,), 0, 1, 2),
            ((3, 40), -1, 2, 8),
            ((64, 5), 0, 2, 4),
            ((300, 2100), 0, 2, 4),
            ((7, 2304), 1, 1, 16),
            ((2, 3, 16, 5), 2, 3, 16),
            ((9, 12), 1, 2, 3),
        ],
    )
    def test_matches_reference_many_shapes(self, request, target, dtype, shape, axis, n, m):
        if target == "gpu" and m == 3:
            pytest.skip("the GPU kernel needs a power-of-two m")
        self.check(request, target, dtype, shape, axis, n, m, None)


class TestNmMaskInterpret(TestNmMask):
    interpret = True  # the same tests, on the CPU, in interpret mode


@pytest.mark.slow
def test_tpu_variant_in_the_tpu_interpreter():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 256)), jnp.float32)
    for axis, block in ((-1, (32, 128)), (0, (32, 128))):
        raw = jax.jit(
            lambda x, axis=axis, block=block: _nm_mask.pallas_raw(
                x, 2, 4, axis=axis, target="tpu", block=block, interpret=kt.tpu_interpreter()
            )
        )(x)
        np.testing.assert_array_equal(
            raw, np.asarray(_nm_mask.reference(x, 2, 4, axis=axis), np.int8)
        )


# ---------------------------------------------------------------------------------------------
# The dispatcher and argument errors.


def test_dispatch(monkeypatch):
    x = _tied(np.random.default_rng(2), (6, 12))
    want = _nm_mask.reference(x, 1, 3)
    for impl in ("auto", "xla"):
        np.testing.assert_array_equal(cljax.kernels.nm_mask(x, 1, 3, impl=impl), want)
    x4 = _tied(np.random.default_rng(3), (6, 8))
    got = jax.jit(lambda x: cljax.kernels.nm_mask(x, 2, 4, impl="pallas"))(x4)
    np.testing.assert_array_equal(got, _nm_mask.reference(x4, 2, 4))
    # A measured entry whose kernel cannot take this call falls back to XLA under 'auto' only.
    with pytest.raises(NotImplementedError, match="power-of-two group length"):
        cljax.kernels.nm_mask(x, 1, 3, impl="pallas")
    monkeypatch.setattr(_dispatch, "choose", lambda *a, **k: "pallas")
    np.testing.assert_array_equal(cljax.kernels.nm_mask(x, 1, 3, impl="auto"), want)


def test_errors():
    x = jnp.zeros((4, 6))
    with pytest.raises(ValueError, match=r"nm_mask\(n=..., m=...\) needs n <= m, got n=5 > m=4"):
        cljax.kernels.nm_mask(x, 5, 4)
    with pytest.raises(ValueError, match=r"nm_mask\(n=...\) must be >= 1"):
        cljax.kernels.nm_mask(x, 0, 4)
    with pytest.raises(TypeError, match=r"nm_mask\(m=...\) must be an int"):
        cljax.kernels.nm_mask(x, 1, 4.0)
    with pytest.raises(ValueError, match="nm_mask: `x` is a scalar"):
        cljax.kernels.nm_mask(jnp.zeros(()), 1, 2)
    with pytest.raises(ValueError, match=r"nm_mask\(axis=2\) is out of range for shape \(4, 6\)"):
        cljax.kernels.nm_mask(x, 1, 2, axis=2)
    with pytest.raises(TypeError, match=r"nm_mask\(axis=...\) must be an int"):
        cljax.kernels.nm_mask(x, 1, 2, axis=None)
    with pytest.raises(
        ValueError, match="axis -1 of shape \\(4, 6\\) has length 6, not divisible by m=4"
    ):
        cljax.kernels.nm_mask(x, 1, 4)
    with pytest.raises(ValueError, match=r"nm_mask\(impl=...\) must be"):
        cljax.kernels.nm_mask(x, 1, 2, impl="gpu")
    with pytest.raises(
        ValueError, match=r"must hold whole groups: block dim 1 = 2 is not a multiple of m=4"
    ):
        _nm_mask.pallas(jnp.zeros((4, 8)), 1, 4, target="gpu", block=(4, 2))
