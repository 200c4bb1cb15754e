"""Pytree helpers: path-pattern leaf selection, matrix views of leaves, finding sub-states.

* `select` / `exclude` / `label_by_path` build boolean or label trees from regular expressions
  over leaf paths (``'encoder/layers/0/kernel'``), for `optax.masked` and `optax.partition`.
* `MatrixSpec`, `as_matrices` and `from_matrices` view any leaf as a batch of matrices: the axes
  named as rows and columns form each matrix, every other axis is a batch axis.
* `find_state` / `replace_state` locate one transform's state anywhere inside nested
  `optax.chain` / `optax.partition` / `optax.inject_hyperparams` / `optax.masked` states.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "MatrixSpec",
    "as_matrices",
    "exclude",
    "find_state",
    "find_states",
    "from_matrices",
    "label_by_path",
    "leaf_paths",
    "matrix_shape",
    "replace_state",
    "select",
]

Pattern = str | re.Pattern | Sequence[str | re.Pattern]


def _compile(fn: str, pattern: Pattern) -> list[re.Pattern]:
    if isinstance(pattern, (str, re.Pattern)):
        pattern = [pattern]
    elif not isinstance(pattern, (list, tuple)):
        raise TypeError(
            f"{fn}(pattern=...) must be a string, a compiled regex or a list of them, got {type(pattern).__name__}."
        )
    compiled = []
    for p in pattern:
        if isinstance(p, re.Pattern):
            if not isinstance(p.pattern, str):
                raise TypeError(f"{fn}(pattern=...) must be a str regex (paths are strings), got bytes regex {p!r}.")
            compiled.append(p)
        elif isinstance(p, str):
            try:
                compiled.append(re.compile(p))
            except re.error as err:
                raise ValueError(f"{fn}(pattern=...) is not a valid regular expression: {p!r} ({err}).") from err
        else:
            raise TypeError(f"{fn}(pattern=...) must be a string, a compiled regex or a list of them, got {type(p).__name__}.")
    if not compiled:
        raise ValueError(f"{fn}(pattern=...) is empty; pass at least one regular expression.")
    return compiled


def _path_string(path) -> str:
    """The string patterns are matched against: keys joined by ``/``; ``''`` for a bare root leaf."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def leaf_paths(tree: Any) -> Any:
    """Returns a tree of the same structure whose leaves are their path strings (``'enc/w'``).

    These are the strings `select`, `exclude` and `label_by_path` match; a bare-array tree has
    the empty path ``''``.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_string(path), tree)


def select(pattern: Pattern) -> Callable[[Any], Any]:
    """Returns a function mapping params to a boolean tree: True where the path matches.

    A leaf matches when `re.search` finds any of the patterns in its path string, written with
    ``/`` between keys (``{'enc': {'w': ...}}`` gives ``'enc/w'``; list indices give ``'layers/0'``).
    The result is a valid `mask` for `optax.masked` and `optax.add_decayed_weights`.

    Args:
        pattern: A regular expression, or a sequence of them (a leaf matching any one is selected).

    Example:
        >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
        >>> cljax.select("kernel$")(params)
        {'dense': {'bias': False, 'kernel': True}}
    """
    regexes = _compile("select", pattern)

    def mask_fn(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(r.search(_path_string(path)) for r in regexes), params
        )

    return mask_fn


def exclude(pattern: Pattern) -> Callable[[Any], Any]:
    """Returns a function mapping params to a boolean tree: False where the path matches.

    The complement of `select`: ``exclude("bias|scale")`` decays every leaf but biases and scales.
    """
    regexes = _compile("exclude", pattern)

    def mask_fn(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(r.search(_path_string(path)) for r in regexes), params
        )

    return mask_fn


def label_by_path(rules: Mapping[str, Pattern], *, default: str) -> Callable[[Any], Any]:
    """Returns a function mapping params to a label tree for `optax.partition`.

    Rules are tried in order; the first label whose pattern matches a leaf's path wins, and leaves
    matching none get `default`.

    Example:
        >>> labels = cljax.label_by_path({"frozen": "embed"}, default="train")
        >>> labels({"embed": jnp.ones(3), "head": jnp.ones(3)})
        {'embed': 'frozen', 'head': 'train'}
    """
    if not isinstance(rules, Mapping):
        raise TypeError(f"label_by_path(rules=...) must be a mapping label -> pattern, got {type(rules).__name__}.")
    compiled = [(label, _compile("label_by_path", pattern)) for label, pattern in rules.items()]

    def label_fn(params):
        def label(path, _):
            name = _path_string(path)
            for lab, regexes in compiled:
                if any(r.search(name) for r in regexes):
                    return lab
            return default

        return jax.tree_util.tree_map_with_path(label, params)

    return label_fn


# ---------------------------------------------------------------------------------------------
# Matrix views.


class MatrixSpec(NamedTuple):
    """Which axes of a leaf form a matrix's rows and columns; all other axes are batch axes.

    Each of `rows` and `cols` is an axis or a tuple of axes (negative values count from the end);
    several axes are flattened, in order, into one matrix dimension. The default views a 2-D
    leaf as itself and a stacked ``(L, m, n)`` leaf as ``L`` matrices of shape ``(m, n)``. A Flax
    convolution kernel ``(kh, kw, c_in, c_out)`` is ``MatrixSpec(rows=(0, 1, 2), cols=3)``.
    """

    rows: int | tuple[int, ...] = -2
    cols: int | tuple[int, ...] = -1

    def axes(self, ndim: int, name: str = "") -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Returns ``(batch_axes, row_axes, col_axes)`` as non-negative axes for an `ndim` leaf."""
        where = f"leaf '{name}' " if name else "a leaf "

        def norm(axes):
            if isinstance(axes, int):
                axes = (axes,)
            elif isinstance(axes, (tuple, list)):
                axes = tuple(axes)
            else:
                raise TypeError(f"MatrixSpec: rows and cols must be an int or a tuple of ints, got {axes!r} in {self}.")
            if not axes:
                raise ValueError(f"MatrixSpec: rows and cols each need at least one axis, got {self}.")
            out = []
            for a in axes:
                if isinstance(a, bool) or not isinstance(a, int):
                    raise TypeError(f"MatrixSpec: axes must be ints, got {a!r} in {self}.")
                if not -ndim <= a < ndim:
                    raise ValueError(
                        f"MatrixSpec: {where}has {ndim} dims; axis {a} of {self} is out of range. "
                        "Route leaves with fewer dims to the fallback transform."
                    )
                out.append(a % ndim)
            return tuple(out)

        rows, cols = norm(self.rows), norm(self.cols)
        if set(rows) & set(cols) or len(set(rows)) != len(rows) or len(set(cols)) != len(cols):
            raise ValueError(f"MatrixSpec: {where}axes repeat between or within rows and cols: {self}.")
        batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
        return batch, rows, cols


