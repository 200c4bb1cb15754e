"""Gradient rescaling for continual learning: TAG and component-wise gradient-norm clipping.

* `scale_by_tag` / `tag_next_task` — task-based accumulated gradients: per-task moments whose
  second moments are mixed by how related each old task is to the current one (OT-02).
* `clip_by_component_norm` — clip each component's gradient norm separately (OT-03).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = ["ScaleByTagState", "clip_by_component_norm", "scale_by_tag", "tag_next_task"]

_f32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# OT-03: component-wise gradient-norm clipping.


def clip_by_component_norm(
    max_norm: chex.Numeric, *, groups: Any = None
) -> optax.GradientTransformationExtraArgs:
    """Clips the L2 norm of each component's gradient to `max_norm`, separately.

    For each component ``c`` (a group of leaves): ``g_c ← g_c · min(1, max_norm / ‖g_c‖₂)``;
    components already within `max_norm` pass unchanged, and a zero gradient stays zero. The
    default component is a single leaf; one group holding every leaf is
    `optax.clip_by_global_norm`.

    Args:
        max_norm: The threshold ``C`` > 0.
        groups: None (each leaf its own component), a tree of hashable labels with the
            structure of the updates, or a function mapping the updates to such a tree (e.g.
            ``cljax.label_by_path({"attn": "attn", "mlp": "mlp"}, default="rest")``). Static.

    Returns:
        A stateless transform.

    Raises:
        ValueError: for a non-positive `max_norm` or a label tree of another structure.

    Example:
        >>> tx = cljax.clip_by_component_norm(1.0)
        >>> out, _ = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1])}, tx.init(None))
        >>> out["a"], out["b"]
        (Array([0.6, 0.8], dtype=float32), Array([0.1], dtype=float32))

    References:
        Yang and Ma, "Improving Stability of Fine-Tuning Pretrained Language Models via
        Component-Wise Gradient Norm Clipping", 2022. https://arxiv.org/abs/2210.10325
    """
    fn = "clip_by_component_norm"
    _checks.check_in_range(fn, "max_norm", max_norm, 0.0, math.inf, low_inclusive=False)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        if groups is None:
            labels = list(range(len(leaves)))
        else:
            tree = groups(updates) if callable(groups) else groups
            try:
                labels = treedef.flatten_up_to(tree)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"{fn}: `groups` must give one label per leaf of the updates ({err})."
                ) from err
        squares: dict[Any, Any] = {}
        for label, g in zip(labels, leaves, strict=True):
            s = jnp.sum(jnp.square(g.astype(_f32)))
            squares[label] = s if label not in squares else squares[label] + s
        scales = {}
        for label, s in squares.items():
            norm = jnp.sqrt(s)
            scales[label] = jnp.where(
                norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0
            )
        out = [
            jnp.where(scales[label] < 1.0, (g.astype(_f32) * scales[label]).astype(g.dtype), g)
            for label, g in zip(labels, leaves, strict=True)
        ]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# OT-02: TAG.


class ScaleByTagState(NamedTuple):
    """State of `scale_by_tag`: per-task second moments and stored first-moment directions."""

    count: chex.Array  # int32 steps taken in the current task (bias correction)
    task: chex.Array  # int32 index of the current task
    mu: optax.Updates  # current task's first moment, float32
    nu: optax.Updates  # per leaf (capacity, *shape) float32: v_τ of every task so far
    directions: optax.Updates  # per leaf (capacity, *shape) float32: m_τ / ‖m_τ‖ of past tasks


def scale_by_tag(
    capacity: int,
    *,
    variant: Literal["rmsprop", "adam"] = "rmsprop",
    b: chex.Numeric = 5.0,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric | None = None,
    eps: chex.Numeric = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """TAG: RMSProp / Adam whose denominator mixes every task's second moment by relatedness.

    Per leaf, in task ``t`` with the gradient ``g``: ``m ← b1 m + (1 − b1) g``,
    ``v_t ← b2 v_t + (1 − b2) g²``; for each past task ``τ < t``,
    ``α_τ = exp(−b ⟨m/‖m‖, m̂_τ⟩)`` with ``m̂_τ`` the normalised first moment stored at the end
    of task ``τ``, and ``α_t = exp(−b)`` (``α = [1]`` on the first task). Emits
    ``num / (√(Σ_τ α_τ v_τ) / √(1 − b2ⁿ) + eps)`` with ``num = g`` (RMSProp variant, no bias
    correction) or ``m / (1 − b1ⁿ)`` (Adam variant), ``n`` the step count within the task.
    Place it before `optax.scale_by_learning_rate`; call `tag_next_task` at each task boundary.

    Args:
        capacity: Most tasks held (memory ``(2·capacity + 1) × params``). Static.
        variant: ``'rmsprop'`` (default) or ``'adam'``. Static.
        b: Relatedness temperature ``b`` (5 in the reference).
        b1: First-moment decay.
        b2: Second-moment decay; default 0.99 (RMSProp) or 0.999 (Adam), as the reference.
        eps: Added to the denominator.

    Returns:
        A transform whose state is a `ScaleByTagState`.

    Raises:
        ValueError: for a bad `capacity`, `variant` or decay rate.

    Notes:
        The reference resets its bias-correction step at every epoch (it passes the batch
        index); cljax counts steps within the task. Normalisation statistics are not
        parameters and are never seen by an optax transform.

    Example:
        >>> tx = optax.chain(cljax.scale_by_tag(capacity=3), optax.scale_by_learning_rate(1e-3))
        >>> state = tx.init({"w": jnp.ones(2)})
        >>> state = cljax.tag_next_task(state)

    References:
        Malviya, Ravindran and Chandar, "TAG: Task-based Accumulated Gradients for Lifelong
        Learning", 2022. https://arxiv.org/abs/2105.05155
    """
    fn = "scale_by_tag"
    _checks.check_int(fn, "capacity", capacity, 1)
    _checks.check_choice(fn, "variant", variant, ("rmsprop", "adam"))
    if b2 is None:
        b2 = 0.99 if variant == "rmsprop" else 0.999
    _checks.check_in_range(fn, "b1", b1, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "b2", b2, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "b", b, 0.0, math.inf)
    _checks.check_in_range(fn, "eps", eps, 0.0, math.inf)

    def init_fn(params):
        return ScaleByTagState(
            count=jnp.zeros([], jnp.int32),
            task=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=_f32),
            nu=_common.stacked_zeros(params, capacity, _f32),
            directions=_common.stacked_zeros(params, capacity, _f32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = optax.safe_increment(state.count)
        n = count.astype(_f32)
        task = state.task
        slots = jnp.arange(capacity)
        bc1 = 1.0 - jnp.asarray(b1, _f32) ** n
        bc2 = 1.0 - jnp.asarray(b2, _f32) ** n if variant == "adam" else jnp.ones([], _f32)

        def leaf(g, m, nu, dirs):
            if g is None:
                return None, None, None
            g32 = g.astype(_f32)
            m = b1 * m + (1.0 - b1) * g32
            current = lax.dynamic_index_in_dim(nu, task, keepdims=False)
            nu = lax.dynamic_update_index_in_dim(nu, b2 * current + (1.0 - b2) * g32 * g32, task, 0)
            norm = jnp.sqrt(jnp.sum(m * m))
            unit = m / jnp.where(norm > 0, norm, 1.0)
            current_weight = jnp.where(task == 0, 1.0, jnp.exp(-jnp.asarray(b, _f32)))
            mixed = jnp.zeros(g.shape, _f32)
            for k in range(capacity):  # unrolled over the static capacity: fused passes
                alpha = jnp.where(
                    slots[k] < task,
                    jnp.exp(-b * jnp.sum(dirs[k] * unit)),
                    jnp.where(slots[k] == task, current_weight, 0.0),
                )
                mixed = mixed + alpha * nu[k]
            denom = jnp.sqrt(mixed) / jnp.sqrt(bc2) + eps
            num = m / bc1 if variant == "adam" else g32
            return (num / denom).astype(g.dtype), m, nu

        triples = jax.tree.map(
            leaf, updates, state.mu, state.nu, state.directions, is_leaf=_common.is_none
        )
        is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and not hasattr(x, "_fields")
        pick = lambda i: jax.tree.map(lambda t: t[i], triples, is_leaf=is_triple)
        new_state = state._replace(count=count, mu=pick(1), nu=pick(2))
        return pick(0), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tag_next_task(opt_state: Any, *, index: int | None = None) -> Any:
    """Ends the current TAG task: stores ``m / ‖m‖`` per leaf and starts fresh moments.

    Args:
        opt_state: The whole optimizer state holding one `ScaleByTagState`.
        index: Which `ScaleByTagState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the next task current: its first moment, step count and second moment
        start from zero; earlier tasks' second moments and directions are kept.

    Raises:
        ValueError: when `opt_state` holds no (or several) `ScaleByTagState`, or the next task
            would exceed the capacity. Under `jax.jit` the last cannot be checked: the state then
            stays unchanged.

    Example:
        >>> state = cljax.scale_by_tag(capacity=2).init({"w": jnp.ones(2)})
        >>> int(cljax.tag_next_task(state).task)
        1
    """
    fn = "tag_next_task"
    state = _common.find_one(fn, opt_state, ScaleByTagState, index)
    capacity = next((x.shape[0] for x in jax.tree.leaves(state.nu)), 1)
    task = _common.concrete_int(state.task)
    if task is not None and task + 1 >= capacity:
        raise ValueError(
            f"{fn}: the ScaleByTagState is at task {task} of its capacity {capacity}; build "
            "`scale_by_tag(capacity=...)` with room for every task."
        )
    room = state.task + 1 < capacity

    def store(dirs, m):
        norm = jnp.sqrt(jnp.sum(m * m))
        unit = m / jnp.where(norm > 0, norm, 1.0)
        new = lax.dynamic_update_index_in_dim(dirs, unit, state.task, 0)
        return jnp.where(room, new, dirs)

    directions = jax.tree.map(store, state.directions, state.mu)
    new = ScaleByTagState(
        count=jnp.where(room, 0, state.count).astype(jnp.int32),
        task=jnp.where(room, state.task + 1, state.task).astype(jnp.int32),
        mu=jax.tree.map(lambda m: jnp.where(room, jnp.zeros_like(m), m), state.mu),
        nu=state.nu,
        directions=directions,
    )
    return _common.replace_one(opt_state, new, index)
