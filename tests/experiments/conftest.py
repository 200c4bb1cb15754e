"""Shared fixtures: one small command-line experiment that several test modules inspect."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from types import SimpleNamespace

import pytest

from cljax.experiments.cli import main
from cljax.experiments.runner import make_config

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# Two tasks of five digit classes, 6 steps per task, an evaluation every 3 steps, and periodic
# evaluations on the whole test sets (so one evaluation function serves both).
SMALL = {"num_tasks": 2, "steps_per_task": 6, "eval_every": 3, "eval_subsample": 180}
SMALL_ARGS = ["--tasks", "2", "--steps", "6", "--eval-every", "3", "--eval-subsample", "180"]


def small_config(method: str, **kwargs):
    """The configuration the command-line fixture runs `method` with (seed 0)."""
    return make_config("split-digits", method, **{**SMALL, **kwargs})


@pytest.fixture(scope="session")
def cli_experiment(tmp_path_factory):
    """``cljax-experiments run split-digits --methods naive,replay`` at a tiny budget."""
    out = tmp_path_factory.mktemp("split-digits")
    args = [
        "run",
        "split-digits",
        "--methods",
        "naive,replay",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--no-progress",
        *SMALL_ARGS,
    ]
    if not HAS_MATPLOTLIB:
        args.append("--no-plots")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    return SimpleNamespace(out=out, code=code, stdout=stdout.getvalue())
