"""Importance estimators: the diagonal Fisher (EWC) and MAS output sensitivity.

Both are pure functions of a per-example model or loss function, the parameters and a batch
whose leaves share a leading example axis. Per-example gradients come from `jax.vmap`; with
`chunk_size` the batch is processed in chunks under `lax.scan`, so memory holds
``chunk_size`` gradients at a time instead of the whole batch's. Results are float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from cljax import _checks

__all__ = ["fisher_diagonal", "mas_importance"]

_f32 = jnp.float32
FisherEstimator = Literal["empirical", "true", "max_label"]
_ESTIMATORS = ("empirical", "true", "max_label")


def _num_examples(fn: str, batch: Any) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(
            f"{fn}: `batch` has no array leaves; pass arrays with a leading example axis."
        )
    sizes = set()
    for path, x in leaves:
        if jnp.ndim(x) == 0:
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' of `batch` is a scalar; every leaf needs a "
                "leading example axis."
            )
        sizes.add(jnp.shape(x)[0])
    if len(sizes) != 1:
        raise ValueError(
            f"{fn}: the leaves of `batch` have different leading sizes {sorted(sizes)}; they must agree."
        )
    n = sizes.pop()
    if n == 0:
        raise ValueError(f"{fn}: `batch` holds no examples.")
    return n


def _mean_over_examples(
    fn: str, per_example: Callable, params: Any, batch: Any, chunk_size: int | None
) -> Any:
    """Mean over the leading axis of `batch` of ``per_example(params, example)`` (a tree, float32)."""
    n = _num_examples(fn, batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _f32), params)
    batched = jax.vmap(per_example, in_axes=(None, 0))

    def chunk_sum(examples):
        return jax.tree.map(lambda x: jnp.sum(x.astype(_f32), axis=0), batched(params, examples))

    if chunk_size is None or chunk_size >= n:
        total = chunk_sum(batch)
    else:
        _checks.check_int(fn, "chunk_size", chunk_size, 1)
        if n % chunk_size:
            raise ValueError(
                f"{fn}(chunk_size=...) must divide the number of examples {n}, got {chunk_size}."
            )
        chunks = jax.tree.map(
            lambda x: x.reshape((n // chunk_size, chunk_size) + x.shape[1:]), batch
        )

        def body(acc, examples):
            return jax.tree.map(jnp.add, acc, chunk_sum(examples)), None

        total, _ = lax.scan(body, zeros, chunks)
    return jax.tree.map(lambda t: t / n, total)


def fisher_diagonal(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    estimator: FisherEstimator = "empirical",
    key: jax.Array | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
) -> Any:
    """Returns the diagonal Fisher ``mean_x E_y[(∂ log p(y|x)/∂θ)²]`` from per-example gradients.

    Each example's gradient is taken on its own (``jax.vmap`` over the leading axis of every
    `batch` leaf), squared, then averaged over the examples — never the square of a batch-mean
    gradient. What `loss_fn` returns depends on the estimator:

    * ``'empirical'`` (default): `loss_fn(params, example)` is the example's negative
      log-likelihood of its own label (the example holds it); ``F = mean (∇ loss)²``.
    * ``'true'``: `loss_fn(params, example)` returns the example's logits, shape
      ``(num_classes,)``; labels are drawn ``y ~ softmax(logits)`` (`num_samples` draws per
      example, averaged; needs `key`) and ``F = mean (∇ log softmax(logits)[y])²``.
    * ``'max_label'``: as ``'true'`` with ``y = argmax logits``.

    Compute it in evaluation mode (no dropout) at the end-of-task parameters, and for multi-head
    models on the current head's logits only.

    Args:
        loss_fn: ``(params, example) -> scalar loss`` or ``-> logits``, see above.
        params: The parameters (the anchor ``θ*``).
        batch: A tree of arrays with a shared leading example axis of size ``n_F``.
        estimator: ``'empirical'``, ``'true'`` or ``'max_label'``. Static.
        key: PRNG key for ``'true'``.
        num_samples: Label draws per example for ``'true'``. Static.
        chunk_size: Examples per vmapped chunk (must divide ``n_F``); None: all at once. Static.

    Returns:
        A float32 tree with the structure of `params`, non-negative.

    Raises:
        ValueError: for an unknown estimator, a missing `key`, mismatched leading sizes, a
            `chunk_size` that does not divide the batch, or logits that are not 1-D.

    Example:
        >>> loss = lambda p, ex: 0.5 * (p["w"] @ ex["x"] - ex["y"]) ** 2
        >>> batch = {"x": jnp.eye(2), "y": jnp.zeros(2)}
        >>> cljax.fisher_diagonal(loss, {"w": jnp.ones(2)}, batch)["w"]
        Array([0.5, 0.5], dtype=float32)

    References:
        Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
    """
    fn = "fisher_diagonal"
    _checks.check_choice(fn, "estimator", estimator, _ESTIMATORS)
    _checks.check_int(fn, "num_samples", num_samples, 1)
    if chunk_size is not None:
        _checks.check_int(fn, "chunk_size", chunk_size, 1)

    def squared(tree):
        return jax.tree.map(lambda g: jnp.square(g.astype(_f32)), tree)

    if estimator == "empirical":
        per_example = lambda p, ex: squared(jax.grad(loss_fn)(p, ex))
        return _mean_over_examples(fn, per_example, params, batch, chunk_size)

    def nll(p, ex, label):
        logits = loss_fn(p, ex)
        if jnp.ndim(logits) != 1:
            raise ValueError(
                f"{fn}(estimator={estimator!r}): `loss_fn` must return one example's logits of shape "
                f"(num_classes,), got shape {jnp.shape(logits)}."
            )
        return -jax.nn.log_softmax(logits.astype(_f32))[label]

    if estimator == "max_label":

        def per_example(p, ex):
            label = jnp.argmax(lax.stop_gradient(loss_fn(p, ex)))
            return squared(jax.grad(nll)(p, ex, label))

        return _mean_over_examples(fn, per_example, params, batch, chunk_size)

    if key is None:
        raise ValueError(f"{fn}(estimator='true') needs `key` to sample labels from the model.")
    n = _num_examples(fn, batch)
    keys = jax.random.split(key, n)

    def per_example_true(p, item):
        ex, k = item
        logits = lax.stop_gradient(loss_fn(p, ex))
        labels = jax.random.categorical(k, logits.astype(_f32), shape=(num_samples,))
        grads = jax.vmap(lambda y: squared(jax.grad(nll)(p, ex, y)))(labels)
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)

    return _mean_over_examples(fn, per_example_true, params, (batch, keys), chunk_size)


def mas_importance(
    output_fn: Callable[[Any, Any], Any],
    params: Any,
    inputs: Any,
    *,
    per_sample: bool = True,
    chunk_size: int | None = None,
) -> Any:
    """Returns MAS importance ``Ω = mean_x |∂ ‖f(x)‖₂² / ∂θ|`` (labels are never used).

    `output_fn(params, example)` returns the network output (logits) for one example (any
    shape; the squared L2 norm is over all its entries). With ``per_sample=True`` (the paper)
    the absolute value is taken per example before averaging; with ``per_sample=False`` it is
    ``|∂ mean_x ‖f(x)‖₂² / ∂θ|``, the batch form of common implementations (whose mean of
    squares over the outputs differs from this by a constant factor, the output size).

    Args:
        output_fn: ``(params, example) -> outputs``.
        params: The parameters at the end of the task.
        inputs: A tree of arrays with a shared leading example axis (inputs only).
        per_sample: Absolute value per example (paper) or of the batch gradient. Static.
        chunk_size: Examples per vmapped chunk (must divide the batch); None: all at once.
            Static.

    Returns:
        A float32 tree with the structure of `params`, non-negative.

    Raises:
        ValueError: for mismatched leading sizes or a `chunk_size` that does not divide them.

    Example:
        >>> f = lambda p, x: p["w"] * x
        >>> cljax.mas_importance(f, {"w": jnp.ones(2)}, jnp.ones((3, 2)))["w"]
        Array([2., 2.], dtype=float32)

    References:
        Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018.
        https://arxiv.org/abs/1711.09601
    """
    fn = "mas_importance"
    if not isinstance(per_sample, bool):
        raise TypeError(f"{fn}(per_sample=...) must be a bool, got {per_sample!r}.")
    if chunk_size is not None:
        _checks.check_int(fn, "chunk_size", chunk_size, 1)

    def sq_norm(p, x):
        out = output_fn(p, x)
        return sum(jnp.sum(jnp.square(o.astype(_f32))) for o in jax.tree.leaves(out))

    if per_sample:
        per_example = lambda p, x: jax.tree.map(jnp.abs, jax.grad(sq_norm)(p, x))
        return _mean_over_examples(fn, per_example, params, inputs, chunk_size)
    mean_grad = _mean_over_examples(fn, jax.grad(sq_norm), params, inputs, chunk_size)
    return jax.tree.map(jnp.abs, mean_grad)
