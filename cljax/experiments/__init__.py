"""Continual-learning experiments: task streams, models, a method registry, a runner and metrics.

Run from the shell::

    cljax-experiments list
    cljax-experiments run split-digits --methods naive,replay --seeds 0,1,2 --out results/split-digits

or from Python with `run_experiment` / `runner.run`. This package is not imported by
``import cljax``; import it explicitly (``import cljax.experiments``).
"""

from cljax.experiments import benchmarks as benchmarks
from cljax.experiments import data as data
from cljax.experiments import experiment as experiment
from cljax.experiments import memory as memory
from cljax.experiments import methods as methods
from cljax.experiments import metrics as metrics
from cljax.experiments import models as models
from cljax.experiments import probes as probes
from cljax.experiments import replay as replay
from cljax.experiments import results as results
from cljax.experiments import runner as runner
from cljax.experiments.benchmarks import BENCHMARKS as BENCHMARKS
from cljax.experiments.benchmarks import Benchmark as Benchmark
from cljax.experiments.experiment import compare as compare
from cljax.experiments.experiment import run_experiment as run_experiment
from cljax.experiments.methods import METHODS as METHODS
from cljax.experiments.methods import Method as Method
from cljax.experiments.metrics import summarize as summarize
from cljax.experiments.runner import make_config as make_config
from cljax.experiments.runner import run as run

__all__ = [
    "BENCHMARKS",
    "METHODS",
    "Benchmark",
    "Method",
    "benchmarks",
    "compare",
    "data",
    "experiment",
    "make_config",
    "memory",
    "methods",
    "metrics",
    "models",
    "probes",
    "replay",
    "results",
    "run",
    "run_experiment",
    "runner",
    "summarize",
]
