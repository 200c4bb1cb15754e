"""The jitted continual-learning runner: train a method on a stream, evaluate, checkpoint, resume.

One run = one method x one seed on one stream. Per task, the host draws the batch indices (from a
generator seeded by the run seed and the task id, so a resumed run draws the same batches),
and a compiled chunk of `eval_every` steps (``lax.scan`` over the steps, train state donated)
trains on them; after each chunk the model is evaluated on a fixed sub-sample of every task's test
set (the stability-gap log). At each task end the method's hook runs, every task is evaluated on
its full test set (a row of the accuracy matrix, for each scenario the stream reports), plasticity
statistics are logged and the whole `TrainState` is checkpointed with orbax. Shapes never change
between tasks, so nothing recompiles; the number of XLA compilations is counted per task.

Data parallelism: with ``devices=N`` the batch axis is sharded over a 1-D mesh of N devices
(sharded ``jit``; the state is replicated and XLA inserts the gradient all-reduce).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cljax
from cljax.experiments import memory as _memory
from cljax.experiments import metrics as _metrics
from cljax.experiments import replay as _replay
from cljax.experiments.benchmarks import Benchmark, get_benchmark
from cljax.experiments.data import Stream
from cljax.experiments.methods import (
    RUN_SETTINGS,
    Method,
    ModelFunctions,
    StepContext,
    TaskContext,
    TrainState,
    get_method,
    resolve_hparams,
)
from cljax.experiments.models import Functional, build_model, functional

__all__ = [
    "SCHEDULES",
    "RunConfig",
    "learning_rate_schedule",
    "make_config",
    "primary_scenario",
    "run",
]

_F32 = jnp.float32
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

SCHEDULES = ("constant", "cosine", "rewarm_cosine")
"""Learning-rate schedules of a run (``--set schedule=...``): ``'constant'`` (the default),
``'cosine'`` (one warm-up + cosine decay over the whole run) and ``'rewarm_cosine'`` (re-warm and
re-decay within every task, EX-21)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one run; stored with its results and checked on resume."""

    benchmark: str
    method: str
    seed: int
    num_tasks: int | None
    model: str
    model_kwargs: Mapping[str, Any]
    steps_per_task: int
    batch_size: int
    eval_every: int
    eval_subsample: int
    online: bool
    probe_size: int
    devices: int
    hparams: Mapping[str, Any]
    schedule: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-ready values (no ``schedule`` entry for a constant learning rate)."""
        out = json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))
        if not out["schedule"]:
            del out["schedule"]
        return out


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {value!r}")


def _check_positive(fn: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{fn}({name}=...) must be an int >= 1, got {value!r}.")


def make_config(
    benchmark: str | Benchmark,
    method: str,
    *,
    seed: int = 0,
    num_tasks: int | None = None,
    model: str | None = None,
    steps_per_task: int | None = None,
    batch_size: int | None = None,
    eval_every: int | None = None,
    eval_subsample: int | None = None,
    online: bool | None = None,
    devices: int = 1,
    overrides: Mapping[str, Any] | None = None,
    method_spec: Method | None = None,
) -> RunConfig:
    """Resolves a benchmark's defaults, the method's hyper-parameters and overrides into a config.

    Args:
        benchmark: A registered benchmark name (or a `Benchmark`).
        method: A registered method name (or the name of `method_spec`).
        seed: Model-initialization and batch-order seed (the data never depends on it).
        num_tasks, model, steps_per_task, batch_size, eval_every, eval_subsample, online:
            Override the benchmark's values when given.
        devices: Devices for data parallelism (the batch size must divide by it).
        overrides: Hyper-parameter overrides, ``{'learning_rate': 3e-3, 'replay.buffer_size': 500}``,
            and the run's learning-rate schedule settings (`methods.RUN_SETTINGS`): ``schedule``
            (one of `SCHEDULES`, default ``'constant'``), ``warmup_steps`` (default a tenth of
            `steps_per_task`) and ``min_lr_ratio`` (``η_min / η_max``, default 0.1); see
            `learning_rate_schedule`.
        method_spec: A `Method` not in the registry, run under the name `method`.

    Returns:
        A `RunConfig`.

    Raises:
        ValueError: for unknown names, non-positive sizes, a batch size that does not divide
            over the devices, an unknown schedule or bad schedule settings.

    Example:
        >>> from cljax.experiments.runner import make_config
        >>> make_config("split-digits", "replay", steps_per_task=10).hparams["buffer_size"]
        200
    """
    bench = get_benchmark(benchmark)
    spec = method_spec or get_method(method)
    overrides = dict(overrides or {})
    settings = {k: overrides.pop(k) for k in RUN_SETTINGS if k in overrides}
    cfg = RunConfig(
        benchmark=benchmark if isinstance(benchmark, str) else "custom",
        method=method,
        seed=int(seed),
        num_tasks=num_tasks,
        model=model or bench.model,
        model_kwargs=dict(bench.model_kwargs) if model in (None, bench.model) else {},
        steps_per_task=steps_per_task or bench.steps_per_task,
        batch_size=batch_size or bench.batch_size,
        eval_every=eval_every or bench.eval_every,
        eval_subsample=eval_subsample or bench.eval_subsample,
        online=bench.online if online is None else bool(online),
        probe_size=bench.probe_size,
        devices=int(devices),
        hparams=resolve_hparams(
            method, spec, learning_rate=bench.learning_rate, seed=int(seed), overrides=overrides
        ),
    )
    cfg = dataclasses.replace(cfg, schedule=_schedule_settings(settings, cfg.steps_per_task))
    _check_positive(
        "make_config",
        steps_per_task=cfg.steps_per_task,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        eval_subsample=cfg.eval_subsample,
        devices=cfg.devices,
    )
    if num_tasks is not None:
        _check_positive("make_config", num_tasks=num_tasks)
    if cfg.batch_size % cfg.devices:
        raise ValueError(
            f"make_config: batch size {cfg.batch_size} does not divide over {cfg.devices} devices; "
            "choose a batch size that is a multiple of --devices."
        )
    return cfg


def _schedule_settings(settings: Mapping[str, Any], steps_per_task: int) -> dict[str, Any]:
    """The normalised schedule settings of a run: ``{}`` for a constant learning rate."""
    fn = "make_config"
    name = settings.get("schedule", "constant")
    if name not in SCHEDULES:
        raise ValueError(
            f"{fn}: unknown learning-rate schedule {name!r}; choose from: {', '.join(SCHEDULES)}."
        )
    if name == "constant":
        extra = sorted(k for k in settings if k != "schedule")
        if extra:
            raise ValueError(
                f"{fn}: {', '.join(extra)} set with a constant learning rate; also set "
                "schedule=cosine or schedule=rewarm_cosine."
            )
        return {}
    warmup = settings.get("warmup_steps")
    warmup = steps_per_task // 10 if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"{fn}: warmup_steps must be an int >= 0, got {warmup!r}.")
    ratio = settings.get("min_lr_ratio", 0.1)
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float, np.integer, np.floating))
        or not 0.0 <= float(ratio) <= 1.0
    ):
        raise ValueError(f"{fn}: min_lr_ratio must be a number in [0, 1], got {ratio!r}.")
    return {"schedule": name, "warmup_steps": int(warmup), "min_lr_ratio": float(ratio)}


