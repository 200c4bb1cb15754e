"""Ready-made optimizers: chains of cljax and optax transforms named after their algorithm.

One module per family, each listing its names in ``__all__``; all are re-exported here.
"""

from cljax.optimizers import cautious as _cautious
from cljax.optimizers import low_rank as _low_rank
from cljax.optimizers import orthogonal as _orthogonal
from cljax.optimizers import regularizers as _regularizers
from cljax.optimizers import sparse as _sparse
from cljax.optimizers.cautious import *  # noqa: F403  (names listed in cautious.__all__)
from cljax.optimizers.low_rank import *  # noqa: F403
from cljax.optimizers.orthogonal import *  # noqa: F403
from cljax.optimizers.regularizers import *  # noqa: F403
from cljax.optimizers.sparse import *  # noqa: F403

__all__ = sorted(
    [*_cautious.__all__, *_low_rank.__all__, *_orthogonal.__all__, *_regularizers.__all__, *_sparse.__all__]
)
