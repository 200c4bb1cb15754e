"""Results of an experiment: aggregation over seeds, Markdown tables, JSON files.

An experiment directory holds ``results.json`` (every number of every run plus the full
configuration), ``results.md`` (the tables, also printed), ``runs/<method>_seed<k>.json`` (one
file per finished run, which ``--resume`` reuses), ``checkpoints/`` and the PNG plots.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cljax.experiments import metrics as _metrics

__all__ = [
    "compare_table",
    "load_results",
    "loss_curves",
    "loss_over_time",
    "loss_table",
    "markdown_tables",
    "summarize_runs",
    "write_json",
]

# (key, column title, percent) of the main table, per scenario.
_MAIN = (
    ("acc", "ACC", True),
    ("bwt", "BWT", True),
    ("fwt", "FWT", True),
    ("forgetting_max", "F_max", True),
    ("forgetting_first", "F_first", True),
    ("min_acc", "min-ACC", True),
    ("wc_acc", "WC-ACC", True),
    ("nfr", "NFR", True),
    ("final_loss", "CE", False),
    ("delta_ce", "ΔCE", False),
)
_CONTINUAL = (
    ("min_acc", "min-ACC", True),
    ("wc_acc", "WC-ACC", True),
    ("aaa", "AAA", True),
    ("wf", "WF", True),
    ("stability_gap", "gap", True),
    ("recovery_steps", "recovery (steps)", False),
)
_PLASTICITY = (
    ("new_task_acc_first", "new-task ACC (first 10%)", True),
    ("new_task_acc_last", "new-task ACC (last 10%)", True),
    ("dead_fraction_last", "dead units", True),
    ("effective_rank_last", "eff. rank", False),
    ("weight_magnitude_last", "mean abs w", False),
)


def _values(runs: Mapping[str, Any], *path: str) -> list[float]:
    out = []
    for result in runs.values():
        node: Any = result
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        out.append(float("nan") if node is None else float(node))
    return out


def summarize_runs(
    runs: Mapping[str, Mapping[str, Any]], scenarios: Sequence[str]
) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every reported number, per method.

    Args:
        runs: ``method -> {seed: run result}`` (results of `runner.run`).
        scenarios: The stream's scenarios.

    Returns:
        ``method -> {"metrics": {scenario: {key: aggregate}}, "continual": ..., "plasticity": ...,
        "memory": {key: aggregate}, "wall_time_s": aggregate, "xla_compilations": aggregate,
        "R_mean": {scenario: matrix}, "seeds": [...]}`` with `metrics.aggregate` entries; runs
        on a stream with a pool test set (SCoLe, EX-12) add ``"accumulation"``: one aggregate of
        the pool accuracy per task end (the knowledge-accumulation curve).

    Example:
        >>> from cljax.experiments.results import summarize_runs
        >>> run = {"metrics": {"class": {"acc": 0.5}}, "R": {"class": [[0.5]]}}
        >>> summarize_runs({"naive": {"0": run}}, ["class"])["naive"]["metrics"]["class"]["acc"]["mean"]
        0.5
    """
    summary: dict[str, Any] = {}
    for method, by_seed in runs.items():
        entry: dict[str, Any] = {
            "seeds": list(by_seed),
            "metrics": {},
            "continual": {},
            "R_mean": {},
        }
        for s in scenarios:
            keys = set().union(
                *((r.get("metrics", {}).get(s) or {}).keys() for r in by_seed.values())
            )
            entry["metrics"][s] = {
                k: _metrics.aggregate(_values(by_seed, "metrics", s, k)) for k in sorted(keys)
            }
            keys = set().union(
                *((r.get("continual", {}).get(s) or {}).keys() for r in by_seed.values())
            )
            entry["continual"][s] = {
                k: _metrics.aggregate(_values(by_seed, "continual", s, k)) for k in sorted(keys)
            }
            mats = [
                np.asarray(r["R"][s], np.float64) for r in by_seed.values() if r.get("R", {}).get(s)
            ]
            if mats and all(m.shape == mats[0].shape for m in mats):
                entry["R_mean"][s] = np.mean(mats, axis=0).tolist()
        keys = set().union(*((r.get("plasticity_summary") or {}).keys() for r in by_seed.values()))
        entry["plasticity"] = {
            k: _metrics.aggregate(_values(by_seed, "plasticity_summary", k)) for k in sorted(keys)
        }
        keys = set().union(*((r.get("memory") or {}).keys() for r in by_seed.values()))
        entry["memory"] = {
            k: _metrics.aggregate(_values(by_seed, "memory", k)) for k in sorted(keys)
        }
        curves = [
            r["accumulation"]["task_end_acc"] for r in by_seed.values() if r.get("accumulation")
        ]
        if curves and all(len(c) == len(curves[0]) for c in curves):
            entry["accumulation"] = [_metrics.aggregate(list(v)) for v in zip(*curves, strict=True)]
        entry["wall_time_s"] = _metrics.aggregate(_values(by_seed, "wall_time_s"))
        entry["xla_compilations"] = _metrics.aggregate(_values(by_seed, "compilations", "xla"))
        summary[method] = entry
    return summary


