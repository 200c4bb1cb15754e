"""Tests for task vectors and their merges: MG-01 (soups), MG-02 (task arithmetic), MG-03 (TIES),
DARE, MG-04 (Breadcrumbs), MG-05 (MagMax) and MG-44 (PCB-Merging).

Each merge is checked against an independent float64 NumPy transcription of its card (sorting with
a stable argsort where the library bisects), then against the card's invariants, hypothesis
properties (finite output, shapes and dtypes kept), jit + sharding, and every argument error.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax.transforms.merging import task_vectors as tvm
from cljax.transforms.merging.task_vectors import (
    apply_task_vector,
    breadcrumbs,
    dare,
    greedy_soup,
    magmax,
    magmax_init,
    magmax_update,
    pcb_merge,
    task_arithmetic,
    task_vector,
    ties_merge,
    uniform_soup,
    uniform_soup_add,
    uniform_soup_init,
    uniform_soup_result,
)
from tests.helpers import assert_trees_close, assert_trees_equal

# A matrix, a 3-D leaf, a vector and a scalar; jax flattens them as b, enc/k, enc/w, s.
SHAPES = {"enc": {"w": (4, 6), "k": (4, 2, 6)}, "b": (6,), "s": ()}
SPECS = {"enc": {"w": P("data", "model"), "k": P("data", "model", None)}, "b": P("model"), "s": P()}


def normal_tree(seed, scale=1.0, shapes=SHAPES, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray((scale * rng.standard_normal(s)).astype(dtype)),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def tvs_of(n, seed=0, scale=1.0):
    return [normal_tree(seed + i, scale) for i in range(n)]


def np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def np_tree(like, leaves):
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def kept(fraction, n):
    """The card's count: floor(fraction * n) (with a float tolerance)."""
    return min(n, max(0, math.floor(fraction * n + 1e-6)))


def np_window(values, start, stop):
    """Mask of the entries of a flat array whose rank by descending |value| (stable) is in
    [start, stop)."""
    order = np.argsort(-np.abs(values), kind="stable")
    mask = np.zeros(values.shape, bool)
    mask[order[max(start, 0) : max(stop, 0)]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# NumPy (float64) references.


def np_ties(tvs, weights, density, sign, scope, zero_sign):
    per_task = [np_leaves(t) for t in tvs]
    trimmed = []
    for leaves in per_task:
        if scope == "global":
            flat = np.concatenate([x.reshape(-1) for x in leaves])
            mask = np_window(flat, 0, kept(density, flat.size))
            out, i = [], 0
            for x in leaves:
                out.append(np.where(mask[i : i + x.size].reshape(x.shape), x, 0.0))
                i += x.size
            trimmed.append(out)
        else:
            trimmed.append(
                [
                    np.where(
                        np_window(x.reshape(-1), 0, kept(density, x.size)).reshape(x.shape), x, 0
                    )
                    for x in leaves
                ]
            )
    w = np.ones(len(tvs)) if weights is None else np.asarray(weights, np.float64)
    stacks = [np.stack([t[j] for t in trimmed]) for j in range(len(per_task[0]))]
    votes = [s.sum(0) if sign == "total" else np.sign(s).sum(0) for s in stacks]
    if zero_sign == "positive":
        ties = [True] * len(votes)
    elif scope == "global":
        ties = [sum(np.sign(v).sum() for v in votes) >= 0] * len(votes)
    else:
        ties = [np.sign(v).sum() >= 0 for v in votes]
    out = []
    for s, v, tie in zip(stacks, votes, ties, strict=True):
        elected = np.where(v > 0, 1.0, np.where(v < 0, -1.0, 1.0 if tie else -1.0))
        agree = np.sign(s) == elected
        ws = w.reshape((-1,) + (1,) * (s.ndim - 1))
        out.append((ws * s * agree).sum(0) / np.maximum(agree.sum(0), 1))
    return np_tree(tvs[0], out)


def np_breadcrumbs(tvs, beta, gamma, weights=None):
    w = np.ones(len(tvs)) if weights is None else np.asarray(weights, np.float64)
    out = []
    for j in range(len(jax.tree.leaves(tvs[0]))):
        total = 0.0
        for t, wt in zip(tvs, w, strict=True):
            x = np_leaves(t)[j]
            n = x.size
            n_top, n_bot = kept(1 - gamma, n), kept(beta, n)
            total = total + wt * np.where(
                np_window(x.reshape(-1), n_top, n - n_bot).reshape(x.shape), x, 0
            )
        out.append(total)
    return np_tree(tvs[0], out)


def np_magmax(tvs):
    out = np_leaves(tvs[0])
    for t in tvs[1:]:
        out = [
            np.where(np.abs(x) >= np.abs(o), x, o) for o, x in zip(out, np_leaves(t), strict=True)
        ]
    return np_tree(tvs[0], out)


def _np_normalize(x, lo, hi):
    span = hi - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)


