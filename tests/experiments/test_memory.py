"""Memory accounting: bytes of stored arrays, optimizer vs continual-learning state (EX-07)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import cljax
from cljax.experiments import memory as Me

PARAMS = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4, jnp.bfloat16)}


def test_tree_bytes_is_the_sum_of_leaf_sizes():
    assert Me.tree_bytes(PARAMS) == 8 * 4 * 4 + 4 * 2
    assert Me.tree_bytes(jax.eval_shape(lambda: PARAMS)) == Me.tree_bytes(PARAMS)
    assert Me.tree_bytes({"mask": jnp.zeros(5, jnp.uint8), "none": None}) == 5
    assert Me.tree_bytes(jax.random.key(0)) == 8
    assert Me.tree_bytes(None) == 0


def test_optimizer_state_bytes_equal_the_sum_of_state_leaves():
    state = optax.adam(1e-3).init(PARAMS)
    expected = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    assert Me.split_state_bytes(state) == (expected, 0)
    # Adam: a count and two moments per parameter, in the parameters' dtypes.
    assert expected == 4 + 2 * Me.tree_bytes(PARAMS)


def test_cl_sub_states_are_counted_once_even_when_nested():
    tx = optax.chain(optax.adam(1e-3), cljax.track_ema(0.9))
    state = tx.init(PARAMS)
    total = Me.tree_bytes(state)
    ema = Me.tree_bytes(cljax.find_state(state, cljax.EmaState))
    assert Me.split_state_bytes(state, (cljax.EmaState,)) == (total - ema, ema)
    # A matching outer container (the chain's tuple is not a NamedTuple state; wrap in masked).
    masked = optax.masked(tx, {"w": True, "b": True}).init(PARAMS)
    optimizer, cl = Me.split_state_bytes(masked, (cljax.EmaState, optax.MaskedState))
    assert cl == Me.tree_bytes(masked) and optimizer == 0


def test_memory_account_totals():
    tx = optax.chain(optax.adam(1e-3), cljax.track_ema(0.9))
    state = tx.init(PARAMS)
    buffer = {"x": jnp.zeros((10, 64)), "y": jnp.zeros(10, jnp.int32)}
    acc = Me.memory_account(
        PARAMS,
        state,
        cl_state_types=(cljax.EmaState,),
        extra={"tau": PARAMS},
        buffer=buffer,
        bytes_per_exemplar=Me.exemplar_bytes((64,)),
    )
    assert acc["params"] == Me.tree_bytes(PARAMS)
    assert acc["cl_memory"] == Me.tree_bytes(
        cljax.find_state(state, cljax.EmaState)
    ) + Me.tree_bytes(PARAMS)
    assert acc["replay_buffer"] == 10 * 64 * 4 + 10 * 4
    assert acc["optimizer_state"] + acc["cl_memory"] - Me.tree_bytes(PARAMS) == Me.tree_bytes(state)
    assert (
        acc["total"]
        == acc["params"] + acc["optimizer_state"] + acc["cl_memory"] + acc["replay_buffer"]
    )
    assert acc["total_exemplars"] == pytest.approx(acc["total"] / 260)
    assert Me.exemplar_bytes((8, 8), "uint8", "int32") == 68


def test_a_wrapped_optimizer_state_counts_as_optimizer_state():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    state = cljax.si(optax.adam(1e-3), strength=1.0).init(params)
    si = cljax.find_state(state, cljax.SiState)
    inner = Me.tree_bytes(si.inner)
    optimizer, cl = Me.split_state_bytes(state, (cljax.SiState,))
    assert cl == Me.tree_bytes(si) - inner
    assert optimizer == Me.tree_bytes(state) - cl
    assert inner == 2 * 15 * 4 + 4  # Adam: mu and nu (15 floats each) and the int32 count
