"""A fixed-capacity episodic memory (replay buffer) kept as arrays, for use inside a jitted step.

The buffer is a NamedTuple of arrays whose shapes never change, so adding examples and sampling
from it compile once. Two insertion policies:

* ``'reservoir'`` (reservoir sampling, Vitter's algorithm R): after ``n`` examples have been
  offered, every one of them is in the buffer with probability ``capacity / n``. The strong
  experience-replay baseline of Chaudhry et al. (2019).
* ``'per_task'``: the capacity is split evenly over ``num_tasks`` tasks and each task keeps its
  latest examples in a ring (GEM's episodic memory).

Each slot records the task id of its example (``-1`` when empty), so per-task memory batches
(GEM's constraints) and memory gradients (A-GEM) come from the same buffer.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Policy",
    "ReplayBuffer",
    "buffer_add",
    "buffer_init",
    "buffer_mix",
    "buffer_sample",
    "buffer_task_weights",
    "per_task_slots",
    "reservoir_slots",
]

Policy = Literal["reservoir", "per_task"]
_POLICIES = ("reservoir", "per_task")


class ReplayBuffer(NamedTuple):
    """State of a replay buffer of fixed capacity ``C``."""

    x: jax.Array  # (C, *input_shape) stored inputs
    y: jax.Array  # (C, *label_shape) stored labels
    task: jax.Array  # (C,) int32 task id of each slot, -1 when empty
    seen: jax.Array  # int32: examples offered so far (reservoir's n)
    task_seen: jax.Array  # (num_tasks,) int32: examples offered per task


def buffer_init(capacity: int, x_example: Any, y_example: Any, *, num_tasks: int) -> ReplayBuffer:
    """An empty buffer of `capacity` slots shaped like one example.

    Args:
        capacity: Number of slots ``C`` (at least 1). Static.
        x_example, y_example: One input and one label (arrays or `jax.ShapeDtypeStruct`s):
            their shapes and dtypes give the slots'.
        num_tasks: Number of tasks of the stream (sizes the per-task counters). Static.

    Returns:
        A `ReplayBuffer` of zeros with every slot empty.

    Raises:
        ValueError: when `capacity` or `num_tasks` is below 1.

    Example:
        >>> from cljax.experiments.replay import buffer_init
        >>> buf = buffer_init(4, jnp.zeros(3), jnp.zeros((), jnp.int32), num_tasks=2)
        >>> buf.x.shape, int(buf.seen)
        ((4, 3), 0)
    """
    for name, value in (("capacity", capacity), ("num_tasks", num_tasks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"buffer_init({name}=...) must be an int >= 1, got {value!r}.")

    def slots(a):
        a = a if hasattr(a, "shape") and hasattr(a, "dtype") else jnp.asarray(a)
        return jnp.zeros((capacity, *a.shape), a.dtype)

    return ReplayBuffer(
        x=slots(x_example),
        y=slots(y_example),
        task=jnp.full((capacity,), -1, jnp.int32),
        seen=jnp.zeros([], jnp.int32),
        task_seen=jnp.zeros((num_tasks,), jnp.int32),
    )


def _last_writer_wins(slots: jax.Array, capacity: int) -> jax.Array:
    """Slots with duplicates resolved in batch order (a later example overwrites an earlier one)."""
    b = slots.shape[0]
    later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]
    overwritten = jnp.any((slots[:, None] == slots[None, :]) & later, axis=1)
    return jnp.where(overwritten | (slots >= capacity) | (slots < 0), capacity, slots)


def reservoir_slots(seen: jax.Array, draws: jax.Array, capacity: int) -> jax.Array:
    """Reservoir-sampling slots for a batch, given the random draws.

    Example ``i`` of the batch is the ``n_i = seen + i``-th example offered (0-based). It goes to
    slot ``n_i`` while the buffer fills (``n_i < C``); afterwards to slot ``draws[i]`` when
    ``draws[i] < C``, where ``draws[i]`` is uniform on ``{0, ..., n_i}``, and nowhere otherwise.
    The result equals processing the batch one example at a time: when two examples pick one slot
    the later one wins.

    Args:
        seen: Examples offered before this batch.
        draws: ``(B,)`` integers, ``draws[i]`` uniform on ``{0, ..., seen + i}``.
        capacity: ``C``.

    Returns:
        ``(B,)`` int32 slots; ``C`` means "not stored".

    Example:
        >>> from cljax.experiments.replay import reservoir_slots
        >>> reservoir_slots(jnp.int32(1), jnp.array([0, 0, 1]), 2)
        Array([2, 0, 1], dtype=int32)
    """
    n = seen + jnp.arange(draws.shape[0], dtype=jnp.int32)
    slots = jnp.where(n < capacity, n, jnp.where(draws < capacity, draws, capacity)).astype(
        jnp.int32
    )
    return _last_writer_wins(slots, capacity).astype(jnp.int32)


def per_task_slots(
    task_seen: jax.Array, task_id: jax.Array, batch: int, capacity: int, num_tasks: int
) -> jax.Array:
    """Ring slots of a batch from task `task_id` in the task's ``capacity // num_tasks`` slots.

    Example:
        >>> from cljax.experiments.replay import per_task_slots
        >>> per_task_slots(jnp.array([0, 1]), jnp.int32(1), 3, 4, 2)
        Array([4, 2, 3], dtype=int32)
    """
    per = capacity // num_tasks
    if per < 1:
        raise ValueError(
            f"per_task_slots: capacity {capacity} gives no slot to each of {num_tasks} tasks; "
            "raise the buffer size to at least the number of tasks."
        )
    offset = task_seen[task_id] + jnp.arange(batch, dtype=jnp.int32)
    slots = (task_id * per + offset % per).astype(jnp.int32)
    return _last_writer_wins(slots, capacity).astype(jnp.int32)


def buffer_add(
    buffer: ReplayBuffer,
    x: jax.Array,
    y: jax.Array,
    task_id: jax.Array,
    key: jax.Array,
    *,
    policy: Policy = "reservoir",
    valid: jax.Array | None = None,
) -> ReplayBuffer:
    """Offers a batch of examples of task `task_id` to the buffer.

    Args:
        buffer: The buffer.
        x: ``(B, *input_shape)`` inputs.
        y: ``(B, *label_shape)`` labels.
        task_id: int32 scalar task id.
        key: PRNG key (reservoir draws).
        policy: ``'reservoir'`` or ``'per_task'``. Static.
        valid: Optional bool scalar; False leaves the buffer unchanged (padded steps).

    Returns:
        The updated buffer.

    Raises:
        ValueError: for an unknown `policy` or shapes that do not match the slots.

    Example:
        >>> from cljax.experiments.replay import buffer_add, buffer_init
        >>> buf = buffer_init(2, jnp.zeros(1), jnp.zeros((), jnp.int32), num_tasks=1)
        >>> buf = buffer_add(buf, jnp.ones((3, 1)), jnp.ones(3, jnp.int32), jnp.int32(0), jax.random.key(0))
        >>> int(buf.seen), buf.task.tolist()
        (3, [0, 0])
    """
    if policy not in _POLICIES:
        raise ValueError(
            f"buffer_add(policy=...) must be one of {', '.join(_POLICIES)}, got {policy!r}."
        )
    if (
        x.shape[1:] != buffer.x.shape[1:]
        or y.shape[1:] != buffer.y.shape[1:]
        or x.shape[0] != y.shape[0]
    ):
        raise ValueError(
            f"buffer_add: batch shapes x {x.shape}, y {y.shape} do not match the slots "
            f"x {buffer.x.shape[1:]}, y {buffer.y.shape[1:]}."
        )
    capacity = buffer.x.shape[0]
    b = x.shape[0]
    task_id = jnp.asarray(task_id, jnp.int32)
    if policy == "reservoir":
        n = buffer.seen + jnp.arange(b, dtype=jnp.int32)
        draws = jax.random.randint(key, (b,), 0, n + 1, dtype=jnp.int32)
        slots = reservoir_slots(buffer.seen, draws, capacity)
    else:
        slots = per_task_slots(buffer.task_seen, task_id, b, capacity, buffer.task_seen.shape[0])
    if valid is not None:
        slots = jnp.where(valid, slots, capacity)
    inc = jnp.int32(b) if valid is None else jnp.where(valid, jnp.int32(b), jnp.int32(0))
    return ReplayBuffer(
        x=buffer.x.at[slots].set(x.astype(buffer.x.dtype), mode="drop"),
        y=buffer.y.at[slots].set(y.astype(buffer.y.dtype), mode="drop"),
        task=buffer.task.at[slots].set(jnp.broadcast_to(task_id, (b,)), mode="drop"),
        seen=buffer.seen + inc,
        task_seen=buffer.task_seen.at[task_id].add(inc),
    )


def buffer_sample(
    buffer: ReplayBuffer, key: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws `size` stored examples uniformly, with replacement.

    Args:
        buffer: The buffer.
        key: PRNG key.
        size: Number of examples. Static.

    Returns:
        ``(x, y, weight)``: ``weight`` is 1.0 for a stored example and 0.0 when the buffer is
        empty (then ``x``, ``y`` are zeros): weight the memory loss with it.

    Example:
        >>> from cljax.experiments.replay import buffer_init, buffer_sample
        >>> buf = buffer_init(2, jnp.zeros(1), jnp.zeros((), jnp.int32), num_tasks=1)
        >>> buffer_sample(buf, jax.random.key(0), 3)[2]
        Array([0., 0., 0.], dtype=float32)
    """
    filled = buffer.task >= 0
    logits = jnp.where(filled, 0.0, -jnp.inf)
    idx = jax.random.categorical(key, logits, shape=(size,))
    idx = jnp.where(jnp.any(filled), idx, 0)
    return buffer.x[idx], buffer.y[idx], filled[idx].astype(jnp.float32)


