"""Tests of applying a row-wise bit-packed mask (`cljax.kernels.apply_packed_mask`).

The reference is checked against NumPy (`np.packbits` / `np.where`) and against the sparse
family's packed format; the Pallas kernel (both target variants) against the reference in
interpret mode, exactly (a select changes no bits).
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
from cljax.kernels import _packed_mask
from cljax.transforms.sparse import _common as sparse_common
from tests.kernels import kernel_testing as kt


def _packed(mask: np.ndarray) -> jax.Array:
    """NumPy's packing along the last axis (a scalar's mask as one entry)."""
    return jnp.asarray(np.packbits(np.asarray(mask).reshape(np.shape(mask) or (1,)), axis=-1))


def _operands(rng, shape, dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    mask = rng.random(shape) < 0.5
    return x, mask, _packed(mask)


@pytest.mark.parametrize("shape", [(), (5,), (3, 8), (2, 3, 17)])
def test_reference_is_numpy_where(shape):
    x, mask, packed = _operands(np.random.default_rng(0), shape)
    got = _packed_mask.reference(x, packed)
    np.testing.assert_array_equal(got, np.where(mask, np.asarray(x), 0.0))
    assert got.dtype == x.dtype


def test_format_is_the_sparse_familys():
    x, mask, _ = _operands(np.random.default_rng(1), (4, 13))
    packed = sparse_common.pack(jnp.asarray(mask))
    np.testing.assert_array_equal(
        _packed_mask.reference(x, packed), np.where(mask, np.asarray(x), 0.0)
    )


@settings(max_examples=20, deadline=None)
@given(
    x=hnp.arrays(np.float32, (3, 11), elements=st.floats(width=32, allow_nan=False)),
    mask=hnp.arrays(np.bool_, (3, 11)),
)
def test_properties(x, mask):
    packed = _packed(mask)
    once = _packed_mask.reference(jnp.asarray(x), packed)
    np.testing.assert_array_equal(_packed_mask.reference(once, packed), once)  # idempotent
    ones = _packed(np.ones_like(mask))
    np.testing.assert_array_equal(_packed_mask.reference(jnp.asarray(x), ones), x)
    zeros = _packed(np.zeros_like(mask))
    np.testing.assert_array_equal(_packed_mask.reference(jnp.asarray(x), zeros), 0.0)


# ---------------------------------------------------------------------------------------------
# The kernel against the reference.

BLOCKS = {"gpu": (8, 64), "tpu": (32, 1024)}


@functools.cache
def _jitted(target, interpret, block):
    return jax.jit(
        lambda x, p: _packed_mask.pallas(
            x, p, target=target, block=block, interpret=kt.interpret_arg(target, interpret)
        )
    )


class TestApplyPackedMask:
    interpret = False  # compiled: needs a GPU or TPU

    def check(self, request, target, dtype, shape, block="small"):
        kt.skip_unless_runnable(target, self.interpret)
        x, _, packed = _operands(kt.case_rng(request), shape, dtype)
        block = BLOCKS[target] if block == "small" else block
        got = _jitted(target, self.interpret, block)(x, packed)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(
            np.asarray(got, np.float32), np.asarray(_packed_mask.reference(x, packed), np.float32)
        )

    @pytest.mark.parametrize("target, dtype", kt.DEFAULT_TARGET_DTYPES, ids=kt.DEFAULT_IDS)
    def test_matches_reference(self, request, target, dtype):
        cols = int(kt.case_rng(request).integers(1030, 1300))  # two column blocks, partial bytes
        self.check(request, target, dtype, (3, 13, cols))

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", kt.DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("target", kt.TARGETS)
    @pytest.mark.parametrize("shape", [(), (1,), (7,), (33, 8), (40, 2049), (2, 3, 4, 5)])
    def test_matches_reference_many_shapes(self, request, target, dtype, shape):
        self.check(request, target, dtype, shape, block=None)

    @pytest.mark.parametrize("target", kt.TARGETS)
    def test_matches_reference_on_random_masks(self, request, target):
        kt.skip_unless_runnable(target, self.interpret)
        fn = _jitted(target, self.interpret, BLOCKS[target])

        @settings(max_examples=10, deadline=None)
        @given(mask=hnp.arrays(np.bool_, (40, 70)), seed=st.integers(0, 2**32 - 1))
        def run(mask, seed):
            x = jnp.asarray(np.random.default_rng(seed).standard_normal(mask.shape), jnp.float32)
            packed = _packed(mask)
            np.testing.assert_array_equal(fn(x, packed), _packed_mask.reference(x, packed))

        run()


class TestApplyPackedMaskInterpret(TestApplyPackedMask):
    interpret = True  # the same tests, on the CPU, in interpret mode


def test_tpu_variant_in_the_tpu_interpreter():
    x, _, packed = _operands(np.random.default_rng(2), (64, 2048))
    got = jax.jit(
        lambda x, p: _packed_mask.pallas(
            x, p, target="tpu", block=(32, 1024), interpret=kt.tpu_interpreter()
        )
    )(x, packed)
    np.testing.assert_array_equal(got, _packed_mask.reference(x, packed))


# ---------------------------------------------------------------------------------------------
# The dispatcher and argument errors.


def test_dispatch():
    x, _, packed = _operands(np.random.default_rng(3), (4, 9))
    want = _packed_mask.reference(x, packed)
    for impl in ("auto", "xla"):
        np.testing.assert_array_equal(cljax.kernels.apply_packed_mask(x, packed, impl=impl), want)
    got = jax.jit(lambda x, p: cljax.kernels.apply_packed_mask(x, p, impl="pallas"))(x, packed)
    np.testing.assert_array_equal(got, want)


def test_errors():
    x = jnp.zeros((4, 9))
    good = jnp.zeros((4, 2), jnp.uint8)
    with pytest.raises(
        ValueError,
        match=r"apply_packed_mask: `packed` has shape \(4, 1\) .* needs uint8 of shape \(4, 2\)",
    ):
        cljax.kernels.apply_packed_mask(x, jnp.zeros((4, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"`packed` has shape \(4, 2\) and dtype int32"):
        cljax.kernels.apply_packed_mask(x, jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"apply_packed_mask\(impl=...\) must be"):
        cljax.kernels.apply_packed_mask(x, good, impl="fast")
    with pytest.raises(ValueError, match=r"at least 8 columns for target='gpu'"):
        _packed_mask.pallas(x, good, target="gpu", block=(4, 4))
    with pytest.raises(ValueError, match=r"multiple of 1024 columns .* for target='tpu'"):
        _packed_mask.pallas(
            jnp.zeros((4, 2000)), jnp.zeros((4, 250), jnp.uint8), target="tpu", block=(4, 512)
        )
