"""Mask builders: pure functions from parameters (or scores) to boolean masks (SP-05, SP-06).

* `random_mask` — uniform random support at an exact density, regenerable from a key (SPDF,
  SLTrain).
* `magnitude_mask` — the largest ``|w|`` per tensor (``scope='layer'``) or over all tensors
  (``scope='global'``).
* `topk_mask` — the largest scores (any score tree: importance, supermask scores).
* `nm_mask` — N:M structured sparsity along a chosen axis (2:4 and general).
* `erk_densities`, `uniform_densities` — per-layer density allocation (Erdős–Rényi-Kernel or
  uniform) for the builders above.
* `gradual_pruning_schedule` — the cubic sparsity ramp of gradual magnitude pruning.

Counts are exact: a density ``d`` keeps ``ceil(d * size)`` entries of a tensor (``d * size``
within 1e-9 of an integer counts as that integer), so any positive density keeps at least one
entry. Ties are broken by position (earlier leaf in tree order, then earlier row-major index).
Leaves whose density is None get a None mask (dense). Scores are compared in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import kernels as _kernels
from cljax.kernels import _common as _kernel_common
from cljax.kernels import _dispatch
from cljax.transforms.sparse import _common

__all__ = [
    "erk_densities",
    "gradual_pruning_schedule",
    "magnitude_mask",
    "nm_mask",
    "random_mask",
    "topk_mask",
    "uniform_densities",
]

Scope = Literal["layer", "global"]
_SCOPES = ("layer", "global")


def _densities(fn: str, params: Any, density: Any) -> Any:
    """A tree of per-leaf densities (float or None) with the structure of `params`."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0]
    if isinstance(density, (int, float, np.floating, np.integer)) and not isinstance(density, bool):
        _common.check_density(fn, density)
        return jax.tree.map(
            lambda p: None if p is None else float(density), params, is_leaf=_common.is_none
        )
    if isinstance(density, (jax.Array, np.ndarray)) and np.ndim(density) == 0:
        return _densities(fn, params, float(density))
    lookup = _common.by_path(density, fn, "density")
    out = {}
    for path, p in leaves:
        name = _common.path_name(path)
        if p is None:
            continue
        if name not in lookup:
            raise ValueError(
                f"{fn}: `density` has no entry for leaf '{name or '<root>'}'; pass one float (or None "
                "for a dense leaf) per parameter leaf, or a single float."
            )
        value = lookup[name]
        if value is not None:
            _common.check_density(fn, value, f"density['{name}']")
            value = float(value)
        out[name] = value
    return jax.tree_util.tree_map_with_path(
        lambda path, p: None if p is None else out[_common.path_name(path)],
        params,
        is_leaf=_common.is_none,
    )


def _check_float_leaves(fn: str, arg: str, tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_common.is_none)[0]:
        if leaf is None:
            continue
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"{fn}: leaf '{_common.path_name(path) or '<root>'}' of `{arg}` is {type(leaf).__name__}, not an array."
            )


def random_mask(params: Any, density: Any, key: jax.Array) -> Any:
    """Returns a uniformly random mask per leaf with exactly ``ceil(density * size)`` ones.

    Each leaf's mask is a random permutation's first entries (not Bernoulli draws, whose density
    is inexact), drawn from ``fold_in(key, crc32(leaf path))``: the same key gives the same mask
    on every host and for every tree that holds the leaf at the same path, whatever the other
    leaves are.

    Args:
        params: A pytree of arrays (only shapes are read); None leaves give None.
        density: A float in (0, 1], or a tree of floats (None for a dense leaf), e.g. from
            `erk_densities`.
        key: A PRNG key.

    Returns:
        A tree of boolean arrays (None for dense leaves) with the structure of `params`.

    Raises:
        ValueError: a density outside (0, 1], or a density tree that misses a leaf.

    Example:
        >>> mask = cljax.random_mask({"w": jnp.zeros((4, 4))}, 0.25, jax.random.key(0))
        >>> int(mask["w"].sum())
        4

    References:
        Thangarasa et al., "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language
        Models", UAI 2023. https://arxiv.org/abs/2303.10464
    """
    densities = _densities("random_mask", params, density)
    _check_float_leaves("random_mask", "params", params)

    def leaf(path, p, d):
        if p is None or d is None:
            return None
        size = math.prod(jnp.shape(p))
        k = _common.count_of(d, size)
        if k >= size:
            return jnp.ones(jnp.shape(p), jnp.bool_)
        leaf_key = jax.random.fold_in(key, _common.path_hash(path))
        return _common.random_leaf(leaf_key, jnp.int32(k), tuple(jnp.shape(p)))

    return jax.tree_util.tree_map_with_path(leaf, params, densities, is_leaf=_common.is_none)


