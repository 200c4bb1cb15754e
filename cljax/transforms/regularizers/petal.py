"""PETAL: lifelong test-time adaptation with an EMA teacher, a source prior and FIM-based restore.

`petal(inner)` wraps the whole optimizer (Adam with its learning rate in the paper). Per test
batch, with the gradient ``g`` of the student's cross-entropy to the teacher's soft targets
(`petal_targets`, the teacher read with `petal_teacher`):

1. adds the source prior's gradient ``w_p (θ − μ_src) / (σ²_src + 1e−6)`` (coupled);
2. ``F = g ⊙ g`` and ``τ`` = the `restore_quantile` quantile of all entries of ``F`` over the
   model (linear interpolation, as `jnp.quantile` and `numpy.quantile` by default; found by
   bisection on the float bit pattern, without a sort);
3. the inner step ``θ⁺ = θ + u``; the teacher ``θ_T ← m θ_T + (1 − m) θ⁺`` (unrestored);
4. restores: emits ``where(F < τ, θ_src − θ, u)``.

PETAL-SRes (``restore='random'``) replaces step 4's mask by an independent Bernoulli draw per
entry: each entry returns to its source value with probability `restore_quantile`, whatever its
gradient (no quantile is computed).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = ["PetalState", "petal", "petal_set_prior", "petal_targets", "petal_teacher"]

_f32 = jnp.float32
_RESTORES = ("fisher", "random")


class PetalState(NamedTuple):
    """State of `petal`."""

    source: optax.Params  # θ_src: the parameters given to `init`
    prior_mean: optax.Params  # μ_src (the source weights until `petal_set_prior`)
    prior_variance: optax.Params  # σ²_src, float32 (ones until `petal_set_prior`)
    teacher: optax.Params  # θ_T, float32 for 16-bit parameters
    inner: optax.OptState  # the wrapped optimizer's state
    key: chex.Array | None = None  # uint32 (2,) PRNG key of PETAL-SRes' draws; None for 'fisher'


def _count_at_most(leaves, bits) -> jax.Array:
    """Number of entries whose float32 bit pattern is at most `bits` (non-negative values)."""
    total = jnp.zeros([], jnp.int32)
    for x in leaves:
        total = total + jnp.sum(jax.lax.bitcast_convert_type(x, jnp.int32) <= bits, dtype=jnp.int32)
    return total


def _global_quantile(leaves: list, q) -> jax.Array:
    """The `q`-quantile, linear interpolation, of all entries of non-negative float32 `leaves`.

    Equal to ``jnp.quantile(concatenate(leaves), q)`` without sorting: the order statistics
    ``x_(k)`` and ``x_(k+1)``, ``k = ⌊q (n − 1)⌋``, are found by bisection on the float32 bit
    pattern (monotone for non-negative floats), 32 counting passes, then one more pass.
    """
    n = sum(x.size for x in leaves)
    pos = jnp.asarray(q, _f32) * (n - 1)
    k = jnp.floor(pos).astype(jnp.int32)
    frac = pos - k.astype(_f32)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = _count_at_most(leaves, mid) >= k + 1
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    inf_bits = jnp.asarray(0x7F800000, jnp.int32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros([], jnp.int32), inf_bits))
    x_lo = jax.lax.bitcast_convert_type(lo, _f32)
    above = [jnp.min(jnp.where(x > x_lo, x, jnp.inf)) for x in leaves]
    next_up = jnp.min(jnp.stack(above))
    x_hi = jnp.where(_count_at_most(leaves, lo) >= k + 2, x_lo, next_up)
    return jnp.where(frac > 0, x_lo + frac * (x_hi - x_lo), x_lo)


def _teacher_dtype(p) -> Any:
    return _f32 if jnp.dtype(p.dtype).itemsize < 4 else p.dtype


def petal(
    inner: optax.GradientTransformation,
    *,
    restore_quantile: chex.Numeric = 0.03,
    prior_weight: chex.Numeric = 1e-9,
    teacher_decay: chex.Numeric = 0.999,
    variance_eps: chex.Numeric = 1e-6,
    restore: Literal["fisher", "random"] = "fisher",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """PETAL around a whole optimizer: prior gradient, inner step, teacher EMA, FIM-based restore.

    See the module docstring for the four steps. The quantile is taken over every entry of the
    model (a global reduction, like `optax.clip_by_global_norm`), so entries whose squared
    gradient is in the bottom `restore_quantile` fraction return to their source values.

    Args:
        inner: The whole optimizer, e.g. ``optax.adam(1e-3)``; its update is the inner step.
        restore_quantile: ``q`` in [0, 1]; 0 restores nothing. With ``restore='random'``, the
            probability that each entry is restored.
        prior_weight: ``w_p`` ≥ 0 of the prior ``w_p · ½ Σ (θ − μ)² / (σ² + eps)``.
        teacher_decay: ``m`` in [0, 1] of the teacher's EMA; 1 freezes the teacher.
        variance_eps: ``eps`` added to the prior variance.
        restore: ``'fisher'`` (PETAL: the entries with the smallest squared gradient) or
            ``'random'`` (PETAL-SRes: an independent Bernoulli(``q``) draw per entry and step,
            from a key kept in the state). Static.
        seed: Seed of PETAL-SRes' key (unused with ``'fisher'``). Static.

    Returns:
        A transform whose state is a `PetalState`; `update` needs `params`. Nothing may follow
        it in the chain (its output is the final update).

    Raises:
        ValueError: for hyper-parameters out of range.
        TypeError: when `inner` is not a gradient transformation.

    Notes:
        Restored entries land on ``θ + (θ_src − θ)``, which equals ``θ_src`` up to one float
        rounding (exactly when ``θ`` and ``θ_src`` are within a factor 2). Without SWAG moments
        (`petal_set_prior`), ``μ = θ_src`` and ``σ² = 1``: the prior is L2 to the source.

    Example:
        >>> tx = cljax.petal(optax.adam(1e-3))
        >>> state = tx.init({"w": jnp.ones(3)})

    References:
        Brahma and Rai, "A Probabilistic Framework for Lifelong Test-Time Adaptation", CVPR 2023.
        https://arxiv.org/abs/2212.09713
    """
    fn = "petal"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_in_range(fn, "restore_quantile", restore_quantile, 0.0, 1.0)
    _checks.check_in_range(fn, "prior_weight", prior_weight, 0.0, math.inf)
    _checks.check_in_range(fn, "teacher_decay", teacher_decay, 0.0, 1.0)
    _checks.check_in_range(fn, "variance_eps", variance_eps, 0.0, math.inf, low_inclusive=False)
    _checks.check_choice(fn, "restore", restore, _RESTORES)
    _checks.check_int(fn, "seed", seed, 0)
    randomized = restore == "random"
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params):
        return PetalState(
            source=_common.copy_tree(params),
            prior_mean=_common.copy_tree(params),
            prior_variance=optax.tree.ones_like(params, dtype=_f32),
            teacher=jax.tree.map(
                lambda p: jnp.array(p, dtype=_teacher_dtype(p), copy=True), params
            ),
            inner=inner_tx.init(params),
            key=jax.random.key_data(jax.random.key(seed)) if randomized else None,
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params(fn, params)

        def with_prior(g, p, mu, var):
            if g is None:
                return None
            pull = prior_weight * (_common.f32(p) - _common.f32(mu)) / (var + variance_eps)
            return (_common.f32(g) + pull).astype(g.dtype)

        grads = jax.tree.map(
            with_prior,
            updates,
            params,
            state.prior_mean,
            state.prior_variance,
            is_leaf=_common.is_none,
        )
        if randomized:
            key, draw = jax.random.split(jax.random.wrap_key_data(state.key))
            leaves, treedef = jax.tree.flatten(grads)
            q = jnp.asarray(restore_quantile, _f32)
            masks = [
                jax.random.uniform(jax.random.fold_in(draw, i), jnp.shape(g), _f32) < q
                for i, g in enumerate(leaves)
            ]
            restore_mask = jax.tree.unflatten(treedef, masks)
            new_key = jax.random.key_data(key)
        else:
            fisher = jax.tree.map(lambda g: jnp.square(_common.f32(g)), grads)
            flat = [f for f in jax.tree.leaves(fisher) if f.size]
            tau = _global_quantile(flat, restore_quantile) if flat else jnp.zeros([], _f32)
            restore_mask = jax.tree.map(lambda f: f < tau, fisher)
            new_key = state.key
        out, inner_state = inner_tx.update(grads, state.inner, params, **extra_args)

        def teacher_leaf(t, p, u):
            if u is None:
                return t
            new = _common.f32(p) + _common.f32(u)
            return (teacher_decay * _common.f32(t) + (1.0 - teacher_decay) * new).astype(t.dtype)

        teacher = jax.tree.map(teacher_leaf, state.teacher, params, out)

        def restore_leaf(u, m, p, src):
            if u is None:
                return None
            back = (_common.f32(src) - _common.f32(p)).astype(u.dtype)
            return jnp.where(m, back, u)

        restored = jax.tree.map(
            restore_leaf, out, restore_mask, params, state.source, is_leaf=_common.is_none
        )
        return restored, state._replace(teacher=teacher, inner=inner_state, key=new_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def petal_teacher(opt_state: Any, *, index: int | None = None) -> Any:
    """Returns the teacher parameters ``θ_T`` held in the `PetalState` of `opt_state`.

    Args:
        opt_state: The whole optimizer state holding one `PetalState`.
        index: Which `PetalState` when `opt_state` holds several (tree order).

    Raises:
        ValueError: when `opt_state` holds no (or several) `PetalState`.

    Example:
        >>> state = cljax.petal(optax.adam(1e-3)).init({"w": jnp.ones(2)})
        >>> cljax.petal_teacher(state)["w"]
        Array([1., 1.], dtype=float32)
    """
    return _common.find_one("petal_teacher", opt_state, PetalState, index).teacher


def petal_set_prior(opt_state: Any, mean: Any, variance: Any, *, index: int | None = None) -> Any:
    """Sets the source prior ``(μ_src, σ²_src)``, e.g. diagonal SWAG moments from source training.

    Args:
        opt_state: The whole optimizer state holding one `PetalState`.
        mean: ``μ_src``, a tree like the parameters.
        variance: ``σ²_src`` ≥ 0, a tree like the parameters.
        index: Which `PetalState` when `opt_state` holds several (tree order).

    Returns:
        `opt_state` with the prior replaced.

    Raises:
        ValueError: when `opt_state` holds no (or several) `PetalState`, the trees do not
            match the parameters, or `variance` has a negative entry.

    Example:
        >>> params = {"w": jnp.ones(2)}
        >>> state = cljax.petal(optax.adam(1e-3)).init(params)
        >>> state = cljax.petal_set_prior(state, params, {"w": jnp.full(2, 0.1)})
    """
    fn = "petal_set_prior"
    state = _common.find_one(fn, opt_state, PetalState, index)
    for path, v in jax.tree_util.tree_flatten_with_path(variance)[0]:
        if not isinstance(v, jax.core.Tracer) and jnp.size(v) and not float(jnp.min(v)) >= 0.0:
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' of `variance` has a negative or NaN entry."
            )
    mu = _common.map_like_state(
        fn, lambda s, m: jnp.asarray(m).astype(s.dtype), state.prior_mean, {"mean": mean}
    )
    var = _common.map_like_state(
        fn,
        lambda s, v: jnp.asarray(v).astype(s.dtype),
        state.prior_variance,
        {"variance": variance},
    )
    return _common.replace_one(opt_state, state._replace(prior_mean=mu, prior_variance=var), index)


def petal_targets(
    teacher_logits: jax.Array,
    source_logits: jax.Array,
    augmented_teacher_logits: jax.Array,
    *,
    confidence_threshold: chex.Numeric = 0.92,
) -> jax.Array:
    """Returns PETAL's soft targets for one test batch.

    If the source model's mean max-probability over the batch is below
    `confidence_threshold` (``p_a``), the targets are the teacher's softmax averaged over the
    augmentations; otherwise the teacher's plain softmax.

    Args:
        teacher_logits: ``(batch, classes)`` teacher logits on the test batch.
        source_logits: ``(batch, classes)`` source-model logits on the test batch.
        augmented_teacher_logits: ``(num_augmentations, batch, classes)`` teacher logits on
            augmented copies of the batch.
        confidence_threshold: ``p_a`` (0.92 for CIFAR-10-C, 0.72 for CIFAR-100-C in the
            reference configurations).

    Returns:
        ``(batch, classes)`` float32 target probabilities.

    Raises:
        ValueError: when the shapes do not agree.

    Example:
        >>> z = jnp.zeros((2, 3))
        >>> cljax.petal_targets(z, z, jnp.zeros((4, 2, 3))).shape
        (2, 3)
    """
    fn = "petal_targets"
    t, s, a = (jnp.asarray(x) for x in (teacher_logits, source_logits, augmented_teacher_logits))
    if t.ndim != 2 or s.shape != t.shape or a.ndim != 3 or a.shape[1:] != t.shape:
        raise ValueError(
            f"{fn}: needs teacher_logits (batch, classes), source_logits of the same shape and "
            f"augmented_teacher_logits (num_augmentations, batch, classes); got {t.shape}, {s.shape}, {a.shape}."
        )
    confidence = jnp.mean(jnp.max(jax.nn.softmax(s.astype(_f32), axis=-1), axis=-1))
    plain = jax.nn.softmax(t.astype(_f32), axis=-1)
    averaged = jnp.mean(jax.nn.softmax(a.astype(_f32), axis=-1), axis=0)
    return jnp.where(confidence < confidence_threshold, averaged, plain)
