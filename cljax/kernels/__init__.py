"""Pallas kernels for hot paths, each beside its `jnp` reference, with measured dispatch.

Every op has a dispatcher with ``impl='auto' | 'xla' | 'pallas'``. ``'auto'`` runs the Pallas
kernel only on a GPU or TPU and only where `cljax.kernels` records a measured win for that back
end, device and shape (`MEASURED`, empty so far: ``'auto'`` is XLA everywhere). ``'xla'`` runs the
`jnp` reference; ``'pallas'`` runs the kernel (in interpret mode on the CPU, which is for tests,
not speed). The GPU variants are Triton kernels, the TPU variants Mosaic kernels. On the CPU the
tests run both in interpret mode against the references and lower both for their hardware
(Triton IR, Mosaic); neither has yet been compiled or run on a GPU or TPU.

* `adam_step`: Adam moments, cautious mask, (cautious) weight decay and an element-wise mask in
  one pass, with an in-place apply variant.
* `nm_mask`: N:M mask selection along an axis.
* `apply_packed_mask`: applies a row-wise bit-packed mask.
* `galore_adam_step`: GaLore projection, low-rank Adam update and back-projection with the
  parameter-update epilogue.
* `sltrain_matmul`: ``x @ (scale · a b + S)`` without materialising ``S`` in memory, with its VJP.
"""

from cljax.kernels._adam_step import adam_step as adam_step
from cljax.kernels._dispatch import MEASURED as MEASURED
from cljax.kernels._dispatch import Measurement as Measurement
from cljax.kernels._dispatch import choose as choose
from cljax.kernels._galore import galore_adam_step as galore_adam_step
from cljax.kernels._nm_mask import nm_mask as nm_mask
from cljax.kernels._packed_mask import apply_packed_mask as apply_packed_mask
from cljax.kernels._sltrain import SparseTiles as SparseTiles
from cljax.kernels._sltrain import sltrain_matmul as sltrain_matmul
from cljax.kernels._sltrain import sltrain_tiles as sltrain_tiles

__all__ = [
    "MEASURED",
    "Measurement",
    "SparseTiles",
    "adam_step",
    "apply_packed_mask",
    "choose",
    "galore_adam_step",
    "nm_mask",
    "sltrain_matmul",
    "sltrain_tiles",
]
