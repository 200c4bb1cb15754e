"""Conformance cases of the low-rank family (LR-01 ... LR-34, OT-01) and its optimizers."""

from __future__ import annotations

import optax

import cljax
from tests.conformance.case import Case

_PROJECTION_STATIC = ("rank", "refresh_every", "seed", "oversample", "power_iters")

CASES: dict[str, Case] = {
    # LR-01 / LR-03 low-rank projection.
    "scale_by_low_rank_projection": Case(
        cljax.scale_by_low_rank_projection,
        {"rank": 2, "refresh_every": 2, "scale": 0.1},
        static_args=_PROJECTION_STATIC,
    ),
    "scale_by_low_rank_projection/random_reproject_stagger": Case(
        cljax.scale_by_low_rank_projection,
        {
            "rank": 2,
            "refresh_every": 2,
            "scale": 0.1,
            "projector": "random",
            "on_refresh": "reproject",
            "stagger": True,
        },
        static_args=_PROJECTION_STATIC,
    ),
    # LR-02 FRUGAL.
    "scale_by_frugal": Case(
        cljax.scale_by_frugal,
        {"density": 0.5, "refresh_every": 2, "scale": 0.1, "inactive_scale": 0.1},
        static_args=("density", "refresh_every", "seed", "oversample", "power_iters"),
    ),
    "scale_by_frugal/blocks": Case(
        cljax.scale_by_frugal,
        {
            "density": 0.5,
            "refresh_every": 2,
            "scale": 0.1,
            "inactive_scale": 0.1,
            "projector": "blocks",
            "block_order": "random",
        },
        static_args=("density", "refresh_every", "seed", "oversample", "power_iters"),
    ),
    "scale_by_frugal/coordinates": Case(
        cljax.scale_by_frugal,
        {
            "density": 0.5,
            "refresh_every": 2,
            "scale": 0.1,
            "inactive_scale": 0.1,
            "projector": "coordinates",
        },
        static_args=("density", "refresh_every", "seed", "oversample", "power_iters"),
    ),
    # OT-01 8-bit block-wise state.
    "quantize_state": Case(
        cljax.quantize_state,
        {"inner": optax.scale_by_adam(), "block_size": 4, "min_size": 8},
        static_args=("block_size", "min_size"),
        code_atol=1,  # a moment on a rounding boundary may take the neighbouring code when sharded
    ),
    # LR-13 Dion.
    "scale_by_dion": Case(
        cljax.scale_by_dion, {"rank": 2, "mu": 0.9}, static_args=("rank", "seed")
    ),
    # LR-11 AdaLoRA budget (a plain tree has no adapters: the wrapper is its inner optimizer).
    "mask_adalora_budget": Case(
        cljax.mask_adalora_budget,
        {
            "inner": optax.adam(1e-2),
            "target_rank": 1,
            "total_steps": 10,
            "warmup_steps": 1,
            "final_steps": 2,
            "every": 1,
        },
        static_args=(
            "target_rank",
            "total_steps",
            "warmup_steps",
            "final_steps",
            "every",
            "initial_rank",
        ),
        needs_params=True,
    ),
    # LR-07 momentum reset.
    # EX-17's per-task LoRA on merged weights (adapters in the state).
    "merged_lora": Case(
        cljax.merged_lora,
        {"inner": optax.adam(1e-2), "rank": 2, "alpha": 4.0},
        static_args=("rank", "alpha", "seed"),
    ),
    "merged_lora/train_others": Case(
        cljax.merged_lora,
        {"inner": optax.adam(1e-2), "rank": 1, "others": "train"},
        static_args=("rank", "seed"),
    ),
    "with_periodic_reset": Case(
        cljax.with_periodic_reset, {"inner": optax.adam(1e-2), "every": 2}, static_args=("every",)
    ),
    # Ready-made optimizers.
    "galore_adamw": Case(
        cljax.galore_adamw,
        {"learning_rate": 1e-2, "rank": 2, "refresh_every": 2, "weight_decay": 1e-2},
        static_args=_PROJECTION_STATIC,
        needs_params=True,
    ),
    "frugal": Case(
        cljax.frugal,
        {"learning_rate": 1e-2, "density": 0.5, "refresh_every": 2, "weight_decay": 1e-2},
        static_args=("density", "refresh_every", "seed"),
        needs_params=True,
    ),
    "dion": Case(
        cljax.dion,
        {"learning_rate": 1e-2, "rank": 2, "weight_decay": 1e-2},
        static_args=("rank", "seed"),
        needs_params=True,
    ),
    # The SVD basis is a stationary point of the online-PCA objective: its gradient right after
    # step 0 is rounding noise, which the reference's AdamW projector step turns into +-lr moves.
    # Sharded, pmapped and MultiSteps runs round differently, so this case uses a plain SGD
    # projector step (the default AdamW is tested in tests/transforms/low_rank).
    "online_subspace_descent": Case(
        cljax.online_subspace_descent,
        {
            "learning_rate": 1e-2,
            "rank": 2,
            "weight_decay": 1e-2,
            "projector_optimizer": optax.sgd(0.05),
        },
        static_args=("rank", "refresh_every"),
        needs_params=True,
    ),
}

# Public names of the family that are not transform factories (states, pure functions, helpers).
NOT_TRANSFORMS = frozenset(
    {
        "ScaleByLowRankProjectionState",
        "ScaleByFrugalState",
        # LoRA, SLTrain, compression: pure pytree functions and their node types.
        "LoraWeight",
        "fedex_lora_average",
        "lora_apply",
        "lora_effective_rank",
        "lora_extract",
        "lora_gate_prox",
        "lora_init",
        "lora_labels",
        "lora_merge_and_reset",
        "lora_refactorize",
        "lora_reset_state",
        "MergedLoraState",
        "merged_lora_reset",
        "SparseLowRankWeight",
        "sltrain_apply",
        "sltrain_init",
        "sltrain_materialize",
        "sltrain_support",
        "LowRankResidual",
        "compress_low_rank",
        "decompress_low_rank",
        "effective_rank",
        "lorc_compensate",
        "low_rank_storage_bytes",
        "timber",
        # LR-07, LR-10, LR-11, LR-13, LR-34: states, pure functions and node types.
        "WithPeriodicResetState",
        "RankBankWeight",
        "rank_bank_add_task",
        "rank_bank_apply",
        "rank_bank_init",
        "rank_bank_mask_updates",
        "MaskAdaloraBudgetState",
        "adalora_budget_schedule",
        "adalora_orthogonality",
        "ScaleByDionState",
        "IntrinsicParams",
        "intrinsic_apply",
        "intrinsic_dimension",
        "intrinsic_init",
        # OT-01.
        "QuantizeStateState",
        "QuantizedTensor",
        "dynamic_code",
    }
)
