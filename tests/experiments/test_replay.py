"""The replay buffer: reservoir sampling against a sequential reference, per-task rings, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.experiments import replay as Rp

_add = jax.jit(Rp.buffer_add, static_argnames=("policy",))
_slots = jax.jit(Rp.reservoir_slots, static_argnums=2)
_sample = jax.jit(Rp.buffer_sample, static_argnums=2)


def _reference_reservoir(capacity: int, offered: list[int], draws: list[int]) -> list[int]:
    """Algorithm R, one example at a time: the buffer contents (example ids) after all offers."""
    slots = [-1] * capacity
    for n, (item, j) in enumerate(zip(offered, draws, strict=True)):
        if n < capacity:
            slots[n] = item
        elif j < capacity:
            slots[j] = item
    return slots


@settings(max_examples=20, deadline=None)
@given(
    capacity=st.sampled_from([1, 3]),
    batches=st.lists(st.sampled_from([1, 4]), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_reservoir_slots_equal_sequential_algorithm_r(capacity, batches, seed):
    rng = np.random.default_rng(seed)
    seen = 0
    contents = [-1] * capacity
    offered, draws = [], []
    for b in batches:
        d = np.array([rng.integers(0, seen + i + 1) for i in range(b)], np.int32)
        slots = np.asarray(_slots(jnp.int32(seen), jnp.asarray(d), capacity))
        ids = list(range(seen, seen + b))
        for slot, item in zip(slots, ids, strict=True):
            if slot < capacity:
                contents[slot] = item
        offered += ids
        draws += d.tolist()
        seen += b
    assert contents == _reference_reservoir(capacity, offered, draws)


def test_reservoir_keeps_each_example_with_probability_capacity_over_n():
    capacity, batch, batches, trials = 5, 4, 5, 400
    n = batch * batches
    counts = np.zeros(n)
    buf0 = Rp.buffer_init(capacity, jnp.zeros(()), jnp.zeros((), jnp.int32), num_tasks=1)

    @jax.jit
    def fill(key):
        buf = buf0
        for i in range(batches):
            ids = jnp.arange(i * batch, (i + 1) * batch)
            buf = Rp.buffer_add(
                buf, ids.astype(jnp.float32), ids, jnp.int32(0), jax.random.fold_in(key, i)
            )
        return buf.y

    for t in range(trials):
        counts[np.asarray(fill(jax.random.key(t)))] += 1
    freq = counts / trials
    # Each of the 20 examples is kept with probability 5/20; 400 trials give a std of ~0.022.
    np.testing.assert_allclose(freq, capacity / n, atol=0.09)
    assert counts.sum() == capacity * trials


def test_per_task_ring_keeps_the_latest_examples_of_each_task():
    buf = Rp.buffer_init(6, jnp.zeros(()), jnp.zeros((), jnp.int32), num_tasks=3)
    key = jax.random.key(0)
    buf = _add(buf, jnp.arange(5.0), jnp.arange(5), jnp.int32(1), key, policy="per_task")
    # Task 1 owns slots 2 and 3; of examples 0..4 the latest two (3, 4) remain, in ring order.
    assert buf.task.tolist() == [-1, -1, 1, 1, -1, -1]
    assert sorted(buf.y[2:4].tolist()) == [3, 4]
    buf = _add(buf, jnp.full(2, 9.0), jnp.full(2, 9), jnp.int32(0), key, policy="per_task")
    assert buf.task.tolist() == [0, 0, 1, 1, -1, -1]
    assert buf.task_seen.tolist() == [2, 5, 0]
    with pytest.raises(ValueError, match="no slot"):
        Rp.per_task_slots(jnp.zeros(3, jnp.int32), jnp.int32(0), 1, 2, 3)


def test_invalid_batches_leave_the_buffer_unchanged_and_bad_input_fails():
    buf = Rp.buffer_init(3, jnp.zeros(2), jnp.zeros((), jnp.int32), num_tasks=1)
    same = Rp.buffer_add(
        buf,
        jnp.ones((2, 2)),
        jnp.ones(2, jnp.int32),
        jnp.int32(0),
        jax.random.key(0),
        valid=jnp.bool_(False),
    )
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(buf), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="policy"):
        Rp.buffer_add(
            buf,
            jnp.ones((2, 2)),
            jnp.ones(2, jnp.int32),
            jnp.int32(0),
            jax.random.key(0),
            policy="fifo",
        )
    with pytest.raises(ValueError, match="do not match the slots"):
        Rp.buffer_add(
            buf, jnp.ones((2, 3)), jnp.ones(2, jnp.int32), jnp.int32(0), jax.random.key(0)
        )
    with pytest.raises(ValueError, match="capacity"):
        Rp.buffer_init(0, jnp.zeros(2), jnp.zeros(()), num_tasks=1)


def test_sampling_draws_only_stored_examples():
    buf = Rp.buffer_init(8, jnp.zeros(()), jnp.zeros((), jnp.int32), num_tasks=2)
    x, y, w = _sample(buf, jax.random.key(0), 64)
    assert w.tolist() == [0.0] * 64 and not np.any(np.isnan(x))
    buf = _add(
        buf,
        jnp.array([10.0, 11.0, 12.0]),
        jnp.array([10, 11, 12]),
        jnp.int32(1),
        jax.random.key(1),
        policy="reservoir",
    )
    x, y, w = _sample(buf, jax.random.key(2), 64)
    assert set(np.asarray(y).tolist()) <= {10, 11, 12} and w.tolist() == [1.0] * 64
    weights, present = Rp.buffer_task_weights(buf, 2)
    assert present.tolist() == [False, True]
    assert weights.sum() == 3.0 and weights[1, :3].tolist() == [1.0, 1.0, 1.0]
