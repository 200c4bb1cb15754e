"""Element-wise masks kept in optimizer state (the SP-MASK rules) and their boundary functions.

* `mask_updates` — any inner optimizer restricted to an element-wise mask held in its state
  (bit-packed), with `mask_updates_set`, `mask_updates_get` and `mask_updates_densify` (SPDF's
  switch to dense fine-tuning) as task-boundary functions.
The weight-level functions (`masked_decay`, `masked_merge`, `sparse_soup`,
`straight_through_mask`) are in `cljax.transforms.sparse.weights`.

SP-MASK rules, as implemented by every element-mask transform of this family:

1. the mask multiplies the gradient *before* the inner optimizer (moments outside it stay zero)
   and the final update *after* it (decoupled decay and momentum leakage cannot move masked
   entries);
2. with ``prune=True`` the transform emits ``u = -p`` outside the mask, so those weights are
   exactly zero after `optax.apply_updates` (no hook outside optax); where a boundary function
   changes the support it zeroes the inner state at the changed entries (any inner state type:
   state leaves are tied to parameters by key-path suffix and shape);
3. leaves whose mask is all False when the transform is built get no inner state;
4. masks are stored bit-packed (one bit per entry, packed along the last axis so a packed mask
   shards like its parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import kernels as _kernels
from cljax import tree as _tree
from cljax.kernels import _common as _kernel_common
from cljax.kernels import _dispatch
from cljax.transforms.sparse import _common

__all__ = [
    "MaskUpdatesState",
    "mask_updates",
    "mask_updates_densify",
    "mask_updates_get",
    "mask_updates_set",
]

DENSE, MASKED, FROZEN = "dense", "masked", "frozen"


class MaskUpdatesState(NamedTuple):
    """State of `mask_updates`."""

    masks: (
        Any  # per leaf: packed uint8 mask; None (dense); optax.MaskedNode (frozen, no inner state)
    )
    inner_state: Any  # the inner transform's state, wrapped in optax.masked


# ---------------------------------------------------------------------------------------------
# Shared machinery of the element-mask transforms (also used by continual.py and dynamic.py).


def kinds_from_masks(fn: str, masks: Any) -> dict[str, str]:
    """``{path: kind}`` from user masks: None -> dense, concrete all-False -> frozen, else masked."""
    kinds = {}
    for path, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=_common.is_none)[0]:
        name = _common.path_name(path)
        if m is None:
            kinds[name] = DENSE
            continue
        if not hasattr(m, "shape") and not isinstance(m, (bool, np.bool_)):
            raise TypeError(
                f"{fn}: mask for leaf '{name or '<root>'}' is {type(m).__name__}; pass a boolean array or None."
            )
        values = _common.concrete_bool(m)
        kinds[name] = FROZEN if values is not None and not values.any() else MASKED
    return kinds


def kind_tree(fn: str, kinds: dict[str, str], params: Any) -> Any:
    """A tree of kinds with the structure of `params` (None where the param is None)."""

    def leaf(path, p):
        if p is None:
            return None
        name = _common.path_name(path)
        if name not in kinds:
            known = ", ".join(repr(k) for k in sorted(kinds)[:8])
            raise ValueError(
                f"{fn}: no mask for leaf '{name or '<root>'}' (masks cover {known}); give a boolean array, "
                "or None for a dense leaf, for every parameter leaf."
            )
        return kinds[name]

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_common.is_none)


def masked_inner(
    inner: optax.GradientTransformation, kinds_of: Callable[[Any], Any]
) -> optax.GradientTransformationExtraArgs:
    """`inner` restricted (by `optax.masked`) to the leaves that are not frozen."""
    return optax.masked(
        inner,
        lambda params: jax.tree.map(
            lambda k: None if k is None else k != FROZEN, kinds_of(params), is_leaf=_common.is_none
        ),
    )


def init_masks(fn: str, kinds: Any, params: Any, mask_of: Callable[[Any, Any], Any]) -> Any:
    """Packed masks for the state: `mask_of(path, param)` gives the boolean mask of masked leaves."""

    def leaf(path, k, p):
        if k is None or k == DENSE:
            return None
        if k == FROZEN:
            return optax.MaskedNode()
        mask = mask_of(path, p)
        if tuple(jnp.shape(mask)) != tuple(jnp.shape(p)):
            raise ValueError(
                f"{fn}: leaf '{_common.path_name(path) or '<root>'}' has shape {tuple(jnp.shape(p))} but its mask has "
                f"shape {tuple(jnp.shape(mask))}; masks must match their parameters."
            )
        return _common.pack(mask)

    return jax.tree_util.tree_map_with_path(leaf, kinds, params, is_leaf=_common.is_none)


def unpack_masks(kinds: Any, packed: Any, like: Any) -> Any:
    """Boolean masks (None for dense, all-False for frozen) with the shapes of `like`."""

    def leaf(k, m, x):
        if k is None or x is None:
            return None
        if k == DENSE:
            return None
        if k == FROZEN:
            return jnp.zeros(jnp.shape(x), jnp.bool_)
        return _common.unpack(m, jnp.shape(x))

    return jax.tree.map(leaf, kinds, packed, like, is_leaf=_common.is_none)


def gate_in(updates: Any, masks: Any) -> Any:
    """Gradients zeroed outside the masks (rule 1, before the inner optimizer)."""
    return jax.tree.map(
        lambda g, m: g if g is None or m is None else jnp.where(m, g, jnp.zeros_like(g)),
        updates,
        masks,
        is_leaf=_common.is_none,
    )


def gate_out(updates: Any, masks: Any, params: Any, prune: bool) -> Any:
    """Updates zeroed (or set to ``-p`` with `prune`) outside the masks (rules 1 and 2)."""

    def leaf(u, m, p):
        if u is None or m is None:
            return u
        outside = (-p).astype(u.dtype) if prune else jnp.zeros_like(u)
        return jnp.where(m, u, outside)

    return jax.tree.map(leaf, updates, masks, params if prune else masks, is_leaf=_common.is_none)


def replace_masks(fn: str, old_packed: Any, masks: Any) -> Any:
    """Returns the packed tree of new user masks, checked against the stored kinds and shapes."""
    lookup = _common.by_path(masks, fn, "masks")

    def leaf(path, m):
        name = _common.path_name(path)
        where = name or "<root>"
        if name not in lookup and m is not None and not isinstance(m, optax.MaskedNode):
            raise ValueError(
                f"{fn}: `masks` has no entry for leaf '{where}'; give one per parameter leaf."
            )
        new = lookup.get(name)
        if m is None:  # dense leaf
            values = None if new is None else _common.concrete_bool(new)
            if new is not None and (values is None or not values.all()):
                raise ValueError(
                    f"{fn}: leaf '{where}' was dense (mask None) when the transform was built; its mask "
                    "must stay None (or all True). Rebuild the transform to mask it."
                )
            return None
        if isinstance(m, optax.MaskedNode):  # frozen leaf: no inner state
            values = None if new is None else _common.concrete_bool(new)
            if values is not None and values.any():
                raise ValueError(
                    f"{fn}: leaf '{where}' was fully frozen (mask all False) when the transform was built, so "
                    "it has no optimizer state; its mask must stay all False. Rebuild the transform to train it."
                )
            return m
        if new is None:
            raise ValueError(
                f"{fn}: leaf '{where}' holds a mask; pass a boolean array (all True for dense), not None."
            )
        new = jnp.asarray(new, jnp.bool_)
        if _common.packed_shape(new.shape) != tuple(m.shape):
            raise ValueError(
                f"{fn}: leaf '{where}' has a mask of shape {tuple(new.shape)} that does not match the stored "
                f"mask (packed shape {tuple(m.shape)})."
            )
        return _common.pack(new)

    return jax.tree_util.tree_map_with_path(leaf, old_packed, is_leaf=_common.is_none_or_masked)


# ---------------------------------------------------------------------------------------------
# mask_updates.


def mask_updates(
    inner: optax.GradientTransformation,
    masks: Any,
    *,
    prune: bool = False,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Restricts any optimizer to an element-wise mask kept in its state.

    ``update`` feeds ``g * M`` to `inner` and emits ``u * M`` (``prune=False``: entries outside
    the mask are frozen at their value) or ``where(M, u, -p)`` (``prune=True``: entries outside
    the mask become and stay exactly zero; sparse training). The masks seed the state at `init`
    and are read from the state only; `mask_updates_set` replaces them between steps. Leaves with
    a None mask are dense; leaves whose mask is all False when the transform is built are frozen
    and get no inner state. Masks are stored bit-packed (1 bit per entry).

    Wrap the *whole* optimizer (``mask_updates(optax.adamw(...), masks)``): the masked update is
    final, and with ``prune=True`` nothing may scale ``-p`` after it.

    Args:
        inner: Any optax transformation (extra args are passed on).
        masks: A pytree with the structure of the parameters (matched by key path): boolean
            arrays of the parameters' shapes, or None for dense leaves. Static: list it in the
            `static_args` of `optax.inject_hyperparams`.
        prune: Set entries outside the mask to zero (needs `params`) instead of freezing them.
            Static.
        impl: How a masked leaf applies its packed mask (``prune=False`` only): ``'pallas'``
            with the kernel `cljax.kernels.apply_packed_mask`, which reads the packed bits
            directly, on the gradient and on the update (on the CPU in Pallas interpret mode,
            for tests); ``'xla'`` by unpacking the mask once and selecting with it; ``'auto'``
            (default) the kernel only on the leaves where `cljax.kernels` holds a measured win
            for the back end, dtype and size (none yet, so XLA everywhere). With
            ``prune=True`` the update outside the mask is ``-p``, not zero, which the kernel
            does not cover: ``'auto'`` then uses XLA and ``'pallas'`` raises. Static.

    Returns:
        A transform whose state is `MaskUpdatesState`.

    Raises:
        ValueError: an unknown `impl` or ``impl='pallas'`` with ``prune=True``; at `init`, a
            parameter leaf without a mask or a mask of the wrong shape; at `update` with
            ``prune=True``, missing `params`.

    Example:
        >>> params = {"w": jnp.ones((2, 2))}
        >>> tx = cljax.mask_updates(optax.sgd(0.1), {"w": jnp.eye(2, dtype=bool)})
        >>> updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params))
        >>> updates["w"]
        Array([[-0.1,  0. ],
               [ 0. , -0.1]], dtype=float32)

    References:
        Lee et al., "JaxPruner: A concise library for sparsity research", 2023 (masks in optimizer
        state). https://arxiv.org/abs/2304.14082
    """
    fn = "mask_updates"
    _checks.check_transform(fn, "inner", inner)
    if not isinstance(prune, bool):
        raise TypeError(f"{fn}(prune=...) must be a bool, got {prune!r}.")
    _kernel_common.check_impl(fn, impl)
    if prune and impl == "pallas":
        raise ValueError(
            f"{fn}(impl='pallas'): the packed-mask kernel (cljax.kernels.apply_packed_mask) "
            "zeroes entries outside the mask; prune=True sets the update there to -p. Use "
            "impl='xla' or 'auto' with prune=True."
        )
    kinds = kinds_from_masks(fn, masks)
    lookup = _common.by_path(masks, fn, "masks")
    return element_mask_transform(
        fn,
        inner,
        lambda params: kind_tree(fn, kinds, params),
        lambda path, p: lookup[_common.path_name(path)],
        MaskUpdatesState,
        prune=prune,
        impl="xla" if prune else impl,
    )