def np_pcb_flat(tv, ratio, clip):
    """The reference algorithm on a (n_tasks, D) float64 matrix."""
    n, d = tv.shape
    mags = np.abs(tv)
    srt = np.sort(mags, axis=1)
    lo = srt[:, int(d * clip)][:, None]
    hi = srt[:, int(d * (1 - clip) - 1)][:, None]
    clipped = np.minimum(np.maximum(mags, lo), hi)
    tau_c = np.sign(tv) * clipped
    intra = np.exp(
        n
        * _np_normalize(clipped, clipped.min(1, keepdims=True), clipped.max(1, keepdims=True)) ** 2
    )
    inter = np.tanh(tv * tv.sum(0, keepdims=True))
    score = intra * inter
    t = np.sort(score, axis=1)[:, int(d * (1 - ratio))][:, None]
    s = _np_normalize(np.maximum(score, t), t, score.max(1, keepdims=True))
    return (s * tau_c).sum(0) / np.maximum(s.sum(0), 1e-12), s


def np_pcb(tvs, ratio, clip, scope):
    per_task = [np_leaves(t) for t in tvs]
    sizes = [x.size for x in per_task[0]]
    shapes = [x.shape for x in per_task[0]]
    if scope == "global":
        flat = np.stack([np.concatenate([x.reshape(-1) for x in leaves]) for leaves in per_task])
        merged, _ = np_pcb_flat(flat, ratio, clip)
        out, i = [], 0
        for size, shape in zip(sizes, shapes, strict=True):
            out.append(merged[i : i + size].reshape(shape))
            i += size
    else:
        out = [
            np_pcb_flat(np.stack([leaves[j].reshape(-1) for leaves in per_task]), ratio, clip)[
                0
            ].reshape(shapes[j])
            for j in range(len(sizes))
        ]
    return np_tree(tvs[0], out)


# ---------------------------------------------------------------------------------------------
# Reference tests.


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("zero_sign", ["positive", "majority"])
def test_ties_matches_numpy(sign, scope, zero_sign):
    tvs = tvs_of(3)
    weights = [1.0, 0.5, 2.0]
    got = ties_merge(tvs, weights, density=0.4, sign=sign, scope=scope, zero_sign=zero_sign)
    want = np_ties(tvs, weights, 0.4, sign, scope, zero_sign)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_ties_zero_sign_rules_differ_on_an_exact_tie():
    # Frequency votes split 1-1 on every entry; the majority of elected signs decides.
    tvs = [{"w": jnp.array([1.0, -2.0, -3.0])}, {"w": jnp.array([-4.0, -5.0, -6.0])}]
    plus = ties_merge(tvs, density=1.0, sign="frequency", zero_sign="positive")["w"]
    np.testing.assert_allclose(plus, [1.0, -3.5, -4.5])
    majority = ties_merge(tvs, density=1.0, sign="frequency", zero_sign="majority")["w"]
    np.testing.assert_allclose(majority, [-4.0, -3.5, -4.5])  # elected: 0, -, - -> majority -
    assert_trees_close(
        ties_merge(tvs, density=1.0, sign="frequency", zero_sign="majority"),
        np_ties(tvs, None, 1.0, "frequency", "per_tensor", "majority"),
    )


def test_breadcrumbs_matches_numpy():
    tvs = tvs_of(3, seed=10)
    got = breadcrumbs(tvs, 0.3, 0.9, weights=[0.5, 1.0, 2.0])
    assert_trees_close(got, np_breadcrumbs(tvs, 0.3, 0.9, [0.5, 1.0, 2.0]), rtol=1e-5, atol=1e-6)
    assert_trees_close(breadcrumbs(tvs), np_breadcrumbs(tvs, 0.85, 0.993), rtol=1e-5, atol=1e-6)


