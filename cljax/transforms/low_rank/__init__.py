"""Low-rank family: subspace-projected optimizers, LoRA / SLTrain re-parameterisations, low-rank compression.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

from cljax.transforms.low_rank.adalora import MaskAdaloraBudgetState as MaskAdaloraBudgetState
from cljax.transforms.low_rank.adalora import adalora_budget_schedule as adalora_budget_schedule
from cljax.transforms.low_rank.adalora import adalora_orthogonality as adalora_orthogonality
from cljax.transforms.low_rank.adalora import mask_adalora_budget as mask_adalora_budget
from cljax.transforms.low_rank.compression import LowRankResidual as LowRankResidual
from cljax.transforms.low_rank.compression import compress_low_rank as compress_low_rank
from cljax.transforms.low_rank.compression import decompress_low_rank as decompress_low_rank
from cljax.transforms.low_rank.compression import effective_rank as effective_rank
from cljax.transforms.low_rank.compression import lorc_compensate as lorc_compensate
from cljax.transforms.low_rank.compression import (
    low_rank_storage_bytes as low_rank_storage_bytes,
)
from cljax.transforms.low_rank.compression import timber as timber
from cljax.transforms.low_rank.dion import ScaleByDionState as ScaleByDionState
from cljax.transforms.low_rank.dion import scale_by_dion as scale_by_dion
from cljax.transforms.low_rank.frugal import ScaleByFrugalState as ScaleByFrugalState
from cljax.transforms.low_rank.frugal import scale_by_frugal as scale_by_frugal
from cljax.transforms.low_rank.intrinsic import IntrinsicParams as IntrinsicParams
from cljax.transforms.low_rank.intrinsic import intrinsic_apply as intrinsic_apply
from cljax.transforms.low_rank.intrinsic import intrinsic_dimension as intrinsic_dimension
from cljax.transforms.low_rank.intrinsic import intrinsic_init as intrinsic_init
from cljax.transforms.low_rank.lora import LoraWeight as LoraWeight
from cljax.transforms.low_rank.lora import fedex_lora_average as fedex_lora_average
from cljax.transforms.low_rank.lora import lora_apply as lora_apply
from cljax.transforms.low_rank.lora import lora_effective_rank as lora_effective_rank
from cljax.transforms.low_rank.lora import lora_extract as lora_extract
from cljax.transforms.low_rank.lora import lora_gate_prox as lora_gate_prox
from cljax.transforms.low_rank.lora import lora_init as lora_init
from cljax.transforms.low_rank.lora import lora_labels as lora_labels
from cljax.transforms.low_rank.lora import lora_merge_and_reset as lora_merge_and_reset
from cljax.transforms.low_rank.lora import lora_refactorize as lora_refactorize
from cljax.transforms.low_rank.lora import lora_reset_state as lora_reset_state
from cljax.transforms.low_rank.merged_lora import MergedLoraState as MergedLoraState
from cljax.transforms.low_rank.merged_lora import merged_lora as merged_lora
from cljax.transforms.low_rank.merged_lora import merged_lora_reset as merged_lora_reset
from cljax.transforms.low_rank.projection import (
    ScaleByLowRankProjectionState as ScaleByLowRankProjectionState,
)
from cljax.transforms.low_rank.projection import (
    scale_by_low_rank_projection as scale_by_low_rank_projection,
)
from cljax.transforms.low_rank.quantized import QuantizedTensor as QuantizedTensor
from cljax.transforms.low_rank.quantized import QuantizeStateState as QuantizeStateState
from cljax.transforms.low_rank.quantized import dynamic_code as dynamic_code
from cljax.transforms.low_rank.quantized import quantize_state as quantize_state
from cljax.transforms.low_rank.rank_bank import RankBankWeight as RankBankWeight
from cljax.transforms.low_rank.rank_bank import rank_bank_add_task as rank_bank_add_task
from cljax.transforms.low_rank.rank_bank import rank_bank_apply as rank_bank_apply
from cljax.transforms.low_rank.rank_bank import rank_bank_init as rank_bank_init
from cljax.transforms.low_rank.rank_bank import rank_bank_mask_updates as rank_bank_mask_updates
from cljax.transforms.low_rank.reset import WithPeriodicResetState as WithPeriodicResetState
from cljax.transforms.low_rank.reset import with_periodic_reset as with_periodic_reset
from cljax.transforms.low_rank.sltrain import SparseLowRankWeight as SparseLowRankWeight
from cljax.transforms.low_rank.sltrain import sltrain_apply as sltrain_apply
from cljax.transforms.low_rank.sltrain import sltrain_init as sltrain_init
from cljax.transforms.low_rank.sltrain import sltrain_materialize as sltrain_materialize
from cljax.transforms.low_rank.sltrain import sltrain_support as sltrain_support

__all__ = [
    "IntrinsicParams",
    "LoraWeight",
    "LowRankResidual",
    "MaskAdaloraBudgetState",
    "MergedLoraState",
    "QuantizeStateState",
    "QuantizedTensor",
    "RankBankWeight",
    "ScaleByDionState",
    "ScaleByFrugalState",
    "ScaleByLowRankProjectionState",
    "SparseLowRankWeight",
    "WithPeriodicResetState",
    "adalora_budget_schedule",
    "adalora_orthogonality",
    "compress_low_rank",
    "decompress_low_rank",
    "dynamic_code",
    "effective_rank",
    "fedex_lora_average",
    "intrinsic_apply",
    "intrinsic_dimension",
    "intrinsic_init",
    "lora_apply",
    "lora_effective_rank",
    "lora_extract",
    "lora_gate_prox",
    "lora_init",
    "lora_labels",
    "lora_merge_and_reset",
    "lora_refactorize",
    "lora_reset_state",
    "lorc_compensate",
    "merged_lora",
    "merged_lora_reset",
    "low_rank_storage_bytes",
    "mask_adalora_budget",
    "quantize_state",
    "rank_bank_add_task",
    "rank_bank_apply",
    "rank_bank_init",
    "rank_bank_mask_updates",
    "scale_by_dion",
    "scale_by_frugal",
    "scale_by_low_rank_projection",
    "sltrain_apply",
    "sltrain_init",
    "sltrain_materialize",
    "sltrain_support",
    "timber",
    "with_periodic_reset",
]
