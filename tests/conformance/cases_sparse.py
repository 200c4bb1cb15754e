"""Conformance cases of the sparse family (SP-01 … SP-09, SP-10, SP-14 … SP-16, SP-19,
SP-22, SP-23) and its optimizers.

Masks are built for the suite's 4-leaf parameter tree (``scalar ()``, ``vec (8,)``, ``mat (8, 4)``,
``stack (2, 8, 4)``); masks and other structural arguments are listed in `static_args`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cljax
from cljax.transforms.sparse import layer_importance, selection, slow_learner
from tests.conformance.case import Case


def _masks(frozen_vec: bool = True):
    """Masks for the suite's tree: a dense scalar, a fully frozen (or half) vector, patterned
    matrices."""
    return {
        "scalar": None,
        "vec": jnp.zeros(8, bool) if frozen_vec else jnp.arange(8) % 2 == 0,
        "mat": jnp.asarray(np.arange(32).reshape(8, 4) % 3 == 0),
        "stack": jnp.asarray(np.arange(64).reshape(2, 8, 4) % 2 == 1),
    }


CASES: dict[str, Case] = {
    # SP-MASK core (SP-06 static support with prune=True).
    "mask_updates": Case(
        cljax.mask_updates,
        {"inner": optax.adamw(1e-2, weight_decay=1e-2), "masks": _masks(), "prune": True},
        static_args=("masks", "prune"),
        needs_params=True,
    ),
    "mask_updates/freeze_sgd": Case(
        cljax.mask_updates,
        {"inner": optax.sgd(1e-2), "masks": _masks(frozen_vec=False)},
        static_args=("masks", "prune"),
        strict_dtypes=True,
    ),
    # SP-01 SPU: element masks on "mat" and "stack", "vec" trained fully, "scalar" frozen.
    "spu": Case(
        cljax.spu,
        {
            "inner": optax.adamw(1e-2, weight_decay=1e-2),
            "targets": cljax.select("mat|stack"),
            "train_fully": cljax.select("vec"),
        },
        static_args=("targets", "train_fully"),
        needs_params=True,
    ),
    # SP-02 ExSSNeT exclusive masks.
    "exclusive_masks": Case(
        cljax.exclusive_masks,
        {"inner": optax.adam(1e-2), "capacity": 3},
        static_args=("capacity",),
    ),
    # SP-03 HFT: two groups, resampled every 2 steps.
    "hft": Case(
        cljax.hft,
        {
            "inner": optax.adam(1e-2),
            "fraction": 0.5,
            "groups": cljax.label_by_path({"a": "scalar|vec"}, default="b"),
            "resample_every": 2,
            "seed": 1,
        },
        static_args=("groups", "resample_every", "seed"),
        leafwise=False,  # leaves of a group are drawn together
    ),
    # SP-04 LISA: the (2, 8, 4) leaf is a stack of two layers, one trained per period of 2 steps.
    "lisa": Case(
        cljax.lisa,
        {
            "inner": optax.adam(1e-2),
            "layers": cljax.select("stack"),
            "num_active": 1,
            "interval": 2,
            "seed": 2,
        },
        static_args=("layers", "num_active", "interval", "seed"),
        leafwise=False,
    ),
    # SP-04 LISA over a list of layer subtrees: the suite's tree holds no such list (no "blocks"
    # node), so every leaf is always on; tests/transforms/sparse/test_lisa_groups.py covers layers.
    "lisa/layer_list": Case(
        cljax.lisa,
        {
            "inner": optax.adam(1e-2),
            "layer_list": "blocks",
            "num_active": 1,
            "interval": 2,
            "seed": 2,
        },
        static_args=("layer_list", "num_active", "interval", "seed"),
        leafwise=False,
    ),
    # SP-05 gradual magnitude pruning (cubic schedule, mask updates every 2 steps).
    "magnitude_pruning": Case(
        cljax.magnitude_pruning,
        {
            "inner": optax.adamw(1e-2, weight_decay=1e-2),
            "sparsity": cljax.gradual_pruning_schedule(0.75, 0, 4, update_every=2),
            "update_every": 2,
        },
        static_args=("update_every", "scope", "n_m", "axis", "include"),
        needs_params=True,
    ),
    "magnitude_pruning/global": Case(
        cljax.magnitude_pruning,
        {"inner": optax.sgd(1e-2), "sparsity": 0.5, "scope": "global", "update_every": 2},
        static_args=("update_every", "scope", "n_m", "axis", "include"),
        needs_params=True,
        leafwise=False,
    ),
    # SP-07 RigL (gradient growth) and SET (random growth); a mask update at step 2.
    "set_rigl": Case(
        cljax.set_rigl,
        {
            "inner": optax.adam(1e-2),
            "masks": _masks(frozen_vec=False),
            "drop_fraction": 0.5,
            "update_every": 2,
            "end_step": 50,
        },
        static_args=(
            "masks",
            "grow",
            "update_every",
            "end_step",
            "cosine_decay",
            "skip_update",
            "seed",
        ),
        needs_params=True,
    ),
    # SP-08 DST inside the free capacity: SET growth restricted by a mask held in state.
    "set_rigl/restricted": Case(
        cljax.set_rigl,
        {
            "inner": optax.adam(1e-2),
            "masks": _masks(frozen_vec=False),
            "grow": "random",
            "drop_fraction": 0.5,
            "update_every": 2,
            "end_step": 50,
            "restrict_growth": True,
        },
        static_args=(
            "masks",
            "grow",
            "update_every",
            "end_step",
            "cosine_decay",
            "skip_update",
            "seed",
            "restrict_growth",
        ),
        needs_params=True,
    ),
    # SP-10 / SR-STE decay on masked-out weights.
    "masked_decay": Case(
        cljax.masked_decay,
        {"weight_decay": 0.1, "mask_fn": lambda p: jax.tree.map(lambda v: v > 0, p)},
        static_args=("mask_fn",),
        needs_params=True,
        strict_dtypes=True,
    ),
    # SP-14 MIGU: per-unit activations for the matrix and the stack (Flax layout, output axis -1).
    "migu": Case(
        selection.migu,
        {"inner": optax.adamw(1e-2, weight_decay=1e-2), "threshold": 0.5},
        static_args=("output_axis", "axis_name"),
        needs_params=True,
        extra_args={
            "activations": {
                "vec": jnp.linspace(0.0, 1.0, 8),
                "mat": jnp.asarray([0.3, 0.1, 0.4, 0.2]),
                "stack": jnp.asarray([[0.5, 0.2, 0.1, 0.9], [0.0, 0.0, 0.0, 0.0]]),
            }
        },
    ),
    # SP-22: "scalar" frozen as an embedding, "vec" is block 0, the stack holds blocks 1 and 2,
    # "mat" is block 3; the first two blocks are frozen.
    "freeze_bottom_layers": Case(
        selection.freeze_bottom_layers,
        {
            "inner": optax.adamw(1e-2, weight_decay=1e-2),
            "num_frozen": 2,
            "depth": cljax.label_by_path({0: "vec", 3: "mat"}, default=1),
            "stacked": cljax.select("stack"),
            "embeddings": cljax.select("scalar"),
        },
        static_args=("num_frozen", "depth", "stacked", "embeddings"),
        needs_params=True,
    ),
    # SP-15: the top two of four layers ("a" and the stack's second row) train.
    "surgical_fine_tuning": Case(
        selection.surgical_fine_tuning,
        {
            "inner": optax.adam(1e-2),
            "scores": {"a": 3.0, "b": 1.0, ("s", 0): 0.5, ("s", 1): 2.0},
            "num_layers": 2,
            "layers": cljax.label_by_path(
                {"a": "scalar|vec", "b": "mat", "s": "stack"}, default=None
            ),
            "stacked": cljax.select("stack"),
        },
        static_args=("scores", "num_layers", "layers", "stacked"),
    ),
    # SP-16: FPF on two modules.
    "fpf": Case(
        selection.fpf,
        {"inner": optax.sgd(1e-2, momentum=0.9), "modules": cljax.select("vec|stack")},
        static_args=("modules",),
    ),
    # SP-23 SLCA: "mat" is the head; the other leaves learn at a tenth of its rate.
    "slca": Case(
        slow_learner.slca,
        {"inner": optax.sgd(1e-2, momentum=0.9), "head": cljax.select("mat"), "ratio": 0.1},
        static_args=("head",),
    ),
    # SP-19 IST: one of the stack's two layers trains per step, drawn by the layer scores.
    "ist": Case(
        layer_importance.ist,
        {
            "inner": optax.adam(1e-2),
            "layers": cljax.select("stack"),
            "num_active": 1,
            "num_layers": 2,
            "seed": 3,
        },
        static_args=("layers", "num_active", "num_layers", "interval", "seed"),
    ),
}

# Public names of the family that are not transform factories (states, pure functions, helpers).
NOT_TRANSFORMS: frozenset[str] = frozenset(
    {
        "ExclusiveMasksState",
        "HftState",
        "LisaState",
        "MagnitudePruningState",
        "MaskUpdatesState",
        "SetRiglState",
        "dst_task_masks",
        "set_rigl_get_masks",
        "set_rigl_restrict",
        "set_rigl_set_masks",
        "SpuState",
        "exclusive_masks_commit_task",
        "exclusive_masks_lookup",
        "exclusive_masks_start_task",
        "hft_half_reset",
        "spu_accumulate",
        "sparse_soup",
        "spu_set_task",
        "supermask",
        "MaskedDecayState",
        "erk_densities",
        "gradual_pruning_schedule",
        "magnitude_mask",
        "mask_updates_densify",
        "mask_updates_get",
        "mask_updates_set",
        "masked_merge",
        "nm_mask",
        "random_mask",
        "straight_through_mask",
        "topk_mask",
        "uniform_densities",
        "FpfState",
        "FreezeBottomLayersState",
        "MiguState",
        "SurgicalFineTuningState",
        "surgical_layer_scores",
        "SlcaClassStats",
        "SlcaState",
        "slca_init_stats",
        "slca_sample_features",
        "slca_update_stats",
        "IstState",
        "ist_sample_suppressed",
        "ist_update_importance",
    }
)