def element_mask_transform(
    fn: str,
    inner: optax.GradientTransformation,
    kinds_of: Callable[[Any], Any],
    initial_mask: Callable[[Any, Any], Any],
    state_cls: type,
    *,
    prune: bool,
    impl: str = "xla",
) -> optax.GradientTransformationExtraArgs:
    """An SP-MASK transform whose state is ``state_cls(masks=packed, inner_state=...)``.

    `kinds_of(params)` gives each leaf's kind (dense / masked / frozen) from the tree's paths;
    `initial_mask(path, param)` the boolean mask that seeds a masked leaf at `init`. `impl`
    (``prune=False`` only) picks how masked leaves apply their packed masks, as in
    `mask_updates`.
    """
    wrapped = masked_inner(inner, kinds_of)

    def init_fn(params):
        packed = init_masks(fn, kinds_of(params), params, initial_mask)
        return state_cls(masks=packed, inner_state=wrapped.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if prune:
            _checks.require_params(fn, params)
        kinds = kinds_of(updates)
        fused = None if prune or impl == "xla" else _kernel_leaves(kinds, updates, impl)
        if fused is not None:
            directions, inner_state = wrapped.update(
                _apply_fused(updates, fused, kinds, state.masks),
                state.inner_state,
                params,
                **extra_args,
            )
            out = _apply_fused(directions, fused, kinds, state.masks)
            return out, state_cls(masks=state.masks, inner_state=inner_state)
        current = unpack_masks(kinds, state.masks, updates)
        directions, inner_state = wrapped.update(
            gate_in(updates, current), state.inner_state, params, **extra_args
        )
        out = gate_out(directions, current, params, prune)
        return out, state_cls(masks=state.masks, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _kernel_leaves(kinds: Any, updates: Any, impl: str) -> Any:
    """Per leaf: whether its packed mask is applied by the kernel; None when no leaf is."""

    def leaf(k, g):
        if k != MASKED or g is None:
            return False
        if impl == "pallas":
            return True
        key = (jnp.size(g),)
        return _dispatch.choose("apply_packed_mask", key, str(jnp.result_type(g))) == "pallas"

    fused = jax.tree.map(leaf, kinds, updates, is_leaf=_common.is_none)
    return fused if any(jax.tree.leaves(fused)) else None


def _apply_fused(tree: Any, fused: Any, kinds: Any, packed: Any) -> Any:
    """`tree` zeroed outside the masks: by the packed-mask kernel where `fused`, else by XLA."""

    def leaf(x, f, k, m):
        if x is None or k is None or k == DENSE:
            return x
        if k == FROZEN:
            return jnp.zeros_like(x)
        if f:
            return _kernels.apply_packed_mask(x, m, impl="pallas")
        return jnp.where(_common.unpack(m, jnp.shape(x)), x, jnp.zeros_like(x))

    return jax.tree.map(leaf, tree, fused, kinds, packed, is_leaf=_common.is_none_or_masked)


def _find(fn: str, opt_state: Any, index: int | None) -> MaskUpdatesState:
    try:
        return _tree.find_state(opt_state, MaskUpdatesState, index=index)
    except ValueError as err:
        raise ValueError(f"{fn}: {str(err).removeprefix('find_state: ')}") from err


def mask_updates_set(opt_state: Any, masks: Any, *, index: int | None = None) -> Any:
    """Replaces the masks of the `MaskUpdatesState` in `opt_state`; call between steps.

    The inner optimizer state (moments) is zeroed at every entry whose mask changes, so newly
    trainable entries start fresh (SP-MASK rule 2). With ``prune=True`` the next update sets the
    newly masked-out weights to zero.

    Args:
        opt_state: The whole optimizer state.
        masks: New masks with the structure of the parameters: boolean arrays for masked leaves,
            None for leaves that were dense when the transform was built.
        index: Which `MaskUpdatesState` when the state holds several (tree order).

    Returns:
        `opt_state` with the new masks.

    Raises:
        ValueError: no (or several) `MaskUpdatesState`; a mask of the wrong shape; a mask on a
            leaf built dense, or True entries on a leaf built fully frozen.

    Example:
        >>> params = {"w": jnp.ones(4)}
        >>> tx = cljax.mask_updates(optax.adam(1e-3), {"w": jnp.ones(4, bool)})
        >>> state = cljax.mask_updates_set(tx.init(params), {"w": jnp.arange(4) < 2})
    """
    fn = "mask_updates_set"
    state = _find(fn, opt_state, index)
    new_packed = replace_masks(fn, state.masks, masks)
    inner = reset_packed_changes(state.inner_state, state.masks, new_packed)
    return _tree.replace_state(
        opt_state, MaskUpdatesState(masks=new_packed, inner_state=inner), index=index
    )


def mask_updates_get(opt_state: Any, params: Any, *, index: int | None = None) -> Any:
    """Returns the current masks of the `MaskUpdatesState` in `opt_state`, unpacked.

    Args:
        opt_state: The whole optimizer state.
        params: The parameters (or any tree with their shapes): packed masks do not record the
            exact length of their last axis.
        index: Which `MaskUpdatesState` when the state holds several (tree order).

    Returns:
        Boolean arrays for masked leaves (all False for leaves fully frozen at build time) and
        None for dense leaves.

    Example:
        >>> params = {"w": jnp.ones(3)}
        >>> tx = cljax.mask_updates(optax.sgd(0.1), {"w": jnp.array([True, False, True])})
        >>> cljax.mask_updates_get(tx.init(params), params)["w"]
        Array([ True, False,  True], dtype=bool)
    """
    state = _find("mask_updates_get", opt_state, index)
    return masks_like("mask_updates_get", state.masks, params)


def masks_like(fn: str, packed: Any, params: Any) -> Any:
    """Unpacks a stored mask tree against the parameter shapes (matched by path)."""
    lookup = _common.by_path(params, fn, "params")

    def leaf(path, m):
        if m is None:
            return None
        name = _common.path_name(path)
        if name not in lookup or lookup[name] is None:
            raise ValueError(
                f"{fn}: `params` has no leaf '{name or '<root>'}'; pass the parameters the state was built for."
            )
        shape = tuple(jnp.shape(lookup[name]))
        if isinstance(m, optax.MaskedNode):
            return jnp.zeros(shape, jnp.bool_)
        if _common.packed_shape(shape) != tuple(m.shape):
            raise ValueError(
                f"{fn}: leaf '{name or '<root>'}' has shape {shape} in `params`, which does not match its stored "
                f"mask (packed shape {tuple(m.shape)})."
            )
        return _common.unpack(m, shape)

    return jax.tree_util.tree_map_with_path(leaf, packed, is_leaf=_common.is_none_or_masked)


def reset_packed_changes(inner_state: Any, old: Any, new: Any) -> Any:
    """Zeroes the inner state where two packed mask trees differ (shapes read from the state)."""
    diff = jax.tree.map(
        lambda a, b: a if a is None or isinstance(a, optax.MaskedNode) else a ^ b,
        old,
        new,
        is_leaf=_common.is_none_or_masked,
    )
    table = _common.packed_tie_table(diff, lambda packed, shape: _common.unpack(packed, shape))
    return _common.map_tied(inner_state, table, _common.zero_where)


def mask_updates_densify(opt_state: Any, *, index: int | None = None) -> Any:
    """Makes every masked leaf dense (SPDF's switch from sparse pre-training to dense tuning).

    All masks become all True; the inner state at the newly trainable entries is zeroed (it is
    already zero there when the gradient was masked from the start). Leaves fully frozen at build
    time stay frozen (they have no optimizer state). The state keeps its structure, so a jitted
    step does not recompile.

    Example:
        >>> params = {"w": jnp.zeros(4)}
        >>> tx = cljax.mask_updates(optax.adam(1e-3), {"w": jnp.arange(4) < 2}, prune=True)
        >>> state = cljax.mask_updates_densify(tx.init(params))
        >>> bool(cljax.mask_updates_get(state, params)["w"].all())
        True
    """
    fn = "mask_updates_densify"
    state = _find(fn, opt_state, index)
    full = jax.tree.map(
        lambda m: (
            m
            if m is None or isinstance(m, optax.MaskedNode)
            else jnp.full(m.shape, 0xFF, jnp.uint8)
        ),
        state.masks,
        is_leaf=_common.is_none_or_masked,
    )
    inner = reset_packed_changes(state.inner_state, state.masks, full)
    return _tree.replace_state(
        opt_state, MaskUpdatesState(masks=full, inner_state=inner), index=index
    )
