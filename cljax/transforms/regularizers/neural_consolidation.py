"""Neural consolidation (RG-07, NC): a regressor network stands in for the previous tasks' loss.

AQC (`aqc`) approximates the previous tasks' loss ``L_{1:t−1}(θ)`` by a full-Hessian quadratic;
NC approximates it by a small network ``N_φ(θ)`` trained to regress that loss, and adds
``strength · ∇_θ N_φ(θ)`` to the gradient of the new task's loss. ``θ`` is the flat vector of the
parameters the transform sees (a small head over a frozen feature extractor); the regressor's
architecture is the caller's function, its weights ``φ`` live in the optimizer state and are
replaced at task boundaries (`neural_consolidation_set`), typically after fitting them with
`neural_consolidation_fit` to samples of the recursion ``L̂_{1:t}(θ) = L̂_{1:t−1}(θ) + L_t(θ)``.
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

__all__ = [
    "NeuralConsolidationState",
    "neural_consolidation",
    "neural_consolidation_fit",
    "neural_consolidation_set",
]

_f32 = jnp.float32

ApproximatorFn = Callable[[Any, jax.Array], jax.Array]


class NeuralConsolidationState(NamedTuple):
    """State of `neural_consolidation`."""

    approximator: Any  # φ: the regressor's weights, float32
    active: (
        chex.Array
    )  # bool: False until `neural_consolidation_set` (the transform is then the identity)


def _check_fn(fn: str, approximator_fn: Any) -> None:
    if not callable(approximator_fn):
        raise TypeError(
            f"{fn}(approximator_fn=...) must be a function (weights, theta) -> scalar, got "
            f"{type(approximator_fn).__name__}."
        )


def _check_scalar_output(fn: str, approximator_fn, weights, size: int) -> None:
    out = jax.eval_shape(approximator_fn, weights, jax.ShapeDtypeStruct((size,), _f32))
    if not (hasattr(out, "shape") and tuple(out.shape) == ()):
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{fn}: `approximator_fn(weights, theta)` must return a scalar for theta of shape "
            f"({size},), got {got}."
        )


def _as_f32_tree(weights: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, dtype=_f32, copy=True), weights)


def neural_consolidation(
    approximator_fn: ApproximatorFn,
    approximator_init: Any,
    strength: chex.Numeric = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Adds ``strength · ∇_θ N_φ(θ)``, the gradient of the regressed previous loss, to the updates.

    ``θ`` is every entry of every leaf the transform sees, flattened in tree order in float32 (for
    a plain head the same vector as ``jax.flatten_util.ravel_pytree(head)[0]``): restrict the
    transform to a small head with `optax.masked` / `optax.partition`. Until
    `neural_consolidation_set` installs fitted weights, the transform is the identity. Place it
    first in the chain (coupled: the penalty enters the loss).

    Args:
        approximator_fn: ``(weights, theta) -> scalar``, the regressor ``N_φ`` (e.g. a small MLP
            applied to the ``(P,)`` vector ``theta``). Static.
        approximator_init: A tree of arrays with the regressor's weights (their shapes define the
            state; the values are only a starting point). Static.
        strength: Scale of the approximated loss (1 for the method).

    Returns:
        A transform whose state is a `NeuralConsolidationState`; `update` needs `params`.

    Raises:
        TypeError: when `approximator_fn` is not callable.
        ValueError: for a negative `strength`; at `init`, when `approximator_fn` does not
            return a scalar for the ``(P,)`` parameter vector.

    Example:
        >>> quad = lambda w, t: 0.5 * jnp.sum(w["h"] * (t - w["c"]) ** 2)
        >>> tx = cljax.neural_consolidation(quad, {"h": jnp.ones(2), "c": jnp.zeros(2)})
        >>> state = tx.init({"head": jnp.zeros(2)})
        >>> state = cljax.neural_consolidation_set(state, {"h": jnp.ones(2), "c": jnp.zeros(2)})
        >>> tx.update({"head": jnp.zeros(2)}, state, {"head": jnp.array([1.0, 2.0])})[0]
        {'head': Array([1., 2.], dtype=float32)}

    References:
        Zhu and Kuruoğlu, "On Sequential Loss Approximation for Continual Learning", 2024.
        https://arxiv.org/abs/2405.16498
    """
    fn = "neural_consolidation"
    _check_fn(fn, approximator_fn)
    _checks.check_in_range(fn, "strength", strength, 0.0, math.inf)

    def init_fn(params):
        size = sum(int(jnp.size(x)) for x in jax.tree.leaves(params))
        weights = _as_f32_tree(approximator_init)
        _check_scalar_output(fn, approximator_fn, weights, size)
        return NeuralConsolidationState(approximator=weights, active=jnp.zeros([], jnp.bool_))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_common.is_none)
        p_leaves = treedef.flatten_up_to(params)
        present = [i for i, g in enumerate(leaves) if g is not None]
        if not present:
            return updates, state
        theta = jnp.concatenate([_common.f32(p_leaves[i]).ravel() for i in present])
        grad = jax.grad(lambda t: jnp.asarray(approximator_fn(state.approximator, t), _f32))(theta)
        grad = jnp.where(state.active, strength * grad, 0.0)
        out, start = list(leaves), 0
        for i in present:
            g = leaves[i]
            piece = grad[start : start + g.size].reshape(g.shape)
            start += g.size
            out[i] = (_common.f32(g) + piece).astype(g.dtype)
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def neural_consolidation_set(opt_state: Any, approximator: Any, *, index: int | None = None) -> Any:
    """Installs fitted regressor weights ``φ`` and switches the penalty on. Call between tasks.

    Args:
        opt_state: The whole optimizer state holding one `NeuralConsolidationState`.
        approximator: The regressor's weights, with the structure and shapes of
            `approximator_init`.
        index: Which `NeuralConsolidationState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the weights replaced (stored in float32) and the penalty active.

    Raises:
        ValueError: when `opt_state` holds no (or several) `NeuralConsolidationState`, or the
            weights do not match the stored structure or shapes.

    Example:
        >>> f = lambda w, t: jnp.sum(w * t)
        >>> state = cljax.neural_consolidation(f, jnp.zeros(2)).init({"head": jnp.zeros(2)})
        >>> bool(cljax.neural_consolidation_set(state, jnp.ones(2)).active)
        True
    """
    fn = "neural_consolidation_set"
    state = _common.find_one(fn, opt_state, NeuralConsolidationState, index)
    old, new = state.approximator, approximator
    if jax.tree.structure(old) != jax.tree.structure(new):
        raise ValueError(
            f"{fn}: `approximator` has structure {jax.tree.structure(new)}, but the state holds "
            f"{jax.tree.structure(old)}; pass weights shaped like `approximator_init`."
        )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new), strict=True
    ):
        if tuple(jnp.shape(a)) != tuple(jnp.shape(b)):
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' of `approximator` has shape "
                f"{tuple(jnp.shape(b))}, but the state holds {tuple(jnp.shape(a))}."
            )
    updated = state._replace(approximator=_as_f32_tree(new), active=jnp.ones([], jnp.bool_))
    return _common.replace_one(opt_state, updated, index)


