"""The method registry: a name -> `Method` mapping, one entry per continual-learning method.

A `Method` says how to train (an optax chain built from hyper-parameters), which data a step
sees (the current task, the union of the tasks so far, or the current batch plus a replay batch),
what happens at task boundaries (hooks that take and return the whole `TrainState`), which
parameters are evaluated (e.g. an EMA or a merged model) and which state is continual-learning
memory. Adding a method is one entry in `METHODS`; `docs/experiments.md` documents the interface.

The hooks get everything the published methods need:

* `StepContext` (inside the jitted step, traced): the batch, the parameters, the task id, a PRNG
  key, the replay buffer and the loss function, with `StepContext.memory_grads` (A-GEM's
  ``memory_grads=...``) and `StepContext.task_grads` (GEM's ``task_grads=...``). What
  `Method.step_extras` returns is passed to ``tx.update`` as keyword extra arguments.
* `TaskContext` (at task boundaries, on the host): the task's data, the initial parameters
  (anchors), the optimizer, and compiled helpers for per-layer input activations (GPM),
  per-example gradients and the empirical Fisher diagonal (EWC, MAS), fixed-size batches.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cljax
from cljax.experiments import replay as _replay
from cljax.experiments.data import Task

__all__ = [
    "METHODS",
    "Method",
    "ModelFunctions",
    "StepContext",
    "TaskContext",
    "TrainState",
    "check_overrides",
    "get_method",
    "resolve_hparams",
]


class TrainState(NamedTuple):
    """Everything a run carries from step to step; checkpointed after every task."""

    params: Any  # model parameters (a nested dict)
    opt_state: Any  # optimizer state (holds the CL memory of transform-based methods)
    extra: Any  # the method's own state outside the optimizer (merging state), or None
    buffer: _replay.ReplayBuffer | None  # replay buffer, or None
    key: jax.Array  # uint32 PRNG key data, shape (2,)
    step: jax.Array  # int32 optimizer steps taken


class ModelFunctions(NamedTuple):
    """Pure functions of the model, shared by the runner and the hooks.

    The batched functions are compiled; `example_loss` and `example_logits` act on one example
    and are meant to be traced inside other functions (``jax.vmap`` over examples, e.g. a Fisher
    or an importance estimator).
    """

    apply: Callable[[Any, jax.Array], jax.Array]  # (params, x) -> logits
    loss: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # weighted mean loss
    per_example_loss: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (N,)
    per_example_grads: Callable[[Any, jax.Array, jax.Array], Any]  # leaves (N, *shape)
    layer_inputs: Callable[[Any, jax.Array], dict[str, jax.Array]]  # kernel path -> (rows, d_in)
    hidden_activations: Callable[[Any, jax.Array], dict[str, jax.Array]]
    example_loss: Callable[
        [Any, tuple[jax.Array, jax.Array]], jax.Array
    ]  # (params, (x, y)) -> loss
    example_logits: Callable[[Any, Any], jax.Array]  # (params, x or (x, y)) -> logits


class StepContext(NamedTuple):
    """What `Method.step_extras` sees inside the jitted train step (all arrays traced)."""

    params: Any
    x: jax.Array  # the current batch's inputs
    y: jax.Array  # the current batch's labels
    task_id: jax.Array  # int32 scalar
    key: jax.Array  # a PRNG key for this step's extras
    buffer: _replay.ReplayBuffer | None
    loss_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # (params, x, y, w)
    hp: Mapping[str, Any]
    num_tasks: int

    def _need_buffer(self, what: str) -> _replay.ReplayBuffer:
        if self.buffer is None:
            raise ValueError(
                f"StepContext.{what}: the method has no replay buffer; set `buffer='reservoir'` or "
                "'per_task' in its `Method` entry."
            )
        return self.buffer

    def memory_grads(self, size: int | None = None) -> Any:
        """Gradient of the loss on a uniform batch of `size` stored examples (A-GEM's reference).

        Zeros while the buffer is empty. `size` defaults to the batch size.
        """
        buffer = self._need_buffer("memory_grads")
        size = size or self.x.shape[0]
        mx, my, w = _replay.buffer_sample(buffer, self.key, size)
        return jax.grad(self.loss_fn)(self.params, mx, my, w)

    def task_grads(self) -> tuple[Any, jax.Array]:
        """Per-task loss gradients on the whole buffer (GEM's constraints).

        Returns:
            ``(grads, valid)``: a pytree of the parameters' structure with a leading task axis
            ``T``, and ``valid[t]`` True when task ``t`` is a previous task (``t < task_id``) with
            stored examples. Invalid rows are zeros.
        """
        buffer = self._need_buffer("task_grads")
        weights, present = _replay.buffer_task_weights(buffer, self.num_tasks)
        valid = present & (jnp.arange(self.num_tasks) < self.task_id)
        grad = jax.grad(self.loss_fn)
        grads = jax.vmap(lambda w: grad(self.params, buffer.x, buffer.y, w))(weights)
        mask = lambda g: jnp.where(valid.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g))  # noqa: E731
        return jax.tree.map(mask, grads), valid


class TaskContext(NamedTuple):
    """What task-boundary hooks see (on the host, between tasks)."""

    task_id: int
    num_tasks: int
    task: Task  # this task's data (NumPy)
    hp: Mapping[str, Any]
    tx: optax.GradientTransformation  # the method's optimizer (to re-initialize its state)
    initial_params: Any  # the parameters before the first task (theta_0)
    seed: int
    fns: ModelFunctions

    def sample(self, num_examples: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A fixed random subset of this task's training data, always `num_examples` long.

        Drawn without replacement (with replacement only when the task has fewer examples), with
        a generator seeded by (run seed, task id, `seed`): the same subset on a resumed run.
        """
        n = self.task.x_train.shape[0]
        rng = np.random.default_rng([self.seed, self.task_id, seed, 17])
        idx = rng.choice(n, size=num_examples, replace=num_examples > n)
        return self.task.x_train[idx], self.task.y_train[idx]

    def batches(
        self, batch_size: int, num_batches: int, *, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`num_batches` fixed-size batches from this task's training data (one shape: no recompiles)."""
        x, y = self.sample(batch_size * num_batches, seed=seed)
        for i in range(num_batches):
            yield x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]

    def layer_inputs(self, params: Any, num_examples: int | None = None) -> Any:
        """Per-layer input activations on a random subset of this task (GPM's representation).

        Args:
            params: The parameters.
            num_examples: Examples in the subset (default ``hp['activation_examples']`` or 128).

        Returns:
            A tree with the structure of `params`: each weight matrix (kernel) leaf holds its layer
            inputs as ``(rows, d_in)`` (rows = examples, times positions for convolutions and
            sequences; convolution kernels get their im2col patches in the kernel's
            ``(*window, C_in)`` order); every other leaf (biases, norms, embeddings) is None.
        """
        x, _ = self.sample(num_examples or int(self.hp.get("activation_examples", 128)), seed=1)
        flat = self.fns.layer_inputs(params, jnp.asarray(x))
        name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")  # noqa: E731
        return jax.tree_util.tree_map_with_path(lambda path, _: flat.get(name(path)), params)

    def sample_batch(self, num_examples: int, *, seed: int = 0) -> tuple[jax.Array, jax.Array]:
        """`sample` as device arrays ``(x, y)``: a batch tree for per-example estimators."""
        x, y = self.sample(num_examples, seed=seed)
        return jnp.asarray(x), jnp.asarray(y)

    def per_example_grads(self, params: Any, x: Any, y: Any) -> Any:
        """Per-example loss gradients: leaves of shape ``(N, *param_shape)``."""
        return self.fns.per_example_grads(params, jnp.asarray(x), jnp.asarray(y))

    def empirical_fisher(
        self, params: Any, num_examples: int | None = None, *, batch_size: int = 64
    ) -> Any:
        """Diagonal empirical Fisher: the mean over examples of *squared per-example* gradients.

        Computed over `num_examples` examples of this task (default ``hp['fisher_examples']`` or
        256), in batches of `batch_size`; never the square of a mini-batch mean gradient.
        """
        n = num_examples or int(self.hp.get("fisher_examples", 256))
        num_batches = max(1, -(-n // batch_size))
        total = jax.tree.map(jnp.zeros_like, params)
        for x, y in self.batches(batch_size, num_batches, seed=2):
            g = self.per_example_grads(params, x, y)
            total = jax.tree.map(lambda t, gi: t + jnp.sum(jnp.square(gi), axis=0), total, g)
        return jax.tree.map(lambda t: t / (batch_size * num_batches), total)


DataPolicy = Literal["task", "cumulative"]
BufferPolicy = Literal["none", "reservoir", "per_task"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One continual-learning method: an optax chain plus data policy, hooks and memory account.

    Attributes:
        summary: One line for ``cljax-experiments list`` and the docs.
        optimizer: ``hp -> optax.GradientTransformation``; `hp` holds ``learning_rate``,
            ``seed`` and the method's `defaults` (with user overrides).
        defaults: The method's hyper-parameters and their defaults.
        data: ``'task'`` (the current task's data) or ``'cumulative'`` (the union of the tasks
            so far: joint training).
        replay: Whether the loss includes a batch drawn from the replay buffer (ER).
        buffer: ``'none'``, ``'reservoir'`` or ``'per_task'``: keep an episodic memory (its
            capacity is ``hp['buffer_size']``), filled with every training batch.
        init_extra: ``(params, hp) -> extra``: the method's own state outside the optimizer.
        on_task_start: ``(state, ctx) -> state``, called before training task ``ctx.task_id``.
        on_task_end: ``(state, ctx) -> state``, called after it (GPM bases, EWC consolidation,
            merging), before the task-end evaluation.
        step_extras: ``StepContext -> dict`` of keyword extras for ``tx.update`` (traced).
        eval_params: ``(state, hp) -> params`` evaluated (default ``state.params``): an EMA,
            a merged model. Must be jittable (it runs inside the compiled evaluation).
        cl_state_types: Sub-state types of the optimizer state counted as CL memory.
        references: Paper(s).
    """

    summary: str
    optimizer: Callable[[Mapping[str, Any]], optax.GradientTransformation]
    defaults: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    data: DataPolicy = "task"
    replay: bool = False
    buffer: BufferPolicy = "none"
    init_extra: Callable[[Any, Mapping[str, Any]], Any] | None = None
    on_task_start: Callable[[TrainState, TaskContext], TrainState] | None = None
    on_task_end: Callable[[TrainState, TaskContext], TrainState] | None = None
    step_extras: Callable[[StepContext], dict[str, Any]] | None = None
    eval_params: Callable[[TrainState, Mapping[str, Any]], Any] | None = None
    cl_state_types: tuple[type, ...] = ()
    references: str = ""

    def __post_init__(self):
        if self.data not in ("task", "cumulative"):
            raise ValueError(f"Method(data=...) must be 'task' or 'cumulative', got {self.data!r}.")
        if self.buffer not in ("none", "reservoir", "per_task"):
            raise ValueError(
                f"Method(buffer=...) must be 'none', 'reservoir' or 'per_task', got {self.buffer!r}."
            )
        if self.replay and self.buffer == "none":
            raise ValueError(
                "Method(replay=True) needs a buffer: set buffer='reservoir' or 'per_task'."
            )
        object.__setattr__(self, "defaults", types.MappingProxyType(dict(self.defaults)))


# ---------------------------------------------------------------------------------------------
# Registered methods.


def _adam(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    return optax.adam(hp["learning_rate"])


def _magmax_init(params, hp):
    return {"base": params, "tau_max": cljax.magmax_init(params)}


def _magmax_end(state: TrainState, ctx: TaskContext) -> TrainState:
    tau = cljax.task_vector(state.params, state.extra["base"])
    return state._replace(
        extra={**state.extra, "tau_max": cljax.magmax_update(state.extra["tau_max"], tau)}
    )


def _magmax_eval(state: TrainState, hp: Mapping[str, Any]):
    return cljax.apply_task_vector(state.extra["base"], state.extra["tau_max"], hp["merge_scale"])


def _restart_from_base(base_of: Callable[[TrainState], Any]):
    """Starts every task after the first from theta_0 with a fresh optimizer (`restart=True`)."""

    def fn(state: TrainState, ctx: TaskContext) -> TrainState:
        if not ctx.hp["restart"] or ctx.task_id == 0:
            return state
        base = base_of(state)
        return state._replace(params=base, opt_state=ctx.tx.init(base))

    return fn


def _opcm_end(state: TrainState, ctx: TaskContext) -> TrainState:
    return state._replace(extra=cljax.opcm_update(state.extra, state.params))


def _soup_end(state: TrainState, ctx: TaskContext) -> TrainState:
    return state._replace(extra=cljax.uniform_soup_add(state.extra, state.params))


def _soup_eval(state: TrainState, hp: Mapping[str, Any]):
    soup = cljax.uniform_soup_result(state.extra, like=state.params)
    return jax.tree.map(lambda s, p: jnp.where(state.extra.count > 0, s, p), soup, state.params)


def _build_methods() -> dict[str, Method]:
    m: dict[str, Method] = {}
    m["naive"] = Method(
        "Fine-tuning with Adam, task after task (lower bound).", _adam, references="-"
    )
    m["joint"] = Method(
        "Adam on the union of all tasks seen so far (cumulative joint training; upper bound).",
        _adam,
        data="cumulative",
        references="-",
    )
    m["replay"] = Method(
        "Experience replay: each step adds a batch from a reservoir buffer to the loss (ER).",
        _adam,
        defaults={"buffer_size": 200, "replay_batch_size": 0},
        replay=True,
        buffer="reservoir",
        references='Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019',
    )
    m["cautious"] = Method(
        "C-AdamW: Adam masked where it disagrees with the gradient (cljax.cautious_adamw).",
        lambda hp: cljax.cautious_adamw(hp["learning_rate"], weight_decay=hp["weight_decay"]),
        defaults={"weight_decay": 1e-4},
        references='Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", 2024',
    )
    m["cwd"] = Method(
        "AdamW with Cautious Weight Decay (cljax.cwd_adamw).",
        lambda hp: cljax.cwd_adamw(hp["learning_rate"], weight_decay=hp["weight_decay"]),
        defaults={"weight_decay": 0.1},
        references='Chen et al., "Cautious Weight Decay", 2025',
    )
    m["upgd"] = Method(
        "Utility-based perturbed gradient descent (cljax.upgd).",
        lambda hp: cljax.upgd(
            hp["learning_rate"],
            weight_decay=hp["weight_decay"],
            beta_utility=hp["beta_utility"],
            sigma=hp["sigma"],
            seed=hp["seed"],
        ),
        defaults={"learning_rate": 0.01, "weight_decay": 0.0, "beta_utility": 0.999, "sigma": 1e-3},
        references=(
            'Elsayed and Mahmood, "Addressing Loss of Plasticity and Catastrophic Forgetting in '
            'Continual Learning", ICLR 2024'
        ),
    )
    m["ema"] = Method(
        "Momentum weight interpolation: Adam, evaluated with an EMA of the weights (cljax.track_ema).",
        lambda hp: optax.chain(optax.adam(hp["learning_rate"]), cljax.track_ema(hp["decay"])),
        defaults={"decay": 0.99},
        eval_params=lambda s, hp: cljax.ema_params(s.opt_state, s.params),
        cl_state_types=(cljax.EmaState,),
        references=(
            'Stojanovski, Roth and Akata, "Momentum-based Weight Interpolation of Strong Zero-Shot '
            'Models for Continual Learning", 2022'
        ),
    )
    m["lawa"] = Method(
        "Adam, evaluated with the mean of the latest snapshots (cljax.track_lawa).",
        lambda hp: optax.chain(
            optax.adam(hp["learning_rate"]), cljax.track_lawa(hp["capacity"], hp["every"])
        ),
        defaults={"capacity": 5, "every": 10},
        eval_params=lambda s, hp: cljax.lawa_params(s.opt_state, s.params),
        cl_state_types=(cljax.LawaState,),
        references='Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest Weight Averaging", 2022',
    )
    m["swa"] = Method(
        "Adam, evaluated with the running mean of periodic snapshots (cljax.track_swa).",
        lambda hp: optax.chain(optax.adam(hp["learning_rate"]), cljax.track_swa(0, hp["every"])),
        defaults={"every": 10},
        eval_params=lambda s, hp: cljax.swa_params(s.opt_state, s.params),
        cl_state_types=(cljax.SwaState,),
        references='Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018',
    )
    m["average"] = Method(
        "Sequential fine-tuning, evaluated with the mean of the task-end models (EX-22 baseline).",
        _adam,
        init_extra=lambda params, hp: cljax.uniform_soup_init(params),
        on_task_end=_soup_end,
        eval_params=_soup_eval,
        references='Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024',
    )
    m["magmax"] = Method(
        "Sequential fine-tuning + maximum-magnitude merge of the task vectors (cljax.magmax_update).",
        _adam,
        defaults={"merge_scale": 0.5},
        init_extra=_magmax_init,
        on_task_end=_magmax_end,
        eval_params=_magmax_eval,
        references='Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024',
    )
    m["opcm"] = Method(
        "Fine-tuning + orthogonal-projection continual merging of each task's model (cljax.opcm_update).",
        _adam,
        defaults={"alpha": 0.5, "restart": False},
        init_extra=lambda params, hp: cljax.opcm_init(params, alpha=hp["alpha"]),
        on_task_start=_restart_from_base(lambda s: s.extra.base),
        on_task_end=_opcm_end,
        eval_params=lambda s, hp: jax.tree.map(
            lambda merged, p: jnp.where(s.extra.count > 0, merged, p),
            cljax.opcm_params(s.extra),
            s.params,
        ),
        references=(
            'Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to '
            'Scalable Continual Model Merging", NeurIPS 2025'
        ),
    )
    return m


METHODS: Mapping[str, Method] = types.MappingProxyType(_build_methods())
"""Registered methods by name (read-only). Adding a method is one entry in `_build_methods`."""


def get_method(name: str | Method) -> Method:
    """Returns the registered `Method` called `name` (a `Method` passes through).

    Raises:
        ValueError: for an unknown name, listing the registered ones.

    Example:
        >>> from cljax.experiments.methods import get_method
        >>> get_method("replay").buffer
        'reservoir'
    """
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}.")
    return METHODS[name]


def resolve_hparams(
    name: str,
    method: Method,
    *,
    learning_rate: float,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The hyper-parameters of one run of `method`.

    Precedence (later wins): the benchmark's ``learning_rate``, the method's `defaults`, then
    `overrides`: plain keys (``'learning_rate'``) apply to every method that has them, scoped keys
    (``'replay.buffer_size'``) to one method. ``seed`` is the run's seed.

    Plain keys this method lacks are ignored here (another method of the experiment may have
    them; `check_overrides` rejects keys no method has).

    Raises:
        ValueError: when a scoped key names a hyper-parameter this method lacks, or a key sets
            the seed.

    Example:
        >>> from cljax.experiments.methods import get_method, resolve_hparams
        >>> hp = resolve_hparams("replay", get_method("replay"), learning_rate=1e-3, seed=0,
        ...                      overrides={"replay.buffer_size": 50})
        >>> hp["buffer_size"], hp["learning_rate"]
        (50, 0.001)
    """
    hp: dict[str, Any] = {"learning_rate": learning_rate, **method.defaults, "seed": seed}
    for key, value in (overrides or {}).items():
        scope, _, field = key.rpartition(".")
        if scope and scope != name:
            continue
        if field == "seed":
            raise ValueError(
                f"hyper-parameter override {key!r}: the seed is set with --seeds, not --set."
            )
        if field not in hp:
            if scope:
                raise ValueError(
                    f"method {name!r} has no hyper-parameter {field!r}; it takes: "
                    f"{', '.join(k for k in sorted(hp) if k != 'seed')}."
                )
            continue
        hp[field] = value
    return hp


def check_overrides(methods: Mapping[str, Method], overrides: Mapping[str, Any]) -> None:
    """Rejects overrides that no selected method can use.

    Raises:
        ValueError: for a scoped key whose method is not selected, or a plain key that no selected
            method has.

    Example:
        >>> from cljax.experiments.methods import METHODS, check_overrides
        >>> check_overrides({"replay": METHODS["replay"]}, {"buffer_size": 10})
    """
    for key in overrides:
        scope, _, field = key.rpartition(".")
        if scope:
            if scope not in methods:
                raise ValueError(
                    f"hyper-parameter override {key!r} names method {scope!r}, which is not among "
                    f"the methods run ({', '.join(methods)})."
                )
            continue
        known = {"learning_rate"}.union(*(m.defaults for m in methods.values()))
        if field not in known:
            raise ValueError(
                f"hyper-parameter override {key!r}: no selected method has {field!r}; known: "
                f"{', '.join(sorted(known))}."
            )
