"""The benchmark registry: a name -> `Benchmark` mapping (stream, model and training budget).

Budgets are sized so that the default ``cljax-experiments run split-digits`` finishes in minutes on
a 2-core CPU; every field can be overridden per run (``--steps``, ``--batch-size``, ``--tasks``,
``--model`` ...).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

from cljax.experiments import data as _data
from cljax.experiments.data import Stream

__all__ = ["BENCHMARKS", "Benchmark", "get_benchmark"]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A stream plus the model and budget it is run with.

    Attributes:
        summary: One line for ``cljax-experiments list``.
        stream: ``num_tasks -> Stream`` (None: the stream's default number of tasks).
        model: ``'mlp'``, ``'cnn'`` or ``'tiny_llama'``.
        model_kwargs: Passed to the model (widths, ``spatial=`` for the CNN).
        steps_per_task: Optimizer steps per task (ignored with `online`).
        batch_size: Examples per step.
        eval_every: Steps between periodic evaluations (stability-gap log).
        learning_rate: Default learning rate (a method's own default wins).
        eval_subsample: Test examples per task in periodic evaluations (fixed: the first ones).
        online: One pass over each task's data, each example seen at most once (EX-04).
        probe_size: Training examples of the current task probed for dead units and effective
            rank at each task end (EX-06).
    """

    summary: str
    stream: Callable[[int | None], Stream]
    model: str
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps_per_task: int = 100
    batch_size: int = 32
    eval_every: int = 20
    learning_rate: float = 1e-3
    eval_subsample: int = 100
    online: bool = False
    probe_size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "model_kwargs", types.MappingProxyType(dict(self.model_kwargs)))


def _tasks(builder: Callable[..., Stream], **fixed: Any) -> Callable[[int | None], Stream]:
    def build(num_tasks: int | None) -> Stream:
        return builder(**fixed) if num_tasks is None else builder(num_tasks, **fixed)

    return build


def _char_lm(num_tasks: int | None) -> Stream:
    domains = _data.CHAR_DOMAINS
    if num_tasks is not None and not 1 <= num_tasks <= len(domains):
        raise ValueError(
            f"char-lm has {len(domains)} text domains; `num_tasks` must be 1 to {len(domains)}, got {num_tasks}."
        )
    return _data.char_lm(domains[:num_tasks] if num_tasks else domains)


def _char_lm_cpt(num_tasks: int | None) -> Stream:
    domains = _data.CHAR_DOMAINS[:3]
    if num_tasks is not None and not 1 <= num_tasks <= len(domains):
        raise ValueError(
            f"char-lm-cpt has {len(domains)} text domains; `num_tasks` must be 1 to {len(domains)}, got {num_tasks}."
        )
    return _data.char_lm(
        domains[:num_tasks] if num_tasks else domains, context=32, max_chars=30_000
    )


def _scole(base: str, default_tasks: int, **fixed: Any) -> Callable[[int | None], Stream]:
    def build(num_tasks: int | None) -> Stream:
        return _data.scole(num_tasks or default_tasks, base=base, **fixed)

    return build


_MLP = {"hidden": (128, 128)}
_DIGITS_CNN = {"spatial": (8, 8), "channels": (16, 32), "dense": 64}