def _top_k_tree(fn: str, scores: Any, density: Any, scope: str, transform: Callable) -> Any:
    _checks.check_choice(fn, "scope", scope, _SCOPES)
    _check_float_leaves(fn, "params", scores)
    if scope == "global" and not isinstance(density, (int, float, np.floating)):
        raise TypeError(
            f"{fn}(scope='global') needs one float `density`, got {type(density).__name__}."
        )
    densities = _densities(fn, scores, density)
    leaves = jax.tree_util.tree_flatten_with_path(scores, is_leaf=_common.is_none)[0]
    dens = jax.tree.leaves(densities, is_leaf=_common.is_none)
    chosen = [
        (i, leaf)
        for i, ((_, leaf), d) in enumerate(zip(leaves, dens, strict=True))
        if leaf is not None and d is not None
    ]
    arrays = [transform(leaf) for _, leaf in chosen]
    if scope == "global":
        total = sum(a.size for a in arrays)
        masks = _common.top_k_masks(arrays, _common.count_of(float(density), total), scope="global")
    else:
        ks = [_common.count_of(dens[i], a.size) for (i, _), a in zip(chosen, arrays, strict=True)]
        masks = _common.top_k_masks(arrays, ks, scope="layer")
    out: list = [None] * len(leaves)
    for (i, _), m in zip(chosen, masks, strict=True):
        out[i] = m
    treedef = jax.tree.structure(scores, is_leaf=_common.is_none)
    return jax.tree.unflatten(treedef, out)


def magnitude_mask(params: Any, density: Any, scope: Scope = "layer") -> Any:
    """Returns a mask of the largest-magnitude entries: per tensor, or over all tensors.

    ``scope='layer'`` keeps exactly ``ceil(density * size)`` entries of each leaf (`density` a
    float or a tree of floats); ``scope='global'`` keeps ``ceil(density * total)`` entries over
    all non-None leaves together, by one threshold on ``|w|``. Ties at the threshold go to the
    earlier leaf (tree order), then the earlier row-major index, so counts are exact. The mask
    of ``w`` and of ``-w`` are equal.

    Args:
        params: A pytree of arrays; None leaves give None.
        density: Kept fraction in (0, 1]: a float, or (layer scope) a tree of floats with None
            for dense leaves.
        scope: ``'layer'`` or ``'global'``.

    Returns:
        A tree of boolean arrays (None for dense leaves) with the structure of `params`.

    Raises:
        ValueError: a density outside (0, 1], or an unknown scope.

    Example:
        >>> cljax.magnitude_mask({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, 0.5)["w"]
        Array([False,  True,  True, False], dtype=bool)

    References:
        Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
        compression", 2017. https://arxiv.org/abs/1710.01878
    """
    return _top_k_tree(
        "magnitude_mask", params, density, scope, lambda x: jnp.abs(jnp.asarray(x, jnp.float32))
    )


def topk_mask(scores: Any, density: Any, scope: Scope = "layer") -> Any:
    """Returns a mask of the largest *scores* (not magnitudes): per tensor or over all tensors.

    As `magnitude_mask` but ranks the signed values of `scores`; pass ``jax.tree.map(jnp.abs,
    s)`` for magnitudes. Used for importance masks (SPU) and supermasks (ExSSNeT).

    Args:
        scores: A pytree of float arrays; None leaves give None.
        density: Kept fraction in (0, 1]: a float or a tree of floats (None: dense).
        scope: ``'layer'`` or ``'global'``.

    Returns:
        A tree of boolean arrays with the structure of `scores`.

    Example:
        >>> cljax.topk_mask({"s": jnp.array([0.1, -3.0, 2.0, 0.5])}, 0.25)["s"]
        Array([False, False,  True, False], dtype=bool)
    """
    return _top_k_tree("topk_mask", scores, density, scope, lambda x: jnp.asarray(x, jnp.float32))


