"""cljax: continual-learning and efficient-model-update methods as Optax transforms and pytree functions."""

from cljax import optimizers as optimizers
from cljax import sharding as sharding
from cljax import transforms as transforms
from cljax import tree as tree
from cljax.optimizers import adamp as adamp
from cljax.optimizers import cautious_adamw as cautious_adamw
from cljax.optimizers import cautious_lion as cautious_lion
from cljax.optimizers import cwd_adamw as cwd_adamw
from cljax.optimizers import cwd_lion as cwd_lion
from cljax.optimizers import grams as grams
from cljax.optimizers import upgd as upgd
from cljax.sharding import state_shardings as state_shardings
from cljax.transforms import AddCautiousWeightDecayState as AddCautiousWeightDecayState
from cljax.transforms import ScaleByUpgdState as ScaleByUpgdState
from cljax.transforms import add_cautious_weight_decay as add_cautious_weight_decay
from cljax.transforms import cautious as cautious
from cljax.transforms import scale_by_adamp as scale_by_adamp
from cljax.transforms import scale_by_grams as scale_by_grams
from cljax.transforms import scale_by_upgd as scale_by_upgd
from cljax.tree import MatrixSpec as MatrixSpec
from cljax.tree import as_matrices as as_matrices
from cljax.tree import exclude as exclude
from cljax.tree import find_state as find_state
from cljax.tree import find_states as find_states
from cljax.tree import from_matrices as from_matrices
from cljax.tree import label_by_path as label_by_path
from cljax.tree import matrix_shape as matrix_shape
from cljax.tree import replace_state as replace_state
from cljax.tree import select as select

__version__ = "0.1.0"

__all__ = [
    "AddCautiousWeightDecayState",
    "MatrixSpec",
    "ScaleByUpgdState",
    "adamp",
    "add_cautious_weight_decay",
    "as_matrices",
    "cautious",
    "cautious_adamw",
    "cautious_lion",
    "cwd_adamw",
    "cwd_lion",
    "exclude",
    "find_state",
    "find_states",
    "from_matrices",
    "grams",
    "label_by_path",
    "matrix_shape",
    "replace_state",
    "scale_by_adamp",
    "scale_by_grams",
    "scale_by_upgd",
    "select",
    "state_shardings",
    "upgd",
]