def matrix_shape(shape: Sequence[int], spec: MatrixSpec = MatrixSpec(), name: str = "") -> tuple[int, int, int]:
    """Returns ``(batch, m, n)``: the number of matrices and each one's shape for a leaf shape."""
    batch, rows, cols = spec.axes(len(shape), name)
    size = lambda axes: math.prod(shape[a] for a in axes)
    return size(batch), size(rows), size(cols)


def as_matrices(x: jax.Array, spec: MatrixSpec = MatrixSpec(), name: str = "") -> jax.Array:
    """Views `x` as a ``(batch, m, n)`` stack of matrices (a transpose and a reshape).

    Batch axes keep their relative order, then row axes, then column axes. `from_matrices` undoes
    this exactly.
    """
    x = jnp.asarray(x)
    batch, rows, cols = spec.axes(x.ndim, name)
    b, m, n = matrix_shape(x.shape, spec, name)
    return jnp.transpose(x, batch + rows + cols).reshape(b, m, n)


def from_matrices(mats: jax.Array, spec: MatrixSpec, shape: Sequence[int], name: str = "") -> jax.Array:
    """Inverse of `as_matrices`: returns a leaf of `shape` from its ``(batch, m, n)`` view."""
    shape = tuple(shape)
    batch, rows, cols = spec.axes(len(shape), name)
    expected = matrix_shape(shape, spec, name)
    if tuple(mats.shape) != expected:
        raise ValueError(
            f"from_matrices: leaf '{name or '<leaf>'}' has matrix view shape {tuple(mats.shape)}; "
            f"shape {shape} with {spec} needs {expected}."
        )
    order = batch + rows + cols
    permuted = mats.reshape(tuple(shape[a] for a in order))
    inverse = [0] * len(order)
    for i, a in enumerate(order):
        inverse[a] = i
    return jnp.transpose(permuted, inverse)


# ---------------------------------------------------------------------------------------------
# Finding sub-states.

StateQuery = type | tuple[type, ...] | Callable[[Any], bool]


def _matcher(query: StateQuery) -> Callable[[Any], bool]:
    if isinstance(query, type) or (isinstance(query, tuple) and query and all(isinstance(t, type) for t in query)):
        return lambda s: isinstance(s, query)
    if callable(query):
        return query
    raise TypeError(f"find_state(state_type=...) must be a type, a tuple of types or a predicate, got {query!r}.")


