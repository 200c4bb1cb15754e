"""Conformance cases of the cautious family (CA-01/02/03/05, OR-08) and its optimizers."""

from __future__ import annotations

import optax

import cljax
from tests.conformance.case import Case

CASES: dict[str, Case] = {
    # CA-01 cautious mask.
    "cautious/adam": Case(cljax.cautious, {"inner": optax.scale_by_adam(), "clamp": 1e-3}),
    "cautious/lion_numel_sum": Case(
        cljax.cautious, {"inner": optax.scale_by_lion(), "normalization": "numel_sum"}
    ),
    "cautious/sgd": Case(cljax.cautious, {"inner": optax.identity()}, strict_dtypes=True),
    "cautious/momentum_source": Case(
        cljax.cautious, {"inner": optax.scale_by_adam(), "mask_source": "momentum", "clamp": 1e-3}
    ),
    # CA-02 cautious weight decay.
    "add_cautious_weight_decay": Case(
        cljax.add_cautious_weight_decay, {"weight_decay": 0.1}, needs_params=True, strict_dtypes=True
    ),
    "add_cautious_weight_decay/schedule": Case(
        cljax.add_cautious_weight_decay,
        {"weight_decay": optax.linear_schedule(0.1, 0.01, 10)},
        needs_params=True,
    ),
    # CA-05 Grams.
    "scale_by_grams": Case(cljax.scale_by_grams, {"b1": 0.9, "b2": 0.99}),
    # OR-08 AdamP.
    "scale_by_adamp": Case(
        cljax.scale_by_adamp,
        {"weight_decay": 0.01, "delta": 0.1},
        static_args=("channel_axis",),
        needs_params=True,
        strict_dtypes=True,
    ),
    # CA-03 UPGD (global max: not leafwise).
    "scale_by_upgd": Case(
        cljax.scale_by_upgd,
        {"beta_utility": 0.9, "sigma": 1e-2, "seed": 3},
        static_args=("seed",),
        needs_params=True,
        leafwise=False,
        strict_dtypes=True,
    ),
    "scale_by_upgd/local_nonprotecting": Case(
        cljax.scale_by_upgd,
        {"beta_utility": 0.9, "sigma": 1e-2, "protect": False, "normalization": "local"},
        static_args=("seed",),
        needs_params=True,
    ),
    # Ready-made optimizers.
    "cautious_adamw": Case(cljax.cautious_adamw, {"learning_rate": 1e-2, "weight_decay": 1e-2}, needs_params=True),
    "cautious_lion": Case(cljax.cautious_lion, {"learning_rate": 1e-3, "weight_decay": 1e-2}, needs_params=True),
    "cwd_adamw": Case(cljax.cwd_adamw, {"learning_rate": 1e-2, "weight_decay": 0.1}, needs_params=True),
    "cwd_lion": Case(cljax.cwd_lion, {"learning_rate": 1e-3, "weight_decay": 0.1}, needs_params=True),
    "grams": Case(cljax.grams, {"learning_rate": 1e-2, "weight_decay": 1e-2}, needs_params=True),
    "adamp": Case(
        cljax.adamp,
        {"learning_rate": 1e-2, "weight_decay": 1e-2},
        static_args=("channel_axis",),
        needs_params=True,
    ),
    "upgd": Case(
        cljax.upgd,
        {"learning_rate": 1e-2, "weight_decay": 1e-3, "sigma": 1e-2, "seed": 0},
        static_args=("seed",),
        needs_params=True,
        leafwise=False,
    ),
}

# Public names of the family that are not transform factories (states, helpers).
NOT_TRANSFORMS = frozenset({"AddCautiousWeightDecayState", "ScaleByUpgdState"})