def test_magmax_matches_numpy():
    tvs = tvs_of(4, seed=20)
    assert_trees_close(magmax(tvs), np_magmax(tvs), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_pcb_matches_numpy(scope):
    tvs = tvs_of(3, seed=30)
    got = pcb_merge(tvs, ratio=0.3, clip_ratio=0.05, scope=scope)
    assert_trees_close(got, np_pcb(tvs, 0.3, 0.05, scope), rtol=1e-5, atol=1e-6)


def test_pcb_default_clip_on_a_larger_model():
    # D = 30000 entries: the default 1e-4 clip moves 3 entries at each end.
    tvs = [
        {
            "a": jnp.asarray(np.random.default_rng(i).standard_normal((100, 200)), jnp.float32),
            "b": jnp.asarray(np.random.default_rng(9 + i).standard_normal((10000,)), jnp.float32),
        }
        for i in range(2)
    ]
    assert_trees_close(pcb_merge(tvs), np_pcb(tvs, 0.1, 1e-4, "global"), rtol=1e-5, atol=1e-6)


def test_task_arithmetic_soup_and_task_vector_match_numpy():
    tvs = tvs_of(3, seed=40)
    want = np_tree(
        tvs[0],
        [
            sum(w * np_leaves(t)[j] for w, t in zip([0.3, -1.0, 2.0], tvs, strict=True))
            for j in range(4)
        ],
    )
    assert_trees_close(task_arithmetic(tvs, [0.3, -1.0, 2.0]), want, rtol=1e-5, atol=1e-6)
    assert_trees_close(
        task_arithmetic(tvs, jnp.array([0.3, -1.0, 2.0])), want, rtol=1e-5, atol=1e-6
    )
    mean = np_tree(tvs[0], [np.mean([np_leaves(t)[j] for t in tvs], axis=0) for j in range(4)])
    assert_trees_close(uniform_soup(tvs), mean, rtol=1e-5, atol=1e-6)
    diff = np_tree(
        tvs[0], [a - b for a, b in zip(np_leaves(tvs[0]), np_leaves(tvs[1]), strict=True)]
    )
    assert_trees_close(task_vector(tvs[0], tvs[1]), diff, rtol=1e-6, atol=1e-7)
    applied = np_tree(
        tvs[0], [a + 0.7 * b for a, b in zip(np_leaves(tvs[0]), np_leaves(tvs[1]), strict=True)]
    )
    assert_trees_close(apply_task_vector(tvs[0], tvs[1], 0.7), applied, rtol=1e-6, atol=1e-6)


def np_greedy(models, evaluate, scores, strict=True):
    """The authors' loop: sort ascending, reverse; running mean; accept on improvement."""
    order = [i for i, _ in sorted(enumerate(scores), key=lambda p: p[1])][::-1]
    soup = [np.asarray(x, np.float64) for x in jax.tree.leaves(models[order[0]])]
    best, chosen = scores[order[0]], [order[0]]
    for i in order[1:]:
        n = len(chosen)
        new = [np.asarray(x, np.float64) for x in jax.tree.leaves(models[i])]
        cand = [s * (n / (n + 1.0)) + x / (n + 1.0) for s, x in zip(soup, new, strict=True)]
        score = evaluate(np_tree(models[0], cand))
        if score > best or (not strict and score == best):
            soup, best = cand, score
            chosen.append(i)
    return np_tree(models[0], soup), chosen


def test_greedy_soup_matches_the_authors_loop():
    target = normal_tree(99)
    models = [
        jax.tree.map(lambda t, n: t + n, target, normal_tree(50 + i, scale=1.0 + i % 3))
        for i in range(6)
    ]
    evaluate = lambda p: (
        -sum(
            float(np.sum((np.asarray(a, np.float64) - np.asarray(b)) ** 2))
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
        )
    )
    scores = [evaluate(m) for m in models]
    soup, chosen = greedy_soup(models, evaluate)
    want_soup, want_chosen = np_greedy(models, evaluate, scores)
    assert chosen == want_chosen and len(chosen) > 1
    assert_trees_close(soup, want_soup, rtol=1e-5, atol=1e-6)
    # Invariant: the greedy soup scores at least as well as its first ingredient.
    assert evaluate(soup) >= scores[chosen[0]] - 1e-9


def test_greedy_soup_tie_rules_and_order():
    models = [{"w": jnp.array(float(i))} for i in range(4)]
    # Every soup scores the same: strict (authors' code) keeps one, ties accepted keep all.
    flat = lambda p: 1.0
    soup, chosen = greedy_soup(models, flat)
    assert chosen == [3]  # equal scores: the later model comes first (ascending sort, reversed)
    assert float(soup["w"]) == 3.0
    soup, chosen = greedy_soup(models, flat, scores=[1.0] * 4, accept_ties=True)
    assert chosen == [3, 2, 1, 0] and float(soup["w"]) == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------
# Card invariants.


def test_soup_invariants():
    model = normal_tree(1)
    assert_trees_close(uniform_soup([model] * 3), model, rtol=1e-6, atol=0)
    models = tvs_of(4, seed=60)
    assert_trees_close(uniform_soup(models), uniform_soup(models[::-1]), rtol=1e-6, atol=1e-7)
    state = uniform_soup_init(models[0])
    add = jax.jit(uniform_soup_add)
    for m in models:
        state = add(state, m)
    assert_trees_close(
        uniform_soup_result(state, models[0]), uniform_soup(models), rtol=1e-6, atol=1e-7
    )
    assert int(state.count) == 4
    assert_trees_close(
        uniform_soup_result(uniform_soup_init(model)),
        jax.tree.map(jnp.zeros_like, model),
        rtol=0,
        atol=0,
    )


def test_task_arithmetic_invariants():
    base, ft = normal_tree(70), normal_tree(71)
    tau = task_vector(ft, base)
    assert_trees_close(apply_task_vector(base, tau, 0.0), base, rtol=0, atol=0)
    assert_trees_close(apply_task_vector(base, tau, 1.0), ft, rtol=1e-6, atol=1e-6)
    other = task_vector(normal_tree(72), base)
    lin = task_arithmetic([tau, other], [2.0, 3.0])
    assert_trees_close(
        lin, jax.tree.map(lambda a, b: 2 * a + 3 * b, tau, other), rtol=1e-6, atol=1e-6
    )
    assert_trees_close(
        task_arithmetic([tau, other], [4.0, 6.0]),
        jax.tree.map(lambda x: 2 * x, lin),
        rtol=1e-6,
        atol=1e-6,
    )
    negated = apply_task_vector(apply_task_vector(base, tau, -0.5), tau, 0.5)
    assert_trees_close(negated, base, rtol=1e-6, atol=1e-6)
    # bfloat16 models: exact float32 deltas on request, dtypes kept otherwise.
    b16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    f16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ft)
    assert jax.tree.leaves(task_vector(f16, b16))[0].dtype == jnp.bfloat16
    exact = task_vector(f16, b16, dtype=jnp.float32)
    assert_trees_close(
        apply_task_vector(jax.tree.map(lambda x: x.astype(jnp.float32), b16), exact),
        f16,
        rtol=0,
        atol=0,
    )
    assert jax.tree.leaves(apply_task_vector(b16, exact))[0].dtype == jnp.bfloat16


