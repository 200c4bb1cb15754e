"""Continual-learning masks: SPU (SP-01) and ExSSNeT exclusive masks (SP-02).

HFT (SP-03) and LISA (SP-04) are in `cljax.transforms.sparse.sampling`.

* `spu` — selective parameter update: only the top entries of an importance score train in the
  target leaves; `spu_accumulate` and `spu_set_task` build the per-task mask.
* `exclusive_masks` — weights train only where the current task's mask is free of every earlier
  task's mask; a fixed-capacity, bit-packed bank of task masks (`exclusive_masks_start_task`,
  `exclusive_masks_commit_task`, `exclusive_masks_lookup`); `supermask` is the edge-popup
  forward mask with its straight-through gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.sparse import _common
from cljax.transforms.sparse import mask_updates as _mu

__all__ = [
    "ExclusiveMasksState",
    "SpuState",
    "exclusive_masks",
    "exclusive_masks_commit_task",
    "exclusive_masks_lookup",
    "exclusive_masks_start_task",
    "spu",
    "spu_accumulate",
    "spu_set_task",
    "supermask",
]


def _find(fn: str, opt_state: Any, state_type: type, index: int | None) -> Any:
    try:
        return _tree.find_state(opt_state, state_type, index=index)
    except ValueError as err:
        raise ValueError(f"{fn}: {str(err).removeprefix('find_state: ')}") from err


def _concrete_int(x: Any) -> int | None:
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# SP-01: SPU.


class SpuState(NamedTuple):
    """State of `spu`."""

    masks: Any  # packed uint8 mask per target leaf; None (trained fully); MaskedNode (frozen)
    inner_state: Any  # the inner transform's state (frozen leaves hold none)


def spu(
    inner: optax.GradientTransformation,
    *,
    targets: Any,
    train_fully: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Selective parameter update: trains only importance-chosen entries of the target leaves.

    Leaves selected by `targets` train on an element mask kept in state (all False until the
    first `spu_set_task`); leaves selected by `train_fully` (biases, a projection) train
    densely; every other leaf is frozen and holds no optimizer state. The masks follow the
    SP-MASK rules (gradient masked before `inner`, update after: weight decay cannot move frozen
    entries). At each task start, accumulate the importance with `spu_accumulate` and call
    `spu_set_task`.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        targets: A bool tree or a function of the params (e.g. ``cljax.select("c_fc/kernel")``):
            the leaves with element masks. Static.
        train_fully: The same, for the leaves trained densely. Static.

    Returns:
        A transform whose state is `SpuState`.

    Raises:
        ValueError: at `init`, a leaf selected by both `targets` and `train_fully`.

    Example:
        >>> tx = cljax.spu(optax.adamw(1e-3), targets=cljax.select("w"), train_fully=cljax.select("b"))
        >>> state = tx.init({"w": jnp.ones((4, 4)), "b": jnp.ones(4), "frozen": jnp.ones(4)})

    References:
        Zhang et al., "Overcoming Generic Knowledge Loss with Selective Parameter Update", CVPR
        2024. https://arxiv.org/abs/2308.12462
    """
    fn = "spu"
    _checks.check_transform(fn, "inner", inner)

    def kinds_of(params):
        target = _common.bool_tree(fn, "targets", targets, params)
        dense = (
            _common.bool_tree(fn, "train_fully", train_fully, params)
            if train_fully is not None
            else None
        )

        def kind(path, t, d):
            if t is None:
                return None
            d = bool(d) if dense is not None else False
            if t and d:
                raise ValueError(
                    f"{fn}: leaf '{_common.path_name(path) or '<root>'}' is selected by both `targets` and `train_fully`."
                )
            return _mu.MASKED if t else (_mu.DENSE if d else _mu.FROZEN)

        other = (
            dense
            if dense is not None
            else jax.tree.map(
                lambda t: None if t is None else False, target, is_leaf=_common.is_none
            )
        )
        return jax.tree_util.tree_map_with_path(kind, target, other, is_leaf=_common.is_none)

    return _mu.element_mask_transform(
        fn,
        inner,
        kinds_of,
        lambda path, p: jnp.zeros(jnp.shape(p), jnp.bool_),
        SpuState,
        prune=False,
    )