def _query_name(query: StateQuery) -> str:
    if isinstance(query, type):
        return query.__name__
    if isinstance(query, tuple):
        return " or ".join(t.__name__ for t in query)
    return getattr(query, "__name__", repr(query))


def _state_types(opt_state: Any) -> list[str]:
    names: list[str] = []

    def visit(node):
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            names.append(type(node).__name__)
        return False

    jax.tree.leaves(opt_state, is_leaf=visit)
    return sorted(set(names))


def _one_level(node: Any) -> tuple[list[Any], Any] | None:
    """Returns ``(children, treedef)`` one pytree level below `node`, or None for a leaf."""
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
        return None
    return children, treedef


def find_states(opt_state: Any, state_type: StateQuery) -> list[Any]:
    """Returns every sub-state of `opt_state` matching `state_type`, in tree order.

    Matches nested inside a match (``masked(chain(masked(...)))``) are included, outer first.

    Args:
        opt_state: Any optimizer state (nested chain / partition / masked / injected states).
        state_type: A state class, a tuple of classes, or a predicate ``state -> bool``.
    """
    found: list[Any] = []
    _collect(opt_state, _matcher(state_type), found)
    return found


# Module-level recursions rather than nested closures: a recursive closure refers to itself, and
# the reference cycle would keep the states it touched alive until a garbage collection (a
# whole-model basis replaced at a task boundary would linger).
def _collect(node: Any, is_match: Callable[[Any], bool], found: list[Any]) -> None:
    if is_match(node):
        found.append(node)
    level = _one_level(node)
    if level is not None:
        for child in level[0]:
            _collect(child, is_match, found)


def _pick(fn: str, opt_state: Any, state_type: StateQuery, index: int | None) -> int:
    found = find_states(opt_state, state_type)
    name = _query_name(state_type)
    if not found:
        raise ValueError(
            f"{fn}: no {name} in the optimizer state; it holds {_state_types(opt_state) or 'no NamedTuple states'}. "
            "Build the optimizer with the transform that owns this state."
        )
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise TypeError(f"{fn}(index=...) must be an int or None, got {index!r}.")
    if index is None:
        if len(found) > 1:
            raise ValueError(
                f"{fn}: found {len(found)} states of type {name}; pass `index=` (0 to {len(found) - 1}, "
                "in tree order) to choose one."
            )
        return 0
    if not -len(found) <= index < len(found):
        raise ValueError(f"{fn}(index=...) must be in [0, {len(found)}), got {index}.")
    return index % len(found)


def find_state(opt_state: Any, state_type: StateQuery, *, index: int | None = None) -> Any:
    """Returns the one sub-state of `opt_state` matching `state_type`.

    Args:
        opt_state: Any optimizer state.
        state_type: A state class, a tuple of classes, or a predicate ``state -> bool``.
        index: Which match to return when there are several (tree order). Without it, several
            matches are an error.

    Raises:
        ValueError: when nothing matches, or several match and `index` is None.

    Example:
        >>> tx = optax.chain(optax.clip(1.0), optax.scale_by_adam())
        >>> adam = cljax.find_state(tx.init({"w": jnp.ones(3)}), optax.ScaleByAdamState)
    """
    i = _pick("find_state", opt_state, state_type, index)
    return find_states(opt_state, state_type)[i]


def replace_state(
    opt_state: Any, new_state: Any, *, state_type: StateQuery | None = None, index: int | None = None
) -> Any:
    """Returns `opt_state` with its one sub-state matching `state_type` replaced by `new_state`.

    Args:
        opt_state: Any optimizer state.
        new_state: The replacement sub-state.
        state_type: What to replace; defaults to ``type(new_state)``.
        index: Which match to replace when there are several (tree order).

    Raises:
        ValueError: when nothing matches, or several match and `index` is None.
    """
    query = type(new_state) if state_type is None else state_type
    target = _pick("replace_state", opt_state, query, index)
    return _rebuild(opt_state, _matcher(query), [0], target, new_state)


def _rebuild(node: Any, is_match, seen: list[int], target: int, new_state: Any) -> Any:
    """The pre-order walk of `_collect`, replacing match number `target` by `new_state`."""
    if is_match(node):
        i = seen[0]
        seen[0] += 1
        if i == target:
            return new_state
    level = _one_level(node)
    if level is None:
        return node
    children, treedef = level
    rebuilt = [_rebuild(child, is_match, seen, target, new_state) for child in children]
    if all(new is old for new, old in zip(rebuilt, children, strict=True)):
        return node  # untouched sub-trees stay the very same objects
    return treedef.unflatten(rebuilt)
