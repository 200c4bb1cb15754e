"""Metrics against hand-computed matrices and logs, the cards' invariants, and property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.experiments import metrics as M

# A 3-task matrix whose metrics are computed by hand below.
R3 = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.70, 0.80, 0.30],
        [0.60, 0.50, 0.95],
    ]
)
B3 = np.array([0.10, 0.15, 0.25])


def test_summarize_matches_hand_computation():
    m = M.summarize(R3, B3)
    # ACC = (0.60 + 0.50 + 0.95) / 3
    assert m["acc"] == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    # BWT = ((0.60 - 0.90) + (0.50 - 0.80)) / 2 = -0.30
    assert m["bwt"] == pytest.approx(-0.30)
    # FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.10 - 0.15) + (0.30 - 0.25)) / 2 = 0
    assert m["fwt"] == pytest.approx(0.0, abs=1e-12)
    # F_max: task 0 max(R[0,0], R[1,0]) - R[2,0] = 0.90 - 0.60; task 1 R[1,1] - R[2,1] = 0.30
    assert m["forgetting_max"] == pytest.approx((0.30 + 0.30) / 2)
    assert m["forgetting_first"] == pytest.approx(0.30)
    # min-ACC from task ends: task 0 min(R[1,0], R[2,0]) = 0.60, task 1 R[2,1] = 0.50
    assert m["min_acc"] == pytest.approx(0.55)
    # WC-ACC = R[2,2] / 3 + (2/3) * min-ACC
    assert m["wc_acc"] == pytest.approx(0.95 / 3 + 2 / 3 * 0.55)


def test_forgetting_definitions_differ_when_accuracy_peaks_after_learning():
    # Task 0 keeps improving after it is learned (0.5 -> 0.9), then drops to 0.4.
    R = np.array([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.4, 0.8, 0.7]])
    m = M.summarize(R)
    assert m["forgetting_first"] == pytest.approx(((0.5 - 0.4) + (0.8 - 0.8)) / 2)
    assert m["forgetting_max"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert m["forgetting_max"] > m["forgetting_first"]


def test_forgetting_max_excludes_rows_before_the_task_was_learned():
    # R[0, 1] is high by chance before task 1 is learned: it must not enter task 1's maximum.
    R = np.array([[0.9, 0.99, 0.0], [0.8, 0.6, 0.0], [0.7, 0.5, 0.9]])
    assert M.summarize(R)["forgetting_max"] == pytest.approx(((0.9 - 0.7) + (0.6 - 0.5)) / 2)


def test_constant_matrix_has_zero_transfer_and_forgetting():
    m = M.summarize(np.full((4, 4), 0.7), baseline=np.full(4, 0.7))
    for key in ("bwt", "fwt", "forgetting_max", "forgetting_first"):
        assert m[key] == pytest.approx(0.0, abs=1e-12)
    assert m["acc"] == pytest.approx(0.7)


def test_single_task():
    m = M.summarize([[0.8]], baseline=[0.1])
    assert m["acc"] == pytest.approx(0.8)
    assert m["wc_acc"] == pytest.approx(0.8)
    for key in ("bwt", "fwt", "forgetting_max", "forgetting_first", "min_acc"):
        assert math.isnan(m[key])


def test_fwt_without_baseline_is_nan():
    assert math.isnan(M.summarize(R3)["fwt"])


def test_summarize_matches_a_plain_loop_reference():
    rng = np.random.default_rng(0)
    for T in (2, 3, 6):
        R = rng.uniform(size=(T, T))
        b = rng.uniform(size=T)
        m = M.summarize(R, b)
        last = T - 1
        bwt = sum(R[last, j] - R[j, j] for j in range(last)) / last
        fwt = sum(R[j - 1, j] - b[j] for j in range(1, T)) / last
        fmax = (
            sum(max(R[row, j] for row in range(j, last)) - R[last, j] for j in range(last)) / last
        )
        assert m["bwt"] == pytest.approx(bwt)
        assert m["fwt"] == pytest.approx(fwt)
        assert m["forgetting_max"] == pytest.approx(fmax)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 7), seed=st.integers(0, 2**31 - 1))
def test_invariants_on_random_matrices(T, seed):
    rng = np.random.default_rng(seed)
    R = rng.uniform(size=(T, T))
    m = M.summarize(R)
    assert m["forgetting_first"] == pytest.approx(-m["bwt"], abs=1e-12)
    assert m["forgetting_max"] >= m["forgetting_first"] - 1e-12
    assert 0.0 <= m["acc"] <= 1.0
    assert m["min_acc"] <= np.max(R[T - 1, : T - 1]) + 1e-12  # min-ACC <= final-row accuracies
    # Entries above the diagonal other than R[j-1, j] never matter.
    R2 = R.copy()
    for i in range(T):
        for j in range(i + 2, T):
            R2[i, j] = rng.uniform()
    assert M.summarize(R2) == pytest.approx(m, nan_ok=True)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        M.summarize(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="`L` must be a non-empty square"):
        M.loss_summary(np.zeros((0, 0)))
    with pytest.raises(ValueError, match="non-finite"):
        M.summarize([[np.nan]])
    with pytest.raises(ValueError, match="baseline"):
        M.summarize(R3, baseline=[0.1, 0.2])


def test_loss_summary():
    L = np.array([[0.5, 3.0, 3.0], [1.0, 0.4, 3.0], [1.5, 0.9, 0.3]])
    m = M.loss_summary(L)
    assert m["final_loss"] == pytest.approx((1.5 + 0.9 + 0.3) / 3)
    assert m["delta_ce"] == pytest.approx(((1.5 - 0.5) + (0.9 - 0.4)) / 2)
    assert math.isnan(M.loss_summary([[2.0]])["delta_ce"])


def test_curves_and_intransigence():
    np.testing.assert_allclose(M.accuracy_curve(R3), [0.90, 0.75, (0.6 + 0.5 + 0.95) / 3])
    f = M.forgetting_curve(R3, kind="first")
    assert math.isnan(f[0])
    np.testing.assert_allclose(f[1:], [0.20, (0.30 + 0.30) / 2])
    np.testing.assert_allclose(M.forgetting_curve(R3, kind="max")[1:], [0.20, 0.30])
    np.testing.assert_allclose(M.intransigence(R3, [1.0, 0.9, 0.95]), [0.10, 0.10, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        M.forgetting_curve(R3, kind="mean")
    with pytest.raises(ValueError, match="`reference` must have shape"):
        M.intransigence(R3, [1.0])


# ---------------------------------------------------------------------------------------------
# Continual evaluation from a hand-made log: 3 tasks of 4 steps, evaluations every 2 steps.

STEPS = [0, 2, 4, 6, 8, 10, 12]
ENDS = [4, 8, 12]
ACCS = [
    # task0 task1 task2
    [0.10, 0.10, 0.10],  # step 0
    [0.60, 0.10, 0.10],  # step 2
    [0.90, 0.10, 0.10],  # step 4  (end of task 0)
    [0.50, 0.70, 0.10],  # step 6  (task 0 drops by 0.4: stability gap)
    [0.80, 0.90, 0.10],  # step 8  (end of task 1; task 0 recovered to 0.8 < 0.9)
    [0.70, 0.60, 0.80],  # step 10
    [0.75, 0.95, 0.90],  # step 12 (end of task 2)
]


def test_continual_metrics_match_hand_computation():
    m = M.continual_metrics(STEPS, ACCS, ENDS)
    # min-ACC over i < 2 of the minimum strictly after the task ended:
    #   task 0: min(0.5, 0.8, 0.7, 0.75) = 0.5 ; task 1: min(0.6, 0.95) = 0.6
    assert m["min_acc"] == pytest.approx(0.55)
    assert m["wc_acc"] == pytest.approx(0.90 / 3 + 2 / 3 * 0.55)
    # AAA over evaluations with step > 0 of the mean over seen tasks.
    seen = [
        0.6,
        0.9,
        (0.5 + 0.7) / 2,
        (0.8 + 0.9) / 2,
        (0.7 + 0.6 + 0.8) / 3,
        (0.75 + 0.95 + 0.9) / 3,
    ]
    assert m["aaa"] == pytest.approx(np.mean(seen))
    # WF (window 2 steps = consecutive evaluations), from each task's end on:
    #   task 0: drops 0.9->0.5 (0.4), 0.8->0.7 (0.1) -> 0.4 ; task 1: 0.9->0.6 -> 0.3
    assert m["wf"] == pytest.approx((0.4 + 0.3) / 2)
    # WP: task 0 gains 0.5 (0.1->0.6); task 1 from step 4: 0.6 (0.1->0.7); task 2 from step 8: 0.7
    assert m["wp"] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    # Stability gap: switch 0->1: task 0 drops 0.9 -> 0.5 (0.4), never back to 0.9 within task 1.
    # Switch 1->2: task 0 pre 0.8, min 0.7 (0.1), back to >= 0.8? no (0.75). Task 1 pre 0.9,
    # min 0.6 (0.3), back at step 12 (0.95): recovery 12 - 8 = 4 steps.
    assert m["stability_gap"] == pytest.approx((0.4 + 0.1 + 0.3) / 3)
    assert m["recovery_steps"] == pytest.approx(4.0)
    assert m["unrecovered"] == pytest.approx(2 / 3)


def test_monotone_log_has_no_windowed_forgetting_or_gap():
    steps = np.arange(0, 13, 2)
    accs = np.tile(np.linspace(0.1, 0.9, steps.size)[:, None], (1, 3))
    m = M.continual_metrics(steps, accs, [4, 8, 12])
    assert m["wf"] == 0.0
    assert m["stability_gap"] == 0.0
    assert m["recovery_steps"] == 0.0


def test_drops_that_never_recover_have_no_recovery_time():
    steps, ends = [0, 2, 4, 6, 8], [4, 8]
    accs = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.6], [0.3, 0.9]]
    m = M.continual_metrics(steps, accs, ends)
    assert m["stability_gap"] == pytest.approx(0.7)
    assert math.isnan(m["recovery_steps"])
    assert m["unrecovered"] == 1.0


def test_continual_single_task_wc_acc_is_the_accuracy():
    m = M.continual_metrics([0, 5, 10], [[0.1], [0.5], [0.8]], [10])
    assert m["wc_acc"] == pytest.approx(0.8)
    assert math.isnan(m["min_acc"])


def test_streaming_trackers_equal_the_full_log():
    state = M.streaming_init(3)
    ends = np.asarray(ENDS)
    for step, accs in zip(STEPS, ACCS, strict=True):
        current = int(np.searchsorted(ends, step, side="left")) if step > 0 else 0
        state = M.streaming_update(state, step, current, ends < step, accs)
    got = M.streaming_result(state, 2)
    full = M.continual_metrics(STEPS, ACCS, ENDS)
    for key in ("min_acc", "wc_acc", "aaa"):
        assert got[key] == pytest.approx(full[key])


def test_continual_metrics_rejects_bad_logs():
    with pytest.raises(ValueError, match="no evaluation at the end of task 1"):
        M.continual_metrics([0, 2, 4, 7], [[0.1, 0.1]] * 4, [4, 8])
    with pytest.raises(ValueError, match="task_ends"):
        M.continual_metrics([0, 2], [[0.1, 0.1]] * 2, [2])
    with pytest.raises(ValueError, match="E evaluations"):
        M.continual_metrics([0, 2], [[0.1, 0.1]], [2, 4])
    with pytest.raises(ValueError, match="non-decreasing"):
        M.continual_metrics([2, 0], [[0.1], [0.1]], [2])


# ---------------------------------------------------------------------------------------------
# Plasticity, flips, curves, seeds.


def test_effective_rank():
    assert M.effective_rank(np.eye(5)[:, :3]) == pytest.approx(3.0)
    assert M.effective_rank(np.zeros((4, 3))) == 0.0
    assert M.effective_rank(np.ones((6, 1))) == pytest.approx(1.0)
    # Reference: p = s / sum(s) from NumPy's SVD (singular values, not squared).
    f = np.random.default_rng(0).normal(size=(32, 8))
    s = np.linalg.svd(f, compute_uv=False)
    p = s / s.sum()
    assert M.effective_rank(f) == pytest.approx(float(np.exp(-np.sum(p * np.log(p)))), rel=1e-9)
    with pytest.raises(ValueError, match="2-D"):
        M.effective_rank(np.zeros(3))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_effective_rank_is_between_zero_and_rank(n, d, seed):
    f = np.random.default_rng(seed).normal(size=(n, d))
    er = M.effective_rank(f)
    assert 0.0 <= er <= np.linalg.matrix_rank(f) + 1e-6


def test_dead_units_and_weight_magnitude():
    acts = {"a": np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]), "b": np.array([[1.0], [3.0]])}
    assert M.dead_unit_fraction(acts) == pytest.approx(1 / 4)
    assert M.dead_unit_fraction({"a": np.ones((3, 4))}) == 0.0
    assert M.weight_magnitude(
        {"w": np.array([[1.0, -2.0]]), "b": np.array([3.0])}
    ) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="layer 'a'"):
        M.dead_unit_fraction({"a": np.ones(3)})


def test_flip_rates():
    old = np.array([1, 1, 0, 0, 1], bool)
    new = np.array([1, 0, 1, 0, 0], bool)
    nfr, pfr = M.flip_rates(old, new)
    assert (nfr, pfr) == (pytest.approx(2 / 5), pytest.approx(1 / 5))
    assert M.flip_rates(old, old) == (0.0, 0.0)
    assert nfr <= 1 - new.mean() + 1e-12  # NFR <= 1 - acc_new
    with pytest.raises(ValueError, match="shape"):
        M.flip_rates(old, new[:3])


def test_area_under_curve_of_a_constant_is_value_times_range():
    assert M.area_under_curve([5.0, 1.0, 3.0], [0.4, 0.4, 0.4]) == pytest.approx(0.4 * 4.0)
    assert M.area_under_curve([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1-D"):
        M.area_under_curve([1.0, 2.0], [1.0])


def test_aggregate_uses_the_sample_standard_deviation():
    agg = M.aggregate([0.2, 0.4, float("nan"), 0.6])
    assert agg["mean"] == pytest.approx(0.4)
    assert agg["std"] == pytest.approx(np.std([0.2, 0.4, 0.6], ddof=1))
    assert agg["n"] == 3
    assert M.aggregate([None])["n"] == 0