def test_ties_invariants():
    tvs = tvs_of(3, seed=80)
    # One model, density 1: the model's own task vector.
    assert_trees_close(ties_merge(tvs[:1], density=1.0), tvs[0], rtol=0, atol=0)
    # Order does not matter (weights permuted with the vectors).
    merged = ties_merge(tvs, [1.0, 2.0, 3.0], density=0.3)
    assert_trees_close(
        ties_merge(tvs[::-1], [3.0, 2.0, 1.0], density=0.3), merged, rtol=1e-6, atol=1e-7
    )
    # Trimmed entries are zero: with one model, exactly floor(density n) nonzeros per tensor.
    single = ties_merge(tvs[:1], density=0.3)
    for x in jax.tree.leaves(single):
        assert int(jnp.sum(x != 0)) == kept(0.3, x.size)
    # No coordinate averages opposite signs: |merged| <= max |agreeing value| and the merged sign
    # is never against every kept value.
    stack = [np.stack([np_leaves(t)[j] for t in tvs]) for j in range(4)]
    for m, s in zip(np_leaves(ties_merge(tvs, density=1.0)), stack, strict=True):
        assert np.all(np.abs(m) <= np.abs(s).max(0) + 1e-6)
        same = (np.sign(s) == np.sign(m)[None]) & (m != 0)[None]
        assert np.all(same.any(0) | (m == 0))
    # All-agreeing coordinates get the plain mean of the kept values.
    pos = [jax.tree.map(jnp.abs, t) for t in tvs]
    assert_trees_close(ties_merge(pos, density=1.0), uniform_soup(pos), rtol=1e-6, atol=1e-7)


def test_ties_global_and_per_tensor_trims_differ():
    # A large leaf and a small one: a global top-50% takes everything from the large leaf.
    tv = {"big": jnp.array([10.0, 9.0, 8.0, 7.0]), "small": jnp.array([0.1, 0.2, 0.3, 0.4])}
    per = ties_merge([tv], density=0.5, scope="per_tensor")
    glob = ties_merge([tv], density=0.5, scope="global")
    np.testing.assert_array_equal(per["big"], [10.0, 9.0, 0.0, 0.0])
    np.testing.assert_array_equal(per["small"], np.float32([0.0, 0.0, 0.3, 0.4]))
    np.testing.assert_array_equal(glob["big"], [10.0, 9.0, 8.0, 7.0])
    np.testing.assert_array_equal(glob["small"], [0.0, 0.0, 0.0, 0.0])


def test_top_k_ties_keep_exactly_k_earlier_first():
    tv = {"a": jnp.array([1.0, -2.0, 2.0, 1.0]), "b": jnp.array([2.0, 0.0, -2.0])}
    got = ties_merge([tv], density=0.5, scope="global")  # k = 3 of 7; four entries tie at |2|
    np.testing.assert_array_equal(got["a"], [0.0, -2.0, 2.0, 0.0])
    np.testing.assert_array_equal(got["b"], [2.0, 0.0, 0.0])
    const = {"c": jnp.full((5, 4), 3.0)}
    assert int(jnp.sum(ties_merge([const], density=0.25)["c"] != 0)) == 5


# Tests that patch a trace-time constant use shapes or task counts seen nowhere else, so the
# jitted cores trace afresh (both layouts compute the same thing, so the cache stays valid).


