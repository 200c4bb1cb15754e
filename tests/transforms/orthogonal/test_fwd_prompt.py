"""Tests for Fwd-Prompt (OR-10): prompt updates projected off old tasks' embedding space, plus a
weighted component in the pre-trained embedding space.

Reference: float64 NumPy bases from GPM's energy criterion (`np_grow`, shared with the GPM tests)
and the card's rule per token vector, ``(I − U_old U_oldᵀ) g + w U_pre U_preᵀ g``. Invariants from
the card: the complement part is orthogonal to the old bases; with no old task only the
pre-trained component rule applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_equal
from tests.transforms.orthogonal.test_gpm import decaying_acts, np_grow, np_margin

L, D = 4, 10


def _np_out(g, old, pre, w):
    g = np.asarray(g, np.float64)  # (L, d): rows are token vectors
    return g - g @ old @ old.T + w * (g @ pre @ pre.T)


def _grown(seed=0, tasks=2, w=0.5, inner=None, where=None):
    rng = np.random.default_rng(seed)
    tx = cljax.fwd_prompt(capacity=D, pretrained_weight=w, inner=inner, where=where)
    state = tx.init({"prompt": jnp.zeros((L, D)), "bias": jnp.zeros(3)})
    old = np.zeros((D, 0))
    for task in range(tasks):
        emb = decaying_acts(rng, 12, D)
        assert np_margin(old, emb.T, 0.9, task == 0) > 1e-4, "test data too close to a tie"
        state = cljax.fwd_prompt_add_task(
            state, {"prompt": jnp.asarray(emb, jnp.float32), "bias": None}, 0.9
        )
        old = np_grow(old, emb.T, 0.9, task == 0)
    pre_emb = decaying_acts(rng, 15, D, decay=0.7)
    state = cljax.fwd_prompt_set_pretrained(
        state, {"prompt": jnp.asarray(pre_emb, jnp.float32)}, 0.8
    )
    pre = np_grow(None, pre_emb.T, 0.8, True)
    return tx, state, old, pre, rng


def test_bases_and_projection_match_numpy():
    tx, state, old, pre, rng = _grown()
    assert int(state.old_counts["prompt"]) == old.shape[1] > 0
    assert int(state.pre_counts["prompt"]) == pre.shape[1] > 0
    m = np.asarray(state.old_bases["prompt"])[:, : old.shape[1]]
    np.testing.assert_allclose(m @ m.T, old @ old.T, atol=2e-5)
    g = rng.standard_normal((L, D))
    u, _ = jax.jit(tx.update)({"prompt": jnp.asarray(g, jnp.float32), "bias": jnp.ones(3)}, state)
    np.testing.assert_allclose(u["prompt"], _np_out(g, old, pre, 0.5), atol=2e-5)
    np.testing.assert_array_equal(u["bias"], 1.0)  # not a prompt matrix: untouched


def test_complement_part_is_orthogonal_to_old_bases_for_adam():
    tx, state, old, pre, rng = _grown(1, inner=optax.adam(0.1))
    params = {"prompt": jnp.zeros((L, D)), "bias": jnp.zeros(3)}
    g = {"prompt": jnp.asarray(rng.standard_normal((L, D)), jnp.float32), "bias": jnp.ones(3)}
    u, _ = tx.update(g, state, params)
    adam_u, _ = optax.adam(0.1).update(g, optax.adam(0.1).init(params), params)
    a = np.asarray(adam_u["prompt"], np.float64)
    complement = np.asarray(u["prompt"], np.float64) - 0.5 * a @ pre @ pre.T
    np.testing.assert_allclose(complement @ old, 0.0, atol=1e-5)
    np.testing.assert_allclose(u["prompt"], _np_out(a, old, pre, 0.5), atol=2e-5)


def test_no_old_task_applies_only_the_pretrained_rule_and_empty_is_identity():
    rng = np.random.default_rng(2)
    tx = cljax.fwd_prompt(capacity=D, pretrained_weight=2.0)
    state = tx.init({"prompt": jnp.zeros((L, D))})
    g = {"prompt": jnp.asarray(rng.standard_normal((L, D)), jnp.float32)}
    assert_trees_equal(tx.update(g, state)[0], g)  # no bases at all
    pre_emb = decaying_acts(rng, 9, D)
    state = cljax.fwd_prompt_set_pretrained(
        state, {"prompt": jnp.asarray(pre_emb, jnp.float32)}, 0.9
    )
    pre = np_grow(None, pre_emb.T, 0.9, True)
    np.testing.assert_allclose(
        tx.update(g, state)[0]["prompt"],
        _np_out(g["prompt"], np.zeros((D, 0)), pre, 2.0),
        atol=2e-5,
    )


def test_zero_weight_equals_gpm_on_the_embedding_axis_and_pretrained_is_replaced():
    rng = np.random.default_rng(3)
    tx = cljax.fwd_prompt(capacity=D, pretrained_weight=0.0)
    gtx = cljax.gpm(capacity=D, spec=cljax.MatrixSpec(rows=-1, cols=-2))
    params = {"prompt": jnp.zeros((L, D))}
    state, gstate = tx.init(params), gtx.init(params)
    for _ in range(2):
        emb = {"prompt": jnp.asarray(decaying_acts(rng, 10, D), jnp.float32)}
        state = cljax.fwd_prompt_add_task(state, emb, 0.85)
        gstate = cljax.gpm_add_task(gstate, emb, 0.85)
    first = {"prompt": jnp.asarray(decaying_acts(rng, 10, D), jnp.float32)}
    state = cljax.fwd_prompt_set_pretrained(state, first, 0.9)
    g = {"prompt": jnp.asarray(rng.standard_normal((L, D)), jnp.float32)}
    np.testing.assert_allclose(
        tx.update(g, state)[0]["prompt"], gtx.update(g, gstate)[0]["prompt"], atol=1e-6
    )
    # A second call replaces U_pre (it does not grow it).
    second = {"prompt": jnp.asarray(np.eye(D)[:1] * 3.0, jnp.float32)}
    state = cljax.fwd_prompt_set_pretrained(state, second, 1.0)
    assert int(state.pre_counts["prompt"]) == 0  # one direction with all the energy: strict rule
    state = cljax.fwd_prompt_set_pretrained(
        state, {"prompt": jnp.asarray(np.eye(D)[:2] * [[3.0], [0.1]], jnp.float32)}, 0.999
    )
    assert int(state.pre_counts["prompt"]) == 1
    np.testing.assert_allclose(np.abs(state.pre_bases["prompt"][:, 0]), np.eye(D)[0], atol=1e-6)


def test_deep_prompt_layers_and_no_recompilation():
    rng = np.random.default_rng(4)
    params = {"prompt": jnp.zeros((2, L, D))}  # one prompt per layer: a batch axis
    tx = cljax.fwd_prompt(capacity=D, inner=optax.sgd(0.1))
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(None)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    g = {"prompt": jnp.asarray(rng.standard_normal((2, L, D)), jnp.float32)}
    for _ in range(3):
        emb = np.stack([decaying_acts(rng, 6, D) for _ in range(2)])
        state = cljax.fwd_prompt_add_task(state, {"prompt": jnp.asarray(emb, jnp.float32)}, 0.8)
        params, state = step(params, state, g)
    assert len(traces) == 1
    assert state.old_counts["prompt"].shape == (2,)
    u, _ = tx.update(g, state, params)
    for i in range(2):
        m = np.asarray(state.old_bases["prompt"][i])[:, : int(state.old_counts["prompt"][i])]
        np.testing.assert_allclose(np.asarray(u["prompt"][i]) @ m, 0.0, atol=1e-5)


@given(seed=st.integers(0, 1000), w=st.floats(0.0, 3.0), zero=st.booleans())
def test_property_finite_and_dtype(seed, w, zero):
    rng = np.random.default_rng(seed)
    tx = cljax.fwd_prompt(capacity=D, pretrained_weight=w)
    state = tx.init({"prompt": jnp.zeros((L, D), jnp.bfloat16)})
    emb = np.zeros((5, D)) if zero else decaying_acts(rng, 5, D)
    emb = {"prompt": jnp.asarray(emb, jnp.float32)}
    state = cljax.fwd_prompt_set_pretrained(cljax.fwd_prompt_add_task(state, emb, 0.9), emb, 0.9)
    g = {"prompt": jnp.asarray(rng.standard_normal((L, D)), jnp.bfloat16)}
    u, _ = tx.update(g, state)
    assert u["prompt"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(u["prompt"], np.float32)))
    for name in ("old_bases", "pre_bases"):
        b = np.asarray(getattr(state, name)["prompt"], np.float64)
        np.testing.assert_allclose(
            b.T @ b, np.diag((np.abs(b).sum(0) > 0).astype(float)), atol=1e-5
        )


def test_errors():
    with pytest.raises(ValueError, match=r"fwd_prompt\(capacity=...\) must be >= 1"):
        cljax.fwd_prompt(0)
    with pytest.raises(ValueError, match=r"fwd_prompt\(pretrained_capacity=...\) must be >= 1"):
        cljax.fwd_prompt(2, pretrained_capacity=0)
    with pytest.raises(ValueError, match=r"fwd_prompt\(pretrained_weight=...\) must be in"):
        cljax.fwd_prompt(2, pretrained_weight=-1.0)
    with pytest.raises(TypeError, match=r"fwd_prompt\(spec=...\) must be a MatrixSpec"):
        cljax.fwd_prompt(2, spec="rows")
    with pytest.raises(ValueError, match=r"fwd_prompt\(where=...\) needs `inner`"):
        cljax.fwd_prompt(2, where="gradient")
    with pytest.raises(TypeError, match=r"fwd_prompt\(spec=...\) returned 'x' for leaf 'p'"):
        cljax.fwd_prompt(2, spec=lambda p, s: "x").init({"p": jnp.zeros((2, 2))})
    tx = cljax.fwd_prompt(1, pretrained_capacity=1)
    state = tx.init({"prompt": jnp.zeros((2, 4)), "b": jnp.zeros(2)})
    two = {"prompt": jnp.asarray(np.diag([1.0, 0.9, 0.8, 0.7]), jnp.float32), "b": None}
    with pytest.raises(
        ValueError, match=r"fwd_prompt_add_task: leaf 'prompt' needs \d+ .* capacity is 1"
    ):
        cljax.fwd_prompt_add_task(state, two, 0.99)
    with pytest.raises(ValueError, match=r"fwd_prompt_set_pretrained: .* pretrained_capacity is 1"):
        cljax.fwd_prompt_set_pretrained(state, two, 0.99)
    with pytest.raises(ValueError, match=r"fwd_prompt_add_task: leaf 'prompt' has shape \(3, 5\)"):
        cljax.fwd_prompt_add_task(state, {"prompt": jnp.ones((3, 5)), "b": None}, 0.9)
    with pytest.raises(ValueError, match=r"fwd_prompt_add_task: leaf 'b' is not projected"):
        cljax.fwd_prompt_add_task(state, {"prompt": None, "b": jnp.ones((3, 2))}, 0.9)
    with pytest.raises(ValueError, match=r"fwd_prompt_set_pretrained: `embeddings` has leaf 'x'"):
        cljax.fwd_prompt_set_pretrained(state, {"x": jnp.ones((3, 4))}, 0.9)
    with pytest.raises(ValueError, match=r"fwd_prompt_add_task: `threshold` has no value"):
        cljax.fwd_prompt_add_task(state, {"prompt": jnp.ones((3, 4)), "b": None}, {"b": 0.5})
    with pytest.raises(TypeError, match=r"fwd_prompt_add_task: `embeddings` is traced"):
        jax.jit(lambda e: cljax.fwd_prompt_add_task(state, e, 0.9))({"prompt": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"no FwdPromptState in the optimizer state"):
        cljax.fwd_prompt_add_task(optax.sgd(0.1).init({"p": jnp.zeros(2)}), {"p": None}, 0.9)


def test_boundary_functions_inside_partition():
    rng = np.random.default_rng(7)
    params = {"prompt": jnp.zeros((L, D)), "w": jnp.zeros((D, 3))}
    tx = optax.partition(
        {"prompt": cljax.fwd_prompt(D, inner=optax.sgd(1.0)), "frozen": optax.set_to_zero()},
        {"prompt": "prompt", "w": "frozen"},
    )
    state = tx.init(params)
    emb = {"prompt": jnp.asarray(decaying_acts(rng, 8, D), jnp.float32)}
    state = cljax.fwd_prompt_add_task(state, emb, 0.9)
    state = cljax.fwd_prompt_set_pretrained(state, emb, 0.8)
    found = cljax.find_state(state, cljax.FwdPromptState)
    assert isinstance(found.old_bases["w"], optax.MaskedNode)
    g = {"prompt": jnp.asarray(rng.standard_normal((L, D)), jnp.float32), "w": jnp.ones((D, 3))}
    u, _ = jax.jit(tx.update)(g, state, params)
    m = np.asarray(found.old_bases["prompt"])[:, : int(found.old_counts["prompt"])]
    pre = np.asarray(found.pre_bases["prompt"])[:, : int(found.pre_counts["prompt"])]
    assert m.shape[1] > 0 and pre.shape[1] > 0
    # SGD(1): u = −g (I − P_old) − g P_pre; the complement part is orthogonal to U_old.
    gp = np.asarray(g["prompt"], np.float64)
    np.testing.assert_allclose((np.asarray(u["prompt"]) + gp @ pre @ pre.T) @ m, 0.0, atol=1e-5)
    np.testing.assert_array_equal(u["w"], 0.0)
