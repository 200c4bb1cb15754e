"""The method registry: a name -> `Method` mapping, one entry per continual-learning method.

A `Method` says how to train (an optax chain built from hyper-parameters), which data a step
sees (the current task, the union of the tasks so far, or the current batch plus a replay batch),
what happens at task boundaries (hooks that take and return the whole `TrainState`), which
parameters are evaluated (e.g. an EMA or a merged model) and which state is continual-learning
memory. Adding a method is one entry in `METHODS`; `docs/experiments.md` documents the interface.

The hooks get everything the published methods need:

* `StepContext` (inside the jitted step, traced): the batch, the parameters, the task id, a PRNG
  key, the replay buffer, the loss function and the model's functions (hidden activations for
  continual backprop), with `StepContext.memory_grads` (A-GEM's ``memory_grads=...``) and
  `StepContext.task_grads` (GEM's ``task_grads=...``). What `Method.step_extras` returns is
  passed to ``tx.update`` as keyword extra arguments.
* `TaskContext` (at task boundaries, on the host): the task's data, the initial parameters
  (anchors), the optimizer, and compiled helpers for per-layer input activations (GPM),
  per-example gradients and the empirical Fisher diagonal (EWC, MAS), fixed-size batches.
"""

from __future__ import annotations

import dataclasses
import math
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
    "RUN_SETTINGS",
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
    fns: ModelFunctions | None = None  # the model's functions (``fns.hidden_activations``)

    def _need_buffer(self, what: str) -> _replay.ReplayBuffer:
        if self.buffer is None:
            raise ValueError(
                f"StepContext.{what}: the method has no replay buffer; set `buffer='reservoir'` or "
                "'per_task' in its `Method` entry."
            )
        return self.buffer

    def memory_grads(self, size: int | None = None, *, past_only: bool = False) -> Any:
        """Gradient of the loss on a uniform batch of `size` stored examples (A-GEM's reference).

        Zeros while the buffer is empty. `size` defaults to the batch size. With `past_only`
        the batch is drawn from the examples of earlier tasks only (``task < task_id``, the
        episodic memory of A-GEM), zeros while there are none.
        """
        buffer = self._need_buffer("memory_grads")
        size = size or self.x.shape[0]
        if not past_only:
            mx, my, w = _replay.buffer_sample(buffer, self.key, size)
            return jax.grad(self.loss_fn)(self.params, mx, my, w)
        past = (buffer.task >= 0) & (buffer.task < self.task_id)
        logits = jnp.where(past, 0.0, -jnp.inf)
        idx = jax.random.categorical(self.key, logits, shape=(size,))
        idx = jnp.where(jnp.any(past), idx, 0)
        w = past[idx].astype(jnp.float32)
        return jax.grad(self.loss_fn)(self.params, buffer.x[idx], buffer.y[idx], w)

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


RUN_SETTINGS = ("schedule", "warmup_steps", "min_lr_ratio")
"""Run-level settings given like hyper-parameters (``--set schedule=rewarm_cosine``): the
learning-rate schedule of every method of the run (`runner.learning_rate_schedule`)."""

DataPolicy = Literal["task", "cumulative"]
BufferPolicy = Literal["none", "reservoir", "per_task"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One continual-learning method: an optax chain plus data policy, hooks and memory account.

    Attributes:
        summary: One line for ``cljax-experiments list`` and the docs.
        optimizer: ``hp -> optax.GradientTransformation``; `hp` holds ``learning_rate``,
            ``seed``, the method's `defaults` (with user overrides) and, in a run,
            ``num_tasks`` (the stream's, to size memory that grows with tasks).
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
        task_eval_params: ``(state, hp) -> params`` with a leading task axis ``(T, ...)`` on
            every leaf: task ``t``'s Task-IL accuracy is computed with its own parameters (a
            per-task mask); Class-IL and Domain-IL accuracy, losses and flips use `eval_params`
            (no task identity at test time). Jittable. Default None: one model for everything.
        cl_state_types: Sub-state types of the optimizer state counted as CL memory.
        references: Paper(s).
        schedule_conflict: ``hp -> str | None``: why the method cannot take a learning-rate
            schedule in place of ``hp['learning_rate']`` under `hp` (e.g. it does arithmetic
            with the float), or None when it can. Default None: it can.
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
    task_eval_params: Callable[[TrainState, Mapping[str, Any]], Any] | None = None
    cl_state_types: tuple[type, ...] = ()
    references: str = ""
    schedule_conflict: Callable[[Mapping[str, Any]], str | None] | None = None

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


def _replay_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    fraction = hp["replay_fraction"]
    if fraction is not None and (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float, np.integer, np.floating))
        or not 0.0 <= float(fraction) <= 1.0
    ):
        raise ValueError(
            "method 'replay': hyper-parameter 'replay_fraction' must be None (a separate replay "
            f"batch) or a number in [0, 1], got {fraction!r}."
        )
    return _adam(hp)


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


# ---------------------------------------------------------------------------------------------
# Regularisers, plasticity methods and projections (cljax.transforms.regularizers / orthogonal).
#
# Boundary work runs through module-level jitted functions whose static arguments are the model's
# functions (one object per compiled architecture), so a hook compiles on the first task only.

