"""Random leaf and layer sampling: HFT (SP-03) and LISA (SP-04).

* `hft` — half fine-tuning: a random half of each group of leaves trains per stage;
  `hft_half_reset` resets a random half of a fine-tuned model to its base.
* `lisa` — layerwise importance sampling over stacked layers, with inner state sized for the
  sampled layers only.

Draws are exact-count uniform subsets: the smallest of i.i.d. uniform values from a PRNG key kept
in state (ties to the earlier index), redrawn behind `lax.cond` on the step count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cljax import _checks
from cljax.transforms.sparse import _common
from cljax.transforms.sparse._common import key_data as _key_data

__all__ = ["HftState", "LisaState", "hft", "hft_half_reset", "lisa"]


# ---------------------------------------------------------------------------------------------
# Random leaf selection shared by HFT (SP-03).


def _groups(fn: str, groups: Any, params: Any) -> list[tuple[Any, list[int]]]:
    """``[(label, [leaf indices in tree order])]`` of the sampled groups (label None: always on)."""
    if groups is None:
        labels = jax.tree.map(
            lambda p: None if p is None else "all", params, is_leaf=_common.is_none
        )
    else:
        labels = _common.label_tree(fn, "groups", groups, params)
    flat = jax.tree.leaves(labels, is_leaf=_common.is_none)
    out: dict = {}
    for i, label in enumerate(flat):
        if label is not None:
            out.setdefault(label, []).append(i)
    return list(out.items())


def _ranks(values: jax.Array, same: jax.Array) -> jax.Array:
    """Rank of each entry among the entries of its group (``same[i, j]``): the number of group
    members with a smaller value, or an equal value and a smaller index."""
    n = values.shape[0]
    index = jnp.arange(n)
    before = (values[None, :] < values[:, None]) | (
        (values[None, :] == values[:, None]) & (index[None, :] < index[:, None])
    )
    return jnp.sum(before & same, axis=1, dtype=jnp.int32)


def _select_leaves(key_data: jax.Array, groups: list, n_leaves: int, fraction: Any) -> jax.Array:
    """A bool vector over the leaves: per group, a uniformly random ``ceil(fraction * size)``
    of its leaves (exact: the smallest of i.i.d. uniform draws); leaves in no group are True."""
    label = np.full(n_leaves, -1)
    counts = []
    for g, (_, ids) in enumerate(groups):
        label[ids] = g
        counts.append((ids, _common.traced_count_of(fraction, len(ids))))
    if not groups:
        return jnp.ones((n_leaves,), jnp.bool_)
    k = jnp.zeros((n_leaves,), jnp.int32)
    for ids, count in counts:
        k = k.at[np.asarray(ids)].set(count)
    draws = jax.random.uniform(jax.random.wrap_key_data(key_data), (n_leaves,))
    same = jnp.asarray(label[:, None] == label[None, :])
    rank = _ranks(draws, same)
    return jnp.asarray(label < 0) | (rank < k)


class HftState(NamedTuple):
    """State of `hft`."""

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data of the current stage
    selected: chex.Array  # bool (n_leaves,): which leaves train in this stage (tree order)
    inner_state: Any


def hft(
    inner: optax.GradientTransformation,
    *,
    fraction: float = 0.5,
    groups: Any = None,
    resample_every: int | None = None,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Half fine-tuning: per stage, a random half of each group of leaves trains; the rest is
    frozen.

    Within every group (e.g. the attention matrices of one block, the FFN matrices of one
    block), exactly ``ceil(fraction * size)`` leaves are drawn uniformly without replacement;
    they train with `inner`, the others get ``u = 0`` (and a zero gradient into `inner`). The
    draw comes from a PRNG key in state and is redrawn every `resample_every` steps (a stage)
    behind `lax.cond`. Leaves labelled None always train.

    Optimizer state exists for every leaf (the selection changes). Per the card's default
    ("keep"), the state tied to an unselected leaf is kept unchanged during the stage and
    resumes when the leaf is drawn again; a shared step count (Adam's) still advances.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        fraction: Fraction of each group trained per stage, in (0, 1] (0.5 in the paper).
        groups: A label tree or a function of the params giving one hashable label per leaf
            (None: always trained). Default: all leaves form one group. Static.
        resample_every: Steps per stage; None draws once. Static.
        seed: An int or a PRNG key. Static.

    Returns:
        A transform whose state is `HftState`.

    Example:
        >>> tx = cljax.hft(optax.adam(1e-3), resample_every=100)
        >>> state = tx.init({"q": jnp.ones((2, 2)), "k": jnp.ones((2, 2))})
        >>> int(state.selected.sum())
        1

    References:
        Hui et al., "HFT: Half Fine-Tuning for Large Language Models", 2024.
        https://arxiv.org/abs/2404.18466
    """
    fn = "hft"
    _checks.check_transform(fn, "inner", inner)
    _common.check_density(fn, fraction, "fraction")
    if resample_every is not None:
        _checks.check_int(fn, "resample_every", resample_every, 1)
    key0 = _key_data(seed)
    inner = optax.with_extra_args_support(inner)

    def draw(key, params):
        groups_ = _groups(fn, groups, params)
        n = len(jax.tree.leaves(params, is_leaf=_common.is_none))
        return _select_leaves(key, groups_, n, fraction)

    def init_fn(params):
        return HftState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            selected=draw(key0, params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        key, selected = state.key, state.selected
        if resample_every is not None:

            def redraw(_):
                new_key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[0])
                return new_key, draw(new_key, updates)

            due = (state.count > 0) & (state.count % resample_every == 0)
            key, selected = lax.cond(due, redraw, lambda _: (key, selected), None)
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_common.is_none)
        flags = jax.tree.unflatten(
            treedef, [None if g is None else selected[i] for i, g in enumerate(leaves)]
        )
        gated = jax.tree.map(
            lambda g, s: None if g is None else jnp.where(s, g, jnp.zeros_like(g)),
            updates,
            flags,
            is_leaf=_common.is_none,
        )
        directions, new_inner = inner.update(gated, state.inner_state, params, **extra_args)
        out = jax.tree.map(
            lambda u, s: None if u is None else jnp.where(s, u, jnp.zeros_like(u)),
            directions,
            flags,
            is_leaf=_common.is_none,
        )
        flags_by_path = _common.by_path(flags, fn, "flags")
        table = _common.tie_table(updates, lambda path, g: flags_by_path[_common.path_name(path)])
        new_inner = _keep_unselected(state.inner_state, new_inner, table)
        return out, HftState(
            count=optax.safe_increment(state.count),
            key=key,
            selected=selected,
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_update(update_fn))


