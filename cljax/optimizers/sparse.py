"""Ready-made optimizers of the sparse family."""

from __future__ import annotations

__all__: list[str] = []
