"""Ready-made optimizers of the low-rank family."""

from __future__ import annotations

__all__: list[str] = []
