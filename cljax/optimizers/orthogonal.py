"""Ready-made optimizers of the orthogonal family."""

from __future__ import annotations

from typing import Any

import chex
import optax

from cljax import tree as _tree
from cljax.transforms.orthogonal.auon import scale_by_auon
from cljax.transforms.orthogonal.input_subspace import SpecArg

__all__ = ["auon"]


def auon(
    learning_rate: optax.ScalarOrSchedule,
    beta: chex.Numeric = 0.95,
    nesterov: bool = True,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    spec: SpecArg = _tree.MatrixSpec(),
    adam_b1: chex.Numeric = 0.9,
    adam_b2: chex.Numeric = 0.999,
    adam_eps: chex.Numeric = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """AuON with decoupled weight decay; Adam for the leaves without a matrix view.

    ``chain(scale_by_auon(beta, nesterov, fallback=scale_by_adam(...)),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``.

    Args:
        learning_rate: Step size (a float or a schedule), shared by both parts.
        beta, nesterov, spec: As in `cljax.scale_by_auon`.
        weight_decay, mask: As in `optax.add_decayed_weights`.
        adam_b1, adam_b2, adam_eps: The fallback Adam's parameters.

    Example:
        >>> opt = cljax.auon(1e-3)
        >>> state = opt.init({"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)})

    References:
        Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", 2025.
        https://arxiv.org/abs/2509.24320
    """
    return optax.chain(
        scale_by_auon(
            beta,
            nesterov,
            spec=spec,
            fallback=optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps),
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
