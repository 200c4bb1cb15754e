"""``cljax-experiments`` (and ``python -m cljax.experiments``): run, compare and list experiments.

    cljax-experiments list
    cljax-experiments run split-digits --methods naive,replay --seeds 0,1,2 --out results/split-digits
    cljax-experiments run split-digits --methods naive --devices 8 --resume
    cljax-experiments compare results/split-digits results/permuted-digits
    cljax-experiments run char-lm-cpt --methods naive,replay --set schedule=rewarm_cosine \
        --set warmup_steps=15 --set replay.replay_fraction=0.25 --out results/cpt-rewarm
    cljax-experiments compare --losses results/cpt-constant results/cpt-rewarm

Bad arguments (an unknown benchmark or method, a malformed ``--set``) exit with status 2 and a
message naming the valid choices.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names such as naive,replay")
    return names


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. replay.buffer_size=500), got {text!r}"
        )
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cljax-experiments``."""
    parser = argparse.ArgumentParser(
        prog="cljax-experiments",
        description="Continual-learning experiments with cljax: offline task streams, a method registry, "
        "metrics (ACC, BWT, FWT, forgetting, min-ACC, WC-ACC), checkpoints and plots.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the benchmarks and methods")
    run = sub.add_parser("run", help="run methods x seeds on a benchmark and write the results")
    run.add_argument("benchmark", help="a benchmark name (see `list`)")
    run.add_argument(
        "--methods",
        type=_name_list,
        default=["naive", "replay"],
        help="comma-separated method names (default naive,replay)",
    )
    run.add_argument(
        "--seeds", type=_int_list, default=[0], help="comma-separated seeds (default 0)"
    )
    run.add_argument("--out", default=None, help="output directory (default results/BENCHMARK)")
    run.add_argument(
        "--devices", type=int, default=1, help="devices for data parallelism (sharded jit)"
    )
    run.add_argument(
        "--resume", action="store_true", help="reuse finished runs and continue interrupted ones"
    )
    run.add_argument(
        "--tasks", type=int, default=None, help="number of tasks (benchmark default otherwise)"
    )
    run.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    run.add_argument("--batch-size", type=int, default=None)
    run.add_argument(
        "--eval-every", type=int, default=None, help="steps between periodic evaluations"
    )
    run.add_argument(
        "--eval-subsample",
        type=int,
        default=None,
        help="test examples per task in periodic evaluations",
    )
    run.add_argument("--model", choices=("mlp", "cnn", "tiny_llama"), default=None)
    run.add_argument(
        "--online", action="store_true", default=None, help="one pass over each task (EX-04)"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        type=_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyper-parameter override, e.g. learning_rate=3e-3 or replay.buffer_size=500, or a "
        "run setting: schedule=constant|cosine|rewarm_cosine, warmup_steps=N, min_lr_ratio=R "
        "(repeatable)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-plots", action="store_true", help="no PNG plots")
    compare = sub.add_parser("compare", help="one table across experiment directories")
    compare.add_argument("directories", nargs="+")
    compare.add_argument(
        "--losses",
        action="store_true",
        help="upstream / downstream loss of continual pre-training instead of accuracy (EX-21)",
    )
    return parser


def _list() -> str:
    from cljax.experiments.benchmarks import BENCHMARKS
    from cljax.experiments.methods import METHODS

    width = max(len(n) for n in (*BENCHMARKS, *METHODS)) + 2
    lines = ["Benchmarks:"]
    lines += [f"  {name:<{width}}{b.summary}" for name, b in BENCHMARKS.items()]
    lines += ["", "Methods:"]
    for name, m in METHODS.items():
        hp = ", ".join(f"{k}={v}" for k, v in m.defaults.items())
        lines.append(f"  {name:<{width}}{m.summary}" + (f" [{hp}]" if hp else ""))
    return "\n".join(lines)


def _ensure_host_devices(devices: int) -> None:
    """Asks XLA for `devices` CPU devices when the flag is not set yet (no effect once JAX started)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cljax-experiments``; returns the exit status.

    Example:
        >>> from cljax.experiments.cli import main
        >>> main(["list"])  # doctest: +ELLIPSIS
        Benchmarks:
        ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        print(_list())
        return 0
    if args.command == "compare":
        from cljax.experiments.experiment import compare

        try:
            print(compare(args.directories, losses=args.losses))
        except FileNotFoundError as err:
            parser.error(str(err))
        return 0
    from cljax.experiments.benchmarks import BENCHMARKS
    from cljax.experiments.methods import METHODS

    if args.benchmark not in BENCHMARKS:
        parser.error(f"unknown benchmark {args.benchmark!r}; choose from: {', '.join(BENCHMARKS)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(
            f"unknown method(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(METHODS)}"
        )
    _ensure_host_devices(args.devices)
    from cljax.experiments.experiment import run_experiment

    try:
        run_experiment(
            args.benchmark,
            args.methods,
            args.seeds,
            args.out,
            devices=args.devices,
            resume=args.resume,
            overrides=dict(args.overrides),
            progress=not args.no_progress and sys.stderr.isatty(),
            plots=not args.no_plots,
            num_tasks=args.tasks,
            model=args.model,
            steps_per_task=args.steps,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            eval_subsample=args.eval_subsample,
            online=args.online,
        )
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