def _cell(agg: Mapping[str, Any] | None, percent: bool) -> str:
    if not agg or agg.get("n", 0) == 0 or agg.get("mean") is None or not math.isfinite(agg["mean"]):
        return "-"
    scale = 100.0 if percent else 1.0
    mean, std = agg["mean"] * scale, (agg.get("std") or 0.0) * scale
    digits = 1 if percent or abs(mean) >= 10 else 2
    if agg["n"] > 1:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _count(agg: Mapping[str, Any] | None) -> str:
    if not agg or agg.get("n", 0) == 0:
        return "-"
    return f"{agg['mean']:.0f}"


def _kib(agg: Mapping[str, Any] | None) -> str:
    if not agg or agg.get("n", 0) == 0:
        return "-"
    return f"{agg['mean'] / 1024:.0f}"


def markdown_tables(
    summary: Mapping[str, Any], scenarios: Sequence[str], *, title: str = ""
) -> str:
    """Markdown tables of a `summarize_runs` summary: one main table per scenario, then the
    continual-evaluation, knowledge-accumulation (only for runs that measured it: SCoLe, EX-12)
    and plasticity tables. Accuracies in percent, mean ± std over seeds.

    Example:
        >>> from cljax.experiments.results import markdown_tables, summarize_runs
        >>> run = {"metrics": {"class": {"acc": 0.5}}, "R": {"class": [[0.5]]}}
        >>> summary = summarize_runs({"naive": {"0": run}}, ["class"])
        >>> print(markdown_tables(summary, ["class"]).splitlines()[2])
        | method | ACC | BWT | FWT | F_max | F_first | min-ACC | WC-ACC | NFR | CE | ΔCE | memory (KiB) | exemplars | time (s) | compiles |
    """
    parts = [f"# {title}"] if title else []
    for s in scenarios:
        header = [
            "method",
            *(t for _, t, _ in _MAIN),
            "memory (KiB)",
            "exemplars",
            "time (s)",
            "compiles",
        ]
        rows = []
        for method, e in summary.items():
            m = e["metrics"].get(s, {})
            ex = e["memory"].get("total_exemplars")
            rows.append(
                [
                    method,
                    *(_cell(m.get(k), p) for k, _, p in _MAIN),
                    _kib(e["memory"].get("total")),
                    f"{ex['mean']:.0f}" if ex and ex.get("n") else "-",
                    _cell(e["wall_time_s"], False),
                    _count(e["xla_compilations"]),
                ]
            )
        parts += ["", f"## {s}-incremental", "", _table(header, rows)]
    for s in scenarios:
        header = ["method", *(t for _, t, _ in _CONTINUAL)]
        rows = [
            [m, *(_cell(e["continual"].get(s, {}).get(k), p) for k, _, p in _CONTINUAL)]
            for m, e in summary.items()
        ]
        parts += [
            "",
            f"## Continual evaluation ({s}-incremental, periodic log)",
            "",
            _table(header, rows),
        ]
    if any(e.get("accumulation") for e in summary.values()):
        parts += ["", _ACCUMULATION_TITLE, "", _accumulation_table(summary, scenarios)]
    header = ["method", *(t for _, t, _ in _PLASTICITY)]
    rows = [
        [m, *(_cell(e["plasticity"].get(k), p) for k, _, p in _PLASTICITY)]
        for m, e in summary.items()
    ]
    parts += ["", "## Plasticity (at the last task end)", "", _table(header, rows)]
    return "\n".join(parts).strip() + "\n"


