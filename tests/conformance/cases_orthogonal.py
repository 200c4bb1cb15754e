"""Conformance cases of the orthogonal family (OR-01 ... OR-10, OR-15, OR-20) and its optimizers.

Required extra arguments are built here for the suite's 4-leaf params tree
``{"scalar": (), "vec": (8,), "mat": (8, 4), "stack": (2, 8, 4)}``.
"""

from __future__ import annotations

import numpy as np
import optax

import cljax
from tests.conformance.case import Case

_SHAPES = {"scalar": (), "vec": (8,), "mat": (8, 4), "stack": (2, 8, 4)}
_RNG = np.random.default_rng(0)


def _tree(lead=()):
    return {k: _RNG.standard_normal(lead + s).astype(np.float32) for k, s in _SHAPES.items()}


_MEMORY_GRADS = _tree()
_TASK_GRADS = _tree((3,))
_GPM_STATIC = ("capacity", "spec", "inner", "where", "freeze_non_matrix")
_EPISODIC_STATIC = ("qp_iters", "inner", "where")
_OSFT_STATIC = ("capacity", "spec", "inner", "where")

CASES: dict[str, Case] = {
    # OR-01 / OR-02 GPM and FOT's server-side projection.
    "gpm": Case(cljax.gpm, {"capacity": 4}, static_args=_GPM_STATIC, strict_dtypes=True),
    # OR-09 CUBER: per-task bases and scales (identity until tasks are stored).
    "cuber": Case(
        cljax.cuber,
        {"capacity": 4, "max_tasks": 3},
        static_args=("capacity", "max_tasks", "spec", "inner", "where"),
        strict_dtypes=True,
    ),
    # OR-10 Fwd-Prompt: every matrix leaf treated as a prompt (rows = the last, embedding axis).
    "fwd_prompt": Case(
        cljax.fwd_prompt,
        {"capacity": 3, "pretrained_weight": 0.5},
        static_args=("capacity", "pretrained_capacity", "spec", "inner", "where"),
        strict_dtypes=True,
    ),
    # OR-04 A-GEM (global inner products: not leafwise).
    "agem": Case(
        cljax.agem,
        {},
        extra_args={"memory_grads": _MEMORY_GRADS},
        leafwise=False,
        strict_dtypes=True,
    ),
    # OR-03 GEM: three task slots, two valid.
    "gem": Case(
        cljax.gem,
        {"margin": 0.5, "ridge": 1e-3},
        static_args=_EPISODIC_STATIC,
        extra_args={"task_grads": _TASK_GRADS, "num_tasks": 2},
        leafwise=False,
        strict_dtypes=True,
    ),
    "gem/sgd_gradient_all_slots": Case(
        cljax.gem,
        {"margin": 0.1, "ridge": 0.0, "inner": optax.sgd(1e-2), "where": "gradient"},
        static_args=_EPISODIC_STATIC,
        extra_args={"task_grads": _TASK_GRADS},
        leafwise=False,
    ),
    # OR-06 / OR-07 OGD and PCA-OGD (global inner products: not leafwise).
    "ogd": Case(
        cljax.ogd,
        {"capacity": 3},
        static_args=("capacity", "inner", "where"),
        leafwise=False,
        strict_dtypes=True,
    ),
    # OR-05 OSFT, full-gradient form (nothing frozen before `osft_decompose`) and factor form.
    "osft": Case(cljax.osft, {"capacity": 2}, static_args=_OSFT_STATIC, strict_dtypes=True),
    "osft_factored": Case(cljax.osft_factored, {}, needs_params=True, strict_dtypes=True),
    # OR-11 AuON (Adam on the non-matrix leaves) and its optimizer.
    "scale_by_auon": Case(
        cljax.scale_by_auon, {"beta": 0.9}, static_args=("nesterov", "spec", "fallback", "mu_dtype")
    ),
    "auon": Case(
        cljax.auon,
        {"learning_rate": 1e-2, "weight_decay": 1e-2},
        static_args=("nesterov", "spec", "mask"),
        needs_params=True,
    ),
}

# Public names of the family that are not transform factories (states, pure functions, helpers).
NOT_TRANSFORMS: frozenset[str] = frozenset(
    {
        "CuberState",
        "FwdPromptState",
        "fwd_prompt_add_task",
        "fwd_prompt_set_pretrained",
        "GpmState",
        "cuber_add_task",
        "cuber_correlate",
        "emmet_delta",
        "memit_delta",
        "fedgp_aggregate",
        "fedgp_project",
        "OgdState",
        "OsftFactors",
        "OsftState",
        "ScaleByAuonState",
        "fot_add_task",
        "fot_client_grams",
        "gpm_add_task",
        "ogd_add_task",
        "ogd_output_gradients",
        "osft_decompose",
        "osft_factorize",
        "osft_importance",
        "osft_materialize",
    }
)