def learning_rate_schedule(
    schedule: Mapping[str, Any], peak: float, task_steps: Sequence[int]
) -> optax.Schedule | None:
    """The learning-rate schedule of a run, a function of the run's optimizer step count.

    With ``η_max = peak``, ``η_min = min_lr_ratio · η_max``, ``W = warmup_steps`` and a
    warm-up + cosine shape over ``S`` steps,
    ``f_S(s) = η_max · s / W`` for ``s < W``, then
    ``η_min + (η_max − η_min) · (1 + cos(π (s − W) / (S − W))) / 2`` (``η_min`` from ``s = S``):

    * ``'constant'`` (``schedule == {}``): None; the method gets its float learning rate.
    * ``'cosine'``: ``f_N(t)`` over the whole run, ``N = Σ task_steps`` (training from scratch).
    * ``'rewarm_cosine'``: ``f_{S_k}(t − b_k)`` in task ``k`` (``b_k`` its first step, ``S_k``
      its steps): re-warmed linearly from 0 to ``η_max`` at the start of every task and
      re-decayed to ``η_min`` by its end (`cljax.rewarm_schedule` of one task's schedule when
      every task has the same length; per-task schedules joined at the boundaries otherwise).

    Task boundaries are static, so the schedule never recompiles at a task boundary.

    Args:
        schedule: ``RunConfig.schedule``.
        peak: ``η_max``, the method's ``learning_rate``.
        task_steps: Optimizer steps of every task of the stream.

    Returns:
        An optax schedule, or None for a constant learning rate.

    Raises:
        ValueError: when the warm-up is not shorter than a task (``'rewarm_cosine'``) or the run.

    Example:
        >>> from cljax.experiments.runner import learning_rate_schedule
        >>> settings = {"schedule": "rewarm_cosine", "warmup_steps": 2, "min_lr_ratio": 0.0}
        >>> lr = learning_rate_schedule(settings, 1.0, [6, 6])
        >>> [round(float(lr(t)), 3) for t in (0, 1, 2, 4, 6, 7, 8)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0]

    References:
        Gupta et al., "Continual Pre-Training of Large Language Models: How to (re)warm your
        model?", 2023. https://arxiv.org/abs/2308.04014

        Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
        Models", TMLR 2024. https://arxiv.org/abs/2403.08763
    """
    if not schedule:
        return None
    name, warmup = schedule["schedule"], int(schedule["warmup_steps"])
    low = float(schedule["min_lr_ratio"]) * peak
    lengths = [int(n) for n in task_steps]

    def one(total: int, what: str) -> optax.Schedule:
        if warmup >= total:
            raise ValueError(
                f"run: warmup_steps={warmup} must be shorter than {what} ({total} steps) with "
                f"schedule={name!r}; lower --set warmup_steps."
            )
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, low)

    if name == "cosine":
        return one(sum(lengths), "the run")
    boundaries = np.cumsum(lengths)[:-1].tolist()
    if len(set(lengths)) == 1:
        return cljax.rewarm_schedule(one(lengths[0], "a task"), boundaries)
    return optax.join_schedules([one(n, f"task {k}") for k, n in enumerate(lengths)], boundaries)


def primary_scenario(stream: Stream) -> str:
    """The scenario tables lead with: ``'class'`` when the stream reports it, else the first."""
    return "class" if "class" in stream.scenarios else stream.scenarios[0]


# ---------------------------------------------------------------------------------------------
# Compiled functions.


