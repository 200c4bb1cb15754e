"""Continual-learning metrics as pure NumPy functions of logged numbers (EX-01, EX-02, EX-06, EX-14).

The sources of truth are the **accuracy matrix** ``R[i, j]`` (accuracy on task ``j`` after
training task ``i``, 0-indexed; rows "after task", columns "evaluated task"), an optional row
``b`` of the randomly initialized model's accuracies (for FWT), and the **evaluation log** of
periodic evaluations ``(step, accuracy of every task)`` for the stability-gap metrics.

Accuracies are fractions in [0, 1] throughout (tables print percentages). Undefined values (BWT
with one task, FWT without a baseline) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "StreamingEval",
    "accuracy_curve",
    "aggregate",
    "area_under_curve",
    "continual_metrics",
    "dead_unit_fraction",
    "effective_rank",
    "flip_rates",
    "forgetting_curve",
    "intransigence",
    "loss_summary",
    "streaming_init",
    "streaming_result",
    "streaming_update",
    "summarize",
    "weight_magnitude",
]

_NAN = float("nan")


def _matrix(fn: str, R: Any, name: str = "R") -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(
            f"{fn}: `{name}` must be a non-empty square (T, T) matrix, got shape {R.shape}."
        )
    if not np.all(np.isfinite(R)):
        raise ValueError(f"{fn}: `{name}` holds non-finite values; every entry must be finite.")
    return R


def _baseline(fn: str, baseline: Any, num_tasks: int, name: str = "baseline") -> np.ndarray | None:
    if baseline is None:
        return None
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (num_tasks,):
        raise ValueError(
            f"{fn}: `{name}` must have shape ({num_tasks},), one accuracy per task, got {b.shape}."
        )
    return b


def summarize(R: Any, baseline: Any = None) -> dict[str, float]:
    """Summarizes a continual-learning run from its accuracy matrix (EX-01).

    With ``T`` tasks and final row ``R[T-1, :]``:

    * ``acc`` = ``(1/T) Σ_j R[T-1, j]``;
    * ``bwt`` = ``(1/(T-1)) Σ_{j<T-1} (R[T-1, j] - R[j, j])`` (Lopez-Paz and Ranzato);
    * ``fwt`` = ``(1/(T-1)) Σ_{j>=1} (R[j-1, j] - b_j)`` with ``b`` the random-init accuracies;
    * ``forgetting_max`` = ``mean_{j<T-1} (max_{l in [j, T-1)} R[l, j] - R[T-1, j])`` (Chaudhry
      et al.; mammoth's ``forgetting``: the maximum runs over rows ``j .. T-2``, never over rows
      before task ``j`` was learned);
    * ``forgetting_first`` = ``mean_{j<T-1} (R[j, j] - R[T-1, j])`` (Avalanche's
      ``ExperienceForgetting``), which is exactly ``-bwt``;
    * ``min_acc`` = ``mean_{j<T-1} min_{l in (j, T-1]} R[l, j]`` and ``wc_acc`` =
      ``(1/T) R[T-1, T-1] + (1 - 1/T) min_acc``: min-ACC / WC-ACC of De Lange et al. restricted
      to task-end evaluations (`continual_metrics` computes them from the periodic log, the
      paper's definition). With one task ``wc_acc = R[0, 0]``.

    Entries above the diagonal are ignored except ``R[j-1, j]`` (for FWT).

    Args:
        R: ``(T, T)`` accuracies in [0, 1] (fractions; percentages work too, the results scale).
        baseline: ``(T,)`` accuracies of the randomly initialized model, or None (``fwt`` NaN).

    Returns:
        A dict with ``acc, bwt, fwt, forgetting_max, forgetting_first, min_acc, wc_acc`` (floats;
        NaN where undefined: ``bwt``, forgetting and ``min_acc`` need two tasks).

    Raises:
        ValueError: when `R` is not a finite square matrix or `baseline` has the wrong shape.

    Example:
        >>> from cljax.experiments.metrics import summarize
        >>> m = summarize([[0.9, 0.1], [0.6, 0.8]], baseline=[0.1, 0.2])
        >>> round(m["acc"], 4), round(m["bwt"], 4), round(m["fwt"], 4)
        (0.7, -0.3, -0.1)

    References:
        Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
        Chaudhry et al., "Riemannian Walk for Incremental Learning: Understanding Forgetting and
        Intransigence", ECCV 2018. De Lange et al., "Continual evaluation for lifelong learning:
        Identifying the stability gap", ICLR 2023.
    """
    R = _matrix("summarize", R)
    b = _baseline("summarize", baseline, R.shape[0])
    T = R.shape[0]
    last = R[T - 1]
    out = {"acc": float(np.mean(last))}
    if T > 1:
        old = np.arange(T - 1)
        out["bwt"] = float(np.mean(last[old] - R[old, old]))
        out["forgetting_max"] = float(np.mean([np.max(R[j : T - 1, j]) - last[j] for j in old]))
        out["forgetting_first"] = float(np.mean(R[old, old] - last[old]))
        out["min_acc"] = float(np.mean([np.min(R[j + 1 :, j]) for j in old]))
        out["wc_acc"] = float(last[T - 1] / T + (1.0 - 1.0 / T) * out["min_acc"])
        out["fwt"] = _NAN if b is None else float(np.mean(R[old, old + 1] - b[old + 1]))
    else:
        out.update(bwt=_NAN, forgetting_max=_NAN, forgetting_first=_NAN, min_acc=_NAN, fwt=_NAN)
        out["wc_acc"] = float(last[0])
    keys = ("acc", "bwt", "fwt", "forgetting_max", "forgetting_first", "min_acc", "wc_acc")
    return {k: out[k] for k in keys}


def loss_summary(L: Any) -> dict[str, float]:
    """Final loss and forgetting measured in loss, from the loss matrix ``L[i, j]`` (EX-10).

    ``final_loss = (1/T) Σ_j L[T-1, j]`` and ``delta_ce = mean_{j<T-1} (L[T-1, j] - L[j, j])``:
    the cross-entropy increase on each earlier task since right after it was learned (NaN with
    one task). For language models it is forgetting in nats per token.

    Example:
        >>> from cljax.experiments.metrics import loss_summary
        >>> {k: round(v, 3) for k, v in loss_summary([[1.0, 3.0], [1.5, 0.5]]).items()}
        {'final_loss': 1.0, 'delta_ce': 0.5}
    """
    L = _matrix("loss_summary", L, "L")
    T = L.shape[0]
    delta = float(np.mean([L[T - 1, j] - L[j, j] for j in range(T - 1)])) if T > 1 else _NAN
    return {"final_loss": float(np.mean(L[T - 1])), "delta_ce": delta}


def accuracy_curve(R: Any) -> np.ndarray:
    """Average accuracy over the tasks seen so far after each task: ``mean_{j<=k} R[k, j]``.

    Example:
        >>> from cljax.experiments.metrics import accuracy_curve
        >>> accuracy_curve([[1.0, 0.0], [0.5, 1.0]])
        array([1.  , 0.75])
    """
    R = _matrix("accuracy_curve", R)
    return np.array([np.mean(R[k, : k + 1]) for k in range(R.shape[0])])


def forgetting_curve(R: Any, *, kind: str = "max") -> np.ndarray:
    """Forgetting after each task ``k``, averaged over ``j < k`` (NaN for ``k = 0``).

    Args:
        R: ``(T, T)`` accuracy matrix.
        kind: ``'max'`` (``max_{l in [j, k)} R[l, j] - R[k, j]``) or ``'first'``
            (``R[j, j] - R[k, j]``), the two definitions of `summarize`.

    Raises:
        ValueError: for another `kind`.

    Example:
        >>> from cljax.experiments.metrics import forgetting_curve
        >>> forgetting_curve([[0.5, 0.0], [0.2, 1.0]], kind="first")
        array([nan, 0.3])
    """
    if kind not in ("max", "first"):
        raise ValueError(f"forgetting_curve(kind=...) must be 'max' or 'first', got {kind!r}.")
    R = _matrix("forgetting_curve", R)
    out = [_NAN]
    for k in range(1, R.shape[0]):
        if kind == "max":
            f = [np.max(R[j:k, j]) - R[k, j] for j in range(k)]
        else:
            f = [R[j, j] - R[k, j] for j in range(k)]
        out.append(float(np.mean(f)))
    return np.array(out)


def intransigence(R: Any, reference: Any) -> np.ndarray:
    """Intransigence ``I_k = a*_k - R[k, k]`` against a jointly trained reference ``a*`` (EX-01).

    Example:
        >>> from cljax.experiments.metrics import intransigence
        >>> intransigence([[0.9, 0.0], [0.5, 0.7]], [1.0, 0.9]).round(6)
        array([0.1, 0.2])
    """
    R = _matrix("intransigence", R)
    ref = _baseline("intransigence", reference, R.shape[0], "reference")
    return ref - np.diag(R)


# ---------------------------------------------------------------------------------------------
# Continual evaluation (EX-02): from the periodic evaluation log.


def _log(
    fn: str, steps: Any, accs: Any, task_ends: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.int64)
    accs = np.asarray(accs, dtype=np.float64)
    task_ends = np.asarray(task_ends, dtype=np.int64)
    if steps.ndim != 1 or accs.ndim != 2 or accs.shape[0] != steps.shape[0]:
        raise ValueError(
            f"{fn}: `steps` must be (E,) and `accs` (E, T) for E evaluations; got {steps.shape} and {accs.shape}."
        )
    if task_ends.shape != (accs.shape[1],):
        raise ValueError(
            f"{fn}: `task_ends` must have shape ({accs.shape[1]},), got {task_ends.shape}."
        )
    if np.any(np.diff(steps) < 0) or np.any(np.diff(task_ends) <= 0):
        raise ValueError(f"{fn}: `steps` must be non-decreasing and `task_ends` increasing.")
    return steps, accs, task_ends


def _current_task(steps: np.ndarray, task_ends: np.ndarray) -> np.ndarray:
    """Task being trained at each step (``task_ends[k-1] < step <= task_ends[k]``); -1 at step 0."""
    k = np.searchsorted(task_ends, steps, side="left")
    return np.where(steps <= 0, -1, np.minimum(k, task_ends.size - 1))


def _max_window_change(s: np.ndarray, a: np.ndarray, window: int, sign: float) -> float:
    """max over n1 < n2 with s[n2] - s[n1] <= window of sign * (a[n2] - a[n1]), at least 0."""
    best = 0.0
    for n1 in range(a.size):
        inside = (s > s[n1]) & (s - s[n1] <= window)
        if np.any(inside):
            best = max(best, float(np.max(sign * (a[inside] - a[n1]))))
    return best


def continual_metrics(
    steps: Any, accs: Any, task_ends: Any, *, window: int | None = None
) -> dict[str, float]:
    """Continual-evaluation metrics from the periodic log (EX-02, EX-09), at the end of the stream.

    Evaluation ``n`` happens after optimizer step ``steps[n]`` and measures ``A(i, n) =
    accs[n, i]`` for every task; task ``k`` is trained on steps ``task_ends[k-1] + 1 ..
    task_ends[k]`` and the log must hold an evaluation at every task end.

    * ``min_acc`` = ``mean_{i<T-1} min_{n: steps[n] > task_ends[i]} A(i, n)``: only evaluations
      strictly after task ``i`` finished (the current task excluded);
    * ``wc_acc`` = ``(1/T) A(T-1, last) + (1 - 1/T) min_acc`` (``A`` itself with one task);
    * ``aaa``: the mean over evaluations (with ``steps > 0``) of the average accuracy on the
      tasks seen so far (the current one included);
    * ``wf`` (windowed forgetting): per finished task, the largest drop ``A(i, n1) - A(i, n2)``
      with ``n1 < n2`` within `window` steps, from the task's end on; averaged over tasks
      ``i < T-1``. ``wp`` (windowed plasticity): per task, the largest gain on the task being
      trained within `window` steps (from the evaluation at the previous task's end); averaged.
      The per-task average is our reading of the paper; check it before comparing numbers;
    * ``stability_gap``: per task switch (end of task ``k < T-1``) and old task ``i <= k``, the
      drop ``max(0, A_pre - min A)`` of ``A(i, ·)`` during task ``k+1`` below its value at the
      switch, averaged; ``recovery_steps``: over the drops that recover within the next task, the
      mean steps from the switch until ``A(i, ·)`` is back to its pre-switch value (0 when
      nothing ever drops, NaN when no drop recovers); ``unrecovered``: the fraction of drops
      that never recover within the next task.

    Args:
        steps: ``(E,)`` non-decreasing step of each evaluation (0 = before training).
        accs: ``(E, T)`` accuracy of every task at each evaluation.
        task_ends: ``(T,)`` last step of each task.
        window: Window ``w`` in steps for ``wf`` / ``wp`` (default: the smallest positive gap
            between evaluations, i.e. consecutive evaluations).

    Returns:
        A dict with ``min_acc, wc_acc, aaa, wf, wp, stability_gap, recovery_steps, unrecovered``.

    Raises:
        ValueError: for inconsistent shapes or a log without an evaluation at a task end.

    Example:
        >>> from cljax.experiments.metrics import continual_metrics
        >>> m = continual_metrics([1, 2, 3, 4], [[1.0, 0.0], [1.0, 0.1], [0.4, 0.8], [0.7, 0.9]], [2, 4])
        >>> round(m["min_acc"], 3), round(m["stability_gap"], 3)
        (0.4, 0.6)

    References:
        De Lange, van de Ven and Tuytelaars, "Continual evaluation for lifelong learning:
        Identifying the stability gap", ICLR 2023. https://arxiv.org/abs/2205.13452
    """
    steps, accs, task_ends = _log("continual_metrics", steps, accs, task_ends)
    T = accs.shape[1]
    at_end = []
    for k in range(T):
        hits = np.nonzero(steps == task_ends[k])[0]
        if hits.size == 0:
            raise ValueError(
                f"continual_metrics: no evaluation at the end of task {k} (step {task_ends[k]})."
            )
        at_end.append(int(hits[-1]))
    if window is None:
        gaps = np.diff(np.unique(steps))
        window = int(gaps.min()) if gaps.size else 1
    current = _current_task(steps, task_ends)
    out: dict[str, float] = {}
    mins = [float(np.min(accs[steps > task_ends[i], i])) for i in range(T - 1)]
    out["min_acc"] = float(np.mean(mins)) if mins else _NAN
    final = accs[at_end[-1], T - 1]
    out["wc_acc"] = float(final) if T == 1 else float(final / T + (1.0 - 1.0 / T) * out["min_acc"])
    seen = [np.mean(accs[n, : current[n] + 1]) for n in range(steps.size) if current[n] >= 0]
    out["aaa"] = float(np.mean(seen)) if seen else _NAN
    wf = [
        _max_window_change(steps[at_end[i] :], accs[at_end[i] :, i], window, -1.0)
        for i in range(T - 1)
    ]
    out["wf"] = float(np.mean(wf)) if wf else _NAN
    wp = []
    for k in range(T):
        lo = (
            at_end[k - 1]
            if k > 0
            else int(np.nonzero(steps <= 0)[0][-1])
            if np.any(steps <= 0)
            else 0
        )
        wp.append(
            _max_window_change(steps[lo : at_end[k] + 1], accs[lo : at_end[k] + 1, k], window, 1.0)
        )
    out["wp"] = float(np.mean(wp))
    gaps_, recoveries, unrecovered = [], [], 0
    for k in range(T - 1):
        during = np.nonzero((steps > task_ends[k]) & (steps <= task_ends[k + 1]))[0]
        for i in range(k + 1):
            pre = accs[at_end[k], i]
            a = accs[during, i]
            if a.size == 0:
                continue
            drop = max(0.0, float(pre - np.min(a)))
            gaps_.append(drop)
            if drop == 0.0:
                continue
            after = np.arange(a.size) > int(np.argmin(a))
            back = np.nonzero(after & (a >= pre))[0]
            if back.size:
                recoveries.append(float(steps[during[back[0]]] - task_ends[k]))
            else:
                unrecovered += 1
    out["stability_gap"] = float(np.mean(gaps_)) if gaps_ else _NAN
    drops = sum(g > 0 for g in gaps_)
    if recoveries:
        out["recovery_steps"] = float(np.mean(recoveries))
    else:  # nothing dropped: recovery is immediate; drops that never recover: undefined
        out["recovery_steps"] = 0.0 if gaps_ and drops == 0 else _NAN
    out["unrecovered"] = float(unrecovered / drops) if drops else (0.0 if gaps_ else _NAN)
    return out


class StreamingEval(NamedTuple):
    """Running trackers for min-ACC and AAA, updated one evaluation at a time (EX-02)."""

    minimum: np.ndarray  # (T,) running minimum of A(i, n) after task i finished; +inf before
    aaa_sum: float  # sum over evaluations of the average accuracy on the seen tasks
    aaa_count: int  # evaluations counted in aaa_sum
    last: np.ndarray  # (T,) the latest accuracies


def streaming_init(num_tasks: int) -> StreamingEval:
    """Empty trackers for `num_tasks` tasks.

    Example:
        >>> from cljax.experiments.metrics import streaming_init
        >>> streaming_init(2).aaa_count
        0
    """
    return StreamingEval(np.full(num_tasks, np.inf), 0.0, 0, np.zeros(num_tasks))


def streaming_update(
    state: StreamingEval, step: int, current_task: int, finished: Sequence[bool], accs: Any
) -> StreamingEval:
    """Folds one evaluation into the trackers.

    Args:
        state: The trackers.
        step: The evaluation's step (0 = before training: not counted in AAA).
        current_task: Task being trained at `step`.
        finished: Per task, whether its training ended strictly before this evaluation.
        accs: ``(T,)`` accuracies of every task.

    Returns:
        The updated `StreamingEval`.
    """
    accs = np.asarray(accs, dtype=np.float64)
    finished = np.asarray(finished, dtype=bool)
    minimum = np.where(finished, np.minimum(state.minimum, accs), state.minimum)
    if step > 0:
        return StreamingEval(
            minimum,
            state.aaa_sum + float(np.mean(accs[: current_task + 1])),
            state.aaa_count + 1,
            accs,
        )
    return StreamingEval(minimum, state.aaa_sum, state.aaa_count, accs)


def streaming_result(state: StreamingEval, current_task: int) -> dict[str, float]:
    """Current ``min_acc``, ``wc_acc`` and ``aaa`` from the trackers (as `continual_metrics`).

    Example:
        >>> from cljax.experiments.metrics import streaming_init, streaming_result, streaming_update
        >>> s = streaming_update(streaming_init(1), 5, 0, [False], [0.5])
        >>> streaming_result(s, 0)["wc_acc"]
        0.5
    """
    k = current_task
    tracked = state.minimum[:k]
    min_acc = float(np.mean(tracked)) if k > 0 and np.all(np.isfinite(tracked)) else _NAN
    a = float(state.last[k])
    wc = a if k == 0 else a / (k + 1) + (1.0 - 1.0 / (k + 1)) * min_acc
    aaa = state.aaa_sum / state.aaa_count if state.aaa_count else _NAN
    return {"min_acc": min_acc, "wc_acc": wc, "aaa": aaa}


# ---------------------------------------------------------------------------------------------
# Plasticity (EX-06), flips (EX-14), memory curves (EX-15), seeds.


def effective_rank(features: Any) -> float:
    """Effective rank ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σ σ`` of a feature matrix.

    Singular values, not their squares, are normalized, as in the loss-of-plasticity reference
    code. A zero matrix has effective rank 0; a matrix with ``r`` equal non-zero singular values
    has effective rank ``r``.

    Args:
        features: ``(N, d)`` features (e.g. the last hidden layer on a probe batch).

    Example:
        >>> from cljax.experiments.metrics import effective_rank
        >>> round(effective_rank(np.eye(4)), 6)
        4.0

    References:
        Dohare et al., "Loss of Plasticity in Deep Continual Learning", Nature 2024.
        Roy and Vetterli, "The effective rank: A measure of effective dimensionality", 2007.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(
            f"effective_rank: `features` must be a 2-D (N, d) matrix, got shape {f.shape}."
        )
    if f.size == 0:
        return 0.0
    # Singular values from the smaller Gram matrix: far cheaper than an SVD on a busy CPU.
    gram = f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
    total = float(np.sum(s))
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def dead_unit_fraction(activations: Mapping[str, Any]) -> float:
    """Fraction of hidden ReLU units never active (output ``<= 0``) on a probe batch.

    Args:
        activations: Layer name -> ``(N, units)`` post-ReLU activations on the probe batch.

    Example:
        >>> from cljax.experiments.metrics import dead_unit_fraction
        >>> dead_unit_fraction({"h": np.array([[0.0, 1.0], [0.0, 0.0]])})
        0.5
    """
    dead = total = 0
    for name, a in activations.items():
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(
                f"dead_unit_fraction: layer '{name}' has shape {a.shape}; need (N, units)."
            )
        dead += int(np.sum(np.max(a, axis=0) <= 0)) if a.shape[0] else a.shape[1]
        total += a.shape[1]
    return dead / total if total else 0.0


def weight_magnitude(params: Any) -> float:
    """Average absolute value over every parameter entry.

    Example:
        >>> from cljax.experiments.metrics import weight_magnitude
        >>> weight_magnitude({"w": np.array([1.0, -3.0])})
        2.0
    """
    import jax

    leaves = [np.abs(np.asarray(x, dtype=np.float64)).ravel() for x in jax.tree.leaves(params)]
    size = sum(x.size for x in leaves)
    return float(sum(x.sum() for x in leaves) / size) if size else 0.0


def flip_rates(old_correct: Any, new_correct: Any) -> tuple[float, float]:
    """Negative and positive flip rates between two models on one evaluation set (EX-14).

    ``NFR = (1/N) Σ 1[old correct ∧ new wrong]``, ``PFR = (1/N) Σ 1[old wrong ∧ new correct]``.

    Args:
        old_correct, new_correct: Boolean arrays of one shape, per example (or token).

    Returns:
        ``(nfr, pfr)``; ``(0.0, 0.0)`` on an empty set.

    Raises:
        ValueError: when the shapes differ.

    Example:
        >>> from cljax.experiments.metrics import flip_rates
        >>> flip_rates([True, True, False, False], [True, False, True, False])
        (0.25, 0.25)
    """
    old = np.asarray(old_correct, dtype=bool)
    new = np.asarray(new_correct, dtype=bool)
    if old.shape != new.shape:
        raise ValueError(
            f"flip_rates: `old_correct` has shape {old.shape} but `new_correct` {new.shape}."
        )
    if old.size == 0:
        return 0.0, 0.0
    return float(np.mean(old & ~new)), float(np.mean(~old & new))


def area_under_curve(x: Any, y: Any) -> float:
    """Trapezoidal area under ``y(x)`` with the points sorted by `x` (accuracy vs memory, EX-15).

    A constant curve ``y = c`` gives ``c * (max(x) - min(x))``.

    Example:
        >>> from cljax.experiments.metrics import area_under_curve
        >>> area_under_curve([3.0, 1.0], [0.5, 0.5])
        1.0
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"area_under_curve: `x` and `y` must be 1-D of one length, got {x.shape} and {y.shape}."
        )
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def aggregate(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) over seeds, NaNs dropped.

    Example:
        >>> from cljax.experiments.metrics import aggregate
        >>> aggregate([1.0, 3.0])
        {'mean': 2.0, 'std': 1.4142135623730951, 'n': 2}
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": _NAN, "std": _NAN, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "n": int(v.size),
    }
