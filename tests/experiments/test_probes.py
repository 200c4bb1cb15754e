"""Probes, class means and herding against float64 NumPy transcriptions, plus the cards' invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.experiments import data, metrics
from cljax.experiments import probes as P

# ---------------------------------------------------------------------------------------------
# Float64 NumPy references, written from the formulas in the cards and papers.


def np_linear_cka(x, y):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def np_rbf_gram(x, sigma_frac):
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    d2 = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    sigma = sigma_frac * np.median(np.sqrt(d2[np.triu_indices(n, 1)]))
    return np.exp(-d2 / (2 * sigma**2))


def np_hsic(k, g):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ g @ h) / (n - 1) ** 2


def np_rbf_cka(x, y, sigma_frac):
    k, g = np_rbf_gram(x, sigma_frac), np_rbf_gram(y, sigma_frac)
    return np_hsic(k, g) / np.sqrt(np_hsic(k, k) * np_hsic(g, g))


def np_ridge_probe(x, y, x_test, num_classes, l2):
    """Ridge with an unpenalized bias as an augmented least-squares problem (numpy.linalg.lstsq)."""
    x = np.asarray(x, np.float64)
    t = np.eye(num_classes)[y]
    mx, mt = x.mean(0), t.mean(0)
    xc, tc = x - mx, t - mt
    d = x.shape[1]
    lam = l2 * np.sum(xc**2) / d
    a = np.concatenate([xc, np.sqrt(lam) * np.eye(d)])
    b = np.concatenate([tc, np.zeros((d, num_classes))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    bias = mt - mx @ w
    return w, bias, np.argmax(np.asarray(x_test, np.float64) @ w + bias, axis=1)


def np_nearest_mean(means, seen, f, normalize):
    means = np.asarray(means, np.float64)
    f = np.asarray(f, np.float64)
    if normalize:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-300)
        means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-300)
    dist = ((f[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    dist[:, ~seen] = np.inf
    return np.argmin(dist, axis=1)


def np_nmc_protocol(stream, features, normalize, scenario):
    """The EX-20 protocol in plain NumPy: absorb task i, evaluate every task."""
    T, C = len(stream.tasks), stream.num_classes
    d = features(stream.tasks[0].x_train[:1]).shape[1]
    sums, counts = np.zeros((C, d)), np.zeros(C)
    R = np.zeros((T, T))
    for i, task in enumerate(stream.tasks):
        f = np.asarray(features(task.x_train), np.float64)
        for c in range(C):
            sums[c] += f[task.y_train == c].sum(0)
            counts[c] += np.sum(task.y_train == c)
        means = sums / np.maximum(counts, 1)[:, None]
        for j, other in enumerate(stream.tasks):
            seen = counts > 0
            if scenario == "task":
                seen = seen & np.isin(np.arange(C), other.classes)
            pred = np_nearest_mean(means, seen, features(other.x_test), normalize)
            R[i, j] = np.mean(pred == other.y_test)
    return R


def np_herding(x, m):
    """iCaRL Algorithm 4 (ConstructExemplarSet) over L2-normalized features, without repeats."""
    phi = np.asarray(x, np.float64)
    phi = phi / np.linalg.norm(phi, axis=1, keepdims=True)
    mu = phi.mean(0)
    chosen, total = [], np.zeros(phi.shape[1])
    for k in range(1, m + 1):
        cost = [
            np.inf if i in chosen else np.linalg.norm(mu - (total + phi[i]) / k)
            for i in range(phi.shape[0])
        ]
        i = int(np.argmin(cost))
        chosen.append(i)
        total += phi[i]
    return np.array(chosen)


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))[None, :]


_linear_cka = jax.jit(P.linear_cka)
_rbf_cka = jax.jit(P.rbf_cka, static_argnames=("sigma_frac",))

# ---------------------------------------------------------------------------------------------
# CKA (EX-13).


@pytest.mark.parametrize("n,d1,d2", [(40, 5, 3), (6, 9, 12)])  # feature-space and Gram paths
def test_linear_cka_matches_numpy(n, d1, d2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d1))
    y = x[:, :2] @ rng.normal(size=(2, d2)) + 0.5 * rng.normal(size=(n, d2))
    got = float(P.linear_cka(x.astype(np.float32), y.astype(np.float32)))
    assert got == pytest.approx(np_linear_cka(x, y), abs=1e-5)


@given(
    shape=st.sampled_from([(12, 1), (5, 16)]),  # feature-space and Gram paths
    scale=st.sampled_from([1e-6, 0.3, 1e5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_cka_invariants(shape, scale, seed):
    n, d1 = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)).astype(np.float32)
    y = rng.normal(size=(n, d1)).astype(np.float32)  # one shape pair: one compilation
    value = float(P.linear_cka(x, y))
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(np_linear_cka(x, y), abs=1e-4)
    assert float(P.linear_cka(y, x)) == pytest.approx(value, abs=1e-5)
    assert float(P.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    q1, q2 = random_orthogonal(rng, d1), random_orthogonal(rng, d1)
    moved = float(P.linear_cka((scale * x @ q1).astype(np.float32), (y @ q2).astype(np.float32)))
    assert moved == pytest.approx(value, abs=1e-4)
    assert float(P.linear_cka(x, scale * (y + 3.0))) == pytest.approx(value, abs=1e-4)


def test_rbf_cka_matches_numpy_hsic():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 4))
    y = np.tanh(x @ rng.normal(size=(4, 3))) + 0.1 * rng.normal(size=(15, 3))
    for frac in (0.4, 0.8, 2.0):
        got = float(P.rbf_cka(x.astype(np.float32), y.astype(np.float32), sigma_frac=frac))
        assert got == pytest.approx(np_rbf_cka(x, y, frac), abs=1e-5)


@settings(max_examples=10)
@given(shape=st.sampled_from([(3, 1), (10, 4)]), seed=st.integers(0, 2**31 - 1))
def test_rbf_cka_invariants(shape, seed):
    n, d = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n, d)).astype(np.float32)
    value = float(P.rbf_cka(x, y))
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(np_rbf_cka(x, y, 0.8), abs=1e-4)
    assert float(P.rbf_cka(y, x)) == pytest.approx(value, abs=1e-5)
    assert float(P.rbf_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    moved = (7.0 * x @ random_orthogonal(rng, d) - 2.0).astype(np.float32)
    assert float(P.rbf_cka(moved, y)) == pytest.approx(value, abs=1e-4)


def test_linear_and_kernel_cka_differ():
    x = np.linspace(-1.0, 1.0, 20, dtype=np.float32)[:, None]
    y = x**2  # a non-linear function of x, uncorrelated with it
    assert float(P.linear_cka(x, y)) < 0.05
    assert float(P.rbf_cka(x, y)) > 0.2


def test_cka_on_constant_features_is_defined():
    x = np.full((6, 3), 2.5, np.float32)
    y = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    for cka in (P.linear_cka, P.rbf_cka):
        assert float(cka(x, x)) == 1.0  # both constant: the same trivial structure
        assert float(cka(x, np.zeros((6, 3), np.float32))) == 1.0
        assert float(cka(x, y)) == 0.0 and float(cka(y, x)) == 0.0  # one constant
    half = np.concatenate([np.zeros((4, 3)), np.ones((2, 3))]).astype(np.float32)
    value = float(P.rbf_cka(half, y))  # median pairwise distance 0: the fallback bandwidth
    assert np.isfinite(value) and 0.0 <= value <= 1.0


def test_cka_is_finite_at_extreme_scales():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 3))
    y = rng.normal(size=(8, 2))
    reference = np_linear_cka(x, y)
    for scale in (1e-30, 1e30):
        got = float(P.linear_cka((scale * x).astype(np.float32), y.astype(np.float32)))
        assert got == pytest.approx(reference, abs=1e-4)
        assert np.isfinite(float(P.rbf_cka((scale * x).astype(np.float32), y)))
    assert float(P.linear_cka(1e4 + x, y)) == pytest.approx(reference, abs=1e-3)  # large offset


def test_low_precision_features_are_computed_in_float32():
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(9, 4)), jnp.bfloat16)
    y = rng.normal(size=(9, 2)).astype(np.float32)
    x32 = np.asarray(x.astype(jnp.float32))
    assert P.linear_cka(x, y).dtype == jnp.float32
    assert float(P.linear_cka(x, y)) == pytest.approx(np_linear_cka(x32, y), abs=1e-5)
    labels = np.arange(9, dtype=np.int32) % 2
    state = P.class_means_update(P.class_means_init(2, 4), x, labels)
    assert state.sums.dtype == jnp.float32
    np.testing.assert_allclose(P.class_means(state)[1], x32[1::2].mean(0), atol=1e-6)
    np.testing.assert_array_equal(P.herding_select(x, 9), np_herding(x32, 9))


def test_cka_jit_equals_eager():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 6))
    assert float(_linear_cka(x, y)) == pytest.approx(float(P.linear_cka(x, y)), abs=1e-6)
    assert float(_rbf_cka(x, y)) == pytest.approx(float(P.rbf_cka(x, y)), abs=1e-6)
    traced_sigma = jax.jit(P.rbf_cka)(x, y, sigma_frac=0.5)  # a traced bandwidth works too
    assert float(traced_sigma) == pytest.approx(float(P.rbf_cka(x, y, sigma_frac=0.5)), abs=1e-6)


def test_cka_rejects_bad_input():
    x = np.zeros((5, 2))
    with pytest.raises(
        ValueError, match=r"linear_cka: `x` has shape \(5,\); it must be an \(n, d\)"
    ):
        P.linear_cka(np.zeros(5), x)
    with pytest.raises(ValueError, match=r"rbf_cka: `y` has shape \(5, 2, 1\)"):
        P.rbf_cka(x, np.zeros((5, 2, 1)))
    with pytest.raises(ValueError, match=r"linear_cka: `x` has shape \(5, 2\) and `y` \(4, 2\)"):
        P.linear_cka(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="linear_cka: needs at least 2 examples"):
        P.linear_cka(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(TypeError, match="linear_cka: `x` must hold real numbers"):
        P.linear_cka(np.array([["a", "b"], ["c", "d"]]), x[:2])
    with pytest.raises(ValueError, match=r"rbf_cka\(sigma_frac=...\) must be a finite number > 0"):
        P.rbf_cka(x, x, sigma_frac=0.0)
    with pytest.raises(TypeError, match=r"rbf_cka\(sigma_frac=...\) must be a number"):
        P.rbf_cka(x, x, sigma_frac="wide")


# ---------------------------------------------------------------------------------------------
# Linear probe (EX-13).


@pytest.mark.parametrize("n,d", [(60, 5), (12, 30)])  # primal and dual systems
def test_linear_probe_matches_lstsq(n, d):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d)).astype(np.float32) + 1.0
    y = rng.integers(0, 3, size=n)
    x_test = rng.normal(size=(25, d)).astype(np.float32)
    y_test = rng.integers(0, 3, size=25)
    probe = P.linear_probe(x, y, x_test, y_test, num_classes=3, l2=0.1)
    w, b, pred = np_ridge_probe(x, y, x_test, 3, 0.1)
    np.testing.assert_allclose(probe.weights, w, atol=2e-4)
    np.testing.assert_allclose(probe.bias, b, atol=2e-4)
    assert float(probe.accuracy) == pytest.approx(np.mean(pred == y_test))


def test_linear_probe_separates_separable_data():
    rng = np.random.default_rng(5)
    centres = 10.0 * rng.normal(size=(4, 6))
    y = np.repeat(np.arange(4), 20)
    x = (centres[y] + rng.normal(size=(80, 6))).astype(np.float32)
    y_test = np.repeat(np.arange(4), 5)
    x_test = (centres[y_test] + rng.normal(size=(20, 6))).astype(np.float32)
    assert float(P.linear_probe(x, y, x_test, y_test, num_classes=4).accuracy) == 1.0


@given(scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**31 - 1))
def test_linear_probe_is_deterministic_and_scale_free(scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0.5)
    first = P.linear_probe(x, y, x, y, num_classes=4)
    again = P.linear_probe(x, y, x, y, num_classes=4)
    np.testing.assert_array_equal(first.weights, again.weights)
    scaled = P.linear_probe(scale * x, y, scale * x, y, num_classes=4)
    assert float(scaled.accuracy) == pytest.approx(float(first.accuracy), abs=1.5 / 30)


def test_linear_probe_under_jit_equals_eager():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=20).astype(np.int32)
    probe = jax.jit(P.linear_probe, static_argnames=("num_classes",))
    jitted = probe(x, y, x, y, num_classes=3, l2=jnp.float32(0.01))
    eager = P.linear_probe(x, y, x, y, num_classes=3, l2=0.01)
    np.testing.assert_allclose(jitted.weights, eager.weights, atol=1e-6)
    assert float(jitted.accuracy) == float(eager.accuracy)


def test_linear_probe_on_constant_features_predicts_the_majority_class():
    x = np.ones((7, 3), np.float32)
    y = np.array([0, 1, 1, 1, 2, 2, 0])
    probe = P.linear_probe(x, y, x, y, num_classes=3)
    assert np.all(np.isfinite(probe.weights)) and np.all(np.isfinite(probe.bias))
    assert float(probe.accuracy) == pytest.approx(3 / 7)


def test_linear_probe_rejects_bad_input():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"linear_probe: `train_labels` holds labels in \[0, 3\]"):
        P.linear_probe(x, np.array([0, 1, 3, 1]), x, y, num_classes=3)
    with pytest.raises(ValueError, match=r"linear_probe: `test_labels` holds labels in \[-1, 1\]"):
        P.linear_probe(x, y, x, np.array([0, 1, -1, 1]), num_classes=2)
    with pytest.raises(TypeError, match="linear_probe: `train_labels` must hold integer"):
        P.linear_probe(x, y.astype(float), x, y, num_classes=2)
    with pytest.raises(ValueError, match=r"`train_labels` has shape \(3,\); expected \(4,\)"):
        P.linear_probe(x, y[:3], x, y, num_classes=2)
    with pytest.raises(
        ValueError, match=r"`test_features` has shape \(4, 3\); expected 2 features"
    ):
        P.linear_probe(x, y, np.zeros((4, 3)), y, num_classes=2)
    with pytest.raises(ValueError, match=r"linear_probe\(l2=...\) must be a finite number > 0"):
        P.linear_probe(x, y, x, y, num_classes=2, l2=-1.0)
    with pytest.raises(TypeError, match=r"linear_probe\(num_classes=...\) must be an int"):
        P.linear_probe(x, y, x, y, num_classes=2.0)
    with pytest.raises(ValueError, match=r"linear_probe: test classes \[2\] never appear in"):
        P.linear_probe(x, y, x, np.array([0, 1, 2, 1]), num_classes=3)
    with pytest.raises(ValueError, match="linear_probe: needs at least one training and one test"):
        P.linear_probe(np.zeros((0, 2)), np.zeros(0, int), x, y, num_classes=2)


# ---------------------------------------------------------------------------------------------
# Nearest class mean (EX-20).

_update = jax.jit(P.class_means_update)


def test_class_means_match_numpy_and_ignore_out_of_range_labels():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(30, 3)).astype(np.float32)
    y = rng.integers(-2, 6, size=30)  # classes 0..3 exist; -2, -1, 4, 5 are outside
    f[y == 5] = np.nan  # ignored rows may hold anything
    state = _update(P.class_means_init(4, 3), f, y)
    means = np.asarray(P.class_means(state))
    for c in range(4):
        assert int(state.counts[c]) == np.sum(y == c)
        expected = f[y == c].mean(0) if np.any(y == c) else np.zeros(3)
        np.testing.assert_allclose(means[c], expected, atol=1e-6)
    assert state.sums.dtype == jnp.float32 and state.counts.dtype == jnp.int32


@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 24), max_size=3))
def test_class_means_are_order_and_batch_free(seed, cuts):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(24, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=24).astype(np.int32)
    whole = _update(P.class_means_init(3, 2), f, y)
    perm = rng.permutation(24)
    state = P.class_means_init(3, 2)
    for part in np.split(perm, sorted(cuts)):  # each batch padded to 24 rows with label -1
        padded_f = np.concatenate([f[part], np.full((24 - part.size, 2), 9.0, np.float32)])
        padded_y = np.concatenate([y[part], np.full(24 - part.size, -1, np.int32)])
        state = _update(state, padded_f, padded_y)
    np.testing.assert_array_equal(state.counts, whole.counts)
    np.testing.assert_allclose(P.class_means(state), P.class_means(whole), atol=1e-6)


def test_class_means_under_jit_do_not_retrace():
    traces = []

    @jax.jit
    def step(state, f, y):
        traces.append(None)  # runs only while tracing
        state = P.class_means_update(state, f, y)
        return state, P.nearest_mean_predict(state, f, normalize=False)

    f = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], np.float32)
    state, _ = step(P.class_means_init(2, 2), f, np.array([0, 1, -1], np.int32))
    state, pred = step(state, f, np.array([0, 1, -1], np.int32))
    assert len(traces) == 1 and pred.tolist()[:2] == [0, 1]
    assert np.asarray(state.counts).tolist() == [2, 2]


@pytest.mark.parametrize("normalize", [True, False])
def test_nearest_mean_predict_matches_numpy(normalize):
    rng = np.random.default_rng(7)
    f = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=40)  # class 3 is never seen
    state = P.class_means_update(P.class_means_init(4, 3), 1.0 + f, y)
    queries = (1.0 + rng.normal(size=(50, 3))).astype(np.float32)
    got = np.asarray(P.nearest_mean_predict(state, queries, normalize=normalize))
    seen = np.arange(4) < 3
    expected = np_nearest_mean(P.class_means(state), seen, queries, normalize)
    np.testing.assert_array_equal(got, expected)
    assert 3 not in got


def test_normalization_changes_the_prediction():
    means = np.array([[1.0, 0.0], [10.0, 1.0]], np.float32)
    query = np.array([[2.0, 0.3]], np.float32)  # nearer mean 0 in distance, mean 1 in angle
    assert P.nearest_mean_predict(means, query, normalize=False).tolist() == [0]
    assert P.nearest_mean_predict(means, query, normalize=True).tolist() == [1]


def test_nearest_mean_predict_candidates():
    state = P.class_means_update(P.class_means_init(3, 2), np.eye(2), np.array([0, 2]))
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
    assert P.nearest_mean_predict(state, x).tolist() == [0, 2, 0]  # zero query: tie, lowest id
    only_2 = np.array([False, False, True])
    assert P.nearest_mean_predict(state, x, valid=only_2).tolist() == [2, 2, 2]
    empty = P.class_means_init(3, 2)
    assert P.nearest_mean_predict(empty, x).tolist() == [-1, -1, -1]
    assert np.all(np.asarray(P.class_means(empty)) == 0.0)


def test_class_means_reject_bad_input():
    state = P.class_means_init(3, 2)
    with pytest.raises(
        ValueError, match=r"class_means_update: `features` has shape \(4, 5\); expected 2"
    ):
        P.class_means_update(state, np.zeros((4, 5)), np.zeros(4, int))
    with pytest.raises(
        ValueError, match=r"class_means_update: `labels` has shape \(3,\); expected \(4,\)"
    ):
        P.class_means_update(state, np.zeros((4, 2)), np.zeros(3, int))
    with pytest.raises(TypeError, match="class_means_update: `labels` must hold integer"):
        P.class_means_update(state, np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(TypeError, match="class_means_update: `state` must be a ClassMeans"):
        P.class_means_update((state.sums, state.counts), np.zeros((4, 2)), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"class_means: `state` has sums \(3,\) and counts"):
        P.class_means(P.ClassMeans(jnp.zeros(3), jnp.zeros(3, jnp.int32)))
    with pytest.raises(ValueError, match=r"class_means_init\(dim=...\) must be >= 1"):
        P.class_means_init(3, 0)
    with pytest.raises(TypeError, match=r"class_means_init\(num_classes=...\) must be an int"):
        P.class_means_init(3.0, 2)
    with pytest.raises(ValueError, match=r"nearest_mean_predict: `valid` has shape \(2,\)"):
        P.nearest_mean_predict(state, np.zeros((1, 2)), valid=[True, False])
    with pytest.raises(ValueError, match=r"nearest_mean_predict: `features` has shape \(1, 3\)"):
        P.nearest_mean_predict(np.zeros((3, 2)), np.zeros((1, 3)))


def _tiny_stream():
    rng = np.random.default_rng(8)
    centres = 3.0 * rng.normal(size=(6, 5))

    def split(classes, n):
        y = np.repeat(np.asarray(classes, np.int32), n)
        return (centres[y] + rng.normal(size=(y.size, 5))).astype(np.float32), y

    tasks = []
    for t, classes in enumerate([(0, 1), (2, 3), (4, 5)]):
        x_tr, y_tr = split(classes, 11)
        x_te, y_te = split(classes, 7)
        tasks.append(data.Task(f"tiny/{t}", x_tr, y_tr, x_te, y_te, classes))
    return data.Stream("tiny", tuple(tasks), 6, (5,), ("task", "class"))


@pytest.mark.parametrize("normalize", [True, False])
def test_nmc_accuracy_matrix_matches_numpy_protocol(normalize):
    stream = _tiny_stream()
    features = lambda x: np.tanh(np.asarray(x) @ np.linspace(-1, 1, 20).reshape(5, 4))
    for scenario in ("class", "task"):
        R = P.nmc_accuracy_matrix(
            stream, features, normalize=normalize, scenario=scenario, batch_size=8
        )
        np.testing.assert_allclose(R, np_nmc_protocol(stream, features, normalize, scenario))
    class_il = P.nmc_accuracy_matrix(stream, features, normalize=normalize, batch_size=8)
    task_il = P.nmc_accuracy_matrix(stream, features, normalize=normalize, scenario="task")
    assert np.all(task_il >= class_il)
    assert np.all(class_il[np.triu_indices(3, 1)] == 0.0)  # unseen classes are never predicted
    assert set(metrics.summarize(class_il)) >= {"acc", "bwt"}


def test_nmc_on_split_digits_raw_pixels_matches_numpy():
    stream = data.split_digits()
    identity = lambda x: x
    R = P.nmc_accuracy_matrix(stream, identity)
    np.testing.assert_allclose(R, np_nmc_protocol(stream, identity, True, "class"), atol=1e-12)


def test_nmc_accuracy_matrix_rejects_bad_input():
    stream = _tiny_stream()
    with pytest.raises(ValueError, match="nmc_accuracy_matrix: `stream` must be a classification"):
        P.nmc_accuracy_matrix(stream._replace(kind="language_model"), lambda x: x)
    with pytest.raises(ValueError, match=r"nmc_accuracy_matrix\(scenario=...\) must be 'class'"):
        P.nmc_accuracy_matrix(stream, lambda x: x, scenario="domain")
    with pytest.raises(ValueError, match=r"`features_fn` returned shape \(22,\)"):
        P.nmc_accuracy_matrix(stream, lambda x: x[:, 0])
    empty = stream.tasks[0]._replace(x_test=np.zeros((0, 5)), y_test=np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="task 'tiny/0' has an empty test split"):
        P.nmc_accuracy_matrix(stream._replace(tasks=(empty,)), lambda x: x)
    with pytest.raises(ValueError, match=r"nmc_accuracy_matrix\(batch_size=...\) must be >= 1"):
        P.nmc_accuracy_matrix(stream, lambda x: x, batch_size=0)


# ---------------------------------------------------------------------------------------------
# iCaRL herding and memory (EX-16).


@pytest.mark.parametrize("n,m", [(9, 9), (13, 4)])
def test_herding_matches_numpy(n, m):
    x = np.random.default_rng(9).normal(size=(n, 4)).astype(np.float32)
    got = np.asarray(P.herding_select(x, m))
    np.testing.assert_array_equal(got, np_herding(x, m))
    assert len(set(got.tolist())) == m and got.dtype == np.int32


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 12))  # n = 2 is always a tie
def test_herding_is_deterministic_prefix_free_and_permutation_equivariant(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    full = np.asarray(P.herding_select(x, n))
    assert sorted(full.tolist()) == list(range(n))
    np.testing.assert_array_equal(P.herding_select(x, n), full)  # deterministic
    np.testing.assert_array_equal(P.herding_select(x, n // 2), full[: n // 2])  # a prefix
    perm = rng.permutation(n)
    np.testing.assert_array_equal(perm[np.asarray(P.herding_select(x[perm], n))], full)


def test_herding_handles_zero_and_duplicate_features():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    got = P.herding_select(x, 4).tolist()
    assert sorted(got) == [0, 1, 2, 3]
    assert P.herding_select(x, 0).shape == (0,)


def test_herding_and_budget_reject_bad_input():
    with pytest.raises(ValueError, match=r"herding_select\(m=...\) must be at most the 3 examples"):
        P.herding_select(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match=r"herding_select\(m=...\) must be >= 0"):
        P.herding_select(np.zeros((3, 2)), -1)
    with pytest.raises(TypeError, match=r"herding_select\(m=...\) must be an int"):
        P.herding_select(np.zeros((3, 2)), 2.0)
    with pytest.raises(ValueError, match=r"herding_select: `features` has shape \(3,\)"):
        P.herding_select(np.zeros(3), 1)
    with pytest.raises(
        ValueError, match=r"exemplars_per_class\(num_classes_seen=...\) must be >= 1"
    ):
        P.exemplars_per_class(10, 0)
    with pytest.raises(ValueError, match=r"exemplars_per_class\(memory_size=...\) must be >= 0"):
        P.exemplars_per_class(-1, 2)
    assert P.exemplars_per_class(2000, 100) == 20 and P.exemplars_per_class(5, 7) == 0


@given(
    memory_size=st.integers(0, 30),
    increments=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_icarl_memory_keeps_its_budget(memory_size, increments, seed):
    rng = np.random.default_rng(seed)
    num_classes = sum(increments)
    sizes = rng.integers(1, 9, size=num_classes)
    memory = P.exemplar_memory_init(memory_size, (3,), num_classes)
    history, first = [], 0
    for inc in increments:
        classes = np.arange(first, first + inc)
        first += inc
        y = np.repeat(classes, sizes[classes]).astype(np.int32)
        x = rng.normal(size=(y.size, 3)).astype(np.float32)
        memory = P.icarl_memory_update(memory, x, y, lambda v: v)
        m = P.exemplars_per_class(memory_size, first)
        stored = memory.y[memory.y >= 0]
        assert stored.size <= memory_size and memory.x.shape == (memory_size, 3)
        assert np.all(memory.y[stored.size :] == -1)  # stored slots come first
        for c in classes:  # new classes: their herding prefix
            kept = memory.x[memory.y == c]
            examples = x[y == c]
            assert kept.shape[0] == min(m, sizes[c])
            if kept.shape[0]:
                np.testing.assert_array_equal(
                    kept, examples[np.asarray(P.herding_select(examples, kept.shape[0]))]
                )
        for c, before in history:  # old classes: shrink to a prefix of what they held
            kept = memory.x[memory.y == c]
            assert kept.shape[0] == min(m, before.shape[0])
            np.testing.assert_array_equal(kept, before[: kept.shape[0]])
        history = [(c, memory.x[memory.y == c]) for c in range(first)]
    assert memory.seen.sum() == num_classes


def test_nearest_mean_of_exemplars_uses_the_class_mean_pieces():
    rng = np.random.default_rng(10)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    y = np.repeat(np.arange(3), 10).astype(np.int32)
    x = (centres[y] + rng.normal(size=(30, 2))).astype(np.float32)
    memory = P.icarl_memory_update(P.exemplar_memory_init(7, (2,), 3), x, y, lambda v: v)
    means = P.class_means_update(P.class_means_init(3, 2), memory.x, memory.y)  # -1 slots ignored
    assert np.asarray(means.counts).tolist() == [2, 2, 2]
    for c in range(3):
        np.testing.assert_allclose(
            P.class_means(means)[c], memory.x[memory.y == c].mean(0), atol=1e-6
        )
    assert P.nearest_mean_predict(means, centres.astype(np.float32)).tolist() == [0, 1, 2]


def test_icarl_protocol_on_split_digits():
    stream = data.split_digits()
    memory = P.exemplar_memory_init(50, stream.input_shape, stream.num_classes)
    for t, task in enumerate(stream.tasks):
        memory = P.icarl_memory_update(memory, task.x_train, task.y_train, lambda v: v)
        seen = 2 * (t + 1)
        counts = np.bincount(memory.y[memory.y >= 0], minlength=10)
        assert counts.sum() <= 50
        assert counts[:seen].tolist() == [50 // seen] * seen and counts[seen:].sum() == 0
    means = P.class_means_update(P.class_means_init(10, 64), memory.x, memory.y)  # NME head
    x_test = np.concatenate([s.x_test for s in stream.tasks])
    exemplar_means = np.stack([memory.x[memory.y == c].mean(0) for c in range(10)])
    np.testing.assert_array_equal(
        P.nearest_mean_predict(means, x_test),
        np_nearest_mean(exemplar_means, np.ones(10, bool), x_test, True),
    )


def test_icarl_memory_rejects_bad_input():
    memory = P.exemplar_memory_init(4, (2,), 3)
    x, y = np.zeros((4, 2), np.float32), np.array([0, 0, 1, 1])
    memory = P.icarl_memory_update(memory, x, y, lambda v: v)
    with pytest.raises(ValueError, match=r"classes \[1\] arrived before"):
        P.icarl_memory_update(memory, x, np.array([2, 2, 1, 1]), lambda v: v)
    with pytest.raises(ValueError, match=r"icarl_memory_update: `x` has shape \(4, 3\)"):
        P.icarl_memory_update(memory, np.zeros((4, 3)), y, lambda v: v)
    with pytest.raises(ValueError, match=r"icarl_memory_update: `y` holds labels in \[2, 3\]"):
        P.icarl_memory_update(memory, x, np.array([2, 2, 3, 3]), lambda v: v)
    with pytest.raises(ValueError, match=r"`features_fn` returned shape \(2,\) for the 2 examples"):
        P.icarl_memory_update(memory, x[:2], np.array([2, 2]), lambda v: v[:, 0])
    with pytest.raises(TypeError, match="icarl_memory_update: `memory` must be an ExemplarMemory"):
        P.icarl_memory_update(tuple(memory), x, y, lambda v: v)
    with pytest.raises(ValueError, match=r"exemplar_memory_init\(example_shape=...\) must be >= 1"):
        P.exemplar_memory_init(4, (0,), 3)
