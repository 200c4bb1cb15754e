"""Conformance cases of the sparse family's structured fine-tuning methods (SP-13, SP-17, SP-18,
SP-20, SP-41).

Kept apart from ``cases_sparse.py`` so each module stays short; the registry merges both.
"""

from __future__ import annotations

from tests.conformance.case import Case

CASES: dict[str, Case] = {}

NOT_TRANSFORMS: frozenset[str] = frozenset()
