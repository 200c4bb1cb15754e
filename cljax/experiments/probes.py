"""Representation probes, class-mean classifiers and iCaRL's exemplar memory (EX-13, EX-16, EX-20).

Tools that look at a model through its **features** (an ``(n, d)`` matrix per batch of inputs),
not through its logits:

* **Feature similarity and probes (EX-13).** `linear_cka` and `rbf_cka` compare two feature
  matrices of the same ``n`` examples (e.g. the initial and the final feature extractor of a
  class-incremental run); `linear_probe` fits a linear classifier on frozen features in closed
  form (ridge regression on one-hot targets), so probes on different extractors get exactly the
  same, deterministic budget.
* **Nearest class mean on frozen features (EX-20).** `ClassMeans` holds per-class running sums
  and counts; `class_means_init`, `class_means_update` (one batch, jittable) and `class_means`
  build it from a stream without exemplars or task boundaries; `nearest_mean_predict` classifies;
  `nmc_accuracy_matrix` runs the whole protocol on a `Stream` and returns the accuracy matrix
  that `cljax.experiments.metrics.summarize` reads.
* **iCaRL protocol pieces (EX-16).** `herding_select` orders a class's examples by iCaRL's
  herding; `exemplars_per_class` is the per-class share of a fixed total memory;
  `ExemplarMemory`, `exemplar_memory_init` and `icarl_memory_update` keep a fixed-size exemplar
  memory over a class-incremental stream (old classes truncated to their herding prefix, new
  classes selected by herding). Nearest-mean-of-exemplars classification is `class_means_update`
  on the memory (empty slots carry label -1 and are ignored) followed by `nearest_mean_predict`.
  No training loop or distillation loss lives here.

All array math is float32 (features of any float or integer dtype are cast); ``jax.jit`` works
on the per-batch functions (`linear_cka`, `rbf_cka`, `class_means_update`, `class_means`,
`nearest_mean_predict`) since every check is on static shapes and dtypes.

References:
    Kornblith, Norouzi, Lee and Hinton, "Similarity of Neural Network Representations
    Revisited", ICML 2019. https://arxiv.org/abs/1905.00414

    Rebuffi, Kolesnikov, Sperl and Lampert, "iCaRL: Incremental Classifier and Representation
    Learning", CVPR 2017. https://arxiv.org/abs/1611.07725

    Janson et al., "A Simple Baseline that Questions the Use of Pretrained-Models in Continual
    Learning", 2023. https://arxiv.org/abs/2210.04428

    Kim and Han, "On the Stability-Plasticity Dilemma of Class-Incremental Learning", CVPR 2023.
    https://arxiv.org/abs/2304.01663
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ClassMeans",
    "ExemplarMemory",
    "LinearProbe",
    "class_means",
    "class_means_init",
    "class_means_update",
    "exemplar_memory_init",
    "exemplars_per_class",
    "herding_select",
    "icarl_memory_update",
    "linear_cka",
    "linear_probe",
    "nearest_mean_predict",
    "nmc_accuracy_matrix",
    "rbf_cka",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Validation.


def _check_int(fn: str, arg: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}({arg}=...) must be an int, got {type(value).__name__} {value!r}.")
    if value < low:
        raise ValueError(f"{fn}({arg}=...) must be >= {low}, got {value}.")
    return int(value)


def _check_positive(fn: str, arg: str, value: Any) -> Any:
    if isinstance(value, jax.core.Tracer):  # under jit: cannot be checked
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}({arg}=...) must be a number, got {value!r}.") from None
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(f"{fn}({arg}=...) must be a finite number > 0, got {number}.")
    return number


def _numeric(fn: str, name: str, x: Any) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{fn}: `{name}` must hold real numbers, got dtype {x.dtype}.")
    return x


def _features(fn: str, name: str, x: Any, dim: int | None = None) -> jax.Array:
    """Checks an ``(n, d)`` feature matrix and returns it as float32."""
    x = _numeric(fn, name, x)
    if x.ndim != 2:
        raise ValueError(
            f"{fn}: `{name}` has shape {tuple(x.shape)}; it must be an (n, d) feature matrix "
            "(one row per example). Flatten the feature axes first."
        )
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{fn}: `{name}` has shape {tuple(x.shape)}; expected {dim} features.")
    return jnp.asarray(x, jnp.float32)


def _labels(fn: str, name: str, y: Any, n: int) -> jax.Array:
    if not hasattr(y, "shape") or not hasattr(y, "dtype"):
        y = np.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{fn}: `{name}` must hold integer class ids, got dtype {y.dtype}.")
    if tuple(y.shape) != (n,):
        raise ValueError(
            f"{fn}: `{name}` has shape {tuple(y.shape)}; expected ({n},), one label per example."
        )
    return jnp.asarray(y, jnp.int32)


def _concrete(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array, or None for a tracer (values cannot be checked under jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_label_range(fn: str, name: str, y: Any, num_classes: int) -> None:
    values = _concrete(y)
    if values is not None and values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(
            f"{fn}: `{name}` holds labels in [{values.min()}, {values.max()}]; every label must "
            f"be in [0, {num_classes}) (num_classes={num_classes})."
        )


def _l2_normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x / jnp.where(norm > 0, norm, 1.0)


# ---------------------------------------------------------------------------------------------
# CKA (EX-13).


def _centre_and_scale(x: jax.Array) -> jax.Array:
    """Column-centred copy of `x`, scaled to max |entry| 1 (CKA ignores the scale).

    Subtracting the first row before the mean makes constant columns exactly zero.
    """
    x = x - x[:1]
    x = x - jnp.mean(x, axis=0, keepdims=True)
    peak = jnp.max(jnp.abs(x))
    return x / jnp.where(peak > 0, peak, 1.0)


def _cka_ratio(cross: jax.Array, norm_x: jax.Array, norm_y: jax.Array) -> jax.Array:
    """``cross / (norm_x norm_y)`` in [0, 1]; 1 when both sides are degenerate, 0 when one is."""
    denom = norm_x * norm_y
    degenerate = jnp.where((norm_x == 0) & (norm_y == 0), 1.0, 0.0)
    value = jnp.where(denom > 0, cross / jnp.where(denom > 0, denom, 1.0), degenerate)
    return jnp.clip(value, 0.0, 1.0).astype(jnp.float32)


def _pair(fn: str, x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    x = _features(fn, "x", x)
    y = _features(fn, "y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{fn}: `x` has shape {tuple(x.shape)} and `y` {tuple(y.shape)}; both must hold the "
            "same examples (the same number of rows)."
        )
    if x.shape[0] < 2:
        raise ValueError(f"{fn}: needs at least 2 examples, got `x` of shape {tuple(x.shape)}.")
    return x, y


def linear_cka(x: Any, y: Any) -> jax.Array:
    """Linear CKA between two feature matrices of the same examples.

    With ``Xc``, ``Yc`` the column-centred features,
    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, computed in feature space or,
    when cheaper, through the ``(n, n)`` Gram matrices (the same number). It is 1 for identical
    features, symmetric, in [0, 1], and invariant to orthogonal transforms and isotropic scaling
    of either argument (not to arbitrary invertible linear maps).

    Degenerate case (0/0): a constant feature matrix (every row equal) has no centred variance.
    Then CKA is 1 when both `x` and `y` are constant (both induce the same, trivial similarity
    structure, so ``linear_cka(x, x) == 1`` for every `x`) and 0 when only one of them is.

    Args:
        x: ``(n, d1)`` features (rows are examples; float or integer; computed in float32).
        y: ``(n, d2)`` features of the same ``n >= 2`` examples, in the same order.

    Returns:
        A float32 scalar in [0, 1].

    Raises:
        ValueError: when `x` or `y` is not 2-D, the row counts differ, or ``n < 2``.
        TypeError: for non-numeric input.

    Example:
        >>> from cljax.experiments.probes import linear_cka
        >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
        >>> # second value: Xc^T Xc = [[2, 1], [1, 2]], Yc^T Yc = 2, ||Yc^T Xc||^2 = 5: 5 / (2 sqrt 10)
        >>> round(float(linear_cka(x, 3.0 * x)), 4), round(float(linear_cka(x, x[:, :1])), 4)
        (1.0, 0.7906)

    References:
        Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019.
    """
    x, y = _pair("linear_cka", x, y)
    return _linear_cka(x, y)


@jax.jit
def _linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    x, y = _centre_and_scale(x), _centre_and_scale(y)
    n, d1 = x.shape
    d2 = y.shape[1]
    if d1 * d2 + d1 * d1 + d2 * d2 <= n * (d1 + d2 + 1):  # static: shapes only
        cross = jnp.sum(jnp.square(jnp.matmul(y.T, x, precision=_HIGHEST)))
        norm_x = jnp.linalg.norm(jnp.matmul(x.T, x, precision=_HIGHEST))
        norm_y = jnp.linalg.norm(jnp.matmul(y.T, y, precision=_HIGHEST))
    else:
        kx = jnp.matmul(x, x.T, precision=_HIGHEST)  # centred columns: already a centred Gram
        ky = jnp.matmul(y, y.T, precision=_HIGHEST)
        cross, norm_x, norm_y = jnp.sum(kx * ky), jnp.linalg.norm(kx), jnp.linalg.norm(ky)
    return _cka_ratio(cross, norm_x, norm_y)


def _rbf_gram(x: jax.Array, sigma_frac: float) -> jax.Array:
    n = x.shape[0]
    sq = jnp.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(x, x.T, precision=_HIGHEST)
    diagonal = jnp.eye(n, dtype=bool)
    d2 = jnp.where(diagonal, 0.0, jnp.maximum(0.5 * (d2 + d2.T), 0.0))
    dist = jnp.sqrt(d2)
    # Every pair i < j appears twice off the diagonal: the median of that doubled multiset is
    # the median over pairs.
    median = jnp.nanmedian(jnp.where(diagonal, jnp.nan, dist))
    positive = (dist > 0) & ~diagonal
    mean_positive = jnp.sum(jnp.where(positive, dist, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
    scale = jnp.where(median > 0, median, jnp.where(jnp.any(positive), mean_positive, 1.0))
    sigma = sigma_frac * scale
    return jnp.exp(-d2 / (2.0 * sigma * sigma))


def _centre_gram(k: jax.Array) -> jax.Array:
    """``H K H`` with ``H = I - 11^T / n``."""
    return (
        k
        - jnp.mean(k, axis=0, keepdims=True)
        - jnp.mean(k, axis=1, keepdims=True)
        + jnp.mean(k, keepdims=True)
    )


def rbf_cka(x: Any, y: Any, *, sigma_frac: float = 0.8) -> jax.Array:
    """Kernel CKA with Gaussian (RBF) kernels between two feature matrices.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``HSIC(K, L) = tr(K H L H) / (n-1)^2``,
    ``H = I - 11^T / n`` and ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))``. The bandwidth of
    each argument is its own ``sigma = sigma_frac * median_{i<j} ||x_i - x_j||`` (Kornblith et
    al. set sigma as a fraction of the median distance between examples); when that median is
    0 (more than half the pairs coincide) the mean of the non-zero distances is used instead.
    The value depends on `sigma_frac` and differs from `linear_cka`: report which one you use.

    Degenerate case: constant features give ``H K H = 0``; as in `linear_cka`, CKA is then 1
    when both arguments are constant and 0 when only one is.

    Args:
        x: ``(n, d1)`` features (float32 math).
        y: ``(n, d2)`` features of the same ``n >= 2`` examples, in the same order.
        sigma_frac: Bandwidth as a fraction of the median pairwise distance (> 0).

    Returns:
        A float32 scalar in [0, 1]; invariant to translations, orthogonal transforms and
        isotropic scaling of either argument (the bandwidth scales with the distances).
        Memory and time grow as ``n^2``: subsample the examples for large ``n``.

    Raises:
        ValueError: for non-2-D input, different row counts, ``n < 2`` or ``sigma_frac <= 0``.

    Example:
        >>> from cljax.experiments.probes import rbf_cka
        >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [3.0, 1.0]])
        >>> round(float(rbf_cka(x, 2.0 * x + 1.0)), 4)
        1.0

    References:
        Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019.
    """
    sigma_frac = _check_positive("rbf_cka", "sigma_frac", sigma_frac)
    x, y = _pair("rbf_cka", x, y)
    return _rbf_cka(x, y, jnp.float32(sigma_frac))


@jax.jit
def _rbf_cka(x: jax.Array, y: jax.Array, sigma_frac: jax.Array) -> jax.Array:
    kx = _centre_gram(_rbf_gram(_centre_and_scale(x), sigma_frac))
    ky = _centre_gram(_rbf_gram(_centre_and_scale(y), sigma_frac))
    return _cka_ratio(jnp.sum(kx * ky), jnp.linalg.norm(kx), jnp.linalg.norm(ky))


# ---------------------------------------------------------------------------------------------
# Linear probe (EX-13).


class LinearProbe(NamedTuple):
    """Result of `linear_probe`: test accuracy, weights ``(d, C)`` and bias ``(C,)``.

    Example:
        >>> from cljax.experiments.probes import linear_probe
        >>> x, y = jnp.eye(3), jnp.arange(3)
        >>> linear_probe(x, y, x, y, num_classes=3).weights.shape
        (3, 3)
    """

    accuracy: jax.Array  # () float32: test accuracy (fraction)
    weights: jax.Array  # (d, C) float32
    bias: jax.Array  # (C,) float32; predictions are argmax(features @ weights + bias)


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    num_classes: int,
    l2: float = 1e-3,
) -> LinearProbe:
    """Fits a linear classifier on frozen features in closed form; test accuracy.

    Ridge regression of the one-hot targets ``Y`` on the features with an unpenalized bias:
    ``W = (Xc^T Xc + lam I)^{-1} Xc^T Yc`` and ``b = mean(Y) - mean(X) W`` (``Xc``, ``Yc``
    centred), solved by Cholesky in the primal ``(d, d)`` or, when ``d > n``, the dual
    ``(n, n)`` form (the same solution). The penalty is relative to the feature scale:
    ``lam = l2 * tr(Xc^T Xc) / d`` (the mean eigenvalue), so rescaling the features does not
    change the predictions. There is no iteration, learning rate or seed: probes of the
    initial and the final feature extractor get exactly the same budget (EX-13), and the same
    inputs always give the same probe.

    Args:
        train_features: ``(n, d)`` frozen features of the probe's training set; it must cover
            every class the probe is asked about (all classes seen so far).
        train_labels: ``(n,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(m, d)`` features of the evaluation set.
        test_labels: ``(m,)`` integer labels in ``[0, num_classes)``.
        num_classes: Number of outputs ``C``. Static.
        l2: Relative ridge penalty (> 0).

    Returns:
        A `LinearProbe` ``(accuracy, weights, bias)``. Under ``jax.jit`` labels cannot be
        checked: an out-of-range training label gets an all-zero target and an out-of-range
        test label counts as an error.

    Raises:
        ValueError: for mismatched shapes, labels outside ``[0, num_classes)``, test classes
            absent from the training labels, or ``l2 <= 0``.
        TypeError: for non-integer labels or a non-int `num_classes`.

    Example:
        >>> from cljax.experiments.probes import linear_probe
        >>> x = jnp.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [1.1, 0.9]])
        >>> y = jnp.array([0, 0, 1, 1])
        >>> float(linear_probe(x, y, x, y, num_classes=2).accuracy)
        1.0
    """
    fn = "linear_probe"
    num_classes = _check_int(fn, "num_classes", num_classes, 1)
    l2 = _check_positive(fn, "l2", l2)
    x = _features(fn, "train_features", train_features)
    x_test = _features(fn, "test_features", test_features, dim=x.shape[1])
    y = _labels(fn, "train_labels", train_labels, x.shape[0])
    y_test = _labels(fn, "test_labels", test_labels, x_test.shape[0])
    if x.shape[0] < 1 or x_test.shape[0] < 1:
        raise ValueError(
            f"{fn}: needs at least one training and one test example, got `train_features` of "
            f"shape {tuple(x.shape)} and `test_features` of shape {tuple(x_test.shape)}."
        )
    _check_label_range(fn, "train_labels", train_labels, num_classes)
    _check_label_range(fn, "test_labels", test_labels, num_classes)
    train_values, test_values = _concrete(train_labels), _concrete(test_labels)
    if train_values is not None and test_values is not None:
        missing = np.setdiff1d(test_values, train_values)
        if missing.size:
            raise ValueError(
                f"{fn}: test classes {missing.tolist()} never appear in `train_labels`; the probe "
                "must be trained on every class it is evaluated on (all classes seen so far)."
            )
    return _linear_probe(x, y, x_test, y_test, jnp.float32(l2), num_classes)


@functools.partial(jax.jit, static_argnums=5)
def _linear_probe(x, y, x_test, y_test, l2, num_classes) -> LinearProbe:
    n, d = x.shape
    mean_x = jnp.mean(x, axis=0, keepdims=True)
    targets = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    mean_t = jnp.mean(targets, axis=0, keepdims=True)
    xc, tc = x - mean_x, targets - mean_t
    trace = jnp.sum(xc * xc)
    lam = l2 * jnp.where(trace > 0, trace / d, 1.0)
    if d <= n:  # static: primal (d, d) system
        gram = jnp.matmul(xc.T, xc, precision=_HIGHEST) + lam * jnp.eye(d, dtype=jnp.float32)
        rhs = jnp.matmul(xc.T, tc, precision=_HIGHEST)
        weights = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), rhs)
    else:  # dual (n, n) system
        gram = jnp.matmul(xc, xc.T, precision=_HIGHEST) + lam * jnp.eye(n, dtype=jnp.float32)
        alpha = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), tc)
        weights = jnp.matmul(xc.T, alpha, precision=_HIGHEST)
    bias = (mean_t - jnp.matmul(mean_x, weights, precision=_HIGHEST))[0]
    logits = jnp.matmul(x_test, weights, precision=_HIGHEST) + bias[None, :]
    predictions = jnp.argmax(logits, axis=1)
    accuracy = jnp.mean((predictions == y_test).astype(jnp.float32))
    return LinearProbe(accuracy, weights, bias)


# ---------------------------------------------------------------------------------------------
# Nearest class mean (EX-20).


class ClassMeans(NamedTuple):
    """Per-class feature sums and counts: the state of a nearest-class-mean head.

    Example:
        >>> from cljax.experiments.probes import ClassMeans, class_means_init
        >>> isinstance(class_means_init(3, 2), ClassMeans)
        True
    """

    sums: jax.Array  # (C, d) float32: sum of the absorbed features of each class
    counts: jax.Array  # (C,) int32: examples absorbed per class; 0 = class never seen


def class_means_init(num_classes: int, dim: int) -> ClassMeans:
    """Empty class-mean state for `num_classes` classes of `dim` features.

    Args:
        num_classes: Number of classes ``C`` (the stream's output space). Static.
        dim: Feature dimension ``d``. Static.

    Raises:
        TypeError: for non-int sizes. ValueError: for sizes below 1.

    Example:
        >>> from cljax.experiments.probes import class_means_init
        >>> class_means_init(3, 2).sums.shape
        (3, 2)
    """
    num_classes = _check_int("class_means_init", "num_classes", num_classes, 1)
    dim = _check_int("class_means_init", "dim", dim, 1)
    return ClassMeans(
        jnp.zeros((num_classes, dim), jnp.float32), jnp.zeros((num_classes,), jnp.int32)
    )


def _check_state(fn: str, state: Any) -> None:
    if not isinstance(state, ClassMeans):
        raise TypeError(f"{fn}: `state` must be a ClassMeans, got {type(state).__name__}.")
    if state.sums.ndim != 2 or state.counts.shape != state.sums.shape[:1]:
        raise ValueError(
            f"{fn}: `state` has sums {tuple(state.sums.shape)} and counts "
            f"{tuple(state.counts.shape)}; expected (C, d) and (C,). Build it with class_means_init."
        )


def class_means_update(state: ClassMeans, features: Any, labels: Any) -> ClassMeans:
    """Adds one batch of features to the per-class running sums and counts.

    Sums are order-free: any permutation of the stream and any split into batches give the same
    class means up to float32 rounding, and streaming over batches equals one big batch.
    Labels outside ``[0, C)`` (e.g. -1 for padding rows or empty memory slots) are ignored:
    those rows change neither sums nor counts, whatever their features hold.

    Args:
        state: The `ClassMeans` so far.
        features: ``(n, d)`` features (cast to float32).
        labels: ``(n,)`` integer class ids.

    Returns:
        The updated `ClassMeans` (jittable; shapes and dtypes never change).

    Raises:
        ValueError: when `features` is not ``(n, d)`` with the state's ``d`` or `labels` is
            not ``(n,)``. TypeError: for non-integer labels.

    Example:
        >>> from cljax.experiments.probes import class_means_init, class_means_update
        >>> state = class_means_init(2, 1)
        >>> state = class_means_update(state, jnp.array([[1.0], [3.0], [9.0]]), jnp.array([1, 1, -1]))
        >>> state.sums.tolist(), state.counts.tolist()
        ([[0.0], [4.0]], [0, 2])
    """
    fn = "class_means_update"
    _check_state(fn, state)
    num_classes, dim = state.sums.shape
    x = _features(fn, "features", features, dim=dim)
    y = _labels(fn, "labels", labels, x.shape[0])
    return _class_means_update(state, x, y)


@jax.jit
def _class_means_update(state: ClassMeans, x: jax.Array, y: jax.Array) -> ClassMeans:
    num_classes = state.sums.shape[0]
    valid = (y >= 0) & (y < num_classes)
    index = jnp.where(valid, y, 0)
    x = jnp.where(valid[:, None], x, 0.0)
    sums = jax.ops.segment_sum(x, index, num_segments=num_classes)
    counts = jax.ops.segment_sum(valid.astype(jnp.int32), index, num_segments=num_classes)
    return ClassMeans(state.sums + sums, state.counts + counts)


def class_means(state: ClassMeans) -> jax.Array:
    """Mean feature of every class, ``sums / counts``; zeros for classes never seen.

    A zero row is only a placeholder: `nearest_mean_predict` given the state never predicts a
    class with count 0.

    Example:
        >>> from cljax.experiments.probes import class_means, class_means_init, class_means_update
        >>> state = class_means_update(class_means_init(2, 1), jnp.array([[1.0], [3.0]]), jnp.array([1, 1]))
        >>> class_means(state).tolist()
        [[0.0], [2.0]]
    """
    _check_state("class_means", state)
    return _class_means(state.sums, state.counts)


@jax.jit
def _class_means(sums: jax.Array, counts: jax.Array) -> jax.Array:
    counts = counts.astype(jnp.float32)[:, None]
    return sums / jnp.where(counts > 0, counts, 1.0)


def nearest_mean_predict(
    means_or_state: Any, features: Any, *, normalize: bool = True, valid: Any = None
) -> jax.Array:
    """Predicts the class whose mean is nearest to each feature vector.

    With ``normalize=True`` (the default, as iCaRL's nearest-mean-of-exemplars) both the
    features and the class means are scaled to unit L2 norm before the distance, so the nearest
    mean is the one of highest cosine similarity; with ``normalize=False`` the raw features and
    means are compared. The two give different results (EX-20's fidelity trap): use one setting
    for the whole run and report it. Ties go to the lowest class id.

    Args:
        means_or_state: A `ClassMeans` state (classes with count 0 are never predicted) or a
            ``(C, d)`` array of means (every class is a candidate).
        features: ``(n, d)`` features of the examples to classify.
        normalize: Whether to L2-normalize features and means. Static.
        valid: Optional ``(C,)`` boolean mask of the candidate classes (e.g. the evaluated task's
            classes for task-incremental accuracy), combined with the state's seen classes.

    Returns:
        ``(n,)`` int32 class ids; -1 for every example when no class is a candidate.

    Raises:
        ValueError: for mismatched shapes.

    Example:
        >>> from cljax.experiments.probes import nearest_mean_predict
        >>> means = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> nearest_mean_predict(means, jnp.array([[5.0, 1.0], [0.0, 0.1]])).tolist()
        [0, 1]
    """
    fn = "nearest_mean_predict"
    if isinstance(means_or_state, ClassMeans):
        means = class_means(means_or_state)
        candidates = means_or_state.counts > 0
    else:
        means = _features(fn, "means_or_state", means_or_state)
        candidates = jnp.ones(means.shape[:1], bool)
    num_classes, dim = means.shape
    x = _features(fn, "features", features, dim=dim)
    if valid is not None:
        if not hasattr(valid, "shape"):
            valid = np.asarray(valid)
        if tuple(valid.shape) != (num_classes,):
            raise ValueError(
                f"{fn}: `valid` has shape {tuple(valid.shape)}; expected ({num_classes},), one "
                "flag per class."
            )
        candidates = candidates & jnp.asarray(valid, bool)
    return _nearest_mean(means, candidates, x, bool(normalize))


@functools.partial(jax.jit, static_argnums=3)
def _nearest_mean(means, candidates, x, normalize) -> jax.Array:
    if normalize:
        x, means = _l2_normalize(x), _l2_normalize(means)
    sq_x = jnp.sum(x * x, axis=1)
    sq_m = jnp.sum(means * means, axis=1)
    dist = sq_x[:, None] + sq_m[None, :] - 2.0 * jnp.matmul(x, means.T, precision=_HIGHEST)
    dist = jnp.where(candidates[None, :], dist, jnp.inf)
    predictions = jnp.argmin(dist, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(candidates), predictions, -1)


def _padded_batches(
    fn: str, features_fn: Callable, x: np.ndarray, batch_size: int, dim: int | None
) -> list[tuple[jax.Array, int]]:
    """Features of `x` in batches of `batch_size` rows, the last one zero-padded."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        f = features_fn(chunk)
        if not hasattr(f, "shape"):
            f = np.asarray(f)
        if f.ndim != 2 or f.shape[0] != chunk.shape[0] or (dim is not None and f.shape[1] != dim):
            want = f"({chunk.shape[0]}, {dim if dim is not None else 'd'})"
            raise ValueError(
                f"{fn}: `features_fn` returned shape {tuple(f.shape)} for a batch of shape "
                f"{tuple(chunk.shape)}; expected {want}, one feature row per example."
            )
        rows, dim = f.shape
        padded = np.zeros((batch_size, dim), np.float32)  # on the host: one shape to compile
        padded[:rows] = np.asarray(f, np.float32)
        out.append((jnp.asarray(padded), rows))
    return out


def nmc_accuracy_matrix(
    stream: Any,
    features_fn: Callable[[Any], Any],
    *,
    normalize: bool = True,
    scenario: Literal["class", "task"] = "class",
    batch_size: int = 256,
) -> np.ndarray:
    """Accuracy matrix of nearest class mean on a frozen encoder over a stream.

    The protocol of EX-20: the encoder `features_fn` never changes; the training examples of
    task ``i`` are absorbed into the running class sums (`class_means_update`; no exemplars, no
    use of the boundary beyond the evaluation schedule), then every task's test split is
    classified with `nearest_mean_predict`. ``R[i, j]`` is the accuracy on task ``j`` after
    absorbing tasks ``0..i``. Class-IL (``scenario='class'``) chooses among all classes seen so
    far, so a class-split stream has ``R[i, j] = 0`` for ``j > i``; task-IL (``'task'``) chooses
    among the seen classes of the evaluated task. Features are computed in batches of
    `batch_size` rows (the last one padded, so everything compiles once).

    Args:
        stream: A classification `cljax.experiments.data.Stream`.
        features_fn: Maps a batch of inputs ``(b, *input_shape)`` to features ``(b, d)`` (NumPy
            or JAX; e.g. ``lambda x: x`` for raw pixels, or a frozen network's penultimate layer).
        normalize: L2-normalize features and means (see `nearest_mean_predict`). Static.
        scenario: ``'class'`` or ``'task'``.
        batch_size: Rows per call of `features_fn`.

    Returns:
        ``(T, T)`` float64 NumPy array for `cljax.experiments.metrics.summarize`.

    Raises:
        ValueError: for a language-model stream, an unknown `scenario`, an empty test split,
            or features that are not ``(b, d)`` with one ``d`` throughout.

    Example:
        >>> from cljax.experiments import data
        >>> from cljax.experiments.probes import nmc_accuracy_matrix
        >>> R = nmc_accuracy_matrix(data.split_digits(2), lambda x: x)
        >>> R.shape, bool(R[1, 0] > 0.8)
        ((2, 2), True)
    """
    fn = "nmc_accuracy_matrix"
    if getattr(stream, "kind", None) != "classification":
        raise ValueError(
            f"{fn}: `stream` must be a classification Stream, got kind "
            f"{getattr(stream, 'kind', type(stream).__name__)!r}."
        )
    if scenario not in ("class", "task"):
        raise ValueError(f"{fn}(scenario=...) must be 'class' or 'task', got {scenario!r}.")
    batch_size = _check_int(fn, "batch_size", batch_size, 1)
    num_classes, num_tasks = int(stream.num_classes), len(stream.tasks)
    for task in stream.tasks:
        if len(task.y_test) == 0:
            raise ValueError(f"{fn}: task {task.name!r} has an empty test split.")
    state, dim = None, None
    test_features: dict[int, list[tuple[jax.Array, int]]] = {}
    R = np.zeros((num_tasks, num_tasks))
    for i, task in enumerate(stream.tasks):
        labels = np.asarray(task.y_train, np.int32)
        for b, (f, rows) in enumerate(
            _padded_batches(fn, features_fn, np.asarray(task.x_train), batch_size, dim)
        ):
            dim = f.shape[1]
            if state is None:
                state = class_means_init(num_classes, dim)
            y = np.full(batch_size, -1, np.int32)
            y[:rows] = labels[b * batch_size : b * batch_size + rows]
            state = class_means_update(state, f, y)
        if state is None:  # nothing absorbed yet: nothing can be predicted
            continue
        for j, other in enumerate(stream.tasks):
            if j not in test_features:
                test_features[j] = _padded_batches(
                    fn, features_fn, np.asarray(other.x_test), batch_size, dim
                )
            valid = None
            if scenario == "task":
                valid = np.zeros(num_classes, bool)
                valid[list(other.classes)] = True
            predictions = np.concatenate(
                [
                    np.asarray(nearest_mean_predict(state, f, normalize=normalize, valid=valid))[
                        :rows
                    ]
                    for f, rows in test_features[j]
                ]
            )
            R[i, j] = float(np.mean(predictions == np.asarray(other.y_test)))
    return R


# ---------------------------------------------------------------------------------------------
# iCaRL exemplar memory (EX-16).


@jax.jit
def _herding_order(x: jax.Array, valid: jax.Array, m: jax.Array) -> jax.Array:
    """First `m` herding picks among the `valid` rows of `x` (then -1): iCaRL's selection."""
    n, dim = x.shape
    phi = jnp.where(valid[:, None], _l2_normalize(x), 0.0)
    mu = jnp.sum(phi, axis=0, keepdims=True) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)

    def pick(k, carry):
        total, taken, order = carry
        candidate = (total + phi) / (k + 1).astype(jnp.float32)
        cost = jnp.sum(jnp.square(mu - candidate), axis=1)
        cost = jnp.where(taken | ~valid, jnp.inf, cost)
        i = jnp.argmin(cost)
        return total + phi[i][None, :], taken.at[i].set(True), order.at[k].set(i)

    init = (jnp.zeros((1, dim), jnp.float32), jnp.zeros(n, bool), jnp.full(n, -1, jnp.int32))
    return jax.lax.fori_loop(0, m, pick, init)[2]


def herding_select(features: Any, m: int) -> jax.Array:
    """iCaRL herding: `m` examples whose running mean tracks the class mean.

    With ``phi`` the L2-normalized features and ``mu`` their mean, pick ``k = 1..m`` is
    ``argmin_i ||mu - (phi_i + sum_{j<k} phi_{p_j}) / k||`` over the examples not yet picked
    (no example twice; ties to the lowest index). The result is a priority order: iCaRL's
    memory reduction keeps a prefix of it. Deterministic given the features.

    Args:
        features: ``(n, d)`` features of one class's examples.
        m: Number of exemplars, ``0 <= m <= n``. Static.

    Returns:
        ``(m,)`` int32 indices into `features`, in selection order.

    Raises:
        ValueError: for non-2-D features or `m` outside ``[0, n]``. TypeError: non-int `m`.

    Example:
        >>> from cljax.experiments.probes import herding_select
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> herding_select(x, 3).tolist()
        [2, 0, 1]

    References:
        Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
        (Algorithm 4, ConstructExemplarSet).
    """
    fn = "herding_select"
    x = _features(fn, "features", features)
    m = _check_int(fn, "m", m, 0)
    n = x.shape[0]
    if m > n:
        raise ValueError(f"{fn}(m=...) must be at most the {n} examples of `features`, got {m}.")
    if m == 0:
        return jnp.zeros((0,), jnp.int32)
    padded = max(8, 1 << (n - 1).bit_length())  # few distinct shapes: few compilations
    if isinstance(x, jax.core.Tracer):
        x = jnp.concatenate([x, jnp.zeros((padded - n, x.shape[1]), jnp.float32)])
        return _herding_order(x, jnp.arange(padded) < n, jnp.asarray(m, jnp.int32))[:m]
    host = np.zeros((padded, x.shape[1]), np.float32)  # padded on the host: nothing to compile
    host[:n] = np.asarray(x)
    order = _herding_order(host, np.arange(padded) < n, np.int32(m))
    return jnp.asarray(np.asarray(order)[:m])


def exemplars_per_class(memory_size: int, num_classes_seen: int) -> int:
    """Per-class share of a fixed exemplar memory, ``memory_size // num_classes_seen``.

    Example:
        >>> from cljax.experiments.probes import exemplars_per_class
        >>> exemplars_per_class(2000, 10), exemplars_per_class(2000, 30)
        (200, 66)
    """
    memory_size = _check_int("exemplars_per_class", "memory_size", memory_size, 0)
    num_classes_seen = _check_int("exemplars_per_class", "num_classes_seen", num_classes_seen, 1)
    return memory_size // num_classes_seen


class ExemplarMemory(NamedTuple):
    """A fixed-size exemplar memory (NumPy arrays, updated between tasks).

    Stored exemplars fill the first slots, grouped by class (ascending) and in herding order
    within a class; the other slots are empty (zeros, label -1, rank -1).

    Example:
        >>> from cljax.experiments.probes import exemplar_memory_init
        >>> exemplar_memory_init(5, (8, 8), 10).seen.shape
        (10,)
    """

    x: np.ndarray  # (K, *example_shape) stored inputs
    y: np.ndarray  # (K,) int32 labels; -1 = empty slot
    rank: np.ndarray  # (K,) int32 position of the exemplar in its class's herding order; -1 empty
    seen: np.ndarray  # (C,) bool: classes that have arrived (with or without exemplars left)


def exemplar_memory_init(
    memory_size: int, example_shape: Sequence[int], num_classes: int, *, dtype: Any = np.float32
) -> ExemplarMemory:
    """An empty exemplar memory of `memory_size` slots.

    Args:
        memory_size: Total number of exemplars ``K`` (iCaRL's fixed memory, e.g. 2,000).
        example_shape: Shape of one input.
        num_classes: Size of the label space ``C``.
        dtype: Dtype of the stored inputs.

    Example:
        >>> from cljax.experiments.probes import exemplar_memory_init
        >>> memory = exemplar_memory_init(4, (2,), 10)
        >>> memory.x.shape, memory.y.tolist()
        ((4, 2), [-1, -1, -1, -1])
    """
    fn = "exemplar_memory_init"
    memory_size = _check_int(fn, "memory_size", memory_size, 0)
    num_classes = _check_int(fn, "num_classes", num_classes, 1)
    shape = tuple(_check_int(fn, "example_shape", s, 1) for s in example_shape)
    return ExemplarMemory(
        np.zeros((memory_size, *shape), dtype),
        np.full(memory_size, -1, np.int32),
        np.full(memory_size, -1, np.int32),
        np.zeros(num_classes, bool),
    )


def icarl_memory_update(
    memory: ExemplarMemory, x: Any, y: Any, features_fn: Callable[[Any], Any]
) -> ExemplarMemory:
    """Adds a new task's classes to the memory at a fixed total size (iCaRL).

    With ``t`` classes seen after this task and ``m = memory_size // t``
    (`exemplars_per_class`): every old class keeps the first ``m`` exemplars of its herding
    order (ReduceExemplarSet; old exemplars are not re-selected), and each new class stores
    ``min(m, n_c)`` examples chosen by `herding_select` on ``features_fn`` of its examples
    (ConstructExemplarSet, with the current feature extractor). The number of stored exemplars
    never exceeds the memory size, and per-class memory shrinks as classes arrive.

    Args:
        memory: The current `ExemplarMemory`.
        x: ``(n, *example_shape)`` training inputs of the new task.
        y: ``(n,)`` integer labels; every class in `y` must be new to the memory.
        features_fn: Maps ``(b, *example_shape)`` inputs to ``(b, d)`` features.

    Returns:
        The new `ExemplarMemory` (same shapes).

    Raises:
        ValueError: for inputs of the wrong shape, labels outside ``[0, C)``, classes that
            arrived before, or features that are not ``(n_c, d)``.

    Example:
        >>> from cljax.experiments.probes import (
        ...     class_means_init, class_means_update, exemplar_memory_init, icarl_memory_update,
        ...     nearest_mean_predict)
        >>> x = np.array([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.2]], np.float32)
        >>> memory = icarl_memory_update(exemplar_memory_init(3, (2,), 2), x, np.array([0, 0, 1, 1]), lambda v: v)
        >>> memory.y.tolist()  # 3 // 2 = 1 exemplar per class; the last slot stays empty
        [0, 1, -1]
        >>> means = class_means_update(class_means_init(2, 2), memory.x, memory.y)  # NME head
        >>> nearest_mean_predict(means, jnp.array([[0.9, 0.1]])).tolist()
        [1]

    References:
        Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017.
    """
    fn = "icarl_memory_update"
    if not isinstance(memory, ExemplarMemory):
        raise TypeError(f"{fn}: `memory` must be an ExemplarMemory, got {type(memory).__name__}.")
    x = np.asarray(x)
    y_arr = np.asarray(y)
    if x.shape[1:] != memory.x.shape[1:]:
        raise ValueError(
            f"{fn}: `x` has shape {x.shape}; expected (n, {', '.join(map(str, memory.x.shape[1:]))})"
            " like the memory's examples."
        )
    y_arr = np.asarray(_labels(fn, "y", y_arr, x.shape[0]))
    num_classes = memory.seen.shape[0]
    _check_label_range(fn, "y", y_arr, num_classes)
    new_classes = np.unique(y_arr)
    again = new_classes[memory.seen[new_classes]]
    if again.size:
        raise ValueError(
            f"{fn}: classes {again.tolist()} arrived before; in class-incremental learning every "
            "class arrives once."
        )
    seen = memory.seen.copy()
    seen[new_classes] = True
    capacity = memory.y.shape[0]
    m = exemplars_per_class(capacity, max(int(seen.sum()), 1))
    keep = (memory.y >= 0) & (memory.rank < m)
    xs, ys, ranks = [memory.x[keep]], [memory.y[keep]], [memory.rank[keep]]
    for c in new_classes.tolist():
        examples = x[y_arr == c]
        count = min(m, examples.shape[0])
        if count == 0:
            continue
        f = features_fn(examples)
        if not hasattr(f, "shape"):
            f = np.asarray(f)
        if np.ndim(f) != 2 or f.shape[0] != examples.shape[0]:
            raise ValueError(
                f"{fn}: `features_fn` returned shape {tuple(np.shape(f))} for the "
                f"{examples.shape[0]} examples of class {c}; expected ({examples.shape[0]}, d)."
            )
        order = np.asarray(herding_select(f, count))
        xs.append(examples[order])
        ys.append(np.full(count, c, np.int32))
        ranks.append(np.arange(count, dtype=np.int32))
    x_all, y_all, r_all = np.concatenate(xs), np.concatenate(ys), np.concatenate(ranks)
    order = np.lexsort((r_all, y_all))  # by class, then herding rank
    stored = order.size  # <= t * m <= capacity
    out_x = np.zeros_like(memory.x)
    out_y = np.full(capacity, -1, np.int32)
    out_r = np.full(capacity, -1, np.int32)
    out_x[:stored] = x_all[order]
    out_y[:stored] = y_all[order]
    out_r[:stored] = r_all[order]
    return ExemplarMemory(out_x, out_y, out_r, seen)
