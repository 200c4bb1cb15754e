"""Weight averaging during training, and interpolation between trained models.

Averages that run *during* training keep their average in a state: each method comes as small
pure ``*_init`` / ``*_update`` functions (for hand-written loops) and as an optax transform that
passes updates through unchanged and folds the post-step parameters ``params + updates`` into its
state (place it **last** in the chain, after the learning rate). ``optax.ema`` cannot do this: it
averages updates, not parameters. A ``*_params`` reader returns the average from its own state or
from a whole optimizer state, found by type.

* MG-07 / MG-12 / MG-13 — parameter EMA (momentum weight interpolation, temporal ensembles, the
  slow adapter of I-LoRA): `ema_init`, `ema_update`, `ema_params`, `track_ema`.
* MG-10 / MG-14 — running-mean averaging (SWA; ZSCL's weight ensemble): `swa_init`, `swa_update`,
  `swa_params`, `track_swa`.
* MG-11 — LAWA, the mean of the latest `capacity` snapshots (ring buffer): `lawa_init`,
  `lawa_update`, `lawa_params`, `track_lawa`.
* MG-18 — CoIN's EMA with an adaptive, per-tensor balance weight: `track_coin_ema`.
* MG-13 / MG-14 losses — `ilora_consistency_loss`, `zscl_distillation_loss`.
* MG-19 — backward-compatible weight interpolation: `bcwi_interpolate`, `negative_flip_rate`.

Averages are kept in float32 for bfloat16 / float16 parameters (in the parameter dtype otherwise)
unless `dtype` says otherwise; LAWA's snapshots are exact copies in the parameter dtype and are
averaged in float32 when read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax import tree as _tree

__all__ = [
    "EmaState",
    "LawaState",
    "SwaState",
    "TrackCoinEmaState",
    "bcwi_interpolate",
    "ema_init",
    "ema_params",
    "ema_update",
    "ilora_consistency_loss",
    "lawa_init",
    "lawa_params",
    "lawa_update",
    "negative_flip_rate",
    "swa_init",
    "swa_params",
    "swa_update",
    "track_coin_ema",
    "track_ema",
    "track_lawa",
    "track_swa",
    "zscl_distillation_loss",
]

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _wide(dtype: Any) -> jnp.dtype:
    """float32 for low-precision or non-float dtypes; the dtype itself for float32 / float64."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(_F32)


def _check_dtype(fn: str, dtype: Any) -> None:
    if dtype is None:
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}(dtype=...) must be None or a floating dtype, got {dtype!r}.")


def _average_dtype(leaf: Any, dtype: Any) -> jnp.dtype:
    return jnp.dtype(dtype) if dtype is not None else _wide(leaf.dtype)


def _as_average(params: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda p: jnp.asarray(p).astype(_average_dtype(jnp.asarray(p), dtype)), params
    )


def _post_step(u: Any, p: Any) -> Any:
    """The parameters optax.apply_updates would produce: ``(p + u)`` in ``p``'s dtype."""
    if u is None:
        return p
    p = jnp.asarray(p)
    u = jnp.asarray(u)
    wide = jnp.dtype(jnp.float64) if jnp.float64 in (p.dtype, u.dtype) else jnp.dtype(_F32)
    return (p.astype(wide) + u.astype(wide)).astype(p.dtype)


def _post_step_tree(updates: Any, params: Any) -> Any:
    return jax.tree.map(_post_step, updates, params, is_leaf=lambda x: x is None)


def _count_dtype_zero() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def _check_state(fn: str, state: Any, cls: type, maker: str) -> None:
    if not isinstance(state, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(
            f"{fn}(state=...) must be {article} {cls.__name__} (from `{maker}`), "
            f"got {type(state).__name__}."
        )


def _find(fn: str, state: Any, types: tuple[type, ...], index: int | None) -> Any:
    """Returns `state` itself when it has one of `types`, else the one such sub-state."""
    if isinstance(state, types):
        return state
    try:
        return _tree.find_state(state, types, index=index)
    except (ValueError, TypeError) as err:
        message = str(err)
        if message.startswith("find_state"):
            message = fn + message[len("find_state") :]
        raise type(err)(message) from None


def _fill(fn: str, average: Any, params: Any) -> Any:
    """Casts `average` to the dtypes of `params`, taking leaves it lacks (masked out) from them."""
    if params is None:
        return average
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    try:
        pairs = jax.tree.structure(average, is_leaf=is_masked).flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{fn}: `params` does not have the structure of the averaged parameters ({err})."
        ) from None
    avg_leaves, treedef = jax.tree_util.tree_flatten_with_path(average, is_leaf=is_masked)
    out = []
    for (path, a), p in zip(avg_leaves, pairs, strict=True):
        if is_masked(a):
            out.append(p)
            continue
        p = jnp.asarray(p)
        if a.shape != p.shape:
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {p.shape} in `params` but {a.shape} in the average."
            )
        out.append(a.astype(p.dtype))
    return jax.tree.unflatten(treedef, out)


def _maybe_cond(
    always: bool, pred: jax.Array, fold: Callable[[], Any], keep: Callable[[], Any]
) -> Any:
    """``fold()`` when `always` (static), else ``lax.cond(pred, fold, keep)``."""
    if always:
        return fold()
    return jax.lax.cond(pred, fold, keep)


# ---------------------------------------------------------------------------------------------
# MG-07 / MG-12 / MG-13: parameter EMA.


class EmaState(NamedTuple):
    """State of `ema_init` / `ema_update` and of `track_ema`."""

    step: chex.Array  # int32: updates offered (optimizer steps seen by `track_ema`)
    count: chex.Array  # int32: parameter sets folded into the average
    ema: optax.Params  # the average; starts at the parameters given to `ema_init`