_F32 = jnp.float32
_FISHER_ESTIMATORS = ("true", "empirical", "max_label")


def _num_tasks(hp: Mapping[str, Any], method: str) -> int:
    if "num_tasks" not in hp:
        raise ValueError(
            f"method {method!r}: its optimizer is sized by the stream's number of tasks, so `hp` "
            "needs 'num_tasks' (the runner sets it)."
        )
    return int(hp["num_tasks"])


def _is_last(ctx: TaskContext) -> bool:
    """No task trains after the last one: boundary work that only protects it is skipped."""
    return ctx.task_id == ctx.num_tasks - 1


def _hook_key(ctx: TaskContext, purpose: int) -> jax.Array:
    """A PRNG key fixed by (run seed, task, purpose): the same on a resumed run."""
    key = jax.random.fold_in(jax.random.key(ctx.seed), ctx.task_id)
    return jax.random.fold_in(key, purpose)


def _chunk(n: int) -> int:
    """Examples per vmapped chunk of an importance estimate (a divisor of `n`, at most 64)."""
    return math.gcd(n, 64)


def _check_choice(method: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"method {method!r}: hyper-parameter {name!r} must be one of "
            f"{', '.join(map(repr, choices))}, got {value!r}."
        )


def _check_examples(method: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"method {method!r}: hyper-parameter {name!r} must be an int >= 1, got {value!r}."
        )
    return int(value)


def _fisher(params, x, y, key, *, example_logits, example_loss, estimator: str, chunk_size: int):
    """Diagonal Fisher of the end-of-task model on ``(x, y)`` (`cljax.fisher_diagonal`)."""
    if estimator == "empirical":
        return cljax.fisher_diagonal(example_loss, params, (x, y), chunk_size=chunk_size)
    if y.ndim == 1:  # one label per example: the logits are (num_classes,)
        return cljax.fisher_diagonal(
            example_logits, params, x, estimator=estimator, key=key, chunk_size=chunk_size
        )
    # Sequences: the Fisher of the per-sequence log-likelihood (mean over positions, as the
    # training loss), with one label per position drawn from the model ('true') or its argmax.
    keys = jax.random.split(key, x.shape[0])

    def nll(p, example):
        xi, ki = example
        logits = example_logits(p, xi).astype(_F32)  # (positions, classes)
        fixed = jax.lax.stop_gradient(logits)
        if estimator == "max_label":
            label = jnp.argmax(fixed, axis=-1)
        else:
            label = jax.random.categorical(ki, fixed, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, label[..., None], axis=-1))

    return cljax.fisher_diagonal(nll, params, (x, keys), chunk_size=chunk_size)


_fisher_jit = jax.jit(
    _fisher, static_argnames=("example_logits", "example_loss", "estimator", "chunk_size")
)


def _ewc_optimizer(online: bool):
    name = "online_ewc" if online else "ewc"

    def build(hp: Mapping[str, Any]) -> optax.GradientTransformation:
        _check_choice(name, "fisher", hp["fisher"], _FISHER_ESTIMATORS)
        _check_examples(name, "fisher_examples", hp["fisher_examples"])
        if online:
            penalty = cljax.ewc(hp["strength"], online=True, decay=hp["decay"])
        else:
            capacity = max(_num_tasks(hp, name) - 1, 1)  # one pair per task that has a successor
            penalty = cljax.ewc(hp["strength"], capacity=capacity)
        return optax.chain(penalty, optax.adam(hp["learning_rate"]))

    return build


def _ewc_end(state: TrainState, ctx: TaskContext) -> TrainState:
    if _is_last(ctx):
        return state
    n = int(ctx.hp["fisher_examples"])
    x, y = ctx.sample_batch(n, seed=4)
    fisher = _fisher_jit(
        state.params,
        x,
        y,
        _hook_key(ctx, 0),
        example_logits=ctx.fns.example_logits,
        example_loss=ctx.fns.example_loss,
        estimator=ctx.hp["fisher"],
        chunk_size=_chunk(n),
    )
    return state._replace(opt_state=cljax.ewc_consolidate(state.opt_state, state.params, fisher))


def _mas_importance(params, x, *, example_logits, chunk_size: int):
    return cljax.mas_importance(example_logits, params, x, chunk_size=chunk_size)


_mas_importance_jit = jax.jit(_mas_importance, static_argnames=("example_logits", "chunk_size"))


def _mas_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_examples("mas", "importance_examples", hp["importance_examples"])
    return optax.chain(cljax.mas(hp["strength"]), optax.adam(hp["learning_rate"]))


def _mas_end(state: TrainState, ctx: TaskContext) -> TrainState:
    if _is_last(ctx):
        return state
    n = int(ctx.hp["importance_examples"])
    x, _ = ctx.sample_batch(n, seed=4)
    omega = _mas_importance_jit(
        state.params, x, example_logits=ctx.fns.example_logits, chunk_size=_chunk(n)
    )
    return state._replace(opt_state=cljax.mas_consolidate(state.opt_state, state.params, omega))


def _si_end(state: TrainState, ctx: TaskContext) -> TrainState:
    if _is_last(ctx):
        return state
    return state._replace(opt_state=cljax.si_consolidate(state.opt_state, state.params))


