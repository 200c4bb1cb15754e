"""Synaptic Intelligence (RG-03): path-integral importance accumulated in the optimizer state."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = ["SiState", "si", "si_consolidate"]

_f32 = jnp.float32


class SiState(NamedTuple):
    """State of `si`."""

    path_integral: optax.Params  # w: −Σ g_task ⊙ Δθ over the current task, float32
    importance: optax.Params  # Ω accumulated over past tasks, float32
    anchor: optax.Params  # θ* of the last boundary
    start: optax.Params  # θ at the start of the current task
    damping: chex.Array  # float32 ξ, read by `si_consolidate`
    inner: optax.OptState  # the wrapped optimizer's state


def si(
    inner: optax.GradientTransformation, strength: chex.Numeric, damping: chex.Numeric = 0.1
) -> optax.GradientTransformationExtraArgs:
    """Synaptic Intelligence around a whole optimizer: penalty in, path integral out.

    Each step, with the raw task gradient ``g``:

    1. adds the penalty gradient ``2 c Ω ⊙ (θ − θ*)`` (of ``c Σ Ω (θ − θ*)²``) to ``g``;
    2. runs `inner` on the penalised gradient, giving the final update ``u`` (the real
       parameter change ``Δθ``, whatever `inner` is: Adam, momentum, ...);
    3. accumulates ``w ← w − g ⊙ u`` with the **unpenalised** gradient.

    `si_consolidate` turns ``w`` into importance at a task boundary. `inner` must be the whole
    optimizer (learning rate included): `si`'s output is added to the parameters as is, so
    nothing may follow it in the chain.

    Args:
        inner: The optimizer whose final update is the parameter change, e.g. ``optax.adam(1e-3)``.
        strength: ``c``, the penalty strength.
        damping: ``ξ`` in ``Ω += w / ((Δθ_task)² + ξ)``; stored in the state at `init`.

    Returns:
        A transform whose state is an `SiState` wrapping `inner`'s state; `update` needs
        `params` and passes extra arguments on to `inner`.

    Raises:
        ValueError: for a negative `strength` or a non-positive `damping`.
        TypeError: when `inner` is not a gradient transformation.

    Notes:
        With momentum, ``w`` can turn negative; it is not clipped (as in the reference). The
        decoupled form of RG-F is not offered: the penalty always enters before `inner`.

    Example:
        >>> tx = cljax.si(optax.sgd(0.1), strength=1.0)
        >>> params = {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
        >>> state.path_integral["w"]  # η g² = 0.1
        Array([0.1, 0.1], dtype=float32)

    References:
        Zenke, Poole and Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
        https://arxiv.org/abs/1703.04200
    """
    fn = "si"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)
    _checks.check_in_range(fn, "damping", damping, 0.0, math.inf, low_inclusive=False)
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SiState(
            path_integral=optax.tree.zeros_like(params, dtype=_f32),
            importance=optax.tree.zeros_like(params, dtype=_f32),
            anchor=_common.copy_tree(params),
            start=_common.copy_tree(params),
            damping=jnp.asarray(damping, _f32),
            inner=inner_tx.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params(fn, params)
        penalised = jax.tree.map(
            lambda g, p, a, w: _common.quadratic_leaf(g, p, a, w, 2.0 * strength),
            updates,
            params,
            state.anchor,
            state.importance,
            is_leaf=_common.is_none,
        )
        out, inner_state = inner_tx.update(penalised, state.inner, params, **extra_args)
        path = jax.tree.map(
            lambda w, g, u: None if g is None else w - g.astype(_f32) * u.astype(_f32),
            state.path_integral,
            updates,
            out,
            is_leaf=_common.is_none,
        )
        return out, state._replace(path_integral=path, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def si_consolidate(opt_state: Any, params: Any, *, index: int | None = None) -> Any:
    """Ends an SI task: ``Ω += w / ((θ − θ_start)² + ξ)``, ``w ← 0``, ``θ* ← θ_start ← θ``.

    Args:
        opt_state: The whole optimizer state holding one `SiState`.
        params: The parameters at the end of the task.
        index: Which `SiState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the `SiState` updated (the inner optimizer's state is untouched).

    Raises:
        ValueError: when `opt_state` holds no (or several) `SiState`, or `params` does not match
            the parameters the transform was initialised with.

    Example:
        >>> tx = cljax.si(optax.sgd(0.1), strength=1.0)
        >>> state = cljax.si_consolidate(tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
    """
    fn = "si_consolidate"
    state = _common.find_one(fn, opt_state, SiState, index)
    new = state._replace(
        **_common.record_path_integral(fn, state, params),
        anchor=_common.map_like_state(fn, _common.copy_like, state.anchor, {"params": params}),
    )
    return _common.replace_one(opt_state, new, index)
