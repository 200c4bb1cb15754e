"""Ready-made optimizers: chains of cljax and optax transforms named after their algorithm."""

from cljax.optimizers.cautious import adamp as adamp
from cljax.optimizers.cautious import cautious_adamw as cautious_adamw
from cljax.optimizers.cautious import cautious_lion as cautious_lion
from cljax.optimizers.cautious import cwd_adamw as cwd_adamw
from cljax.optimizers.cautious import cwd_lion as cwd_lion
from cljax.optimizers.cautious import grams as grams
from cljax.optimizers.cautious import upgd as upgd

__all__ = ["adamp", "cautious_adamw", "cautious_lion", "cwd_adamw", "cwd_lion", "grams", "upgd"]
