"""Checks that the interpret-mode harness catches what it must: unwritten outputs and padded
reads show up as NaN (floats) or the type's minimum or maximum (ints), in both interpreters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from tests.kernels import kernel_testing as kt

INTERPRETERS = {"hlo": lambda: True, "tpu": kt.tpu_interpreter}


def _half_writer(x_ref, o_ref):
    o_ref[:4, :] = x_ref[:4, :]  # rows 4..7 of each block are never written


@pytest.mark.parametrize("interpreter", sorted(INTERPRETERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
def test_unwritten_outputs_are_poisoned(interpreter, dtype):
    x = jnp.ones((16, 128), dtype)
    out = pl.pallas_call(
        _half_writer,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, dtype),
        interpret=INTERPRETERS[interpreter](),
    )(x)
    out = np.asarray(out).reshape(2, 8, 128)
    np.testing.assert_array_equal(out[:, :4], 1)
    if dtype == jnp.float32:
        assert np.isnan(out[:, 4:]).all()
    else:
        info = np.iinfo(np.int8)  # the HLO interpreter writes the minimum, the TPU one the maximum
        assert np.isin(out[:, 4:], [info.min, info.max]).all()


def _block_sum(x_ref, o_ref):
    o_ref[...] = jnp.broadcast_to(jnp.sum(x_ref[...]), o_ref.shape)


def test_padded_reads_are_poisoned():
    x = jnp.ones((12, 128), jnp.float32)  # the second (8, 128) block is half padding
    out = pl.pallas_call(
        _block_sum,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
        interpret=True,
    )(x)
    np.testing.assert_array_equal(np.asarray(out)[:8], 8 * 128)
    assert np.isnan(np.asarray(out)[8:]).all()
