"""Tests for the importance estimators: `fisher_diagonal` (RG-01) and `mas_importance` (RG-04).

References: an explicit Python loop over examples (one `jax.grad` per example), the closed-form
per-example gradients of a linear softmax model in float64 NumPy, and the exact expectation over
labels for the true Fisher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close

N, D, C = 6, 3, 4


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "W": jnp.asarray(rng.standard_normal((D, C)), jnp.float32),
        "c": jnp.asarray(rng.standard_normal(C), jnp.float32),
    }
    batch = {
        "x": jnp.asarray(rng.standard_normal((N, D)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, C, N)),
    }
    return params, batch


def logits_fn(p, ex):
    return ex["x"] @ p["W"] + p["c"]


def nll_fn(p, ex):
    return -jax.nn.log_softmax(logits_fn(p, ex))[ex["y"]]


def np_grad_log_p(params, x, y):
    """Closed-form ∇ log softmax(xW + c)[y] for one example, float64."""
    W, c = np.float64(params["W"]), np.float64(params["c"])
    z = x @ W + c
    p = np.exp(z - z.max())
    p /= p.sum()
    e = np.zeros(C)
    e[y] = 1.0
    return {"W": np.outer(x, e - p), "c": e - p}, p


def test_empirical_fisher_equals_a_loop_over_examples_and_the_closed_form():
    params, batch = make_problem()
    got = cljax.fisher_diagonal(nll_fn, params, batch)
    loop = jax.tree.map(jnp.zeros_like, params)
    closed = {k: np.zeros(v.shape) for k, v in params.items()}
    grad = jax.jit(jax.grad(nll_fn))
    for i in range(N):
        ex = jax.tree.map(lambda a, i=i: a[i], batch)
        g = grad(params, ex)
        loop = jax.tree.map(lambda acc, gg: acc + gg**2 / N, loop, g)
        cg, _ = np_grad_log_p(params, np.float64(batch["x"][i]), int(batch["y"][i]))
        closed = {k: closed[k] + cg[k] ** 2 / N for k in closed}
    assert_trees_close(got, loop, rtol=1e-6, atol=1e-7)
    assert_trees_close(got, closed, rtol=1e-5, atol=1e-7)


def test_chunked_estimation_equals_all_at_once():
    params, batch = make_problem(1)
    whole = cljax.fisher_diagonal(nll_fn, params, batch)
    chunked = cljax.fisher_diagonal(nll_fn, params, batch, chunk_size=2)
    assert_trees_close(chunked, whole, rtol=1e-6, atol=1e-8)
    inputs = batch["x"]
    out = lambda p, x: x @ p["W"] + p["c"]
    assert_trees_close(
        cljax.mas_importance(out, params, inputs, chunk_size=3),
        cljax.mas_importance(out, params, inputs),
        rtol=1e-6,
    )


def test_max_label_fisher_uses_the_argmax_label():
    params, batch = make_problem(2)
    got = cljax.fisher_diagonal(logits_fn, params, batch, estimator="max_label")
    want = {k: np.zeros(v.shape) for k, v in params.items()}
    for i in range(N):
        x = np.float64(batch["x"][i])
        _, p = np_grad_log_p(params, x, 0)
        g, _ = np_grad_log_p(params, x, int(np.argmax(p)))
        want = {k: want[k] + g[k] ** 2 / N for k in want}
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)


def test_true_fisher_of_a_certain_model_equals_the_max_label_fisher():
    params, batch = make_problem(5)
    sharp = {"W": 50.0 * params["W"], "c": params["c"]}  # softmax ≈ one-hot: y ~ p is the argmax
    true = cljax.fisher_diagonal(
        logits_fn, sharp, batch, estimator="true", key=jax.random.key(1), num_samples=3
    )
    top = cljax.fisher_diagonal(logits_fn, sharp, batch, estimator="max_label")
    assert_trees_close(true, top, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_true_fisher_converges_to_the_exact_expectation_over_labels():
    params, batch = make_problem(3)
    got = cljax.fisher_diagonal(
        logits_fn, params, batch, estimator="true", key=jax.random.key(0), num_samples=2000
    )
    exact = {k: np.zeros(v.shape) for k, v in params.items()}
    for i in range(N):
        x = np.float64(batch["x"][i])
        _, p = np_grad_log_p(params, x, 0)
        for y in range(C):
            g, _ = np_grad_log_p(params, x, y)
            exact = {k: exact[k] + p[y] * g[k] ** 2 / N for k in exact}
    # 2000 draws per example: Monte-Carlo error of a few percent.
    for k in exact:
        np.testing.assert_allclose(np.asarray(got[k]), exact[k], rtol=0.1, atol=2e-3, err_msg=k)
    again = cljax.fisher_diagonal(
        logits_fn, params, batch, estimator="true", key=jax.random.key(0), num_samples=2000
    )
    assert_trees_close(again, got, rtol=0, atol=0)  # deterministic given the key


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.0, 1.0, 100.0]))
def test_fisher_and_mas_are_finite_and_nonnegative(seed, scale):
    params, batch = make_problem(seed % 1000)
    params = jax.tree.map(lambda x: scale * x, params)
    for est in ("empirical", "max_label"):
        f = cljax.fisher_diagonal(
            nll_fn if est == "empirical" else logits_fn, params, batch, estimator=est
        )
        for leaf in jax.tree.leaves(f):
            assert leaf.dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(leaf))) and bool(jnp.all(leaf >= 0))
    m = cljax.mas_importance(lambda p, x: x @ p["W"], params, batch["x"])
    assert all(bool(jnp.all(leaf >= 0)) for leaf in jax.tree.leaves(m))


def test_mas_importance_per_sample_and_per_batch_match_closed_forms():
    params, batch = make_problem(4)
    xs = np.float64(batch["x"])
    W = np.float64(params["W"])
    out = lambda p, x: x @ p["W"]
    per_sample = cljax.mas_importance(out, {"W": params["W"]}, batch["x"])
    # ∂‖xW‖²/∂W = 2 x (xW)ᵀ
    grads = [2.0 * np.outer(x, x @ W) for x in xs]
    np.testing.assert_allclose(
        per_sample["W"], np.mean([np.abs(g) for g in grads], axis=0), rtol=1e-5
    )
    per_batch = cljax.mas_importance(out, {"W": params["W"]}, batch["x"], per_sample=False)
    np.testing.assert_allclose(per_batch["W"], np.abs(np.mean(grads, axis=0)), rtol=1e-5, atol=1e-6)


def test_estimator_errors():
    params, batch = make_problem()
    with pytest.raises(ValueError, match=r"fisher_diagonal\(estimator=...\) must be one of"):
        cljax.fisher_diagonal(nll_fn, params, batch, estimator="exact")
    with pytest.raises(ValueError, match=r"fisher_diagonal\(estimator='true'\) needs `key`"):
        cljax.fisher_diagonal(logits_fn, params, batch, estimator="true")
    with pytest.raises(ValueError, match="different leading sizes"):
        cljax.fisher_diagonal(nll_fn, params, {"x": batch["x"], "y": batch["y"][:3]})
    with pytest.raises(ValueError, match="leaf 'y' of `batch` is a scalar"):
        cljax.fisher_diagonal(nll_fn, params, {"x": batch["x"], "y": jnp.int32(0)})
    with pytest.raises(ValueError, match="`batch` has no array leaves"):
        cljax.fisher_diagonal(nll_fn, params, {})
    with pytest.raises(ValueError, match="`batch` holds no examples"):
        cljax.fisher_diagonal(nll_fn, params, jax.tree.map(lambda a: a[:0], batch))
    with pytest.raises(
        ValueError, match=r"fisher_diagonal\(chunk_size=...\) must divide the number of examples 6"
    ):
        cljax.fisher_diagonal(nll_fn, params, batch, chunk_size=4)
    with pytest.raises(ValueError, match=r"fisher_diagonal\(chunk_size=...\) must be >= 1"):
        cljax.fisher_diagonal(nll_fn, params, batch, chunk_size=0)
    with pytest.raises(ValueError, match=r"fisher_diagonal\(num_samples=...\) must be >= 1"):
        cljax.fisher_diagonal(nll_fn, params, batch, num_samples=0)
    with pytest.raises(
        ValueError, match=r"must return one example's logits of shape \(num_classes,\)"
    ):
        cljax.fisher_diagonal(
            lambda p, ex: logits_fn(p, ex)[None], params, batch, estimator="max_label"
        )
    with pytest.raises(TypeError, match=r"mas_importance\(per_sample=...\) must be a bool"):
        cljax.mas_importance(logits_fn, params, batch, per_sample=1)
    with pytest.raises(TypeError, match=r"mas_importance\(chunk_size=...\) must be an int"):
        cljax.mas_importance(logits_fn, params, batch, chunk_size=2.0)