def _l2_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    # The strength is injected and starts at 0: there is no previous task to anchor to during
    # the first one. `_l2_end` sets it at the first boundary.
    return optax.chain(
        optax.inject_hyperparams(cljax.l2_anchor)(strength=0.0), optax.adam(hp["learning_rate"])
    )


def _l2_end(state: TrainState, ctx: TaskContext) -> TrainState:
    if _is_last(ctx):
        return state
    opt_state = cljax.l2_anchor_consolidate(state.opt_state, state.params)
    inject = cljax.find_state(opt_state, optax.InjectStatefulHyperparamsState)
    old = inject.hyperparams["strength"]
    strength = jnp.full_like(old, ctx.hp["strength"])
    inject = inject._replace(hyperparams={**inject.hyperparams, "strength": strength})
    return state._replace(opt_state=cljax.replace_state(opt_state, inject))


def _kernel_spec(path: str, shape: tuple[int, ...]) -> cljax.MatrixSpec | None:
    """Every weight kernel as a (inputs, outputs) matrix: its last axis is the output.

    Dense kernels ``(d_in, d_out)`` are themselves; convolution kernels ``(*window, C_in,
    C_out)`` flatten their window and input channels into the rows, in the order of
    ``TaskContext.layer_inputs``' patches. Biases, norms and embeddings are not matrices here.
    """
    if not path.endswith("kernel") or len(shape) < 2:
        return None
    return cljax.MatrixSpec(rows=tuple(range(len(shape) - 1)), cols=len(shape) - 1)


def _head_bias_labels(params: Any) -> Any:
    """``'head'`` for the output layer's non-kernel leaves (its bias), ``'body'`` elsewhere."""

    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return "head" if name.startswith("head/") and not name.endswith("kernel") else "body"

    return jax.tree_util.tree_map_with_path(label, params)


def _gpm_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_examples("gpm", "activation_examples", hp["activation_examples"])
    projection = cljax.gpm(None, spec=_kernel_spec, freeze_non_matrix=bool(hp["freeze_non_matrix"]))
    # The reference freezes the shared backbone's 1-D parameters after the first task, never a
    # classifier's: the output bias stays trainable (the head is shared by every task here).
    projection = optax.partition({"body": projection, "head": optax.identity()}, _head_bias_labels)
    return optax.chain(optax.adam(hp["learning_rate"]), projection)


def _gpm_end(state: TrainState, ctx: TaskContext) -> TrainState:
    if _is_last(ctx):
        return state
    acts = ctx.layer_inputs(state.params, int(ctx.hp["activation_examples"]))
    threshold = min(1.0, float(ctx.hp["threshold"] + ctx.hp["threshold_step"] * ctx.task_id))
    return state._replace(opt_state=cljax.gpm_add_task(state.opt_state, acts, threshold))


def _ogd_gradients(params, x, y, *, example_logits):
    return cljax.ogd_output_gradients(example_logits, params, x, y, variant="gtl")


_ogd_gradients_jit = jax.jit(_ogd_gradients, static_argnames=("example_logits",))


def _ogd_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    n = _check_examples("ogd", "examples_per_task", hp["examples_per_task"])
    k = hp["num_components"]
    if k is not None:
        k = _check_examples("ogd", "num_components", k)
    per_task = n if k is None else min(k, n)
    capacity = per_task * max(_num_tasks(hp, "ogd") - 1, 1)
    return optax.chain(optax.adam(hp["learning_rate"]), cljax.ogd(capacity))


def _ogd_start(state: TrainState, ctx: TaskContext) -> TrainState:
    if ctx.task_id == 0 and np.ndim(ctx.task.y_train) != 1:
        raise ValueError(
            "method 'ogd' stores gradients of each example's ground-truth logit, so it needs one "
            f"label per example; this stream's labels have shape {np.shape(ctx.task.y_train)[1:]} "
            "per example (a sequence stream)."
        )
    return state


def _ogd_end(state: TrainState, ctx: TaskContext) -> TrainState:
    if _is_last(ctx):
        return state
    x, y = ctx.sample_batch(int(ctx.hp["examples_per_task"]), seed=5)
    grads = _ogd_gradients_jit(state.params, x, y, example_logits=ctx.fns.example_logits)
    # The runner never reads the old optimizer state again: orthogonalise into its basis in place.
    opt_state = cljax.ogd_add_task(
        state.opt_state, grads, num_components=ctx.hp["num_components"], donate=True
    )
    return state._replace(opt_state=opt_state)


_WHERES = ("gradient", "update")


def _agem_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_choice("agem", "where", hp["where"], _WHERES)
    size = hp["memory_batch_size"]
    if size is not None:
        _check_examples("agem", "memory_batch_size", size)
    return cljax.agem(inner=optax.adam(hp["learning_rate"]), where=hp["where"])


def _gem_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_choice("gem", "where", hp["where"], _WHERES)
    # With where='update' the QP acts on Adam's update, so the margin (a lower bound on the dual
    # variables, in the units of the projected vector) is scaled by the learning rate.
    margin = hp["margin"] if hp["where"] == "gradient" else hp["margin"] * hp["learning_rate"]
    return cljax.gem(
        margin=margin,
        ridge=hp["ridge"],
        inner=optax.adam(hp["learning_rate"]),
        where=hp["where"],
    )


