"""Per-step transforms and pure pytree functions, one module per family."""

from cljax.transforms.cautious import AddCautiousWeightDecayState as AddCautiousWeightDecayState
from cljax.transforms.cautious import ScaleByUpgdState as ScaleByUpgdState
from cljax.transforms.cautious import add_cautious_weight_decay as add_cautious_weight_decay
from cljax.transforms.cautious import cautious as cautious
from cljax.transforms.cautious import scale_by_adamp as scale_by_adamp
from cljax.transforms.cautious import scale_by_grams as scale_by_grams
from cljax.transforms.cautious import scale_by_upgd as scale_by_upgd

__all__ = [
    "AddCautiousWeightDecayState",
    "ScaleByUpgdState",
    "add_cautious_weight_decay",
    "cautious",
    "scale_by_adamp",
    "scale_by_grams",
    "scale_by_upgd",
]
