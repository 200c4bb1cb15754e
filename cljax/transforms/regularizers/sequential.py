"""Sequential loss approximation (RG-07, AQC) and output distillation (RG-08, LwF).

* `aqc` / `aqc_add_task` — Autodiff Quadratic Consolidation: the previous tasks' loss is
  replaced by a full-Hessian quadratic ``½ (θ − θ*)ᵀ H (θ − θ*)`` on a small set of parameters
  (a classifier head over frozen features), ``H`` accumulated task by task with `jax.hessian`.
* `lwf_distillation_loss` — Learning without Forgetting's temperature-softened distillation
  term on the old heads' outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = ["AqcState", "aqc", "aqc_add_task", "lwf_distillation_loss"]

_f32 = jnp.float32


class AqcState(NamedTuple):
    """State of `aqc`."""

    anchor: optax.Params  # θ*: the parameters at the last boundary (the transform's leaves only)
    hessian: chex.Array  # (P, P) float32: H_{1:t}, P = number of entries the transform sees


def _num_entries(tree) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def aqc(strength: chex.Numeric = 1.0) -> optax.GradientTransformationExtraArgs:
    """Adds ``strength · H (θ − θ*)``, the gradient of ``½ (θ − θ*)ᵀ H (θ − θ*)``, to the updates.

    ``θ`` is every entry of every leaf the transform sees, flattened in tree order (``P``
    entries); ``H`` is ``P × P`` — restrict the transform to a small head with
    `optax.masked` / `optax.partition`. ``H = 0`` until `aqc_add_task`, so the transform starts as
    the identity. Place it first in the chain (coupled).

    Args:
        strength: Scale of the quadratic (1 for the method's exact approximation).

    Returns:
        A transform whose state is an `AqcState` (``P² + P`` floats); `update` needs `params`.

    Raises:
        ValueError: for a negative `strength`.

    Example:
        >>> tx = cljax.aqc()
        >>> state = tx.init({"head": jnp.zeros((3, 2))})
        >>> state.hessian.shape
        (6, 6)

    References:
        Zhu and Kuruoğlu, "On Sequential Loss Approximation for Continual Learning", 2024.
        https://arxiv.org/abs/2405.16498
    """
    fn = "aqc"
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)

    def init_fn(params):
        size = _num_entries(params)
        return AqcState(anchor=_common.copy_tree(params), hessian=jnp.zeros((size, size), _f32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_common.is_none)
        p_leaves = treedef.flatten_up_to(params)
        a_leaves = treedef.flatten_up_to(state.anchor)
        present = [i for i, g in enumerate(leaves) if g is not None]
        if not present:
            return updates, state
        diff = jnp.concatenate(
            [(_common.f32(p_leaves[i]) - _common.f32(a_leaves[i])).ravel() for i in present]
        )
        grad = strength * (state.hessian @ diff)
        out, start = list(leaves), 0
        for i in present:
            g = leaves[i]
            piece = grad[start : start + g.size].reshape(g.shape)
            start += g.size
            out[i] = (_common.f32(g) + piece).astype(g.dtype)
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def aqc_add_task(
    opt_state: Any,
    params: Any,
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: Any,
    *,
    damping: chex.Numeric = 0.0,
    index: int | None = None,
) -> Any:
    """Ends a task: ``H ← H + ∇²_θ loss_fn(params, batch) + damping·I`` and ``θ* ← params``.

    The Hessian is taken with `jax.hessian` with respect to the entries the `AqcState` covers
    (leaves that `optax.masked` / `optax.partition` kept from it are held fixed), at the
    end-of-task parameters; the new anchor makes the penalty
    ``½ (θ − θ*_t)ᵀ H_{1:t} (θ − θ*_t)`` (sequential quadratic approximation).

    Args:
        opt_state: The whole optimizer state holding one `AqcState`.
        params: All the model's parameters at the end of the task.
        loss_fn: ``(params, batch) -> scalar``, the task's mean loss.
        batch: The task's data (e.g. its whole training set for a small head).
        damping: Added to the diagonal of this task's Hessian (≥ 0).
        index: Which `AqcState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the `AqcState` updated.

    Raises:
        ValueError: when `opt_state` holds no (or several) `AqcState`, `params` does not match,
            or `damping` is negative.

    Example:
        >>> params = {"head": jnp.ones(2)}
        >>> state = cljax.aqc().init(params)
        >>> loss = lambda p, x: jnp.sum((p["head"] * x) ** 2)
        >>> state = cljax.aqc_add_task(state, params, loss, jnp.array([1.0, 2.0]))
        >>> state.hessian
        Array([[2., 0.],
               [0., 8.]], dtype=float32)
    """
    fn = "aqc_add_task"
    _checks.check_in_range(fn, "damping", damping, 0.0, math.inf)
    state = _common.find_one(fn, opt_state, AqcState, index)
    _common.map_like_state(fn, lambda s, _: s, state.anchor, {"params": params})
    a_leaves, treedef = jax.tree.flatten(state.anchor, is_leaf=_common.is_masked)
    p_leaves = treedef.flatten_up_to(params)
    covered = [i for i, a in enumerate(a_leaves) if not _common.is_masked(a)]
    shapes = [jnp.shape(p_leaves[i]) for i in covered]
    sizes = [int(math.prod(s)) for s in shapes]
    flat0 = (
        jnp.concatenate([_common.f32(p_leaves[i]).ravel() for i in covered])
        if covered
        else jnp.zeros((0,), _f32)
    )

    def from_flat(flat):
        leaves, start = list(p_leaves), 0
        for i, shape, size in zip(covered, shapes, sizes, strict=True):
            leaves[i] = (
                flat[start : start + size].reshape(shape).astype(jnp.asarray(p_leaves[i]).dtype)
            )
            start += size
        return jax.tree.unflatten(treedef, leaves)

    hess = jax.hessian(lambda flat: jnp.asarray(loss_fn(from_flat(flat), batch), _f32))(flat0)
    hess = hess + damping * jnp.eye(flat0.size, dtype=_f32)
    anchor = _common.map_like_state(
        fn, lambda a, p: jnp.array(p, dtype=a.dtype, copy=True), state.anchor, {"params": params}
    )
    new = AqcState(anchor=anchor, hessian=state.hessian + hess)
    return _common.replace_one(opt_state, new, index)


def lwf_distillation_loss(
    logits: jax.Array,
    old_logits: jax.Array,
    *,
    temperature: chex.Numeric = 2.0,
    scale_by_temperature_squared: bool = False,
) -> jax.Array:
    """LwF's distillation term: ``mean_rows KL(softmax(old/T) ‖ softmax(new/T))``.

    `old_logits` are the old heads' outputs recorded (or computed with a frozen copy) before
    training on the new task; `logits` the current model's outputs of the same old heads on the
    same new-task inputs. The total loss is ``CE_new + λ_o · lwf_distillation_loss`` (``λ_o = 1``).

    Args:
        logits: ``(..., classes)`` current outputs of the old heads.
        old_logits: ``(..., classes)`` recorded outputs; they get no gradient.
        temperature: ``T`` > 0 (2 in the paper).
        scale_by_temperature_squared: Multiply by ``T²`` (Hinton et al.'s convention; the LwF
            paper does not). Static.

    Returns:
        A float32 scalar; 0 when the outputs agree.

    Raises:
        ValueError: for different shapes, scalar inputs or ``temperature <= 0``.

    Notes:
        The paper writes the cross-entropy ``−Σ y'_o log ŷ'_o`` of the softened distributions;
        the KL returned here differs by the old outputs' entropy, a constant with the same
        gradient, so that the term is 0 when current and old outputs match.

    Example:
        >>> x = jnp.array([[1.0, 2.0, 3.0]])
        >>> cljax.lwf_distillation_loss(x, x)
        Array(0., dtype=float32)

    References:
        Li and Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017.
        https://arxiv.org/abs/1606.09282
    """
    fn = "lwf_distillation_loss"
    _checks.check_in_range(fn, "temperature", temperature, 0.0, math.inf, low_inclusive=False)
    if not isinstance(scale_by_temperature_squared, bool):
        raise TypeError(
            f"{fn}(scale_by_temperature_squared=...) must be a bool, got {scale_by_temperature_squared!r}."
        )
    new, old = jnp.asarray(logits), jnp.asarray(old_logits)
    if new.shape != old.shape or new.ndim == 0:
        raise ValueError(
            f"{fn}: `logits` has shape {new.shape} and `old_logits` {old.shape}; pass (..., classes) "
            "logits of the same old heads on the same inputs."
        )
    old = jax.lax.stop_gradient(old)
    log_q = jax.nn.log_softmax(new.astype(_f32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(old.astype(_f32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    loss = jnp.mean(kl)
    if scale_by_temperature_squared:
        loss = loss * jnp.square(jnp.asarray(temperature, _f32))
    return loss