def test_wide_counts_match_numpy(monkeypatch):
    # Force the two-limb counting path meant for > 2**31 entries (4 tasks: a fresh trace).
    monkeypatch.setattr(tvm, "_WIDE_COUNT_THRESHOLD", 7)
    tvs = tvs_of(4, seed=85)
    assert_trees_close(
        ties_merge(tvs, density=0.3, scope="global"),
        np_ties(tvs, None, 0.3, "total", "global", "positive"),
        rtol=1e-5,
        atol=1e-6,
    )
    # Ties across the cut, resolved by position over two leaves (2 identical tasks: fresh trace).
    tie = {"a": jnp.array([1.0, -2.0, 2.0, 1.0]), "b": jnp.array([2.0, 0.0, -2.0])}
    got = ties_merge([tie, tie], density=0.5, scope="global")
    np.testing.assert_array_equal(got["a"], [0.0, -2.0, 2.0, 0.0])
    np.testing.assert_array_equal(got["b"], [2.0, 0.0, 0.0])
    assert_trees_close(
        pcb_merge(tvs, ratio=0.2, clip_ratio=0.05),
        np_pcb(tvs, 0.2, 0.05, "global"),
        rtol=1e-5,
        atol=1e-6,
    )
    tie = {"a": jnp.array([1.0, -2.0, 2.0, 1.0]), "b": jnp.array([2.0, 0.0, -2.0])}
    got = ties_merge([tie], density=0.5, scope="global")
    np.testing.assert_array_equal(got["a"], [0.0, -2.0, 2.0, 0.0])
    np.testing.assert_array_equal(got["b"], [2.0, 0.0, 0.0])


