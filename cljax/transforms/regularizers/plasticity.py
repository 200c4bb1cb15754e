"""Plasticity methods: shrink-and-perturb and continual backpropagation.

* `shrink_perturb` — ``θ ← λ_s θ + σ ε`` on a parameter tree, at a task boundary (CA-08).
* `add_shrink_perturb` — the same every `every` steps, as the last transform of a chain (the
  "L2 + perturbation" baseline of the loss-of-plasticity study when ``every = 1``).
* `continual_backprop` — wraps an optimizer and, after each step, re-initialises a small
  fraction of mature, low-utility hidden units of a Dense stack (CA-04, generate-and-test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cljax import _checks
from cljax.transforms.regularizers import _common

__all__ = [
    "AddShrinkPerturbState",
    "CbpLayer",
    "ContinualBackpropState",
    "add_shrink_perturb",
    "continual_backprop",
    "shrink_perturb",
]

_f32 = jnp.float32
_SQRT2 = math.sqrt(2.0)  # He-uniform gain for ReLU


def _key_data(fn: str, seed: Any) -> jax.Array:
    """Raw uint32 key data from an int seed, a typed key or raw key data."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    if isinstance(seed, bool):
        raise TypeError(f"{fn}(seed=...) must be an int or a PRNG key, got {seed!r}.")
    if isinstance(seed, int):
        return jax.random.key_data(jax.random.key(seed))
    arr = jnp.asarray(seed)
    if arr.dtype != jnp.uint32 or arr.ndim != 1:
        raise TypeError(
            f"{fn}(seed=...) must be an int or a PRNG key, got {type(seed).__name__} {arr.dtype}{arr.shape}."
        )
    return arr


# ---------------------------------------------------------------------------------------------
# CA-08: shrink and perturb.


def _shrink_perturb_leaves(params, key, shrink, noise_scale, noise):
    if noise is None:
        keys = optax.tree.split_key_like(key, params)
        noise = jax.tree.map(lambda p, k: jax.random.normal(k, jnp.shape(p), _f32), params, keys)
    return jax.tree.map(
        lambda p, n: (shrink * _common.f32(p) + noise_scale * _common.f32(n)).astype(p.dtype),
        params,
        noise,
    )


def shrink_perturb(
    params: Any,
    key: jax.Array | None = None,
    *,
    shrink: chex.Numeric,
    noise_scale: chex.Numeric,
    noise: Any = None,
) -> Any:
    """Returns ``shrink · θ + noise_scale · ε`` leaf by leaf (shrink and perturb).

    ``ε ~ N(0, I)`` drawn from `key`, or the tree `noise` when given (e.g. a freshly initialised
    copy of the model, for noise from the initialisation distribution). Call it on the
    parameters at a task boundary (warm-starting); reset or keep the optimizer state separately.

    Args:
        params: The parameters.
        key: PRNG key for Gaussian noise; unused with `noise`.
        shrink: ``λ_s``, in [0, 1] (1 keeps the weights).
        noise_scale: ``σ`` ≥ 0.
        noise: Optional tree shaped like `params` used as ``ε``.

    Returns:
        A tree like `params`, in each leaf's dtype.

    Raises:
        ValueError: for `shrink` outside [0, 1], a negative `noise_scale`, neither `key` nor
            `noise`, or a `noise` tree that does not match `params`.

    Example:
        >>> params = {"w": jnp.ones(2)}
        >>> cljax.shrink_perturb(params, jax.random.key(0), shrink=0.5, noise_scale=0.0)["w"]
        Array([0.5, 0.5], dtype=float32)

    References:
        Ash and Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020.
        https://arxiv.org/abs/1910.08475
    """
    fn = "shrink_perturb"
    _checks.check_in_range(fn, "shrink", shrink, 0.0, 1.0)
    _checks.check_in_range(fn, "noise_scale", noise_scale, 0.0, math.inf)
    if noise is None and key is None:
        raise ValueError(f"{fn}: pass `key` (Gaussian noise) or `noise` (a tree like `params`).")
    if noise is not None:
        _checks.check_same_structure(fn, params=params, noise=noise)
    return _shrink_perturb_leaves(params, key, shrink, noise_scale, noise)


class AddShrinkPerturbState(NamedTuple):
    """State of `add_shrink_perturb`."""

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data


