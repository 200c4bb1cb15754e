"""Orthogonal-projection family: GPM / FOT, OGD, GEM / A-GEM, OSFT and related projections.

Each module of this subpackage lists its public names in its own ``__all__``; this package
re-exports them explicitly.
"""

from cljax.transforms.orthogonal.auon import ScaleByAuonState as ScaleByAuonState
from cljax.transforms.orthogonal.auon import scale_by_auon as scale_by_auon
from cljax.transforms.orthogonal.conflict import fedgp_aggregate as fedgp_aggregate
from cljax.transforms.orthogonal.conflict import fedgp_project as fedgp_project
from cljax.transforms.orthogonal.cuber import CuberState as CuberState
from cljax.transforms.orthogonal.cuber import cuber as cuber
from cljax.transforms.orthogonal.cuber import cuber_add_task as cuber_add_task
from cljax.transforms.orthogonal.cuber import cuber_correlate as cuber_correlate
from cljax.transforms.orthogonal.editing import emmet_delta as emmet_delta
from cljax.transforms.orthogonal.editing import memit_delta as memit_delta
from cljax.transforms.orthogonal.episodic import agem as agem
from cljax.transforms.orthogonal.episodic import gem as gem
from cljax.transforms.orthogonal.fwd_prompt import FwdPromptState as FwdPromptState
from cljax.transforms.orthogonal.fwd_prompt import fwd_prompt as fwd_prompt
from cljax.transforms.orthogonal.fwd_prompt import fwd_prompt_add_task as fwd_prompt_add_task
from cljax.transforms.orthogonal.fwd_prompt import (
    fwd_prompt_set_pretrained as fwd_prompt_set_pretrained,
)
from cljax.transforms.orthogonal.gradient_subspace import OgdState as OgdState
from cljax.transforms.orthogonal.gradient_subspace import ogd as ogd
from cljax.transforms.orthogonal.gradient_subspace import ogd_add_task as ogd_add_task
from cljax.transforms.orthogonal.gradient_subspace import (
    ogd_output_gradients as ogd_output_gradients,
)
from cljax.transforms.orthogonal.input_subspace import GpmState as GpmState
from cljax.transforms.orthogonal.input_subspace import fot_add_task as fot_add_task
from cljax.transforms.orthogonal.input_subspace import fot_client_grams as fot_client_grams
from cljax.transforms.orthogonal.input_subspace import gpm as gpm
from cljax.transforms.orthogonal.input_subspace import gpm_add_task as gpm_add_task
from cljax.transforms.orthogonal.singular_subspace import OsftFactors as OsftFactors
from cljax.transforms.orthogonal.singular_subspace import OsftState as OsftState
from cljax.transforms.orthogonal.singular_subspace import osft as osft
from cljax.transforms.orthogonal.singular_subspace import osft_decompose as osft_decompose
from cljax.transforms.orthogonal.singular_subspace import osft_factored as osft_factored
from cljax.transforms.orthogonal.singular_subspace import osft_factorize as osft_factorize
from cljax.transforms.orthogonal.singular_subspace import osft_importance as osft_importance
from cljax.transforms.orthogonal.singular_subspace import osft_materialize as osft_materialize

__all__ = [
    "CuberState",
    "FwdPromptState",
    "GpmState",
    "OgdState",
    "OsftFactors",
    "OsftState",
    "ScaleByAuonState",
    "agem",
    "cuber",
    "cuber_add_task",
    "cuber_correlate",
    "emmet_delta",
    "fedgp_aggregate",
    "fedgp_project",
    "fot_add_task",
    "fot_client_grams",
    "fwd_prompt",
    "fwd_prompt_add_task",
    "fwd_prompt_set_pretrained",
    "gem",
    "gpm",
    "gpm_add_task",
    "memit_delta",
    "ogd",
    "ogd_add_task",
    "ogd_output_gradients",
    "osft",
    "osft_decompose",
    "osft_factored",
    "osft_factorize",
    "osft_importance",
    "osft_materialize",
    "scale_by_auon",
]
