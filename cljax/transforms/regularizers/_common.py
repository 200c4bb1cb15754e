"""Private tools of the regularizers family: state lookup, tree checks, dtype handling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax import tree as _tree


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def is_none(x: Any) -> bool:
    return x is None


def copy_tree(params: Any) -> Any:
    """A fresh copy of every array leaf: a state leaf never aliases a (donated) parameter buffer."""
    return jax.tree.map(lambda p: jnp.array(p, copy=True), params)


def stacked_zeros(params: Any, capacity: int, dtype: Any = None) -> Any:
    """``(capacity, *shape)`` zeros per leaf, in `dtype` (default: the leaf's dtype)."""
    return jax.tree.map(
        lambda p: jnp.zeros((capacity,) + tuple(p.shape), p.dtype if dtype is None else dtype),
        params,
    )


def canonical_dtype(fn: str, arg: str, dtype: Any) -> Any:
    """Returns a numpy dtype, or raises naming `fn` and `arg`; None stays None."""
    if dtype is None:
        return None
    try:
        out = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{fn}({arg}=...) must be a dtype or a dtype name, got {dtype!r}.") from err
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"{fn}({arg}=...) must be a floating dtype, got {out}.")
    return out


def find_one(fn: str, opt_state: Any, state_type: type, index: int | None = None) -> Any:
    """Returns the one sub-state of `state_type` in `opt_state` (the `index`-th with several)."""
    found = _tree.find_states(opt_state, state_type)
    name = state_type.__name__
    if not found:
        raise ValueError(
            f"{fn}: no {name} in `opt_state`; build the optimizer with the transform that owns it "
            "and pass the whole optimizer state."
        )
    if index is None:
        if len(found) > 1:
            raise ValueError(
                f"{fn}: `opt_state` holds {len(found)} states of type {name}; pass `index=` "
                f"(0 to {len(found) - 1}, in tree order) to choose one."
            )
        return found[0]
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{fn}(index=...) must be an int or None, got {index!r}.")
    if not -len(found) <= index < len(found):
        raise ValueError(f"{fn}(index=...) must be in [0, {len(found)}), got {index}.")
    return found[index]


def replace_one(opt_state: Any, new_state: Any, index: int | None = None) -> Any:
    return _tree.replace_state(opt_state, new_state, index=index)


def map_like_state(
    fn: str, f: Callable[..., Any], state_tree: Any, named: dict[str, Any], *, lead: int = 0
) -> Any:
    """Maps `f(state_leaf, *named_leaves)` over `state_tree`, keeping masked leaves as they are.

    `state_tree` mirrors the parameters the transform was initialised with (with
    `optax.MaskedNode` where `optax.masked` / `optax.partition` gave it nothing); each tree in
    `named` (argument name -> tree) must have the parameters' structure, and each of its leaves
    the shape of the state leaf without its `lead` leading axes.
    """
    state_def = jax.tree.structure(state_tree, is_leaf=is_masked)
    for arg, tree in named.items():
        if jax.tree.structure(tree) != state_def:
            raise ValueError(
                f"{fn}: `{arg}` does not have the structure of the parameters the transform was "
                f"initialised with: {jax.tree.structure(tree)} vs {state_def}."
            )
    trees = list(named.values())
    names = list(named)

    def leaf(path, s, *xs):
        if is_masked(s):
            return s
        for arg, x in zip(names, xs, strict=True):
            want = tuple(s.shape[lead:])
            if tuple(jnp.shape(x)) != want:
                raise ValueError(
                    f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {tuple(jnp.shape(x))} in "
                    f"`{arg}` but the state holds {want}; pass a tree shaped like the parameters."
                )
        return f(s, *xs)

    return jax.tree_util.tree_map_with_path(leaf, state_tree, *trees, is_leaf=is_masked)


def concrete_int(x: Any) -> int | None:
    """Returns `x` as a Python int when it is concrete, None under a trace."""
    try:
        return int(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def check_nonnegative(fn: str, arg: str, tree: Any) -> None:
    """Raises when a concrete importance tree has a negative (or NaN) entry."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.core.Tracer) or jnp.size(x) == 0:
            continue
        low = float(jnp.min(jnp.asarray(x).astype(jnp.float32)))
        if not low >= 0.0:
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' of `{arg}` has minimum {low}; "
                "importances must be finite and non-negative."
            )


def quadratic_leaf(g, p, anchor, importance, scale):
    """``g + scale * importance * (p - anchor)`` in float32, returned in ``g``'s dtype."""
    if g is None:
        return None
    diff = p.astype(jnp.float32) - anchor.astype(jnp.float32)
    return (g.astype(jnp.float32) + scale * importance.astype(jnp.float32) * diff).astype(g.dtype)


def record_path_integral(fn: str, state: Any, params: Any) -> dict[str, Any]:
    """SI's importance step on a state with ``importance``, ``path_integral``, ``start`` and
    ``damping``: returns those fields with ``Ω += w / ((θ − θ_start)² + ξ)``, ``w ← 0`` and
    ``θ_start ← θ`` (masked leaves untouched), for ``state._replace(**...)``."""
    named = {"params": params}
    map_like_state(fn, lambda s, _: s, state.start, named)  # checks params against the state
    xi = state.damping

    def omega_leaf(omega, w, start, p):
        moved = f32(p) - start.astype(jnp.float32)
        return omega + w / (moved * moved + xi)

    importance = jax.tree.map(
        lambda o, w, s, p: o if is_masked(o) else omega_leaf(o, w, s, p),
        state.importance,
        state.path_integral,
        state.start,
        params,
        is_leaf=is_masked,
    )
    path_integral = jax.tree.map(
        lambda w: w if is_masked(w) else jnp.zeros_like(w), state.path_integral, is_leaf=is_masked
    )
    start = map_like_state(fn, copy_like, state.start, named)
    return {"importance": importance, "path_integral": path_integral, "start": start}


def copy_like(a: Any, p: Any) -> jax.Array:
    """A fresh copy of `p` in `a`'s dtype (for `map_like_state`)."""
    return jnp.array(p, dtype=a.dtype, copy=True)
