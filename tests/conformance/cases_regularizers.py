"""Conformance cases of the regularizers family and its optimizers."""

from __future__ import annotations

import jax.numpy as jnp
import optax

import cljax
from tests.conformance.case import Case

CASES: dict[str, Case] = {
    # RG-01 EWC (separate mode, two slots) and online EWC.
    "ewc": Case(
        cljax.ewc,
        {"strength": 0.5, "capacity": 2},
        static_args=("online", "capacity", "fisher_dtype"),
        needs_params=True,
        strict_dtypes=True,
    ),
    "ewc/online": Case(
        cljax.ewc,
        {"strength": 0.5, "online": True, "decay": 0.9},
        static_args=("online", "capacity", "fisher_dtype"),
        needs_params=True,
        strict_dtypes=True,
    ),
    # RG-02 L2 to an anchor.
    "l2_anchor": Case(cljax.l2_anchor, {"strength": 0.1}, needs_params=True, strict_dtypes=True),
    # RG-04 MAS.
    "mas": Case(
        cljax.mas,
        {"strength": 0.1},
        static_args=("importance_dtype",),
        needs_params=True,
        strict_dtypes=True,
    ),
    # RG-03 SI (wraps the whole optimizer).
    "si": Case(
        cljax.si, {"inner": optax.sgd(0.1), "strength": 0.1, "damping": 0.1}, needs_params=True
    ),
    # RG-06 hierarchical layer-wise and element-wise regularisation (wraps the whole optimizer).
    "hierarchical_reg": Case(
        cljax.hierarchical_reg,
        {"inner": optax.sgd(0.1), "strength": 0.1, "damping": 0.1},
        static_args=("layer_weights",),
        needs_params=True,
    ),
    "hierarchical_reg/layer_weights": Case(
        cljax.hierarchical_reg,
        {
            "inner": optax.adam(1e-2),
            "strength": 0.1,
            "layer_weights": lambda r: r.shape[0] * r / (jnp.sum(r) + 1e-12),
        },
        static_args=("layer_weights",),
        needs_params=True,
    ),
    # RG-07 NC: a tiny regressor that accepts any number of parameter entries.
    "neural_consolidation": Case(
        cljax.neural_consolidation,
        {
            "approximator_fn": lambda w, t: w["a"] * jnp.sum(jnp.tanh(t)) + w["b"] * jnp.sum(t * t),
            "approximator_init": {"a": 0.5, "b": 0.1},
            "strength": 1.0,
        },
        static_args=("approximator_fn", "approximator_init"),
        needs_params=True,
        leafwise=False,
        strict_dtypes=True,
    ),
    # CA-08 shrink and perturb, periodic form.
    "add_shrink_perturb": Case(
        cljax.add_shrink_perturb,
        {"shrink": 0.9, "noise_scale": 1e-2, "every": 2, "seed": 1},
        static_args=("every", "seed"),
        needs_params=True,
        strict_dtypes=True,
    ),
    # CA-04 continual backprop: the (8, 4) matrix as a 4-unit hidden layer read outside the tree;
    # maturity 1 and a high rate so that units are replaced during the suite's few steps.
    "continual_backprop": Case(
        cljax.continual_backprop,
        {
            "inner": optax.sgd(0.1),
            "layers": [cljax.CbpLayer(kernel="mat")],
            "replacement_rate": 0.5,
            "maturity": 1,
            "max_replacements": 2,
            "seed": 0,
        },
        static_args=("layers", "maturity", "max_replacements", "reset_moments", "seed"),
        extra_args={"activations": (jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),)},
        needs_params=True,
        leafwise=False,
    ),
    # CA-10 PETAL (model-wide quantile: not leafwise).
    "petal": Case(
        cljax.petal,
        {
            "inner": optax.adam(1e-2),
            "restore_quantile": 0.3,
            "prior_weight": 1e-3,
            "teacher_decay": 0.9,
        },
        static_args=("restore", "seed"),
        needs_params=True,
        leafwise=False,
    ),
    # CA-10 PETAL-SRes: a random fraction restored (a PRNG key in the state).
    "petal/random": Case(
        cljax.petal,
        {
            "inner": optax.adam(1e-2),
            "restore_quantile": 0.3,
            "prior_weight": 1e-3,
            "restore": "random",
            "seed": 3,
        },
        static_args=("restore", "seed"),
        needs_params=True,
        leafwise=False,
    ),
    # OT-02 TAG (the Adam variant is checked against its reference in the unit tests).
    "scale_by_tag": Case(
        cljax.scale_by_tag,
        {"capacity": 2, "b": 5.0, "b1": 0.9, "b2": 0.99},
        static_args=("capacity", "variant"),
        strict_dtypes=True,
    ),
    # OT-03 component-wise clipping (per leaf by default).
    "clip_by_component_norm": Case(
        cljax.clip_by_component_norm, {"max_norm": 1.0}, strict_dtypes=True
    ),
    # RG-05 spectral and Wasserstein regularisation toward initialisation properties.
    "add_spectral_penalty": Case(
        cljax.add_spectral_penalty,
        {"strength": 0.1},
        static_args=("power", "spec", "seed"),
        needs_params=True,
        strict_dtypes=True,
    ),
    "add_wasserstein_penalty": Case(
        cljax.add_wasserstein_penalty, {"strength": 0.1}, needs_params=True, strict_dtypes=True
    ),
    # RG-07 AQC (one Hessian over every entry the transform sees: not leafwise).
    "aqc": Case(
        cljax.aqc, {"strength": 1.0}, needs_params=True, leafwise=False, strict_dtypes=True
    ),
    # Ready-made optimizers.
    "ewc_adamw": Case(
        cljax.ewc_adamw,
        {"learning_rate": 1e-2, "strength": 0.5, "online": True, "decay": 0.9},
        static_args=("online", "capacity", "decoupled"),
        needs_params=True,
    ),
    "l2_anchor_adamw": Case(
        cljax.l2_anchor_adamw,
        {"learning_rate": 1e-2, "strength": 0.1, "weight_decay": 1e-3},
        static_args=("decoupled",),
        needs_params=True,
    ),
    "mas_adamw": Case(
        cljax.mas_adamw,
        {"learning_rate": 1e-2, "strength": 0.1},
        static_args=("decoupled",),
        needs_params=True,
    ),
}

# Public names of the family that are not transform factories (states, pure functions, helpers).
NOT_TRANSFORMS: frozenset[str] = frozenset(
    {
        "AddShrinkPerturbState",
        "AddSpectralPenaltyState",
        "AddWassersteinPenaltyState",
        "AqcState",
        "aqc_add_task",
        "lwf_distillation_loss",
        "CbpLayer",
        "ContinualBackpropState",
        "EwcState",
        "HierarchicalRegState",
        "hierarchical_layer_penalties",
        "hierarchical_reg_record",
        "ScaleByTagState",
        "L2AnchorState",
        "MasState",
        "NeuralConsolidationState",
        "neural_consolidation_fit",
        "neural_consolidation_set",
        "PetalState",
        "SiState",
        "ewc_consolidate",
        "fisher_diagonal",
        "infinite_schedule",
        "linear_decay_to_zero_schedule",
        "rewarm_schedule",
        "tag_next_task",
        "l2_anchor_consolidate",
        "mas_consolidate",
        "mas_importance",
        "petal_set_prior",
        "petal_targets",
        "petal_teacher",
        "shrink_perturb",
        "si_consolidate",
    }
)