def _osft_start(state: TrainState, ctx: TaskContext) -> TrainState:
    step = ctx.hp["rank_step"]
    step = 1.0 / ctx.num_tasks if step is None else float(step)
    rank = min(1.0, ctx.task_id * step)
    opt_state = cljax.osft_decompose(state.opt_state, state.params, rank, spec=_kernel_spec)
    return state._replace(opt_state=opt_state)


def _osft_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    step = hp["rank_step"]
    if step is not None and not 0.0 <= float(step) <= 1.0:
        raise ValueError(
            f"method 'osft': hyper-parameter 'rank_step' must be in [0, 1] or None, got {step!r}."
        )
    return optax.chain(optax.adam(hp["learning_rate"]), cljax.osft(None, spec=_kernel_spec))


def _shrink_perturb(params, key, shrink, noise_scale):
    return cljax.shrink_perturb(params, key, shrink=shrink, noise_scale=noise_scale)


_shrink_perturb_jit = jax.jit(_shrink_perturb)


def _shrink_perturb_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    if not 0.0 <= float(hp["shrink"]) <= 1.0:
        raise ValueError(
            f"method 'shrink_perturb': hyper-parameter 'shrink' must be in [0, 1], got {hp['shrink']!r}."
        )
    if not float(hp["noise_scale"]) >= 0.0:
        raise ValueError(
            f"method 'shrink_perturb': hyper-parameter 'noise_scale' must be >= 0, got {hp['noise_scale']!r}."
        )
    return optax.adam(hp["learning_rate"])


def _shrink_perturb_start(state: TrainState, ctx: TaskContext) -> TrainState:
    # Before the first task the call is the identity (shrink 1, no noise: exactly θ), made so
    # that the boundary function compiles on the first task like every other hook.
    first = ctx.task_id == 0
    params = _shrink_perturb_jit(
        state.params,
        _hook_key(ctx, 1),
        jnp.asarray(1.0 if first else ctx.hp["shrink"], _F32),
        jnp.asarray(0.0 if first else ctx.hp["noise_scale"], _F32),
    )
    return state._replace(params=params)


def _cbp_layers(params: Any) -> list:
    """The `CbpLayer`s of the experiments' MLP: every hidden Dense layer and the next one."""
    if not (isinstance(params, Mapping) and set(params) == {"layers", "head"}):
        names = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            "method 'cbp': continual backprop is registered for the MLP (hidden Dense layers "
            f"'layers/<i>' and a 'head'); this model's parameters are {names}. Run it with "
            "--model mlp."
        )
    n = len(params["layers"])
    keys = sorted(params["layers"], key=int)
    names = [f"layers/{k}" for k in keys] + ["head"]
    return [
        cljax.CbpLayer(
            kernel=f"{names[i]}/kernel",
            bias=f"{names[i]}/bias",
            next_kernel=f"{names[i + 1]}/kernel",
            next_bias=f"{names[i + 1]}/bias",
        )
        for i in range(n)
    ]