def add_shrink_perturb(
    shrink: chex.Numeric, noise_scale: chex.Numeric, *, every: int = 1, seed: int | jax.Array = 0
) -> optax.GradientTransformationExtraArgs:
    """Shrinks and perturbs the *new* parameters every `every` steps, as an update.

    On steps ``every, 2·every, ...`` it emits ``u' = shrink·(θ + u) + σ ε − θ``, so the step
    lands on ``shrink·θ⁺ + σ ε`` with ``θ⁺ = θ + u``; other steps pass `u` unchanged. Place it
    **last** in the chain (after the learning rate). The periodic work runs under `lax.cond`.

    Args:
        shrink: ``λ_s`` in [0, 1].
        noise_scale: ``σ`` ≥ 0.
        every: Steps between applications. Static.
        seed: Int seed or PRNG key of the noise. Static.

    Returns:
        A transform whose state is an `AddShrinkPerturbState`; `update` needs `params`.

    Raises:
        ValueError: for `shrink` outside [0, 1], a negative `noise_scale`, ``every < 1``.

    Example:
        >>> tx = optax.chain(optax.sgd(0.1), cljax.add_shrink_perturb(0.999, 1e-4))

    References:
        Ash and Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020.
        https://arxiv.org/abs/1910.08475
    """
    fn = "add_shrink_perturb"
    _checks.check_in_range(fn, "shrink", shrink, 0.0, 1.0)
    _checks.check_in_range(fn, "noise_scale", noise_scale, 0.0, math.inf)
    _checks.check_int(fn, "every", every, 1)
    key0 = _key_data(fn, seed)

    def init_fn(params):
        del params
        return AddShrinkPerturbState(count=jnp.zeros([], jnp.int32), key=key0)

    def apply(operand):
        # Defined once per transform, every array passed as an operand: `lax.cond` then reuses
        # its trace from call to call, also outside `jit`.
        u, p, key, lam, sigma = operand
        leaves, treedef = jax.tree.flatten(u)
        p_leaves = treedef.flatten_up_to(p)
        sizes = [x.size for x in leaves]
        noise = jax.random.normal(jax.random.wrap_key_data(key), (max(sum(sizes), 1),), _f32)
        out, start = [], 0
        for uu, pp, size in zip(leaves, p_leaves, sizes, strict=True):
            eps = noise[start : start + size].reshape(uu.shape)
            start += size
            new = _common.f32(pp) + _common.f32(uu)
            out.append((lam * new + sigma * eps - _common.f32(pp)).astype(uu.dtype))
        return jax.tree.unflatten(treedef, out)

    def keep(operand):
        return operand[0]

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params(fn, params)
        count = optax.safe_increment(state.count)
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        operand = (
            updates,
            params,
            jax.random.key_data(sub),
            jnp.asarray(shrink, _f32),
            jnp.asarray(noise_scale, _f32),
        )
        if every == 1:
            out = apply(operand)
        else:
            out = lax.cond(count % every == 0, apply, keep, operand)
        return out, AddShrinkPerturbState(count=count, key=jax.random.key_data(key))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# CA-04: continual backpropagation.


class CbpLayer(NamedTuple):
    """One hidden layer of a Dense stack for `continual_backprop`, by parameter path.

    Paths are the strings of `cljax.select` (``'Dense_0/kernel'``). Kernels use the Flax layout
    ``(d_in, d_out)``: the hidden units are the columns of `kernel` and the rows of `next_kernel`.
    Without `next_kernel` (units read outside the tree) the utility is the mean absolute
    activation alone.
    """

    kernel: str  # incoming kernel (d_in, units)
    bias: str | None = None  # incoming bias (units,)
    next_kernel: str | None = None  # outgoing kernel (units, d_out)
    next_bias: str | None = (
        None  # outgoing bias (d_out,), receives the mean-activation compensation
    )


class ContinualBackpropState(NamedTuple):
    """State of `continual_backprop`: per hidden layer, one entry per unit."""

    utility: tuple  # (units,) float32 running contribution utility (uncorrected)
    mean_activation: tuple  # (units,) float32 running mean activation (uncorrected)
    age: tuple  # (units,) int32 steps since the unit was (re)initialised
    pending: tuple  # () float32 accumulated fractional replacements
    key: chex.Array  # uint32 PRNG key data for re-initialisation
    inner: optax.OptState  # the wrapped optimizer's state