def test_exact_size_buckets_match_numpy(monkeypatch):
    # Same-size leaves stacked in exact-size buckets (as large leaves are), small ones padded.
    shapes = {"a": (4, 6), "b": (6, 4), "c": (24,), "d": (3,), "e": ()}
    monkeypatch.setattr(tvm, "_SMALL_LEAF", 8)
    tvs = [normal_tree(200 + i, shapes=shapes) for i in range(3)]
    assert_trees_close(
        ties_merge(tvs, density=0.3, scope="global", zero_sign="majority"),
        np_ties(tvs, None, 0.3, "total", "global", "majority"),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_trees_close(
        pcb_merge(tvs, ratio=0.3, clip_ratio=0.05, scope="per_tensor"),
        np_pcb(tvs, 0.3, 0.05, "per_tensor"),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_trees_close(
        breadcrumbs(tvs, 0.2, 0.8), np_breadcrumbs(tvs, 0.2, 0.8), rtol=1e-5, atol=1e-6
    )


def test_large_leaves_match_numpy():
    # Leaves above the small-leaf size: two of equal size share a bucket, one has its own.
    shapes = {"x": (300, 250), "y": (250, 300), "z": (70001,), "s": (5,)}
    tvs = [normal_tree(300 + i, shapes=shapes) for i in range(2)]
    assert_trees_close(
        ties_merge(tvs, density=0.1, scope="global"),
        np_ties(tvs, None, 0.1, "total", "global", "positive"),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_trees_close(pcb_merge(tvs), np_pcb(tvs, 0.1, 1e-4, "global"), rtol=1e-5, atol=1e-6)


def test_wide_limb_helpers():
    counts = [jnp.array([[70000, 5]], jnp.int32), jnp.array([[65536, 1]], jnp.int32)]
    wide = tvm._wide_sum(counts, total=-1 + 2**40)
    assert [int(v) for v in wide[0]] == [2, 0] and [int(v) for v in wide[1]] == [4464, 6]
    assert list(np.asarray(tvm._wide_at_least(wide, 135536))) == [True, False]
    assert list(np.asarray(tvm._wide_at_least(wide, 135537))) == [False, False]
    assert list(np.asarray(tvm._wide_from(135540, wide))) == [4, 135534]
    assert int(tvm._wide_from(2**40, wide)[0]) == 2**31 - 1
    assert int(tvm._wide_from(3, wide)[0]) == 0


def test_breadcrumbs_invariants():
    tv = normal_tree(90)
    out = breadcrumbs([tv], 0.3, 0.9)
    for x, o in zip(np_leaves(tv), np_leaves(out), strict=True):
        n = x.size
        assert int(np.sum(o != 0)) == n - kept(0.1, n) - kept(0.3, n)  # fraction gamma - beta
        largest = np.argsort(-np.abs(x.reshape(-1)), kind="stable")[: kept(0.1, n)]
        assert np.all(o.reshape(-1)[largest] == 0)
    assert_trees_close(apply_task_vector(tv, out, 0.0), tv, rtol=0, atol=0)  # alpha = 0


def test_magmax_invariants():
    tvs = tvs_of(3, seed=95)
    assert_trees_equal(magmax(tvs[:1]), tvs[0])
    merged = magmax(tvs)
    for t in tvs:
        for m, x in zip(jax.tree.leaves(merged), jax.tree.leaves(t), strict=True):
            assert bool(jnp.all(jnp.abs(m) >= jnp.abs(x)))
    update = jax.jit(magmax_update)
    running = magmax_init(tvs[0])
    for t in tvs:
        running = update(running, t)
    assert_trees_equal(running, merged)
    assert jax.eval_shape(lambda r, t: update(r, t), running, tvs[0]) == jax.eval_shape(
        magmax_init, tvs[0]
    )  # constant memory: state shaped like the parameters
    # Ties go to the later task.
    tie = magmax([{"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([-2.0, 1.0])}])
    np.testing.assert_array_equal(tie["w"], [-2.0, 1.0])


def test_pcb_invariants():
    tvs = tvs_of(3, seed=100)
    one = tvs[:1]
    merged = pcb_merge(one, ratio=0.4, clip_ratio=0.05)
    np_merged, s = np_pcb_flat(
        np.stack([np.concatenate([x.reshape(-1) for x in np_leaves(tvs[0])])]), 0.4, 0.05
    )
    flat = np.concatenate([x.reshape(-1) for x in np_leaves(merged)])
    srt = np.sort(np.abs(np.concatenate([x.reshape(-1) for x in np_leaves(tvs[0])])))
    d = srt.size
    clipped = np.sign(np.concatenate([x.reshape(-1) for x in np_leaves(tvs[0])])) * np.clip(
        np.abs(np.concatenate([x.reshape(-1) for x in np_leaves(tvs[0])])),
        srt[int(d * 0.05)],
        srt[int(d * 0.95 - 1)],
    )
    np.testing.assert_allclose(flat, clipped * (s[0] > 0), rtol=1e-6, atol=1e-7)  # tau~ * 1[s > 0]
    assert s.max() == 1.0 and s.min() == 0.0
    assert int(np.sum(s > 0)) == d - int(d * 0.6) - 1  # about r * D nonzeros
    # n identical tasks give the same as one.
    assert_trees_close(pcb_merge(one * 3, ratio=0.4, clip_ratio=0.05), merged, rtol=1e-5, atol=1e-6)
    # Order invariance.
    assert_trees_close(pcb_merge(tvs), pcb_merge(tvs[::-1]), rtol=1e-5, atol=1e-6)


def test_dare_properties():
    x = {
        "w": jnp.asarray(np.random.default_rng(0).standard_normal((200, 100)), jnp.float32),
        "s": jnp.array(1.5),
    }
    key = jax.random.key(3)
    out = dare(x, 0.3, key)
    w, ow = np.asarray(x["w"]), np.asarray(out["w"])
    assert np.all((ow == 0) | np.isclose(ow, w / 0.3, rtol=1e-6))
    assert abs(np.mean(ow != 0) - 0.3) < 0.01  # keep probability
    assert_trees_equal(dare(x, 0.3, key), out)  # deterministic in the key
    assert not np.array_equal(np.asarray(dare(x, 0.3, jax.random.key(4))["w"]), ow)
    plain = dare(x, 0.3, key, rescale=False)
    np.testing.assert_array_equal(np.asarray(plain["w"]) * (ow != 0), np.asarray(plain["w"]))
    assert np.all((np.asarray(plain["w"]) == 0) | (np.asarray(plain["w"]) == w))
    assert_trees_equal(dare(x, 1.0, key), x)  # density 1 is the identity
    # Unbiased: the mean over many keys approaches the input.
    small = {"w": jnp.array([1.0, -2.0, 0.5])}
    many = jax.vmap(lambda k: dare(small, 0.5, k)["w"])(jax.random.split(key, 2000))
    np.testing.assert_allclose(np.mean(np.asarray(many), 0), [1.0, -2.0, 0.5], atol=0.15)
    assert (
        dare(jax.tree.map(lambda v: v.astype(jnp.bfloat16), x), 0.5, key)["w"].dtype == jnp.bfloat16
    )


# ---------------------------------------------------------------------------------------------
# Hypothesis properties: finite output, shapes and dtypes kept, for zeros and extreme magnitudes.

_MERGES = {
    "ties": lambda tvs, d: ties_merge(tvs, density=d),
    "ties_global": lambda tvs, d: ties_merge(
        tvs, [0.5] * len(tvs), density=d, scope="global", sign="frequency", zero_sign="majority"
    ),
    "breadcrumbs": lambda tvs, d: breadcrumbs(tvs, 0.5 * d, d),
    "pcb": lambda tvs, d: pcb_merge(tvs, ratio=d, clip_ratio=0.1),
    "pcb_per_tensor": lambda tvs, d: pcb_merge(tvs, ratio=d, scope="per_tensor"),
    "magmax": lambda tvs, d: magmax(tvs),
    "arithmetic": lambda tvs, d: task_arithmetic(tvs, d),
    "soup": lambda tvs, d: uniform_soup(tvs),
}


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(sorted(_MERGES) + ["dare"]),
    n=st.sampled_from([1, 3]),
    rows=st.sampled_from([1, 3]),
    density=st.sampled_from([0.05, 0.5, 1.0]),
    kind=st.sampled_from(["zeros", "tiny", "huge", "ties", "normal"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_merges_stay_finite_and_keep_shapes(name, n, rows, density, kind, dtype, seed):
    shapes = {"m": (rows, 5), "c": (2, rows, 2), "v": (3,), "s": ()}
    rng = np.random.default_rng(seed)

    def leaf(s):
        if kind == "zeros":
            v = np.zeros(s)
        elif kind == "ties":
            v = rng.integers(-1, 2, s).astype(float)
        else:
            v = {"tiny": 1e-30, "huge": 1e30, "normal": 1.0}[kind] * rng.standard_normal(s)
        return jnp.asarray(v, dtype)

    tvs = [jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple)) for _ in range(n)]
    if name == "dare":
        out = dare(tvs[0], density, jax.random.key(seed))
    else:
        out = _MERGES[name](tvs, density)
    for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(tvs[0]), strict=True):
        assert o.shape == t.shape and o.dtype == t.dtype, name
        assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32)))), (name, kind)
        if kind == "zeros":
            assert not bool(jnp.any(o != 0)), name


# ---------------------------------------------------------------------------------------------
# jit and sharding: every function compiles and gives the same result on a sharded tree.


def _shard(tree, mesh):
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree, SPECS)