def _per_example_ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(_F32), y)
    return ce.mean(axis=tuple(range(1, ce.ndim))) if ce.ndim > 1 else ce


class _Compiled(NamedTuple):
    """Compiled functions of one model architecture, shared by every run that uses it."""

    graphdef: Any
    loss: Callable  # (params, x, y, w) -> weighted mean loss (traced inside the train step)
    fns: ModelFunctions
    evaluate: Callable  # (params, x, y, mask, class_mask, task_params) -> per-task results


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _build_compiled(f: Functional, graphdef: Any = None) -> _Compiled:
    """The jitted functions of one model."""

    def loss(params, x, y, w):
        ce = _per_example_ce(f.apply(params, x), y)
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

    def per_example_loss(params, x, y):
        return _per_example_ce(f.apply(params, x), y)

    def per_example_grads(params, x, y):
        one = lambda xi, yi: jax.grad(loss)(params, xi[None], yi[None], jnp.ones((1,), _F32))  # noqa: E731
        return jax.vmap(one)(x, y)

    def evaluate(params, x, y, mask, class_mask, task_params=None):
        # `task_params` (leaves ``(T, ...)``): task t's Task-IL accuracy uses its own parameters
        # (a per-task mask); every other number uses `params`.
        def one(args):
            xt, yt, mt, ct, pt = args
            logits = f.apply(params, xt).astype(_F32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yt)
            allowed = ct.reshape((1,) * (logits.ndim - 1) + ct.shape)
            task_logits = logits if pt is None else f.apply(pt, xt).astype(_F32)
            masked = jnp.where(allowed, task_logits, -jnp.inf)
            correct = jnp.argmax(logits, axis=-1) == yt
            correct_task = jnp.argmax(masked, axis=-1) == yt
            m = jnp.broadcast_to(mt.reshape(mt.shape + (1,) * (yt.ndim - 1)), yt.shape).astype(_F32)
            total = jnp.maximum(jnp.sum(m), 1.0)
            return (
                jnp.sum(correct * m) / total,
                jnp.sum(correct_task * m) / total,
                jnp.sum(ce * m) / total,
                correct,
            )

        acc, acc_task, loss_, correct = jax.lax.map(one, (x, y, mask, class_mask, task_params))
        return {"acc": acc, "acc_task": acc_task, "loss": loss_, "correct": correct}

    def example_loss(params, example):
        x, y = example
        return _per_example_ce(f.apply(params, x[None]), y[None])[0]

    def example_logits(params, example):
        x = example[0] if isinstance(example, tuple) else example
        return f.apply(params, x[None])[0]

    fns = ModelFunctions(
        apply=jax.jit(f.apply),
        loss=jax.jit(loss),
        per_example_loss=jax.jit(per_example_loss),
        per_example_grads=jax.jit(per_example_grads),
        layer_inputs=jax.jit(f.layer_inputs),
        hidden_activations=jax.jit(f.hidden_activations),
        example_loss=example_loss,
        example_logits=example_logits,
    )
    return _Compiled(graphdef, loss, fns, jax.jit(evaluate))


def _model_functions(f: Functional) -> tuple[Callable, ModelFunctions]:
    """The weighted loss and the compiled `ModelFunctions` of one model."""
    compiled = _build_compiled(f)
    return compiled.loss, compiled.fns


@functools.lru_cache(maxsize=16)
def _compiled(model: str, model_kwargs: tuple, input_shape: tuple, num_classes: int) -> _Compiled:
    """The compiled functions of an architecture, built once: runs (seeds, methods) share them."""
    net = build_model(model, input_shape, num_classes, seed=0, **dict(model_kwargs))
    return _build_compiled(functional(net), nnx.graphdef(net))


