"""SLCA (SP-23): a slow learner for the pre-trained representation, and classifier alignment.

* `slca` — the backbone's updates are scaled by ``ratio`` (its learning rate is ``ratio * eta``),
  the head's are not: two parameter groups of one optimizer.
* `slca_init_stats`, `slca_update_stats`, `slca_sample_features` — per-class feature means and
  covariances (full or diagonal) accumulated in a stream at a fixed number of classes, and
  Gaussian feature samples from them to re-train the classifier after each task.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.sparse import _common

__all__ = [
    "SlcaClassStats",
    "SlcaState",
    "slca",
    "slca_init_stats",
    "slca_sample_features",
    "slca_update_stats",
]

_F32 = jnp.float32


class SlcaState(NamedTuple):
    """State of `slca`."""

    inner_state: Any  # one optimizer state for the backbone and the head


def slca(
    inner: optax.GradientTransformation, *, head: Any, ratio: jax.typing.ArrayLike
) -> optax.GradientTransformationExtraArgs:
    """SLCA's slow learner: the backbone learns at ``ratio`` times the head's learning rate.

    `inner` (e.g. ``optax.sgd(eta, momentum=0.9)``) runs on every leaf with one state, and the
    final updates of the leaves outside `head` are multiplied by `ratio`. For an optimizer whose
    update is linear in its learning rate (every optax optimizer ending in
    `optax.scale_by_learning_rate`, decoupled weight decay included) this is exactly a backbone
    learning rate ``ratio * eta``, as two parameter groups of one PyTorch optimizer. The split
    is per leaf, never an element mask.

    Args:
        inner: Any optax optimizer with a learning rate; wrap the whole optimizer.
        head: A bool tree or a function of the params: the classifier leaves (full rate).
            Static.
        ratio: The backbone's learning-rate ratio ``rho >= 0`` (the card's value is about
            0.01, unverified; ``rho = 1`` is plain fine-tuning).

    Returns:
        A transform whose state is `SlcaState`.

    Raises:
        ValueError: a negative `ratio`; a `head` tree without an entry for a leaf.

    Example:
        >>> tx = cljax.slca(optax.sgd(1.0), head=cljax.select("head"), ratio=0.01)
        >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> [round(u, 6) for u in updates["body"].tolist()], updates["head"].tolist()
        ([-0.01, -0.01], [-1.0, -1.0])

    References:
        Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
        Pre-trained Model", ICCV 2023. https://arxiv.org/abs/2303.05118
    """
    fn = "slca"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_in_range(fn, "ratio", ratio, 0.0)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SlcaState(inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        flags = _common.bool_tree(fn, "head", head, updates)
        directions, inner_state = inner.update(updates, state.inner_state, params, **extra_args)

        def scale(u, is_head):
            if u is None or is_head:
                return u
            return (u.astype(_F32) * jnp.asarray(ratio, _F32)).astype(u.dtype)

        out = jax.tree.map(scale, directions, flags, is_leaf=_common.is_none)
        return out, SlcaState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Classifier alignment: streamed per-class Gaussian statistics.


class SlcaClassStats(NamedTuple):
    """Per-class feature statistics for SLCA's classifier alignment (float32)."""

    count: jax.Array  # (C,) examples seen per class
    mean: jax.Array  # (C, d) running mean
    m2: jax.Array  # (C, d, d) or (C, d): summed outer products (squares) of deviations


def slca_init_stats(
    num_classes: int, dim: int, *, covariance: Literal["full", "diag"] = "full"
) -> SlcaClassStats:
    """Empty per-class feature statistics at a fixed number of classes.

    Args:
        num_classes: Number of classes ``C`` over all tasks (the capacity). Static.
        dim: Feature dimension ``d``. Static.
        covariance: ``'full'`` (``C * d * d`` floats) or ``'diag'`` (``C * d``). Static.

    Returns:
        A `SlcaClassStats` of zeros.

    Raises:
        ValueError: a non-positive size or an unknown covariance type.

    Example:
        >>> cljax.slca_init_stats(10, 4, covariance="diag").m2.shape
        (10, 4)
    """
    fn = "slca_init_stats"
    _checks.check_int(fn, "num_classes", num_classes, 1)
    _checks.check_int(fn, "dim", dim, 1)
    _checks.check_choice(fn, "covariance", covariance, ("full", "diag"))
    m2_shape = (num_classes, dim, dim) if covariance == "full" else (num_classes, dim)
    return SlcaClassStats(
        count=jnp.zeros((num_classes,), _F32),
        mean=jnp.zeros((num_classes, dim), _F32),
        m2=jnp.zeros(m2_shape, _F32),
    )