W3 = jnp.array([1.0, 0.5, 2.0])
_TIES = dict(density=0.4, sign="total", scope="per_tensor", zero_sign="positive")
_TIES_GLOBAL = dict(density=0.4, sign="total", scope="global", zero_sign="majority")
# name: (function, static options, how to call); options match the reference tests above, so
# the eager baseline reuses their compiled cores and only the sharded program compiles here.
_SHARDED = {
    "task_vector": (task_vector, {}, "pair"),
    "apply_task_vector": (apply_task_vector, {"scale": 0.5}, "pair"),
    "task_arithmetic": (task_arithmetic, {}, "weighted"),
    "uniform_soup": (uniform_soup, {}, "list"),
    "ties_merge": (ties_merge, _TIES, "weighted"),
    "ties_merge_global": (ties_merge, _TIES_GLOBAL, "weighted"),
    "breadcrumbs": (breadcrumbs, {"beta": 0.3, "gamma": 0.9}, "weights_kw"),
    "magmax": (magmax, {}, "list"),
    "magmax_update": (magmax_update, {}, "pair"),
    "pcb_merge": (pcb_merge, {"ratio": 0.3, "clip_ratio": 0.05}, "list"),
    "pcb_merge_per_tensor": (
        pcb_merge,
        {"ratio": 0.3, "clip_ratio": 0.05, "scope": "per_tensor"},
        "list",
    ),
    "dare": (dare, {"density": 0.5}, "key"),
}


@pytest.mark.parametrize("name", list(_SHARDED))
def test_jit_and_sharded_match_unsharded(name):
    fn, options, kind = _SHARDED[name]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    tvs = tvs_of(3, seed=110)
    on_mesh = [_shard(t, mesh) for t in tvs]
    call = {
        "pair": lambda f, t: f(t[0], t[1]),
        "list": lambda f, t: f(t),
        "weighted": lambda f, t: f(t, W3),
        "weights_kw": lambda f, t: f(t, weights=W3),
        "key": lambda f, t: f(t[0], key=jax.random.key(0)),
    }[kind]
    jitted = jax.jit(functools.partial(fn, **options))
    got = call(jitted, on_mesh)
    want = call(functools.partial(fn, **options), tvs)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7, err=name)
    assert jax.tree.structure(got) == jax.tree.structure(want)


def test_jit_with_traced_weights_and_scale():
    tvs = tvs_of(2, seed=120)
    f = jax.jit(lambda t, w: ties_merge(t, w, density=0.5))
    assert_trees_close(f(tvs, jnp.array([1.0, 2.0])), ties_merge(tvs, [1.0, 2.0], density=0.5))
    g = jax.jit(lambda b, t, s: apply_task_vector(b, t, s))
    assert_trees_close(g(tvs[0], tvs[1], 0.25), apply_task_vector(tvs[0], tvs[1], 0.25))


# ---------------------------------------------------------------------------------------------
# Argument errors.


def test_errors_name_the_leaf_and_shapes():
    a = {"enc": {"w": jnp.zeros((4, 3))}}
    b = {"enc": {"w": jnp.zeros((3, 4))}}
    msg = r"ties_merge: leaf 'enc/w' has shape \(3, 4\) in `task_vectors\[1\]` but \(4, 3\) in `task_vectors\[0\]`\."
    with pytest.raises(ValueError, match=msg):
        ties_merge([a, b])
    with pytest.raises(ValueError, match=r"task_vector: leaf 'enc/w' has shape \(3, 4\) in `base`"):
        task_vector(a, b)
    with pytest.raises(ValueError, match=r"apply_task_vector: leaf 'enc/w' has shape"):
        apply_task_vector(a, b)
    with pytest.raises(ValueError, match=r"magmax_update: leaf 'enc/w' has shape"):
        magmax_update(a, b)
    with pytest.raises(ValueError, match=r"uniform_soup_add: leaf 'enc/w' has shape"):
        uniform_soup_add(uniform_soup_init(a), b)
    with pytest.raises(ValueError, match="different tree structure"):
        magmax([a, {"w": jnp.zeros((4, 3))}])


