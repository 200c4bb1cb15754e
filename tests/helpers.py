"""Assertions shared by the tests: tree comparisons that name the failing leaf."""

from __future__ import annotations

import jax
import numpy as np


def _name(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def assert_trees_close(
    actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6, code_atol: int = 0, err: str = ""
):
    """Asserts two trees have one structure and leaf-wise close float values (float64 compare).

    Unsigned-integer leaves (quantization codes, packed bits) must be equal, or differ by at most
    ``code_atol``.
    """
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    assert a_def == e_def, f"{err} tree structures differ:\n{a_def}\n{e_def}"
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{err} leaf '{_name(path)}': shape {a.shape} != {e.shape}"
        if a.dtype.kind == "u":
            diff = np.abs(a.astype(np.int64) - e.astype(np.int64))
            assert diff.max(initial=0) <= code_atol, (
                f"{err} leaf '{_name(path)}': {int((diff > code_atol).sum())} codes differ by more than "
                f"{code_atol} (max {int(diff.max())})"
            )
            continue
        a, e = a.astype(np.float64), e.astype(np.float64)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{err} leaf '{_name(path)}'")


def assert_trees_equal(actual, expected, *, err: str = ""):
    """Asserts two trees are bitwise identical, leaf by leaf, with equal dtypes."""
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    assert a_def == e_def, f"{err} tree structures differ:\n{a_def}\n{e_def}"
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, f"{err} leaf '{_name(path)}': dtype {a.dtype} != {e.dtype}"
        np.testing.assert_array_equal(a, e, err_msg=f"{err} leaf '{_name(path)}'")
