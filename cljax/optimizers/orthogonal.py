"""Ready-made optimizers of the orthogonal family."""

from __future__ import annotations

__all__: list[str] = []