def ema_init(params: optax.Params, *, dtype: Any = None) -> EmaState:
    """Starts a parameter EMA at `params` (the pre-trained or starting weights).

    Args:
        params: The parameters the average starts from (MG-07: the zero-shot model ``θ₀``;
            MG-12: the weights at the start of training).
        dtype: dtype of the average. Default: float32 for bfloat16 / float16 leaves, the leaf's
            own dtype otherwise.

    Returns:
        An `EmaState` with ``step = count = 0`` and ``ema = params``.

    Raises:
        ValueError: when `dtype` is not a floating dtype.

    Example:
        >>> state = cljax.ema_init({"w": jnp.zeros(2)})
        >>> state = cljax.ema_update(state, {"w": jnp.ones(2)}, decay=0.75)
        >>> cljax.ema_params(state)["w"]
        Array([0.25, 0.25], dtype=float32)
    """
    _check_dtype("ema_init", dtype)
    zero = _count_dtype_zero()
    return EmaState(step=zero, count=zero, ema=_as_average(params, dtype))


def _effective_decay(decay: Any, count: jax.Array, debias: bool, warmup: bool) -> jax.Array:
    """The decay applied at the `count`-th fold (``count >= 1``), as float32."""
    tau = jnp.asarray(decay).astype(_F32)
    n = count.astype(_F32)
    if warmup:  # I-LoRA's reference: min(decay, 1 - 1 / (n + 1))
        return jnp.minimum(tau, n / (n + 1.0))
    if debias:  # zero-started EMA divided by (1 - tau^n), written as a decay on the average
        interior = (tau > 0.0) & (tau < 1.0)
        safe = jnp.where(interior, tau, 0.5)
        log_tau = jnp.log(safe)
        numerator = -jnp.expm1((n - 1.0) * log_tau)
        denominator = -jnp.expm1(n * log_tau)
        beta = safe * numerator / denominator
        uniform = (n - 1.0) / n  # the limit tau -> 1: a running mean
        return jnp.where(tau >= 1.0, uniform, jnp.where(tau <= 0.0, jnp.zeros_like(tau), beta))
    return tau


def _ema_fold(count: jax.Array, ema: Any, new: Any, decay: Any, debias: bool, warmup: bool):
    count = optax.safe_increment(count)
    beta = _effective_decay(decay, count, debias, warmup)

    def leaf(e, p):
        b = beta.astype(e.dtype)
        return b * e + (jnp.ones_like(b) - b) * jnp.asarray(p).astype(e.dtype)

    return count, jax.tree.map(leaf, ema, new)


def _check_flags(fn: str, debias: bool, warmup: bool) -> None:
    if debias and warmup:
        raise ValueError(
            f"{fn}(debias=..., warmup=...) are exclusive; set at most one of them to True."
        )


def ema_update(
    state: EmaState,
    params: optax.Params,
    *,
    decay: jax.typing.ArrayLike,
    debias: bool = False,
    warmup: bool = False,
) -> EmaState:
    """Folds `params` into the EMA: ``ema ← β·ema + (1 − β)·params``, leaf by leaf.

    With neither flag ``β = decay`` (the card's rule, ``θ_s ← τ θ_s + (1 − τ) θ_f``). The `n`-th
    call (``n = count + 1``) uses, with ``debias=True``, ``β = τ (1 − τ^(n−1)) / (1 − τ^n)`` — the
    same average as a zero-started EMA divided by ``1 − τ^n`` (Adam / `optax.ema` style; it forgets
    the starting weights after the first call, and tends to a running mean as ``τ → 1``); with
    ``warmup=True``, ``β = min(τ, n / (n + 1))`` as in I-LoRA's reference code.

    Args:
        state: An `EmaState` from `ema_init`.
        params: The new (fast) weights, with the structure and shapes of the average.
        decay: ``τ`` in [0, 1]; 1 keeps the average fixed, 0 copies `params`. May be traced.
        debias: Bias correction (see above). Static.
        warmup: I-LoRA's warm-up (see above). Static.

    Returns:
        The new `EmaState` (``step`` and ``count`` incremented).

    Raises:
        TypeError: when `state` is not an `EmaState`.
        ValueError: when the trees differ in structure or shape, `decay` is outside [0, 1], or
            both flags are set.
    """
    _check_state("ema_update", state, EmaState, "ema_init")
    _checks.check_in_range("ema_update", "decay", decay, 0.0, 1.0)
    _check_flags("ema_update", debias, warmup)
    _checks.check_same_structure("ema_update", ema=state.ema, params=params)
    count, ema = _ema_fold(state.count, state.ema, params, decay, debias, warmup)
    return EmaState(step=optax.safe_increment(state.step), count=count, ema=ema)


def ema_params(
    state: Any, params: optax.Params | None = None, *, index: int | None = None
) -> optax.Params:
    """Returns the EMA parameters from an `EmaState`, a `TrackCoinEmaState` or an optimizer state.

    Args:
        state: An `EmaState` / `TrackCoinEmaState`, or any optimizer state holding exactly one
            of them (nested in `optax.chain`, `optax.masked`, `optax.inject_hyperparams`, ...).
        params: Optional current parameters: the result then takes their dtypes, and leaves the
            average does not hold (masked out with `optax.masked` / `optax.partition`, e.g. the
            frozen base weights of I-LoRA) are taken from them.
        index: Which state to read when the optimizer state holds several (tree order).

    Returns:
        The averaged parameters (in the average's dtype unless `params` is given).

    Raises:
        ValueError: when no such state (or several, without `index`) is found, or `params` does
            not match the average.
    """
    found = _find("ema_params", state, (EmaState, TrackCoinEmaState), index)
    return _fill("ema_params", found.ema, params)