def _paths(params) -> dict[str, tuple[int, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        jax.tree_util.keystr(tuple(path), simple=True, separator="/"): (i, leaf)
        for i, (path, leaf) in enumerate(leaves)
    }


def _resolve(fn: str, layers: Sequence[CbpLayer], params) -> list[dict[str, Any]]:
    """Checks the layer paths against `params`; returns per layer its leaf indices and sizes."""
    table = _paths(params)
    out = []
    for n, layer in enumerate(layers):

        def get(field, ndim, layer=layer, n=n):
            path = getattr(layer, field)
            if path is None:
                return None, None
            if path not in table:
                raise ValueError(
                    f"{fn}: layers[{n}].{field} = {path!r} is not a parameter path; paths are "
                    f"{sorted(table)[:8]}{' ...' if len(table) > 8 else ''}."
                )
            i, leaf = table[path]
            if jnp.ndim(leaf) != ndim:
                raise ValueError(
                    f"{fn}: leaf '{path}' (layers[{n}].{field}) has shape {jnp.shape(leaf)}; it must have "
                    f"{ndim} dims (Flax Dense layout)."
                )
            return i, jnp.shape(leaf)

        k, kshape = get("kernel", 2)
        units = kshape[1]
        b, bshape = get("bias", 1)
        nk, nkshape = get("next_kernel", 2)
        nb, nbshape = get("next_bias", 1)
        if bshape is not None and bshape != (units,):
            raise ValueError(
                f"{fn}: leaf '{layer.bias}' has shape {bshape}; the layer has {units} units, so it needs ({units},)."
            )
        if nkshape is not None and nkshape[0] != units:
            raise ValueError(
                f"{fn}: leaf '{layer.next_kernel}' has shape {nkshape}; its rows must be the {units} units of '{layer.kernel}'."
            )
        if nbshape is not None:
            if nkshape is None:
                raise ValueError(f"{fn}: layers[{n}] has a next_bias but no next_kernel.")
            if nbshape != (nkshape[1],):
                raise ValueError(
                    f"{fn}: leaf '{layer.next_bias}' has shape {nbshape}; it needs ({nkshape[1]},)."
                )
        out.append(
            {
                "kernel": k,
                "bias": b,
                "next_kernel": nk,
                "next_bias": nb,
                "units": units,
                "fan_in": kshape[0],
            }
        )
    return out


def continual_backprop(
    inner: optax.GradientTransformation,
    layers: Sequence[CbpLayer],
    *,
    replacement_rate: chex.Numeric = 1e-4,
    maturity: int = 100,
    decay: chex.Numeric = 0.99,
    max_replacements: int = 1,
    init_gain: chex.Numeric = _SQRT2,
    reset_moments: bool = True,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Continual backprop: an optimizer step, then re-initialise mature low-utility hidden units.

    `update` takes the keyword-only extra argument ``activations``: one array per entry of
    `layers`, the hidden layer's outputs on this step's batch, shape ``(..., units)``. After
    `inner`'s step ``θ⁺ = θ + u``, per hidden layer and unit ``i`` (reference "contribution"
    utility):

    * ``a_i += 1``; ``f̄_i ← η f̄_i + (1 − η) mean h_i``;
    * ``u_i ← η u_i + (1 − η) · mean_k |W⁺_out[i, k]| · mean |h_i|``; ``û_i = u_i / (1 − η^{a_i})``;
    * ``pending += ρ · #{a_i > m}``; ``n = min(⌊pending⌋, max_replacements, #eligible)``;
      ``pending −= n``; the ``n`` eligible units with the smallest ``û`` are replaced:
      incoming column ``~ U(−b, b)`` with ``b = gain·√(3/d_in)``, incoming bias 0, next bias
      ``+= W⁺_out[i, :] · f̄_i / (1 − η^{a_i})``, outgoing row 0, ``a_i = u_i = f̄_i = 0``, and
      (``reset_moments``) every parameter-shaped entry of `inner`'s state at the reset
      weights (Adam's moments) zeroed.

    The replacement runs under `lax.cond`, only on steps that replace something. The result is
    returned as the update, so nothing may follow this transform in the chain.

    Args:
        inner: The whole optimizer, learning rate included, e.g. ``optax.adam(1e-3)``.
        layers: The hidden layers, each a `CbpLayer` of parameter paths. Static.
        replacement_rate: ``ρ``, expected replacements per eligible unit and step.
        maturity: ``m``: units younger than this (``a ≤ m``) are never replaced. Static.
        decay: ``η`` of the running utility and mean activation, in [0, 1).
        max_replacements: Most units replaced per layer per step (the static bound). Static.
        init_gain: ``gain`` of the re-initialisation bound (√2 for ReLU).
        reset_moments: Zero `inner`'s state at the reset weights. Static.
        seed: Int seed or PRNG key for the re-initialisation. Static.

    Returns:
        A transform whose state is a `ContinualBackpropState`; `update` needs `params` and
        ``activations=``.

    Raises:
        ValueError: for bad rates or sizes, layer paths missing from the parameters, or shapes
            that do not form Dense layers (at `init`); for a wrong number or shape of
            activations (at `update`).

    Notes:
        The reference resets per-element Adam step counts; optax's Adam has one scalar count,
        so a reset weight keeps the global bias correction (its first steps are larger than in
        the reference). Fractional replacements accumulate deterministically (the reference's
        accumulating variant), leftovers above `max_replacements` wait for later steps.

    Example:
        >>> params = {"l0": {"kernel": jnp.ones((3, 4))}, "l1": {"kernel": jnp.ones((4, 2))}}
        >>> layer = cljax.CbpLayer(kernel="l0/kernel", next_kernel="l1/kernel")
        >>> tx = cljax.continual_backprop(optax.sgd(0.1), [layer], maturity=10)
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jnp.zeros_like, params)
        >>> updates, state = tx.update(grads, state, params, activations=[jnp.ones((5, 4))])

    References:
        Dohare et al., "Loss of plasticity in deep continual learning", Nature 2024.
        https://arxiv.org/abs/2306.13812
    """
    fn = "continual_backprop"
    _checks.check_transform(fn, "inner", inner)
    if isinstance(layers, CbpLayer) or not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"{fn}(layers=...) must be a non-empty list of CbpLayer, got {layers!r}.")
    for n, layer in enumerate(layers):
        if not isinstance(layer, CbpLayer):
            raise TypeError(f"{fn}(layers=...): entry {n} must be a CbpLayer, got {layer!r}.")
    layers = tuple(layers)
    _checks.check_in_range(fn, "replacement_rate", replacement_rate, 0.0, math.inf)
    _checks.check_in_range(fn, "decay", decay, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "init_gain", init_gain, 0.0, math.inf)
    _checks.check_int(fn, "maturity", maturity, 0)
    _checks.check_int(fn, "max_replacements", max_replacements, 1)
    if not isinstance(reset_moments, bool):
        raise TypeError(f"{fn}(reset_moments=...) must be a bool, got {reset_moments!r}.")
    key0 = _key_data(fn, seed)
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params):
        info = _resolve(fn, layers, params)
        for n, lay in enumerate(info):
            if max_replacements > lay["units"]:
                raise ValueError(
                    f"{fn}(max_replacements=...) must be at most the {lay['units']} units of layers[{n}], got {max_replacements}."
                )
        zeros = lambda lay, dt=_f32: jnp.zeros((lay["units"],), dt)
        return ContinualBackpropState(
            utility=tuple(zeros(lay) for lay in info),
            mean_activation=tuple(zeros(lay) for lay in info),
            age=tuple(zeros(lay, jnp.int32) for lay in info),
            pending=tuple(jnp.zeros([], _f32) for _ in info),
            key=key0,
            inner=inner_tx.init(params),
        )

    def replace(operand):
        # Defined once per transform with every array an operand, so that `lax.cond` reuses its
        # trace from call to call (also outside `jit`).
        out, inner_state, params, stats, reset_key, gain = operand
        info = _resolve(fn, layers, params)
        p_leaves, treedef = jax.tree.flatten(params)
        u_leaves = list(treedef.flatten_up_to(out))
        masks = [False] * len(p_leaves)
        keys = jax.random.split(jax.random.wrap_key_data(reset_key), len(info))
        for n, lay in enumerate(info):
            mean_act, idx, valid, reset, correction = stats[n]
            drop = jnp.where(valid, idx, lay["units"])  # out-of-range: dropped by the scatter
            k = lay["kernel"]
            bound = gain * math.sqrt(3.0 / lay["fan_in"])
            fresh = jax.random.uniform(
                keys[n], (lay["fan_in"], max_replacements), _f32, -bound, bound
            )
            p_k = p_leaves[k]
            delta = (fresh - _common.f32(p_k[:, idx])).astype(u_leaves[k].dtype)
            u_leaves[k] = u_leaves[k].at[:, drop].set(delta, mode="drop")
            masks[k] = jnp.broadcast_to(reset[None, :], p_k.shape)
            if lay["bias"] is not None:
                b = lay["bias"]
                u_leaves[b] = u_leaves[b].at[drop].set(-p_leaves[b][idx], mode="drop")
                masks[b] = reset
            if lay["next_kernel"] is not None:
                nk = lay["next_kernel"]
                w_out = _common.f32(p_leaves[nk]) + _common.f32(u_leaves[nk])
                if lay["next_bias"] is not None:
                    nb = lay["next_bias"]
                    weight = jnp.where(reset, mean_act / correction, 0.0)
                    shift = weight @ w_out
                    u_leaves[nb] = (_common.f32(u_leaves[nb]) + shift).astype(u_leaves[nb].dtype)
                u_leaves[nk] = u_leaves[nk].at[drop, :].set(-p_leaves[nk][idx, :], mode="drop")
                masks[nk] = jnp.broadcast_to(reset[:, None], p_leaves[nk].shape)
        if reset_moments:
            mask_tree = jax.tree.unflatten(treedef, masks)
            inner_state = optax.tree_map_params(
                inner_tx,
                lambda s, m: (
                    s
                    if m is False or not hasattr(s, "shape")
                    else jnp.where(m, jnp.zeros_like(s), s)
                ),
                inner_state,
                mask_tree,
                transform_non_params=lambda s: s,
            )
        return jax.tree.unflatten(treedef, u_leaves), inner_state

    def skip(operand):
        return operand[0], operand[1]

    def update_fn(updates, state, params=None, *, activations, **extra_args):
        _checks.require_params(fn, params)
        info = _resolve(fn, layers, params)
        if not isinstance(activations, (list, tuple)) or len(activations) != len(layers):
            raise ValueError(
                f"{fn}: `activations` must be a list with one array per layer ({len(layers)}), got "
                f"{type(activations).__name__} of length {len(activations) if isinstance(activations, (list, tuple)) else '-'}."
            )
        out, inner_state = inner_tx.update(updates, state.inner, params, **extra_args)
        p_leaves, treedef = jax.tree.flatten(params)
        u_leaves = treedef.flatten_up_to(out)
        eta = jnp.asarray(decay, _f32)
        key, reset_key = jax.random.split(jax.random.wrap_key_data(state.key))

        stats = []  # per layer: utility, mean_activation, age, pending, chosen indices, valid, correction
        for n, lay in enumerate(info):
            h = jnp.asarray(activations[n])
            if h.ndim < 1 or h.shape[-1] != lay["units"]:
                raise ValueError(
                    f"{fn}: activations[{n}] has shape {h.shape}; layer '{layers[n].kernel}' has "
                    f"{lay['units']} units, so it needs shape (..., {lay['units']})."
                )
            h = h.astype(_f32).reshape(-1, lay["units"])
            age = state.age[n] + 1
            mean_act = eta * state.mean_activation[n] + (1.0 - eta) * jnp.mean(h, axis=0)
            magnitude = jnp.mean(jnp.abs(h), axis=0)
            if lay["next_kernel"] is not None:
                i = lay["next_kernel"]
                w_out = _common.f32(p_leaves[i]) + _common.f32(u_leaves[i])
                magnitude = magnitude * jnp.mean(jnp.abs(w_out), axis=1)
            utility = eta * state.utility[n] + (1.0 - eta) * magnitude
            correction = 1.0 - eta ** age.astype(_f32)
            eligible = age > maturity
            n_eligible = jnp.sum(eligible).astype(_f32)
            pending = state.pending[n] + replacement_rate * n_eligible
            count = jnp.minimum(
                jnp.minimum(jnp.floor(pending), float(max_replacements)), n_eligible
            )
            pending = pending - count
            count = count.astype(jnp.int32)
            scores = jnp.where(eligible, utility / correction, jnp.inf)
            _, idx = lax.top_k(-scores, max_replacements)
            valid = jnp.arange(max_replacements, dtype=jnp.int32) < count
            reset = jnp.zeros((lay["units"],), bool).at[idx].max(valid)
            stats.append((utility, mean_act, age, pending, idx, valid, reset, correction))

        any_reset = jnp.any(jnp.stack([jnp.any(st[6]) for st in stats]))
        cond_stats = tuple((st[1], st[4], st[5], st[6], st[7]) for st in stats)
        operand = (
            out,
            inner_state,
            params,
            cond_stats,
            jax.random.key_data(reset_key),
            jnp.asarray(init_gain, _f32),
        )
        out, inner_state = lax.cond(any_reset, replace, skip, operand)
        zero_if = lambda reset, x: jnp.where(reset, jnp.zeros_like(x), x)
        new_state = ContinualBackpropState(
            utility=tuple(zero_if(s[6], s[0]) for s in stats),
            mean_activation=tuple(zero_if(s[6], s[1]) for s in stats),
            age=tuple(zero_if(s[6], s[2]) for s in stats),
            pending=tuple(s[3] for s in stats),
            key=jax.random.key_data(key),
            inner=inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
