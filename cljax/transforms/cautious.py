"""Cautious-decay family: sign-gated and utility-gated updates.

Every transform here sits **before** `optax.scale_by_learning_rate`: it sees and emits a direction
`d` that points along the gradient (what `optax.scale_by_adam` emits), so "the update agrees with
the gradient" is ``d * g > 0``.

* `cautious` — the cautious-optimizer mask around any inner direction (C-AdamW, C-Lion).
* `add_cautious_weight_decay` — Cautious Weight Decay: decoupled decay only where it agrees with
  the direction.
* `scale_by_grams` — Adam's magnitude with the gradient's sign (Grams).
* `scale_by_adamp` — Adam with the radial component removed for scale-invariant weights (AdamP).
* `scale_by_upgd` — utility-gated, perturbed gradient descent (UPGD).

The ready-made `cljax.cautious_adamw` and `cljax.cwd_adamw` can run each leaf's whole step (Adam,
the cautious mask or decay, the learning rate) as one fused kernel, `cljax.kernels.adam_step`
(their ``impl`` argument); the transforms here, which wrap any inner direction, run in XLA.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax import tree as _tree

__all__ = [
    "AddCautiousWeightDecayState",
    "ScaleByUpgdState",
    "add_cautious_weight_decay",
    "cautious",
    "scale_by_adamp",
    "scale_by_grams",
    "scale_by_upgd",
]

Normalization = Literal["mean_clamp", "mean_eps", "numel_sum", "none"]
MaskSource = Literal["direction", "momentum"]
_NORMALIZATIONS = ("mean_clamp", "mean_eps", "numel_sum", "none")
_MASK_SOURCES = ("direction", "momentum")


def _agree(a: jax.Array, b: jax.Array, *, strict: bool) -> jax.Array:
    """Returns ``1[a * b > 0]`` (strict) or ``1[a * b >= 0]`` as a boolean array.

    Written with signs so that products too small for the dtype do not underflow to a tie.
    """
    product = jnp.sign(a).astype(jnp.float32) * jnp.sign(b).astype(jnp.float32)
    return product > 0 if strict else product >= 0


# ---------------------------------------------------------------------------------------------
# CA-01: cautious mask.


def _cautious_leaf(d, g, ref, normalization: str, clamp):
    if d is None:
        return None
    if d.size == 0:
        return d
    mask = _agree(ref, g, strict=True).astype(jnp.float32)
    if normalization == "mean_clamp":
        scale = 1.0 / jnp.maximum(jnp.mean(mask), clamp)
    elif normalization == "mean_eps":
        scale = 1.0 / (jnp.mean(mask) + clamp)
    elif normalization == "numel_sum":
        scale = d.size / (jnp.sum(mask) + 1.0)
    else:
        scale = jnp.float32(1.0)
    return (d.astype(jnp.float32) * (mask * scale)).astype(d.dtype)


def _has_mu(state: Any) -> bool:
    return isinstance(state, tuple) and "mu" in getattr(state, "_fields", ())


def cautious(
    inner: optax.GradientTransformation,
    *,
    normalization: Normalization = "mean_clamp",
    clamp: chex.Numeric = 1e-3,
    mask_source: MaskSource = "direction",
) -> optax.GradientTransformationExtraArgs:
    """Zeroes the coordinates of `inner`'s direction whose sign disagrees with the gradient.

    Per tensor, with `inner`'s direction `d` and the incoming gradient `g`:
    ``phi = 1[d * g > 0]`` (strict: zero gradients are masked out) and
    ``d_out = d * phi / max(mean(phi), clamp)``, so the update keeps its average magnitude.

    Place it before `optax.scale_by_learning_rate` and before any weight decay, wrapping only the
    direction transform (wrapping a full `optax.adamw` would also mask its decay).

    Args:
        inner: The direction transform, e.g. `optax.scale_by_adam()` or `optax.scale_by_lion()`.
        normalization: ``'mean_clamp'`` (C-AdamW, the default): ``phi / max(mean(phi), clamp)``;
            ``'mean_eps'`` (the paper's Algorithm 1): ``phi / (mean(phi) + clamp)``;
            ``'numel_sum'`` (the first C-Lion): ``phi * numel / (sum(phi) + 1)``; ``'none'``: ``phi``.
            Static.
        clamp: The clamp (or epsilon) of the mean normalisations.
        mask_source: ``'direction'`` (default) tests ``d * g > 0``; ``'momentum'`` tests
            ``mu * g > 0`` on the first moment `mu` of the single state in `inner` that has one,
            as C-AdamW's reference code does (identical to ``'direction'`` for Adam). Static.

    Returns:
        A transform whose state is `inner`'s state, unchanged in structure.

    Example:
        >>> tx = optax.chain(cljax.cautious(optax.scale_by_adam()),
        ...                  optax.add_decayed_weights(1e-4), optax.scale_by_learning_rate(1e-3))

    References:
        Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", 2024.
        https://arxiv.org/abs/2411.16085
    """
    _checks.check_transform("cautious", "inner", inner)
    _checks.check_choice("cautious", "normalization", normalization, _NORMALIZATIONS)
    _checks.check_choice("cautious", "mask_source", mask_source, _MASK_SOURCES)
    _checks.check_in_range("cautious", "clamp", clamp, 0.0, math.inf, low_inclusive=False)

    def init_fn(params):
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        direction, new_state = optax.with_extra_args_support(inner).update(
            updates, state, params, **extra_args
        )
        if mask_source == "momentum":
            found = _tree.find_states(new_state, _has_mu)
            if len(found) != 1:
                raise ValueError(
                    "cautious(mask_source='momentum'): `inner` must hold exactly one state with a "
                    f"`mu` field (a first moment); found {len(found)}. Use mask_source='direction'."
                )
            reference = found[0].mu
        else:
            reference = direction
        out = jax.tree.map(
            lambda d, g, r: _cautious_leaf(d, g, r, normalization, clamp),
            direction,
            updates,
            reference,
            is_leaf=lambda x: x is None,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# CA-02: cautious weight decay.


class AddCautiousWeightDecayState(NamedTuple):
    """State of `add_cautious_weight_decay` with a scheduled `weight_decay`."""

    count: chex.Array  # int32 step count fed to the schedule


def _cautious_decay_leaf(d, p, sign_source, strength):
    """``d + strength * 1[sign_source * p >= 0] * p``: CWD on one leaf (None passes through)."""
    if d is None:
        return None
    decay = jnp.where(_agree(sign_source, p, strict=False), strength * p, jnp.zeros_like(p))
    return (d + decay).astype(d.dtype)


def add_cautious_weight_decay(
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Adds decoupled weight decay only where the direction already shrinks the weight.

    Emits ``d + weight_decay * 1[d * p >= 0] * p``: the mask comes from the incoming direction `d`
    (before any decay) and the parameters `p`; ties (``d = 0`` or ``p = 0``) are decayed. Place it
    after the base direction and before `optax.scale_by_learning_rate`, so the effective decay is
    ``learning_rate * weight_decay`` as in `optax.adamw`.

    Args:
        weight_decay: The decay strength, a float or a schedule of the step count.
        mask: As in `optax.add_decayed_weights`: a boolean tree or a function of the params,
            True where decay applies (e.g. ``cljax.exclude("bias|scale")``).

    Returns:
        A transform with an empty state (a step count when `weight_decay` is a schedule).

    Example:
        >>> tx = optax.chain(optax.scale_by_adam(), cljax.add_cautious_weight_decay(0.1),
        ...                  optax.scale_by_learning_rate(1e-3))

    References:
        Chen et al., "Cautious Weight Decay", 2025. https://arxiv.org/abs/2510.12402
    """
    if not callable(weight_decay):
        _checks.check_in_range("add_cautious_weight_decay", "weight_decay", weight_decay, 0.0)

    def init_fn(params):
        del params
        if callable(weight_decay):
            return AddCautiousWeightDecayState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params("add_cautious_weight_decay", params)
        if callable(weight_decay):
            strength = weight_decay(state.count)
            state = AddCautiousWeightDecayState(count=optax.safe_increment(state.count))
        else:
            strength = weight_decay

        out = jax.tree.map(
            lambda d, p: _cautious_decay_leaf(d, p, d, strength), updates, params, is_leaf=lambda x: x is None
        )
        return out, state

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    if mask is not None:
        return optax.masked(tx, mask)
    return tx


# ---------------------------------------------------------------------------------------------
# CA-05: Grams.


def scale_by_grams(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    eps_root: chex.Numeric = 0.0,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescales updates to Adam's magnitude with the current gradient's sign (Grams).

    Emits ``sign(g) * |m_hat / (sqrt(v_hat + eps_root) + eps)|`` with Adam's bias-corrected moments.
    Where the momentum disagrees with the gradient the coordinate is flipped, not zeroed; a zero
    gradient gives a zero coordinate. Place it before `optax.scale_by_learning_rate`.

    Args:
        b1, b2, eps, eps_root, mu_dtype: As in `optax.scale_by_adam`.

    Returns:
        A transform whose state is `optax.ScaleByAdamState`.

    References:
        Cao, Li and Song, "Grams: Gradient Descent with Adaptive Momentum Scaling", 2024.
        https://arxiv.org/abs/2412.17107
    """
    _checks.check_in_range("scale_by_grams", "b1", b1, 0.0, 1.0)
    _checks.check_in_range("scale_by_grams", "b2", b2, 0.0, 1.0)
    _checks.check_in_range("scale_by_grams", "eps", eps, 0.0)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        direction, state = adam.update(updates, state, params)
        out = jax.tree.map(
            lambda d, g: None if d is None else (jnp.sign(g).astype(d.dtype) * jnp.abs(d)),
            direction,
            updates,
            is_leaf=lambda x: x is None,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(adam.init, update_fn)


# ---------------------------------------------------------------------------------------------
# OR-08: AdamP.


def _adamp_project(d, w, g, delta, eps, channel_axis: int):
    """Returns ``(d_projected, triggered)`` for one leaf with at least two dims (float32).

    Written with per-channel reductions along the non-channel axes (no transposes): the whole-leaf
    sums are the sums of the per-channel ones, and removing the radial part of a row is
    ``d - w * <w, d> / (|w| + eps)^2``, one broadcast pass over the leaf.
    """
    axis = channel_axis % d.ndim
    rest = tuple(i for i in range(d.ndim) if i != axis)
    row_len = d.size // d.shape[axis]
    keep = lambda x: jnp.expand_dims(x, rest)  # (C,) -> broadcastable to the leaf
    gw_c, gg_c, ww_c, wd_c = (jnp.sum(a * b, axis=rest) for a, b in ((g, w), (g, g), (w, w), (w, d)))
    gw_l, gg_l, ww_l, wd_l = (jnp.sum(x) for x in (gw_c, gg_c, ww_c, wd_c))

    def abs_cos(gw, gg, ww):
        return jnp.abs(gw) / (jnp.maximum(jnp.sqrt(gg), eps) * jnp.maximum(jnp.sqrt(ww), eps))

    channel_hit = jnp.max(abs_cos(gw_c, gg_c, ww_c)) < delta / math.sqrt(row_len)
    layer_hit = abs_cos(gw_l, gg_l, ww_l) < delta / math.sqrt(d.size)
    coef_c = wd_c / jnp.square(jnp.sqrt(ww_c) + eps)
    coef_l = wd_l / jnp.square(jnp.sqrt(ww_l) + eps)
    coef = jnp.where(channel_hit, coef_c, jnp.where(layer_hit, coef_l, jnp.zeros_like(coef_c)))
    return d - w * keep(coef), jnp.logical_or(channel_hit, layer_hit)


def scale_by_adamp(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    delta: chex.Numeric = 0.1,
    wd_ratio: chex.Numeric = 0.1,
    nesterov: bool = False,
    mu_dtype: Any = None,
    channel_axis: int = -1,
) -> optax.GradientTransformationExtraArgs:
    """Adam with the radial component removed for weights that look scale-invariant (AdamP).

    For each leaf with two or more dims, the Adam direction ``p = m / (sqrt(v / bc2) + eps)``
    (Nesterov: ``(b1 m + (1 - b1) g) / (...)``) is tested view by view: per output channel (the
    rows of the leaf along `channel_axis`), then the whole leaf. If the largest ``|cos(g, w)|``
    over the view's rows is below ``delta / sqrt(row length)``, each row of `p` loses its
    component along the same row of `w`, and the decay is scaled by `wd_ratio`. Emits
    ``p / bc1 + weight_decay * wd_scale * w``; scalar and 1-D leaves get plain AdamW.

    Notes:
        PyTorch weights keep output channels first; Flax kernels keep them last, hence
        ``channel_axis=-1``. A stacked ``(L, ...)`` leaf is tested as one tensor, as the
        reference tests each parameter tensor. Cosines clamp each norm at `eps`.

    Args:
        b1, b2, eps: Adam's decay rates and epsilon.
        weight_decay: Decoupled decay strength (effective decay ``learning_rate * weight_decay``).
        delta: Threshold on the cosine between gradient and weight.
        wd_ratio: Decay multiplier for weights found scale-invariant.
        nesterov: Use the Nesterov momentum direction. Static.
        mu_dtype: Dtype of the first moment (default: the parameter's).
        channel_axis: The output-channel axis of the per-channel view. Static: list it in the
            `static_args` of `optax.inject_hyperparams`, which would otherwise trace it.

    Returns:
        A transform whose state is `optax.ScaleByAdamState`.

    References:
        Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
        Weights", ICLR 2021. https://arxiv.org/abs/2006.08217
    """
    fn = "scale_by_adamp"
    _checks.check_in_range(fn, "b1", b1, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "b2", b2, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "eps", eps, 0.0)
    _checks.check_in_range(fn, "weight_decay", weight_decay, 0.0)
    _checks.check_in_range(fn, "delta", delta, 0.0)
    _checks.check_in_range(fn, "wd_ratio", wd_ratio, 0.0)
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise TypeError(f"{fn}(channel_axis=...) must be an int, got {channel_axis!r}.")
    mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None

    def init_fn(params):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        nu = optax.tree.zeros_like(params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t

        def leaf(g, m, v, w):
            if g is None:
                return None
            g32, m32, v32, w32 = (x.astype(jnp.float32) for x in (g, m, v, w))
            denom = jnp.sqrt(v32) / jnp.sqrt(bc2) + eps
            numer = b1 * m32 + (1.0 - b1) * g32 if nesterov else m32
            p = numer / denom
            wd_scale = jnp.float32(1.0)
            if g.ndim >= 2 and g.size > 0:
                p, hit = _adamp_project(p, w32, g32, delta, eps, channel_axis)
                wd_scale = jnp.where(hit, wd_ratio, 1.0)
            return (p / bc1 + weight_decay * wd_scale * w32).astype(g.dtype)

        out = jax.tree.map(leaf, updates, mu, nu, params, is_leaf=lambda x: x is None)
        mu = optax.tree.cast(mu, mu_dtype) if mu_dtype is not None else mu
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# CA-03: UPGD.


class ScaleByUpgdState(NamedTuple):
    """State of `scale_by_upgd`."""

    count: chex.Array  # int32 number of steps taken
    key: chex.Array  # uint32 PRNG key data for the perturbation noise
    utility: optax.Updates  # running utility trace (uncorrected), float32 by default


def _key_data(seed: Any) -> jax.Array:
    """Returns raw uint32 key data from an int seed, a typed key or raw key data."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    arr = jnp.asarray(seed)
    if arr.ndim == 0:
        return jax.random.key_data(jax.random.key(arr))
    return arr.astype(jnp.uint32)


def scale_by_upgd(
    beta_utility: chex.Numeric = 0.999,
    sigma: chex.Numeric = 1e-3,
    *,
    protect: bool = True,
    normalization: Literal["global", "local"] = "global",
    seed: int | jax.Array = 0,
    utility_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Gates the gradient and a Gaussian perturbation by each weight's running utility (UPGD).

    Per weight: instantaneous utility ``u = -g * w``; trace ``U <- beta U + (1 - beta) u``;
    scaled utility ``s = sigmoid((U / (1 - beta^t)) / M)`` with ``M`` the maximum of the
    (uncorrected) trace over **all** leaves; noise ``xi ~ N(0, sigma^2)`` fresh every step.
    Emits ``(g + xi) * (1 - s)`` (``protect=True``, utility controls the gradient) or
    ``g + xi * (1 - s)`` (``protect=False``). Place it before `optax.scale_by_learning_rate`;
    decay goes after it (`optax.add_decayed_weights`), giving the paper's
    ``w <- (1 - lr wd) w - lr (g + xi)(1 - s)``.

    Notes:
        ``M = 0`` (every trace <= 0 with a zero maximum) would divide by zero; cljax then uses
        ``s = sigmoid(0) = 0.5`` everywhere, which keeps the output finite. A negative ``M``
        follows the reference (the gate's meaning flips). ``normalization='local'`` replaces
        ``U / M`` by ``U`` L2-normalised along the last axis, as the reference's local variants.
        The reference skips parameters named "gate"; with optax, route them elsewhere with
        `optax.partition` or `optax.masked`.

    Args:
        beta_utility: Decay of the utility trace, in [0, 1).
        sigma: Standard deviation of the perturbation.
        protect: True for the utility-protected gradient (the paper's UPGD), False for the
            non-protecting variant. Static.
        normalization: ``'global'`` (divide by the global maximum) or ``'local'``. Static.
        seed: An int or a PRNG key for the noise; the key then lives in the state. Static: list
            it in the `static_args` of `optax.inject_hyperparams`.
        utility_dtype: Dtype of the utility trace, a name or dtype (float32 by default: a bf16 trace cannot hold
            ``beta = 0.999`` increments). Static.

    Returns:
        A transform whose state is `ScaleByUpgdState`.

    References:
        Elsayed and Mahmood, "Addressing Loss of Plasticity and Catastrophic Forgetting in
        Continual Learning", ICLR 2024. https://arxiv.org/abs/2404.00781
    """
    fn = "scale_by_upgd"
    _checks.check_in_range(fn, "beta_utility", beta_utility, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "sigma", sigma, 0.0)
    _checks.check_choice(fn, "normalization", normalization, ("global", "local"))
    if not isinstance(protect, bool):
        raise TypeError(f"{fn}(protect=...) must be a bool, got {protect!r}.")
    key0 = _key_data(seed)

    def init_fn(params):
        utility = optax.tree.zeros_like(params, dtype=utility_dtype)
        return ScaleByUpgdState(count=jnp.zeros([], jnp.int32), key=key0, utility=utility)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        beta = jnp.asarray(beta_utility, jnp.float32)
        utility = jax.tree.map(
            lambda u, g, w: None
            if g is None
            else (beta * u.astype(jnp.float32) - (1.0 - beta) * g.astype(jnp.float32) * w.astype(jnp.float32)).astype(u.dtype),
            state.utility,
            updates,
            params,
            is_leaf=lambda x: x is None,
        )
        count = optax.safe_increment(state.count)
        bias_correction = 1.0 - beta ** count.astype(jnp.float32)
        leaves = [u for u in jax.tree.leaves(utility) if u.size > 0]
        global_max = (
            jnp.max(jnp.stack([jnp.max(u).astype(jnp.float32) for u in leaves])) if leaves else jnp.float32(0.0)
        )
        key, noise_key = jax.random.split(jax.random.wrap_key_data(state.key))
        noise_keys = optax.tree.split_key_like(noise_key, updates)

        def leaf(g, u, k):
            if g is None:
                return None
            corrected = u.astype(jnp.float32) / bias_correction
            if normalization == "global":
                safe = jnp.where(global_max == 0.0, 1.0, global_max)
                ratio = jnp.where(global_max == 0.0, 0.0, corrected / safe)
            else:
                flat = corrected.reshape(-1) if corrected.ndim == 0 else corrected
                norm = jnp.linalg.norm(flat, axis=-1, keepdims=True)
                ratio = (flat / jnp.maximum(norm, 1e-12)).reshape(corrected.shape)
            gate = jax.nn.sigmoid(-ratio)  # = 1 - sigmoid(ratio), without cancellation near 1
            noise = sigma * jax.random.normal(k, g.shape, jnp.float32)
            g32 = g.astype(jnp.float32)
            out = (g32 + noise) * gate if protect else g32 + noise * gate
            return out.astype(g.dtype)

        out = jax.tree.map(leaf, updates, utility, noise_keys, is_leaf=lambda x: x is None)
        new_state = ScaleByUpgdState(count=count, key=jax.random.key_data(key), utility=utility)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