def _cbp_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
    """`cljax.continual_backprop` around Adam, its layers read from the parameter tree."""

    def make(params):
        return cljax.continual_backprop(
            optax.adam(hp["learning_rate"]),
            _cbp_layers(params),
            replacement_rate=hp["replacement_rate"],
            maturity=int(hp["maturity"]),
            decay=hp["decay"],
            seed=int(hp["seed"]),
        )

    def init_fn(params):
        return make(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("method 'cbp': `update` needs `params`.")
        return make(params).update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cbp_extras(ctx: StepContext) -> dict[str, Any]:
    if ctx.fns is None:
        raise ValueError("method 'cbp': the step context has no model functions (`fns`).")
    hidden = ctx.fns.hidden_activations(ctx.params, ctx.x)
    ordered = sorted(hidden, key=lambda k: int(k.rsplit("/", 1)[-1]))
    return {"activations": [hidden[k] for k in ordered]}


# ---------------------------------------------------------------------------------------------
# Sparse masks and low-rank projections (cljax.transforms.sparse / low_rank). Masks act on the
# weight kernels (`_kernel_spec`'s leaves); biases, norms and embeddings are "the other leaves".


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _kernel_flags(params: Any) -> Any:
    """True at every weight kernel (a matrix under `_kernel_spec`), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: _kernel_spec(_path_name(path), jnp.shape(p)) is not None, params
    )


def _other_flags(params: Any) -> Any:
    return jax.tree.map(lambda k: not k, _kernel_flags(params))


def _kernel_or_other(params: Any) -> Any:
    """HFT's groups: ``'kernel'`` for weight kernels, ``'other'`` for biases, norms, embeddings."""
    return jax.tree.map(lambda k: "kernel" if k else "other", _kernel_flags(params))


def _check_fraction(method: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"method {method!r}: hyper-parameter {name!r} must be in (0, 1], got {value!r}."
        )
    return float(value)


def _edge_popup(weights, scores, xs, ys, learning_rate, *, loss, density: float):
    """Edge-popup on fixed weights: SGD (momentum 0.9) on the scores of ``W * supermask(s)``.

    `scores` has arrays at the kernels and None elsewhere; one step per batch of ``(xs, ys)``.
    Returns the task's masks: the top ``ceil(density * size)`` of ``|s|`` per kernel, all True at
    the other leaves.
    """
    tx = optax.sgd(learning_rate, momentum=0.9)
    is_none = lambda v: v is None  # noqa: E731

    def effective(s):
        masks = cljax.supermask(s, density)
        return jax.tree.map(
            lambda m, w: w if m is None else w * m.astype(w.dtype), masks, weights, is_leaf=is_none
        )

    def step(carry, batch):
        s, opt_state = carry
        x, y = batch
        w = jnp.ones((x.shape[0],), _F32)
        grads = jax.grad(lambda s_: loss(effective(s_), x, y, w))(s)
        updates, opt_state = tx.update(grads, opt_state, s)
        return (optax.apply_updates(s, updates), opt_state), None

    (scores, _), _ = jax.lax.scan(step, (scores, tx.init(scores)), (xs, ys))
    masks = cljax.supermask(scores, density)
    return jax.tree.map(
        lambda m, w: jnp.ones(jnp.shape(w), jnp.bool_) if m is None else m > 0.5,
        masks,
        weights,
        is_leaf=is_none,
    )


def _exclusive_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_fraction("exclusive_masks", "density", hp["density"])
    _check_examples("exclusive_masks", "mask_steps", hp["mask_steps"])
    _check_examples("exclusive_masks", "mask_batch_size", hp["mask_batch_size"])
    return cljax.exclusive_masks(
        optax.adam(hp["learning_rate"]), capacity=_num_tasks(hp, "exclusive_masks")
    )


def _exclusive_begin(opt_state, weights, xs, ys, key, learning_rate, *, loss, density: float):
    """Learns M_t (edge-popup from fresh scores), sets it, and returns ``(W * M_t, opt_state)``."""
    flags = _kernel_flags(weights)
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(key, len(leaves))
    scores = []
    for w, k, is_kernel in zip(leaves, keys, jax.tree.leaves(flags), strict=True):
        bound = 1.0 / math.sqrt(math.prod(w.shape[:-1]))  # edge-popup's Kaiming-uniform scores
        scores.append(jax.random.uniform(k, w.shape, _F32, -bound, bound) if is_kernel else None)
    scores = jax.tree.unflatten(treedef, scores)
    masks = _edge_popup(weights, scores, xs, ys, learning_rate, loss=loss, density=density)
    opt_state = cljax.exclusive_masks_start_task(opt_state, masks)
    params = jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), weights, masks)
    return params, opt_state


_exclusive_begin_jit = jax.jit(_exclusive_begin, static_argnames=("loss", "density"))


def _exclusive_start(state: TrainState, ctx: TaskContext) -> TrainState:
    # Phase 1: the task's supermask M_t, learned by edge-popup on the dense weights W (kept in
    # `extra`); phase 2 (the task's training steps): the network is W * M_t and only the
    # exclusive entries M_t & ~U train (`cljax.exclusive_masks`).
    hp = ctx.hp
    steps, size = int(hp["mask_steps"]), int(hp["mask_batch_size"])
    x, y = ctx.sample(steps * size, seed=6)
    params, opt_state = _exclusive_begin_jit(
        state.opt_state,
        state.extra,
        jnp.asarray(x.reshape((steps, size) + x.shape[1:])),
        jnp.asarray(y.reshape((steps, size) + y.shape[1:])),
        _hook_key(ctx, 3),
        jnp.asarray(hp["mask_learning_rate"], _F32),
        loss=ctx.fns.loss,
        density=float(hp["density"]),
    )
    return state._replace(params=params, opt_state=opt_state)


def _exclusive_finish(opt_state, params, weights):
    """Commits M_t and writes the trained entries back into W: only ``E_t = M_t & ~U`` moved."""
    before = cljax.exclusive_masks_lookup(opt_state, params)
    opt_state = cljax.exclusive_masks_commit_task(opt_state)
    after = cljax.exclusive_masks_lookup(opt_state, params)
    weights = jax.tree.map(
        lambda a, b, p, w: jnp.where(a & ~b, p, w), after, before, params, weights
    )
    return opt_state, weights


_exclusive_finish_jit = jax.jit(_exclusive_finish)


def _exclusive_end(state: TrainState, ctx: TaskContext) -> TrainState:
    opt_state, weights = _exclusive_finish_jit(state.opt_state, state.params, state.extra)
    return state._replace(opt_state=opt_state, extra=weights)


def _exclusive_task_params(opt_state, params, weights, *, num_tasks: int):
    count = cljax.find_state(opt_state, cljax.ExclusiveMasksState).count
    per_task = []
    for j in range(num_tasks):
        mask = cljax.exclusive_masks_lookup(opt_state, weights, j)  # traced count: no range check
        own = jax.tree.map(lambda m, w: jnp.where(m, w, jnp.zeros_like(w)), mask, weights)
        # A task not committed yet (being trained, or to come) is evaluated with the trained
        # parameters.
        per_task.append(jax.tree.map(lambda o, p, j=j: jnp.where(j < count, o, p), own, params))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_task)


_exclusive_task_params_jit = jax.jit(_exclusive_task_params, static_argnames=("num_tasks",))


def _exclusive_eval(state: TrainState, hp: Mapping[str, Any]) -> Any:
    return _exclusive_task_params_jit(
        state.opt_state,
        state.params,
        state.extra,
        num_tasks=_num_tasks(hp, "exclusive_masks"),
    )


