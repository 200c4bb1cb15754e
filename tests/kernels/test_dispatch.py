"""Tests of the dispatch table: ``auto`` is XLA wherever nothing was measured, and a (fake)
measurement switches exactly its back end, device, dtype and shape range to Pallas."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import cljax
from cljax.kernels import _adam_step, _dispatch, _packed_mask
from cljax.kernels._dispatch import Measurement

H100 = "NVIDIA H100 80GB HBM3"
FAKE = (
    Measurement("gpu", H100, "adam_step", "float32", (1024,), (2**20,), 1.4, "fake"),
    Measurement(
        "gpu",
        H100,
        "galore_adam_step",
        "bfloat16",
        (1024, 1024, 64),
        (8192, 16384, 512),
        1.3,
        "fake",
    ),
    Measurement(
        "tpu", "TPU v5 lite", "nm_mask", "float32", (1, 2), (2**24, 16), 0.9, "fake: slower"
    ),
)
KEYS = {
    "adam_step": (4096,),
    "nm_mask": (4096, 4),
    "apply_packed_mask": (4096,),
    "galore_adam_step": (4096, 4096, 128),
    "sltrain_matmul": (512, 1024, 1024, 64),
}


def test_nothing_is_measured_so_auto_is_xla_everywhere():
    assert _dispatch.MEASURED == ()
    assert set(KEYS) == set(_dispatch.OPS)
    for backend in ("cpu", "gpu", "tpu"):
        for op, key in KEYS.items():
            for dtype in ("float32", "bfloat16"):
                assert _dispatch.choose(op, key, dtype, backend=backend, device_kind=H100) == "xla"


def test_a_measurement_switches_only_its_range():
    choose = lambda op, key, dtype="float32", backend="gpu", kind=H100: _dispatch.choose(
        op, key, dtype, table=FAKE, backend=backend, device_kind=kind
    )
    assert choose("adam_step", (4096,)) == "pallas"
    assert choose("adam_step", (1024,)) == "pallas"  # bounds are inclusive
    assert choose("adam_step", (2**20,)) == "pallas"
    assert choose("adam_step", (1023,)) == "xla"  # below the measured range
    assert choose("adam_step", (2**20 + 1,)) == "xla"  # above it
    assert choose("adam_step", (4096,), dtype="bfloat16") == "xla"  # another dtype
    assert choose("adam_step", (4096,), kind="NVIDIA A100-SXM4-40GB") == "xla"  # another device
    assert choose("adam_step", (4096,), backend="tpu") == "xla"  # another back end
    assert choose("adam_step", (4096,), backend="cpu") == "xla"  # never on the CPU
    assert choose("apply_packed_mask", (4096,)) == "xla"  # another op
    assert choose("galore_adam_step", (4096, 11008, 128), dtype="bfloat16") == "pallas"
    assert choose("galore_adam_step", (4096, 11008, 1024), dtype="bfloat16") == "xla"  # rank above
    # A measured loss (speedup below 1) never selects Pallas.
    assert choose("nm_mask", (4096, 4), backend="tpu", kind="TPU v5 lite") == "xla"


def test_dispatchers_consult_the_table(monkeypatch):
    calls = []
    real = _adam_step.pallas
    monkeypatch.setattr(_adam_step, "pallas", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(_dispatch, "MEASURED", FAKE)
    monkeypatch.setattr(_dispatch, "_backend", lambda: "gpu")
    monkeypatch.setattr(_dispatch, "_device_kind", lambda: H100)
    x = jnp.ones((32, 64), jnp.float32)
    got = cljax.kernels.adam_step(x, x, x, x, 0, learning_rate=0.1)
    assert calls == [1]  # 2048 elements: inside the fake range, the kernel ran (interpreted)
    want = _adam_step.reference(x, x, x, x, 0, learning_rate=0.1)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    small = jnp.ones((4, 4), jnp.float32)
    cljax.kernels.adam_step(small, small, small, small, 0, learning_rate=0.1)
    assert calls == [1]  # 16 elements: outside it, XLA
    packed = jnp.zeros((32, 8), jnp.uint8)
    spy = []
    monkeypatch.setattr(_packed_mask, "pallas", lambda *a, **k: spy.append(1))
    cljax.kernels.apply_packed_mask(x, packed)
    assert spy == []  # no measurement for this op


def test_errors():
    with pytest.raises(ValueError, match="choose: op 'adam' is not one of"):
        _dispatch.choose("adam", (1,), "float32")
    with pytest.raises(
        ValueError, match=r"choose: op 'nm_mask' has a size key \('size', 'm'\); got \(1,\)"
    ):
        _dispatch.choose("nm_mask", (1,), "float32")
    bad = [
        ("entry", "must be a Measurement"),
        (
            Measurement("gpu", H100, "adam", "float32", (1,), (2,), 2.0, ""),
            "op 'adam' is not one of",
        ),
        (
            Measurement("gpu", H100, "adam_step", "float32", (1, 1), (2, 2), 2.0, ""),
            "must have 1 entries each",
        ),
        (
            Measurement("gpu", H100, "adam_step", "float32", (3,), (2,), 2.0, ""),
            r"low \(3,\) exceeds high \(2,\)",
        ),
        (
            Measurement("cuda", H100, "adam_step", "float32", (1,), (2,), 2.0, ""),
            "backend must be 'gpu' or 'tpu'",
        ),
    ]
    for entry, message in bad:
        with pytest.raises(ValueError, match=message):
            _dispatch.choose("adam_step", (1,), "float32", table=(entry,), backend="gpu")
