"""The method registry, hyper-parameter resolution, and the hooks' building blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from cljax.experiments import methods as Me
from cljax.experiments import replay as Rp
from cljax.experiments.data import Task
from cljax.experiments.models import build_model, functional
from cljax.experiments.runner import _model_functions

PARAMS = {"head": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10, "bias": jnp.zeros(3)}}


def _state(params, method: Me.Method, hp):
    tx = method.optimizer(hp)
    extra = method.init_extra(params, hp) if method.init_extra else None
    key = jax.random.key_data(jax.random.key(0))
    return Me.TrainState(params, tx.init(params), extra, None, key, jnp.zeros([], jnp.int32)), tx


def _ctx(task_id, tx, hp, fns=None, task=None):
    return Me.TaskContext(task_id, 3, task, hp, tx, PARAMS, 0, fns)


def _hp(name, **over):
    return Me.resolve_hparams(name, Me.METHODS[name], learning_rate=1e-2, seed=0, overrides=over)


@pytest.mark.parametrize("name", list(Me.METHODS))
def test_every_registered_method_builds_and_evaluates(name):
    method = Me.METHODS[name]
    hp = _hp(name)
    state, tx = _state(PARAMS, method, hp)
    if method.eval_params is not None:
        evaluated = jax.jit(lambda s: method.eval_params(s, hp))(state)
        assert jax.tree.structure(evaluated) == jax.tree.structure(PARAMS)
    assert method.summary and method.references


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