def neural_consolidation_fit(
    approximator_fn: ApproximatorFn,
    approximator: Any,
    thetas: jax.Array,
    targets: jax.Array,
    *,
    steps: int = 1000,
    learning_rate: float = 1e-2,
) -> Any:
    """Fits the regressor to loss samples: Adam on ``mean_j (N_φ(θ_j) − y_j)²``, full batch.

    For NC at the end of task ``t``, draw parameter vectors ``θ_j`` around the task's solution
    (the sampling distribution is the caller's choice) and set ``y_j = N_{φ_{t−1}}(θ_j) + L_t(θ_j)``
    (``y_j = L_1(θ_j)`` after the first task); the fitted ``φ_t`` then approximates
    ``L_{1:t}``. Runs as one `lax.scan` (jit it for repeated use).

    Args:
        approximator_fn: ``(weights, theta) -> scalar``, as in `neural_consolidation`.
        approximator: Starting weights (e.g. the previous ``φ``).
        thetas: ``(n, P)`` parameter samples.
        targets: ``(n,)`` loss values at the samples.
        steps: Number of Adam steps (≥ 1). Static.
        learning_rate: Adam's learning rate (> 0).

    Returns:
        The fitted weights, float32, with the structure of `approximator`.

    Raises:
        TypeError: when `approximator_fn` is not callable or `steps` is not an int.
        ValueError: for mismatched `thetas` / `targets` shapes, ``steps < 1`` or
            ``learning_rate <= 0``.

    Example:
        >>> f = lambda w, t: jnp.sum(w * t)
        >>> thetas = jnp.eye(2)
        >>> w = cljax.neural_consolidation_fit(f, jnp.zeros(2), thetas, jnp.array([1.0, -1.0]),
        ...                                     steps=300, learning_rate=0.05)
        >>> [round(float(x), 2) for x in w]
        [1.0, -1.0]
    """
    fn = "neural_consolidation_fit"
    _check_fn(fn, approximator_fn)
    _checks.check_int(fn, "steps", steps, 1)
    _checks.check_in_range(fn, "learning_rate", learning_rate, 0.0, math.inf, low_inclusive=False)
    thetas = jnp.asarray(thetas, _f32)
    targets = jnp.asarray(targets, _f32)
    if thetas.ndim != 2 or targets.shape != thetas.shape[:1]:
        raise ValueError(
            f"{fn}: `thetas` has shape {thetas.shape} and `targets` {targets.shape}; they must be "
            "(n, P) parameter samples and (n,) loss values."
        )
    weights = _as_f32_tree(approximator)
    _check_scalar_output(fn, approximator_fn, weights, thetas.shape[1])
    opt = optax.adam(learning_rate)

    def loss(w):
        pred = jax.vmap(lambda t: jnp.asarray(approximator_fn(w, t), _f32))(thetas)
        return jnp.mean((pred - targets) ** 2)

    def step(carry, _):
        w, s = carry
        g = jax.grad(loss)(w)
        u, s = opt.update(g, s, w)
        return (optax.apply_updates(w, u), s), None

    (weights, _), _ = jax.lax.scan(step, (weights, opt.init(weights)), None, length=steps)
    return weights