def track_ema(
    decay: optax.ScalarOrSchedule,
    every: int = 1,
    *,
    debias: bool = False,
    warmup: bool = False,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Keeps an exponential moving average of the parameters; updates pass unchanged.

    Every `every` optimizer steps the post-step parameters ``params + updates`` are folded in
    with `ema_update`'s rule: ``ema ← β·ema + (1 − β)·(params + updates)``, leaf by leaf, starting
    from the parameters given to `init`. Place it **last** in the chain (after the learning rate):
    optax calls ``update`` before applying the updates, so only there is ``params + updates`` the
    new parameters. Read the average with `ema_params`; it is never fed back into training.

    Covers MG-07 (momentum weight interpolation: ``init`` at the zero-shot model), MG-12 (temporal
    ensembles: ``init`` at the starting weights) and the slow adapter of MG-13 (I-LoRA: wrap it in
    ``optax.masked(..., cljax.select("lora"))``; the reference code uses ``decay=0.25,
    warmup=True``).

    Args:
        decay: ``τ`` in [0, 1], or a schedule of the step count.
        every: Steps between folds (``k``); folds happen after steps ``k, 2k, ...``. Static.
        debias: Bias correction, see `ema_update`. Static.
        warmup: I-LoRA's warm-up ``β = min(τ, n / (n + 1))``, see `ema_update`. Static.
        dtype: dtype of the average (default float32 for bfloat16 / float16 parameters). Static.

    Returns:
        A transform whose state is an `EmaState`. `update` needs `params`.

    Raises:
        ValueError: for `decay` outside [0, 1], ``every < 1``, both flags, or a bad `dtype`.

    Example:
        >>> tx = optax.chain(optax.sgd(0.1), cljax.track_ema(0.999))
        >>> params = {"w": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        >>> slow = cljax.ema_params(state)

    Notes:
        Batch-norm statistics and other non-parameter model state are not averaged.

    References:
        Stojanovski, Roth and Akata, "Momentum-based Weight Interpolation of Strong Zero-Shot
        Models for Continual Learning", NeurIPS 2022 workshop. https://arxiv.org/abs/2211.03186

        Soutif-Cormerais, Carta and van de Weijer, "Improving Online Continual Learning
        Performance and Stability with Temporal Ensembles", CoLLAs 2023. https://arxiv.org/abs/2306.16817
    """
    if not callable(decay):
        _checks.check_in_range("track_ema", "decay", decay, 0.0, 1.0)
    _checks.check_int("track_ema", "every", every, 1)
    _check_flags("track_ema", debias, warmup)
    _check_dtype("track_ema", dtype)

    def init_fn(params):
        return ema_init(params, dtype=dtype)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params("track_ema", params)
        value = decay(state.step) if callable(decay) else decay
        new = _post_step_tree(updates, params)
        fold = (state.step + 1) % every == 0
        count, ema = _maybe_cond(
            every == 1,
            fold,
            lambda: _ema_fold(state.count, state.ema, new, value, debias, warmup),
            lambda: (state.count, state.ema),
        )
        return updates, EmaState(step=optax.safe_increment(state.step), count=count, ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# MG-10 / MG-14: running mean (SWA, ZSCL weight ensemble).


class SwaState(NamedTuple):
    """State of `swa_init` / `swa_update` and of `track_swa`."""

    step: chex.Array  # int32: updates offered (optimizer steps seen by `track_swa`)
    count: chex.Array  # int32: snapshots in the mean
    average: optax.Params  # mean of the snapshots; the `init` parameters while count is 0


def swa_init(params: optax.Params, *, include_initial: bool = False, dtype: Any = None) -> SwaState:
    """Starts a running mean of parameter snapshots.

    Args:
        params: The current parameters. They are the first snapshot when `include_initial` is
            True; otherwise they are only what `swa_params` returns before the first snapshot.
        include_initial: Count `params` as a snapshot (SWA's Algorithm 1 and ZSCL start their
            average at the initial weights).
        dtype: dtype of the average (default float32 for bfloat16 / float16 parameters).

    Returns:
        A `SwaState` with ``count = 1`` if `include_initial` else 0.

    Raises:
        ValueError: when `dtype` is not a floating dtype.
    """
    _check_dtype("swa_init", dtype)
    count = jnp.asarray(1 if include_initial else 0, jnp.int32)
    return SwaState(step=_count_dtype_zero(), count=count, average=_as_average(params, dtype))


def _swa_fold(count: jax.Array, average: Any, new: Any):
    n = count.astype(_F32)
    keep = n / (n + 1.0)
    take = 1.0 / (n + 1.0)

    def leaf(a, p):
        return keep.astype(a.dtype) * a + take.astype(a.dtype) * jnp.asarray(p).astype(a.dtype)

    return optax.safe_increment(count), jax.tree.map(leaf, average, new)


def swa_update(state: SwaState, params: optax.Params) -> SwaState:
    """Adds a snapshot: ``average ← (n·average + params) / (n + 1)``, ``n ← n + 1``.

    Element-wise, leaf by leaf.

    Args:
        state: A `SwaState` from `swa_init`.
        params: The snapshot, with the structure and shapes of the average.

    Returns:
        The new `SwaState`.

    Raises:
        TypeError: when `state` is not a `SwaState`.
        ValueError: when the trees differ in structure or shape.

    Example:
        >>> state = cljax.swa_init({"w": jnp.zeros(2)})
        >>> for value in (1.0, 2.0, 6.0):
        ...     state = cljax.swa_update(state, {"w": jnp.full(2, value)})
        >>> cljax.swa_params(state)["w"]
        Array([3., 3.], dtype=float32)
    """
    _check_state("swa_update", state, SwaState, "swa_init")
    _checks.check_same_structure("swa_update", average=state.average, params=params)
    count, average = _swa_fold(state.count, state.average, params)
    return SwaState(step=optax.safe_increment(state.step), count=count, average=average)


def swa_params(
    state: Any, params: optax.Params | None = None, *, index: int | None = None
) -> optax.Params:
    """Returns the running-mean parameters from a `SwaState` or an optimizer state holding one.

    Args:
        state: A `SwaState`, or any optimizer state holding exactly one.
        params: Optional current parameters: the result takes their dtypes and their leaves
            where the average holds none (masked out).
        index: Which `SwaState` to read when there are several (tree order).

    Returns:
        The mean of the snapshots (the `init` parameters before the first one).

    Raises:
        ValueError: when no `SwaState` (or several, without `index`) is found, or `params` does
            not match.
    """
    found = _find("swa_params", state, (SwaState,), index)
    return _fill("swa_params", found.average, params)


def track_swa(
    start_step: int = 0,
    every: int = 1,
    *,
    include_initial: bool = False,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Keeps the running mean of periodic parameter snapshots (SWA); updates pass unchanged.

    After optimizer step ``t`` (``t = 1, 2, ...``) the post-step parameters ``params + updates``
    are a snapshot when ``t >= start_step`` and ``(t − start_step) % every == 0``:
    ``average ← (n·average + θ_t) / (n + 1)``, ``n ← n + 1``, element-wise. Nothing is averaged before
    `start_step`. Place it **last** in the chain (after the learning rate); read the average
    with `swa_params`.

    Recipes: the SWA paper's Algorithm 1 (average ``ŵ`` and every ``c``-th iterate after it) is
    ``track_swa(0, c, include_initial=True)`` created at ``ŵ``; the common "from step ``s₀``,
    every ``c`` steps" is ``track_swa(s₀, c)``; ZSCL's weight ensemble (the initial weights, then
    the weights after steps ``1, 1 + I, 1 + 2I, ...``) is ``track_swa(1, I, include_initial=True)``.

    Args:
        start_step: First step whose parameters may be a snapshot (``s₀``). Static.
        every: Steps between snapshots (``c``; one epoch's steps for per-epoch averaging). Static.
        include_initial: Count the parameters given to `init` as the first snapshot. Static.
        dtype: dtype of the average (default float32 for bfloat16 / float16 parameters). Static.

    Returns:
        A transform whose state is a `SwaState`. `update` needs `params`.

    Raises:
        TypeError / ValueError: when `start_step` or `every` is not an int >= 0 / >= 1, or for a
            bad `dtype`.

    Example:
        >>> tx = optax.chain(optax.sgd(0.1), cljax.track_swa(start_step=100, every=10))
        >>> state = tx.init({"w": jnp.ones(3)})

    Notes:
        Batch-norm statistics must be recomputed for the averaged weights (one pass over the
        training data) — outside this transform. The learning-rate schedule (cyclical or constant
        from `start_step`) is the user's.

    References:
        Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
        UAI 2018. https://arxiv.org/abs/1803.05407

        Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
        Vision-Language Models", ICCV 2023. https://arxiv.org/abs/2303.06628
    """
    _checks.check_int("track_swa", "start_step", start_step, 0)
    _checks.check_int("track_swa", "every", every, 1)
    _check_dtype("track_swa", dtype)

    def init_fn(params):
        return swa_init(params, include_initial=include_initial, dtype=dtype)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params("track_swa", params)
        new = _post_step_tree(updates, params)
        t = state.step + 1
        fold = (t >= start_step) & ((t - start_step) % every == 0)
        count, average = _maybe_cond(
            start_step <= 1 and every == 1,
            fold,
            lambda: _swa_fold(state.count, state.average, new),
            lambda: (state.count, state.average),
        )
        return updates, SwaState(
            step=optax.safe_increment(state.step), count=count, average=average
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# MG-11: LAWA.


class LawaState(NamedTuple):
    """State of `lawa_init` / `lawa_update` and of `track_lawa`."""

    step: chex.Array  # int32: updates offered (optimizer steps seen by `track_lawa`)
    count: chex.Array  # int32: snapshots taken; the valid ones are the last min(count, capacity)
    snapshots: optax.Params  # per leaf (capacity, *shape), parameter dtype; slot = count % capacity


def lawa_init(params: optax.Params, *, capacity: int) -> LawaState:
    """Allocates a ring buffer of `capacity` parameter snapshots (LAWA).

    Every slot starts as a copy of `params`, which `lawa_params` returns until the first
    snapshot; shapes never change afterwards, so nothing recompiles.

    Args:
        params: The current parameters.
        capacity: ``k``, the number of latest snapshots averaged. Static.

    Returns:
        A `LawaState` with ``count = 0``.

    Raises:
        TypeError / ValueError: when `capacity` is not an int >= 1.
    """
    _checks.check_int("lawa_init", "capacity", capacity, 1)

    def leaf(p):
        p = jnp.asarray(p)
        return jnp.broadcast_to(p[None], (capacity, *p.shape))

    zero = _count_dtype_zero()
    return LawaState(step=zero, count=zero, snapshots=jax.tree.map(leaf, params))


def _lawa_fold(count: jax.Array, snapshots: Any, new: Any):
    def leaf(buffer, p):
        slot = count % buffer.shape[0]
        p = jnp.asarray(p).astype(buffer.dtype)
        return jax.lax.dynamic_update_index_in_dim(buffer, p, slot, axis=0)

    return optax.safe_increment(count), jax.tree.map(leaf, snapshots, new)


def _stacked_shapes(fn: str, snapshots: Any, params: Any) -> None:
    """Checks `params` against the snapshot buffers (one leading capacity axis)."""
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    if jax.tree.structure(snapshots, is_leaf=is_masked) != jax.tree.structure(
        params, is_leaf=is_masked
    ):
        raise ValueError(
            f"{fn}: `params` has a different tree structure from the snapshots: "
            f"{jax.tree.structure(params)} vs {jax.tree.structure(snapshots)}."
        )
    for (path, s), p in zip(
        jax.tree_util.tree_flatten_with_path(snapshots)[0], jax.tree.leaves(params), strict=True
    ):
        if tuple(s.shape[1:]) != tuple(jnp.shape(p)):
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {tuple(jnp.shape(p))} in `params` but "
                f"{tuple(s.shape[1:])} in the snapshots."
            )


def lawa_update(state: LawaState, params: optax.Params) -> LawaState:
    """Stores `params` as the newest snapshot, overwriting the oldest once the buffer is full.

    Args:
        state: A `LawaState` from `lawa_init`.
        params: The snapshot (e.g. the weights at the end of an epoch).

    Returns:
        The new `LawaState`.

    Raises:
        TypeError: when `state` is not a `LawaState`.
        ValueError: when `params` does not match the snapshots' structure or shapes.

    Example:
        >>> state = cljax.lawa_init({"w": jnp.zeros(2)}, capacity=2)
        >>> for value in (1.0, 2.0, 6.0):
        ...     state = cljax.lawa_update(state, {"w": jnp.full(2, value)})
        >>> cljax.lawa_params(state)["w"]  # mean of the last two snapshots
        Array([4., 4.], dtype=float32)
    """
    _check_state("lawa_update", state, LawaState, "lawa_init")
    _stacked_shapes("lawa_update", state.snapshots, params)
    count, snapshots = _lawa_fold(state.count, state.snapshots, params)
    return LawaState(step=optax.safe_increment(state.step), count=count, snapshots=snapshots)


def _lawa_mean(count: jax.Array, buffer: jax.Array) -> jax.Array:
    capacity = buffer.shape[0]
    valid = jnp.clip(count, 1, capacity)
    wide = _wide(buffer.dtype)
    n = valid.astype(wide)
    slots = jnp.arange(capacity).reshape((capacity,) + (1,) * (buffer.ndim - 1))
    terms = jnp.where(slots < valid, buffer.astype(wide) / n, jnp.zeros((), wide))
    return jnp.sum(terms, axis=0)


def lawa_params(
    state: Any, params: optax.Params | None = None, *, index: int | None = None
) -> optax.Params:
    """Returns the mean of the valid snapshots in a `LawaState` or an optimizer state holding one.

    The element-wise mean runs over the last ``min(count, capacity)`` snapshots, in float32 for
    bfloat16 / float16 parameters; before the first snapshot it is the parameters given to `init`.

    Args:
        state: A `LawaState`, or any optimizer state holding exactly one.
        params: Optional current parameters: the result takes their dtypes and their leaves
            where the buffer holds none (masked out).
        index: Which `LawaState` to read when there are several (tree order).

    Returns:
        The LAWA parameters.

    Raises:
        ValueError: when no `LawaState` (or several, without `index`) is found, or `params` does
            not match.
    """
    found = _find("lawa_params", state, (LawaState,), index)
    average = jax.tree.map(lambda b: _lawa_mean(found.count, b), found.snapshots)
    return _fill("lawa_params", average, params)


def track_lawa(capacity: int, every: int = 1) -> optax.GradientTransformationExtraArgs:
    """Keeps the latest `capacity` parameter snapshots (LAWA); updates pass unchanged.

    After every `every`-th optimizer step the post-step parameters ``params + updates`` are
    written into a fixed ring buffer of `capacity` slots (the oldest is overwritten); `lawa_params`
    returns the mean of the valid slots. Set `every` to the steps per epoch for the paper's
    end-of-epoch snapshots. Place it **last** in the chain (after the learning rate).

    Args:
        capacity: ``k``, the number of latest snapshots averaged. Static.
        every: Steps between snapshots. Static.

    Returns:
        A transform whose state is a `LawaState` (``capacity`` copies of the parameters, in
        their dtype). `update` needs `params`.

    Raises:
        TypeError / ValueError: when `capacity` or `every` is not an int >= 1.

    Example:
        >>> tx = optax.chain(optax.sgd(0.1), cljax.track_lawa(capacity=5, every=100))
        >>> state = tx.init({"w": jnp.ones(3)})

    Notes:
        The buffer holds exact copies (no running sum), so no float32 subtraction error
        accumulates; the price is ``capacity`` parameter copies.

    References:
        Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
        Weight Averaging", 2022. https://arxiv.org/abs/2209.14981
    """
    _checks.check_int("track_lawa", "capacity", capacity, 1)
    _checks.check_int("track_lawa", "every", every, 1)

    def init_fn(params):
        return lawa_init(params, capacity=capacity)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.require_params("track_lawa", params)
        new = _post_step_tree(updates, params)
        fold = (state.step + 1) % every == 0
        count, snapshots = _maybe_cond(
            every == 1,
            fold,
            lambda: _lawa_fold(state.count, state.snapshots, new),
            lambda: (state.count, state.snapshots),
        )
        return updates, LawaState(
            step=optax.safe_increment(state.step), count=count, snapshots=snapshots
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# MG-18: CoIN.


class TrackCoinEmaState(NamedTuple):
    """State of `track_coin_ema`."""

    inner_state: optax.OptState  # the wrapped optimizer's state
    count: chex.Array  # int32: steps taken
    ema: optax.Params  # the EMA parameters
    prev_grads: optax.Params  # the previous step's gradients (zeros before the first step)
    decay: optax.Params  # per leaf, the float32 balance weight β_t used at the last step


def track_coin_ema(
    inner: optax.GradientTransformation,
    *,
    fallback_decay: jax.typing.ArrayLike = 0.99,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer and keeps CoIN's EMA of its parameters with an adaptive balance weight.

    The wrapper passes the gradients to `inner` and returns `inner`'s updates unchanged. After
    step ``t``, per tensor (per leaf), with the post-step weights ``θ_t = params + updates``, the
    gradient ``g_t`` entering the wrapper and the previous EMA ``θ*``:

    ``α = 2 (1 + ‖g_t‖₁) / (‖θ_t − θ*‖₁ · ‖g_t − g_{t−1}‖₁)``; if ``α`` is not in (0, 1) (or is
    not finite) ``α = 1 − fallback_decay``; then ``θ* ← (1 − α) θ* + α θ_t``, i.e. the balance
    weight is ``β_t = 1 − α``. The first step copies ``θ_1`` (``α = 1``).

    Place it last (the whole optimizer inside, e.g. ``optax.chain(optax.clip_by_global_norm(1.0),
    cljax.track_coin_ema(optax.adamw(1e-4)))``); read the EMA with `ema_params`.

    Args:
        inner: The optimizer whose parameters are averaged (its updates are the final ones).
        fallback_decay: ``β`` used when the adaptive weight is out of range (0.99 in the
            reference code), in [0, 1].
        dtype: dtype of the EMA and stored gradients (default float32 for bfloat16 / float16
            parameters). Static.

    Returns:
        A transform whose state is a `TrackCoinEmaState`. `update` needs `params`.

    Raises:
        TypeError: when `inner` is not a transform.
        ValueError: when `fallback_decay` is outside [0, 1] or `dtype` is not a floating dtype.

    Example:
        >>> tx = cljax.track_coin_ema(optax.sgd(0.1))
        >>> state = tx.init({"w": jnp.ones(3)})

    Notes:
        The paper derives ``β_t`` from a Taylor expansion of the loss and does not print a
        closed form in its abstract; this follows the authors' reference code (JingyangQiao/CoIN,
        ``ema_update`` in ``CoIN/peft/tuners/lora.py``), including its L1 norms, its fallback
        and its first-step copy. The reference reads the gradients after clipping: put clipping
        outside (before) the wrapper to match. The instruction-similarity retrain / expand
        decisions of the paper are out of scope. Costs two parameter copies (EMA and previous
        gradients).

    References:
        Qiao et al., "Large Continual Instruction Assistant", ICML 2025.
        https://arxiv.org/abs/2410.10868
    """
    _checks.check_transform("track_coin_ema", "inner", inner)
    _checks.check_in_range("track_coin_ema", "fallback_decay", fallback_decay, 0.0, 1.0)
    _check_dtype("track_coin_ema", dtype)

    def init_fn(params):
        ema = _as_average(params, dtype)
        return TrackCoinEmaState(
            inner_state=inner.init(params),
            count=_count_dtype_zero(),
            ema=ema,
            prev_grads=jax.tree.map(jnp.zeros_like, ema),
            decay=jax.tree.map(lambda e: jnp.asarray(fallback_decay).astype(_F32), ema),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params("track_coin_ema", params)
        inner_updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args
        )
        new = _post_step_tree(inner_updates, params)
        fallback = jnp.ones([], _F32) - jnp.asarray(fallback_decay).astype(_F32)
        first = state.count == 0

        def alpha_leaf(g, theta, e, prev):
            if g is None:
                return None
            g = jnp.asarray(g).astype(e.dtype)
            a = jnp.sum(jnp.abs(jnp.asarray(theta).astype(e.dtype) - e)).astype(_F32)
            b = jnp.sum(jnp.abs(g)).astype(_F32)
            c = jnp.sum(jnp.abs(g - prev)).astype(_F32)
            denominator = a * c
            ok = (denominator > 0) & jnp.isfinite(denominator)
            raw = 2.0 * (1.0 + b) / jnp.where(ok, denominator, jnp.ones_like(denominator))
            valid = ok & jnp.isfinite(raw) & (raw > 0) & (raw < 1)
            alpha = jnp.where(valid, raw, fallback)
            return jnp.where(first, jnp.ones_like(alpha), alpha)

        is_none = lambda x: x is None  # noqa: E731
        alphas = jax.tree.map(
            alpha_leaf, updates, new, state.ema, state.prev_grads, is_leaf=is_none
        )

        def ema_leaf(alpha, theta, e):
            if alpha is None:
                return e
            a = alpha.astype(e.dtype)
            return (jnp.ones_like(a) - a) * e + a * jnp.asarray(theta).astype(e.dtype)

        ema = jax.tree.map(ema_leaf, alphas, new, state.ema, is_leaf=is_none)
        prev = jax.tree.map(
            lambda g, pg: pg if g is None else jnp.asarray(g).astype(pg.dtype),
            updates,
            state.prev_grads,
            is_leaf=is_none,
        )
        decay = jax.tree.map(
            lambda alpha, d: d if alpha is None else jnp.ones_like(alpha) - alpha,
            alphas,
            state.decay,
            is_leaf=is_none,
        )
        new_state = TrackCoinEmaState(
            inner_state=inner_state,
            count=optax.safe_increment(state.count),
            ema=ema,
            prev_grads=prev,
            decay=decay,
        )
        return inner_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# MG-13 / MG-14 losses.


def ilora_consistency_loss(
    plastic_hidden: Any, stable_hidden: Any, *, one_sided: bool = True
) -> jax.Array:
    """I-LoRA's consistency loss between the fast (plastic) and slow (stable) models' hidden states.

    With ``h_p`` from the fast model and ``h_s`` from the slow (EMA) model on replay samples, the
    target is ``max(h_p, h_s)`` (I-LoRA's reference code; ``h_s`` when ``one_sided=False``) and
    the loss is the mean squared difference over every element of every leaf, i.e.
    ``mean(min(h_p − h_s, 0)²)`` one-sided. ``h_s`` gets no gradient: the slow adapter is only
    interpolated, never trained.

    Args:
        plastic_hidden: An array or a pytree of arrays (e.g. a list of per-layer hidden states).
        stable_hidden: The same structure and shapes, from the slow model.
        one_sided: Penalise only where the fast model is below the slow one. Static.

    Returns:
        A float32 scalar (0 for empty inputs).

    Raises:
        ValueError: when the trees differ in structure or shape.

    Example:
        >>> cljax.ilora_consistency_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]))
        Array(2., dtype=float32)

    Notes:
        The card describes a plain MSE; the reference code's one-sided target is the default and
        ``one_sided=False`` gives the plain MSE. The paper's loss adds it, with weight 1, to the
        mean of the current-batch and replay-batch losses.

    References:
        Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient
        Tuning", ICASSP 2025. https://arxiv.org/abs/2402.18865
    """
    _checks.check_same_structure(
        "ilora_consistency_loss", plastic_hidden=plastic_hidden, stable_hidden=stable_hidden
    )
    total = jnp.zeros([], _F32)
    size = 0
    for hp, hs in zip(jax.tree.leaves(plastic_hidden), jax.tree.leaves(stable_hidden), strict=True):
        hp = jnp.asarray(hp)
        wide = _wide(hp.dtype)
        diff = hp.astype(wide) - jax.lax.stop_gradient(jnp.asarray(hs).astype(wide))
        if one_sided:
            diff = jnp.minimum(diff, jnp.zeros((), wide))
        total = total + jnp.sum(jnp.square(diff)).astype(_F32)
        size += hp.size
    return total / max(size, 1)


def zscl_distillation_loss(
    logits: jax.Array, reference_logits: jax.Array, *, temperature: float = 2.0
) -> jax.Array:
    """ZSCL's distillation loss: KL from the frozen initial model's distribution, ``× T²``.

    ``T² · mean_rows KL(softmax(reference_logits / T) ‖ softmax(logits / T))`` over the last
    (class / text) axis, averaged over all leading axes. In ZSCL the rows are reference-set images
    and the columns reference texts; `logits` come from the current model's image features and
    `reference_logits` from the initial model (both against the initial model's text features);
    the transposed call (rows = texts) gives the text-side term. `reference_logits` get no
    gradient.

    Args:
        logits: ``(..., c)`` logits of the current model.
        reference_logits: ``(..., c)`` logits of the frozen initial model.
        temperature: ``T > 0`` (2 in the reference code).

    Returns:
        A float32 scalar (float64 for float64 inputs); 0 when the models agree.

    Raises:
        ValueError: when the shapes differ, the inputs are scalars, or ``temperature <= 0``.

    Example:
        >>> x = jnp.array([[1.0, 2.0, 3.0]])
        >>> cljax.zscl_distillation_loss(x, x)
        Array(0., dtype=float32)

    Notes:
        The reference code computes the cross-entropy ``−Σ p log q`` (times ``T²``); this returns
        the KL divergence, which differs by the teacher's entropy — a constant with the same
        gradients — so that the loss is 0 at initialization as the card requires.

    References:
        Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
        Vision-Language Models", ICCV 2023. https://arxiv.org/abs/2303.06628
    """
    _checks.check_in_range(
        "zscl_distillation_loss", "temperature", temperature, 0.0, low_inclusive=False
    )
    logits = jnp.asarray(logits)
    reference_logits = jnp.asarray(reference_logits)
    if logits.shape != reference_logits.shape:
        raise ValueError(
            f"zscl_distillation_loss: `logits` has shape {logits.shape} but `reference_logits` has "
            f"{reference_logits.shape}; pass logits over the same rows and classes."
        )
    if logits.ndim == 0:
        raise ValueError(
            "zscl_distillation_loss: `logits` is a scalar; pass (..., classes) logits."
        )
    wide = _wide(logits.dtype)
    t = jnp.asarray(temperature).astype(wide)
    log_q = jax.nn.log_softmax(logits.astype(wide) / t, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(reference_logits).astype(wide) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    if kl.size == 0:
        return jnp.zeros([], wide)
    return jnp.mean(kl) * t * t


# ---------------------------------------------------------------------------------------------
# MG-19: BCWI.


def _importance_weight(
    alpha: jax.Array, old_importance: jax.Array, new_importance: jax.Array
) -> jax.Array:
    """``α·I_old / (α·I_old + (1 − α)·I_new)``, in [0, 1], without overflow; α where both are 0."""
    a = jnp.maximum(old_importance.astype(_F32), 0.0)
    b = jnp.maximum(new_importance.astype(_F32), 0.0)
    scale = jnp.maximum(a, b)
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    numerator = alpha * (a / safe)
    denominator = numerator + (1.0 - alpha) * (b / safe)
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, jnp.ones_like(denominator)), alpha)


def bcwi_interpolate(
    old: optax.Params,
    *new: optax.Params,
    alpha: jax.typing.ArrayLike,
    old_importance: optax.Params | None = None,
    new_importance: optax.Params | None = None,
) -> optax.Params:
    """Interpolates the old model and the retrained one(s): ``α·θ_old + (1 − α)·θ_new``.

    With several new models, ``θ_new`` is their uniform average (the paper's "average several new
    models, then interpolate"). With importance trees (e.g. diagonal Fisher estimates), the weight
    of the old model becomes per parameter ``w = α·I_old / (α·I_old + (1 − α)·I_new)`` — always in
    [0, 1] (negative importances count as 0; ``w = α`` where both are 0) — and the result is
    ``w·θ_old + (1 − w)·θ_new``. A missing importance tree counts as all ones. Element-wise, per
    leaf; computed in float32 (or float64), returned in `old`'s dtypes.

    Args:
        old: The deployed (old) model's parameters.
        *new: One or more retrained (new) models with the same structure and shapes.
        alpha: ``α`` in [0, 1]: 1 returns the old model, 0 the new one. May be traced.
        old_importance: Optional per-parameter importance of the old model's weights.
        new_importance: Optional per-parameter importance of the new model's weights.

    Returns:
        The interpolated parameters, with `old`'s structure and dtypes.

    Raises:
        ValueError: when no new model is given, `alpha` is outside [0, 1], or a tree differs in
            structure or shape from `old`.

    Example:
        >>> old, new = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
        >>> cljax.bcwi_interpolate(old, new, alpha=0.25)["w"]
        Array([0.75, 0.75], dtype=float32)

    Notes:
        The importance-weighted form is the Fisher-merging style normalization; the paper's
        exact weighting is unverified (card MG-19), hence importances are optional inputs.
        Measure the result with `negative_flip_rate`.

    References:
        Schumann et al., "Backward Compatibility During Data Updates by Weight Interpolation",
        EACL 2024. https://arxiv.org/abs/2301.10546
    """
    if not new:
        raise ValueError(
            "bcwi_interpolate: no new model given; call bcwi_interpolate(old, new, alpha=...)."
        )
    _checks.check_in_range("bcwi_interpolate", "alpha", alpha, 0.0, 1.0)
    for i, model in enumerate(new):
        _checks.check_same_structure("bcwi_interpolate", old=old, **{f"new[{i}]": model})
    if old_importance is not None:
        _checks.check_same_structure("bcwi_interpolate", old=old, old_importance=old_importance)
    if new_importance is not None:
        _checks.check_same_structure("bcwi_interpolate", old=old, new_importance=new_importance)
    weighted = old_importance is not None or new_importance is not None
    count = len(new)
    treedef = jax.tree.structure(old)
    new_leaves = [treedef.flatten_up_to(model) for model in new]
    old_leaves = treedef.flatten_up_to(old)
    old_imp = (
        treedef.flatten_up_to(old_importance)
        if old_importance is not None
        else [None] * len(old_leaves)
    )
    new_imp = (
        treedef.flatten_up_to(new_importance)
        if new_importance is not None
        else [None] * len(old_leaves)
    )

    out = []
    for j, o in enumerate(old_leaves):
        o = jnp.asarray(o)
        wide = _wide(o.dtype)
        a = jnp.asarray(alpha).astype(wide)
        theta_new = sum(jnp.asarray(m[j]).astype(wide) / count for m in new_leaves)
        if weighted:
            i_old = (
                jnp.ones(o.shape, wide)
                if old_imp[j] is None
                else jnp.asarray(old_imp[j]).astype(wide)
            )
            i_new = (
                jnp.ones(o.shape, wide)
                if new_imp[j] is None
                else jnp.asarray(new_imp[j]).astype(wide)
            )
            a = _importance_weight(a.astype(_F32), i_old, i_new).astype(wide)
        merged = a * o.astype(wide) + (jnp.ones_like(a) - a) * theta_new
        out.append(merged.astype(o.dtype))
    return jax.tree.unflatten(treedef, out)


def negative_flip_rate(
    old_predictions: jax.Array, new_predictions: jax.Array, labels: jax.Array
) -> jax.Array:
    """Fraction of examples the old model got right and the new model gets wrong.

    ``NFR = (1/N) Σ 1[old correct ∧ new wrong]`` (EX-14), the metric BCWI reduces.

    Args:
        old_predictions: Class ids with the shape of `labels`, or scores with one extra trailing
            class axis (the argmax is taken).
        new_predictions: The same, for the new model.
        labels: Integer class ids, shape ``(N, ...)``.

    Returns:
        A float32 scalar in [0, 1] (0 for an empty set).

    Raises:
        ValueError: when a prediction's shape is neither `labels`' shape nor it plus a class axis.

    Example:
        >>> labels = jnp.array([0, 1, 1, 0])
        >>> cljax.negative_flip_rate(jnp.array([0, 1, 0, 0]), jnp.array([1, 1, 1, 0]), labels)
        Array(0.25, dtype=float32)
    """
    labels = jnp.asarray(labels)

    def as_ids(name, predictions):
        predictions = jnp.asarray(predictions)
        if predictions.shape == labels.shape:
            return predictions
        if predictions.ndim == labels.ndim + 1 and predictions.shape[:-1] == labels.shape:
            return jnp.argmax(predictions, axis=-1)
        raise ValueError(
            f"negative_flip_rate: `{name}` has shape {predictions.shape}; it must be `labels`' shape "
            f"{labels.shape} (class ids) or that shape plus a class axis (scores)."
        )

    old_ok = as_ids("old_predictions", old_predictions) == labels
    new_ok = as_ids("new_predictions", new_predictions) == labels
    flips = jnp.sum(old_ok & ~new_ok).astype(_F32)
    return flips / max(labels.size, 1)