class _Counters:
    """Trace counts of the runner's compiled functions and XLA compilations, per task."""

    def __init__(self):
        self.traces: dict[str, int] = {}
        self.xla = 0

    def trace(self, name: str) -> None:
        self.traces[name] = self.traces.get(name, 0) + 1

    def listener(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if event == _COMPILE_EVENT:
            self.xla += 1


def _is_schedule_state(x: Any) -> bool:
    return isinstance(x, optax.ScaleByScheduleState)


def _schedule_states(opt_state: Any) -> int:
    """How many learning-rate schedule states (`optax.ScaleByScheduleState`) an optimizer has."""
    return sum(map(_is_schedule_state, jax.tree.leaves(opt_state, is_leaf=_is_schedule_state)))


def _sync_schedule(opt_state: Any, step: jax.Array) -> Any:
    """Sets every schedule count to the run's step, also after a hook re-initialised the optimizer."""
    return jax.tree.map(
        lambda s: (
            s._replace(count=jnp.asarray(step, s.count.dtype)) if _is_schedule_state(s) else s
        ),
        opt_state,
        is_leaf=_is_schedule_state,
    )


def _all_task_steps(config: RunConfig, spec: Method, stream: Stream) -> list[int]:
    return [
        _task_steps(config, len(_task_data(stream, t, spec.data)[0]))
        for t in range(stream.num_tasks)
    ]


def _optimizer(
    config: RunConfig, spec: Method, stream: Stream, hp: Mapping[str, Any], params: Any
) -> optax.GradientTransformation:
    """The method's optimizer, with the run's learning-rate schedule in place of its float.

    Raises:
        ValueError: when the method cannot take a schedule (its `Method.schedule_conflict`
            says why, or its optimizer does not apply ``hp['learning_rate']`` through an optax
            learning-rate schedule).
    """
    if not config.schedule:
        return spec.optimizer(hp)
    name = config.schedule["schedule"]
    refuse = f"run: method {config.method!r} cannot take the learning-rate schedule {name!r}"
    reason = spec.schedule_conflict(hp) if spec.schedule_conflict is not None else None
    if reason:
        raise ValueError(f"{refuse}: {reason}. Run it with schedule=constant.")
    peak = hp["learning_rate"]
    if isinstance(peak, bool) or not isinstance(peak, (int, float, np.integer, np.floating)):
        raise ValueError(f"{refuse}: its learning_rate {peak!r} is not a number.")
    lr = learning_rate_schedule(config.schedule, float(peak), _all_task_steps(config, spec, stream))
    tx = spec.optimizer({**hp, "learning_rate": lr})
    before = _schedule_states(jax.eval_shape(spec.optimizer(hp).init, params))
    after = _schedule_states(jax.eval_shape(tx.init, params))
    if before or not after:
        raise ValueError(
            f"{refuse}: its optimizer does not scale by hp['learning_rate'] through one optax "
            "learning-rate schedule (optax.scale_by_learning_rate). Run it with schedule=constant."
        )
    return tx


def _make_train_chunk(
    loss_fn,
    tx,
    spec: Method,
    hp,
    num_tasks,
    replay_size,
    counters,
    repl,
    fns=None,
    *,
    scheduled=False,
):
    fraction = hp.get("replay_fraction") if spec.replay else None

    def step(carry: TrainState, inputs):
        x, y, ok, task_id = inputs
        key = jax.random.wrap_key_data(carry.key)
        key, k_memory, k_add, k_extra = jax.random.split(key, 4)
        w = jnp.ones((x.shape[0],), _F32)
        xl, yl, wl = x, y, w
        if spec.replay and fraction is not None:  # a share of the batch replaced (EX-21)
            xl, yl, _ = _replay.buffer_mix(carry.buffer, k_memory, x, y, task_id, fraction)
        elif spec.replay:
            mx, my, mw = _replay.buffer_sample(carry.buffer, k_memory, replay_size)
            xl = jnp.concatenate([x, mx.astype(x.dtype)])
            yl = jnp.concatenate([y, my.astype(y.dtype)])
            wl = jnp.concatenate([w, mw])
        loss, grads = jax.value_and_grad(loss_fn)(carry.params, xl, yl, wl)
        extras: dict[str, Any] = {}
        if spec.step_extras is not None:
            ctx = StepContext(
                carry.params, x, y, task_id, k_extra, carry.buffer, loss_fn, hp, num_tasks, fns
            )
            extras = spec.step_extras(ctx)
        opt_state = _sync_schedule(carry.opt_state, carry.step) if scheduled else carry.opt_state
        updates, opt_state = tx.update(grads, opt_state, carry.params, **extras)
        params = optax.apply_updates(carry.params, updates)
        buffer = carry.buffer
        if spec.buffer != "none":
            buffer = _replay.buffer_add(buffer, x, y, task_id, k_add, policy=spec.buffer)
        new = TrainState(
            params, opt_state, carry.extra, buffer, jax.random.key_data(key), carry.step + 1
        )
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, carry)
        return new, loss

    def chunk(state: TrainState, xs, ys, valid, task_id):
        counters.trace("train_chunk")
        ids = jnp.broadcast_to(task_id, valid.shape)
        return jax.lax.scan(step, state, (xs, ys, valid, ids))

    return jax.jit(chunk, donate_argnums=(0,), out_shardings=repl)


def _mesh(devices: int) -> Mesh:
    available = jax.devices()
    if devices > len(available):
        raise ValueError(
            f"run: --devices {devices} but only {len(available)} device(s) are available; on a CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={devices} before starting."
        )
    return Mesh(np.array(available[:devices]), ("data",))


def _stack_tests(stream: Stream, limit: int | None, devices: int):
    """Test sets stacked to ``(T, N, ...)``: padded (mask False) to a common, device-divisible N."""
    xs = [t.x_test[:limit] if limit else t.x_test for t in stream.tasks]
    ys = [t.y_test[:limit] if limit else t.y_test for t in stream.tasks]
    n = max(len(x) for x in xs)
    n = devices * math.ceil(n / devices)
    T = len(xs)
    x = np.zeros((T, n, *xs[0].shape[1:]), xs[0].dtype)
    y = np.zeros((T, n, *ys[0].shape[1:]), ys[0].dtype)
    mask = np.zeros((T, n), bool)
    for t, (xt, yt) in enumerate(zip(xs, ys, strict=True)):
        x[t, : len(xt)], y[t, : len(yt)], mask[t, : len(xt)] = xt, yt, True
    classes = np.zeros((T, stream.num_classes), bool)
    for t, task in enumerate(stream.tasks):
        classes[t, list(task.classes)] = True
    return x, y, mask, classes


def _stack_pool(stream: Stream, devices: int):
    """The pool's test set as one padded task ``(1, N, ...)``, every output allowed."""
    x_pool, y_pool = stream.pool_test
    n = devices * math.ceil(len(x_pool) / devices)
    x = np.zeros((1, n, *x_pool.shape[1:]), x_pool.dtype)
    y = np.zeros((1, n, *y_pool.shape[1:]), y_pool.dtype)
    mask = np.zeros((1, n), bool)
    x[0, : len(x_pool)], y[0, : len(y_pool)], mask[0, : len(x_pool)] = x_pool, y_pool, True
    return x, y, mask, np.ones((1, stream.num_classes), bool)


