"""Which implementation ``impl='auto'`` runs: the table of measured Pallas wins, in one place.

A `Measurement` records that on one back end and device kind, for one op, dtype and range of the
op's size key, the Pallas kernel was measured faster than the XLA reference
(``benchmarks/kernels.py``, numbers in ``docs/benchmarks.md``). ``auto`` runs Pallas only where an
entry matches; without one, for any back end or shape, it runs XLA. On the CPU it always runs XLA
(compiled Pallas does not run there; interpret mode is a test tool, not a fast path).

`MEASURED` is empty: no kernel has been timed on a GPU or a TPU yet, so ``auto`` is XLA
everywhere. To add a measurement, append an entry to `MEASURED` with the device kind string
``jax.devices()[0].device_kind`` gives, the dtype, and the size-key bounds of the shapes that were
measured (never wider), and cite the benchmark row in ``source``.

Size keys (static, from the operand shapes), per op:

* ``'adam_step'``: ``(size,)``, elements of the leaf.
* ``'nm_mask'``: ``(size, m)``, elements and the group length.
* ``'apply_packed_mask'``: ``(size,)``.
* ``'galore_adam_step'``: ``(m, n, rank)`` of one matrix (the batch of stacked matrices excluded).
* ``'sltrain_matmul'``: ``(tokens, m, n, rank)``, tokens being the product of `x`'s leading dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax

from cljax.kernels import _common

OPS = {
    "adam_step": ("size",),
    "nm_mask": ("size", "m"),
    "apply_packed_mask": ("size",),
    "galore_adam_step": ("m", "n", "rank"),
    "sltrain_matmul": ("tokens", "m", "n", "rank"),
}


class Measurement(NamedTuple):
    """One measured range where the Pallas kernel of `op` beat the XLA reference.

    Attributes:
        backend: ``jax.default_backend()`` of the run, ``'gpu'`` or ``'tpu'``.
        device_kind: ``jax.devices()[0].device_kind``, e.g. ``'NVIDIA H100 80GB HBM3'``.
        op: One of the ops listed in this module's docstring.
        dtype: Operand dtype name, e.g. ``'float32'``.
        low: Inclusive lower bounds of the op's size key.
        high: Inclusive upper bounds of the op's size key.
        speedup: Measured XLA time / Pallas time over the range (the smallest ratio seen).
        source: Where the measurement is recorded (a ``docs/benchmarks.md`` section and date).

    Example:
        >>> entry = cljax.kernels.Measurement("gpu", "NVIDIA H100 80GB HBM3", "adam_step",
        ...                                   "float32", (2**20,), (2**26,), 1.2, "example")
        >>> cljax.kernels.choose("adam_step", (2**24,), "float32", table=(entry,), backend="gpu",
        ...                      device_kind="NVIDIA H100 80GB HBM3")
        'pallas'
    """

    backend: str
    device_kind: str
    op: str
    dtype: str
    low: tuple[int, ...]
    high: tuple[int, ...]
    speedup: float
    source: str


# Measured entries. Empty: nothing has been timed on a GPU or TPU, so `auto` is XLA everywhere.
MEASURED: tuple[Measurement, ...] = ()


def _backend() -> str:
    return jax.default_backend()


def _device_kind() -> str:
    devices = jax.devices()
    return devices[0].device_kind if devices else ""


def check_table(table: Sequence[Measurement]) -> None:
    """Raises a ValueError for a malformed entry (unknown op, key length, bounds, speedup)."""
    for i, entry in enumerate(table):
        if not isinstance(entry, Measurement):
            raise ValueError(f"dispatch table entry {i} must be a Measurement, got {entry!r}.")
        if entry.op not in OPS:
            raise ValueError(
                f"dispatch table entry {i}: op {entry.op!r} is not one of {sorted(OPS)}."
            )
        width = len(OPS[entry.op])
        if len(entry.low) != width or len(entry.high) != width:
            raise ValueError(
                f"dispatch table entry {i}: op {entry.op!r} has a size key {OPS[entry.op]}; "
                f"bounds {entry.low} .. {entry.high} must have {width} entries each."
            )
        if any(lo > hi for lo, hi in zip(entry.low, entry.high, strict=True)):
            raise ValueError(
                f"dispatch table entry {i}: low {entry.low} exceeds high {entry.high}."
            )
        if entry.backend not in ("gpu", "tpu"):
            raise ValueError(
                f"dispatch table entry {i}: backend must be 'gpu' or 'tpu', got {entry.backend!r}."
            )


def choose(
    op: str,
    key: Sequence[int],
    dtype: str,
    *,
    table: Sequence[Measurement] | None = None,
    backend: str | None = None,
    device_kind: str | None = None,
) -> str:
    """Returns ``'pallas'`` where `table` holds a measured win for this call, else ``'xla'``.

    Args:
        op: The op name (a key of `OPS`).
        key: The call's size key (see the module docstring).
        dtype: The operand dtype name.
        table: Measurements to consult (default `MEASURED`).
        backend: Back end (default ``jax.default_backend()``).
        device_kind: Device kind (default that of ``jax.devices()[0]``).

    Returns:
        ``'pallas'`` or ``'xla'``.

    Example:
        >>> cljax.kernels.choose("galore_adam_step", (4096, 11008, 1024), "bfloat16", backend="gpu")
        'xla'
    """
    if op not in OPS:
        raise ValueError(f"choose: op {op!r} is not one of {sorted(OPS)}.")
    key = tuple(int(k) for k in key)
    if len(key) != len(OPS[op]):
        raise ValueError(f"choose: op {op!r} has a size key {OPS[op]}; got {key}.")
    backend = _backend() if backend is None else backend
    if backend not in ("gpu", "tpu"):
        return "xla"
    table = MEASURED if table is None else table
    check_table(table)
    kind = _device_kind() if device_kind is None else device_kind
    for entry in table:
        if (
            entry.op == op
            and entry.backend == backend
            and entry.device_kind == kind
            and entry.dtype == str(dtype)
            and entry.speedup > 1.0
            and all(lo <= k <= hi for lo, k, hi in zip(entry.low, key, entry.high, strict=True))
        ):
            return "pallas"
    return "xla"


def resolve(fn: str, impl: str, op: str, key: Sequence[int], dtype: str) -> str:
    """The implementation a dispatcher runs: `impl` itself, or `choose`'s answer for ``'auto'``."""
    _common.check_impl(fn, impl)
    if impl == "auto":
        return choose(op, key, dtype)
    return impl
