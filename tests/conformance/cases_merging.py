"""Conformance cases of the merging family: the stateful averagers written as transforms."""

from __future__ import annotations

import optax

from cljax.transforms import merging as _merging
from cljax.transforms.merging import averaging as _averaging
from tests.conformance.case import Case

CASES: dict[str, Case] = {
    # MG-07 / MG-12 / MG-13 parameter EMA (reads params; pass-through updates).
    "track_ema": Case(
        _averaging.track_ema, {"decay": 0.9}, static_args=("every",), needs_params=True, strict_dtypes=True
    ),
    "track_ema/every_debias": Case(
        _averaging.track_ema,
        {"decay": 0.8, "every": 2, "debias": True},
        static_args=("every",),
        needs_params=True,
        strict_dtypes=True,
    ),
    "track_ema/schedule_warmup": Case(
        _averaging.track_ema,
        {"decay": optax.linear_schedule(0.5, 0.9, 4), "warmup": True},
        static_args=("every",),
        needs_params=True,
        strict_dtypes=True,
    ),
    # MG-10 / MG-14 SWA and ZSCL's weight ensemble.
    "track_swa": Case(
        _averaging.track_swa,
        {"start_step": 2, "every": 2},
        static_args=("start_step", "every"),
        needs_params=True,
        strict_dtypes=True,
    ),
    "track_swa/zscl": Case(
        _averaging.track_swa,
        {"start_step": 1, "every": 2, "include_initial": True},
        static_args=("start_step", "every"),
        needs_params=True,
        strict_dtypes=True,
    ),
    # MG-11 LAWA (ring buffer of capacity snapshots).
    "track_lawa": Case(
        _averaging.track_lawa,
        {"capacity": 3, "every": 1},
        static_args=("capacity", "every"),
        needs_params=True,
        strict_dtypes=True,
    ),
    "track_lawa/every": Case(
        _averaging.track_lawa,
        {"capacity": 2, "every": 2},
        static_args=("capacity", "every"),
        needs_params=True,
        strict_dtypes=True,
    ),
    # MG-18 CoIN (wraps the optimizer; per-tensor balance weight).
    "track_coin_ema": Case(
        _averaging.track_coin_ema,
        {"inner": optax.sgd(1e-2), "fallback_decay": 0.99},
        needs_params=True,
    ),
}

# Every other public name of the family is a pure pytree function, a state or a storage format.
NOT_TRANSFORMS = frozenset(set(_merging.__all__) - {case.factory.__name__ for case in CASES.values()})
