"""Sparse-mask family: element-wise masks in state, pruning masks, continual-learning masks, dynamic sparse training.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

from cljax.transforms.sparse.continual import ExclusiveMasksState as ExclusiveMasksState
from cljax.transforms.sparse.continual import SpuState as SpuState
from cljax.transforms.sparse.continual import exclusive_masks as exclusive_masks
from cljax.transforms.sparse.continual import (
    exclusive_masks_commit_task as exclusive_masks_commit_task,
)
from cljax.transforms.sparse.continual import exclusive_masks_lookup as exclusive_masks_lookup
from cljax.transforms.sparse.continual import (
    exclusive_masks_start_task as exclusive_masks_start_task,
)
from cljax.transforms.sparse.continual import spu as spu
from cljax.transforms.sparse.continual import spu_accumulate as spu_accumulate
from cljax.transforms.sparse.continual import spu_set_task as spu_set_task
from cljax.transforms.sparse.continual import supermask as supermask
from cljax.transforms.sparse.dsee import DseeWeight as DseeWeight
from cljax.transforms.sparse.dsee import dsee_grebsmo as dsee_grebsmo
from cljax.transforms.sparse.dsee import dsee_init as dsee_init
from cljax.transforms.sparse.dsee import dsee_labels as dsee_labels
from cljax.transforms.sparse.dsee import dsee_materialize as dsee_materialize
from cljax.transforms.sparse.dsee import dsee_support as dsee_support
from cljax.transforms.sparse.dynamic import MagnitudePruningState as MagnitudePruningState
from cljax.transforms.sparse.dynamic import SetRiglState as SetRiglState
from cljax.transforms.sparse.dynamic import dst_task_masks as dst_task_masks
from cljax.transforms.sparse.dynamic import magnitude_pruning as magnitude_pruning
from cljax.transforms.sparse.dynamic import set_rigl as set_rigl
from cljax.transforms.sparse.dynamic import set_rigl_get_masks as set_rigl_get_masks
from cljax.transforms.sparse.dynamic import set_rigl_restrict as set_rigl_restrict
from cljax.transforms.sparse.dynamic import set_rigl_set_masks as set_rigl_set_masks
from cljax.transforms.sparse.layer_importance import IstState as IstState
from cljax.transforms.sparse.layer_importance import ist as ist
from cljax.transforms.sparse.layer_importance import ist_sample_suppressed as ist_sample_suppressed
from cljax.transforms.sparse.layer_importance import ist_update_importance as ist_update_importance
from cljax.transforms.sparse.mask_updates import MaskUpdatesState as MaskUpdatesState
from cljax.transforms.sparse.mask_updates import mask_updates as mask_updates
from cljax.transforms.sparse.mask_updates import mask_updates_densify as mask_updates_densify
from cljax.transforms.sparse.mask_updates import mask_updates_get as mask_updates_get
from cljax.transforms.sparse.mask_updates import mask_updates_set as mask_updates_set
from cljax.transforms.sparse.masks import erk_densities as erk_densities
from cljax.transforms.sparse.masks import gradual_pruning_schedule as gradual_pruning_schedule
from cljax.transforms.sparse.masks import magnitude_mask as magnitude_mask
from cljax.transforms.sparse.masks import nm_mask as nm_mask
from cljax.transforms.sparse.masks import random_mask as random_mask
from cljax.transforms.sparse.masks import topk_mask as topk_mask
from cljax.transforms.sparse.masks import uniform_densities as uniform_densities
from cljax.transforms.sparse.sampling import HftState as HftState
from cljax.transforms.sparse.sampling import LisaState as LisaState
from cljax.transforms.sparse.sampling import hft as hft
from cljax.transforms.sparse.sampling import hft_half_reset as hft_half_reset
from cljax.transforms.sparse.sampling import lisa as lisa
from cljax.transforms.sparse.selection import FpfState as FpfState
from cljax.transforms.sparse.selection import FreezeBottomLayersState as FreezeBottomLayersState
from cljax.transforms.sparse.selection import MiguState as MiguState
from cljax.transforms.sparse.selection import SurgicalFineTuningState as SurgicalFineTuningState
from cljax.transforms.sparse.selection import fpf as fpf
from cljax.transforms.sparse.selection import freeze_bottom_layers as freeze_bottom_layers
from cljax.transforms.sparse.selection import migu as migu
from cljax.transforms.sparse.selection import surgical_fine_tuning as surgical_fine_tuning
from cljax.transforms.sparse.selection import surgical_layer_scores as surgical_layer_scores
from cljax.transforms.sparse.slow_learner import SlcaClassStats as SlcaClassStats
from cljax.transforms.sparse.slow_learner import SlcaState as SlcaState
from cljax.transforms.sparse.slow_learner import slca as slca
from cljax.transforms.sparse.slow_learner import slca_init_stats as slca_init_stats
from cljax.transforms.sparse.slow_learner import slca_sample_features as slca_sample_features
from cljax.transforms.sparse.slow_learner import slca_update_stats as slca_update_stats
from cljax.transforms.sparse.snella import SnellaImportance as SnellaImportance
from cljax.transforms.sparse.snella import SnellaWeight as SnellaWeight
from cljax.transforms.sparse.snella import snella_allocate as snella_allocate
from cljax.transforms.sparse.snella import snella_allocate_counts as snella_allocate_counts
from cljax.transforms.sparse.snella import snella_budget as snella_budget
from cljax.transforms.sparse.snella import snella_delta as snella_delta
from cljax.transforms.sparse.snella import snella_importance_init as snella_importance_init
from cljax.transforms.sparse.snella import snella_importance_update as snella_importance_update
from cljax.transforms.sparse.snella import snella_init as snella_init
from cljax.transforms.sparse.snella import snella_kernel as snella_kernel
from cljax.transforms.sparse.snella import snella_labels as snella_labels
from cljax.transforms.sparse.snella import snella_materialize as snella_materialize
from cljax.transforms.sparse.structured import DiabloState as DiabloState
from cljax.transforms.sparse.structured import S2ftGroup as S2ftGroup
from cljax.transforms.sparse.structured import S2ftState as S2ftState
from cljax.transforms.sparse.structured import diablo as diablo
from cljax.transforms.sparse.structured import s2ft as s2ft
from cljax.transforms.sparse.structured import s2ft_permutations as s2ft_permutations
from cljax.transforms.sparse.structured import s2ft_permute as s2ft_permute
from cljax.transforms.sparse.weights import MaskedDecayState as MaskedDecayState
from cljax.transforms.sparse.weights import masked_decay as masked_decay
from cljax.transforms.sparse.weights import masked_merge as masked_merge
from cljax.transforms.sparse.weights import sparse_soup as sparse_soup
from cljax.transforms.sparse.weights import straight_through_mask as straight_through_mask
from cljax.transforms.sparse.wise import wise_activation_score as wise_activation_score
from cljax.transforms.sparse.wise import wise_merge as wise_merge
from cljax.transforms.sparse.wise import wise_shard_masks as wise_shard_masks

__all__ = [
    "DiabloState",
    "DseeWeight",
    "ExclusiveMasksState",
    "FpfState",
    "FreezeBottomLayersState",
    "HftState",
    "IstState",
    "LisaState",
    "MagnitudePruningState",
    "MaskUpdatesState",
    "MaskedDecayState",
    "MiguState",
    "S2ftGroup",
    "S2ftState",
    "SetRiglState",
    "SlcaClassStats",
    "SlcaState",
    "SnellaImportance",
    "SnellaWeight",
    "SpuState",
    "SurgicalFineTuningState",
    "diablo",
    "dsee_grebsmo",
    "dsee_init",
    "dsee_labels",
    "dsee_materialize",
    "dsee_support",
    "dst_task_masks",
    "erk_densities",
    "exclusive_masks",
    "exclusive_masks_commit_task",
    "exclusive_masks_lookup",
    "exclusive_masks_start_task",
    "fpf",
    "freeze_bottom_layers",
    "gradual_pruning_schedule",
    "hft",
    "hft_half_reset",
    "ist",
    "ist_sample_suppressed",
    "ist_update_importance",
    "lisa",
    "magnitude_mask",
    "magnitude_pruning",
    "mask_updates",
    "mask_updates_densify",
    "mask_updates_get",
    "mask_updates_set",
    "masked_decay",
    "masked_merge",
    "migu",
    "nm_mask",
    "random_mask",
    "s2ft",
    "s2ft_permutations",
    "s2ft_permute",
    "set_rigl",
    "set_rigl_get_masks",
    "set_rigl_restrict",
    "set_rigl_set_masks",
    "slca",
    "slca_init_stats",
    "slca_sample_features",
    "slca_update_stats",
    "snella_allocate",
    "snella_allocate_counts",
    "snella_budget",
    "snella_delta",
    "snella_importance_init",
    "snella_importance_update",
    "snella_init",
    "snella_kernel",
    "snella_labels",
    "snella_materialize",
    "sparse_soup",
    "spu",
    "spu_accumulate",
    "spu_set_task",
    "straight_through_mask",
    "supermask",
    "surgical_fine_tuning",
    "surgical_layer_scores",
    "topk_mask",
    "uniform_densities",
    "wise_activation_score",
    "wise_merge",
    "wise_shard_masks",
]
