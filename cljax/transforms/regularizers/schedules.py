"""Learning-rate schedules for continual pre-training (OT-04) and linear decay to zero (OT-05).

All are pure functions of the step count (optax schedules); they restart nothing in the
optimizer state — whether to reset moments at a dataset boundary is a separate choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import chex
import jax.numpy as jnp
import optax

from cljax import _checks

__all__ = ["infinite_schedule", "linear_decay_to_zero_schedule", "rewarm_schedule"]


def _check_steps(fn: str, **steps: int) -> None:
    for name, value in steps.items():
        _checks.check_int(fn, name, value, 0)


def linear_decay_to_zero_schedule(
    peak_value: chex.Numeric, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Linear warm-up to `peak_value`, then linear decay to exactly zero at `total_steps` (D2Z).

    ``η_t = η_max·t/t_w`` for ``t < t_w``, then ``η_max·(T − t)/(T − t_w)``, and 0 after ``T``.

    Args:
        peak_value: ``η_max``.
        warmup_steps: ``t_w`` ≥ 0. Static.
        total_steps: ``T`` > `warmup_steps`. Static.

    Returns:
        An optax schedule.

    Raises:
        ValueError: for negative step counts or ``total_steps <= warmup_steps``.

    Example:
        >>> schedule = cljax.linear_decay_to_zero_schedule(1.0, 2, 6)
        >>> [float(schedule(t)) for t in (0, 1, 2, 4, 6, 9)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]

    References:
        Bergsma et al., "Straight to Zero: Why Linearly Decaying the Learning Rate to Zero Works
        Best for LLMs", ICLR 2025. https://arxiv.org/abs/2502.15938
    """
    fn = "linear_decay_to_zero_schedule"
    _check_steps(fn, warmup_steps=warmup_steps, total_steps=total_steps)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"{fn}(total_steps=...) must exceed warmup_steps={warmup_steps}, got {total_steps}."
        )
    decay = optax.linear_schedule(peak_value, 0.0, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def rewarm_schedule(schedule: optax.Schedule, boundaries: Sequence[int]) -> optax.Schedule:
    """Restarts `schedule` at every dataset boundary: re-warming and re-decaying.

    ``η_t = schedule(t − b_k)`` with ``b_k`` the last boundary ``≤ t`` (``b_0 = 0``), e.g. with
    ``schedule = optax.warmup_cosine_decay_schedule(0.0, η_max, warmup, steps_per_dataset,
    η_min)``.

    Args:
        schedule: The schedule of one dataset.
        boundaries: Strictly increasing positive steps at which new datasets start. Static.

    Returns:
        An optax schedule.

    Raises:
        ValueError: for boundaries that are not positive and strictly increasing.
        TypeError: for a `schedule` that is not callable.

    Example:
        >>> base = optax.linear_schedule(1.0, 0.0, 4)
        >>> schedule = cljax.rewarm_schedule(base, [4])
        >>> [float(schedule(t)) for t in (0, 2, 4, 6)]
        [1.0, 0.5, 1.0, 0.5]

    References:
        Gupta et al., "Continual Pre-Training of Large Language Models: How to (re)warm your
        model?", 2023. https://arxiv.org/abs/2308.04014

        Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
        Models", TMLR 2024. https://arxiv.org/abs/2403.08763
    """
    fn = "rewarm_schedule"
    if not callable(schedule):
        raise TypeError(
            f"{fn}(schedule=...) must be a schedule (a function of the step), got {schedule!r}."
        )
    boundaries = list(boundaries)
    for b in boundaries:
        _checks.check_int(fn, "boundaries", b, 1)
    if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:], strict=False)):
        raise ValueError(f"{fn}(boundaries=...) must be strictly increasing, got {boundaries}.")
    if not boundaries:
        return schedule
    return optax.join_schedules([schedule] * (len(boundaries) + 1), boundaries)


