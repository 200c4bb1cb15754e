"""Sparse-mask family: element-wise masks in state, pruning masks, continual-learning masks, dynamic sparse training.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

__all__: list[str] = []
