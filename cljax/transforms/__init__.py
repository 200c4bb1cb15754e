"""Per-step transforms and pure pytree functions, one module (or subpackage) per family.

Each family lists its public names explicitly in its own ``__all__``; this package re-exports
exactly those names.
"""

from cljax.transforms import cautious as _cautious
from cljax.transforms import low_rank as _low_rank
from cljax.transforms import merging as _merging
from cljax.transforms import orthogonal as _orthogonal
from cljax.transforms import regularizers as _regularizers
from cljax.transforms import sparse as _sparse
from cljax.transforms.cautious import *  # noqa: F403  (names listed in cautious.__all__)
from cljax.transforms.low_rank import *  # noqa: F403
from cljax.transforms.merging import *  # noqa: F403
from cljax.transforms.orthogonal import *  # noqa: F403
from cljax.transforms.regularizers import *  # noqa: F403
from cljax.transforms.sparse import *  # noqa: F403

__all__ = sorted(
    [
        *_cautious.__all__,
        *_low_rank.__all__,
        *_merging.__all__,
        *_orthogonal.__all__,
        *_regularizers.__all__,
        *_sparse.__all__,
    ]
)
