"""The method registry, hyper-parameter resolution, and the hooks' building blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from cljax.experiments import data as D
from cljax.experiments import methods as Me
from cljax.experiments import replay as Rp
from cljax.experiments.benchmarks import Benchmark
from cljax.experiments.data import Task
from cljax.experiments.models import build_model, functional
from cljax.experiments.runner import _model_functions, make_config, run
from tests.experiments.conftest import small_config

PARAMS = {"head": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10, "bias": jnp.zeros(3)}}


def _state(params, method: Me.Method, hp):
    tx = method.optimizer(hp)
    extra = method.init_extra(params, hp) if method.init_extra else None
    key = jax.random.key_data(jax.random.key(0))
    return Me.TrainState(params, tx.init(params), extra, None, key, jnp.zeros([], jnp.int32)), tx


def _ctx(task_id, tx, hp, fns=None, task=None):
    return Me.TaskContext(task_id, 3, task, hp, tx, PARAMS, 0, fns)


def _hp(name, **over):
    hp = Me.resolve_hparams(name, Me.METHODS[name], learning_rate=1e-2, seed=0, overrides=over)
    return {**hp, "num_tasks": 3}  # the runner adds the stream's number of tasks


MLP_PARAMS = functional(build_model("mlp", (5,), 3, seed=0, hidden=(4,))).params
LLAMA_PARAMS = functional(
    build_model("tiny_llama", (8,), 20, seed=0, dim=8, depth=3, heads=2, hidden=8)
).params
# Methods for one model family only: built on that model.
_MODEL_PARAMS = {"lisa": LLAMA_PARAMS}


@pytest.mark.parametrize("name", list(Me.METHODS))
def test_every_registered_method_builds_and_evaluates(name):
    method = Me.METHODS[name]
    hp = _hp(name)
    params = _MODEL_PARAMS.get(name, MLP_PARAMS)
    state, tx = _state(params, method, hp)
    if method.eval_params is not None:
        evaluated = jax.jit(lambda s: method.eval_params(s, hp))(state)
        assert jax.tree.structure(evaluated) == jax.tree.structure(params)
    if method.task_eval_params is not None:  # one model per task: leaves (T, ...)
        per_task = jax.jit(lambda s: method.task_eval_params(s, hp))(state)
        assert jax.tree.structure(per_task) == jax.tree.structure(params)
        for a, p in zip(jax.tree.leaves(per_task), jax.tree.leaves(params), strict=True):
            assert a.shape == (3, *p.shape)
    assert method.summary and method.references
    # Every declared CL sub-state is in the optimizer state.
    for kind in method.cl_state_types:
        assert cljax.find_states(state.opt_state, kind)


def test_magmax_hook_merges_max_magnitude_task_vectors():
    hp = _hp("magmax")
    method = Me.METHODS["magmax"]
    state, tx = _state(PARAMS, method, hp)
    rng = np.random.default_rng(0)
    theta0 = np.asarray(PARAMS["head"]["kernel"], np.float64)
    finetuned = [theta0 + rng.normal(size=(4, 3)) for _ in range(3)]
    finetuned[2][0, 0] = theta0[0, 0] - (finetuned[1][0, 0] - theta0[0, 0])  # a tie: the later wins
    for t, ft in enumerate(finetuned):
        params = {"head": {"kernel": jnp.asarray(ft, jnp.float32), "bias": jnp.zeros(3)}}
        state = method.on_task_end(state._replace(params=params), _ctx(t, tx, hp))
    taus = [ft - theta0 for ft in finetuned]
    ref = taus[0]
    for tau in taus[1:]:
        ref = np.where(np.abs(tau) >= np.abs(ref), tau, ref)
    got = method.eval_params(state, hp)["head"]["kernel"]
    np.testing.assert_allclose(got, theta0 + 0.5 * ref, rtol=1e-5, atol=1e-6)


def test_opcm_hook_keeps_the_merged_norm_at_the_mean_task_norm():
    hp = _hp("opcm")
    method = Me.METHODS["opcm"]
    state, tx = _state(PARAMS, method, hp)
    # Before any merge the trained parameters are evaluated.
    np.testing.assert_array_equal(
        method.eval_params(state, hp)["head"]["kernel"], PARAMS["head"]["kernel"]
    )
    rng = np.random.default_rng(1)
    norms = []
    for t in range(3):
        tau = {
            "head": {
                "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
            }
        }
        norms.append(float(optax.tree.norm(tau)))
        params = jax.tree.map(jnp.add, PARAMS, tau)
        state = method.on_task_end(state._replace(params=params), _ctx(t, tx, hp))
        merged = method.eval_params(state, hp)
        if t == 0:  # the first model is taken as it is
            np.testing.assert_allclose(
                merged["head"]["kernel"], params["head"]["kernel"], rtol=1e-5
            )
        delta = jax.tree.map(jnp.subtract, merged, PARAMS)
        assert float(optax.tree.norm(delta)) == pytest.approx(np.mean(norms), rel=1e-4)


def test_opcm_restart_starts_later_tasks_from_theta0_with_a_fresh_optimizer():
    hp = _hp("opcm", **{"opcm.restart": True})
    method = Me.METHODS["opcm"]
    state, tx = _state(PARAMS, method, hp)
    moved = state._replace(params=jax.tree.map(lambda p: p + 1.0, PARAMS))
    assert method.on_task_start(moved, _ctx(0, tx, hp)) is moved
    restarted = method.on_task_start(moved, _ctx(1, tx, hp))
    np.testing.assert_array_equal(restarted.params["head"]["kernel"], PARAMS["head"]["kernel"])
    kept = method.on_task_start(moved, _ctx(1, tx, _hp("opcm")))
    np.testing.assert_array_equal(kept.params["head"]["kernel"], moved.params["head"]["kernel"])


def test_average_hook_is_the_mean_of_task_end_models():
    hp = _hp("average")
    method = Me.METHODS["average"]
    state, tx = _state(PARAMS, method, hp)
    np.testing.assert_array_equal(
        method.eval_params(state, hp)["head"]["kernel"], PARAMS["head"]["kernel"]
    )
    models = [jax.tree.map(lambda p, s=s: p + s, PARAMS) for s in (1.0, 2.0, 6.0)]
    for t, m in enumerate(models):
        state = method.on_task_end(state._replace(params=m), _ctx(t, tx, hp))
    np.testing.assert_allclose(
        method.eval_params(state, hp)["head"]["kernel"], PARAMS["head"]["kernel"] + 3.0, rtol=1e-6
    )


def test_ema_method_evaluates_the_average():
    hp = _hp("ema", **{"ema.decay": 0.5})
    method = Me.METHODS["ema"]
    state, tx = _state(PARAMS, method, hp)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, opt_state = tx.update(grads, state.opt_state, PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    got = method.eval_params(state._replace(params=new, opt_state=opt_state), hp)
    np.testing.assert_allclose(
        got["head"]["kernel"],
        0.5 * PARAMS["head"]["kernel"] + 0.5 * new["head"]["kernel"],
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Step and task contexts.


def _linear_model():
    f = functional(build_model("mlp", (5,), 3, seed=0, hidden=()))
    loss_fn, fns = _model_functions(f)
    return f, loss_fn, fns


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def test_empirical_fisher_is_the_mean_of_squared_per_example_gradients():
    f, _, fns = _linear_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int32)
    task = Task("t", x, y, x[:4], y[:4], (0, 1, 2))
    ctx = Me.TaskContext(0, 1, task, {"fisher_examples": 30}, optax.sgd(0.1), f.params, 0, fns)
    fisher = ctx.empirical_fisher(f.params, batch_size=10)
    # Reference in float64: softmax regression, dL/dW = x (p - e_y)^T, dL/db = p - e_y, on the same
    # 30 examples (`sample` is deterministic).
    xs, ys = ctx.sample(30, seed=2)
    W = np.asarray(f.params["head"]["kernel"], np.float64)
    b = np.asarray(f.params["head"]["bias"], np.float64)
    p = _softmax(xs.astype(np.float64) @ W + b)
    r = p - np.eye(3)[ys]
    gw = xs[:, :, None] * r[:, None, :]
    np.testing.assert_allclose(
        fisher["head"]["kernel"], np.mean(gw**2, axis=0), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(fisher["head"]["bias"], np.mean(r**2, axis=0), rtol=1e-4, atol=1e-7)
    # Never the square of the mean gradient.
    assert not np.allclose(fisher["head"]["bias"], np.mean(r, axis=0) ** 2)


def test_task_context_sampling_and_layer_inputs_are_fixed():
    f, _, fns = _linear_model()
    x = np.arange(50, dtype=np.float32).reshape(10, 5)
    task = Task("t", x, np.zeros(10, np.int32), x, np.zeros(10, np.int32), (0,))
    ctx = Me.TaskContext(1, 2, task, {}, optax.sgd(0.1), f.params, 7, fns)
    a, _ = ctx.sample(6)
    b, _ = ctx.sample(6)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(r) for r in a}) == 6  # without replacement when the task is large enough
    assert ctx.sample(25)[0].shape == (25, 5)  # with replacement otherwise
    acts = ctx.layer_inputs(f.params, 8)  # the params' structure: inputs at kernels, None elsewhere
    assert jax.tree.structure(acts, is_leaf=lambda v: v is None) == jax.tree.structure(
        jax.tree.map(lambda _: None, f.params), is_leaf=lambda v: v is None
    )
    assert acts["head"]["bias"] is None and acts["head"]["kernel"].shape == (8, 5)
    np.testing.assert_array_equal(acts["head"]["kernel"], ctx.sample(8, seed=1)[0])
    assert sum(1 for _ in ctx.batches(4, 3)) == 3
    xb, yb = ctx.sample_batch(4)
    assert xb.shape == (4, 5) and yb.shape == (4,)


def test_per_example_functions_match_the_batched_loss():
    f, loss_fn, fns = _linear_model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = rng.integers(0, 3, 6).astype(np.int32)

    @jax.jit
    def per_example(params, x, y):
        losses = jax.vmap(lambda xi, yi: fns.example_loss(params, (xi, yi)))(x, y)
        logits = jax.vmap(lambda xi: fns.example_logits(params, xi))(x)
        return losses, logits, loss_fn(params, x, y, jnp.ones(6))

    losses, logits, mean = per_example(f.params, x, y)
    np.testing.assert_allclose(logits, fns.apply(f.params, x), rtol=1e-6)
    np.testing.assert_allclose(losses, fns.per_example_loss(f.params, x, y), rtol=1e-6)
    assert float(mean) == pytest.approx(float(np.mean(losses)), rel=1e-6)


def test_memory_grads_and_task_grads_match_direct_gradients():
    f, loss_fn, _ = _linear_model()
    rng = np.random.default_rng(2)
    add = jax.jit(Rp.buffer_add, static_argnames=("policy",))
    buf = Rp.buffer_init(12, jnp.zeros(5), jnp.zeros((), jnp.int32), num_tasks=3)
    for t in (0, 1):
        xb = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
        yb = jnp.asarray(rng.integers(0, 3, 4), jnp.int32)
        buf = add(buf, xb, yb, jnp.int32(t), jax.random.key(t), policy="per_task")
    key = jax.random.key(5)

    @jax.jit
    def contexts(params, buffer, task_id):
        ctx = Me.StepContext(
            params, jnp.zeros((6, 5)), jnp.zeros(6, jnp.int32), task_id, key, buffer, loss_fn, {}, 3
        )
        mx, my, w = Rp.buffer_sample(buffer, key, 6)
        return ctx.memory_grads(), jax.grad(loss_fn)(params, mx, my, w), ctx.task_grads()

    got, direct, (grads, valid) = contexts(f.params, buf, jnp.int32(2))
    np.testing.assert_allclose(got["head"]["kernel"], direct["head"]["kernel"], rtol=1e-6)
    assert valid.tolist() == [True, True, False]
    for t in (0, 1):
        sel = np.asarray(buf.task) == t
        x, y = np.asarray(buf.x)[sel].astype(np.float64), np.asarray(buf.y)[sel]
        # Reference in float64: the mean softmax-regression gradient over task t's stored examples.
        W = np.asarray(f.params["head"]["kernel"], np.float64)
        r = _softmax(x @ W + np.asarray(f.params["head"]["bias"], np.float64)) - np.eye(3)[y]
        np.testing.assert_allclose(
            grads["head"]["kernel"][t], x.T @ r / len(y), rtol=1e-4, atol=1e-6
        )
    np.testing.assert_array_equal(grads["head"]["kernel"][2], 0.0)
    # Only previous tasks are constraints: at task 1, task 1's own memory is not.
    assert contexts(f.params, buf, jnp.int32(1))[2][1].tolist() == [True, False, False]
    empty = Rp.buffer_init(12, jnp.zeros(5), jnp.zeros((), jnp.int32), num_tasks=3)
    assert float(optax.tree.norm(contexts(f.params, empty, jnp.int32(2))[0])) == 0.0
    ctx = Me.StepContext(f.params, None, None, 0, key, None, loss_fn, {}, 3)
    with pytest.raises(ValueError, match="no replay buffer"):
        ctx.memory_grads()
    with pytest.raises(ValueError, match="no replay buffer"):
        ctx.task_grads()


# ---------------------------------------------------------------------------------------------
# Hyper-parameters and validation.


def test_hyperparameter_precedence_and_errors():
    hp = Me.resolve_hparams("upgd", Me.METHODS["upgd"], learning_rate=1e-3, seed=4)
    assert hp["learning_rate"] == 0.01 and hp["seed"] == 4  # the method's own default wins
    hp = Me.resolve_hparams(
        "upgd",
        Me.METHODS["upgd"],
        learning_rate=1e-3,
        seed=0,
        overrides={"learning_rate": 0.5, "replay.buffer_size": 3},
    )
    assert hp["learning_rate"] == 0.5 and "buffer_size" not in hp
    with pytest.raises(ValueError, match="has no hyper-parameter 'decay'"):
        Me.resolve_hparams(
            "naive", Me.METHODS["naive"], learning_rate=1e-3, seed=0, overrides={"naive.decay": 1}
        )
    with pytest.raises(ValueError, match="--seeds"):
        Me.resolve_hparams(
            "naive", Me.METHODS["naive"], learning_rate=1e-3, seed=0, overrides={"seed": 1}
        )
    chosen = {"naive": Me.METHODS["naive"], "replay": Me.METHODS["replay"]}
    Me.check_overrides(chosen, {"buffer_size": 5, "replay.buffer_size": 6, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="not among the methods run"):
        Me.check_overrides(chosen, {"ema.decay": 0.9})
    with pytest.raises(ValueError, match="no selected method has 'decay'"):
        Me.check_overrides(chosen, {"decay": 0.9})


def test_registry_lookup_and_method_validation():
    assert Me.get_method("naive") is Me.METHODS["naive"]
    custom = dataclasses.replace(Me.METHODS["naive"], summary="mine")
    assert Me.get_method(custom) is custom
    with pytest.raises(ValueError, match="unknown method 'ewcc'; registered methods: naive"):
        Me.get_method("ewcc")
    with pytest.raises(TypeError):
        Me.METHODS["x"] = Me.METHODS["naive"]  # read-only registry
    with pytest.raises(ValueError, match="data"):
        Me.Method("m", lambda hp: optax.sgd(0.1), data="all")
    with pytest.raises(ValueError, match="buffer"):
        Me.Method("m", lambda hp: optax.sgd(0.1), buffer="fifo")
    with pytest.raises(ValueError, match="needs a buffer"):
        Me.Method("m", lambda hp: optax.sgd(0.1), replay=True)
    assert Me.METHODS["cwd"].optimizer(_hp("cwd")).init(PARAMS) is not None
    assert isinstance(
        cljax.find_state(Me.METHODS["ema"].optimizer(_hp("ema")).init(PARAMS), cljax.EmaState),
        cljax.EmaState,
    )


# ---------------------------------------------------------------------------------------------
# Regularisers, projections and plasticity methods: boundary hooks against float64 references.


def _task(x, y, classes=(0, 1, 2)):
    return Task("t", x, y, x[:4], y[:4], classes)


def _data(n, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int32)


def _linear_ref(params, x):
    """Softmax-regression logits and probabilities in float64."""
    W = np.asarray(params["head"]["kernel"], np.float64)
    b = np.asarray(params["head"]["bias"], np.float64)
    z = x.astype(np.float64) @ W + b
    return z, _softmax(z)


def _setup(name, params, fns, x, y, task_id=0, **over):
    hp = _hp(name, **over)
    method = Me.METHODS[name]
    state, tx = _state(params, method, hp)
    ctx = Me.TaskContext(task_id, 3, _task(x, y), hp, tx, params, 0, fns)
    return method, state, ctx


@pytest.mark.parametrize("estimator", ["empirical", "max_label"])
def test_ewc_hook_stores_anchor_and_per_example_fisher(estimator):
    f, _, fns = _linear_model()
    x, y = _data(16)  # the whole task is the Fisher sample: the mean does not depend on the order
    over = {"ewc.fisher": estimator, "ewc.fisher_examples": 16}
    method, state, ctx = _setup("ewc", f.params, fns, x, y, **over)
    out = method.on_task_end(state, ctx)
    ewc = cljax.find_state(out.opt_state, cljax.EwcState)
    assert int(ewc.count) == 1
    assert ewc.fishers["head"]["kernel"].shape == (2, 5, 3)  # one pair per task with a successor
    np.testing.assert_array_equal(ewc.anchors["head"]["kernel"][0], f.params["head"]["kernel"])
    # Reference: squared per-example gradients of -log p(label | x), label = y or argmax p.
    _, p = _linear_ref(f.params, x)
    label = y if estimator == "empirical" else np.argmax(p, axis=1)
    r = p - np.eye(3)[label]
    ref_w = np.mean((x[:, :, None].astype(np.float64) * r[:, None, :]) ** 2, axis=0)
    np.testing.assert_allclose(ewc.fishers["head"]["kernel"][0], ref_w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ewc.fishers["head"]["bias"][0], np.mean(r**2, 0), rtol=1e-4)
    # The next boundary fills the second slot; the last task's boundary stores nothing.
    out = method.on_task_end(out, ctx._replace(task_id=1))
    assert int(cljax.find_state(out.opt_state, cljax.EwcState).count) == 2
    assert method.on_task_end(out, ctx._replace(task_id=2)) is out


@pytest.mark.parametrize("positions", [None, 3])
def test_true_fisher_estimate_matches_its_expectation(positions):
    # One example repeated, a fresh label draw each time: the estimate converges to
    # E_y[(d log p(y|x) / dW)^2]; for sequences (per-position labels, mean NLL over positions)
    # the cross terms vanish in expectation, leaving (1/L^2) sum_l E_y[...].
    rng = np.random.default_rng(1)
    L = positions or 1
    W = rng.normal(size=(4, 3)).astype(np.float32)
    xe = rng.normal(size=(L, 4)).astype(np.float32)
    n = 4096
    x = np.broadcast_to(xe if positions else xe[0], (n,) + ((L, 4) if positions else (4,)))
    y = np.zeros((n, L) if positions else (n,), np.int32)  # unused by the 'true' estimator
    logits_fn = lambda p, xi: xi @ p["w"]  # noqa: E731
    got = Me._fisher_jit(
        {"w": jnp.asarray(W)},
        jnp.asarray(x),
        jnp.asarray(y),
        jax.random.key(0),
        example_logits=logits_fn,
        example_loss=None,
        estimator="true",
        chunk_size=64,
    )["w"]
    p = _softmax(xe.astype(np.float64) @ W)  # (L, 3)
    ref = np.zeros((4, 3))
    for pos in range(L):
        for c in range(3):
            g = xe[pos][:, None] * (p[pos] - np.eye(3)[c])[None, :]
            ref += p[pos, c] * g**2 / L**2
    np.testing.assert_allclose(got, ref, rtol=0.15, atol=0.02 * ref.max())


def test_sequence_max_label_fisher_matches_a_loop():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(4, 3)).astype(np.float32)
    x = rng.normal(size=(8, 5, 4)).astype(np.float32)  # 8 sequences of 5 positions
    got = Me._fisher_jit(
        {"w": jnp.asarray(W)},
        jnp.asarray(x),
        jnp.zeros((8, 5), jnp.int32),
        jax.random.key(0),
        example_logits=lambda p, xi: xi @ p["w"],
        example_loss=None,
        estimator="max_label",
        chunk_size=4,
    )["w"]
    ref = np.zeros((4, 3))
    for xi in x.astype(np.float64):
        p = _softmax(xi @ W)
        g = sum(np.outer(xi[i], p[i] - np.eye(3)[np.argmax(p[i])]) for i in range(5)) / 5
        ref += g**2 / 8
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_mas_hook_accumulates_output_sensitivity():
    f, _, fns = _linear_model()
    x, y = _data(16, seed=3)
    method, state, ctx = _setup("mas", f.params, fns, x, y, **{"mas.importance_examples": 16})
    out = method.on_task_end(state, ctx)
    mas = cljax.find_state(out.opt_state, cljax.MasState)
    # Reference: d||xW + b||^2 / dW = 2 x f^T, d/db = 2 f; absolute value per example, then mean.
    z, _ = _linear_ref(f.params, x)
    ref_w = np.mean(np.abs(2 * x[:, :, None].astype(np.float64) * z[:, None, :]), axis=0)
    np.testing.assert_allclose(mas.importance["head"]["kernel"], ref_w, rtol=1e-4)
    np.testing.assert_allclose(mas.importance["head"]["bias"], np.mean(np.abs(2 * z), 0), rtol=1e-4)
    np.testing.assert_array_equal(mas.anchor["head"]["kernel"], f.params["head"]["kernel"])
    twice = method.on_task_end(out, ctx._replace(task_id=1))
    np.testing.assert_allclose(
        cljax.find_state(twice.opt_state, cljax.MasState).importance["head"]["bias"],
        2 * np.mean(np.abs(2 * z), 0),
        rtol=1e-4,
    )


def test_l2_hook_turns_the_penalty_on_after_the_first_task():
    f, _, fns = _linear_model()
    x, y = _data(8)
    method, state, ctx = _setup("l2", f.params, fns, x, y, **{"l2.strength": 0.5})
    moved = jax.tree.map(lambda p: p + 1.0, f.params)
    zeros = jax.tree.map(jnp.zeros_like, f.params)
    # During the first task there is no previous task: zero gradients give a zero update.
    updates, _ = ctx.tx.update(zeros, state.opt_state, moved)
    assert float(optax.tree.norm(updates)) == 0.0
    out = method.on_task_end(state._replace(params=moved), ctx)
    inject = cljax.find_state(out.opt_state, optax.InjectStatefulHyperparamsState)
    before = cljax.find_state(state.opt_state, optax.InjectStatefulHyperparamsState)
    assert float(inject.hyperparams["strength"]) == 0.5
    # Same dtype and weak type as before: the jitted step does not retrace.
    assert jax.eval_shape(lambda: inject.hyperparams) == jax.eval_shape(lambda: before.hyperparams)
    anchor = cljax.find_state(out.opt_state, cljax.L2AnchorState).anchor
    np.testing.assert_array_equal(anchor["head"]["kernel"], moved["head"]["kernel"])
    # The penalty gradient 0.5 (theta - anchor) reaches Adam: its first step is -lr * sign.
    params = jax.tree.map(lambda p: p + 2.0, moved)
    updates, _ = ctx.tx.update(zeros, out.opt_state, params)
    np.testing.assert_allclose(updates["head"]["kernel"], -1e-2, rtol=1e-4)
    assert method.on_task_end(out, ctx._replace(task_id=2)) is out


def test_si_hook_turns_the_path_integral_into_importance():
    f, loss_fn, fns = _linear_model()
    x, y = _data(8)
    method, state, ctx = _setup("si", f.params, fns, x, y)
    params, opt_state = f.params, state.opt_state

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(params, jnp.asarray(x), jnp.asarray(y), jnp.ones(8))
        updates, opt_state = ctx.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
        params, opt_state = step(params, opt_state)
    si = cljax.find_state(opt_state, cljax.SiState)
    out = method.on_task_end(state._replace(params=params, opt_state=opt_state), ctx)
    new = cljax.find_state(out.opt_state, cljax.SiState)
    moved = np.asarray(params["head"]["kernel"], np.float64) - np.asarray(
        f.params["head"]["kernel"]
    )
    ref = np.asarray(si.path_integral["head"]["kernel"], np.float64) / (moved**2 + 0.1)
    np.testing.assert_allclose(new.importance["head"]["kernel"], ref, rtol=1e-4, atol=1e-9)
    assert float(optax.tree.norm(new.path_integral)) == 0.0
    np.testing.assert_array_equal(new.anchor["head"]["kernel"], params["head"]["kernel"])


def test_gpm_hook_stores_input_subspaces_and_the_step_respects_them():
    f = functional(build_model("mlp", (5,), 3, seed=0, hidden=(4,)))
    loss_fn, fns = _model_functions(f)
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(16, 2)) @ rng.normal(size=(2, 5))).astype(np.float32)  # rank 2
    y = rng.integers(0, 3, 16).astype(np.int32)
    method, state, ctx = _setup("gpm", f.params, fns, x, y, **{"gpm.activation_examples": 16})
    out = method.on_task_end(state, ctx)
    gpm = cljax.find_state(out.opt_state, cljax.GpmState)
    W0 = np.asarray(f.params["layers"][0]["kernel"], np.float64)
    b0 = np.asarray(f.params["layers"][0]["bias"], np.float64)
    hidden = np.maximum(x.astype(np.float64) @ W0 + b0, 0.0)
    for leaf, inputs in ((("layers", 0), x.astype(np.float64)), (("head",), hidden)):
        # Reference, GPM's first-task rule: k = #{i : cumsum(s^2)_i / sum(s^2) < 0.97}.
        u, s, _ = np.linalg.svd(inputs.T, full_matrices=False)
        k = int(np.sum(np.cumsum(s**2) / np.sum(s**2) < 0.97))
        node_b, node_c = gpm.bases, gpm.counts
        for key in leaf:
            node_b, node_c = node_b[key], node_c[key]
        count = int(node_c["kernel"])
        basis = np.asarray(node_b["kernel"][:, :count], np.float64)
        assert count == k >= 1
        np.testing.assert_allclose(basis @ basis.T, u[:, :k] @ u[:, :k].T, atol=1e-4)
    # A step after the boundary: no kernel update along a stored input direction, the hidden
    # bias frozen (the backbone), the output bias trainable (the head).
    xb, yb = _data(8, seed=5)
    grads = jax.grad(loss_fn)(f.params, jnp.asarray(xb), jnp.asarray(yb), jnp.ones(8))
    updates, _ = ctx.tx.update(grads, out.opt_state, f.params)
    m0 = gpm.bases["layers"][0]["kernel"]
    np.testing.assert_allclose(m0.T @ updates["layers"][0]["kernel"], 0.0, atol=1e-6)
    np.testing.assert_array_equal(updates["layers"][0]["bias"], 0.0)
    assert float(jnp.max(jnp.abs(updates["head"]["bias"]))) > 0.0
    assert method.on_task_end(out, ctx._replace(task_id=2)) is out


def test_ogd_hook_spans_the_ground_truth_logit_gradients():
    f, _, fns = _linear_model()
    x, y = _data(6, seed=6)
    method, state, ctx = _setup("ogd", f.params, fns, x, y, **{"ogd.examples_per_task": 6})
    out = method.on_task_end(state, ctx)
    ogd = cljax.find_state(out.opt_state, cljax.OgdState)
    assert ogd.basis["head"]["kernel"].shape == (12, 5, 3)  # 6 per task with a successor
    # Reference: d f_y / dW = x e_y^T and d f_y / db = e_y, stacked as (bias, kernel) vectors.
    vecs = np.concatenate(
        [np.eye(3)[y], (x[:, :, None] * np.eye(3)[y][:, None, :]).reshape(6, -1)], 1
    )
    basis = np.concatenate(
        [
            np.asarray(ogd.basis["head"]["bias"]),
            np.asarray(ogd.basis["head"]["kernel"]).reshape(12, -1),
        ],
        1,
    ).astype(np.float64)
    count = int(ogd.count)
    assert count == np.linalg.matrix_rank(vecs)
    b = basis[:count]
    np.testing.assert_allclose(b @ b.T, np.eye(count), atol=1e-5)
    np.testing.assert_allclose(vecs - (vecs @ b.T) @ b, 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="one label per example"):
        method.on_task_start(state, ctx._replace(task=_task(np.zeros((4, 3, 2)), np.zeros((4, 3)))))


def test_osft_hook_freezes_a_growing_top_singular_subspace():
    params = MLP_PARAMS
    method, state, ctx = _setup("osft", params, None, *_data(4))
    W = np.asarray(params["layers"][0]["kernel"], np.float64)  # (5, 4): min(m, n) = 4
    u, _, vt = np.linalg.svd(W, full_matrices=False)
    for t, k in ((0, 0), (1, 1), (2, 2)):  # floor(t / 3 * 4)
        state = method.on_task_start(state, ctx._replace(task_id=t))
        osft = cljax.find_state(state.opt_state, cljax.OsftState)
        assert int(osft.ranks["layers"][0]["kernel"]) == k
        left = np.asarray(osft.left["layers"][0]["kernel"], np.float64)[:, :k]
        right = np.asarray(osft.right["layers"][0]["kernel"], np.float64)[:, :k]
        np.testing.assert_allclose(left @ left.T, u[:, :k] @ u[:, :k].T, atol=1e-5)
        np.testing.assert_allclose(right @ right.T, vt[:k].T @ vt[:k], atol=1e-5)


def test_shrink_perturb_hook_is_the_identity_first_then_shrinks():
    method, state, ctx = _setup("shrink_perturb", MLP_PARAMS, None, *_data(4))
    first = method.on_task_start(state, ctx)
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(MLP_PARAMS), strict=True):
        np.testing.assert_array_equal(a, b)
    hp = {**ctx.hp, "noise_scale": 0.0}
    later = method.on_task_start(state, ctx._replace(task_id=1, hp=hp))
    for a, b in zip(jax.tree.leaves(later.params), jax.tree.leaves(MLP_PARAMS), strict=True):
        np.testing.assert_allclose(a, 0.5 * np.asarray(b, np.float64), rtol=1e-6)
    noisy = method.on_task_start(state, ctx._replace(task_id=1))
    noise = (noisy.params["layers"][0]["kernel"] - later.params["layers"][0]["kernel"]) / 0.01
    assert 0.3 < float(jnp.std(noise)) < 3.0


def test_cbp_reads_the_mlp_layers_and_feeds_hidden_activations():
    f = functional(build_model("mlp", (5,), 3, seed=0, hidden=(4, 3)))
    loss_fn, fns = _model_functions(f)
    layers = Me._cbp_layers(f.params)
    assert layers == [
        cljax.CbpLayer("layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"),
        cljax.CbpLayer("layers/1/kernel", "layers/1/bias", "head/kernel", "head/bias"),
    ]
    x, y = _data(6)
    ctx = Me.StepContext(
        f.params, jnp.asarray(x), jnp.asarray(y), 0, None, None, loss_fn, {}, 3, fns
    )
    acts = Me._cbp_extras(ctx)["activations"]
    assert [a.shape for a in acts] == [(6, 4), (6, 3)]
    # The registry's optimizer is continual backprop on those layers.
    hp = _hp("cbp", **{"cbp.maturity": 0, "cbp.replacement_rate": 1.0})
    tx = Me.METHODS["cbp"].optimizer(hp)
    direct = cljax.continual_backprop(
        optax.adam(1e-2), layers, replacement_rate=1.0, maturity=0, decay=0.99, seed=0
    )
    grads = jax.grad(loss_fn)(f.params, jnp.asarray(x), jnp.asarray(y), jnp.ones(6))
    step = jax.jit(lambda t, s: t.update(grads, s, f.params, activations=acts)[0], static_argnums=0)
    got, want = step(tx, tx.init(f.params)), step(direct, direct.init(f.params))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_past_only_memory_gradients_ignore_the_current_task():
    f, loss_fn, _ = _linear_model()
    x0 = np.tile(np.float32([[1.0, -2.0, 0.5, 0.0, 3.0]]), (4, 1))  # task 0: one example, 4 times
    x1, y1 = _data(4, seed=7)
    buf = Rp.buffer_init(8, jnp.zeros(5), jnp.zeros((), jnp.int32), num_tasks=2)
    buf = Rp.buffer_add(
        buf, jnp.asarray(x0), jnp.full(4, 2, jnp.int32), jnp.int32(0), jax.random.key(0)
    )
    buf = Rp.buffer_add(buf, jnp.asarray(x1), jnp.asarray(y1), jnp.int32(1), jax.random.key(1))

    @jax.jit
    def grads(task_id):
        ctx = Me.StepContext(
            f.params,
            jnp.zeros((6, 5)),
            jnp.zeros(6, jnp.int32),
            task_id,
            jax.random.key(3),
            buf,
            loss_fn,
            {"memory_batch_size": None},
            2,
        )
        return Me.METHODS["agem"].step_extras(ctx)["memory_grads"]

    got = grads(jnp.int32(1))
    _, p = _linear_ref(f.params, x0[:1])
    r = p[0] - np.eye(3)[2]
    np.testing.assert_allclose(got["head"]["kernel"], np.outer(x0[0], r), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["head"]["bias"], r, rtol=1e-5, atol=1e-6)
    assert float(optax.tree.norm(grads(jnp.int32(0)))) == 0.0  # no earlier task yet


def test_gem_extras_pass_every_task_slot_and_the_task_count():
    f, loss_fn, _ = _linear_model()
    buf = Rp.buffer_init(6, jnp.zeros(5), jnp.zeros((), jnp.int32), num_tasks=3)
    ctx = Me.StepContext(f.params, None, None, jnp.int32(2), jax.random.key(0), buf, loss_fn, {}, 3)
    extras = jax.jit(lambda: Me.METHODS["gem"].step_extras(ctx))()
    assert extras["task_grads"]["head"]["kernel"].shape == (3, 5, 3)
    assert int(extras["num_tasks"]) == 2


def test_regularizer_and_projection_methods_validate_their_settings():
    no_tasks = {k: v for k, v in _hp("ewc").items() if k != "num_tasks"}
    with pytest.raises(ValueError, match="needs 'num_tasks'"):
        Me.METHODS["ewc"].optimizer(no_tasks)
    with pytest.raises(ValueError, match="'fisher' must be one of"):
        Me.METHODS["online_ewc"].optimizer(_hp("online_ewc", **{"online_ewc.fisher": "exact"}))
    with pytest.raises(ValueError, match="'fisher_examples' must be an int >= 1"):
        Me.METHODS["ewc"].optimizer(_hp("ewc", **{"ewc.fisher_examples": 0}))
    with pytest.raises(ValueError, match="'importance_examples' must be an int >= 1"):
        Me.METHODS["mas"].optimizer(_hp("mas", **{"mas.importance_examples": 2.5}))
    with pytest.raises(ValueError, match="'activation_examples' must be an int >= 1"):
        Me.METHODS["gpm"].optimizer(_hp("gpm", **{"gpm.activation_examples": -1}))
    with pytest.raises(ValueError, match="'num_components' must be an int >= 1"):
        Me.METHODS["ogd"].optimizer(_hp("ogd", **{"ogd.num_components": 0}))
    with pytest.raises(ValueError, match="'where' must be one of"):
        Me.METHODS["agem"].optimizer(_hp("agem", **{"agem.where": "before"}))
    with pytest.raises(ValueError, match="'where' must be one of"):
        Me.METHODS["gem"].optimizer(_hp("gem", **{"gem.where": "after"}))
    with pytest.raises(ValueError, match="'memory_batch_size' must be an int >= 1"):
        Me.METHODS["agem"].optimizer(_hp("agem", **{"agem.memory_batch_size": 0}))
    with pytest.raises(ValueError, match="'rank_step' must be in"):
        Me.METHODS["osft"].optimizer(_hp("osft", **{"osft.rank_step": 1.5}))
    with pytest.raises(ValueError, match="'shrink' must be in"):
        Me.METHODS["shrink_perturb"].optimizer(
            _hp("shrink_perturb", **{"shrink_perturb.shrink": 2.0})
        )
    with pytest.raises(ValueError, match="'noise_scale' must be >= 0"):
        Me.METHODS["shrink_perturb"].optimizer(
            _hp("shrink_perturb", **{"shrink_perturb.noise_scale": -1.0})
        )
    cbp = Me.METHODS["cbp"].optimizer(_hp("cbp"))
    with pytest.raises(ValueError, match="registered for the MLP"):
        cbp.init(PARAMS)
    with pytest.raises(ValueError, match="needs `params`"):
        cbp.update(MLP_PARAMS, cbp.init(MLP_PARAMS), None, activations=[jnp.zeros((1, 4))])
    ctx = Me.StepContext(MLP_PARAMS, jnp.zeros((1, 5)), None, 0, None, None, None, {}, 3)
    with pytest.raises(ValueError, match="no model functions"):
        Me._cbp_extras(ctx)


# ---------------------------------------------------------------------------------------------
# Sparse masks and low-rank projections.


def test_exclusive_masks_hooks_write_back_only_the_exclusive_entries_and_evaluate_per_task():
    # Two tasks with hand-set masks M_0, M_1 (the edge-popup phase is covered by the slow runs):
    # after each task W changes only on M_t & ~U, and task j is evaluated with W * M_j.
    params = MLP_PARAMS
    hp = _hp("exclusive_masks")
    method = Me.METHODS["exclusive_masks"]
    state, tx = _state(params, method, hp)
    rng = np.random.default_rng(8)
    W = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    masks, evaluated = [], None
    for t in range(2):
        m = {k: rng.random(v.shape) < 0.5 for k, v in W.items()}
        m = {k: (v if k.endswith("kernel") else np.ones_like(v)) for k, v in m.items()}
        masks.append(m)
        opt_state = cljax.exclusive_masks_start_task(state.opt_state, _unflat(m, params))
        weights = state.extra
        trained = jax.tree.map(  # training moved every entry of the network W * M_t by +1
            lambda w, mk: jnp.where(mk, w + 1.0, 0.0), weights, _unflat(m, params)
        )
        state = state._replace(params=trained, opt_state=opt_state)
        state = method.on_task_end(state, _ctx(t, tx, hp))
        union = {k: np.zeros(v.shape, bool) for k, v in W.items()}
        for mj in masks[:-1]:
            union = {k: union[k] | mj[k] for k in W}
        W = {k: np.where(m[k] & ~union[k], W[k] + 1.0, W[k]) for k in W}
        got = _flat(state.extra)
        for k in W:
            np.testing.assert_allclose(got[k], W[k], rtol=1e-6)
        evaluated = method.task_eval_params(state, hp)
    per_task = _flat(evaluated)
    for k in W:
        for j in range(2):
            np.testing.assert_allclose(per_task[k][j], np.where(masks[j][k], W[k], 0.0), rtol=1e-6)
        # Task 2 is not committed: evaluated with the trained parameters.
        np.testing.assert_array_equal(per_task[k][2], _flat(state.params)[k])


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v) for p, v in leaves}


def _unflat(flat, like):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(flat[jax.tree_util.keystr(p, simple=True, separator="/")]), like
    )


def test_hft_hook_redraws_half_of_each_group_per_task():
    f = functional(build_model("mlp", (5,), 3, seed=0, hidden=(4, 4)))  # 3 kernels, 3 biases
    method, state, ctx = _setup("hft", f.params, None, *_data(4))
    names = list(_flat(f.params))
    kernel = np.array([n.endswith("kernel") for n in names])
    draws = []
    for t in (0, 1, 2, 0):
        out = method.on_task_start(state, ctx._replace(task_id=t))
        selected = np.asarray(cljax.find_state(out.opt_state, cljax.HftState).selected)
        assert selected[kernel].sum() == 2 and selected[~kernel].sum() == 2  # ceil(0.5 * 3)
        draws.append(tuple(selected))
    assert draws[3] == draws[0]  # fixed by (seed, task)
    assert len(set(draws)) > 1
    # A step moves exactly the selected leaves.
    grads = jax.tree.map(jnp.ones_like, f.params)
    updates, _ = ctx.tx.update(grads, out.opt_state, f.params)
    moved = [bool(np.any(np.asarray(u) != 0)) for u in jax.tree.leaves(updates)]
    assert moved == list(selected)


def test_spu_hook_masks_the_top_entries_of_the_summed_logit_norm_gradient():
    f, _, fns = _linear_model()
    x, y = _data(40, seed=9)
    over = {"spu.density": 0.4, "spu.score_fraction": 0.5, "spu.score_batch_size": 10}
    method, state, ctx = _setup("spu", f.params, fns, x, y, **over)
    out = method.on_task_start(state, ctx)
    # Reference: A = sum_i d||x_i W + b||^2 / dW = sum_i 2 x_i f_i^T over the 20 scored examples
    # (2 batches of 10 = 0.5 * 40), then the top floor(0.4 * 15) = 6 entries of |A|.
    xs = np.concatenate([xb for xb, _ in ctx.batches(10, 2, seed=7)])
    z, _ = _linear_ref(f.params, xs)
    A = 2 * xs.astype(np.float64).T @ z
    ref = np.zeros(A.size, bool)
    ref[np.argsort(-np.abs(A).ravel(), kind="stable")[:6]] = True
    grads = jax.tree.map(jnp.ones_like, f.params)
    updates, _ = ctx.tx.update(grads, out.opt_state, f.params)
    kernel = np.asarray(updates["head"]["kernel"]) != 0
    np.testing.assert_array_equal(kernel.ravel(), ref)
    assert np.all(np.asarray(updates["head"]["bias"]) != 0)  # trained fully


def test_galore_entry_is_galore_adamw_on_the_kernels():
    hp = _hp("galore", **{"galore.rank": 2})
    tx = Me.METHODS["galore"].optimizer(hp)
    direct = cljax.galore_adamw(0.01, rank=2, refresh_every=200, scale=0.25)
    grads = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), MLP_PARAMS
    )
    step = jax.jit(lambda t: t.update(grads, t.init(MLP_PARAMS), MLP_PARAMS)[0], static_argnums=0)
    got, want = step(tx), step(direct)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # The (5, 4) kernel's update has rank 2.
    assert np.linalg.matrix_rank(np.asarray(got["layers"][0]["kernel"], np.float64), tol=1e-7) == 2


def test_sparse_and_low_rank_methods_validate_their_settings():
    with pytest.raises(ValueError, match="'density' must be in"):
        Me.METHODS["exclusive_masks"].optimizer(_hp("exclusive_masks", **{"density": 0.0}))
    with pytest.raises(ValueError, match="'mask_steps' must be an int >= 1"):
        Me.METHODS["exclusive_masks"].optimizer(_hp("exclusive_masks", **{"mask_steps": 0}))
    with pytest.raises(ValueError, match="'mask_batch_size' must be an int >= 1"):
        Me.METHODS["exclusive_masks"].optimizer(_hp("exclusive_masks", **{"mask_batch_size": 1.5}))
    no_tasks = {k: v for k, v in _hp("exclusive_masks").items() if k != "num_tasks"}
    with pytest.raises(ValueError, match="needs 'num_tasks'"):
        Me.METHODS["exclusive_masks"].optimizer(no_tasks)
    with pytest.raises(ValueError, match="'fraction' must be in"):
        Me.METHODS["hft"].optimizer(_hp("hft", **{"fraction": 1.5}))
    with pytest.raises(ValueError, match="'density' must be in"):
        Me.METHODS["spu"].optimizer(_hp("spu", **{"density": True}))
    with pytest.raises(ValueError, match="'score_fraction' must be in"):
        Me.METHODS["spu"].optimizer(_hp("spu", **{"score_fraction": -0.1}))
    with pytest.raises(ValueError, match="'score_batch_size' must be an int >= 1"):
        Me.METHODS["spu"].optimizer(_hp("spu", **{"score_batch_size": 0}))
    with pytest.raises(ValueError, match="'rank' must be an int >= 1"):
        Me.METHODS["galore"].optimizer(_hp("galore", **{"rank": 0}))
    with pytest.raises(ValueError, match="'refresh_every' must be an int >= 1"):
        Me.METHODS["galore"].optimizer(_hp("galore", **{"refresh_every": None}))


def test_lisa_trains_one_block_per_period_and_refuses_models_without_a_block_list():
    method = Me.METHODS["lisa"]
    state, tx = _state(LLAMA_PARAMS, method, _hp("lisa", **{"lisa.interval": 2}))
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    params, opt_state = state.params, state.opt_state
    for period in range(3):
        start = params
        for _ in range(2):
            grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
            u, opt_state = update(grads, opt_state, params)
            params = optax.apply_updates(params, u)
        moved = [
            any(
                bool(jnp.any(a != b))
                for a, b in zip(
                    jax.tree.leaves(start["blocks"][i]),
                    jax.tree.leaves(params["blocks"][i]),
                    strict=True,
                )
            )
            for i in range(3)
        ]
        assert sum(moved) == 1, (period, moved)  # one of the three blocks per period
        assert bool(jnp.any(start["embed"]["embedding"] != params["embed"]["embedding"]))
    assert cljax.find_state(opt_state, optax.ScaleByAdamState).mu["blocks"] is not None
    with pytest.raises(ValueError, match="method 'lisa' samples blocks"):
        method.optimizer(_hp("lisa")).init(MLP_PARAMS)


def _lora_task_deltas(dense_tasks, tasks=2, rank=2):
    """Trains the 'lora' method over `tasks` tasks of random gradients; returns the kernels'
    parameters at each task boundary and the last state."""
    params = functional(build_model("mlp", (6,), 5, seed=0, hidden=(8,))).params
    over = {"lora.rank": rank, "lora.dense_tasks": dense_tasks}
    method, state, ctx = _setup("lora", params, None, *_data(4), **over)
    update = jax.jit(ctx.tx.update)
    rng = np.random.default_rng(0)
    kernels = lambda p: [p["layers"][0]["kernel"], p["head"]["kernel"]]
    starts = [kernels(state.params)]
    for task in range(tasks):
        state = method.on_task_start(state, ctx._replace(task_id=task))
        for _ in range(3):
            grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
            u, opt_state = update(grads, state.opt_state, state.params)
            state = state._replace(params=optax.apply_updates(state.params, u), opt_state=opt_state)
        starts.append(kernels(state.params))
    rank_of = lambda d: np.linalg.matrix_rank(np.asarray(d, np.float64), tol=1e-5)
    deltas = [
        [rank_of(b - a) for a, b in zip(starts[t], starts[t + 1], strict=True)]
        for t in range(tasks)
    ]
    return deltas, state


def test_lora_changes_each_kernel_by_at_most_rank_r_per_task_and_restarts_its_adapter():
    deltas, state = _lora_task_deltas(dense_tasks=0)
    assert all(r == 2 for task in deltas for r in task)  # one rank-2 adapter per task, merged
    assert int(cljax.find_state(state.opt_state, cljax.MergedLoraState).resets) == 1
    # The default: the first task trains every weight ("pre-training"), then adapters.
    deltas, state = _lora_task_deltas(dense_tasks=1, tasks=3)
    assert min(deltas[0]) > 2 and all(r == 2 for task in deltas[1:] for r in task)
    assert int(cljax.find_state(state.opt_state, cljax.MergedLoraState).resets) == 2
    with pytest.raises(ValueError, match="'rank' must be an int >= 1"):
        Me.METHODS["lora"].optimizer(_hp("lora", **{"rank": 0}))
    with pytest.raises(ValueError, match="others"):
        Me.METHODS["lora"].optimizer(_hp("lora", **{"others": "all"}))
    with pytest.raises(ValueError, match="'dense_tasks' must be an int >= 0"):
        Me.METHODS["lora"].optimizer(_hp("lora", **{"dense_tasks": -1}))


# ---------------------------------------------------------------------------------------------
# Slow: every regulariser, projection and plasticity method through the runner, tiny budgets.

CL_METHODS = (
    "ewc",
    "online_ewc",
    "si",
    "mas",
    "l2",
    "gpm",
    "ogd",
    "agem",
    "gem",
    "osft",
    "shrink_perturb",
    "cbp",
    "exclusive_masks",
    "hft",
    "spu",
    "galore",
    "lora",
)
# Continual backprop replaces units only after `maturity` steps: make it happen in a tiny run.
_TINY = {"cbp": {"cbp.maturity": 1, "cbp.replacement_rate": 0.5}}


def _finite(result) -> bool:
    return all(v is None or np.isfinite(v) for m in result["metrics"].values() for v in m.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", CL_METHODS)
def test_method_runs_five_tasks_and_its_hooks_never_recompile(name):
    # Five tasks: the boundary work after the first task compiles, the later ones reuse it.
    r = run(small_config(name, num_tasks=5, overrides=_TINY.get(name)))
    assert r["complete"] and _finite(r)
    assert r["compilations"]["xla_per_task"][1:] == [0] * 4
    assert r["compilations"]["traces"]["train_chunk"] == 1
    if Me.METHODS[name].cl_state_types:
        assert r["memory"]["cl_memory"] > 0
    if Me.METHODS[name].buffer != "none":
        assert r["memory"]["replay_buffer"] > 0


@pytest.mark.slow
def test_exclusive_masks_never_forget_under_task_incremental_evaluation():
    # Earlier tasks' subnetworks W * M_j never change: their Task-IL accuracy after every later
    # task equals its value when learned, exactly (the card's zero-forgetting invariant).
    r = run(small_config("exclusive_masks", num_tasks=5))
    R = np.asarray(r["R"]["task"])
    for j in range(5):
        np.testing.assert_array_equal(R[j:, j], R[j, j])
    assert r["metrics"]["task"]["bwt"] == 0.0
    assert r["memory"]["cl_memory"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ewc", "mas", "gpm", "gem", "exclusive_masks", "galore"])
def test_method_runs_on_a_domain_incremental_stream(name):
    cfg = make_config(
        "split-digits-domain", name, num_tasks=5, steps_per_task=6, eval_every=3, eval_subsample=100
    )
    r = run(cfg)
    assert r["complete"] and _finite(r) and set(r["metrics"]) == {"domain"}
    assert r["compilations"]["xla_per_task"][1:] == [0] * 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpm", "osft", "ewc", "exclusive_masks", "spu", "galore"])
def test_projections_handle_convolution_kernels(name):
    r = run(small_config(name, num_tasks=5, model="cnn"))
    assert r["complete"] and _finite(r)
    assert r["compilations"]["xla_per_task"][1:] == [0] * 4


_TINY_LM = Benchmark(
    "tiny char LM",
    lambda n: D.char_lm(("prose", "code", "unicode"), context=8, max_chars=1500),
    "tiny_llama",
    {"dim": 16, "depth": 1, "heads": 2},
    steps_per_task=3,
    eval_every=3,
    eval_subsample=8,
    batch_size=8,
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ewc", "mas", "si", "gpm", "osft", "spu", "hft", "galore"])
def test_method_runs_on_a_language_model_stream(name):
    # Per-position labels: EWC's true Fisher samples a label per position.
    over = {"fisher_examples": 16, "importance_examples": 16, "activation_examples": 8}
    over = {k: v for k, v in over.items() if k in Me.METHODS[name].defaults}
    r = run(make_config(_TINY_LM, name, overrides=over), stream=_TINY_LM.stream(None))
    assert r["complete"] and _finite(r)
    assert r["compilations"]["xla_per_task"][1:] == [0, 0]


@pytest.mark.slow
def test_ogd_refuses_a_sequence_stream_before_training():
    with pytest.raises(ValueError, match="one label per example"):
        run(make_config(_TINY_LM, "ogd"), stream=_TINY_LM.stream(None))


@pytest.mark.slow
def test_gpm_keeps_task_incremental_accuracy_where_naive_forgets():
    cfg = dict(steps_per_task=40, eval_every=40, eval_subsample=100)
    gpm = run(make_config("split-digits", "gpm", **cfg))["metrics"]["task"]
    naive = run(make_config("split-digits", "naive", **cfg))["metrics"]["task"]
    assert abs(gpm["bwt"]) < 0.03 < -naive["bwt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ewc", "l2", "gpm", "agem", "osft", "exclusive_masks", "hft"])
def test_resuming_after_a_boundary_equals_an_uninterrupted_run(name, tmp_path):
    # The checkpoint holds the consolidated / grown CL memory (anchors, injected strengths,
    # bases, the buffer): resuming from it gives the uninterrupted run's numbers.
    cfg = small_config(name, num_tasks=5)
    full = run(cfg)
    partial = run(cfg, checkpoint_dir=tmp_path, stop_after=2)
    assert not partial["complete"]
    resumed = run(cfg, checkpoint_dir=tmp_path, resume=True)
    for key in ("R", "loss_matrix", "log", "metrics", "memory"):
        assert resumed[key] == full[key], key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ewc", "gpm", "gem", "cbp"])
def test_data_parallel_run_matches_one_device(name):
    assert len(jax.devices()) >= 8
    r1 = run(small_config(name, num_tasks=5, overrides=_TINY.get(name)))
    r8 = run(small_config(name, num_tasks=5, overrides=_TINY.get(name), devices=8))
    np.testing.assert_allclose(r8["train_loss"]["loss"], r1["train_loss"]["loss"], rtol=1e-3)
    for s in ("task", "class"):
        np.testing.assert_allclose(r8["R"][s], r1["R"][s], atol=2 / 180)