def _hft_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    return cljax.hft(
        optax.adam(hp["learning_rate"]),
        fraction=_check_fraction("hft", "fraction", hp["fraction"]),
        groups=_kernel_or_other,
        seed=int(hp["seed"]),
    )


def _hft_start(state: TrainState, ctx: TaskContext) -> TrainState:
    # A new stage per task: a fresh draw of the trained half (the transform's own draw, from a
    # key fixed by run seed and task). The inner state of every leaf is kept ("keep").
    fresh = cljax.hft(
        optax.identity(),
        fraction=float(ctx.hp["fraction"]),
        groups=_kernel_or_other,
        seed=_hook_key(ctx, 2),
    ).init(state.params)
    old = cljax.find_state(state.opt_state, cljax.HftState)
    new = old._replace(key=fresh.key, selected=fresh.selected)
    return state._replace(opt_state=cljax.replace_state(state.opt_state, new))


class _PhaseState(NamedTuple):
    """State of `_dense_then`: which optimizer steps (0: the dense one, 1: the adapter one)."""

    phase: jax.Array  # int32
    dense: Any
    adapter: Any


def _dense_then(
    dense: optax.GradientTransformation, adapter: optax.GradientTransformation
) -> optax.GradientTransformation:
    """Steps `dense` until the phase is set to 1 (a task-boundary hook), then `adapter`."""

    def init_fn(params):
        return _PhaseState(jnp.zeros([], jnp.int32), dense.init(params), adapter.init(params))

    def update_fn(updates, state, params=None):
        def run_dense(_):
            u, new = dense.update(updates, state.dense, params)
            return u, new, state.adapter

        def run_adapter(_):
            u, new = adapter.update(updates, state.adapter, params)
            return u, state.dense, new

        u, d, a = jax.lax.cond(state.phase == 0, run_dense, run_adapter, None)
        return u, _PhaseState(state.phase, d, a)

    return optax.GradientTransformation(init_fn, update_fn)


def _lora_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_examples("lora", "rank", hp["rank"])
    _check_choice("lora", "others", hp["others"], ("frozen", "train"))
    dense_tasks = hp["dense_tasks"]
    if isinstance(dense_tasks, bool) or not isinstance(dense_tasks, int) or dense_tasks < 0:
        raise ValueError(
            f"method 'lora': 'dense_tasks' must be an int >= 0 (tasks trained in full before the "
            f"adapters), got {dense_tasks!r}."
        )
    adapter = cljax.merged_lora(
        optax.adam(hp["learning_rate"]),
        rank=int(hp["rank"]),
        alpha=None if hp["alpha"] is None else float(hp["alpha"]),
        others=hp["others"],
        seed=int(hp["seed"]),
    )
    if dense_tasks == 0:
        return adapter
    return _dense_then(optax.adam(hp["learning_rate"]), adapter)


def _lora_start(state: TrainState, ctx: TaskContext) -> TrainState:
    # Tasks before `dense_tasks` train every weight (the "pre-trained" model); from then on each
    # task trains a new adapter, the previous one being already in the weights (merged), with a
    # fresh Adam state (EX-17's merge-and-reset after every task).
    dense_tasks = int(ctx.hp["dense_tasks"])
    if ctx.task_id < max(dense_tasks, 1):
        return state
    opt_state = state.opt_state
    if ctx.task_id == dense_tasks:
        phase = cljax.find_state(opt_state, _PhaseState)
        opt_state = cljax.replace_state(opt_state, phase._replace(phase=jnp.ones_like(phase.phase)))
    return state._replace(opt_state=cljax.merged_lora_reset(opt_state))


def _lisa_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_examples("lisa", "num_active", hp["num_active"])
    _check_examples("lisa", "interval", hp["interval"])
    tx = cljax.lisa(
        optax.adam(hp["learning_rate"]),
        layer_list="blocks",
        num_active=int(hp["num_active"]),
        interval=int(hp["interval"]),
        seed=int(hp["seed"]),
    )

    def init_fn(params):
        # `lisa` trains every leaf of a model without the layer list: refuse such a model.
        if not isinstance(params, Mapping) or not params.get("blocks"):
            raise ValueError(
                "method 'lisa' samples blocks of a model whose parameters hold a list of "
                "identically shaped blocks under 'blocks' (tiny_llama); this model has none "
                "(the MLP's and the CNN's layers differ in shape)."
            )
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def _spu_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_fraction("spu", "density", hp["density"])
    _check_fraction("spu", "score_fraction", hp["score_fraction"])
    _check_examples("spu", "score_batch_size", hp["score_batch_size"])
    return cljax.spu(
        optax.adam(hp["learning_rate"]), targets=_kernel_flags, train_fully=_other_flags
    )


def _logit_norm_grads(params, x, *, apply):
    """Gradient of ``sum_i ||f(x_i)||^2`` over a batch: SPU's label-free importance term."""
    return jax.grad(lambda p: jnp.sum(jnp.square(apply(p, x).astype(_F32))))(params)


_logit_norm_grads_jit = jax.jit(_logit_norm_grads, static_argnames=("apply",))