def _task_data(stream: Stream, t: int, policy: str) -> tuple[np.ndarray, np.ndarray]:
    if policy == "cumulative":
        tasks = stream.tasks[: t + 1]
        return np.concatenate([k.x_train for k in tasks]), np.concatenate(
            [k.y_train for k in tasks]
        )
    return stream.tasks[t].x_train, stream.tasks[t].y_train


def _batch_indices(n: int, steps: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``(steps, batch)`` indices: consecutive epochs of fresh permutations."""
    epochs = math.ceil(steps * batch / n)
    idx = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return idx[: steps * batch].reshape(steps, batch)


def _task_steps(cfg: RunConfig, n: int) -> int:
    if cfg.online:
        steps = n // cfg.batch_size
        if steps < 1:
            raise ValueError(
                f"run: online mode needs at least one batch per task, but a task has {n} examples < batch size {cfg.batch_size}."
            )
        return steps
    return cfg.steps_per_task


def _to_host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _clean(value: Any) -> Any:
    """JSON-ready copy: arrays to lists, NaN / inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        return _finite_or_none(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _latest_checkpoint(directory: Path) -> tuple[int, Path] | None:
    best = None
    if directory.is_dir():
        for d in directory.iterdir():
            if d.name.startswith("task_") and (d / "record.json").is_file():
                t = int(d.name[len("task_") :])
                if best is None or t > best[0]:
                    best = (t, d)
    return best


def _save_checkpoint(directory: Path, t: int, state: TrainState, record: dict) -> None:
    import orbax.checkpoint as ocp

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"task_{t:03d}"
    if path.exists():
        shutil.rmtree(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((path / "state").absolute(), state)
    checkpointer.wait_until_finished()
    tmp = path / "record.json.tmp"
    tmp.write_text(json.dumps(_clean(record)))
    os.replace(tmp, path / "record.json")
    for old in directory.iterdir():  # keep only the newest task's checkpoint
        if old.name.startswith("task_") and old != path:
            shutil.rmtree(old, ignore_errors=True)


def _restore_checkpoint(path: Path, target: Any) -> tuple[TrainState, dict]:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    state = checkpointer.restore((path / "state").absolute(), target)
    record = json.loads((path / "record.json").read_text())
    return state, record


# ---------------------------------------------------------------------------------------------
# The run.


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def run(
    config: RunConfig,
    *,
    stream: Stream | None = None,
    method_spec: Method | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains one method with one seed on a stream and returns every logged number.

    Args:
        config: From `make_config`.
        stream: The stream (built from the benchmark when None; pass it to share it across runs).
        method_spec: The `Method` when it is not registered under ``config.method``.
        checkpoint_dir: Where to checkpoint after every task (only the newest task is kept).
        resume: Continue from the newest checkpoint in `checkpoint_dir` (its settings must equal
            `config`); the result is identical to an uninterrupted run.
        stop_after: Train only the first `stop_after` tasks (then ``result['complete']`` is False).
        progress: Show a progress bar with the live loss and accuracy (needs tqdm).

    Returns:
        A JSON-ready dict (NaN stored as None): ``config``, ``R`` (scenario -> ``(T, T)``
        accuracy matrix), ``baseline`` (scenario -> random-init accuracies), ``loss_matrix``,
        ``metrics`` (scenario -> `metrics.summarize` plus the mean negative / positive flip rates
        ``nfr`` / ``pfr`` between consecutive task-end models and `metrics.loss_summary` of the
        loss matrix), ``continual`` (scenario ->
        `metrics.continual_metrics` of the periodic log), ``log``, ``train_loss``, ``plasticity``
        (per task end) and ``plasticity_summary``, ``memory`` (`memory.memory_account`),
        ``compute``, ``compilations`` (trace counts and XLA compilations per task),
        ``wall_time_s``, ``complete``. A stream with a ``pool_test`` set (`data.scole`) adds
        ``accumulation``: the accuracy and loss on that set (argmax over every output) at every
        evaluation point (``step``, ``task``, ``acc``, ``loss``; the random-init model first),
        ``task_end_acc`` (one per task end) and ``task_classes``; its primary scenario's
        ``metrics`` gain ``pool_acc`` (at the last task end) and ``pool_acc_mean`` (mean over
        task ends).

    Raises:
        ValueError: for a resume whose checkpoint was made with other settings, too few
            devices, or a learning-rate schedule the method cannot take.

    Example:
        >>> from cljax.experiments.runner import make_config, run
        >>> result = run(make_config("split-digits", "naive", num_tasks=1, steps_per_task=2))
        >>> result["R"]["class"][0][0] > result["baseline"]["class"][0]
        True
    """
    spec = method_spec or get_method(config.method)
    bench = get_benchmark(config.benchmark) if config.benchmark != "custom" else None
    if stream is None:
        if bench is None:
            raise ValueError("run: pass `stream=` for a custom benchmark.")
        stream = bench.stream(config.num_tasks)
    if resume and checkpoint_dir is None:
        raise ValueError("run(resume=True) needs a `checkpoint_dir`.")
    T = stream.num_tasks
    hp = {**config.hparams, "num_tasks": T}  # methods size task-indexed memory by the stream
    counters = _Counters()
    jax.monitoring.register_event_duration_secs_listener(counters.listener)
    try:
        return _run(
            config, spec, stream, T, hp, counters, checkpoint_dir, resume, stop_after, progress
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(counters.listener)


def preflight(config: RunConfig, stream: Stream, method_spec: Method | None = None) -> None:
    """Checks, without training, that a method can run on the config's model and stream.

    Builds the model and the method's optimizer and traces ``tx.init`` (and the method's extra
    state) abstractly, so a method whose optimizer refuses the model (``cbp`` outside the MLP)
    fails before any other run of an experiment spends time. Checks that need the data (a task
    hook's) still run when the method's own run starts.

    Args:
        config: From `make_config`.
        stream: The stream the run would use.
        method_spec: The `Method` when it is not registered under ``config.method``.

    Raises:
        ValueError: what the method raises for this model (its message names the method), or
            a learning-rate schedule the method cannot take.

    Example:
        >>> from cljax.experiments.benchmarks import get_benchmark
        >>> from cljax.experiments.runner import make_config, preflight
        >>> cfg = make_config("split-digits", "naive", num_tasks=1)
        >>> preflight(cfg, get_benchmark("split-digits").stream(1))
    """
    spec = method_spec or get_method(config.method)
    hp = {**config.hparams, "num_tasks": stream.num_tasks}
    net = build_model(
        config.model,
        stream.input_shape,
        stream.num_classes,
        seed=config.seed,
        **config.model_kwargs,
    )
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(nnx.state(net))
    )
    tx = _optimizer(config, spec, stream, hp, params)
    jax.eval_shape(tx.init, params)
    if spec.init_extra is not None:
        jax.eval_shape(lambda p: spec.init_extra(p, hp), params)


def _run(config, spec, stream, T, hp, counters, checkpoint_dir, resume, stop_after, progress):
    t_start = time.perf_counter()
    mesh = _mesh(config.devices)
    repl = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    net = build_model(
        config.model,
        stream.input_shape,
        stream.num_classes,
        seed=config.seed,
        **config.model_kwargs,
    )
    compiled = _compiled(
        config.model, _freeze(config.model_kwargs), tuple(stream.input_shape), stream.num_classes
    )
    if compiled.graphdef != nnx.graphdef(net):  # not the cached architecture: compile for this run
        compiled = _build_compiled(functional(net))
    theta0 = jax.device_put(nnx.to_pure_dict(nnx.state(net)), repl)
    loss_fn, fns = compiled.loss, compiled.fns
    tx = _optimizer(config, spec, stream, hp, theta0)
    replay_size = int(hp.get("replay_batch_size") or config.batch_size)
    if spec.replay and hp.get("replay_fraction") is not None:
        replay_size = 0  # replayed examples replace part of the batch: no extra examples
    train_chunk = _make_train_chunk(
        loss_fn,
        tx,
        spec,
        hp,
        T,
        replay_size,
        counters,
        repl,
        fns=fns,
        scheduled=bool(config.schedule),
    )
    scenarios = stream.scenarios
    primary = primary_scenario(stream)

    def copy_state(s: TrainState) -> TrainState:
        """Fresh, replicated buffers: no array of the state aliases another (they are donated)."""
        return jax.device_put(jax.tree.map(jnp.copy, s), repl)

    def evaluate(s: TrainState, x, y, mask, class_mask) -> dict:
        params = spec.eval_params(s, hp) if spec.eval_params is not None else s.params
        per_task = spec.task_eval_params(s, hp) if spec.task_eval_params is not None else None
        return compiled.evaluate(params, x, y, mask, class_mask, per_task)

    full_host = _stack_tests(stream, None, config.devices)
    full = [jax.device_put(a, batch_sharding) for a in full_host[:3]]
    sub = [
        jax.device_put(a, batch_sharding)
        for a in _stack_tests(stream, config.eval_subsample, config.devices)[:3]
    ]
    classes = jax.device_put(full_host[3], repl)
    full_mask_host = full_host[2]
    pool = None
    if stream.pool_test is not None:  # knowledge accumulation (EX-12): one more evaluation set
        pool_host = _stack_pool(stream, config.devices)
        pool = [jax.device_put(a, batch_sharding) for a in pool_host[:3]]
        pool.append(jax.device_put(pool_host[3], repl))

    def log_pool(s: TrainState, step: int, task: int) -> float | None:
        """Accuracy on the pool's test set, logged; None (and no work) without a pool."""
        if pool is None:
            return None
        params = spec.eval_params(s, hp) if spec.eval_params is not None else s.params
        out = jax.device_get(compiled.evaluate(params, *pool, None))
        acc = float(out["acc"][0])
        a = record["accumulation"]
        a["step"].append(int(step))
        a["task"].append(int(task))
        a["acc"].append(acc)
        a["loss"].append(float(out["loss"][0]))
        return acc

    task0 = stream.tasks[0]
    x_ex, y_ex = task0.x_train[0], task0.y_train[0]
    params = jax.tree.map(jnp.copy, theta0)
    extra = spec.init_extra(jax.tree.map(jnp.copy, theta0), hp) if spec.init_extra else None
    buffer = None
    if spec.buffer != "none":
        buffer = _replay.buffer_init(int(hp["buffer_size"]), x_ex, y_ex, num_tasks=T)
    key = jax.random.key_data(jax.random.key(config.seed))
    state = copy_state(
        TrainState(params, tx.init(params), extra, buffer, key, jnp.zeros([], jnp.int32))
    )
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )

    def scenario_accs(out: dict) -> dict[str, np.ndarray]:
        accs = {}
        for s in scenarios:
            accs[s] = np.asarray(out["acc_task"] if s == "task" else out["acc"], np.float64)
        return accs

    record: dict[str, Any] = {
        "config": config.to_json(),
        "R": {s: [] for s in scenarios},
        "loss_matrix": [],
        "log": {"step": [], "task": [], "acc": {s: [] for s in scenarios}, "loss": []},
        "train_loss": {"step": [], "loss": []},
        "plasticity": {
            "dead_fraction": [],
            "effective_rank": [],
            "weight_magnitude": [],
            "new_task_acc": [],
        },
        "flips": {"nfr": [], "pfr": []},
        "task_ends": [],
        "compilations_per_task": [],
        "wall_time_s": 0.0,
        "steps": 0,
    }
    if pool is not None:
        record["accumulation"] = {
            "step": [],
            "task": [],
            "acc": [],
            "loss": [],
            "task_end_acc": [],
            "task_classes": [list(task.classes) for task in stream.tasks],
        }
    start_task = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    prev_correct = None
    if resume and ckpt is not None and (found := _latest_checkpoint(ckpt)) is not None:
        t_done, path = found
        state, saved = _restore_checkpoint(path, target)
        if saved["config"] != record["config"]:
            diff = sorted(
                k for k in record["config"] if saved["config"].get(k) != record["config"][k]
            )
            raise ValueError(
                f"run(resume=True): the checkpoint in {ckpt} was made with other settings ({', '.join(diff)}); "
                "run without --resume to start afresh, or use another --out."
            )
        record = saved
        start_task = t_done + 1
        state = copy_state(state)
        prev_correct = np.asarray(evaluate(state, *full, classes)["correct"])
    elif ckpt is not None and ckpt.exists():
        shutil.rmtree(ckpt)  # a fresh run: stale checkpoints must not be resumed later

    if start_task == 0:
        out0 = jax.device_get(evaluate(state, *full, classes))
        record["baseline"] = {s: a.tolist() for s, a in scenario_accs(out0).items()}
        record["baseline_loss"] = np.asarray(out0["loss"]).tolist()
        log0 = jax.device_get(evaluate(state, *sub, classes))
        _log_eval(record, 0, -1, scenario_accs(log0), log0["loss"])
        log_pool(state, 0, -1)
        prev_correct = np.asarray(out0["correct"])

    end = T if stop_after is None else min(T, stop_after)
    total_steps = sum(
        _task_steps(config, len(_task_data(stream, t, spec.data)[0]))
        for t in range(start_task, end)
    )
    bar = _progress(total_steps, f"{config.method} seed {config.seed}", progress)
    elapsed_before = float(record["wall_time_s"])
    try:
        for t in range(start_task, end):
            xla_before = counters.xla
            ctx = TaskContext(t, T, stream.tasks[t], hp, tx, theta0, config.seed, fns)
            if spec.on_task_start is not None:
                state = copy_state(spec.on_task_start(state, ctx))
            x_task, y_task = _task_data(stream, t, spec.data)
            steps = _task_steps(config, len(x_task))
            rng = np.random.default_rng([config.seed, t])
            if config.online:
                idx = rng.permutation(len(x_task))[: steps * config.batch_size].reshape(
                    steps, config.batch_size
                )
            else:
                idx = _batch_indices(len(x_task), steps, config.batch_size, rng)
            k = min(config.eval_every, steps)
            num_chunks = math.ceil(steps / k)
            step0 = int(record["steps"])
            for c in range(num_chunks):
                rows = idx[c * k : (c + 1) * k]
                valid = np.zeros(k, bool)
                valid[: len(rows)] = True
                if len(rows) < k:
                    rows = np.concatenate(
                        [rows, np.zeros((k - len(rows), config.batch_size), rows.dtype)]
                    )
                xs = jax.device_put(x_task[rows], batch_sharding)
                ys = jax.device_put(y_task[rows], batch_sharding)
                state, losses = train_chunk(
                    state, xs, ys, jax.device_put(valid, repl), jnp.int32(t)
                )
                done = step0 + min((c + 1) * k, steps)
                chunk_loss = float(np.mean(np.asarray(losses)[valid]))
                record["train_loss"]["step"].append(done)
                record["train_loss"]["loss"].append(chunk_loss)
                live = None
                if c < num_chunks - 1:
                    out = jax.device_get(evaluate(state, *sub, classes))
                    live = _log_eval(record, done, t, scenario_accs(out), out["loss"])
                    log_pool(state, done, t)
                if bar is not None:
                    bar.update(int(valid.sum()))
                    post = {"task": f"{t + 1}/{T}", "loss": f"{chunk_loss:.3f}"}
                    if live is not None:
                        post["acc"] = f"{live[t]:.3f}"
                    bar.set_postfix(post)
            record["steps"] = step0 + steps
            record["task_ends"].append(step0 + steps)
            if spec.on_task_end is not None:
                state = copy_state(spec.on_task_end(state, ctx))
            out = jax.device_get(evaluate(state, *full, classes))
            for s, a in scenario_accs(out).items():
                record["R"][s].append(a.tolist())
            record["loss_matrix"].append(np.asarray(out["loss"]).tolist())
            log = jax.device_get(evaluate(state, *sub, classes))
            _log_eval(record, step0 + steps, t, scenario_accs(log), log["loss"])
            pool_acc = log_pool(state, step0 + steps, t)
            if pool_acc is not None:
                record["accumulation"]["task_end_acc"].append(pool_acc)
            correct = np.asarray(out["correct"])  # argmax over all outputs: class- or domain-IL
            if t > 0:
                m = full_mask_host[:t]
                extra_axes = correct.ndim - 2
                mm = np.broadcast_to(m.reshape(m.shape + (1,) * extra_axes), correct[:t].shape)
                nfr, pfr = _metrics.flip_rates(prev_correct[:t][mm], correct[:t][mm])
                record["flips"]["nfr"].append(nfr)
                record["flips"]["pfr"].append(pfr)
            prev_correct = correct
            _log_plasticity(record, state, ctx, fns, stream, config, scenario_accs(out)[primary][t])
            record["compilations_per_task"].append(counters.xla - xla_before)
            record["wall_time_s"] = elapsed_before + time.perf_counter() - t_start
            if ckpt is not None:
                _save_checkpoint(ckpt, t, state, record)
    finally:
        if bar is not None:
            bar.close()
    record["wall_time_s"] = elapsed_before + time.perf_counter() - t_start
    return _result(record, state, spec, stream, config, counters, replay_size, complete=end == T)


def _log_eval(record: dict, step: int, task: int, accs: dict[str, np.ndarray], loss) -> np.ndarray:
    record["log"]["step"].append(int(step))
    record["log"]["task"].append(int(task))
    for s, a in accs.items():
        record["log"]["acc"][s].append(np.asarray(a).tolist())
    record["log"]["loss"].append(np.asarray(loss).tolist())
    return next(iter(accs.values()))


def _log_plasticity(
    record, state, ctx: TaskContext, fns: ModelFunctions, stream: Stream, config: RunConfig, new_acc
):
    x, _ = ctx.sample(config.probe_size, seed=3)
    hidden = jax.device_get(fns.hidden_activations(state.params, jnp.asarray(x)))
    p = record["plasticity"]
    relu = stream.kind == "classification"
    p["dead_fraction"].append(_metrics.dead_unit_fraction(hidden) if relu else None)
    last = list(hidden.values())[-1]
    p["effective_rank"].append(_metrics.effective_rank(np.asarray(last, np.float64)))
    p["weight_magnitude"].append(_metrics.weight_magnitude(jax.device_get(state.params)))
    p["new_task_acc"].append(float(new_acc))


def _result(
    record,
    state,
    spec: Method,
    stream: Stream,
    config: RunConfig,
    counters,
    replay_size,
    *,
    complete,
) -> dict:
    out = dict(record)
    out["complete"] = bool(complete)
    metrics: dict[str, Any] = {}
    continual: dict[str, Any] = {}
    if complete:
        steps = np.asarray(record["log"]["step"])
        flips = record["flips"]
        for s in stream.scenarios:
            m = _metrics.summarize(np.asarray(record["R"][s], np.float64), record["baseline"][s])
            m["nfr"] = float(np.mean(flips["nfr"])) if flips["nfr"] else 0.0
            m.update(_metrics.loss_summary(record["loss_matrix"]))
            m["pfr"] = float(np.mean(flips["pfr"])) if flips["pfr"] else 0.0
            metrics[s] = m
            accs = np.asarray(record["log"]["acc"][s], np.float64)
            continual[s] = _metrics.continual_metrics(steps, accs, record["task_ends"])
        if "accumulation" in record:  # class-IL accuracy on every class of the pool (EX-12)
            curve = record["accumulation"]["task_end_acc"]
            m = metrics[primary_scenario(stream)]
            m["pool_acc"] = float(curve[-1])
            m["pool_acc_mean"] = float(np.mean(curve))
        p = record["plasticity"]
        tenth = max(1, len(p["new_task_acc"]) // 10)
        out["plasticity_summary"] = {
            "new_task_acc_first": float(np.mean(p["new_task_acc"][:tenth])),
            "new_task_acc_last": float(np.mean(p["new_task_acc"][-tenth:])),
            "dead_fraction_last": p["dead_fraction"][-1],
            "effective_rank_last": p["effective_rank"][-1],
            "weight_magnitude_last": p["weight_magnitude"][-1],
        }
    out["metrics"] = metrics
    out["continual"] = continual
    x_ex, y_ex = stream.tasks[0].x_train, stream.tasks[0].y_train
    per_exemplar = _memory.exemplar_bytes(x_ex.shape[1:], x_ex.dtype, y_ex.dtype, y_ex.shape[1:])
    out["memory"] = _memory.memory_account(
        state.params,
        state.opt_state,
        cl_state_types=spec.cl_state_types,
        extra=state.extra,
        buffer=state.buffer,
        bytes_per_exemplar=per_exemplar,
    )
    per_step = config.batch_size + (replay_size if spec.replay else 0)
    out["compute"] = {
        "gradient_steps": int(record["steps"]),
        "examples_per_step": per_step,
        "forward_backward_examples": int(record["steps"]) * per_step,
    }
    out["compilations"] = {
        "traces": dict(counters.traces),
        "xla": counters.xla,
        "xla_per_task": record["compilations_per_task"],
    }
    return _clean(out)