def spu_accumulate(importance: Any, grads: Any, *, signed: bool = True) -> Any:
    """Adds one batch's gradients to an SPU importance sum (start from ``importance=None``).

    SPU's reference code sums the *signed* gradients of ``||f(x)||^2`` (the label-free logit
    norm) over a quarter of the task's batches and ranks ``|sum|`` (``signed=True``, the
    default); ``signed=False`` sums ``|g|`` instead (MAS-like), which ranks differently.

    Example:
        >>> total = cljax.spu_accumulate(None, {"w": jnp.array([1.0, -2.0])})
        >>> cljax.spu_accumulate(total, {"w": jnp.array([-1.0, -1.0])})["w"]
        Array([ 0., -3.], dtype=float32)
    """
    if not isinstance(signed, bool):
        raise TypeError(f"spu_accumulate(signed=...) must be a bool, got {signed!r}.")
    term = grads if signed else jax.tree.map(jnp.abs, grads)
    term = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), term)
    if importance is None:
        return term
    _checks.check_same_structure("spu_accumulate", importance=importance, grads=grads)
    return jax.tree.map(jnp.add, importance, term)


def spu_set_task(
    opt_state: Any, importance: Any, *, density: float = 0.1, index: int | None = None
) -> Any:
    """Sets SPU's masks for a new task: the top ``floor(density * size)`` entries of
    ``|importance|`` in each target leaf (per tensor, exact count, ties to the earlier index).

    The inner state is zeroed wherever the mask changes.

    Args:
        opt_state: The whole optimizer state (holding one `SpuState`).
        importance: Scores with the structure of the parameters (e.g. from `spu_accumulate`);
            leaves outside the targets are ignored and may be None.
        density: The selection rate, in (0, 1] (0.1 in the paper).
        index: Which `SpuState` when there are several.

    Returns:
        `opt_state` with the new masks.

    Raises:
        ValueError: a density outside (0, 1]; a target leaf without importance or of another
            shape; no `SpuState`.

    Example:
        >>> params = {"w": jnp.zeros(10)}
        >>> tx = cljax.spu(optax.sgd(0.1), targets=cljax.select("w"))
        >>> state = cljax.spu_set_task(tx.init(params), {"w": jnp.arange(10.0)}, density=0.2)
    """
    fn = "spu_set_task"
    _common.check_density(fn, density)
    state = _find(fn, opt_state, SpuState, index)
    scores = _common.by_path(importance, fn, "importance")
    names, arrays = [], []
    for path, m in jax.tree_util.tree_flatten_with_path(
        state.masks, is_leaf=_common.is_none_or_masked
    )[0]:
        if m is None or isinstance(m, optax.MaskedNode):
            continue
        name = _common.path_name(path)
        score = scores.get(name)
        if score is None:
            raise ValueError(
                f"{fn}: `importance` has no scores for target leaf '{name or '<root>'}'."
            )
        if _common.packed_shape(jnp.shape(score)) != tuple(m.shape):
            raise ValueError(
                f"{fn}: leaf '{name or '<root>'}' has importance of shape {tuple(jnp.shape(score))}, which does not match its parameter."
            )
        names.append(name)
        arrays.append(jnp.abs(jnp.asarray(score, jnp.float32)))
    ks = [_common.count_of(density, a.size, rounding="floor") for a in arrays]
    chosen = dict(zip(names, _common.top_k_masks(arrays, ks, scope="layer"), strict=True))
    masks = jax.tree_util.tree_map_with_path(
        lambda path, m: (
            None
            if m is None
            else (m if isinstance(m, optax.MaskedNode) else chosen[_common.path_name(path)])
        ),
        state.masks,
        is_leaf=_common.is_none_or_masked,
    )
    new_packed = _mu.replace_masks(fn, state.masks, masks)
    inner = _mu.reset_packed_changes(state.inner_state, state.masks, new_packed)
    return _tree.replace_state(
        opt_state, SpuState(masks=new_packed, inner_state=inner), index=index
    )


# ---------------------------------------------------------------------------------------------
# SP-02: ExSSNeT exclusive masks.


class ExclusiveMasksState(NamedTuple):
    """State of `exclusive_masks`. Masks are packed along each leaf's last axis."""

    count: chex.Array  # int32 number of committed tasks
    current: Any  # packed mask M_t of the task being trained
    union: Any  # packed union U of the committed tasks' masks
    bank: Any  # packed (capacity, ...) masks of the committed tasks
    inner_state: Any


