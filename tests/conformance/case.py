"""`Case`: what the conformance suite needs to build and drive one transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax


class Case(NamedTuple):
    """What the conformance suite needs to build and drive one transform."""

    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    static_args: tuple[str, ...] = ()  # structural args and callables: never injected
    extra_args: dict[str, Any] = {}  # required keyword-only extras for `update`
    needs_params: bool = False  # `update` raises without params
    leafwise: bool = True  # each leaf's update depends only on that leaf (no global reductions)
    strict_dtypes: bool = False  # no optax arithmetic inside: must run under strict promotion
    # Quantized state: unsigned-integer codes may round to a neighbouring code when a different
    # program (sharded, pmapped) computes the same floats in another order. This many code steps.
    code_atol: int = 0
