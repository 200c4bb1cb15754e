"""Orthogonal-projection family: GPM / FOT, OGD, GEM / A-GEM, OSFT and related projections.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

__all__: list[str] = []
