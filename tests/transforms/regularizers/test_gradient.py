"""Tests for TAG (OT-02) and component-wise gradient-norm clipping (OT-03).

TAG is checked against a float64 NumPy transcription of the reference update over three tasks,
against optax's RMSProp / Adam on the first task, and on the card's invariants; clipping against
its formula, `optax.clip_by_global_norm` and its invariants.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

SHAPES = {"w": (4, 3), "b": (3,), "s": ()}


def normal_tree(rng, scale=1.0):
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}


# ---------------------------------------------------------------------------------------------
# OT-02: TAG.


class NpTag:
    """Float64 TAG of the card, one tensor at a time."""

    def __init__(self, variant, b, b1, b2, eps=1e-8):
        self.variant, self.b, self.b1, self.b2, self.eps = variant, b, b1, b2, eps
        self.task, self.n = 0, 0
        self.m = {k: np.zeros(s) for k, s in SHAPES.items()}
        self.v = [{k: np.zeros(s) for k, s in SHAPES.items()}]
        self.dirs = []

    def step(self, g):
        self.n += 1
        out = {}
        for k, x in g.items():
            x = np.float64(x)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * x
            self.v[self.task][k] = self.b2 * self.v[self.task][k] + (1 - self.b2) * x * x
            if self.task == 0:
                alpha = [1.0]
            else:
                unit = self.m[k].ravel() / np.linalg.norm(self.m[k])
                alpha = [math.exp(-self.b * float(unit @ d[k])) for d in self.dirs] + [
                    math.exp(-self.b)
                ]
            mixed = sum(a * v[k] for a, v in zip(alpha, self.v, strict=True))
            bc2 = 1 - self.b2**self.n if self.variant == "adam" else 1.0
            num = self.m[k] / (1 - self.b1**self.n) if self.variant == "adam" else x
            out[k] = num / (np.sqrt(mixed) / np.sqrt(bc2) + self.eps)
        return out

    def next_task(self):
        self.dirs.append({k: m.ravel() / np.linalg.norm(m) for k, m in self.m.items()})
        self.task += 1
        self.n = 0
        self.m = {k: np.zeros(s) for k, s in SHAPES.items()}
        self.v.append({k: np.zeros(s) for k, s in SHAPES.items()})


@pytest.mark.parametrize("variant", ["rmsprop", "adam"])
def test_tag_matches_numpy_reference_over_three_tasks(variant):
    rng = np.random.default_rng(0)
    b2 = 0.99 if variant == "rmsprop" else 0.999
    tx = cljax.scale_by_tag(capacity=3, variant=variant, b=2.0)
    ref = NpTag(variant, 2.0, 0.9, b2)
    params = jax.tree.map(jnp.asarray, normal_tree(rng))
    state = tx.init(params)
    update = jax.jit(tx.update)
    bias = [normal_tree(rng) for _ in range(3)]  # task-specific gradient means: related tasks
    for task in range(3):
        for step in range(4):
            g = {k: bias[task][k] + 0.3 * v for k, v in normal_tree(rng).items()}
            out, state = update(jax.tree.map(jnp.asarray, g), state)
            assert_trees_close(
                out, ref.step(g), rtol=2e-5, atol=1e-6, err=f"task {task} step {step}:"
            )
        if task < 2:
            state = cljax.tag_next_task(state)
            ref.next_task()


def test_tag_first_task_equals_optax_rmsprop_and_adam():
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, normal_tree(rng))
    pairs = [
        (cljax.scale_by_tag(2), optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False)),
        (cljax.scale_by_tag(2, variant="adam"), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)),
    ]
    for tag, ref in pairs:
        s, rs = tag.init(params), ref.init(params)
        for _ in range(3):
            g = jax.tree.map(jnp.asarray, normal_tree(rng))
            out, s = tag.update(g, s)
            want, rs = ref.update(g, rs)
            assert_trees_close(out, want, rtol=1e-5, atol=1e-7)


def test_tag_identical_old_direction_gets_weight_exp_minus_b():
    g = {"x": jnp.array([1.0, -2.0, 0.5])}
    b, b2 = 3.0, 0.99
    tx = cljax.scale_by_tag(2, b=b, b1=0.0, b2=b2)  # b1 = 0: m = g, so the directions coincide
    state = tx.init(g)
    _, state = tx.update(g, state)
    state = cljax.tag_next_task(state)
    np.testing.assert_allclose(
        state.directions["x"][0], np.asarray(g["x"]) / np.linalg.norm(g["x"]), rtol=1e-6
    )
    out, state = tx.update(g, state)
    v = (1 - b2) * np.asarray(g["x"]) ** 2  # both tasks hold the same v
    want = np.asarray(g["x"]) / (np.sqrt(math.exp(-b) * v + math.exp(-b) * v) + 1e-8)
    np.testing.assert_allclose(out["x"], want, rtol=1e-5)


_TAG = cljax.scale_by_tag(3)
_TAG_TRACES: list = []


@jax.jit
def _tag_step(state, grads):
    _TAG_TRACES.append(None)
    return _TAG.update(grads, state)


def test_tag_state_shapes_are_fixed_across_tasks_and_capacity_is_enforced():
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, normal_tree(rng))
    state = _TAG.init(params)
    next_task = jax.jit(cljax.tag_next_task)
    for _ in range(2):
        _, state = _tag_step(state, jax.tree.map(jnp.asarray, normal_tree(rng)))
        state = next_task(state)
    _, state = _tag_step(state, jax.tree.map(jnp.zeros_like, params))  # zero gradients: finite
    assert len(_TAG_TRACES) == 1
    assert int(state.task) == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
    assert_trees_equal(next_task(state), state)  # traced: past the capacity, unchanged
    with pytest.raises(ValueError, match="at task 2 of its capacity 3"):
        cljax.tag_next_task(state)


def test_tag_errors():
    with pytest.raises(ValueError, match=r"scale_by_tag\(variant=...\) must be one of"):
        cljax.scale_by_tag(2, variant="sgd")
    with pytest.raises(TypeError, match=r"scale_by_tag\(capacity=...\) must be an int"):
        cljax.scale_by_tag(2.0)
    with pytest.raises(ValueError, match=r"scale_by_tag\(b2=...\) must be in"):
        cljax.scale_by_tag(2, b2=1.0)
    with pytest.raises(ValueError, match=r"scale_by_tag\(b=...\) must be in"):
        cljax.scale_by_tag(2, b=-1.0)
    with pytest.raises(ValueError, match="tag_next_task: no ScaleByTagState"):
        cljax.tag_next_task(optax.adam(1e-3).init({"w": jnp.ones(2)}))


# ---------------------------------------------------------------------------------------------
# OT-03: component-wise clipping.


def test_clip_by_component_norm_clips_each_leaf_and_keeps_small_ones():
    g = {"big": jnp.array([3.0, 4.0]), "small": jnp.array([0.3, 0.4]), "zero": jnp.zeros(3)}
    tx = cljax.clip_by_component_norm(1.0)
    out, _ = tx.update(g, tx.init(None))
    np.testing.assert_allclose(out["big"], [0.6, 0.8], rtol=1e-6)
    assert_trees_equal({k: out[k] for k in ("small", "zero")}, {k: g[k] for k in ("small", "zero")})


def test_clip_by_component_norm_one_group_is_global_norm_clipping():
    rng = np.random.default_rng(3)
    g = jax.tree.map(jnp.asarray, normal_tree(rng, scale=3.0))
    tx = cljax.clip_by_component_norm(2.0, groups=jax.tree.map(lambda _: "all", g))
    ref = optax.clip_by_global_norm(2.0)
    assert_trees_close(tx.update(g, tx.init(g))[0], ref.update(g, ref.init(g))[0], rtol=1e-6)
    by_path = cljax.clip_by_component_norm(
        1.0, groups=cljax.label_by_path({"mat": "w|b"}, default="scalar")
    )
    out, _ = by_path.update(g, by_path.init(g))
    norm = math.sqrt(sum(float(jnp.sum(out[k] ** 2)) for k in ("w", "b")))
    assert abs(norm - 1.0) < 1e-5
    scale = 1.0 / math.sqrt(sum(float(jnp.sum(g[k] ** 2)) for k in ("w", "b")))
    np.testing.assert_allclose(out["w"], np.asarray(g["w"]) * scale, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    scale=st.sampled_from([0.0, 1e-20, 0.5, 1.0, 1e3, 1e20]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_clip_by_component_norm_bounds_every_component(scale, dtype, seed):
    rng = np.random.default_rng(seed)
    g = {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    tx = cljax.clip_by_component_norm(1.0)
    out, _ = tx.update(g, tx.init(g))
    for k in g:
        assert out[k].dtype == jnp.dtype(dtype)
        norm = float(jnp.linalg.norm(out[k].astype(jnp.float32).ravel()))
        assert math.isfinite(norm) and norm <= 1.0 + (1e-2 if dtype == "bfloat16" else 1e-5)
        if float(jnp.linalg.norm(g[k].astype(jnp.float32).ravel())) <= 1.0:
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(g[k]))


def test_clip_by_component_norm_errors():
    with pytest.raises(
        ValueError, match=r"clip_by_component_norm\(max_norm=...\) must be in \(0.0, inf\]"
    ):
        cljax.clip_by_component_norm(0.0)
    tx = cljax.clip_by_component_norm(1.0, groups={"a": "x"})
    with pytest.raises(ValueError, match="`groups` must give one label per leaf"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))
