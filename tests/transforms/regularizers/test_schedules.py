"""Tests for the schedules: OT-05 (linear decay to zero) and OT-04 (re-warming, infinite).

Each schedule is compared step by step with a float64 Python transcription of its formula, and
checked for its values at the phase boundaries, continuity and monotonicity.
"""

from __future__ import annotations

import math

import numpy as np
import optax
import pytest

import cljax


def values(schedule, steps):
    return np.array([float(schedule(t)) for t in steps])


def test_d2z_matches_formula_hits_zero_and_is_monotone_after_warmup():
    peak, tw, total = 3e-3, 5, 25

    def ref(t):
        if t < tw:
            return peak * t / tw
        return peak * max(total - t, 0) / (total - tw)

    s = cljax.linear_decay_to_zero_schedule(peak, tw, total)
    steps = range(0, total + 5)
    np.testing.assert_allclose(values(s, steps), [ref(t) for t in steps], rtol=1e-6, atol=1e-12)
    assert float(s(0)) == 0.0 and float(s(total)) == 0.0
    assert float(s(tw)) == pytest.approx(peak, rel=1e-7)
    after = values(s, range(tw, total + 1))
    assert np.all(np.diff(after) <= 0)
    no_warmup = cljax.linear_decay_to_zero_schedule(1.0, 0, 4)
    np.testing.assert_allclose(values(no_warmup, range(6)), [1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_rewarm_equals_the_base_schedule_shifted_to_each_boundary():
    base = optax.warmup_cosine_decay_schedule(0.0, 1.0, 3, 10, 0.1)
    boundaries = [10, 17]
    s = cljax.rewarm_schedule(base, boundaries)
    for t in range(30):
        start = max([0] + [b for b in boundaries if b <= t])
        assert float(s(t)) == pytest.approx(float(base(t - start)), rel=1e-6, abs=1e-9), t
    assert cljax.rewarm_schedule(base, []) is base


@pytest.mark.parametrize("cooldown", ["cosine", "linear"])
@pytest.mark.parametrize("anneal", ["exponential", "linear"])
def test_infinite_schedule_matches_formula_and_is_continuous(cooldown, anneal):
    peak, const, end = 1.0, 0.3, 0.01
    tw, tcd, ta, tan = 4, 6, 20, 8
    s = cljax.infinite_schedule(
        peak,
        const,
        end,
        warmup_steps=tw,
        cooldown_steps=tcd,
        anneal_start=ta,
        anneal_steps=tan,
        cooldown=cooldown,
        anneal=anneal,
    )

    def ref(t):
        if t < tw:
            return peak * t / tw
        if t < tw + tcd:
            frac = (t - tw) / tcd
            shape = 0.5 * (1 + math.cos(math.pi * frac)) if cooldown == "cosine" else 1 - frac
            return const + (peak - const) * shape
        if t < ta:
            return const
        frac = min((t - ta) / tan, 1.0)
        return (
            const * (end / const) ** frac
            if anneal == "exponential"
            else const + (end - const) * frac
        )

    steps = np.arange(0, 40)
    got = values(s, steps)
    np.testing.assert_allclose(got, [ref(t) for t in steps], rtol=1e-5, atol=1e-7)
    for t, want in (
        (0, 0.0),
        (tw, peak),
        (tw + tcd, const),
        (ta, const),
        (ta + tan, end),
        (39, end),
    ):
        assert float(s(t)) == pytest.approx(want, rel=1e-5, abs=1e-7), t
    # Continuity: the formula's one-sided limits at each boundary agree with the value there.
    for b in (tw, tw + tcd, ta, ta + tan):
        assert float(s(b - 1e-4)) == pytest.approx(float(s(b)), rel=1e-3, abs=1e-4), b


def test_schedule_errors():
    with pytest.raises(
        ValueError,
        match=r"linear_decay_to_zero_schedule\(total_steps=...\) must exceed warmup_steps=5",
    ):
        cljax.linear_decay_to_zero_schedule(1.0, 5, 5)
    with pytest.raises(
        ValueError, match=r"linear_decay_to_zero_schedule\(warmup_steps=...\) must be >= 0"
    ):
        cljax.linear_decay_to_zero_schedule(1.0, -1, 5)
    with pytest.raises(
        ValueError, match=r"rewarm_schedule\(boundaries=...\) must be strictly increasing"
    ):
        cljax.rewarm_schedule(optax.constant_schedule(1.0), [5, 5])
    with pytest.raises(ValueError, match=r"rewarm_schedule\(boundaries=...\) must be >= 1"):
        cljax.rewarm_schedule(optax.constant_schedule(1.0), [0])
    with pytest.raises(TypeError, match=r"rewarm_schedule\(schedule=...\) must be a schedule"):
        cljax.rewarm_schedule(1.0, [3])
    kwargs = dict(warmup_steps=2, cooldown_steps=2, anneal_start=10, anneal_steps=3)
    with pytest.raises(
        ValueError, match=r"infinite_schedule\(end_value=...\) must be in \(0.0, inf\]"
    ):
        cljax.infinite_schedule(1.0, 0.5, 0.0, **kwargs)
    with pytest.raises(
        ValueError,
        match=r"infinite_schedule\(anneal_start=...\) must be >= warmup_steps \+ cooldown_steps = 4",
    ):
        cljax.infinite_schedule(1.0, 0.5, 0.1, **{**kwargs, "anneal_start": 3})
    with pytest.raises(ValueError, match=r"infinite_schedule\(cooldown=...\) must be one of"):
        cljax.infinite_schedule(1.0, 0.5, 0.1, cooldown="step", **kwargs)
    with pytest.raises(ValueError, match=r"infinite_schedule\(anneal_steps=...\) must be >= 1"):
        cljax.infinite_schedule(1.0, 0.5, 0.1, **{**kwargs, "anneal_steps": 0})