def exclusive_masks(
    inner: optax.GradientTransformation, capacity: int
) -> optax.GradientTransformationExtraArgs:
    """Trains weights only where the current task's mask is free of all earlier tasks' masks.

    With the current task's mask ``M_t`` and the union ``U`` of the committed tasks' masks, the
    exclusive set is ``E = M_t & ~U``: `inner` sees ``g * E`` and the update is ``u * E``, so
    every weight an earlier task uses is bit-identical from then on, while the forward pass of
    task ``t`` may still use the shared weights ``M_t & U``. Task masks are kept in a bit-packed
    bank of fixed `capacity` (no recompilation between tasks).

    Per task: learn ``M_t`` (e.g. edge-popup scores through `supermask`), call
    `exclusive_masks_start_task` with it, train, then `exclusive_masks_commit_task`. Before the
    first `start_task`, ``M_t`` is all True (every free weight trains, as in PackNet).

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        capacity: Maximum number of committed tasks. Static.

    Returns:
        A transform whose state is `ExclusiveMasksState`.

    Example:
        >>> tx = cljax.exclusive_masks(optax.sgd(0.1), capacity=4)
        >>> state = tx.init({"w": jnp.ones((4, 4))})

    References:
        Yadav and Bansal, "Exclusive Supermask Subnetwork Training for Continual Learning",
        Findings of ACL 2023. https://arxiv.org/abs/2210.10209
    """
    fn = "exclusive_masks"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "capacity", capacity, 1)

    def init_fn(params):
        ones = jax.tree.map(
            lambda p: None if p is None else _common.pack(jnp.ones(jnp.shape(p), jnp.bool_)),
            params,
            is_leaf=_common.is_none,
        )
        zeros = jax.tree.map(
            lambda m: None if m is None else jnp.zeros_like(m), ones, is_leaf=_common.is_none
        )
        bank = jax.tree.map(
            lambda m: None if m is None else jnp.zeros((capacity,) + m.shape, jnp.uint8),
            ones,
            is_leaf=_common.is_none,
        )
        return ExclusiveMasksState(
            count=jnp.zeros([], jnp.int32),
            current=ones,
            union=zeros,
            bank=bank,
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        free = jax.tree.map(
            lambda g, c, u: None if g is None else _common.unpack(c & ~u, jnp.shape(g)),
            updates,
            state.current,
            state.union,
            is_leaf=_common.is_none,
        )
        directions, inner_state = optax.with_extra_args_support(inner).update(
            _mu.gate_in(updates, free), state.inner_state, params, **extra_args
        )
        out = _mu.gate_out(directions, free, params, prune=False)
        return out, state._replace(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def exclusive_masks_start_task(
    opt_state: Any, masks: Any = None, *, index: int | None = None
) -> Any:
    """Sets the mask ``M_t`` of the task about to be trained (None: every entry).

    The inner state is zeroed where the exclusive set ``M_t & ~U`` changes.

    Args:
        opt_state: The whole optimizer state (holding one `ExclusiveMasksState`).
        masks: Boolean masks with the structure of the parameters, or None for all True.
        index: Which `ExclusiveMasksState` when there are several.

    Raises:
        ValueError: a mask of the wrong shape or a missing leaf; no `ExclusiveMasksState`.

    Example:
        >>> tx = cljax.exclusive_masks(optax.sgd(0.1), capacity=2)
        >>> state = tx.init({"w": jnp.ones(4)})
        >>> state = cljax.exclusive_masks_start_task(state, {"w": jnp.array([1, 1, 0, 0], bool)})
    """
    fn = "exclusive_masks_start_task"
    state = _find(fn, opt_state, ExclusiveMasksState, index)
    if masks is None:
        current = jax.tree.map(
            lambda m: None if m is None else jnp.full(m.shape, 0xFF, jnp.uint8),
            state.current,
            is_leaf=_common.is_none,
        )
    else:
        current = _mu.replace_masks(fn, state.current, masks)
    old_free = jax.tree.map(
        lambda c, u: None if c is None else c & ~u,
        state.current,
        state.union,
        is_leaf=_common.is_none,
    )
    new_free = jax.tree.map(
        lambda c, u: None if c is None else c & ~u, current, state.union, is_leaf=_common.is_none
    )
    inner = _mu.reset_packed_changes(state.inner_state, old_free, new_free)
    return _tree.replace_state(
        opt_state, state._replace(current=current, inner_state=inner), index=index
    )


def exclusive_masks_commit_task(opt_state: Any, *, index: int | None = None) -> Any:
    """Stores the current task's mask in the bank and adds it to the union. Call after training.

    Raises:
        ValueError: the bank is full (`capacity` tasks committed); no `ExclusiveMasksState`.

    Example:
        >>> tx = cljax.exclusive_masks(optax.sgd(0.1), capacity=2)
        >>> state = cljax.exclusive_masks_commit_task(tx.init({"w": jnp.ones(4)}))
        >>> int(state.count)
        1
    """
    fn = "exclusive_masks_commit_task"
    state = _find(fn, opt_state, ExclusiveMasksState, index)
    count = _concrete_int(state.count)
    capacity = next((b.shape[0] for b in jax.tree.leaves(state.bank)), None)
    if count is not None and capacity is not None and count >= capacity:
        raise ValueError(
            f"{fn}: capacity exceeded: the bank holds {capacity} task masks already; build "
            "`exclusive_masks` with a larger `capacity`."
        )
    slot = jnp.minimum(state.count, (capacity or 1) - 1)
    bank = jax.tree.map(
        lambda b, c: None if b is None else lax.dynamic_update_index_in_dim(b, c, slot, axis=0),
        state.bank,
        state.current,
        is_leaf=_common.is_none,
    )
    union = jax.tree.map(
        lambda u, c: None if u is None else u | c,
        state.union,
        state.current,
        is_leaf=_common.is_none,
    )
    new = state._replace(count=optax.safe_increment(state.count), bank=bank, union=union)
    return _tree.replace_state(opt_state, new, index=index)


def exclusive_masks_lookup(
    opt_state: Any, params: Any, task: int | None = None, *, index: int | None = None
) -> Any:
    """Returns a committed task's mask (``task`` in ``[0, count)``), or the union (``task=None``).

    Args:
        opt_state: The whole optimizer state.
        params: The parameters (or any tree with their shapes).
        task: The task's position in commit order, or None for the union of all committed tasks.
        index: Which `ExclusiveMasksState` when there are several.

    Raises:
        ValueError: a task outside the committed range; no `ExclusiveMasksState`.

    Example:
        >>> params = {"w": jnp.ones(4)}
        >>> tx = cljax.exclusive_masks(optax.sgd(0.1), capacity=2)
        >>> state = cljax.exclusive_masks_start_task(tx.init(params), {"w": jnp.arange(4) < 1})
        >>> cljax.exclusive_masks_lookup(cljax.exclusive_masks_commit_task(state), params, 0)["w"]
        Array([ True, False, False, False], dtype=bool)
    """
    fn = "exclusive_masks_lookup"
    state = _find(fn, opt_state, ExclusiveMasksState, index)
    if task is None:
        packed = state.union
    else:
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"{fn}(task=...) must be an int or None, got {task!r}.")
        count = _concrete_int(state.count)
        if task < 0 or (count is not None and task >= count):
            raise ValueError(
                f"{fn}(task={task}) must be in [0, {count}): only {count} tasks are committed."
            )
        packed = jax.tree.map(
            lambda b: None if b is None else b[task], state.bank, is_leaf=_common.is_none
        )
    return _mu.masks_like(fn, packed, params)


def supermask(scores: Any, density: float) -> Any:
    """Returns edge-popup masks ``topk(|s|)`` per leaf with a straight-through gradient.

    The forward value is the float mask (1.0 on the ``ceil(density * size)`` largest ``|s|`` of
    each leaf, exact count); the gradient with respect to `s` is the incoming gradient times
    ``sign(s)`` (straight through the top-k, then through ``|s|``), as in the reference code's
    ``GetSubnet(|scores|)``. The effective weights of a task are ``W * supermask(s, k)``.

    Args:
        scores: A tree of float arrays (None leaves pass).
        density: Fraction of entries kept per leaf, in (0, 1]. Static.

    Example:
        >>> s = {"w": jnp.array([0.3, -2.0, 1.0, 0.1])}
        >>> cljax.supermask(s, 0.5)["w"]
        Array([0., 1., 1., 0.], dtype=float32)

    References:
        Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?", CVPR 2020;
        Yadav and Bansal, "Exclusive Supermask Subnetwork Training for Continual Learning", 2023.
    """
    _common.check_density("supermask", density)
    leaves, treedef = jax.tree.flatten(scores, is_leaf=_common.is_none)
    arrays = [s for s in leaves if s is not None]
    magnitudes = [jnp.abs(jnp.asarray(s, jnp.float32)) for s in arrays]
    chosen = _common.top_k_masks(
        magnitudes, [_common.count_of(density, a.size) for a in arrays], scope="layer"
    )
    out, it = [], iter(zip(arrays, magnitudes, chosen, strict=True))
    for s in leaves:
        if s is None:
            out.append(None)
            continue
        score, mag, mask = next(it)
        mag = mag.astype(score.dtype)
        out.append(
            mask.astype(score.dtype) + (mag - lax.stop_gradient(mag))
        )  # value: the hard mask
    return jax.tree.unflatten(treedef, out)
