"""Low-rank family: subspace-projected optimizers, LoRA / SLTrain re-parameterisations, low-rank compression.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

__all__: list[str] = []
