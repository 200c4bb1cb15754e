"""Structured sparse fine-tuning: the inner optimizer sees only dense sub-blocks of the weights.

* `diablo` — DiaBlo: only the diagonal blocks ``blockdiag(D_1, ..., D_N)`` of each target matrix
  are trained; the inner optimizer state is held for the blocks only.
* `s2ft`, `s2ft_permutations`, `s2ft_permute` — S²FT: units (attention heads, FFN channels)
  are selected, the coupled weights are co-permuted so the selected units come first, and only
  those contiguous slices are trained, with inner state for the slices only.

Both transforms gather a dense view of each trained leaf (the blocks, the slice), run the inner
optimizer on the tree of views, and scatter the result back into an update that is exactly zero
everywhere else. Leaves with no view are frozen: zero update and no inner state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.sparse import _common

__all__ = [
    "DiabloState",
    "S2ftGroup",
    "S2ftState",
    "diablo",
    "s2ft",
    "s2ft_permutations",
    "s2ft_permute",
]


# ---------------------------------------------------------------------------------------------
# A transform on dense views of the trained leaves.


class _Frozen:
    """View plan of a leaf that is not trained: no view, zero update."""

    def gather(self, x):
        del x
        return None

    def scatter(self, view, like):
        del view
        return jnp.zeros_like(like)


_FROZEN = _Frozen()


def _is_plan(x: Any) -> bool:
    return hasattr(x, "gather")


def _views(plans: Any, tree: Any) -> Any:
    return jax.tree.map(lambda plan, x: plan.gather(x), plans, tree, is_leaf=_is_plan)


def _view_transform(
    inner: optax.GradientTransformation,
    plans_of: Callable[[Any], Any],
    state_cls: type,
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` on the views that `plans_of(tree)` defines and scatters its updates back."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return state_cls(inner_state=inner.init(_views(plans_of(params), params)))

    def update_fn(updates, state, params=None, **extra_args):
        plans = plans_of(updates)
        view_params = None if params is None else _views(plans, params)
        directions, inner_state = inner.update(
            _views(plans, updates), state.inner_state, view_params, **extra_args
        )
        out = jax.tree.map(
            lambda plan, d, u: plan.scatter(d, u).astype(u.dtype),
            plans,
            directions,
            updates,
            is_leaf=_is_plan,
        )
        return out, state_cls(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# DiaBlo.


class DiabloState(NamedTuple):
    """State of `diablo`."""

    inner_state: Any  # inner state over the blocks: (batch, N, m/N, n/N) per target leaf


class _DiagonalBlocks:
    """View of a leaf's matrices as their `num_blocks` diagonal blocks."""

    def __init__(self, num_blocks: int, spec: _tree.MatrixSpec, shape: tuple[int, ...], name: str):
        self.num_blocks, self.spec, self.shape, self.name = num_blocks, spec, shape, name
        self.batch, self.m, self.n = _tree.matrix_shape(shape, spec, name)

    def gather(self, x):
        n_b, b = self.num_blocks, self.batch
        mats = _tree.as_matrices(x, self.spec, self.name)
        grid = mats.reshape(b, n_b, self.m // n_b, n_b, self.n // n_b)
        return jnp.moveaxis(jnp.diagonal(grid, axis1=1, axis2=3), -1, 1)  # (b, N, m/N, n/N)

    def scatter(self, blocks, like):
        n_b, b = self.num_blocks, self.batch
        eye = jnp.eye(n_b, dtype=jnp.bool_).reshape(1, n_b, 1, n_b, 1)
        full = jnp.broadcast_to(
            blocks[:, :, :, None, :], (b, n_b, self.m // n_b, n_b, self.n // n_b)
        )
        grid = jnp.where(eye, full, jnp.zeros((), full.dtype))
        mats = grid.reshape(b, self.m, self.n)
        return _tree.from_matrices(mats, self.spec, self.shape, self.name)


def diablo(
    inner: optax.GradientTransformation,
    num_blocks: int,
    *,
    targets: Any = None,
    spec: _tree.MatrixSpec = _tree.MatrixSpec(),
) -> optax.GradientTransformationExtraArgs:
    """Trains only the diagonal blocks of each target matrix (DiaBlo).

    Each target leaf, viewed as ``(batch, m, n)`` matrices through `spec`, is split into an
    ``N x N`` grid of ``(m/N, n/N)`` blocks; the gradients of the ``N`` diagonal blocks form a
    ``(batch, N, m/N, n/N)`` array that `inner` updates, and the update is zero off the diagonal
    blocks. This is DiaBlo's ``W' = W + blockdiag(D_1, ..., D_N)`` with the blocks ``D_i`` (zero at
    the start) trained in place: the inner state is held for the blocks only. Leaves that are
    not targets are frozen (zero update, no state); train a head with `optax.partition`.

    Args:
        inner: Any optax transformation; it sees the tree of blocks (and the blocks of `params`).
        num_blocks: Number ``N`` of diagonal blocks; must divide both matrix dimensions of every
            target leaf. Static.
        targets: Which leaves are adapted: a bool tree or a function of the parameters (such as
            ``cljax.select("attn")``); None adapts every leaf with at least 2 dimensions. Static.
        spec: How a leaf is viewed as matrices; the default views ``(L, m, n)`` as ``L``
            matrices. Static.

    Returns:
        A transform whose state is `DiabloState`.

    Raises:
        ValueError: at `init` or `update`, a target leaf whose matrix dimensions `num_blocks`
            does not divide, or which has fewer dimensions than `spec` needs.

    Notes:
        Decoupled weight decay in `inner` acts on the diagonal-block entries of ``W`` (the
        trained weights), not on the blocks ``D_i`` alone; DiaBlo's re-parameterisation with
        decay on ``D_i`` would need the pre-trained blocks in state.

    Example:
        >>> tx = cljax.diablo(optax.sgd(1.0), num_blocks=2)
        >>> params = {"w": jnp.zeros((4, 4))}
        >>> updates, _ = tx.update({"w": jnp.ones((4, 4))}, tx.init(params))
        >>> updates["w"]
        Array([[-1., -1.,  0.,  0.],
               [-1., -1.,  0.,  0.],
               [ 0.,  0., -1., -1.],
               [ 0.,  0., -1., -1.]], dtype=float32)

    References:
        Gurses et al., "DiaBlo: Diagonal Blocks Are Sufficient For Finetuning", 2025.
        https://arxiv.org/abs/2506.03230
    """
    fn = "diablo"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "num_blocks", num_blocks)
    if not isinstance(spec, _tree.MatrixSpec):
        raise TypeError(f"{fn}(spec=...) must be a cljax.MatrixSpec, got {type(spec).__name__}.")

    def plans_of(tree):
        if targets is None:
            chosen = jax.tree.map(
                lambda x: None if x is None else jnp.ndim(x) >= 2, tree, is_leaf=_common.is_none
            )
        else:
            chosen = _common.bool_tree(fn, "targets", targets, tree)

        def plan(path, x, take):
            if x is None:
                return None
            if not take:
                return _FROZEN
            name, shape = _common.path_name(path), tuple(jnp.shape(x))
            _, m, n = _tree.matrix_shape(shape, spec, name)
            if m % num_blocks or n % num_blocks:
                raise ValueError(
                    f"{fn}: leaf '{name or '<root>'}' has shape {shape}, matrices ({m}, {n}) under {spec}; "
                    f"num_blocks={num_blocks} must divide both. Pick a divisor or leave the leaf out of `targets`."
                )
            return _DiagonalBlocks(num_blocks, spec, shape, name)

        return jax.tree_util.tree_map_with_path(plan, tree, chosen, is_leaf=_common.is_none)

    return _view_transform(inner, plans_of, DiabloState)


# ---------------------------------------------------------------------------------------------
# S²FT.


class S2ftGroup(NamedTuple):
    """Tensors coupled through one set of units (attention heads or FFN channels) for `s2ft`.

    Every ``(path, axis)`` in `coupled` indexes the same ``num_units`` units along `axis`, each
    unit `unit_size` consecutive entries (the head dimension for heads, 1 for channels). Permuting
    the units of all of them together leaves the model function unchanged: for multi-head
    attention in Flax layout ``(d_in, d_out)``, the output axis of the query, key and value
    kernels and biases with the input axis of the output kernel; for an FFN, the output axis of
    the up and gate kernels (and biases) with the input axis of the down kernel. After
    `s2ft_permute`, the first `num_selected` units are the selected ones, and `s2ft` trains the
    leaves in `trained` on those units only.

    Attributes:
        coupled: ``((path, axis), ...)``: leaf paths (``'layers/attn/o/kernel'``, as
            `cljax.leaf_paths` writes them) and the axis of each that indexes the units.
        trained: Paths (among `coupled`) whose selected slice is trained.
        num_selected: Units trained per layer.
        unit_size: Entries per unit along each coupled axis. Default 1.
        batch_ndim: Leading axes shared by every coupled leaf that index independent layers
            (stacked ``(L, ...)`` weights; each layer gets its own permutation). Default 0.
    """

    coupled: tuple[tuple[str, int], ...]
    trained: tuple[str, ...]
    num_selected: int
    unit_size: int = 1
    batch_ndim: int = 0


class S2ftState(NamedTuple):
    """State of `s2ft`."""

    inner_state: Any  # inner state over the selected slices of the trained leaves


def _check_groups(fn: str, groups: Any) -> tuple[S2ftGroup, ...]:
    if isinstance(groups, S2ftGroup):
        groups = (groups,)
    if not isinstance(groups, (tuple, list)) or not groups:
        raise TypeError(
            f"{fn}(groups=...) must be an S2ftGroup or a non-empty sequence of them, got {groups!r}."
        )
    seen_trained: set[str] = set()
    for i, g in enumerate(groups):
        if not isinstance(g, S2ftGroup):
            raise TypeError(
                f"{fn}(groups=...) entry {i} must be an S2ftGroup, got {type(g).__name__}."
            )
        _checks.check_int(fn, f"groups[{i}].num_selected", g.num_selected)
        _checks.check_int(fn, f"groups[{i}].unit_size", g.unit_size)
        _checks.check_int(fn, f"groups[{i}].batch_ndim", g.batch_ndim, low=0)
        if not g.coupled:
            raise ValueError(f"{fn}(groups=...) entry {i} has no coupled tensors.")
        paths = [p for p, _ in g.coupled]
        for path, axis in g.coupled:
            if not isinstance(path, str) or isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(
                    f"{fn}(groups=...) entry {i}: coupled entries must be (path str, axis int), got {(path, axis)!r}."
                )
        if len(set(paths)) != len(paths):
            raise ValueError(
                f"{fn}(groups=...) entry {i}: a path appears twice in `coupled`: {paths}."
            )
        for path in g.trained:
            if path not in paths:
                raise ValueError(
                    f"{fn}(groups=...) entry {i}: trained path {path!r} is not among its coupled paths {paths}."
                )
            if path in seen_trained:
                raise ValueError(
                    f"{fn}(groups=...): path {path!r} is trained by two groups; train it in one."
                )
            seen_trained.add(path)
    return tuple(groups)


def _group_layout(
    fn: str, group: S2ftGroup, index: int, lookup: dict[str, Any]
) -> tuple[tuple[int, ...], int, dict]:
    """``(batch shape, num_units, {path: non-negative axis})`` of a group, checked against `lookup`."""
    batch, units, axes = None, None, {}
    for path, axis in group.coupled:
        if path not in lookup or lookup[path] is None:
            known = ", ".join(repr(k) for k in sorted(lookup)[:8])
            raise ValueError(
                f"{fn}: group {index} names leaf '{path}', which is not in the tree (leaves: {known})."
            )
        shape = tuple(jnp.shape(lookup[path]))
        nd = len(shape)
        if not -nd <= axis < nd or axis % max(nd, 1) < group.batch_ndim:
            raise ValueError(
                f"{fn}: leaf '{path}' has shape {shape}; axis {axis} of group {index} must be a non-batch axis "
                f"(batch_ndim={group.batch_ndim})."
            )
        axis = axis % nd
        size = shape[axis]
        if size % group.unit_size:
            raise ValueError(
                f"{fn}: leaf '{path}' has shape {shape}; axis {axis} (size {size}) is not a multiple of "
                f"unit_size={group.unit_size}."
            )
        if batch is None:
            batch, units = shape[: group.batch_ndim], size // group.unit_size
        if shape[: group.batch_ndim] != batch or size // group.unit_size != units:
            raise ValueError(
                f"{fn}: leaf '{path}' has shape {shape}; group {index} needs batch shape {batch} and {units} units "
                f"of {group.unit_size} along axis {axis}, like its other coupled leaves."
            )
        axes[path] = axis
    if group.num_selected > units:
        raise ValueError(
            f"{fn}: group {index} selects num_selected={group.num_selected} units but its tensors have {units}."
        )
    return batch, units, axes


class _LeadingSlice:
    """View of a leaf as its first `size` entries along `axis`."""

    def __init__(self, axis: int, size: int):
        self.axis, self.size = axis, size

    def gather(self, x):
        return jax.lax.slice_in_dim(x, 0, self.size, axis=self.axis)

    def scatter(self, view, like):
        pad = [(0, 0)] * like.ndim
        pad[self.axis] = (0, like.shape[self.axis] - self.size)
        return jnp.pad(view.astype(like.dtype), pad)


def s2ft(inner: optax.GradientTransformation, groups: Any) -> optax.GradientTransformationExtraArgs:
    """Trains only the selected units' slices of co-permuted weights (S²FT).

    Use on parameters already co-permuted by `s2ft_permute`, so that in every group the selected
    units are the first ``num_selected`` ones: each trained leaf's leading slice of
    ``num_selected * unit_size`` entries along its coupled axis is a dense sub-matrix, `inner`
    sees the tree of those slices (so its state is the slices' size), and the update is exactly
    zero outside them. Leaves that no group trains are frozen (zero update, no state); train a
    head or norms next to it with `optax.partition`. Undo the permutation with
    ``s2ft_permute(..., inverse=True)`` when exporting.

    Args:
        inner: Any optax transformation; it sees the slices (and the slices of `params`).
        groups: An `S2ftGroup` or a sequence of them. Static.

    Returns:
        A transform whose state is `S2ftState`.

    Raises:
        TypeError: `groups` is not made of `S2ftGroup`.
        ValueError: at construction, a trained path outside its group, or trained by two groups;
            at `init` or `update`, a group leaf missing from the tree, an axis out of range or in
            the batch axes, sizes that disagree within a group, or more units selected than exist.

    Example:
        >>> group = cljax.S2ftGroup(coupled=(("up", 1), ("down", 0)), trained=("down",), num_selected=1)
        >>> params = {"up": jnp.ones((2, 3)), "down": jnp.ones((3, 2))}
        >>> tx = cljax.s2ft(optax.sgd(1.0), group)
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> updates["down"]
        Array([[-1., -1.],
               [ 0.,  0.],
               [ 0.,  0.]], dtype=float32)

    References:
        Yang et al., "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
        Sparsity", NeurIPS 2024. https://arxiv.org/abs/2412.06289
    """
    fn = "s2ft"
    _checks.check_transform(fn, "inner", inner)
    groups = _check_groups(fn, groups)

    def plans_of(tree):
        lookup = _common.by_path(tree, fn, "params")
        sizes = {}
        for i, g in enumerate(groups):
            # Leaves routed elsewhere (optax.partition / optax.masked) are absent from the tree.
            present = tuple((p, a) for p, a in g.coupled if lookup.get(p) is not None)
            if not present:
                continue
            _, _, axes = _group_layout(fn, g._replace(coupled=present), i, lookup)
            for path in g.trained:
                if path in axes:
                    sizes[path] = (axes[path], g.num_selected * g.unit_size)

        def plan(path, x):
            if x is None:
                return None
            name = _common.path_name(path)
            return _LeadingSlice(*sizes[name]) if name in sizes else _FROZEN

        return jax.tree_util.tree_map_with_path(plan, tree, is_leaf=_common.is_none)

    return _view_transform(inner, plans_of, S2ftState)


def s2ft_permutations(
    params: Any,
    groups: Any,
    *,
    key: jax.Array | None = None,
    scores: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, ...]:
    """Returns one unit permutation per group that puts the selected units first.

    With `key`, the selection is uniform at random (S²FT's default): each layer's units are
    shuffled independently. With `scores` (one ``(*batch, num_units)`` array per group, such as
    a head-importance score), units are ordered by decreasing score, ties by index.

    Args:
        params: The parameters (only shapes are read).
        groups: An `S2ftGroup` or a sequence of them.
        key: A PRNG key for random selection.
        scores: Per-group unit scores, instead of `key`.

    Returns:
        A tuple of int32 arrays of shape ``(*batch, num_units)``; entry ``j`` is the original
        index of the unit placed at position ``j``.

    Raises:
        ValueError: neither or both of `key` and `scores`; scores of the wrong shape or count.

    Example:
        >>> group = cljax.S2ftGroup(coupled=(("w", 0),), trained=("w",), num_selected=1)
        >>> cljax.s2ft_permutations({"w": jnp.ones(3)}, group, scores=[jnp.array([0.1, 0.7, 0.2])])
        (Array([1, 2, 0], dtype=int32),)

    References:
        Yang et al., "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
        Sparsity", NeurIPS 2024. https://arxiv.org/abs/2412.06289
    """
    fn = "s2ft_permutations"
    groups = _check_groups(fn, groups)
    if (key is None) == (scores is None):
        raise ValueError(f"{fn}: pass exactly one of `key` (random selection) and `scores`.")
    lookup = _common.by_path(params, fn, "params")
    if scores is not None and len(scores) != len(groups):
        raise ValueError(
            f"{fn}: got {len(scores)} score arrays for {len(groups)} groups; give one per group."
        )
    out = []
    for i, g in enumerate(groups):
        batch, units, _ = _group_layout(fn, g, i, lookup)
        if scores is None:
            keys = jax.random.split(jax.random.fold_in(key, i), int(np.prod(batch, dtype=int)))
            shuffle = functools.partial(jax.random.permutation, x=units)
            perms = jax.vmap(lambda k, shuffle=shuffle: shuffle(k))(keys).reshape(batch + (units,))
        else:
            s = jnp.asarray(scores[i], jnp.float32)
            if tuple(s.shape) != batch + (units,):
                raise ValueError(
                    f"{fn}: scores[{i}] has shape {tuple(s.shape)}; group {i} needs {batch + (units,)}."
                )
            perms = jnp.argsort(-s, axis=-1, stable=True)
        out.append(perms.astype(jnp.int32))
    return tuple(out)


def _permute_leaf(x, perm, axis: int, unit_size: int, batch_ndim: int):
    """`x` with its units along `axis` reordered by `perm` (``(*batch, units)``)."""
    units = perm.shape[-1]
    offsets = jnp.arange(unit_size, dtype=perm.dtype).reshape((1,) * perm.ndim + (unit_size,))
    index = (perm[..., :, None] * unit_size + offsets).reshape(
        perm.shape[:-1] + (units * unit_size,)
    )
    moved = jnp.moveaxis(x, axis, -1)
    middle = moved.ndim - batch_ndim - 1
    index = index.reshape(index.shape[:-1] + (1,) * middle + index.shape[-1:])
    return jnp.moveaxis(jnp.take_along_axis(moved, index, axis=-1, mode="clip"), -1, axis)


def s2ft_permute(
    params: Any, groups: Any, permutations: Sequence[jax.Array], *, inverse: bool = False
) -> Any:
    """Co-permutes the coupled tensors of every group (S²FT); the model function is unchanged.

    Unit ``j`` of the result is unit ``permutations[g][..., j]`` of the input, along the coupled
    axis of every tensor of group ``g`` (weights, biases, per-channel scales alike), so the
    selected units become the contiguous leading slice that `s2ft` trains. ``inverse=True``
    undoes it (for export). Leaves outside every group are returned as they are.

    Args:
        params: The parameters.
        groups: An `S2ftGroup` or a sequence of them.
        permutations: One int array per group, from `s2ft_permutations`.
        inverse: Apply the inverse permutations.

    Returns:
        The parameters with the coupled axes permuted, structure and dtypes kept.

    Raises:
        ValueError: a permutation count or shape that does not match the groups.

    Example:
        >>> group = cljax.S2ftGroup(coupled=(("w", 0),), trained=("w",), num_selected=1)
        >>> cljax.s2ft_permute({"w": jnp.array([1.0, 2.0, 3.0])}, group, [jnp.array([2, 0, 1])])
        {'w': Array([3., 1., 2.], dtype=float32)}

    References:
        Yang et al., "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
        Sparsity", NeurIPS 2024. https://arxiv.org/abs/2412.06289
    """
    fn = "s2ft_permute"
    groups = _check_groups(fn, groups)
    if len(permutations) != len(groups):
        raise ValueError(
            f"{fn}: got {len(permutations)} permutations for {len(groups)} groups; give one per group."
        )
    lookup = _common.by_path(params, fn, "params")
    todo = {}
    for i, (g, perm) in enumerate(zip(groups, permutations, strict=True)):
        batch, units, axes = _group_layout(fn, g, i, lookup)
        perm = jnp.asarray(perm, jnp.int32)
        if tuple(perm.shape) != batch + (units,):
            raise ValueError(
                f"{fn}: permutations[{i}] has shape {tuple(perm.shape)}; group {i} needs {batch + (units,)}."
            )
        if inverse:
            perm = jnp.argsort(perm, axis=-1).astype(jnp.int32)
        for path, axis in axes.items():
            if path in todo:
                raise ValueError(
                    f"{fn}: leaf '{path}' belongs to two groups; each tensor axis can follow one group."
                )
            todo[path] = (perm, axis, g.unit_size, g.batch_ndim)

    def leaf(path, x):
        name = _common.path_name(path)
        if x is None or name not in todo:
            return x
        return _permute_leaf(x, *todo[name])

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_common.is_none)
