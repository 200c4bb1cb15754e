"""Random leaf and layer sampling: HFT (SP-03) and LISA (SP-04).

* `hft` — half fine-tuning: a random half of each group of leaves trains per stage;
  `hft_half_reset` resets a random half of a fine-tuned model to its base.
* `lisa` — layerwise importance sampling over stacked layers or a list of identically structured
  layer subtrees, with inner state sized for the sampled layers only.

Draws are exact-count uniform subsets: the smallest of i.i.d. uniform values from a PRNG key kept
in state (ties to the earlier index), redrawn behind `lax.cond` on the step count.
"""

from __future__ import annotations

from collections.abc import Callable
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


class _Plan(NamedTuple):
    """How one tree splits into always-on leaves and layers (built at trace time)."""

    n_layers: int | None  # None: no layer leaves in this tree
    gather: Callable[[jax.Array], Any]  # active -> the inner tree, layers as (num_active, ...)
    scatter: Callable[[Any, jax.Array], Any]  # (inner directions, active) -> full-size updates
    flags: Any  # bool tree over the inner tree: True for layer slices


def _stacked_plan(fn: str, layers: Any, tree: Any) -> _Plan:
    """Layers as the leading axis of the leaves `layers` selects."""
    flags = _common.bool_tree(fn, "layers", layers, tree)
    sizes = {}
    for (path, p), f in zip(
        jax.tree_util.tree_flatten_with_path(tree, is_leaf=_common.is_none)[0],
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

    def gather(active):
        return jax.tree.map(
            lambda x, f: x if x is None or not f else jnp.take(x, active, axis=0),
            tree,
            flags,
            is_leaf=_common.is_none,
        )

    def scatter(directions, active):
        return jax.tree.map(
            lambda u, g, f: (
                u if u is None or not f else jnp.zeros_like(g).at[active].set(u.astype(g.dtype))
            ),
            directions,
            tree,
            flags,
            is_leaf=_common.is_none,
        )

    return _Plan(next(iter(sizes.values()), None), gather, scatter, flags)


def _children(node: Any) -> tuple[list, list, Any] | None:
    """``(keys, children, treedef)`` one level below `node`; None when `node` is a leaf."""
    if node is None:
        return None
    flat, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # an array (or other leaf)
        return None
    return [path[0] for path, _ in flat], [child for _, child in flat], treedef


def _find_node(tree: Any, where: str) -> tuple[bool, Any]:
    """``(True, node)`` for the node of `tree` whose path string is `where`, else ``(False, None)``."""
    if where == "":
        return True, tree
    stack = [((), tree)]
    while stack:
        path, node = stack.pop()
        below = _children(node)
        if below is None:
            continue
        for key, child in zip(below[0], below[1], strict=True):
            name = _common.path_name((*path, key))
            if name == where:
                return True, child
            if where.startswith(name + "/"):
                stack.append(((*path, key), child))
    return False, None


def _pick(xs: list[jax.Array], i: jax.Array) -> jax.Array:
    """``xs[i]`` for a traced index: a chain of selects (measured faster than stacking all
    ``N_L`` layers and gathering, and than `lax.switch`)."""
    out = xs[0]
    for j in range(1, len(xs)):
        out = jnp.where(i == j, xs[j], out)
    return out


def _list_plan(fn: str, where: str, tree: Any) -> _Plan:
    """Layers as the children of the node at path `where` (a list / tuple / dict of layers)."""
    found, node = _find_node(tree, where)
    below = _children(node) if found else None
    if not found or (below is not None and not below[1]):  # absent, or empty / fully masked
        return _Plan(
            None,
            lambda active: tree,
            lambda directions, active: directions,
            jax.tree.map(lambda _: False, tree),
        )
    if below is None:
        raise ValueError(
            f"{fn}(layer_list={where!r}) names a leaf of shape {jnp.shape(node)}; name a list, "
            "tuple or dict whose children are the layers (stacked `(N_L, ...)` leaves go to `layers`)."
        )
    keys, children, container = below
    outer_leaves, outer = jax.tree.flatten(tree, is_leaf=lambda x: x is node)
    positions = [i for i, x in enumerate(outer_leaves) if x is node]
    if len(positions) != 1:
        raise ValueError(
            f"{fn}(layer_list={where!r}): the node occurs {len(positions)} times in the tree; "
            "give it once."
        )
    position = positions[0]
    names = [(where + "/" if where else "") + _common.path_name((k,)) for k in keys]
    first = jax.tree_util.tree_flatten_with_path(children[0])
    rel = [_common.path_name(p) for p, _ in first[0]]
    for name, child in zip(names[1:], children[1:], strict=True):
        flat, layer_def = jax.tree_util.tree_flatten_with_path(child)
        if layer_def != first[1]:
            raise ValueError(
                f"{fn}: layer '{name}' has leaves {[_common.path_name(p) for p, _ in flat]} but "
                f"layer '{names[0]}' has {rel}; the children of `layer_list` must be identically "
                "structured layers."
            )
        for (path, leaf), (_, leaf0) in zip(flat, first[0], strict=True):
            if jnp.shape(leaf) != jnp.shape(leaf0) or jnp.result_type(leaf) != jnp.result_type(
                leaf0
            ):
                suffix = "/" + _common.path_name(path) if path else ""
                raise ValueError(
                    f"{fn}: leaf '{name}{suffix}' has shape {jnp.shape(leaf)} and dtype "
                    f"{jnp.result_type(leaf)} but '{names[0]}{suffix}' has {jnp.shape(leaf0)} and "
                    f"{jnp.result_type(leaf0)}; the layers of `layer_list` must match leaf by leaf."
                )
    layer_def = first[1]
    roles = [jax.tree.leaves(child) for child in children]  # roles[i][r]: leaf r of layer i
    n_roles = layer_def.num_leaves

    def inner_tree(role_tree):
        leaves = list(outer_leaves)
        leaves[position] = role_tree
        return outer.unflatten(leaves)

    def gather(active):
        slices = [
            jnp.stack(
                [_pick([layer[r] for layer in roles], active[s]) for s in range(active.shape[0])]
            )
            for r in range(n_roles)
        ]
        return inner_tree(layer_def.unflatten(slices))

    def scatter(directions, active):
        out = outer.flatten_up_to(directions)
        slices = layer_def.flatten_up_to(out[position])
        layers = []
        for i, layer in enumerate(roles):
            hit = active == i
            slot = jnp.argmax(hit)
            layers.append(
                layer_def.unflatten(
                    [
                        jnp.where(
                            jnp.any(hit),
                            lax.dynamic_index_in_dim(u, slot, keepdims=False).astype(g.dtype),
                            jnp.zeros_like(g),
                        )
                        for u, g in zip(slices, layer, strict=True)
                    ]
                )
            )
        out[position] = container.unflatten(layers)
        return outer.unflatten(out)

    flags = outer.unflatten(
        [
            layer_def.unflatten([True] * n_roles) if i == position else False
            for i in range(len(outer_leaves))
        ]
    )
    return _Plan(len(children), gather, scatter, flags)


def lisa(
    inner: optax.GradientTransformation,
    *,
    layers: Any = None,
    layer_list: str | None = None,
    num_active: int = 2,
    interval: int = 20,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """LISA: trains a random few of the layers per period, plus every other leaf.

    The layers are given one of two ways. `layers` picks stacked-layer leaves, all with the
    same leading layer axis ``N_L`` (a scanned Flax block, ``(N_L, ...)``). `layer_list`
    names a list, tuple or dict node whose ``N_L`` children are identically structured layers
    (``params["blocks"][0]``, ``params["blocks"][1]``, ...; an NNX ``nnx.List`` of blocks).
    Every `interval` steps (`lax.cond` on the count) ``num_active`` layer indices are drawn
    uniformly without replacement from a PRNG key in state. Each step gathers those layers
    into ``(num_active, ...)`` slices (one per leaf of a layer), runs `inner` on the slices
    and the other (always-on: embeddings, head, norms) leaves, and scatters the updates back;
    unselected layers get ``u = 0``. The inner state is sized for the slices (the memory
    saving), and a slot's state is zeroed when its layer changes. With `layer_list` the inner
    tree holds the slices where the layer node was (``blocks/wq/kernel`` of shape
    ``(num_active, ...)``), so the inner state is the one `lisa` with `layers` keeps for the
    stacked copy of the same model.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        layers: A bool tree or a function of the params: the stacked-layer leaves. Static.
        layer_list: The path of the node holding the layers, keys joined by ``/`` as in
            `cljax.select` (``"blocks"``, ``"model/layers"``; ``""`` for a params tree that
            is itself the list). A tree without that node, or where it is empty (masked out by
            `optax.masked`), has no layers: every leaf trains. Static. Give `layers` or
            `layer_list`, not both.
        num_active: Layers trained per period (``gamma``), ``1 <= num_active <= N_L``. Static.
        interval: Steps per period (``K``). Static.
        seed: An int or a PRNG key. Static.

    Returns:
        A transform whose state is `LisaState`.

    Raises:
        ValueError: both or neither of `layers` and `layer_list`; layer leaves with different
            leading sizes or no leading axis; `layer_list` naming a leaf, or layers that differ
            in structure, leaf shapes or dtypes; ``num_active > N_L``.
        TypeError: `layer_list` that is not a path string.

    Example:
        >>> params = {"embed": jnp.ones((8, 4)), "blocks": {"w": jnp.ones((6, 4, 4))}}
        >>> tx = cljax.lisa(optax.adam(1e-3), layers=cljax.select("blocks"), num_active=2)
        >>> cljax.find_state(tx.init(params), optax.ScaleByAdamState).mu["blocks"]["w"].shape
        (2, 4, 4)
        >>> params = {"embed": jnp.ones((8, 4)), "blocks": [{"w": jnp.ones((4, 4))}] * 6}
        >>> tx = cljax.lisa(optax.adam(1e-3), layer_list="blocks", num_active=2)
        >>> cljax.find_state(tx.init(params), optax.ScaleByAdamState).mu["blocks"]["w"].shape
        (2, 4, 4)

    References:
        Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
        Model Fine-Tuning", NeurIPS 2024. https://arxiv.org/abs/2403.17919
    """
    fn = "lisa"
    _checks.check_transform(fn, "inner", inner)
    if (layers is None) == (layer_list is None):
        raise ValueError(
            f"{fn}: give exactly one of `layers` (stacked (N_L, ...) leaves) and `layer_list` "
            "(the path of a list of layer subtrees)."
        )
    if layer_list is not None and not isinstance(layer_list, str):
        raise TypeError(
            f"{fn}(layer_list=...) must be a path string such as 'blocks', got "
            f"{type(layer_list).__name__}."
        )
    _checks.check_int(fn, "num_active", num_active, 1)
    _checks.check_int(fn, "interval", interval, 1)
    key0 = _key_data(seed)
    inner = optax.with_extra_args_support(inner)

    def plan_of(tree):
        if layer_list is None:
            plan = _stacked_plan(fn, layers, tree)
        else:
            plan = _list_plan(fn, layer_list, tree)
        if plan.n_layers is not None and num_active > plan.n_layers:
            raise ValueError(
                f"{fn}(num_active={num_active}) must be <= the number of layers {plan.n_layers}."
            )
        return plan

    def draw(key_data, n_layers):
        """`num_active` distinct layers, uniformly, in increasing order."""
        if n_layers is None:
            return jnp.arange(num_active, dtype=jnp.int32)
        draws = jax.random.uniform(jax.random.wrap_key_data(key_data), (n_layers,))
        chosen = _ranks(draws, jnp.ones((n_layers, n_layers), jnp.bool_)) < num_active
        return jnp.nonzero(chosen, size=num_active)[0].astype(jnp.int32)

    def init_fn(params):
        plan = plan_of(params)
        active = draw(key0, plan.n_layers)
        return LisaState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            active=active,
            inner_state=inner.init(plan.gather(active)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        plan = plan_of(updates)
        key, active, inner_state = state.key, state.active, state.inner_state
        if plan.n_layers is not None and plan.n_layers > num_active:
            flag_of = _common.by_path(plan.flags, fn, "layers")

            def redraw(_):
                new_key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key))[0])
                new_active = draw(new_key, plan.n_layers)
                moved = new_active != active
                table = _common.tie_table(
                    plan.gather(new_active),
                    lambda path, g: moved if flag_of[_common.path_name(path)] else None,
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
        sliced_params = None if params is None else plan_of(params).gather(active)
        directions, inner_state = inner.update(
            plan.gather(active), inner_state, sliced_params, **extra_args
        )
        return plan.scatter(directions, active), LisaState(
            count=optax.safe_increment(state.count), key=key, active=active, inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_update(update_fn))