def _build() -> dict[str, Benchmark]:
    b: dict[str, Benchmark] = {}
    b["split-digits"] = Benchmark(
        "scikit-learn digits, 5 tasks x 2 classes; Task-IL and Class-IL from one run (MLP)",
        _tasks(_data.split_digits),
        "mlp",
        _MLP,
        steps_per_task=100,
        eval_every=20,
        eval_subsample=100,
    )
    b["split-digits-domain"] = Benchmark(
        "scikit-learn digits, 5 tasks, label = class parity; Domain-IL (MLP)",
        _tasks(_data.split_digits_domain),
        "mlp",
        _MLP,
        steps_per_task=100,
        eval_every=20,
        eval_subsample=100,
    )
    b["permuted-digits"] = Benchmark(
        "scikit-learn digits, 5 pixel permutations; Domain-IL (MLP)",
        _tasks(_data.permuted_digits),
        "mlp",
        _MLP,
        steps_per_task=150,
        eval_every=30,
    )
    b["rotated-digits"] = Benchmark(
        "scikit-learn digits rotated by 0, 36, ..., 144 degrees; Domain-IL (MLP)",
        _tasks(_data.rotated_digits),
        "mlp",
        _MLP,
        steps_per_task=150,
        eval_every=30,
    )
    b["split-mnist1d"] = Benchmark(
        "MNIST-1D (generated), 5 tasks x 2 classes; Task-IL and Class-IL (1-D CNN)",
        _tasks(_data.split_mnist1d),
        "cnn",
        {"channels": (16, 32), "dense": 64, "kernel_size": 5},
        steps_per_task=200,
        eval_every=40,
    )
    b["permuted-mnist1d"] = Benchmark(
        "MNIST-1D (generated), 5 position permutations; Domain-IL (MLP)",
        _tasks(_data.permuted_mnist1d),
        "mlp",
        {"hidden": (256, 256)},
        steps_per_task=200,
        eval_every=40,
    )
    b["char-lm"] = Benchmark(
        "character LM on 4 text domains shipped with Python (continual pre-training, tiny LLaMA)",
        _char_lm,
        "tiny_llama",
        {"dim": 64, "depth": 2, "heads": 4},
        steps_per_task=200,
        eval_every=50,
        learning_rate=3e-3,
        eval_subsample=32,
    )
    b["char-lm-cpt"] = Benchmark(
        "char-lm reduced for the continual pre-training protocol (EX-21): 3 domains, 32-character "
        "windows, a smaller tiny LLaMA; compare schedules and replay in minutes on a CPU",
        _char_lm_cpt,
        "tiny_llama",
        {"dim": 32, "depth": 2, "heads": 2},
        steps_per_task=150,
        eval_every=25,
        learning_rate=3e-3,
        eval_subsample=32,
        probe_size=64,
    )
    b["online-split-digits"] = Benchmark(
        "Split-Digits online: one pass, batch 10, evaluation every 5 steps (EX-04 protocol)",
        _tasks(_data.split_digits),
        "mlp",
        _MLP,
        batch_size=10,
        eval_every=5,
        online=True,
        eval_subsample=100,
    )
    b["plasticity-digits"] = Benchmark(
        "loss-of-plasticity suite: 50 pixel permutations of the digits, short tasks (EX-06)",
        lambda n: _data.permuted_digits(n or 50),
        "mlp",
        _MLP,
        steps_per_task=40,
        batch_size=16,
        eval_every=40,
        eval_subsample=50,
        probe_size=128,
    )
    b["plasticity-mnist1d"] = Benchmark(
        "loss-of-plasticity suite: 50 position permutations of MNIST-1D, short tasks (EX-06)",
        lambda n: _data.permuted_mnist1d(n or 50),
        "mlp",
        {"hidden": (256, 256)},
        steps_per_task=60,
        batch_size=16,
        eval_every=60,
        eval_subsample=50,
        probe_size=128,
    )
    b["scole-digits"] = Benchmark(
        "SCoLe on the digits: 50 short tasks of 2 random classes of 10 (40 examples each), "
        "accuracy on all classes over time (EX-12); Class-IL (MLP)",
        _scole("digits", 50, classes_per_task=2, samples_per_class=40),
        "mlp",
        _MLP,
        steps_per_task=20,
        eval_every=10,
        eval_subsample=50,
        probe_size=64,
    )
    return b


BENCHMARKS: Mapping[str, Benchmark] = types.MappingProxyType(_build())
"""Registered benchmarks by name (read-only)."""


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """Returns the registered `Benchmark` called `name` (a `Benchmark` passes through).

    Raises:
        ValueError: for an unknown name, listing the registered ones.

    Example:
        >>> from cljax.experiments.benchmarks import get_benchmark
        >>> get_benchmark("split-digits").model
        'mlp'
    """
    if isinstance(name, Benchmark):
        return name
    if name not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; registered benchmarks: {', '.join(BENCHMARKS)}."
        )
    return BENCHMARKS[name]