@pytest.mark.parametrize(
    "fn", [task_arithmetic, uniform_soup, ties_merge, breadcrumbs, magmax, pcb_merge]
)
def test_errors_on_bad_sequences(fn):
    name = fn.__name__
    with pytest.raises(
        TypeError, match=rf"{name}\((task_vectors|models)=\.\.\.\) must be a list or tuple"
    ):
        fn({"w": jnp.zeros(3)})
    with pytest.raises(
        ValueError, match=rf"{name}\((task_vectors|models)=\.\.\.\) must hold at least one"
    ):
        fn([])
    with pytest.raises(
        TypeError, match=rf"{name}: leaf 'w' of `(task_vectors|models)\[1\]` has dtype int32"
    ):
        fn([{"w": jnp.zeros(3)}, {"w": jnp.zeros(3, jnp.int32)}])


def test_errors_on_non_float_leaves():
    f, i = {"w": jnp.zeros(3)}, {"w": jnp.zeros(3, jnp.int32)}
    for call, name in [
        (lambda: task_vector(i, f), "task_vector"),
        (lambda: task_vector(f, i), "task_vector"),
        (lambda: apply_task_vector(i, f), "apply_task_vector"),
        (lambda: apply_task_vector(f, i), "apply_task_vector"),
        (lambda: dare(i, 0.5, jax.random.key(0)), "dare"),
        (lambda: magmax_init(i), "magmax_init"),
        (lambda: magmax_update(f, i), "magmax_update"),
        (lambda: uniform_soup_init(i), "uniform_soup_init"),
        (lambda: uniform_soup_add(uniform_soup_init(f), i), "uniform_soup_add"),
    ]:
        with pytest.raises(TypeError, match=rf"{name}: leaf 'w' of `\w+` has dtype int32"):
            call()


def test_errors_on_hyper_parameters():
    tvs = tvs_of(2)
    with pytest.raises(
        ValueError, match=r"ties_merge\(density=\.\.\.\) must be in \(0.0, 1.0\], got 0.0"
    ):
        ties_merge(tvs, density=0.0)
    with pytest.raises(
        ValueError, match=r"ties_merge\(density=\.\.\.\) must be in \(0.0, 1.0\], got 1.5"
    ):
        ties_merge(tvs, density=1.5)
    with pytest.raises(TypeError, match=r"ties_merge\(density=\.\.\.\) must be a Python float"):
        jax.jit(lambda t, d: ties_merge(t, density=d))(tvs, 0.5)
    with pytest.raises(
        ValueError, match=r"ties_merge\(sign=\.\.\.\) must be one of 'total', 'frequency'"
    ):
        ties_merge(tvs, sign="mass")
    with pytest.raises(ValueError, match=r"ties_merge\(scope=\.\.\.\) must be one of"):
        ties_merge(tvs, scope="layer")
    with pytest.raises(ValueError, match=r"ties_merge\(zero_sign=\.\.\.\) must be one of"):
        ties_merge(tvs, zero_sign="minority")
    with pytest.raises(
        ValueError,
        match=r"ties_merge\(weights=\.\.\.\) must hold one weight per task vector \(2\), got 3",
    ):
        ties_merge(tvs, [1.0, 2.0, 3.0])
    with pytest.raises(
        ValueError, match=r"task_arithmetic\(weights=\.\.\.\) must be a scalar or hold one weight"
    ):
        task_arithmetic(tvs, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"breadcrumbs\(beta=\.\.\.\) must be <= gamma"):
        breadcrumbs(tvs, 0.9, 0.5)
    with pytest.raises(ValueError, match=r"breadcrumbs\(gamma=\.\.\.\) must be in \[0.0, 1.0\]"):
        breadcrumbs(tvs, 0.1, 1.2)
    with pytest.raises(ValueError, match=r"pcb_merge\(clip_ratio=\.\.\.\) must be in \[0.0, 0.5\)"):
        pcb_merge(tvs, clip_ratio=0.5)
    with pytest.raises(ValueError, match=r"pcb_merge\(ratio=\.\.\.\) must be in \(0.0, 1.0\]"):
        pcb_merge(tvs, ratio=0.0)
    with pytest.raises(ValueError, match=r"pcb_merge\(scope=\.\.\.\) must be one of"):
        pcb_merge(tvs, scope="layer")
    with pytest.raises(
        ValueError, match=r"dare\(density=\.\.\.\) must be in \(0.0, 1.0\], got 0.0"
    ):
        dare(tvs[0], 0.0, jax.random.key(0))


def test_greedy_soup_errors():
    models = tvs_of(2)
    with pytest.raises(TypeError, match=r"greedy_soup\(evaluate=\.\.\.\) must be a callable"):
        greedy_soup(models, 1.0)
    with pytest.raises(
        ValueError, match=r"greedy_soup\(scores=\.\.\.\) must hold one score per model \(2\), got 1"
    ):
        greedy_soup(models, lambda p: 0.0, scores=[1.0])
    with pytest.raises(TypeError, match=r"greedy_soup\(models=\.\.\.\) must be a list or tuple"):
        greedy_soup(models[0], lambda p: 0.0)