def nm_mask(
    x: jax.Array,
    n: int,
    m: int,
    axis: int = -1,
    *,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> jax.Array:
    """Returns the N:M mask of an array: the `n` largest ``|x|`` of every `m` consecutive entries.

    Groups are `m` consecutive entries along `axis`; each keeps exactly `n` (ties to the earlier
    entry). For 2:4 sparse tensor cores the groups run along the reduction (input) axis: the
    last axis of a PyTorch ``(d_out, d_in)`` weight, ``axis=0`` for a Flax ``(d_in, d_out)``
    kernel.

    Args:
        x: An array with at least one axis.
        n: Entries kept per group. Static.
        m: Group size. Static.
        axis: The grouped axis; its length must be a multiple of `m`.
        impl: ``'pallas'`` runs the kernel `cljax.kernels.nm_mask` (same mask and tie rule; on the
            CPU in Pallas interpret mode, for tests); ``'xla'`` the selection in XLA; ``'auto'``
            (default) the kernel only where `cljax.kernels` holds a measured win for the back end,
            dtype and ``(size, m)`` (none yet: XLA). Static.

    Returns:
        A boolean array of `x`'s shape.

    Raises:
        ValueError: ``n > m``, ``n < 1``, an axis length not divisible by `m`, or an unknown
            `impl`.

    Example:
        >>> cljax.nm_mask(jnp.array([[0.1, -3.0, 2.0, 0.5]]), 2, 4)
        Array([[False,  True,  True, False]], dtype=bool)

    References:
        Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
        ICLR 2021. https://arxiv.org/abs/2102.04010
    """
    _checks.check_int("nm_mask", "n", n, 1)
    _checks.check_int("nm_mask", "m", m, 1)
    if n > m:
        raise ValueError(f"nm_mask(n=..., m=...) needs n <= m, got n={n} > m={m}.")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"nm_mask(axis=...) must be an int, got {axis!r}.")
    shape = tuple(jnp.shape(x))
    if not shape:
        raise ValueError("nm_mask: `x` is a scalar; N:M groups need at least one axis.")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"nm_mask(axis={axis}) is out of range for shape {shape}.")
    if shape[axis] % m:
        raise ValueError(
            f"nm_mask: axis {axis} of shape {shape} has length {shape[axis]}, not divisible by m={m}; "
            "choose another axis or leave this leaf dense."
        )
    _kernel_common.check_impl("nm_mask", impl)
    if impl == "pallas" or (
        impl == "auto"
        and _dispatch.choose("nm_mask", (math.prod(shape), m), str(jnp.result_type(x))) == "pallas"
    ):
        return _kernels.nm_mask(jnp.asarray(x), n, m, axis=axis, impl=impl)
    return _common.nm_leaf(jnp.asarray(x), n, m, axis % len(shape))


def _include(fn: str, params: Any, include: Any) -> Any:
    if include is None:
        return jax.tree.map(
            lambda p: None if p is None else jnp.ndim(p) >= 2, params, is_leaf=_common.is_none
        )
    return _common.bool_tree(fn, "include", include, params)


def uniform_densities(params: Any, density: float, *, include: Any = None) -> Any:
    """Returns the same density for every included leaf and None (dense) for the others.

    Args:
        params: A pytree of arrays (only shapes are read).
        density: The density of every included leaf, in (0, 1].
        include: A bool tree or a function of `params` giving one: which leaves are sparse.
            Default: leaves with two or more dims (biases, norms and scalars stay dense).

    Returns:
        A tree of floats and Nones with the structure of `params`.

    Example:
        >>> cljax.uniform_densities({"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, 0.5)
        {'b': None, 'w': 0.5}
    """
    _common.check_density("uniform_densities", density)
    chosen = _include("uniform_densities", params, include)
    return jax.tree.map(lambda c: float(density) if c else None, chosen, is_leaf=_common.is_none)