def _keep_unselected(old: Any, new: Any, table: dict) -> Any:
    """Per tied state leaf: the new value where its leaf is selected, else the old value."""
    return _common.map_tied_pair(old, new, table, lambda o, n, flag: jnp.where(flag, n, o))


def hft_half_reset(
    finetuned: Any, base: Any, key: jax.Array, *, fraction: float = 0.5, groups: Any = None
) -> Any:
    """Resets a random part of a fine-tuned model to its base: ``where(M, finetuned, base)``.

    `M` keeps exactly ``ceil(fraction * size)`` leaves of each group fine-tuned (uniformly at
    random from `key`) and resets the others, leaf by leaf (HFT's half-reset).

    Args:
        finetuned: The fine-tuned parameters.
        base: The base parameters, same structure and shapes.
        key: A PRNG key.
        fraction: Fraction of each group kept fine-tuned, in (0, 1].
        groups: As in `hft`.

    Returns:
        The half-reset parameters.

    Raises:
        ValueError: trees of different structure or shapes; a fraction outside (0, 1].

    Example:
        >>> ft, base = {"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": jnp.zeros(2), "b": jnp.zeros(2)}
        >>> out = cljax.hft_half_reset(ft, base, jax.random.key(0))
        >>> float(out["a"].sum() + out["b"].sum())
        2.0
    """
    fn = "hft_half_reset"
    _common.check_density(fn, fraction, "fraction")
    _checks.check_same_structure(fn, finetuned=finetuned, base=base)
    groups_ = _groups(fn, groups, finetuned)
    leaves, treedef = jax.tree.flatten(finetuned, is_leaf=_common.is_none)
    selected = _select_leaves(_key_data(key), groups_, len(leaves), fraction)
    bases = jax.tree.leaves(base, is_leaf=_common.is_none)
    out = [
        None if f is None else jnp.where(selected[i], f, b)
        for i, (f, b) in enumerate(zip(leaves, bases, strict=True))
    ]
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# SP-04: LISA.


class LisaState(NamedTuple):
    """State of `lisa`."""

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data
    active: chex.Array  # int32 (num_active,) sorted indices of the trained layers
    inner_state: Any  # state for the always-on leaves and (num_active, ...) layer slices


