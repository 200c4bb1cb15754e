"""IST (SP-19): importance-aware sparse tuning over stacked layers.

* `ist` — every `interval` steps, `num_active` layers are drawn without replacement with
  probabilities proportional to ``sigmoid(-s)`` of a per-layer score ``s`` held in state; only
  those layers' slices are updated.
* `ist_sample_suppressed` and `ist_update_importance` — the importance loop: draw distinct sets
  of layers to suppress (weights ``sigmoid(s)``), evaluate the loss with those layers' adapter
  outputs scaled down (a model-side step), and move the scores of the suppressed layers by the
  centered rewards ``exp(-loss)``.

A high score marks a layer whose suppression barely hurts the loss (less important): it is
suppressed more often and trained less often, as in the reference implementation.
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
from cljax import tree as _tree
from cljax.transforms.sparse import _common

__all__ = ["IstState", "ist", "ist_sample_suppressed", "ist_update_importance"]

_F32 = jnp.float32


class IstState(NamedTuple):
    """State of `ist`."""

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data
    score: chex.Array  # float32 (N_L,) per-layer score s; high = less important
    active: chex.Array  # int32 (num_active,) sorted indices of the trained layers
    inner_state: Any  # state for every leaf; inactive layers' slices are held fixed


def _weighted_subset(key: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """`k` distinct indices drawn without replacement with probabilities proportional to
    `weights` (successive draws renormalized), sorted: Gumbel top-k."""
    gumbel = jax.random.gumbel(key, weights.shape, _F32)
    keys = jnp.log(jnp.maximum(weights, jnp.finfo(_F32).tiny)) + gumbel
    _, idx = lax.top_k(keys, k)
    return jnp.sort(idx).astype(jnp.int32)


def _layer_info(fn: str, layers: Any, params: Any, num_active: int) -> tuple[Any, int | None]:
    flags = _common.bool_tree(fn, "layers", layers, params)
    sizes = {}
    for (path, p), f in zip(
        jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0],
        jax.tree.structure(params, is_leaf=_common.is_none).flatten_up_to(flags),
        strict=True,
    ):
        if p is None or not f:
            continue
        name = _common.path_name(path) or "<root>"
        if jnp.ndim(p) == 0:
            raise ValueError(
                f"{fn}: leaf '{name}' is a scalar; layer leaves need a leading layer axis."
            )
        sizes[name] = jnp.shape(p)[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{fn}: layer leaves must share their leading (layer) axis; got sizes {sizes}."
        )
    n_layers = next(iter(sizes.values()), None)
    if n_layers is not None and num_active > n_layers:
        raise ValueError(
            f"{fn}(num_active={num_active}) must be <= the number of layers {n_layers}."
        )
    return flags, n_layers


def ist(
    inner: optax.GradientTransformation,
    *,
    layers: Any,
    num_active: int,
    num_layers: int,
    interval: int = 1,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """IST: trains a few stacked layers per step, drawn by learned layer importance.

    `layers` picks the stacked-layer leaves (the PEFT modules of a scanned block, all with a
    leading layer axis ``N_L = num_layers``). Every `interval` steps (step 0 included), the
    transform draws `num_active` distinct layers without replacement with probabilities
    proportional to ``sigmoid(-s)`` (``s``: the score in state, zero at the start: uniform).
    Only the drawn layers' slices are updated; the other slices get ``u = 0`` and a zero
    gradient into `inner`, and their slices of the inner state are held fixed (an optimizer
    that skips parameters without gradients, as the reference's frozen layers), while a shared
    count (Adam's) still advances. Leaves outside `layers` always train. The scores change
    only through `ist_update_importance`.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        layers: A bool tree or a function of the params: the stacked-layer leaves. Static.
        num_active: Layers trained per draw, ``1 <= num_active <= num_layers`` (the reference
            uses a quarter of the layers). Static.
        num_layers: ``N_L``, the leading size of every layer leaf. Static.
        interval: Steps between draws (1 in the reference: a new draw every step). Static.
        seed: An int or a PRNG key. Static.

    Returns:
        A transform whose state is `IstState`.

    Raises:
        ValueError: layer leaves without a leading axis of size `num_layers`;
            ``num_active > num_layers``.

    Example:
        >>> params = {"lora": jnp.ones((4, 2, 2)), "head": jnp.ones(2)}
        >>> tx = cljax.ist(optax.sgd(1.0), layers=cljax.select("lora"), num_active=1, num_layers=4)
        >>> updates, state = tx.update(params, tx.init(params))
        >>> int((updates["lora"][:, 0, 0] != 0).sum()), state.score.shape
        (1, (4,))

    References:
        Yao et al., "Layer-wise Importance Matters: Less Memory for Better Performance in
        Parameter-efficient Fine-tuning of Large Language Models", EMNLP 2024.
        https://arxiv.org/abs/2410.11772
    """
    fn = "ist"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "num_layers", num_layers, 1)
    _checks.check_int(fn, "num_active", num_active, 1)
    _checks.check_int(fn, "interval", interval, 1)
    if num_active > num_layers:
        raise ValueError(f"{fn}(num_active={num_active}) must be <= num_layers={num_layers}.")
    key0 = _common.key_data(seed)
    inner = optax.with_extra_args_support(inner)

    def info(tree):
        flags, n = _layer_info(fn, layers, tree, num_active)
        if n is not None and n != num_layers:
            raise ValueError(
                f"{fn}: layer leaves have a leading axis of size {n}; expected num_layers={num_layers}."
            )
        return flags

    def draw(key_data, score):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), 0)
        return _weighted_subset(key, jax.nn.sigmoid(-score), num_active)

    def init_fn(params):
        info(params)
        score = jnp.zeros((num_layers,), _F32)
        return IstState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            score=score,
            active=draw(key0, score),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        flags = info(updates)

        def redraw(_):
            new_key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.key))[0])
            return new_key, draw(new_key, state.score)

        due = (state.count > 0) & (state.count % interval == 0)
        key, active = lax.cond(due, redraw, lambda _: (state.key, state.active), None)
        rows = jnp.zeros((num_layers,), jnp.bool_).at[active].set(True)

        def gate(x, f):
            if x is None or not f:
                return x
            return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))

        gated = jax.tree.map(gate, updates, flags, is_leaf=_common.is_none)
        directions, new_inner = inner.update(gated, state.inner_state, params, **extra_args)
        out = jax.tree.map(gate, directions, flags, is_leaf=_common.is_none)
        flag_of = _common.by_path(flags, fn, "layers")
        table = _common.tie_table(
            updates, lambda path, g: rows if flag_of[_common.path_name(path)] else None
        )

        def keep(old, new, r):
            return jnp.where(r.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        new_inner = _common.map_tied_pair(state.inner_state, new_inner, table, keep)
        return out, IstState(
            count=optax.safe_increment(state.count),
            key=key,
            score=state.score,
            active=active,
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_update(update_fn))


def ist_sample_suppressed(
    opt_state: Any, key: jax.Array, *, num_sets: int = 3, num_suppressed: int
) -> jax.Array:
    """Draws `num_sets` distinct sets of layers to suppress, by the scores of the `IstState`.

    Each set holds `num_suppressed` layers drawn without replacement with probabilities
    proportional to ``sigmoid(s)`` (less important layers are suppressed more often); a set
    equal to an earlier one is redrawn. Evaluate the loss once per set with the PEFT outputs of
    its layers scaled by the suppression factor (0.25 in the reference) on one held-out batch,
    then call `ist_update_importance`.

    Args:
        opt_state: An optimizer state holding exactly one `IstState`.
        key: A PRNG key.
        num_sets: Number of sets (the reference's 3). Static.
        num_suppressed: Layers per set (the reference uses half of the layers). Static.

    Returns:
        An int32 array ``(num_sets, num_suppressed)`` of sorted layer indices.

    Raises:
        ValueError: no or several `IstState`; sizes out of range, or fewer distinct sets
            than `num_sets`.

    Example:
        >>> params = {"lora": jnp.ones((4, 2))}
        >>> tx = cljax.ist(optax.sgd(1.0), layers=cljax.select("lora"), num_active=1, num_layers=4)
        >>> cljax.ist_sample_suppressed(tx.init(params), jax.random.key(0), num_suppressed=2).shape
        (3, 2)
    """
    fn = "ist_sample_suppressed"
    state = _tree.find_state(opt_state, IstState)
    n = state.score.shape[0]
    _checks.check_int(fn, "num_sets", num_sets, 1)
    _checks.check_int(fn, "num_suppressed", num_suppressed, 1)
    if num_suppressed > n:
        raise ValueError(
            f"{fn}(num_suppressed={num_suppressed}) must be <= the number of layers {n}."
        )
    if math.comb(n, num_suppressed) < num_sets:
        raise ValueError(
            f"{fn}(num_sets={num_sets}) must be <= the {math.comb(n, num_suppressed)} distinct sets "
            f"of {num_suppressed} among {n} layers."
        )
    weights = jax.nn.sigmoid(state.score)
    sets = jnp.full((num_sets, num_suppressed), -1, jnp.int32)

    def one(k, carry):
        sets, key = carry

        def seen(cand):
            same = jnp.all(sets == cand[None, :], axis=1) & (jnp.arange(num_sets) < k)
            return jnp.any(same)

        def body(c):
            key, _ = c
            key, sub = jax.random.split(key)
            return key, _weighted_subset(sub, weights, num_suppressed)

        key, first = body((key, None))
        key, cand = lax.while_loop(lambda c: seen(c[1]), body, (key, first))
        return sets.at[k].set(cand), key

    sets, _ = lax.fori_loop(0, num_sets, one, (sets, key))
    return sets


def ist_update_importance(
    opt_state: Any, suppressed: Any, losses: Any, *, rate: jax.typing.ArrayLike = 10.0
) -> Any:
    """Updates the layer scores of the `IstState` from the losses of suppressed evaluations.

    With ``r_k = exp(-loss_k) - mean_j exp(-loss_j)`` and ``p = sigmoid(s)`` before the update,
    each layer ``i`` in set ``k`` moves by ``rate * r_k * p_i * (1 - p_i)``: a set whose
    suppression kept the loss low raises its layers' scores (less important, trained less).

    Args:
        opt_state: An optimizer state holding exactly one `IstState`.
        suppressed: int ``(R, n_s)`` layer indices, e.g. from `ist_sample_suppressed`.
        losses: ``(R,)`` losses measured with each set suppressed.
        rate: Step size of the score update (10 in the reference).

    Returns:
        `opt_state` with the new scores.

    Raises:
        ValueError: no or several `IstState`; `suppressed` not 2-D; `losses` not ``(R,)``.

    Example:
        >>> params = {"lora": jnp.ones((3, 2))}
        >>> tx = cljax.ist(optax.sgd(1.0), layers=cljax.select("lora"), num_active=1, num_layers=3)
        >>> state = cljax.ist_update_importance(tx.init(params), jnp.array([[0], [1]]),
        ...     jnp.array([0.0, 1.0]), rate=4.0)
        >>> [round(s, 3) for s in state.score.tolist()]
        [0.316, -0.316, 0.0]
    """
    fn = "ist_update_importance"
    state = _tree.find_state(opt_state, IstState)
    n = state.score.shape[0]
    suppressed = jnp.asarray(suppressed)
    losses = jnp.asarray(losses, _F32)
    if suppressed.ndim != 2:
        raise ValueError(f"{fn}(suppressed=...) must have shape (R, n_s), got {suppressed.shape}.")
    if losses.shape != suppressed.shape[:1]:
        raise ValueError(
            f"{fn}(losses=...) must have shape ({suppressed.shape[0]},), got {losses.shape}."
        )
    rewards = jnp.exp(-losses)
    rewards = rewards - jnp.mean(rewards)
    member = jnp.any(jax.nn.one_hot(suppressed, n, dtype=jnp.bool_), axis=1)  # (R, N_L)
    p = jax.nn.sigmoid(state.score)
    step = jnp.sum(jnp.where(member, rewards[:, None], 0.0), axis=0)
    score = state.score + jnp.asarray(rate, _F32) * step * p * (1.0 - p)
    return _tree.replace_state(opt_state, state._replace(score=score))
