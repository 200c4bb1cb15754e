"""Ready-made optimizers of the regularizers family."""

from __future__ import annotations

__all__: list[str] = []
