"""Experiments: several methods x several seeds on one benchmark, with every output written.

`run_experiment` is what ``cljax-experiments run`` calls; `compare` is ``cljax-experiments compare``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cljax.experiments import results as _results
from cljax.experiments import runner as _runner
from cljax.experiments.benchmarks import get_benchmark
from cljax.experiments.methods import Method, check_overrides, get_method

__all__ = ["compare", "run_experiment"]


def _versions() -> dict[str, str]:
    import flax
    import jax
    import numpy
    import optax

    import cljax

    return {
        "cljax": cljax.__version__,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", ""),
    }


def run_experiment(
    benchmark: str,
    methods: Sequence[str | Method],
    seeds: Sequence[int] = (0,),
    out: str | os.PathLike | None = None,
    *,
    devices: int = 1,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    plots: bool = True,
    verbose: bool = True,
    num_tasks: int | None = None,
    model: str | None = None,
    steps_per_task: int | None = None,
    batch_size: int | None = None,
    eval_every: int | None = None,
    eval_subsample: int | None = None,
    online: bool | None = None,
) -> dict[str, Any]:
    """Runs every method with every seed on a benchmark and writes the results to `out`.

    Outputs in `out` (default ``results/<benchmark>``): ``results.json`` (every number and the
    full configuration), ``results.md`` (the tables, printed too when `verbose`),
    ``runs/<method>_seed<k>.json``, ``checkpoints/`` (after every task) and PNG plots
    (``heatmap_<method>_<scenario>.png``, ``curves_<method>.png``, ``acc_vs_memory.png``, and
    ``accumulation.png`` for a stream with a pool test set such as SCoLe's).

    Args:
        benchmark: A registered benchmark (``cljax-experiments list``).
        methods: Registered method names, or `Method` objects (named ``custom``, ``custom1``...).
        seeds: Seeds; each (method, seed) is one run.
        out: Output directory.
        devices: Devices for data parallelism.
        resume: Reuse finished runs and continue interrupted ones from their last checkpoint.
        overrides: Hyper-parameter overrides (``{'replay.buffer_size': 500}``).
        progress: Progress bars (tqdm).
        plots: Write the PNG plots (needs matplotlib).
        verbose: Print a line per run and the tables.
        num_tasks, model, steps_per_task, batch_size, eval_every, eval_subsample, online:
            Override the benchmark's settings.

    Returns:
        The experiment: what ``results.json`` holds.

    Raises:
        ValueError: for an unknown benchmark or method, an override no method takes, bad sizes,
            or a resume whose checkpoints were made with other settings.
    """
    bench = get_benchmark(benchmark)
    if not methods:
        raise ValueError("run_experiment: `methods` is empty; pass at least one method.")
    specs: dict[str, Method] = {}
    for i, m in enumerate(methods):
        name = m if isinstance(m, str) else f"custom{i or ''}"
        specs[name] = get_method(m)
    if not seeds:
        raise ValueError("run_experiment: `seeds` is empty; pass at least one seed.")
    check_overrides(specs, overrides or {})
    out = Path(out) if out is not None else Path("results") / benchmark
    budget = dict(
        num_tasks=num_tasks,
        model=model,
        steps_per_task=steps_per_task,
        batch_size=batch_size,
        eval_every=eval_every,
        eval_subsample=eval_subsample,
        online=online,
        devices=devices,
    )
    configs = {
        (name, seed): _runner.make_config(
            benchmark, name, seed=seed, overrides=overrides, method_spec=spec, **budget
        )
        for name, spec in specs.items()
        for seed in seeds
    }
    stream = bench.stream(num_tasks)
    for name, spec in specs.items():  # fail before any run when a method refuses the model
        _runner.preflight(configs[(name, seeds[0])], stream, spec)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {name: {} for name in specs}
    for (name, seed), cfg in configs.items():
        run_file = out / "runs" / f"{name}_seed{seed}.json"
        result = None
        if resume and run_file.is_file():
            saved = json.loads(run_file.read_text())
            if saved.get("complete") and saved.get("config") == cfg.to_json():
                result = saved
        if result is None:
            result = _runner.run(
                cfg,
                stream=stream,
                method_spec=specs[name],
                checkpoint_dir=out / "checkpoints" / f"{name}_seed{seed}",
                resume=resume,
                progress=progress,
            )
            _results.write_json(run_file, result)
        runs[name][str(seed)] = result
        if verbose:
            s = _runner.primary_scenario(stream)
            acc = result["metrics"][s]["acc"]
            pool = result["metrics"][s].get("pool_acc")
            pool_text = "" if pool is None else f", all-class ACC {100 * pool:.1f}%"
            print(
                f"{name} seed {seed}: ACC ({s}-IL) {100 * acc:.1f}%{pool_text}, "
                f"{result['wall_time_s']:.1f} s, {result['compilations']['xla']} XLA compilations",
                flush=True,
            )
    summary = _results.summarize_runs(runs, stream.scenarios)
    experiment = {
        "benchmark": benchmark,
        "description": bench.summary,
        "scenarios": list(stream.scenarios),
        "stream": {
            "name": stream.name,
            "description": stream.description,
            "kind": stream.kind,
            "num_classes": stream.num_classes,
            "input_shape": list(stream.input_shape),
            **(
                {"pool_test": int(len(stream.pool_test[1]))} if stream.pool_test is not None else {}
            ),
            "tasks": [
                {
                    "name": t.name,
                    "classes": list(t.classes),
                    "train": int(len(t.x_train)),
                    "test": int(len(t.x_test)),
                }
                for t in stream.tasks
            ],
        },
        "methods": list(specs),
        "seeds": [int(s) for s in seeds],
        "config": {name: configs[(name, seeds[0])].to_json() for name in specs},
        "command": " ".join(sys.argv),
        "versions": _versions(),
        "summary": summary,
        "runs": runs,
    }
    _results.write_json(out / "results.json", experiment)
    tables = _results.markdown_tables(
        summary, stream.scenarios, title=f"{benchmark}: {bench.summary}"
    )
    (out / "results.md").write_text(tables)
    if verbose:
        print(tables, flush=True)
    if plots:
        _write_plots(out, benchmark, stream, runs, summary)
    return experiment


def _write_plots(out: Path, benchmark: str, stream, runs, summary) -> None:
    try:
        from cljax.experiments import plots as _plots

        primary = _runner.primary_scenario(stream)
        for name, entry in summary.items():
            for s, R in entry["R_mean"].items():
                _plots.plot_accuracy_matrix(
                    R,
                    out / f"heatmap_{name}_{s}.png",
                    title=f"{benchmark} / {name}: {s}-IL R[i, j] (seed mean)",
                )
            first = next(iter(runs[name].values()))
            log = first["log"]
            _plots.plot_curves(
                log["step"],
                log["acc"][primary],
                first["task_ends"],
                out / f"curves_{name}.png",
                title=f"{benchmark} / {name} (seed {next(iter(runs[name]))}): {primary}-IL accuracy per task",
            )
        _plots.plot_acc_vs_memory(
            summary, primary, out / "acc_vs_memory.png", title=f"{benchmark}: ACC vs memory"
        )
        if any(e.get("accumulation") for e in summary.values()):
            _plot_accumulation(
                summary,
                out / "accumulation.png",
                title=f"{benchmark}: accuracy on every class of the pool (seed mean ± std)",
            )
    except ImportError as err:
        warnings.warn(f"no plots written: {err}", stacklevel=2)


def _plot_accumulation(summary: Mapping[str, Any], path: Path, *, title: str) -> None:
    """The knowledge-accumulation curve of every method: pool accuracy after each task."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, entry in summary.items():
        curve = entry.get("accumulation")
        if not curve:
            continue
        mean = 100 * np.asarray([a["mean"] for a in curve], np.float64)
        std = 100 * np.asarray([a["std"] for a in curve], np.float64)
        tasks = np.arange(1, len(curve) + 1)
        ax.plot(tasks, mean, label=name, lw=1.2)
        ax.fill_between(tasks, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on all classes (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(directories: Sequence[str | os.PathLike], *, losses: bool = False) -> str:
    """One Markdown table across experiment directories (``cljax-experiments compare``).

    Args:
        directories: Experiment directories (each with a ``results.json``).
        losses: The upstream / downstream loss table of continual pre-training
            (`results.loss_table`, ``--losses``) instead of the accuracy table.

    Raises:
        FileNotFoundError: when a directory holds no ``results.json``.
    """
    experiments = [(str(d), _results.load_results(d)) for d in directories]
    return _results.loss_table(experiments) if losses else _results.compare_table(experiments)
