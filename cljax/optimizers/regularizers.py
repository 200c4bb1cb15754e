"""Ready-made optimizers of the regularizers family: AdamW with an anchored penalty.

Each alias chains the penalty transform with optax's AdamW pieces. ``decoupled=False`` (the
default, the papers' form) puts the penalty gradient first — exactly a loss term, rescaled by
Adam like the task gradient; ``decoupled=True`` adds it after Adam's direction and before the
learning rate, like AdamW's weight decay. Task boundaries use the transform's boundary function
on the whole optimizer state (`cljax.ewc_consolidate`, `cljax.l2_anchor_consolidate`,
`cljax.mas_consolidate`).
"""

from __future__ import annotations

from typing import Any

import chex
import optax

from cljax.transforms.regularizers.anchored import ewc, l2_anchor, mas

__all__ = ["ewc_adamw", "l2_anchor_adamw", "mas_adamw"]


def _with_penalty(fn, penalty, learning_rate, b1, b2, eps, weight_decay, mask, decoupled):
    if not isinstance(decoupled, bool):
        raise TypeError(f"{fn}(decoupled=...) must be a bool, got {decoupled!r}.")
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    tail = [
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ]
    if decoupled:
        return optax.chain(adam, penalty, *tail)
    return optax.chain(penalty, adam, *tail)


def ewc_adamw(
    learning_rate: optax.ScalarOrSchedule,
    strength: chex.Numeric,
    online: bool = False,
    decay: chex.Numeric = 1.0,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    capacity: int | None = None,
    decoupled: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with the EWC penalty: ``chain(ewc, scale_by_adam, add_decayed_weights, lr)``.

    Args:
        learning_rate, b1, b2, eps, weight_decay, mask: As in `optax.adamw` (weight decay 0 by
            default: the penalty is the regulariser).
        strength, online, decay, capacity: As in `cljax.ewc`.
        decoupled: Penalty after Adam's direction (decoupled) instead of before it. Static.

    Returns:
        The chained optimizer; its state holds one `EwcState` for `cljax.ewc_consolidate`.

    Example:
        >>> opt = cljax.ewc_adamw(1e-3, strength=100.0)
        >>> state = opt.init({"w": jnp.zeros(3)})

    References:
        Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
    """
    penalty = ewc(strength, online, decay, capacity=capacity)
    return _with_penalty(
        "ewc_adamw", penalty, learning_rate, b1, b2, eps, weight_decay, mask, decoupled
    )


def l2_anchor_adamw(
    learning_rate: optax.ScalarOrSchedule,
    strength: chex.Numeric,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    anchor_mask: Any = None,
    decoupled: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamW pulled toward an anchor (L2-SP; ``decoupled=True`` is ``decay_to_anchor``).

    The anchor starts at the parameters given to `init` (the pre-trained weights);
    `cljax.l2_anchor_consolidate` moves it at a task boundary.

    Args:
        learning_rate, b1, b2, eps, weight_decay, mask: As in `optax.adamw`.
        strength: As in `cljax.l2_anchor`.
        anchor_mask: The `mask` of `cljax.l2_anchor`: where the anchor penalty applies.
        decoupled: Penalty after Adam's direction instead of before it. Static.

    Returns:
        The chained optimizer; its state holds one `L2AnchorState`.

    Example:
        >>> opt = cljax.l2_anchor_adamw(1e-3, strength=0.01, decoupled=True)
        >>> state = opt.init({"w": jnp.zeros(3)})

    References:
        Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
        Convolutional Networks", ICML 2018.
    """
    penalty = l2_anchor(strength, anchor_mask)
    return _with_penalty(
        "l2_anchor_adamw", penalty, learning_rate, b1, b2, eps, weight_decay, mask, decoupled
    )


def mas_adamw(
    learning_rate: optax.ScalarOrSchedule,
    strength: chex.Numeric,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    decoupled: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with the MAS penalty: ``chain(mas, scale_by_adam, add_decayed_weights, lr)``.

    Args:
        learning_rate, b1, b2, eps, weight_decay, mask: As in `optax.adamw`.
        strength: As in `cljax.mas`.
        decoupled: Penalty after Adam's direction instead of before it. Static.

    Returns:
        The chained optimizer; its state holds one `MasState` for `cljax.mas_consolidate`.

    Example:
        >>> opt = cljax.mas_adamw(1e-3, strength=1.0)
        >>> state = opt.init({"w": jnp.zeros(3)})

    References:
        Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018.
    """
    return _with_penalty(
        "mas_adamw", mas(strength), learning_rate, b1, b2, eps, weight_decay, mask, decoupled
    )
