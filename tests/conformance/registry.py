"""The conformance registry: one `Case` per public transform or optimizer configuration.

Each family keeps its cases in its own module, ``cases_<family>.py``, holding ``CASES`` (name ->
`Case`) and ``NOT_TRANSFORMS`` (its public names that are not transform factories: states,
pure functions, helpers). A family adds its module to `_FAMILIES` in the change that adds it; the
parametrised tests in `test_conformance.py` run every check on every case.
"""

from __future__ import annotations

from tests.conformance import (
    cases_cautious,
    cases_low_rank,
    cases_merging,
    cases_orthogonal,
    cases_regularizers,
    cases_sparse,
    cases_sparse_structured,
)
from tests.conformance.case import Case

_FAMILIES = (
    cases_cautious,
    cases_low_rank,
    cases_merging,
    cases_orthogonal,
    cases_regularizers,
    cases_sparse,
    cases_sparse_structured,
)

# Public names of `cljax` outside any family: pytree and sharding helpers.
_HELPERS = frozenset(
    {
        "MatrixSpec",
        "as_matrices",
        "exclude",
        "find_state",
        "find_states",
        "from_matrices",
        "label_by_path",
        "matrix_shape",
        "replace_state",
        "select",
        "state_shardings",
    }
)


def _merge():
    cases: dict[str, Case] = {}
    not_transforms = set(_HELPERS)
    for family in _FAMILIES:
        clash = sorted(set(cases) & set(family.CASES))
        if clash:
            raise ValueError(f"conformance registry: case names {clash} appear in two families.")
        cases.update(family.CASES)
        not_transforms |= family.NOT_TRANSFORMS
    return cases, frozenset(not_transforms)


CASES, NOT_TRANSFORMS = _merge()

__all__ = ["CASES", "NOT_TRANSFORMS", "Case"]