def lisa(
    inner: optax.GradientTransformation,
    *,
    layers: Any,
    num_active: int = 2,
    interval: int = 20,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """LISA: trains a random few of the stacked layers per period, plus every other leaf.

    `layers` picks the stacked-layer leaves, all with the same leading layer axis ``N_L``
    (a scanned Flax block, ``(N_L, ...)``). Every `interval` steps (`lax.cond` on the count)
    ``num_active`` layer indices are drawn uniformly without replacement from a PRNG key in
    state. Each step gathers those layers' slices, runs `inner` on the ``(num_active, ...)``
    slices and the other (always-on: embeddings, head, norms) leaves, and scatters the
    updates back; unselected layers get ``u = 0``. The inner state is sized for the slices
    (the memory saving), and a slot's state is zeroed when its layer changes.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        layers: A bool tree or a function of the params: the stacked-layer leaves. Static.
        num_active: Layers trained per period (``gamma``), ``1 <= num_active <= N_L``. Static.
        interval: Steps per period (``K``). Static.
        seed: An int or a PRNG key. Static.

    Returns:
        A transform whose state is `LisaState`.

    Raises:
        ValueError: layer leaves with different leading sizes or no leading axis;
            ``num_active > N_L``.

    Example:
        >>> params = {"embed": jnp.ones((8, 4)), "blocks": {"w": jnp.ones((6, 4, 4))}}
        >>> tx = cljax.lisa(optax.adam(1e-3), layers=cljax.select("blocks"), num_active=2)
        >>> cljax.find_state(tx.init(params), optax.ScaleByAdamState).mu["blocks"]["w"].shape
        (2, 4, 4)

    References:
        Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
        Model Fine-Tuning", NeurIPS 2024. https://arxiv.org/abs/2403.17919
    """
    fn = "lisa"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "num_active", num_active, 1)
    _checks.check_int(fn, "interval", interval, 1)
    key0 = _key_data(seed)
    inner = optax.with_extra_args_support(inner)

    def layer_info(params):
        """(flag tree, N_L or None)."""
        flags = _common.bool_tree(fn, "layers", layers, params)
        sizes = {}
        for (path, p), f in zip(
            jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0],
            jax.tree.leaves(flags, is_leaf=_common.is_none),
            strict=True,
        ):
            if p is None or not f:
                continue
            if jnp.ndim(p) == 0:
                raise ValueError(
                    f"{fn}: leaf '{_common.path_name(path) or '<root>'}' is a scalar; layer leaves need a leading layer axis."
                )
            sizes[_common.path_name(path)] = jnp.shape(p)[0]
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

    def draw(key_data, n_layers):
        """`num_active` distinct layers, uniformly, in increasing order."""
        if n_layers is None:
            return jnp.arange(num_active, dtype=jnp.int32)
        draws = jax.random.uniform(jax.random.wrap_key_data(key_data), (n_layers,))
        chosen = _ranks(draws, jnp.ones((n_layers, n_layers), jnp.bool_)) < num_active
        return jnp.nonzero(chosen, size=num_active)[0].astype(jnp.int32)

    def gather(tree, flags, active):
        return jax.tree.map(
            lambda x, f: x if x is None or not f else jnp.take(x, active, axis=0),
            tree,
            flags,
            is_leaf=_common.is_none,
        )

    def init_fn(params):
        flags, n_layers = layer_info(params)
        active = draw(key0, n_layers)
        return LisaState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            active=active,
            inner_state=inner.init(gather(params, flags, active)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        flags, n_layers = layer_info(updates)
        key, active, inner_state = state.key, state.active, state.inner_state
        if n_layers is not None and n_layers > num_active:
            flag_of = _common.by_path(flags, fn, "layers")

            def redraw(_):
                new_key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[0])
                new_active = draw(new_key, n_layers)
                moved = new_active != active
                sliced = gather(updates, flags, new_active)
                table = _common.tie_table(
                    sliced, lambda path, g: moved if flag_of[_common.path_name(path)] else None
                )

                def reset(leaf, slots):
                    return jnp.where(
                        slots.reshape((-1,) + (1,) * (leaf.ndim - 1)), jnp.zeros_like(leaf), leaf
                    )

                return new_key, new_active, _common.map_tied(inner_state, table, reset)

            due = (state.count > 0) & (state.count % interval == 0)
            key, active, inner_state = lax.cond(
                due, redraw, lambda _: (key, active, inner_state), None
            )
        sliced_params = None if params is None else gather(params, flags, active)
        directions, inner_state = inner.update(
            gather(updates, flags, active), inner_state, sliced_params, **extra_args
        )
        out = jax.tree.map(
            lambda u, g, f: (
                u if u is None or not f else jnp.zeros_like(g).at[active].set(u.astype(g.dtype))
            ),
            directions,
            updates,
            flags,
            is_leaf=_common.is_none,
        )
        return out, LisaState(
            count=optax.safe_increment(state.count), key=key, active=active, inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_update(update_fn))
