"""Periodic optimizer-state reset for low-rank pre-training (LR-07, momentum reset)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks

__all__ = ["WithPeriodicResetState", "with_periodic_reset"]


class WithPeriodicResetState(NamedTuple):
    """State of `with_periodic_reset`."""

    count: chex.Array  # int32 steps taken
    inner: optax.OptState


def _reset(state: Any, fields: frozenset[str], reset_count: bool) -> Any:
    """Zeroes the named fields (and counts) of every NamedTuple inside `state`."""

    def walk(node):
        names = getattr(node, "_fields", None)
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0] is node:  # a leaf
            return node
        if names is not None and isinstance(node, tuple):
            values = {}
            for name in names:
                value = getattr(node, name)
                if name in fields:
                    value = jax.tree.map(jnp.zeros_like, value)
                elif name == "count" and reset_count and any(f in names for f in fields):
                    value = jnp.zeros_like(value)
                else:
                    value = walk(value)
                values[name] = value
            return type(node)(**values)
        return treedef.unflatten([walk(c) for c in children])

    return walk(state)


def with_periodic_reset(
    inner: optax.GradientTransformation,
    *,
    every: int,
    fields: Sequence[str] = ("mu", "nu"),
    reset_count: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Zeroes `inner`'s moments every `every` steps (momentum reset), restarting bias correction.

    Before the update of every step ``t > 0`` with ``t ≡ 0 (mod every)``, each field named in
    `fields` of every state inside `inner` (``mu``, ``nu`` of `optax.ScaleByAdamState`, ``trace``
    of `optax.TraceState`, ...) becomes zeros, and with `reset_count` the ``count`` of those same
    states becomes 0, so the next update is the one of a freshly initialised optimizer. The reset
    is a `lax.cond` on the step count.

    Args:
        inner: The optimizer whose state is reset.
        every: Reset period in steps. Static.
        fields: Names of the state fields to zero. Static.
        reset_count: Also restart the ``count`` of the states holding those fields. Static.

    Returns:
        A transform whose state is `WithPeriodicResetState`.

    Example:
        >>> tx = cljax.with_periodic_reset(optax.adam(1e-3), every=100)
        >>> state = tx.init({"w": jnp.zeros(3)})

    References:
        "Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic Advances
        and Benchmarking", 2025.
    """
    fn = "with_periodic_reset"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "every", every, 1)
    if isinstance(fields, str) or not all(isinstance(f, str) for f in fields) or not fields:
        raise TypeError(
            f"{fn}(fields=...) must be a non-empty sequence of field names, got {fields!r}."
        )
    if not isinstance(reset_count, bool):
        raise TypeError(f"{fn}(reset_count=...) must be a bool, got {reset_count!r}.")
    names = frozenset(fields)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return WithPeriodicResetState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        due = jnp.logical_and(state.count > 0, state.count % every == 0)
        inner_state = jax.lax.cond(
            due, lambda: _reset(state.inner, names, reset_count), lambda: state.inner
        )
        out, inner_state = inner.update(updates, inner_state, params, **extra_args)
        return out, WithPeriodicResetState(
            count=optax.safe_increment(state.count), inner=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