def infinite_schedule(
    peak_value: chex.Numeric,
    constant_value: chex.Numeric,
    end_value: chex.Numeric,
    *,
    warmup_steps: int,
    cooldown_steps: int,
    anneal_start: int,
    anneal_steps: int,
    cooldown: Literal["cosine", "linear"] = "cosine",
    anneal: Literal["exponential", "linear"] = "exponential",
) -> optax.Schedule:
    """An "infinite" schedule: warm-up, cooldown, a long constant phase, a final anneal.

    * ``0 ≤ t < t_w``: linear warm-up from 0 to `peak_value`;
    * ``t_w ≤ t < t_w + t_cd``: cooldown to `constant_value` (cosine or linear);
    * until `anneal_start`: `constant_value`; new datasets continue here without re-warming;
    * then over `anneal_steps`: anneal to `end_value`, exponentially
      ``η_c (η_min/η_c)^{s/T_a}`` or linearly; `end_value` afterwards.

    Every phase boundary is continuous. Move `anneal_start` (a static argument) to wherever the
    final (or a checkpoint's) anneal should happen.

    Args:
        peak_value: ``η_max``.
        constant_value: ``η_const``.
        end_value: ``η_min`` (> 0 for an exponential anneal).
        warmup_steps, cooldown_steps: Phase lengths ≥ 0. Static.
        anneal_start: Step where the anneal begins, ≥ ``warmup_steps + cooldown_steps``. Static.
        anneal_steps: Anneal length ≥ 1. Static.
        cooldown: ``'cosine'`` or ``'linear'``. Static.
        anneal: ``'exponential'`` or ``'linear'``. Static.

    Returns:
        An optax schedule.

    Raises:
        ValueError: for inconsistent phase lengths, an unknown shape, or a non-positive value in
            an exponential anneal.

    Notes:
        The card marks the cooldown form and phase lengths as unverified against the paper;
        both shapes are offered and the default is a cosine cooldown and exponential anneal.

    Example:
        >>> s = cljax.infinite_schedule(1.0, 0.5, 0.05, warmup_steps=2, cooldown_steps=2,
        ...                             anneal_start=10, anneal_steps=4)
        >>> [round(float(s(t)), 4) for t in (0, 2, 4, 10, 14, 20)]
        [0.0, 1.0, 0.5, 0.5, 0.05, 0.05]

    References:
        Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
        Models", TMLR 2024. https://arxiv.org/abs/2403.08763
    """
    fn = "infinite_schedule"
    _check_steps(
        fn, warmup_steps=warmup_steps, cooldown_steps=cooldown_steps, anneal_start=anneal_start
    )
    _checks.check_int(fn, "anneal_steps", anneal_steps, 1)
    _checks.check_choice(fn, "cooldown", cooldown, ("cosine", "linear"))
    _checks.check_choice(fn, "anneal", anneal, ("exponential", "linear"))
    if anneal_start < warmup_steps + cooldown_steps:
        raise ValueError(
            f"{fn}(anneal_start=...) must be >= warmup_steps + cooldown_steps = "
            f"{warmup_steps + cooldown_steps}, got {anneal_start}."
        )
    if anneal == "exponential":
        for name, value in (("constant_value", constant_value), ("end_value", end_value)):
            _checks.check_in_range(fn, name, value, 0.0, math.inf, low_inclusive=False)
    t_cd = warmup_steps + cooldown_steps

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        peak = jnp.asarray(peak_value, jnp.float32)
        const = jnp.asarray(constant_value, jnp.float32)
        end = jnp.asarray(end_value, jnp.float32)
        warm = peak * t / max(warmup_steps, 1)
        frac = jnp.clip((t - warmup_steps) / max(cooldown_steps, 1), 0.0, 1.0)
        shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) if cooldown == "cosine" else 1.0 - frac
        cool = const + (peak - const) * shape
        s = jnp.clip((t - anneal_start) / anneal_steps, 0.0, 1.0)
        if anneal == "exponential":
            tail = const * (end / const) ** s
        else:
            tail = const + (end - const) * s
        value = jnp.where(
            t < warmup_steps,
            warm,
            jnp.where(t < t_cd, cool, jnp.where(t < anneal_start, const, tail)),
        )
        return value

    return schedule
