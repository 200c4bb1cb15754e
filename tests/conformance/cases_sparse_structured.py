"""Conformance cases of the sparse family's structured fine-tuning methods (SP-13, SP-17, SP-18,
SP-20, SP-41).

Kept apart from ``cases_sparse.py`` so each module stays short; the registry merges both. The
suite's tree is ``scalar ()``, ``vec (8,)``, ``mat (8, 4)``, ``stack (2, 8, 4)``.
"""

from __future__ import annotations

import optax

from cljax.transforms.sparse import structured
from tests.conformance.case import Case

CASES: dict[str, Case] = {
    # SP-18 DiaBlo: 2 diagonal blocks of (4, 2) in "mat" and in each matrix of "stack".
    "diablo": Case(
        structured.diablo,
        {"inner": optax.adam(1e-2), "num_blocks": 2},
        static_args=("num_blocks", "targets", "spec"),
    ),
    "diablo/sgd": Case(
        structured.diablo,
        {"inner": optax.sgd(1e-2), "num_blocks": 4},
        static_args=("num_blocks", "targets", "spec"),
        strict_dtypes=True,
    ),
    # SP-13 S²FT: units of 2 rows of "mat" coupled with pairs of "vec" entries (2 of 4 trained);
    # 3 of the 8 rows of each layer of "stack" trained.
    "s2ft": Case(
        structured.s2ft,
        {
            "inner": optax.adam(1e-2),
            "groups": (
                structured.S2ftGroup(
                    coupled=(("mat", 0), ("vec", 0)), trained=("mat",), num_selected=2, unit_size=2
                ),
                structured.S2ftGroup(
                    coupled=(("stack", 1),), trained=("stack",), num_selected=3, batch_ndim=1
                ),
            ),
        },
        static_args=("groups",),
    ),
    "s2ft/sgd": Case(
        structured.s2ft,
        {
            "inner": optax.sgd(1e-2),
            "groups": structured.S2ftGroup(
                coupled=(("stack", -2), ("mat", 0)), trained=("stack", "mat"), num_selected=5
            ),
        },
        static_args=("groups",),
        strict_dtypes=True,
    ),
}

# Public names of these methods that are not transform factories (states, pure functions).
# SP-41 DSEE and SP-17 WISE are pure pytree functions (WISE trains through `mask_updates`).
NOT_TRANSFORMS: frozenset[str] = frozenset(
    {
        "DiabloState",
        "S2ftGroup",
        "S2ftState",
        "s2ft_permutations",
        "s2ft_permute",
        "DseeWeight",
        "dsee_grebsmo",
        "dsee_init",
        "dsee_labels",
        "dsee_materialize",
        "dsee_support",
        "SnellaImportance",
        "SnellaWeight",
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
        "wise_activation_score",
        "wise_merge",
        "wise_shard_masks",
    }
)