def erk_densities(
    params: Any, density: float, *, include: Any = None, power_scale: float = 1.0
) -> Any:
    """Returns Erdős–Rényi-Kernel per-leaf densities whose total matches `density`.

    Leaf ``l`` with dims ``(n_1, ..., n_k)`` gets ``eps * (sum(n_i) / prod(n_i)) ** power_scale``,
    with one `eps` chosen so that the included leaves keep ``density * sum(size_l)`` entries in
    total. A leaf whose density would exceed 1 is made dense and `eps` is solved again, until
    every density is at most 1. Densities are rounded to exact counts by the builders, so the
    total count matches the target to one entry per leaf.

    Args:
        params: A pytree of arrays (only shapes are read).
        density: Overall density of the included leaves, in (0, 1].
        include: A bool tree or a function of `params`: which leaves are sparse. Default: leaves
            with two or more dims; the others get None (dense) and do not count.
        power_scale: Exponent of the ERK ratio (1.0 is ERK; 0.0 gives uniform densities).

    Returns:
        A tree of floats (in (0, 1]) and Nones with the structure of `params`.

    Raises:
        ValueError: a density outside (0, 1].

    Example:
        >>> d = cljax.erk_densities({"a": jnp.zeros((8, 8)), "b": jnp.zeros((8, 64))}, 0.25)
        >>> round(d["a"] * 64 + d["b"] * 512) == 0.25 * 576
        True

    References:
        Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020.
        https://arxiv.org/abs/1911.11134
    """
    fn = "erk_densities"
    _common.check_density(fn, density)
    _checks.check_in_range(fn, "power_scale", power_scale, 0.0)
    chosen = _include(fn, params, include)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0]
    flags = jax.tree.leaves(chosen, is_leaf=_common.is_none)
    sizes, raws = {}, {}
    for i, ((_, p), c) in enumerate(zip(leaves, flags, strict=True)):
        if p is None or not c:
            continue
        shape = tuple(jnp.shape(p))
        size = math.prod(shape)
        if size == 0:
            continue
        sizes[i] = size
        raws[i] = (sum(shape) / size) ** power_scale if shape else 1.0
    dense: set[int] = set()
    eps = 0.0
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[i] for i in dense)
        divisor = sum(raws[i] * sizes[i] for i in sizes if i not in dense)
        if divisor <= 0:
            break
        eps = budget / divisor
        over = [i for i in sizes if i not in dense and eps * raws[i] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda i: raws[i]))
    out = [None] * len(leaves)
    for i in sizes:
        out[i] = 1.0 if i in dense else float(min(1.0, max(eps * raws[i], 1e-12)))
    treedef = jax.tree.structure(params, is_leaf=_common.is_none)
    return jax.tree.unflatten(treedef, out)


def gradual_pruning_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    update_every: int = 1,
    power: float = 3.0,
) -> optax.Schedule:
    """Returns the gradual-pruning sparsity schedule ``s_t`` (cubic by default).

    ``s_t = s_f + (s_i - s_f) * (1 - (t_k - t_0) / (t_1 - t_0)) ** power`` where ``t_k`` is the
    last pruning step at or before ``t`` (``t_0, t_0 + update_every, ...``); ``s_i`` before
    ``t_0`` and ``s_f`` from ``t_1`` on. The value is constant between pruning steps.

    Args:
        final_sparsity: ``s_f`` in [0, 1).
        begin_step: ``t_0``, the first pruning step.
        end_step: ``t_1``, the step that reaches ``s_f`` (``> begin_step``).
        initial_sparsity: ``s_i`` in [0, 1).
        update_every: Steps between pruning steps (``Δt``).
        power: Exponent of the ramp (3 in the paper).

    Returns:
        A schedule ``count -> sparsity`` (float32).

    Raises:
        ValueError: sparsities outside [0, 1), ``end_step <= begin_step`` or ``update_every < 1``.

    Example:
        >>> s = cljax.gradual_pruning_schedule(0.9, 0, 100, update_every=10)
        >>> [round(float(s(t)), 4) for t in (0, 10, 50, 100)]
        [0.0, 0.2439, 0.7875, 0.9]

    References:
        Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
        compression", 2017. https://arxiv.org/abs/1710.01878
    """
    fn = "gradual_pruning_schedule"
    _checks.check_in_range(fn, "final_sparsity", final_sparsity, 0.0, 1.0, high_inclusive=False)
    _checks.check_in_range(fn, "initial_sparsity", initial_sparsity, 0.0, 1.0, high_inclusive=False)
    _checks.check_int(fn, "begin_step", begin_step, 0)
    _checks.check_int(fn, "end_step", end_step, begin_step + 1)
    _checks.check_int(fn, "update_every", update_every, 1)
    _checks.check_in_range(fn, "power", power, 0.0, low_inclusive=False)
    span = end_step - begin_step

    def schedule(count):
        t = jnp.clip(jnp.asarray(count, jnp.int32), begin_step, end_step) - begin_step
        t = jnp.where(t >= span, span, (t // update_every) * update_every)
        progress = t.astype(jnp.float32) / span
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power

    return schedule
