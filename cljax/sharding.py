"""Optimizer-state shardings derived from parameter shardings.

`state_shardings(tx, params, param_shardings)` returns a `NamedSharding` for every leaf of
``tx.init(params)`` that always divides the leaf's shape:

* a state leaf is tied to the parameter whose key path is the longest suffix of its own path
  (``mu/enc/w`` belongs to ``enc/w``), which is how optax and cljax states mirror parameters;
  failing that, to the parameter whose path is the longest run inside its own path
  (``inner/enc/w/mu`` belongs to ``enc/w``: a per-parameter sub-state, as the low-rank
  transforms keep one inner state per matrix leaf);
* each axis of a tied leaf takes the mesh axes of the parameter axis it corresponds to (the same
  position with the same size, else the only parameter axis of that size), and is replicated when
  there is none, when that would reuse a mesh axis, or when the size does not divide;
* every other leaf (counts, PRNG keys, global statistics) is replicated.

So element-wise state (Adam moments, utility traces) follows its parameter, and a projector of
shape ``(m, r)`` for an ``(m, n)`` parameter gets the parameter's row sharding and a replicated
rank axis.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["state_shardings", "tied_spec"]


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def tied_spec(
    state_shape: tuple[int, ...],
    param_shape: tuple[int, ...],
    param_spec: PartitionSpec,
    mesh_shape: dict[str, int],
) -> PartitionSpec:
    """Returns a `PartitionSpec` for a state leaf tied to a parameter, always dividing its shape.

    A state leaf of the parameter's own shape (element-wise state) gets `param_spec` itself, as
    written, whenever that divides; other results drop trailing ``None`` entries.

    Args:
        state_shape: Shape of the state leaf.
        param_shape: Shape of the parameter it belongs to.
        param_spec: The parameter's `PartitionSpec`.
        mesh_shape: Mesh axis name -> size.
    """
    entries = list(param_spec) + [None] * (len(param_shape) - len(param_spec))
    used: set[str] = set()
    out = []
    for i, size in enumerate(state_shape):
        candidates = []
        if i < len(param_shape) and param_shape[i] == size and len(state_shape) == len(param_shape):
            candidates = [i]
        else:
            same = [j for j, s in enumerate(param_shape) if s == size]
            if len(same) == 1:
                candidates = same
        entry = None
        if candidates:
            axes = _mesh_axes(entries[candidates[0]])
            count = math.prod(mesh_shape[a] for a in axes) if axes else 1
            if axes and not (used & set(axes)) and size % count == 0:
                entry = entries[candidates[0]]
                used.update(axes)
        out.append(entry)
    while out and out[-1] is None:
        out.pop()
    if tuple(state_shape) == tuple(param_shape) and out == _strip(entries):
        return param_spec  # element-wise state: exactly the parameter's spec, as written
    return PartitionSpec(*out)


def _strip(entries: list) -> list:
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return entries


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def _path_key(path) -> tuple:
    return tuple(path)


def state_shardings(tx: Any, params: Any, param_shardings: Any) -> Any:
    """Returns `NamedSharding`s for ``tx.init(params)``, each one dividing its leaf.

    Args:
        tx: An optax `GradientTransformation` (any chain, partition or wrapper).
        params: The parameters, or their `jax.ShapeDtypeStruct`s.
        param_shardings: A tree of `NamedSharding`s with the structure of `params`.

    Returns:
        A tree with the structure of ``tx.init(params)`` whose leaves are `NamedSharding`s, ready
        for `jax.device_put` or the `out_shardings` of a jitted ``tx.init``.

    Raises:
        ValueError: when `param_shardings` does not match `params`, or is not made of
            `NamedSharding`s on one mesh.

    Example:
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
        >>> params = {"w": jnp.zeros((4, 6))}
        >>> param_shardings = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))}
        >>> tx = optax.adam(1e-3)
        >>> shardings = cljax.state_shardings(tx, params, param_shardings)
        >>> shardings[0].mu["w"].spec
        P('data',)
        >>> opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    try:
        sharding_leaves = jax.tree.structure(params).flatten_up_to(param_shardings)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "state_shardings: `param_shardings` must have the structure of `params`, one "
            f"NamedSharding per parameter leaf ({err})."
        ) from err
    mesh = None
    for (path, _), sharding in zip(param_leaves, sharding_leaves, strict=True):
        if not isinstance(sharding, NamedSharding):
            raise ValueError(
                f"state_shardings: leaf '{_leaf_name(path)}' has sharding {sharding!r}; "
                "every parameter needs a NamedSharding."
            )
        if mesh is None:
            mesh, first = sharding.mesh, path
        elif sharding.mesh != mesh:
            raise ValueError(
                f"state_shardings: leaf '{_leaf_name(path)}' has a sharding on mesh {sharding.mesh}; "
                f"leaf '{_leaf_name(first)}' uses mesh {mesh}. Put every parameter on one mesh."
            )
    if mesh is None:
        raise ValueError("state_shardings: `params` has no leaves.")
    mesh_shape = dict(mesh.shape)
    by_path = {
        _path_key(path): (tuple(leaf.shape), sharding.spec)
        for (path, leaf), sharding in zip(param_leaves, sharding_leaves, strict=True)
    }
    max_len = max(len(k) for k in by_path)  # a bare-array `params` has the empty path
    state = jax.eval_shape(tx.init, params)

    def tie(path):
        for length in range(min(max_len, len(path)), -1, -1):
            tied = by_path.get(path[len(path) - length :])
            if tied is not None:
                return tied
        # Per-parameter sub-states (``inner/enc/w/mu``): the parameter path inside the state path.
        for length in range(min(max_len, len(path) - 1), 0, -1):
            for start in range(len(path) - length - 1, -1, -1):
                tied = by_path.get(path[start : start + length])
                if tied is not None:
                    return tied
        return None

    def assign(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        tied = tie(_path_key(path))
        if tied is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, tied_spec(shape, tied[0], tied[1], mesh_shape))

    return jax.tree_util.tree_map_with_path(assign, state)