def slca_update_stats(stats: SlcaClassStats, features: Any, labels: Any) -> SlcaClassStats:
    """Adds a batch of features to the per-class statistics (streamed, exact in exact arithmetic).

    Batch statistics per class are merged with the running ones by the parallel update
    ``n = n_a + n_b``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta delta^T * n_a n_b / n``, so any split into batches gives the
    statistics of the whole data. Labels outside ``[0, C)`` are ignored. Jittable.

    Args:
        stats: From `slca_init_stats` or an earlier update.
        features: ``(N, d)`` features of a batch (e.g. the backbone's penultimate layer).
        labels: ``(N,)`` integer class labels.

    Returns:
        The updated `SlcaClassStats`.

    Raises:
        ValueError: features not ``(N, d)`` or labels not ``(N,)``.

    Example:
        >>> stats = cljax.slca_init_stats(2, 1)
        >>> stats = cljax.slca_update_stats(stats, jnp.array([[1.0], [3.0]]), jnp.array([0, 0]))
        >>> stats.mean[0].tolist(), stats.m2[0].tolist()
        ([2.0], [[2.0]])
    """
    fn = "slca_update_stats"
    num_classes, dim = stats.mean.shape
    features = jnp.asarray(features, _F32)
    labels = jnp.asarray(labels)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(
            f"{fn}(features=...) must have shape (N, {dim}), got {tuple(features.shape)}."
        )
    if labels.shape != features.shape[:1]:
        raise ValueError(
            f"{fn}(labels=...) must have shape ({features.shape[0]},), got {tuple(labels.shape)}."
        )
    onehot = jax.nn.one_hot(labels, num_classes, dtype=_F32)  # (N, C); out of range: zeros
    n_b = jnp.sum(onehot, axis=0)
    safe_b = jnp.where(n_b > 0, n_b, 1.0)
    mean_b = (onehot.T @ features) / safe_b[:, None]
    centered = features - onehot @ mean_b  # deviation from the example's own class mean
    full = stats.m2.ndim == 3
    if full:
        m2_b = jnp.einsum("nc,ni,nj->cij", onehot, centered, centered)
    else:
        m2_b = onehot.T @ (centered * centered)
    n_a = stats.count
    n = n_a + n_b
    safe_n = jnp.where(n > 0, n, 1.0)
    delta = mean_b - stats.mean
    mean = stats.mean + delta * (n_b / safe_n)[:, None]
    weight = n_a * n_b / safe_n
    if full:
        cross = delta[:, :, None] * delta[:, None, :] * weight[:, None, None]
    else:
        cross = delta * delta * weight[:, None]
    return SlcaClassStats(count=n, mean=mean, m2=stats.m2 + m2_b + cross)


def slca_sample_features(
    stats: SlcaClassStats, key: jax.Array, num_per_class: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws features from each class's Gaussian ``N(mean_c, cov_c)`` to re-train the head.

    ``cov_c = M2_c / (n_c - 1)`` (zero for classes with fewer than two examples); samples are
    ``mean_c + cov_c^{1/2} z`` with the symmetric square root from an eigendecomposition (clipped
    at zero), so singular covariances give finite samples. Every class is sampled (fixed
    shapes); `valid` marks the classes seen at least once, to weight the alignment loss.

    Args:
        stats: Per-class statistics from `slca_update_stats`.
        key: A PRNG key.
        num_per_class: Samples per class. Static.

    Returns:
        ``(features, labels, valid)`` of shapes ``(C * num_per_class, d)``,
        ``(C * num_per_class,)`` int32 and ``(C * num_per_class,)`` bool, class-major.

    Raises:
        ValueError: `num_per_class` below 1.

    Example:
        >>> stats = cljax.slca_init_stats(3, 2)
        >>> x, y, valid = cljax.slca_sample_features(stats, jax.random.key(0), 4)
        >>> x.shape, y.shape, bool(valid.any())
        ((12, 2), (12,), False)
    """
    fn = "slca_sample_features"
    _checks.check_int(fn, "num_per_class", num_per_class, 1)
    num_classes, dim = stats.mean.shape
    denom = jnp.where(stats.count > 1, stats.count - 1.0, 1.0)
    seen_twice = stats.count > 1
    z = jax.random.normal(key, (num_classes, num_per_class, dim), _F32)
    if stats.m2.ndim == 3:
        cov = stats.m2 / denom[:, None, None]
        cov = jnp.where(seen_twice[:, None, None], 0.5 * (cov + jnp.swapaxes(cov, 1, 2)), 0.0)
        vals, vecs = jnp.linalg.eigh(cov)
        root = (vecs * jnp.sqrt(jnp.maximum(vals, 0.0))[:, None, :]) @ jnp.swapaxes(vecs, 1, 2)
        noise = jnp.einsum("cij,cnj->cni", root, z)
    else:
        var = jnp.where(seen_twice[:, None], stats.m2 / denom[:, None], 0.0)
        noise = z * jnp.sqrt(jnp.maximum(var, 0.0))[:, None, :]
    features = (stats.mean[:, None, :] + noise).reshape(num_classes * num_per_class, dim)
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), num_per_class)
    valid = jnp.repeat(stats.count > 0, num_per_class)
    return features, labels, valid
