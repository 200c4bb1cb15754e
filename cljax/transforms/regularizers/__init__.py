"""Anchored regularisers, plasticity methods and continual-training tools.

Modules: `anchored` (EWC, L2-to-anchor, MAS), `synaptic` (SI), `hierarchical` (layer-wise and
element-wise regularisation), `fisher` (Fisher and MAS importance estimators), `sequential` (AQC,
LwF), `neural_consolidation` (NC), `spectral` (spectral and Wasserstein penalties), `plasticity`
(shrink-and-perturb, continual backprop), `petal` (PETAL), `gradient` (TAG, component-wise
clipping) and `schedules` (re-warming, infinite and decay-to-zero schedules).
Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

from cljax.transforms.regularizers.anchored import EwcState as EwcState
from cljax.transforms.regularizers.anchored import L2AnchorState as L2AnchorState
from cljax.transforms.regularizers.anchored import MasState as MasState
from cljax.transforms.regularizers.anchored import ewc as ewc
from cljax.transforms.regularizers.anchored import ewc_consolidate as ewc_consolidate
from cljax.transforms.regularizers.anchored import l2_anchor as l2_anchor
from cljax.transforms.regularizers.anchored import l2_anchor_consolidate as l2_anchor_consolidate
from cljax.transforms.regularizers.anchored import mas as mas
from cljax.transforms.regularizers.anchored import mas_consolidate as mas_consolidate
from cljax.transforms.regularizers.fisher import fisher_diagonal as fisher_diagonal
from cljax.transforms.regularizers.fisher import mas_importance as mas_importance
from cljax.transforms.regularizers.gradient import ScaleByTagState as ScaleByTagState
from cljax.transforms.regularizers.gradient import clip_by_component_norm as clip_by_component_norm
from cljax.transforms.regularizers.gradient import scale_by_tag as scale_by_tag
from cljax.transforms.regularizers.gradient import tag_next_task as tag_next_task
from cljax.transforms.regularizers.hierarchical import (
    HierarchicalRegState as HierarchicalRegState,
)
from cljax.transforms.regularizers.hierarchical import (
    hierarchical_layer_penalties as hierarchical_layer_penalties,
)
from cljax.transforms.regularizers.hierarchical import hierarchical_reg as hierarchical_reg
from cljax.transforms.regularizers.hierarchical import (
    hierarchical_reg_record as hierarchical_reg_record,
)
from cljax.transforms.regularizers.neural_consolidation import (
    NeuralConsolidationState as NeuralConsolidationState,
)
from cljax.transforms.regularizers.neural_consolidation import (
    neural_consolidation as neural_consolidation,
)
from cljax.transforms.regularizers.neural_consolidation import (
    neural_consolidation_fit as neural_consolidation_fit,
)
from cljax.transforms.regularizers.neural_consolidation import (
    neural_consolidation_set as neural_consolidation_set,
)
from cljax.transforms.regularizers.petal import PetalState as PetalState
from cljax.transforms.regularizers.petal import petal as petal
from cljax.transforms.regularizers.petal import petal_set_prior as petal_set_prior
from cljax.transforms.regularizers.petal import petal_targets as petal_targets
from cljax.transforms.regularizers.petal import petal_teacher as petal_teacher
from cljax.transforms.regularizers.plasticity import AddShrinkPerturbState as AddShrinkPerturbState
from cljax.transforms.regularizers.plasticity import CbpLayer as CbpLayer
from cljax.transforms.regularizers.plasticity import (
    ContinualBackpropState as ContinualBackpropState,
)
from cljax.transforms.regularizers.plasticity import add_shrink_perturb as add_shrink_perturb
from cljax.transforms.regularizers.plasticity import continual_backprop as continual_backprop
from cljax.transforms.regularizers.plasticity import shrink_perturb as shrink_perturb
from cljax.transforms.regularizers.schedules import infinite_schedule as infinite_schedule
from cljax.transforms.regularizers.schedules import (
    linear_decay_to_zero_schedule as linear_decay_to_zero_schedule,
)
from cljax.transforms.regularizers.schedules import rewarm_schedule as rewarm_schedule
from cljax.transforms.regularizers.sequential import AqcState as AqcState
from cljax.transforms.regularizers.sequential import aqc as aqc
from cljax.transforms.regularizers.sequential import aqc_add_task as aqc_add_task
from cljax.transforms.regularizers.sequential import lwf_distillation_loss as lwf_distillation_loss
from cljax.transforms.regularizers.spectral import (
    AddSpectralPenaltyState as AddSpectralPenaltyState,
)
from cljax.transforms.regularizers.spectral import (
    AddWassersteinPenaltyState as AddWassersteinPenaltyState,
)
from cljax.transforms.regularizers.spectral import add_spectral_penalty as add_spectral_penalty
from cljax.transforms.regularizers.spectral import (
    add_wasserstein_penalty as add_wasserstein_penalty,
)
from cljax.transforms.regularizers.synaptic import SiState as SiState
from cljax.transforms.regularizers.synaptic import si as si
from cljax.transforms.regularizers.synaptic import si_consolidate as si_consolidate

__all__ = [
    "AddShrinkPerturbState",
    "AddSpectralPenaltyState",
    "AddWassersteinPenaltyState",
    "AqcState",
    "CbpLayer",
    "ContinualBackpropState",
    "EwcState",
    "HierarchicalRegState",
    "L2AnchorState",
    "MasState",
    "NeuralConsolidationState",
    "PetalState",
    "ScaleByTagState",
    "SiState",
    "add_shrink_perturb",
    "add_spectral_penalty",
    "add_wasserstein_penalty",
    "aqc",
    "aqc_add_task",
    "clip_by_component_norm",
    "continual_backprop",
    "ewc",
    "ewc_consolidate",
    "fisher_diagonal",
    "hierarchical_layer_penalties",
    "hierarchical_reg",
    "hierarchical_reg_record",
    "infinite_schedule",
    "l2_anchor",
    "l2_anchor_consolidate",
    "linear_decay_to_zero_schedule",
    "lwf_distillation_loss",
    "mas",
    "mas_consolidate",
    "mas_importance",
    "neural_consolidation",
    "neural_consolidation_fit",
    "neural_consolidation_set",
    "petal",
    "petal_set_prior",
    "petal_targets",
    "petal_teacher",
    "rewarm_schedule",
    "scale_by_tag",
    "shrink_perturb",
    "si",
    "si_consolidate",
    "tag_next_task",
]