def _spu_start(state: TrainState, ctx: TaskContext) -> TrainState:
    # The importance of the model about to train, summed (signed) over `score_fraction` of the
    # task's training set in fixed-size batches, then the top `density` of |A| per kernel.
    size = int(ctx.hp["score_batch_size"])
    n = len(ctx.task.x_train)
    num_batches = max(1, round(float(ctx.hp["score_fraction"]) * n / size))
    importance = None
    for x, _ in ctx.batches(size, num_batches, seed=7):
        grads = _logit_norm_grads_jit(state.params, jnp.asarray(x), apply=ctx.fns.apply)
        importance = cljax.spu_accumulate(importance, grads)
    opt_state = cljax.spu_set_task(state.opt_state, importance, density=float(ctx.hp["density"]))
    return state._replace(opt_state=opt_state)


def _galore_optimizer(hp: Mapping[str, Any]) -> optax.GradientTransformation:
    _check_examples("galore", "rank", hp["rank"])
    _check_examples("galore", "refresh_every", hp["refresh_every"])

    def kernels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, p: _kernel_spec(_path_name(path), jnp.shape(p)), params
        )

    return cljax.galore_adamw(
        hp["learning_rate"],
        rank=int(hp["rank"]),
        refresh_every=int(hp["refresh_every"]),
        scale=hp["scale"],
        matrix_spec=kernels,
    )


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
        "Experience replay: each step adds a batch from a reservoir buffer to the loss (ER); "
        "with replay_fraction, that share of each batch is replaced by earlier tasks' examples.",
        _replay_optimizer,
        defaults={"buffer_size": 200, "replay_batch_size": 0, "replay_fraction": None},
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
    # Anchored regularisers (cljax.transforms.regularizers). Each penalty sits first in the chain
    # (the coupled form: the same as adding it to the loss) in front of Adam; the boundary work
    # after the last task is skipped (nothing trains after it).
    fisher_defaults = {"fisher": "true", "fisher_examples": 256}
    m["ewc"] = Method(
        "EWC, separate mode: one (anchor, true-Fisher) pair per task, penalties summed (cljax.ewc).",
        _ewc_optimizer(online=False),
        defaults={"strength": 100.0, **fisher_defaults},
        on_task_end=_ewc_end,
        cl_state_types=(cljax.EwcState,),
        references=(
            'Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017'
        ),
    )
    m["online_ewc"] = Method(
        "Online EWC: one anchor at the last task end, Fisher accumulated F <- decay*F + F_new.",
        _ewc_optimizer(online=True),
        defaults={"strength": 100.0, "decay": 1.0, **fisher_defaults},
        on_task_end=_ewc_end,
        cl_state_types=(cljax.EwcState,),
        references=(
            'Schwarz et al., "Progress & Compress: A scalable framework for continual learning", '
            "ICML 2018"
        ),
    )
    m["si"] = Method(
        "Synaptic Intelligence around Adam: path-integral importance, quadratic penalty (cljax.si).",
        lambda hp: cljax.si(
            optax.adam(hp["learning_rate"]), strength=hp["strength"], damping=hp["damping"]
        ),
        defaults={"strength": 10.0, "damping": 0.1},
        on_task_end=_si_end,
        cl_state_types=(cljax.SiState,),
        references=(
            'Zenke, Poole and Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017'
        ),
    )
    m["mas"] = Method(
        "MAS: label-free output-sensitivity importance, accumulated over tasks (cljax.mas).",
        _mas_optimizer,
        defaults={"strength": 0.1, "importance_examples": 256},
        on_task_end=_mas_end,
        cl_state_types=(cljax.MasState,),
        references=(
            'Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018'
        ),
    )
    m["l2"] = Method(
        "L2 toward the parameters at the end of the previous task (cljax.l2_anchor).",
        _l2_optimizer,
        defaults={"strength": 0.1},
        on_task_end=_l2_end,
        cl_state_types=(cljax.L2AnchorState,),
        references=(
            'Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", 2023; Li, '
            'Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with '
            'Convolutional Networks", ICML 2018'
        ),
    )
    # Orthogonal projections (cljax.transforms.orthogonal). The projection acts on Adam's final
    # update (placed after it, or Adam as `inner` with where='update'), the form that keeps the
    # constraint for an adaptive optimizer; the papers use plain SGD.
    m["gpm"] = Method(
        "GPM: Adam's update projected off each kernel's stored input subspace (cljax.gpm).",
        _gpm_optimizer,
        defaults={
            "threshold": 0.97,
            "threshold_step": 0.003,
            "activation_examples": 256,
            "freeze_non_matrix": True,
        },
        on_task_end=_gpm_end,
        cl_state_types=(cljax.GpmState,),
        references=(
            'Saha, Garg and Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021'
        ),
    )
    m["ogd"] = Method(
        "OGD: Adam's update projected off stored ground-truth-logit gradients (cljax.ogd).",
        _ogd_optimizer,
        defaults={"examples_per_task": 64, "num_components": None},
        on_task_start=_ogd_start,
        on_task_end=_ogd_end,
        cl_state_types=(cljax.OgdState,),
        references=(
            'Farajtabar, Azizan, Mott and Li, "Orthogonal Gradient Descent for Continual '
            'Learning", AISTATS 2020'
        ),
    )
    m["agem"] = Method(
        "A-GEM: the gradient projected when it raises the loss on a past-task memory batch, then Adam.",
        _agem_optimizer,
        defaults={"buffer_size": 200, "memory_batch_size": None, "where": "gradient"},
        buffer="reservoir",
        step_extras=lambda ctx: {
            "memory_grads": ctx.memory_grads(ctx.hp["memory_batch_size"], past_only=True)
        },
        references='Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019',
    )
    m["gem"] = Method(
        "GEM: the gradient projected (QP) so no past task's memory loss rises, then Adam (cljax.gem).",
        _gem_optimizer,
        defaults={"buffer_size": 200, "margin": 0.5, "ridge": 1e-3, "where": "gradient"},
        buffer="per_task",
        step_extras=lambda ctx: {"task_grads": ctx.task_grads()[0], "num_tasks": ctx.task_id},
        schedule_conflict=lambda hp: (
            "with where='update' its QP margin is margin x learning_rate, a fixed number"
            if hp["where"] == "update"
            else None
        ),
        references=(
            'Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017'
        ),
    )
    m["osft"] = Method(
        "OSFT: each kernel's top singular subspace frozen before every task (cljax.osft).",
        _osft_optimizer,
        defaults={"rank_step": None},
        on_task_start=_osft_start,
        cl_state_types=(cljax.OsftState,),
        references=(
            'Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for '
            'Continual Learning", 2025'
        ),
    )
    # Plasticity methods.
    m["shrink_perturb"] = Method(
        "Adam; before every task after the first, theta <- shrink*theta + noise (cljax.shrink_perturb).",
        _shrink_perturb_optimizer,
        defaults={"shrink": 0.5, "noise_scale": 0.01},
        on_task_start=_shrink_perturb_start,
        references='Ash and Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020',
    )
    m["cbp"] = Method(
        "Continual backprop around Adam: re-initialises mature low-utility hidden units (MLP).",
        _cbp_optimizer,
        defaults={"replacement_rate": 1e-4, "maturity": 100, "decay": 0.99},
        step_extras=_cbp_extras,
        references='Dohare et al., "Loss of plasticity in deep continual learning", Nature 2024',
    )
    # Sparse masks and low-rank projections.
    m["lisa"] = Method(
        "LISA: Adam on one randomly drawn block per 20-step period plus the embedding, norms and head (cljax.lisa; tiny_llama).",
        _lisa_optimizer,
        defaults={"num_active": 1, "interval": 20},
        references=(
            'Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language '
            'Model Fine-Tuning", NeurIPS 2024'
        ),
    )
    m["exclusive_masks"] = Method(
        "ExSSNeT: per task, an edge-popup supermask; only weights no earlier task uses train.",
        _exclusive_optimizer,
        defaults={
            "density": 0.1,
            "mask_steps": 50,
            "mask_batch_size": 32,
            "mask_learning_rate": 0.1,
        },
        init_extra=lambda params, hp: params,
        on_task_start=_exclusive_start,
        on_task_end=_exclusive_end,
        task_eval_params=_exclusive_eval,
        cl_state_types=(cljax.ExclusiveMasksState,),
        references=(
            'Yadav and Bansal, "Exclusive Supermask Subnetwork Training for Continual Learning", '
            "Findings of ACL 2023"
        ),
    )
    m["hft"] = Method(
        "Half fine-tuning: per task, a random half of the kernels and of the biases trains (cljax.hft).",
        _hft_optimizer,
        defaults={"fraction": 0.5},
        on_task_start=_hft_start,
        references='Hui et al., "HFT: Half Fine-Tuning for Large Language Models", 2024',
    )
    m["spu"] = Method(
        "SPU: per task, the top 10% of each kernel by |sum of logit-norm gradients| trains (cljax.spu).",
        _spu_optimizer,
        defaults={"density": 0.1, "score_fraction": 0.25, "score_batch_size": 32},
        on_task_start=_spu_start,
        cl_state_types=(cljax.SpuState,),
        references=(
            'Zhang et al., "Overcoming Generic Knowledge Loss with Selective Parameter Update", '
            "CVPR 2024"
        ),
    )
    m["lora"] = Method(
        "Incremental LoRA: the first task trains every weight, then a new rank-4 adapter per task, merged after it (cljax.merged_lora).",
        _lora_optimizer,
        defaults={"rank": 4, "alpha": 4.0, "others": "train", "dense_tasks": 1},
        on_task_start=_lora_start,
        references=(
            'Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; '
            '"An Empirical Analysis of Forgetting in Pre-trained Models with Incremental '
            'Low-Rank Updates", 2024'
        ),
    )
    m["galore"] = Method(
        "GaLore-AdamW: Adam on rank-32 projections of each kernel's gradient (cljax.galore_adamw).",
        _galore_optimizer,
        defaults={"learning_rate": 0.01, "rank": 32, "refresh_every": 200, "scale": 0.25},
        references=(
            'Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", '
            "ICML 2024"
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
    """Rejects overrides that no selected method can use (the `RUN_SETTINGS` are always valid).

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
        known = {"learning_rate", *RUN_SETTINGS}.union(*(m.defaults for m in methods.values()))
        if field not in known:
            raise ValueError(
                f"hyper-parameter override {key!r}: no selected method has {field!r}; known: "
                f"{', '.join(sorted(known))}."
            )
