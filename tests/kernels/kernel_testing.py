"""Shared pieces of the kernel tests: tolerances, per-case keys, targets and interpret modes.

Every kernel test class runs compiled (``interpret = False``: needs a GPU for ``target='gpu'`` or
a TPU for ``target='tpu'``, skipped elsewhere) and has an interpret-mode subclass that runs on the
CPU. In interpret mode both variants run in the HLO interpreter (and once each in the TPU
interpreter for the TPU variant); the interpreters fill kernel outputs with NaN (floats) or the
type's minimum or maximum (ints) before the kernel runs, and pad edge blocks of inputs with the same values,
so an element a kernel forgets to write, or a padded value that reaches a result, shows up in the
comparison (`test_harness.py` checks that they do).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TARGETS = ("gpu", "tpu")
DTYPES = (jnp.float32, jnp.bfloat16)
# The default (not slow) runs: both dtypes on the GPU variant, float32 on the TPU variant; the
# slow runs add the rest.
DEFAULT_TARGET_DTYPES = [("gpu", jnp.float32), ("gpu", jnp.bfloat16), ("tpu", jnp.float32)]
DEFAULT_IDS = ["gpu-f32", "gpu-bf16", "tpu-f32"]
# Relative / absolute tolerances of kernel-vs-reference comparisons, by operand dtype.
TOL = {jnp.float32: (1e-5, 1e-6), jnp.bfloat16: (2e-2, 2e-2)}


def interpret_arg(target: str, interpret: bool):
    """The `interpret` argument of a kernel call: the HLO interpreter for both targets.

    (The TPU interpreter, `tpu_interpreter`, mishandles aliased outputs whose shape the block does
    not divide in this JAX version; each kernel runs it once on a divisible shape.)
    """
    del target
    return bool(interpret)


def tpu_interpreter():
    """The TPU interpreter (memory spaces, DMA semantics), poisoning memory with NaN."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(uninitialized_memory="nan")


def skip_unless_runnable(target: str, interpret: bool) -> None:
    """Skips a compiled-mode test unless the back end runs this target's kernels."""
    if interpret:
        return
    backend = jax.default_backend()
    if backend == "cpu":
        pytest.skip("compiled Pallas needs a GPU or TPU")
    if backend != target:
        pytest.skip(f"the {target} variant compiles only on a {target}")


def case_rng(request) -> np.random.Generator:
    """A NumPy generator seeded from the test's id: fresh inputs per case, stable across runs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def case_key(request) -> jax.Array:
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def assert_close(actual, expected, dtype, err: str = "", scale: float = 1.0) -> None:
    """Float comparison at the dtype's tolerance; NaN anywhere fails (an unwritten element)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert actual.shape == expected.shape, f"{err}: shape {actual.shape} != {expected.shape}"
    assert not np.isnan(actual).any(), f"{err}: {np.isnan(actual).sum()} NaN (unwritten?) elements"
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err)