def buffer_mix(
    buffer: ReplayBuffer,
    key: jax.Array,
    x: jax.Array,
    y: jax.Array,
    task_id: Any,
    fraction: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Replaces a `fraction` of a batch, in expectation, by stored examples of earlier tasks.

    Each of the ``B`` examples is replaced independently with probability `fraction` by an
    example drawn uniformly (with replacement) from the slots holding a task ``< task_id``; the
    batch keeps its size, so replay costs no extra computation (the replay of continual
    pre-training, Ibrahim et al. 2024). While no earlier task is stored nothing is replaced.

    Args:
        buffer: The buffer.
        key: PRNG key.
        x: ``(B, ...)`` current batch inputs.
        y: ``(B, ...)`` current batch labels.
        task_id: The current task (int32 scalar, may be traced).
        fraction: Replay share of the batch in ``[0, 1]`` (may be traced).

    Returns:
        ``(x, y, replaced)``: the mixed batch, in the dtypes of `x` and `y`, and the ``(B,)``
        boolean mask of replaced positions.

    Example:
        >>> from cljax.experiments.replay import buffer_add, buffer_init, buffer_mix
        >>> buf = buffer_init(4, jnp.zeros(1), jnp.zeros((), jnp.int32), num_tasks=2)
        >>> buf = buffer_add(buf, jnp.ones((4, 1)), jnp.ones(4, jnp.int32), 0, jax.random.key(0))
        >>> x, y, replaced = buffer_mix(buf, jax.random.key(1), jnp.zeros((3, 1)),
        ...                             jnp.zeros(3, jnp.int32), 1, 1.0)
        >>> y.tolist(), replaced.tolist()
        ([1, 1, 1], [True, True, True])

    References:
        Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
        Models", TMLR 2024. https://arxiv.org/abs/2403.08763
    """
    k_pick, k_coin = jax.random.split(key)
    b = x.shape[0]
    past = (buffer.task >= 0) & (buffer.task < task_id)
    logits = jnp.where(past, 0.0, -jnp.inf)
    idx = jax.random.categorical(k_pick, logits, shape=(b,))
    idx = jnp.where(jnp.any(past), idx, 0)
    coin = jax.random.uniform(k_coin, (b,)) < jnp.asarray(fraction, jnp.float32)
    replaced = coin & jnp.any(past)

    def pick(stored, current):
        mask = replaced.reshape((b,) + (1,) * (current.ndim - 1))
        return jnp.where(mask, stored[idx].astype(current.dtype), current)

    return pick(buffer.x, x), pick(buffer.y, y), replaced


def buffer_task_weights(buffer: ReplayBuffer, num_tasks: int) -> tuple[jax.Array, jax.Array]:
    """Per-task example weights over the slots, for per-task memory losses (GEM).

    Args:
        buffer: The buffer.
        num_tasks: Number of task rows ``T``. Static.

    Returns:
        ``(weights, present)``: ``weights[t, c] = 1`` where slot ``c`` holds an example of task
        ``t``, and ``present[t]`` is True when task ``t`` has at least one stored example.

    Example:
        >>> from cljax.experiments.replay import ReplayBuffer, buffer_task_weights
        >>> buf = ReplayBuffer(jnp.zeros((3, 1)), jnp.zeros(3), jnp.array([0, 1, -1]), jnp.int32(2), jnp.zeros(2, jnp.int32))
        >>> buffer_task_weights(buf, 2)[1]
        Array([ True,  True], dtype=bool)
    """
    weights = (buffer.task[None, :] == jnp.arange(num_tasks, dtype=jnp.int32)[:, None]).astype(
        jnp.float32
    )
    return weights, jnp.any(weights > 0, axis=1)