_ACCUMULATION_TITLE = "## Knowledge accumulation (class-IL accuracy on every class of the pool)"


def _accumulation_table(summary: Mapping[str, Any], scenarios: Sequence[str]) -> str:
    """Final and mean pool accuracy, and the curve after a quarter, half, ... of the tasks."""
    s = "class" if "class" in scenarios else scenarios[0]
    lengths = [len(e["accumulation"]) for e in summary.values() if e.get("accumulation")]
    T = max(lengths)
    points = sorted({max(1, round(T * q)) for q in (0.25, 0.5, 0.75)})
    header = ["method", "final", "mean over task ends", *(f"after task {k}" for k in points)]
    rows = []
    for method, e in summary.items():
        m = e["metrics"].get(s, {})
        curve = e.get("accumulation") or []
        rows.append(
            [
                method,
                _cell(m.get("pool_acc"), True),
                _cell(m.get("pool_acc_mean"), True),
                *(_cell(curve[k - 1] if k <= len(curve) else None, True) for k in points),
            ]
        )
    return _table(header, rows)


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes `value` as JSON (NaN and infinities as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_ready(value), indent=1))
    os.replace(tmp, path)


def load_results(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``results.json`` from an experiment directory.

    Raises:
        FileNotFoundError: when the directory holds no ``results.json``.
    """
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no results.json; is this an experiment directory (--out of `run`)?"
        )
    return json.loads(path.read_text())


def compare_table(experiments: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One Markdown table across experiments: a row per (experiment, method).

    Args:
        experiments: ``(name, experiment)`` pairs, the experiment as ``results.json`` holds it.

    Each row shows the primary scenario's (class- when reported, else the first) ACC, BWT,
    F_max, WC-ACC, memory and time.

    Example:
        >>> from cljax.experiments.results import compare_table
        >>> exp = {"benchmark": "b", "scenarios": ["class"], "summary": {"naive": {
        ...     "metrics": {"class": {"acc": {"mean": 0.5, "std": 0.0, "n": 1}}}, "memory": {},
        ...     "wall_time_s": {"mean": 1.0, "std": 0.0, "n": 1}}}}
        >>> print(compare_table([("out", exp)]).splitlines()[-1])
        | out | b | class | naive | 50.0 | - | - | - | - | 1.00 |
    """
    header = [
        "run",
        "benchmark",
        "scenario",
        "method",
        "ACC",
        "BWT",
        "F_max",
        "WC-ACC",
        "memory (KiB)",
        "time (s)",
    ]
    rows = []
    for name, exp in experiments:
        scenarios = exp.get("scenarios") or []
        s = "class" if "class" in scenarios else (scenarios[0] if scenarios else "")
        for method, e in exp.get("summary", {}).items():
            m = e.get("metrics", {}).get(s, {})
            rows.append(
                [
                    name,
                    str(exp.get("benchmark", "")),
                    s,
                    method,
                    *(_cell(m.get(k), True) for k in ("acc", "bwt", "forgetting_max", "wc_acc")),
                    _kib(e.get("memory", {}).get("total")),
                    _cell(e.get("wall_time_s"), False),
                ]
            )
    return _table(header, rows)


# ---------------------------------------------------------------------------------------------
# Continual pre-training (EX-21): upstream and downstream loss.


def loss_curves(result: Mapping[str, Any]) -> dict[str, list]:
    """Upstream and downstream loss at every periodic evaluation of one run (EX-21).

    At an evaluation during task ``k`` (the run's ``log``, on the sub-sampled test sets),
    ``downstream = L[k]`` (the task being trained) and ``upstream = mean_{j<k} L[j]`` (the
    earlier tasks; None during the first task). The random-init point is left out.

    Args:
        result: One run's result (`runner.run`).

    Returns:
        ``{"step", "task", "upstream", "downstream"}``, one entry per evaluation.

    Example:
        >>> from cljax.experiments.results import loss_curves
        >>> log = {"step": [0, 5, 10], "task": [-1, 0, 1], "loss": [[4, 4], [1, 3], [2, 1]]}
        >>> loss_curves({"log": log})["upstream"]
        [None, 2.0]
    """
    log = result["log"]
    out: dict[str, list] = {"step": [], "task": [], "upstream": [], "downstream": []}
    for step, k, loss in zip(log["step"], log["task"], log["loss"], strict=True):
        if k < 0:
            continue
        row = np.asarray([np.nan if v is None else v for v in loss], np.float64)
        out["step"].append(int(step))
        out["task"].append(int(k))
        out["upstream"].append(float(np.mean(row[:k])) if k > 0 else None)
        out["downstream"].append(float(row[k]))
    return out


def loss_over_time(result: Mapping[str, Any]) -> dict[str, float]:
    """Upstream / downstream loss of one run: after the last task and averaged over time (EX-21).

    ``final_upstream = mean_{j<T-1} L[T-1, j]`` and ``final_downstream = L[T-1, T-1]`` from the
    loss matrix (full test sets; NaN with one task); ``upstream_mean`` and ``downstream_mean``
    average `loss_curves` over the evaluations (upstream from the second task on), so a rise
    right after a re-warm counts.

    Example:
        >>> from cljax.experiments.results import loss_over_time
        >>> log = {"step": [5, 10], "task": [0, 1], "loss": [[1, 3], [2, 1]]}
        >>> loss_over_time({"log": log, "loss_matrix": [[1, 3], [2, 1]]})["final_upstream"]
        2.0
    """
    L = np.asarray(result["loss_matrix"], np.float64)
    T = L.shape[0]
    curves = loss_curves(result)
    up = [v for v in curves["upstream"] if v is not None]
    nan = float("nan")
    return {
        "final_upstream": float(np.mean(L[T - 1, : T - 1])) if T > 1 else nan,
        "final_downstream": float(L[T - 1, T - 1]),
        "upstream_mean": float(np.mean(up)) if up else nan,
        "downstream_mean": float(np.mean(curves["downstream"])),
    }


def _setting(exp: Mapping[str, Any], method: str) -> str:
    cfg = (exp.get("config") or {}).get(method) or {}
    sched = cfg.get("schedule") or {}
    text = sched.get("schedule", "constant")
    if sched:
        text += f" (warm-up {sched['warmup_steps']}, min {sched['min_lr_ratio']:g})"
    fraction = (cfg.get("hparams") or {}).get("replay_fraction")
    return text + (f", replay {fraction:g}" if fraction is not None else "")


def loss_table(experiments: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Upstream and downstream loss across experiments (``cljax-experiments compare --losses``).

    One row per (experiment, method): the schedule and replay setting, then the seed mean ± std
    of `loss_over_time` and ``ΔCE`` (`metrics.loss_summary`), in nats per token for ``char-lm``.

    Args:
        experiments: ``(name, experiment)`` pairs, the experiment as ``results.json`` holds it.

    Example:
        >>> from cljax.experiments.results import loss_table
        >>> run = {"log": {"step": [5, 10], "task": [0, 1], "loss": [[1, 3], [2, 1]]},
        ...        "loss_matrix": [[1, 3], [2, 1]], "metrics": {"domain": {"delta_ce": 1.0}}}
        >>> exp = {"scenarios": ["domain"], "runs": {"naive": {"0": run}}}
        >>> print(loss_table([("out", exp)]).splitlines()[-1])
        | out | naive | constant | 2.00 | 1.00 | 1.00 | 2.00 | 1.00 |
    """
    header = [
        "run",
        "method",
        "schedule",
        "upstream (end)",
        "downstream (end)",
        "ΔCE",
        "upstream (mean over time)",
        "downstream (mean over time)",
    ]
    rows = []
    for name, exp in experiments:
        scenarios = exp.get("scenarios") or []
        s = "class" if "class" in scenarios else (scenarios[0] if scenarios else "")
        for method, by_seed in (exp.get("runs") or {}).items():
            per_run = [loss_over_time(r) for r in by_seed.values()]
            cells = [
                _cell(_metrics.aggregate([p[k] for p in per_run]), False)
                for k in ("final_upstream", "final_downstream")
            ]
            cells.append(
                _cell(_metrics.aggregate(_values(by_seed, "metrics", s, "delta_ce")), False)
            )
            cells += [
                _cell(_metrics.aggregate([p[k] for p in per_run]), False)
                for k in ("upstream_mean", "downstream_mean")
            ]
            rows.append([name, method, _setting(exp, method), *cells])
    return _table(header, rows)
