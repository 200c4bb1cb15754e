"""Anchored quadratic penalties as gradient transforms: EWC, L2-to-anchor, MAS and SI.

Each transform adds the gradient of a quadratic penalty toward anchor weights ``θ*`` to the
incoming updates. Placed **first** in a chain (before the inner optimizer) this is the *coupled*
form, identical to adding the penalty to the loss (the papers' form and the default of the
ready-made optimizers); placed after the inner direction and before
`optax.scale_by_learning_rate` it is the *decoupled* form (like AdamW's decay). Never mix the two
in one comparison.

The anchors and importances live in the transform's state and change only at task boundaries,
through pure functions that take and return the whole optimizer state:

* `ewc` / `ewc_consolidate` — Fisher-weighted penalty, separate (one pair per task, at a fixed
  capacity) or online (one decayed, accumulated pair).
* `l2_anchor` / `l2_anchor_consolidate` — plain L2 toward the previous-task or initial weights.
* `mas` / `mas_consolidate` — MAS output-sensitivity importance (estimate it with
  `mas_importance`).
* `si` / `si_consolidate` (module `synaptic`) — Synaptic Intelligence.

Penalty conventions (gradient added to the updates):

=============  ====================================  =====================================
transform      penalty added to the loss             gradient
=============  ====================================  =====================================
`ewc`          ``(λ/2) Σ_k Σ F_k (θ − θ*_k)²``        ``λ Σ_k F_k (θ − θ*_k)``
`l2_anchor`    ``(λ/2) ‖θ − θ*‖²``                    ``λ (θ − θ*)``
`mas`          ``λ Σ Ω (θ − θ*)²``                    ``2 λ Ω (θ − θ*)``
`si`           ``c Σ Ω (θ − θ*)²``                    ``2 c Ω (θ − θ*)``
=============  ====================================  =====================================
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = [
    "EwcState",
    "L2AnchorState",
    "MasState",
    "ewc",
    "ewc_consolidate",
    "l2_anchor",
    "l2_anchor_consolidate",
    "mas",
    "mas_consolidate",
]

_f32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# RG-01: EWC and online EWC.


class EwcState(NamedTuple):
    """State of `ewc`: up to `capacity` (anchor, Fisher) pairs, the first `count` of them valid."""

    count: chex.Array  # int32: valid pairs (online mode: 0 before the first consolidation, then 1)
    online: chex.Array  # bool: online mode (one decayed, accumulated pair) or separate mode
    decay: chex.Array  # float32 ``γ`` of online mode: ``F ← γ F + F_new``
    anchors: optax.Params  # per leaf (capacity, *shape), the parameters' dtype: θ*_k
    fishers: optax.Params  # per leaf (capacity, *shape), float32 by default: F_k


def ewc(
    strength: chex.Numeric,
    online: bool = False,
    decay: chex.Numeric = 1.0,
    *,
    capacity: int | None = None,
    fisher_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Adds the EWC penalty gradient ``strength * Σ_k F_k ⊙ (θ − θ*_k)`` to the updates.

    The gradient of the paper's penalty ``Σ_k (λ/2) Σ_i F_k,i (θ_i − θ*_k,i)²`` (with the ½, so
    the gradient has no factor 2). Pairs ``(θ*_k, F_k)`` are set by `ewc_consolidate` at task
    boundaries; before the first one the transform is the identity.

    * Separate mode (``online=False``, the paper's form for several tasks): one pair per past
      task, at most `capacity` of them, penalties summed.
    * Online mode (``online=True``, Progress & Compress): a single pair, ``F ← decay·F + F_new``
      and ``θ* ← θ`` at each boundary.

    Place it first in the chain (coupled form, = a loss term; the default), or after the inner
    direction and before `optax.scale_by_learning_rate` (decoupled form).

    Args:
        strength: ``λ``, the penalty strength (benchmark-dependent over orders of magnitude).
        online: Online mode. Static.
        decay: ``γ`` of online mode, in [0, 1]; separate mode needs 1. Stored in the state at
            `init` and read by `ewc_consolidate`.
        capacity: Number of task pairs kept in separate mode (default 1); online mode keeps one.
            Memory: ``2 × capacity × params``. Static.
        fisher_dtype: dtype of the stored Fisher diagonals (float32 by default, also for bf16
            parameters). Static.

    Returns:
        A transform whose state is an `EwcState`; `update` needs `params`.

    Raises:
        ValueError: for a negative `strength`, `decay` outside [0, 1], ``decay != 1`` in separate
            mode, or ``capacity != 1`` in online mode.
        TypeError: when `online` is not a bool or `capacity` not an int.

    Example:
        >>> params = {"w": jnp.ones(3)}
        >>> tx = optax.chain(cljax.ewc(100.0, online=True, decay=0.9), optax.sgd(1e-2))
        >>> state = tx.init(params)
        >>> state = cljax.ewc_consolidate(state, params, {"w": jnp.full(3, 0.5)})
        >>> updates, state = tx.update({"w": jnp.zeros(3)}, state, {"w": jnp.full(3, 2.0)})
        >>> updates["w"]  # -lr * λ F (θ − θ*) = -0.01 * 100 * 0.5 * 1
        Array([-0.5, -0.5, -0.5], dtype=float32)

    References:
        Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
        https://arxiv.org/abs/1612.00796

        Schwarz et al., "Progress & Compress: A scalable framework for continual learning",
        ICML 2018. https://arxiv.org/abs/1805.06370
    """
    fn = "ewc"
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)
    _checks.check_in_range(fn, "decay", decay, 0.0, 1.0)
    if not isinstance(online, bool):
        raise TypeError(f"{fn}(online=...) must be a bool, got {online!r}.")
    if capacity is None:
        capacity = 1
    _checks.check_int(fn, "capacity", capacity, 1)
    if online and capacity != 1:
        raise ValueError(
            f"{fn}(capacity=...) must be 1 in online mode (one accumulated pair), got {capacity}."
        )
    concrete_decay = _checks._as_float(decay)
    if not online and concrete_decay is not None and concrete_decay != 1.0:
        raise ValueError(
            f"{fn}(decay=...) must be 1.0 in separate mode, got {concrete_decay}; decay applies to "
            "online mode (online=True)."
        )
    fisher_dtype = _common.canonical_dtype(fn, "fisher_dtype", fisher_dtype)

    def init_fn(params):
        return EwcState(
            count=jnp.zeros([], jnp.int32),
            online=jnp.asarray(online),
            decay=jnp.asarray(decay, _f32),
            anchors=_common.stacked_zeros(params, capacity),
            fishers=_common.stacked_zeros(params, capacity, fisher_dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        valid = jnp.arange(capacity) < state.count

        def leaf(g, p, anchors, fishers):
            if g is None:
                return None
            # Unrolled over the static capacity: one fused element-wise pass reading every slot,
            # instead of a reduction over a stacked axis.
            p32 = p.astype(_f32)
            total = jnp.zeros(p.shape, _f32)
            for k in range(capacity):
                term = fishers[k].astype(_f32) * (p32 - anchors[k].astype(_f32))
                total = total + jnp.where(valid[k], term, 0.0)
            return (g.astype(_f32) + strength * total).astype(g.dtype)

        out = jax.tree.map(
            leaf, updates, params, state.anchors, state.fishers, is_leaf=_common.is_none
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ewc_consolidate(opt_state: Any, params: Any, fisher: Any, *, index: int | None = None) -> Any:
    """Stores ``(params, fisher)`` in the `EwcState` of `opt_state`. Call at a task boundary.

    Separate mode writes the pair into the next free slot and raises when all `capacity` slots
    are used; online mode sets ``F ← decay·F + fisher`` and ``θ* ← params``. Leaves that
    `optax.masked` or `optax.partition` kept from the transform are skipped.

    Args:
        opt_state: The whole optimizer state holding one `EwcState`.
        params: The parameters at the end of the task (the new anchor).
        fisher: The diagonal Fisher at `params`, e.g. from `fisher_diagonal`; non-negative.
        index: Which `EwcState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the `EwcState` updated.

    Raises:
        ValueError: when `opt_state` holds no (or several) `EwcState`, when `params` or `fisher`
            do not match the parameters, when `fisher` has a negative entry, or when separate
            mode is full. Under `jax.jit` the last two cannot be checked: a consolidation past
            the capacity then leaves the state unchanged (``count`` stays at the capacity).

    Example:
        >>> params = {"w": jnp.ones(2)}
        >>> tx = cljax.ewc(1.0, capacity=2)
        >>> state = cljax.ewc_consolidate(tx.init(params), params, {"w": jnp.ones(2)})
        >>> int(state.count)
        1
    """
    fn = "ewc_consolidate"
    state = _common.find_one(fn, opt_state, EwcState, index)
    _common.map_like_state(
        fn, lambda s, *_: s, state.anchors, {"params": params, "fisher": fisher}, lead=1
    )
    _common.check_nonnegative(fn, "fisher", fisher)
    capacity = next(
        (
            x.shape[0]
            for x in jax.tree.leaves(state.anchors, is_leaf=_common.is_masked)
            if not _common.is_masked(x)
        ),
        1,
    )
    count = _common.concrete_int(state.count)
    online_now = _common.concrete_int(state.online)
    if count is not None and online_now == 0 and count >= capacity:
        raise ValueError(
            f"{fn}: the EwcState already holds {count} of its {capacity} task pairs; build "
            "`ewc(..., capacity=...)` with room for every task, or use online=True."
        )
    online = state.online
    write = jnp.logical_or(online, state.count < capacity)
    slot = jnp.where(online, 0, jnp.minimum(state.count, capacity - 1))

    def fisher_leaf(stack, new):
        old = lax.dynamic_index_in_dim(stack, slot, keepdims=False).astype(_f32)
        value = jnp.where(online, state.decay * old + _common.f32(new), _common.f32(new))
        value = jnp.where(write, value, old).astype(stack.dtype)
        return lax.dynamic_update_index_in_dim(stack, value, slot, 0)

    def anchor_leaf(stack, new):
        old = lax.dynamic_index_in_dim(stack, slot, keepdims=False)
        value = jnp.where(write, jnp.asarray(new).astype(stack.dtype), old)
        return lax.dynamic_update_index_in_dim(stack, value, slot, 0)

    fishers = _common.map_like_state(fn, fisher_leaf, state.fishers, {"fisher": fisher}, lead=1)
    anchors = _common.map_like_state(fn, anchor_leaf, state.anchors, {"params": params}, lead=1)
    count = jnp.where(online, 1, jnp.where(write, state.count + 1, state.count)).astype(jnp.int32)
    new = state._replace(count=count, anchors=anchors, fishers=fishers)
    return _common.replace_one(opt_state, new, index)


# ---------------------------------------------------------------------------------------------
# RG-02: L2 toward an anchor.


class L2AnchorState(NamedTuple):
    """State of `l2_anchor`."""

    anchor: optax.Params  # θ*: the parameters given to `init`, then those of the last boundary


def l2_anchor(strength: chex.Numeric, mask: Any = None) -> optax.GradientTransformationExtraArgs:
    """Adds ``strength * (θ − θ*)``, the gradient of ``(λ/2)‖M ⊙ (θ − θ*)‖²``, to the updates.

    The anchor ``θ*`` starts as (a copy of) the parameters given to `init` — the pre-trained
    weights of L2-SP — and `l2_anchor_consolidate` moves it to the current parameters at a task
    boundary (rehearsal-free continual learning). Place it first in the chain for the coupled
    form (the default), or after the inner direction and before `optax.scale_by_learning_rate`
    for the decoupled form (``decay_to_anchor``).

    Args:
        strength: ``λ``, the penalty strength.
        mask: As in `optax.add_decayed_weights`: a boolean tree or a function of the params
            (e.g. ``cljax.select("attn")``), True where the penalty applies. Unmasked leaves
            pass unchanged and store no anchor.

    Returns:
        A transform whose state is an `L2AnchorState` (inside `optax.MaskedState` with a
        mask); `update` needs `params`.

    Raises:
        ValueError: for a negative `strength`.

    Example:
        >>> params = {"w": jnp.zeros(2)}
        >>> tx = cljax.l2_anchor(0.5)
        >>> state = tx.init(params)
        >>> updates, _ = tx.update({"w": jnp.zeros(2)}, state, {"w": jnp.ones(2)})
        >>> updates["w"]
        Array([0.5, 0.5], dtype=float32)

    References:
        Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
        Convolutional Networks", ICML 2018. https://arxiv.org/abs/1802.01483

        Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", 2023.
        https://arxiv.org/abs/2203.17269
    """
    fn = "l2_anchor"
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)

    def init_fn(params):
        return L2AnchorState(anchor=_common.copy_tree(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        out = jax.tree.map(
            lambda g, p, a: _common.quadratic_leaf(g, p, a, jnp.ones([], _f32), strength),
            updates,
            params,
            state.anchor,
            is_leaf=_common.is_none,
        )
        return out, state

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    if mask is not None:
        return optax.masked(tx, mask)
    return tx


def l2_anchor_consolidate(opt_state: Any, params: Any, *, index: int | None = None) -> Any:
    """Moves the anchor of the `L2AnchorState` in `opt_state` to `params` (a copy).

    Args:
        opt_state: The whole optimizer state holding one `L2AnchorState`.
        params: The new anchor, e.g. the parameters at the end of a task.
        index: Which `L2AnchorState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the anchor replaced exactly; masked leaves stay without anchor.

    Raises:
        ValueError: when `opt_state` holds no (or several) `L2AnchorState`, or `params` does
            not match the parameters the transform was initialised with.

    Example:
        >>> tx = cljax.l2_anchor(0.1)
        >>> state = cljax.l2_anchor_consolidate(tx.init({"w": jnp.zeros(2)}), {"w": jnp.ones(2)})
        >>> state.anchor["w"]
        Array([1., 1.], dtype=float32)
    """
    fn = "l2_anchor_consolidate"
    state = _common.find_one(fn, opt_state, L2AnchorState, index)
    anchor = _common.map_like_state(
        fn, lambda a, p: jnp.array(p, dtype=a.dtype, copy=True), state.anchor, {"params": params}
    )
    return _common.replace_one(opt_state, L2AnchorState(anchor=anchor), index)


# ---------------------------------------------------------------------------------------------
# RG-04: MAS.


class MasState(NamedTuple):
    """State of `mas`."""

    anchor: optax.Params  # θ* of the last boundary (zeros before the first one)
    importance: (
        optax.Params
    )  # Ω accumulated over tasks, float32 by default; zeros = nothing protected


def mas(
    strength: chex.Numeric, *, importance_dtype: Any = "float32"
) -> optax.GradientTransformationExtraArgs:
    """Adds the MAS penalty gradient ``2 · strength · Ω ⊙ (θ − θ*)`` to the updates.

    The gradient of the paper's penalty ``λ Σ_i Ω_i (θ_i − θ*_i)²`` (no ½). ``Ω`` and ``θ*`` are
    set by `mas_consolidate` at task boundaries, ``Ω`` typically from `mas_importance`; before
    the first boundary the transform is the identity. Place it first in the chain (coupled).

    Args:
        strength: ``λ``, the penalty strength.
        importance_dtype: dtype of the stored ``Ω`` (float32 by default). Static.

    Returns:
        A transform whose state is a `MasState`; `update` needs `params`.

    Raises:
        ValueError: for a negative `strength`.

    Example:
        >>> tx = optax.chain(cljax.mas(1.0), optax.sgd(0.1))
        >>> state = tx.init({"w": jnp.zeros(2)})

    References:
        Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018.
        https://arxiv.org/abs/1711.09601
    """
    fn = "mas"
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)
    importance_dtype = _common.canonical_dtype(fn, "importance_dtype", importance_dtype)

    def init_fn(params):
        return MasState(
            anchor=optax.tree.zeros_like(params),
            importance=optax.tree.zeros_like(params, dtype=importance_dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        out = jax.tree.map(
            lambda g, p, a, w: _common.quadratic_leaf(g, p, a, w, 2.0 * strength),
            updates,
            params,
            state.anchor,
            state.importance,
            is_leaf=_common.is_none,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mas_consolidate(
    opt_state: Any, params: Any, importance: Any, *, index: int | None = None
) -> Any:
    """Accumulates ``Ω ← Ω + importance`` and sets ``θ* ← params`` in the `MasState` of `opt_state`.

    Args:
        opt_state: The whole optimizer state holding one `MasState`.
        params: The parameters at the end of the task (the new anchor).
        importance: This task's ``Ω``, e.g. from `mas_importance`; non-negative.
        index: Which `MasState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the `MasState` updated.

    Raises:
        ValueError: when `opt_state` holds no (or several) `MasState`, when the trees do not
            match the parameters, or when `importance` has a negative entry.

    Example:
        >>> params = {"w": jnp.ones(2)}
        >>> state = cljax.mas(1.0).init(params)
        >>> state = cljax.mas_consolidate(state, params, {"w": jnp.ones(2)})
        >>> state.importance["w"]
        Array([1., 1.], dtype=float32)
    """
    fn = "mas_consolidate"
    state = _common.find_one(fn, opt_state, MasState, index)
    _common.check_nonnegative(fn, "importance", importance)
    omega = _common.map_like_state(
        fn,
        lambda w, new: (w.astype(_f32) + _common.f32(new)).astype(w.dtype),
        state.importance,
        {"importance": importance},
    )
    anchor = _common.map_like_state(
        fn, lambda a, p: jnp.array(p, dtype=a.dtype, copy=True), state.anchor, {"params": params}
    )
    return _common.replace_one(opt_state, MasState(anchor=anchor, importance=omega), index)
