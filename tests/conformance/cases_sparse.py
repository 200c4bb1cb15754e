"""Conformance cases of the sparse family and its optimizers."""

from __future__ import annotations

from tests.conformance.case import Case

CASES: dict[str, Case] = {}

# Public names of the family that are not transform factories (states, pure functions, helpers).
NOT_TRANSFORMS: frozenset[str] = frozenset()
