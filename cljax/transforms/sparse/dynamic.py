"""Masks that change during training: gradual magnitude / N:M pruning (SP-05), dynamic sparse
training with SET and RigL (SP-07), and dynamic sparse training inside the free capacity of a
continual learner (SP-08: `set_rigl(restrict_growth=True)`, `set_rigl_restrict`,
`dst_task_masks`).

Both keep the current masks bit-packed in state, follow the SP-MASK rules with pruning (``u = -p``
outside the mask, so pruned weights are exactly zero after `optax.apply_updates`), recompute masks
behind `lax.cond` on the step count, and zero the inner optimizer state wherever a mask changes
(any inner state type: state leaves are tied to parameters by key-path suffix and shape).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.sparse import _common
from cljax.transforms.sparse import mask_updates as _mu
from cljax.transforms.sparse._common import key_data as _key_data
from cljax.transforms.sparse.masks import erk_densities, uniform_densities

__all__ = [
    "MagnitudePruningState",
    "SetRiglState",
    "dst_task_masks",
    "magnitude_pruning",
    "set_rigl",
    "set_rigl_get_masks",
    "set_rigl_restrict",
    "set_rigl_set_masks",
]


def _has_mu(state: Any) -> bool:
    """A state with a first moment: ``mu`` (Adam-like) or ``trace`` (`optax.trace`, SGD momentum)."""
    fields = getattr(state, "_fields", ()) if isinstance(state, tuple) else ()
    return "mu" in fields or "trace" in fields


def _allocate(total: jax.Array, weights: jax.Array, caps: jax.Array) -> jax.Array:
    """Splits the int `total` over leaves in proportion to `weights` (equal shares when all are
    zero), never above `caps`, summing exactly to `total` (``sum(caps) >= total``)."""
    n = weights.shape[0]
    alloc = jnp.zeros((n,), jnp.int32)
    index = jnp.arange(n)
    for _ in range(n):  # proportional rounds: each saturates a leaf or leaves < n units over
        left = total - jnp.sum(alloc)
        open_ = alloc < caps
        w = jnp.where(open_, weights, 0.0)
        share = jnp.where(
            jnp.sum(w) > 0,
            w / jnp.maximum(jnp.sum(w), 1e-30),
            open_ / jnp.maximum(jnp.sum(open_), 1),
        )
        add = jnp.minimum(
            jnp.floor(left.astype(jnp.float32) * share).astype(jnp.int32), caps - alloc
        )
        before = jnp.cumsum(add) - add
        alloc = alloc + jnp.clip(jnp.minimum(add, left - before), 0)

    def one_each(alloc):  # the rest, one unit per open leaf, largest weight first
        left = total - jnp.sum(alloc)
        open_ = alloc < caps
        key = jnp.where(open_, weights, -jnp.inf)
        rank = jnp.sum(
            (key[None, :] > key[:, None])
            | ((key[None, :] == key[:, None]) & (index[None, :] < index[:, None])),
            axis=1,
        )
        return alloc + (open_ & (rank < left)).astype(jnp.int32)

    return lax.while_loop(lambda a: jnp.sum(a) < total, one_each, alloc)


def _pack_tree(masks: Any) -> Any:
    return jax.tree.map(
        lambda m: None if m is None else _common.pack(m), masks, is_leaf=_common.is_none
    )


def _reset_packed(inner_state: Any, old: Any, new: Any) -> Any:
    """Zeroes the inner state where two packed mask trees differ."""
    return _mu.reset_packed_changes(inner_state, old, new)


# ---------------------------------------------------------------------------------------------
# SP-05: magnitude and N:M pruning on a schedule.


class MagnitudePruningState(NamedTuple):
    """State of `magnitude_pruning`."""

    count: chex.Array  # int32 steps taken
    masks: Any  # packed uint8 mask per pruned leaf; None for dense leaves
    inner_state: Any


def magnitude_pruning(
    inner: optax.GradientTransformation,
    sparsity: optax.ScalarOrSchedule = 0.5,
    *,
    update_every: int = 1,
    scope: Literal["layer", "global"] = "layer",
    n_m: tuple[int, int] | None = None,
    axis: int = -1,
    include: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Prunes the smallest-magnitude weights on a schedule and trains the rest (SP-05).

    Every `update_every` steps (step 0 included) the masks are recomputed from the current
    weights: the ``ceil((1 - s_t) * size)`` largest ``|w|`` per leaf (``scope='layer'``), or over
    all included leaves (``scope='global'``), or, with `n_m` ``= (n, m)``, the N:M pattern along
    `axis` (then `sparsity` is unused). Between updates the masks are fixed; every step follows
    the SP-MASK rules with pruning: newly pruned weights get ``u = -p`` and stay exactly zero, and
    the inner state is zeroed where a mask changes. With a `gradual_pruning_schedule` this is
    gradual magnitude pruning; with a constant ``sparsity`` it is one-shot pruning plus masked
    retraining.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        sparsity: Pruned fraction ``s`` in [0, 1): a float or a schedule of the step count.
        update_every: Steps between mask updates. Static.
        scope: ``'layer'`` (per tensor) or ``'global'`` (one threshold). Static.
        n_m: ``(n, m)`` for N:M masks (``n <= m``), or None. Static.
        axis: The N:M grouping axis (0 for Flax ``(d_in, d_out)`` kernels). Static.
        include: A bool tree or a function of the params: the pruned leaves. Default: leaves with
            two or more dims. Static.

    Returns:
        A transform whose state is `MagnitudePruningState`; `update` needs `params`.

    Raises:
        ValueError: a sparsity outside [0, 1); ``n > m``; at `init`, a pruned leaf whose `axis`
            is not divisible by ``m``.

    Example:
        >>> tx = cljax.magnitude_pruning(optax.adam(1e-3), cljax.gradual_pruning_schedule(0.9, 0, 1000, update_every=100), update_every=100)
        >>> state = tx.init({"w": jnp.ones((8, 8)), "b": jnp.ones(8)})

    References:
        Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
        compression", 2017. https://arxiv.org/abs/1710.01878 ; Zhou et al., "Learning N:M
        Fine-grained Structured Sparse Neural Networks From Scratch", ICLR 2021.
    """
    fn = "magnitude_pruning"
    _checks.check_transform(fn, "inner", inner)
    if not callable(sparsity):
        _checks.check_in_range(fn, "sparsity", sparsity, 0.0, 1.0, high_inclusive=False)
    _checks.check_int(fn, "update_every", update_every, 1)
    _checks.check_choice(fn, "scope", scope, ("layer", "global"))
    if n_m is not None:
        if not isinstance(n_m, tuple) or len(n_m) != 2:
            raise TypeError(f"{fn}(n_m=...) must be a tuple (n, m) or None, got {n_m!r}.")
        _checks.check_int(fn, "n_m[0]", n_m[0], 1)
        _checks.check_int(fn, "n_m[1]", n_m[1], 1)
        if n_m[0] > n_m[1]:
            raise ValueError(f"{fn}(n_m=...) needs n <= m, got n={n_m[0]} > m={n_m[1]}.")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}(axis=...) must be an int, got {axis!r}.")
    inner = optax.with_extra_args_support(inner)

    def flags_of(params):
        if include is None:
            return jax.tree.map(
                lambda p: None if p is None else jnp.ndim(p) >= 2, params, is_leaf=_common.is_none
            )
        return _common.bool_tree(fn, "include", include, params)

    def check_nm(params, flags):
        if n_m is None:
            return
        for (path, p), f in zip(
            jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0],
            jax.tree.leaves(flags, is_leaf=_common.is_none),
            strict=True,
        ):
            if p is None or not f:
                continue
            shape = jnp.shape(p)
            if not shape or not -len(shape) <= axis < len(shape) or shape[axis] % n_m[1]:
                raise ValueError(
                    f"{fn}: leaf '{_common.path_name(path) or '<root>'}' has shape {tuple(shape)}; axis {axis} must exist "
                    f"and be divisible by m={n_m[1]}. Leave it dense with `include`."
                )

    def compute(params, flags, count):
        leaves = jax.tree.leaves(params, is_leaf=_common.is_none)
        fl = jax.tree.leaves(flags, is_leaf=_common.is_none)
        chosen = [i for i, (p, f) in enumerate(zip(leaves, fl, strict=True)) if p is not None and f]
        out: list = [None] * len(leaves)
        if n_m is not None:
            for i in chosen:
                out[i] = _common.nm_leaf(leaves[i], n_m[0], n_m[1], axis % jnp.ndim(leaves[i]))
        elif chosen:
            s = sparsity(count) if callable(sparsity) else sparsity
            density = 1.0 - jnp.asarray(s, jnp.float32)
            scores = [jnp.abs(jnp.asarray(leaves[i], jnp.float32)) for i in chosen]
            if scope == "global":
                total = sum(x.size for x in scores)
                masks = _common.top_k_masks(
                    scores, _common.traced_count_of(density, total), scope="global"
                )
            else:
                ks = [_common.traced_count_of(density, x.size) for x in scores]
                masks = _common.top_k_masks(scores, ks, scope="layer")
            for i, m in zip(chosen, masks, strict=True):
                out[i] = m
        treedef = jax.tree.structure(params, is_leaf=_common.is_none)
        return jax.tree.unflatten(
            treedef, [None if leaves[i] is None else out[i] for i in range(len(leaves))]
        )

    def init_fn(params):
        flags = flags_of(params)
        check_nm(params, flags)
        ones = jax.tree.map(
            lambda p, f: (
                None if p is None or not f else _common.pack(jnp.ones(jnp.shape(p), jnp.bool_))
            ),
            params,
            flags,
            is_leaf=_common.is_none,
        )
        return MagnitudePruningState(
            count=jnp.zeros([], jnp.int32), masks=ones, inner_state=inner.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params(fn, params)
        flags = flags_of(updates)
        kinds = jax.tree.map(
            lambda f: None if f is None else (_mu.MASKED if f else _mu.DENSE),
            flags,
            is_leaf=_common.is_none,
        )
        due = state.count % update_every == 0
        # Only the packed masks pass through the cond; the moment reset is elementwise and fuses.
        packed = lax.cond(
            due,
            lambda _: _pack_tree(compute(params, flags, state.count)),
            lambda _: state.masks,
            None,
        )
        inner_state = _reset_packed(state.inner_state, state.masks, packed)
        current = _mu.unpack_masks(kinds, packed, updates)
        directions, inner_state = inner.update(
            _mu.gate_in(updates, current), inner_state, params, **extra_args
        )
        out = _mu.gate_out(directions, current, params, prune=True)
        return out, MagnitudePruningState(
            count=optax.safe_increment(state.count), masks=packed, inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_update(update_fn))


# ---------------------------------------------------------------------------------------------
# SP-07: SET and RigL.


class SetRiglState(NamedTuple):
    """State of `set_rigl`."""

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data (random growth)
    masks: Any  # packed uint8 mask per sparse leaf; None for dense leaves
    inner_state: Any
    # packed uint8 growth restriction per sparse leaf (``restrict_growth=True``); None otherwise
    allowed: Any = None


def set_rigl(
    inner: optax.GradientTransformation,
    masks: Any,
    *,
    grow: Literal["gradient", "random", "momentum"] = "gradient",
    drop_fraction: chex.Numeric = 0.3,
    update_every: int = 100,
    end_step: int = 75_000,
    cosine_decay: bool = True,
    skip_update: bool = True,
    seed: int | jax.Array = 0,
    restrict_growth: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic sparse training: periodically drops the weakest weights and grows new ones.

    At steps ``t = k * update_every`` with ``0 < t < end_step``, per sparse leaf with ``n_a``
    active weights: ``d = floor(f_t * n_a)`` (capped at the number of inactive entries) with
    ``f_t = drop_fraction * (1 + cos(pi t / end_step)) / 2`` (``cosine_decay``, RigL) or
    ``drop_fraction``; the ``n_a - d`` active weights of largest ``|w|`` are kept and ``d``
    previously inactive entries are grown: those of largest ``|g|`` (``grow='gradient'``, RigL;
    `g` is the dense incoming gradient) or uniformly at random (``grow='random'``, SET). Dropped
    and grown sets are disjoint; the active count of every leaf is constant; ties go to the
    earlier index.

    ``grow='momentum'`` is sparse momentum: the total number dropped is regrown across leaves in
    proportion to each leaf's mean ``|mu|`` over its active weights (exact integer split, capped
    by each leaf's inactive entries; the total active count is constant, per-leaf counts move),
    and within a leaf at the inactive entries of largest ``|mu|``, with `mu` the first moment of
    the single inner state that has one (`mu`, or `trace` for SGD momentum). So that `mu` tracks the dense gradient, `inner` then
    sees the unmasked gradient (only the update is masked) and no moments are reset, as in the
    reference implementation. Dropped weights get ``u = -p``; grown weights start at zero (they were pruned)
    with their inner state zeroed, and on the update step they (and the dropped entries) feed no
    gradient to `inner`, so their moments are still zero afterwards. With ``skip_update`` (RigL's
    Algorithm 1 and jaxpruner) a mask-update step moves no weight (dense leaves included) except the dropped ones;
    otherwise it also takes the gradient step on the kept weights. Other steps follow the SP-MASK
    rules with pruning.

    With ``restrict_growth=True`` (SP-08, dynamic sparse training inside the free capacity of a
    continual learner) the state also holds a bit-packed mask ``A`` per sparse leaf, all True at
    `init` and set by `set_rigl_restrict` at a task boundary (no recompilation). Growth candidates
    are then ``~M & A``, in every `grow` mode; the number dropped (and grown) in a leaf is capped
    by its number of candidates (``grow='momentum'``: each leaf's share is capped by them), so the
    active count stays constant; and entries outside both ``M`` and ``A`` (weights earlier tasks
    own) are frozen: they get ``u = 0``, not ``-p``, and feed no gradient to `inner` (except with
    ``grow='momentum'``, whose `inner` sees the dense gradient). Entries outside ``M`` but inside
    ``A`` are pruned as usual. With ``A`` all True the results equal ``restrict_growth=False``.

    Notes:
        With ``skip_update`` the inner optimizer still advances on a mask-update step (its moments
        of the kept weights absorb that step's gradient, its step count increments) while the
        weights do not move; skipping the inner step exactly would need a select over the whole
        optimizer state every step, which measured 2.5x slower than AdamW on CPU.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        masks: Initial masks with the structure of the parameters (e.g. `random_mask` with
            `erk_densities`); None leaves are dense. Static.
        grow: ``'gradient'`` (RigL), ``'random'`` (SET) or ``'momentum'`` (sparse momentum).
            Static.
        drop_fraction: ``f_0`` (0.3 in jaxpruner).
        update_every: ``ΔT``, steps between mask updates (100). Static.
        end_step: ``t_end``, the step after which masks stay fixed (75% of training). Static.
        cosine_decay: Anneal the drop fraction with RigL's cosine. Static.
        skip_update: Skip the gradient step on mask-update steps. Static.
        seed: An int or a PRNG key for random growth. Static.
        restrict_growth: Hold a growth restriction in state (`SetRiglState.allowed`, one bit per
            entry of each sparse leaf; None when False). Static.

    Returns:
        A transform whose state is `SetRiglState`; `update` needs `params`.

    Raises:
        TypeError: a flag that is not a bool.
        ValueError: a drop fraction outside [0, 1]; an unknown `grow`; at `init`, a leaf without
            a mask or with a mask of the wrong shape, or (``grow='momentum'``) an inner state
            without exactly one first moment.

    Example:
        >>> params = {"w": jnp.ones((8, 8))}
        >>> masks = cljax.random_mask(params, 0.25, jax.random.key(0))
        >>> tx = cljax.set_rigl(optax.adam(1e-3), masks, update_every=100, end_step=10_000)
        >>> state = tx.init(params)

    References:
        Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020.
        https://arxiv.org/abs/1911.11134 ; Mocanu et al., "Scalable training of artificial neural
        networks with adaptive sparse connectivity inspired by network science", Nature
        Communications 2018 ; Dettmers and Zettlemoyer, "Sparse Networks from Scratch: Faster
        Training without Losing Performance", 2019. https://arxiv.org/abs/1907.04840
    """
    fn = "set_rigl"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_choice(fn, "grow", grow, ("gradient", "random", "momentum"))
    _checks.check_in_range(fn, "drop_fraction", drop_fraction, 0.0, 1.0)
    _checks.check_int(fn, "update_every", update_every, 1)
    _checks.check_int(fn, "end_step", end_step, 1)
    for name, flag in (
        ("cosine_decay", cosine_decay),
        ("skip_update", skip_update),
        ("restrict_growth", restrict_growth),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}({name}=...) must be a bool, got {flag!r}.")
    key0 = _key_data(seed)
    kinds = {
        k: (_mu.DENSE if v == _mu.DENSE else _mu.MASKED)
        for k, v in _mu.kinds_from_masks(fn, masks).items()
    }
    lookup = _common.by_path(masks, fn, "masks")
    kinds_of = lambda params: _mu.kind_tree(fn, kinds, params)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        packed = _mu.init_masks(
            fn, kinds_of(params), params, lambda path, p: lookup[_common.path_name(path)]
        )
        inner_state = inner.init(params)
        if grow == "momentum":
            momentum_of(inner_state)  # fails early without a first moment
        allowed = None
        if restrict_growth:  # every entry allowed until `set_rigl_restrict`
            allowed = jax.tree.map(
                lambda m, p: None if m is None else _common.pack(jnp.ones(jnp.shape(p), jnp.bool_)),
                packed,
                params,
                is_leaf=_common.is_none,
            )
        return SetRiglState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            masks=packed,
            inner_state=inner_state,
            allowed=allowed,
        )

    def momentum_of(inner_state):
        found = _tree.find_states(inner_state, _has_mu)
        if len(found) != 1:
            raise ValueError(
                f"{fn}(grow='momentum'): the inner optimizer must hold exactly one state with a first "
                f"moment (`mu` or `trace`: optax.adam, optax.sgd(momentum=...)); found {len(found)}."
            )
        state = found[0]
        return _common.by_path(state.mu if "mu" in state._fields else state.trace, fn, "mu")

    def regrow(current, updates, params, count, key, inner_state=None, allowed=None):
        t = count.astype(jnp.float32)
        fraction = jnp.asarray(drop_fraction, jnp.float32)
        if cosine_decay:
            fraction = fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * t / end_step))
        leaves = jax.tree.leaves(current, is_leaf=_common.is_none)
        grads = jax.tree.leaves(updates, is_leaf=_common.is_none)
        weights = jax.tree.leaves(params, is_leaf=_common.is_none)
        limits = (
            [None] * len(leaves)
            if allowed is None
            else jax.tree.leaves(allowed, is_leaf=_common.is_none)
        )
        if grow == "random":  # threefry is costly to compile: only SET draws
            keys = jax.random.split(jax.random.wrap_key_data(key), max(1, len(leaves)))
        if grow == "momentum":
            momenta = momentum_of(inner_state)
            names = [
                _common.path_name(path)
                for path, _ in jax.tree_util.tree_flatten_with_path(
                    current, is_leaf=_common.is_none
                )[0]
            ]
        sorted_keys, counts, where, drops, rooms, importance = [], [], [], [], [], []
        for i, (m, g, w, a) in enumerate(zip(leaves, grads, weights, limits, strict=True)):
            if m is None:
                continue
            active = jnp.sum(m, dtype=jnp.int32)
            drop = jnp.floor(fraction * active.astype(jnp.float32)).astype(jnp.int32)
            # At most as many as there are growth candidates: ~m, or ~m & a when restricted.
            room = m.size - active if a is None else jnp.sum(~m & a, dtype=jnp.int32)
            drop = jnp.minimum(drop, room)
            if grow == "gradient":
                score = jnp.abs(g.astype(jnp.float32))
            elif grow == "random":
                score = jax.random.uniform(keys[i], m.shape, jnp.float32)
            else:
                mu = momenta.get(names[i])
                if mu is None or tuple(mu.shape) != tuple(m.shape):
                    raise ValueError(
                        f"{fn}(grow='momentum'): no first moment of shape {tuple(m.shape)} for leaf '{names[i]}'."
                    )
                score = jnp.abs(mu.astype(jnp.float32))
                importance.append(
                    jnp.sum(jnp.where(m, score, 0.0)) / jnp.maximum(active, 1).astype(jnp.float32)
                )
            # Candidates have keys >= 2**31 (scores are >= 0); others 0, never chosen within `room`.
            blocked = m if a is None else m | ~a
            sorted_keys += [
                jnp.where(m, _common.sortable(jnp.abs(w.astype(jnp.float32))), jnp.uint32(0)),
                jnp.where(blocked, jnp.uint32(0), _common.sortable(score)),
            ]
            counts += [active - drop, drop]
            where.append(i)
            drops.append(drop)
            rooms.append(room)
        if grow == "momentum" and where:  # redistribute the regrowth over the leaves
            caps = jnp.stack(rooms)
            budget = _allocate(jnp.sum(jnp.stack(drops)), jnp.stack(importance), caps)
            counts = [c for j, c in enumerate(counts) if j % 2 == 0]
            counts = [x for j, keep in enumerate(counts) for x in (keep, budget[j])]
        chosen = _common.top_k_from_keys(sorted_keys, counts, scope="layer")  # one loop, all leaves
        out = list(leaves)
        for j, i in enumerate(where):
            out[i] = chosen[2 * j] | chosen[2 * j + 1]
        treedef = jax.tree.structure(current, is_leaf=_common.is_none)
        return jax.tree.unflatten(treedef, out)

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params(fn, params)
        kind = kinds_of(updates)
        due = (state.count > 0) & (state.count % update_every == 0) & (state.count < end_step)

        def mask_step(_):
            current = _mu.unpack_masks(kind, state.masks, updates)
            allowed = (
                None if state.allowed is None else _mu.unpack_masks(kind, state.allowed, updates)
            )
            if grow == "random":
                key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
                new = regrow(
                    current,
                    updates,
                    params,
                    state.count,
                    jax.random.key_data(sub),
                    allowed=allowed,
                )
                return _pack_tree(new), jax.random.key_data(key)
            return _pack_tree(
                regrow(current, updates, params, state.count, None, state.inner_state, allowed)
            ), state.key

        # Only the packed masks pass through the cond; the moment reset is elementwise and fuses.
        packed, key = lax.cond(due, mask_step, lambda _: (state.masks, state.key), None)
        current = _mu.unpack_masks(kind, packed, updates)
        if (
            grow == "momentum"
        ):  # the inner optimizer sees dense gradients: its momentum guides growth
            reset, fed_updates = state.inner_state, updates
        else:
            reset = _reset_packed(state.inner_state, state.masks, packed)
            # Changed entries get no gradient this step, so grown weights keep zero moments.
            # ``old & new == new & ~(old ^ new)``: reuses the unpacked current masks and the same
            # ``old ^ new`` expression the reset above unpacks, instead of a third unpacked tree.
            changed = _mu.unpack_masks(
                kind,
                jax.tree.map(
                    lambda o, n: None if o is None else o ^ n,
                    state.masks,
                    packed,
                    is_leaf=_common.is_none,
                ),
                updates,
            )
            steady = jax.tree.map(
                lambda c, d: None if c is None else c & ~d,
                current,
                changed,
                is_leaf=_common.is_none,
            )
            fed_updates = _mu.gate_in(updates, steady)
        directions, trained = inner.update(fed_updates, reset, params, **extra_args)
        if state.allowed is None:
            out = _mu.gate_out(directions, current, params, prune=True)
        else:  # outside the mask: pruned where allowed, frozen (earlier tasks' weights) elsewhere
            out = jax.tree.map(
                lambda u, m, a, p: (
                    u
                    if u is None or m is None
                    else jnp.where(
                        m,
                        u,
                        jnp.where(
                            _common.unpack(a, jnp.shape(u)), (-p).astype(u.dtype), jnp.zeros_like(u)
                        ),
                    )
                ),
                directions,
                current,
                state.allowed,
                params,
                is_leaf=_common.is_none,
            )
        if skip_update:  # a mask-update step moves no weight except the dropped ones (to zero)
            out = jax.tree.map(
                lambda u, m: (
                    u
                    if u is None
                    else jnp.where(due if m is None else due & m, jnp.zeros_like(u), u)
                ),
                out,
                current,
                is_leaf=_common.is_none,
            )
        return out, SetRiglState(
            count=optax.safe_increment(state.count),
            key=key,
            masks=packed,
            inner_state=trained,
            allowed=state.allowed,
        )

    return optax.GradientTransformationExtraArgs(init_fn, _common.compiled_update(update_fn))


# ---------------------------------------------------------------------------------------------
# SP-08: dynamic sparse training inside the free capacity (task boundaries and initial masks).


def _find_rigl(fn: str, opt_state: Any, index: int | None) -> SetRiglState:
    try:
        return _tree.find_state(opt_state, SetRiglState, index=index)
    except ValueError as err:
        raise ValueError(f"{fn}: {str(err).removeprefix('find_state: ')}") from err


def _check_inside(fn: str, masks: Any, allowed: Any) -> None:
    """Raises when a (concrete) packed mask has an active entry outside the packed `allowed`."""
    for (path, m), a in zip(
        jax.tree_util.tree_flatten_with_path(masks, is_leaf=_common.is_none)[0],
        jax.tree.leaves(allowed, is_leaf=_common.is_none),
        strict=True,
    ):
        if m is None or a is None:
            continue
        try:
            outside = np.asarray(m) & ~np.asarray(a)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            continue  # traced: checked where it is concrete
        n = int(np.unpackbits(outside).sum())  # padding bits of a packed mask are zero
        if n:
            raise ValueError(
                f"{fn}: leaf '{_common.path_name(path) or '<root>'}' has {n} active entries outside "
                "`allowed`; a task's mask must lie inside its free capacity (draw it with "
                "`dst_task_masks`)."
            )


def _set(
    fn: str, opt_state: Any, masks: Any, allowed: Any, index: int | None, *, restrict: bool
) -> Any:
    state = _find_rigl(fn, opt_state, index)
    packed = state.masks if masks is None else _mu.replace_masks(fn, state.masks, masks)
    limit = state.allowed
    if restrict:
        if state.allowed is None:
            raise ValueError(
                f"{fn}: the `set_rigl` state holds no growth restriction; build it with "
                "`set_rigl(..., restrict_growth=True)`."
            )
        if allowed is None:  # every entry allowed (padding bits are never unpacked)
            limit = jax.tree.map(
                lambda a: None if a is None else jnp.full(a.shape, 0xFF, jnp.uint8),
                state.allowed,
                is_leaf=_common.is_none,
            )
        else:
            limit = _mu.replace_masks(fn, state.allowed, allowed)
    if limit is not None:
        _check_inside(fn, packed, limit)
    inner = _mu.reset_packed_changes(state.inner_state, state.masks, packed)
    new = state._replace(masks=packed, inner_state=inner, allowed=limit)
    return _tree.replace_state(opt_state, new, index=index)


def set_rigl_restrict(
    opt_state: Any, allowed: Any, *, masks: Any = None, index: int | None = None
) -> Any:
    """Restricts `set_rigl`'s growth to `allowed` (a new task's free capacity). Call between steps.

    Writes the growth restriction ``A`` of a `set_rigl` built with ``restrict_growth=True``:
    from now on weights grow only at ``~M & A`` and entries outside ``M | A`` are frozen. With
    `masks`, also sets the current masks ``M`` (the new task's initial topology) in the same call;
    the inner state is zeroed where ``M`` changes. The state keeps its structure: no
    recompilation.

    Args:
        opt_state: The whole optimizer state (holding one `SetRiglState`).
        allowed: Boolean arrays with the structure of the parameters (e.g. the complement of the
            union of earlier tasks' masks; None for dense leaves), or None: every entry allowed.
        masks: The new current masks (inside `allowed`), or None to keep them.
        index: Which `SetRiglState` when there are several.

    Returns:
        `opt_state` with the new restriction (and masks).

    Raises:
        ValueError: no (or several) `SetRiglState`; a state built without ``restrict_growth``; a
            mask of the wrong shape or a missing leaf; active entries outside `allowed`.

    Example:
        >>> params = {"w": jnp.zeros(8)}
        >>> tx = cljax.set_rigl(optax.sgd(0.1), {"w": jnp.arange(8) < 2}, restrict_growth=True)
        >>> free = {"w": jnp.arange(8) >= 4}
        >>> state = cljax.set_rigl_restrict(tx.init(params), free, masks={"w": jnp.arange(8) == 4})
        >>> cljax.set_rigl_get_masks(state, params)["w"].nonzero()[0]
        Array([4], dtype=int32)

    References:
        Yildirim et al., "Continual Learning with Dynamic Sparse Training: Exploring Algorithms
        for Effective Model Updates", 2023.
    """
    return _set("set_rigl_restrict", opt_state, masks, allowed, index, restrict=True)


def set_rigl_set_masks(opt_state: Any, masks: Any, *, index: int | None = None) -> Any:
    """Replaces the current masks of `set_rigl` (a new topology). Call between steps.

    The inner state is zeroed where a mask changes; on the next step weights outside the new
    masks are pruned (``u = -p``), except, with ``restrict_growth``, those outside ``allowed``
    (frozen). The active count of a leaf is the new mask's from then on.

    Args:
        opt_state: The whole optimizer state (holding one `SetRiglState`).
        masks: Boolean arrays with the structure of the parameters; None for dense leaves.
        index: Which `SetRiglState` when there are several.

    Returns:
        `opt_state` with the new masks.

    Raises:
        ValueError: no (or several) `SetRiglState`; a mask of the wrong shape or a missing leaf;
            with ``restrict_growth``, active entries outside ``allowed``.

    Example:
        >>> params = {"w": jnp.zeros(4)}
        >>> tx = cljax.set_rigl(optax.sgd(0.1), {"w": jnp.arange(4) < 2})
        >>> state = cljax.set_rigl_set_masks(tx.init(params), {"w": jnp.arange(4) >= 2})
        >>> cljax.set_rigl_get_masks(state, params)["w"]
        Array([False, False,  True,  True], dtype=bool)
    """
    return _set("set_rigl_set_masks", opt_state, masks, None, index, restrict=False)


def set_rigl_get_masks(opt_state: Any, params: Any, *, index: int | None = None) -> Any:
    """Returns the current masks of `set_rigl`, unpacked (None for dense leaves).

    Args:
        opt_state: The whole optimizer state (holding one `SetRiglState`).
        params: The parameters (or any tree with their shapes).
        index: Which `SetRiglState` when there are several.

    Raises:
        ValueError: no (or several) `SetRiglState`; `params` that do not match the state.

    Example:
        >>> params = {"w": jnp.zeros(3)}
        >>> tx = cljax.set_rigl(optax.sgd(0.1), {"w": jnp.array([True, False, True])})
        >>> cljax.set_rigl_get_masks(tx.init(params), params)["w"]
        Array([ True, False,  True], dtype=bool)
    """
    fn = "set_rigl_get_masks"
    return _mu.masks_like(fn, _find_rigl(fn, opt_state, index).masks, params)


@jax.jit
def _draw_inside(key: jax.Array, free: jax.Array, k: jax.Array) -> jax.Array:
    """`k` entries of `free`, uniformly at random (a random permutation's first free entries)."""
    rank = jax.random.permutation(key, free.size).reshape(free.shape).astype(jnp.uint32)
    keys = jnp.where(free, rank + jnp.uint32(1), jnp.uint32(0))
    return _common.top_k_from_keys([keys], [k], scope="layer")[0]


def dst_task_masks(
    free: Any,
    density: Any,
    key: jax.Array,
    *,
    allocation: Literal["erk", "uniform"] = "erk",
) -> Any:
    """Draws a new task's initial random masks inside the free capacity (SP-08 protocol).

    Leaf ``l`` gets exactly ``ceil(d_l * size_l)`` active entries (as `random_mask`), uniformly at
    random among its free entries, from ``fold_in(key, crc32(leaf path))``. The per-leaf densities
    ``d_l`` are relative to the whole leaf, so a task's density stays explicit however much
    capacity earlier tasks used: `density` is the task's overall density, split over the leaves
    by ERK (`erk_densities`) or uniformly (`uniform_densities`), or a tree of per-leaf densities.
    Every leaf where `free` is an array gets a mask, 1-D leaves included (unlike the builders'
    default); a None mask is a dense leaf for `set_rigl`, which every task would train, so keep
    such leaves (task heads) out of the sparse transform, e.g. with `optax.partition`.

    Args:
        free: Boolean arrays with the structure of the parameters: the entries no earlier task
            owns (``~union``); None for leaves outside the protocol (they get None). Concrete.
        density: The task's density in (0, 1], or a tree of per-leaf densities (None gives a None
            mask).
        key: A PRNG key.
        allocation: ``'erk'`` or ``'uniform'`` (for a float `density`). Static.

    Returns:
        A tree of boolean masks (None where `free` is None), each inside `free`.

    Raises:
        ValueError: an unknown `allocation`; a density outside (0, 1]; a leaf whose free capacity
            cannot hold its count (the message names the leaf and both counts).
        TypeError: a `free` leaf that is not a concrete array.

    Example:
        >>> free = {"w": jnp.arange(16).reshape(4, 4) >= 8}
        >>> m = cljax.dst_task_masks(free, 0.25, jax.random.key(0))["w"]
        >>> int(m.sum()), bool((m & ~free["w"]).any())
        (4, False)

    References:
        Yildirim et al., "Continual Learning with Dynamic Sparse Training: Exploring Algorithms
        for Effective Model Updates", 2023 ; Evci et al.,
        "Rigging the Lottery: Making All Tickets Winners", ICML 2020 (ERK).
    """
    fn = "dst_task_masks"
    _checks.check_choice(fn, "allocation", allocation, ("erk", "uniform"))
    for path, f in jax.tree_util.tree_flatten_with_path(free, is_leaf=_common.is_none)[0]:
        if f is None:
            continue
        values = _common.concrete_bool(f) if hasattr(f, "shape") else None
        if values is None:
            raise TypeError(
                f"{fn}: leaf '{_common.path_name(path) or '<root>'}' of `free` is "
                f"{type(f).__name__}; pass a concrete boolean array (or None)."
            )
    include = jax.tree.map(lambda f: f is not None, free, is_leaf=_common.is_none)
    if isinstance(density, (int, float, np.floating, np.integer)) and not isinstance(density, bool):
        _common.check_density(fn, density)
        split = erk_densities if allocation == "erk" else uniform_densities
        densities = split(free, float(density), include=include)
    else:
        densities = density
    lookup = _common.by_path(densities, fn, "density")

    def leaf(path, f):
        if f is None:
            return None
        name = _common.path_name(path)
        where = name or "<root>"
        if name not in lookup:
            raise ValueError(f"{fn}: `density` has no entry for leaf '{where}'.")
        d = lookup[name]
        if d is None:
            return None
        _common.check_density(fn, d, f"density['{name}']")
        values = np.asarray(f).astype(bool)
        k = _common.count_of(float(d), values.size)
        room = int(values.sum())
        if k > room:
            raise ValueError(
                f"{fn}: leaf '{where}' needs {k} active entries (density {float(d):.4g} of "
                f"{values.size}) but only {room} are free; lower the task's density or give "
                "the model more capacity."
            )
        leaf_key = jax.random.fold_in(key, _common.path_hash(path))
        return _draw_inside(leaf_key, jnp.asarray(values), jnp.int32(k))

    return jax.tree_util.tree_map_with_path(leaf, free, is_leaf=_common.is_none)
