"""Validation helpers shared by every cljax module (private)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax


def leaf_name(path) -> str:
    """Returns a readable name for a `jax.tree_util` key path, e.g. ``'enc/w'``."""
    name = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
    return name if name else "<root>"


def _as_float(value: Any) -> float | None:
    """Returns `value` as a Python float, or None for tracers, schedules and arrays."""
    if callable(value):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_in_range(
    fn: str,
    arg: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises a ValueError when a concrete number lies outside ``[low, high]``.

    Tracers (under `jit` or `inject_hyperparams`) and schedules are not checked.
    """
    number = _as_float(value)
    if number is None:
        return
    ok_low = number >= low if low_inclusive else number > low
    ok_high = number <= high if high_inclusive else number < high
    if not (ok_low and ok_high) or math.isnan(number):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ValueError(f"{fn}({arg}=...) must be in {left}{low}, {high}{right}, got {number}.")


def check_choice(fn: str, arg: str, value: Any, options: Iterable[Any]) -> None:
    """Raises a ValueError when `value` is not one of `options`."""
    options = tuple(options)
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{fn}({arg}=...) must be one of {listed}, got {value!r}.")


def check_int(fn: str, arg: str, value: Any, low: int = 1) -> None:
    """Raises unless `value` is a Python int (not bool) that is at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}({arg}=...) must be an int, got {type(value).__name__} {value!r}.")
    if value < low:
        raise ValueError(f"{fn}({arg}=...) must be >= {low}, got {value}.")


def check_transform(fn: str, arg: str, value: Any) -> None:
    """Raises a TypeError unless `value` looks like an optax GradientTransformation."""
    if not (hasattr(value, "init") and hasattr(value, "update")):
        raise TypeError(
            f"{fn}({arg}=...) must be an optax GradientTransformation, got {type(value).__name__}."
        )


def check_same_structure(fn: str, **trees: Any) -> None:
    """Raises a ValueError naming the first leaf whose shape differs between the given trees."""
    names = list(trees)
    if len(names) < 2:
        return
    first_name = names[0]
    first = trees[first_name]
    first_leaves = jax.tree_util.tree_flatten_with_path(first)[0]
    first_def = jax.tree.structure(first)
    for other_name in names[1:]:
        other = trees[other_name]
        if jax.tree.structure(other) != first_def:
            raise ValueError(
                f"{fn}: `{other_name}` has a different tree structure from `{first_name}`: "
                f"{jax.tree.structure(other)} vs {first_def}."
            )
        for (path, a), b in zip(first_leaves, jax.tree.leaves(other), strict=True):
            if getattr(a, "shape", ()) != getattr(b, "shape", ()):
                raise ValueError(
                    f"{fn}: leaf '{leaf_name(path)}' has shape {getattr(b, 'shape', ())} in "
                    f"`{other_name}` but {getattr(a, 'shape', ())} in `{first_name}`."
                )


def require_params(fn: str, params: Any) -> None:
    """Raises a ValueError when a transform that needs `params` did not get them."""
    if params is None:
        raise ValueError(f"{fn}: `update` needs `params`; pass the current parameters.")


def is_schedule(value: Any) -> bool:
    return callable(value)


ScalarOrSchedule = Any
Schedule = Callable[[Any], Any]
