"""Anchored-regulariser and plasticity family: EWC, L2-to-anchor, SI, MAS, shrink-and-perturb, continual backprop.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

__all__: list[str] = []
