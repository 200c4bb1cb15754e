"""Memory and compute accounting for continual-learning runs (EX-07, EX-08).

Bytes are counted from the stored arrays themselves, in their stored dtype: a bit-packed mask
counts as its ``uint8`` words, a replay buffer as the inputs it holds. ``jax.eval_shape`` gives the
same numbers without allocating anything (`tree_bytes` accepts `jax.ShapeDtypeStruct` leaves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["exemplar_bytes", "memory_account", "split_state_bytes", "tree_bytes"]


def _leaf_bytes(x: Any) -> int:
    if x is None:
        return 0
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        x = np.asarray(x)
        shape, dtype = x.shape, x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return int(math.prod(shape)) * int(np.dtype(np.uint32).itemsize) * 2
    return int(math.prod(shape)) * int(np.dtype(dtype).itemsize)


def tree_bytes(tree: Any) -> int:
    """Total bytes of every array leaf of `tree` (shape x item size of its stored dtype).

    Args:
        tree: Any pytree of arrays, NumPy arrays, scalars or `jax.ShapeDtypeStruct`s.

    Example:
        >>> from cljax.experiments.memory import tree_bytes
        >>> tree_bytes({"w": jnp.zeros((4, 3)), "mask": jnp.zeros(2, jnp.uint8)})
        50
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def split_state_bytes(opt_state: Any, cl_state_types: Sequence[type] = ()) -> tuple[int, int]:
    """Splits an optimizer state's bytes into ``(optimizer, continual-learning memory)``.

    Sub-states whose type is in `cl_state_types` (found with `cljax.find_states`: anchors,
    Fisher diagonals, bases, per-task masks, averaged weights) count as CL memory; everything else
    (moments, counters, PRNG keys) as optimizer state.

    Args:
        opt_state: Any optimizer state.
        cl_state_types: State classes holding continual-learning memory.

    Returns:
        ``(optimizer_bytes, cl_bytes)``; their sum is ``tree_bytes(opt_state)``.

    Example:
        >>> from cljax.experiments.memory import split_state_bytes
        >>> state = optax.chain(optax.adam(1e-3), cljax.track_ema(0.9)).init({"w": jnp.zeros(4)})
        >>> split_state_bytes(state, (cljax.EmaState,))
        (36, 24)
    """
    total = tree_bytes(opt_state)
    types = tuple(cl_state_types)
    if not types:
        return total, 0

    def cl_bytes(node) -> int:  # a match counts whole, except a wrapped optimizer's state inside it
        if isinstance(node, types):
            # cljax's continual-learning states keep the optimizer they wrap in `inner` /
            # `inner_state`: that is optimizer state. Other matches (optax wrappers) count whole.
            own = type(node).__module__.startswith("cljax.")
            wrapped = [getattr(node, f) for f in ("inner", "inner_state") if own and f in node._fields]
            return tree_bytes(node) - sum(tree_bytes(w) - cl_bytes(w) for w in wrapped)
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if jax.tree_util.treedef_is_leaf(treedef):
            return 0
        return sum(cl_bytes(c) for c in children)

    cl = cl_bytes(opt_state)
    return total - cl, cl


def exemplar_bytes(
    example_shape: Sequence[int],
    dtype: Any = np.float32,
    label_dtype: Any = np.int32,
    label_shape: Sequence[int] = (),
) -> int:
    """Bytes one stored exemplar takes (input plus label), to convert memory into exemplars (EX-08).

    Example:
        >>> from cljax.experiments.memory import exemplar_bytes
        >>> exemplar_bytes((64,))
        260
    """
    return (
        int(math.prod(example_shape)) * np.dtype(dtype).itemsize
        + int(math.prod(label_shape)) * np.dtype(label_dtype).itemsize
    )


def memory_account(
    params: Any,
    opt_state: Any,
    *,
    cl_state_types: Sequence[type] = (),
    extra: Any = None,
    buffer: Any = None,
    bytes_per_exemplar: int | None = None,
) -> dict[str, int | float]:
    """Memory of a continual learner, in bytes (EX-07).

    ``total = params + optimizer_state + cl_memory + replay_buffer`` where ``cl_memory`` holds the
    CL sub-states of the optimizer state (`split_state_bytes`) plus the method's own state outside
    the optimizer (`extra`: a running merged task vector, the pre-trained weights it merges into).

    Args:
        params: Model parameters.
        opt_state: Optimizer state.
        cl_state_types: State classes in `opt_state` that are continual-learning memory.
        extra: The method's state outside the optimizer, or None.
        buffer: The replay buffer (its stored arrays), or None.
        bytes_per_exemplar: When given, ``total_exemplars = total / bytes_per_exemplar`` is added
            (memory in exemplar equivalents, EX-08).

    Returns:
        A dict with ``params, optimizer_state, cl_memory, replay_buffer, total`` (ints) and
        optionally ``total_exemplars``.

    Example:
        >>> from cljax.experiments.memory import memory_account
        >>> params = {"w": jnp.zeros(4)}
        >>> memory_account(params, optax.sgd(0.1).init(params))["total"]
        16
    """
    optimizer, cl = split_state_bytes(opt_state, cl_state_types)
    out: dict[str, int | float] = {
        "params": tree_bytes(params),
        "optimizer_state": optimizer,
        "cl_memory": cl + tree_bytes(extra),
        "replay_buffer": tree_bytes(buffer),
    }
    out["total"] = sum(int(v) for v in out.values())
    if bytes_per_exemplar:
        out["total_exemplars"] = out["total"] / bytes_per_exemplar
    return out
