"""cljax: continual-learning and efficient-model-update methods as Optax transforms and pytree functions.

Every public name is re-exported flat from here. Each family module lists its names explicitly in
its own ``__all__`` (`cljax.transforms.cautious`, `cljax.transforms.merging`, ...); the
ready-made optimizers are in `cljax.optimizers`, the pytree helpers in `cljax.tree` and the
sharding helpers in `cljax.sharding`.
"""

from cljax import kernels as kernels
from cljax import optimizers as optimizers
from cljax import sharding as sharding
from cljax import transforms as transforms
from cljax import tree as tree
from cljax.optimizers import *  # noqa: F403  (names listed in optimizers.__all__)
from cljax.sharding import state_shardings as state_shardings
from cljax.transforms import *  # noqa: F403  (names listed in transforms.__all__)
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

_TREE_NAMES = [
    "MatrixSpec",
    "as_matrices",
    "exclude",
    "find_state",
    "find_states",
    "from_matrices",
    "label_by_path",
    "matrix_shape",
    "replace_state",
    "select",
]

__all__ = sorted(
    [*optimizers.__all__, *transforms.__all__, *_TREE_NAMES, "state_shardings"]
)

if len(set(__all__)) != len(__all__):  # two families exporting one name would shadow each other
    raise ImportError(f"cljax: duplicate public names: {sorted({n for n in __all__ if __all__.count(n) > 1})}")
