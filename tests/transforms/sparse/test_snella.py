"""Tests for SNELLA (SP-20): kernelized merge, magnitude-weighted sparse delta, bi-level allocation.

References: the rules read from the SNELLA reference code (class ``SNELLA`` of
``model/vision_transformer_timm.py`` and ``sparse_allocator.py``), written plainly in float64
NumPy below: distances by loops over heads, ``np.quantile`` (linear), the EMA update, the cubic
budget and the proportional allocation with its ``while`` loop.
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

from cljax import MatrixSpec
from cljax.transforms.sparse.snella import (
    SnellaImportance,
    SnellaWeight,
    snella_allocate,
    snella_allocate_counts,
    snella_budget,
    snella_delta,
    snella_importance_init,
    snella_importance_update,
    snella_init,
    snella_kernel,
    snella_labels,
    snella_materialize,
)

# ---------------------------------------------------------------------------------------------
# Float64 NumPy transcriptions.


def _np_kernel(a, b, alpha, gamma, beta, coeff=0.1):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    heads, m, _ = a.shape
    n = b.shape[1]
    k0 = np.zeros((m, n))
    for h in range(heads):
        dist = np.sqrt(((a[h][:, None, :] - b[h][None, :, :]) ** 2).sum(-1))
        k0 += coeff * (-1.0) ** h * dist
    z = k0 / gamma
    soft = np.exp(z - z.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    return k0 + alpha * soft + beta


def _np_sparsify(k, s):
    mag = np.abs(k)
    thres = np.quantile(mag.reshape(-1), s)  # linear interpolation, as torch.quantile
    return k * np.where(mag > thres, mag, 0.0)


def _np_budget(step, init, target, total, iw, fw, every):
    if step <= iw:
        return init, False
    if step > total - fw:
        return target, True
    mul = 1 - (step - iw) / (total - fw - iw)
    return float(int(target + (init - target) * mul**3)), step % every == 0


def _np_alloc(scores, count, caps):
    scores = np.asarray(scores, np.float64)
    caps = np.asarray(caps, np.float64)
    scores = scores / scores.sum() if scores.sum() > 0 else np.full_like(scores, 1 / len(scores))
    alloc = np.minimum(caps, np.floor(count * scores))
    delta = count - alloc.sum()
    while delta > 1e-6:
        remain = caps - alloc
        idx = np.nonzero(remain)[0]
        # all open matrices scoring 0: the reference divides by zero here; share uniformly
        w = scores[idx] if scores[idx].sum() > 0 else np.ones(len(idx))
        alloc[idx] += np.minimum(delta * w / w.sum(), remain[idx])
        delta = count - alloc.sum()
    return np.floor(alloc + 1e-6).astype(np.int64)


def _np_ema(p, g, ipt, unc, b1, b2):
    cur = np.abs(np.asarray(p, np.float64) * np.asarray(g, np.float64))
    ipt = b1 * ipt + (1 - b1) * cur
    unc = b2 * unc + (1 - b2) * np.abs(cur - ipt)
    return ipt, unc


_PARAMS = {"w": jnp.ones((6, 5)), "stack": jnp.ones((2, 4, 3)), "bias": jnp.ones((5,))}
_TUNED = snella_init(jax.random.key(0), _PARAMS, rank=4)
_delta_jit = jax.jit(snella_delta)


def _weight(seed, m=6, n=5, heads=2, d=3, sparsity=0.3, base_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return SnellaWeight(
        base=jnp.asarray(rng.standard_normal((m, n)), base_dtype),
        a=jnp.asarray(rng.standard_normal((heads, m, d)), jnp.float32),
        b=jnp.asarray(rng.standard_normal((heads, n, d)), jnp.float32),
        alpha=jnp.asarray(rng.uniform(0.5, 2.0), jnp.float32),
        gamma=jnp.asarray(rng.uniform(0.5, 2.0), jnp.float32),
        beta=jnp.asarray(rng.uniform(-0.5, 0.5), jnp.float32),
        sparsity=jnp.asarray(sparsity, jnp.float32),
    )


# ---------------------------------------------------------------------------------------------
# Kernel and delta.


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_kernel_matches_numpy(heads):
    w = _weight(heads, heads=heads)
    got = snella_kernel(w.a, w.b, w.alpha, w.gamma, w.beta)
    want = _np_kernel(w.a, w.b, float(w.alpha), float(w.gamma), float(w.beta))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 1.0])
def test_delta_matches_numpy_and_is_zero_outside_mask(sparsity):
    w = _weight(1, sparsity=sparsity)
    got = np.asarray(_delta_jit(w), np.float64)
    k = _np_kernel(w.a, w.b, float(w.alpha), float(w.gamma), float(w.beta))
    want = _np_sparsify(k, sparsity)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    kept = np.abs(k) > np.quantile(np.abs(k), sparsity)
    assert not got[~kept].any()
    assert (got[kept] != 0).all()
    assert kept.sum() <= math.ceil((1 - sparsity) * k.size)


def test_delta_stacked_and_conv_views_match_per_matrix():
    tuned = snella_init(
        jax.random.key(1),
        {"s": jnp.zeros((2, 4, 3)), "c": jnp.zeros((2, 2, 3, 4))},
        rank=2,
        sparsity=0.25,
        targets=lambda p: {"s": True, "c": False},
    )
    s = tuned["s"]
    got = np.asarray(snella_delta(s))
    for i in range(2):
        k = _np_kernel(s.a[i], s.b[i], 1.0, 1.0, 0.0)
        np.testing.assert_allclose(got[i], _np_sparsify(k, 0.25), rtol=1e-5, atol=1e-6)
    conv = snella_init(
        jax.random.key(2),
        {"c": jnp.zeros((2, 2, 3, 4))},
        rank=2,
        matrix_spec=MatrixSpec(rows=(0, 1, 2), cols=3),
    )["c"]
    assert conv.a.shape == (2, 12, 1) and conv.b.shape == (2, 4, 1)
    got = np.asarray(snella_delta(conv)).reshape(12, 4)
    np.testing.assert_allclose(
        got, _np_sparsify(_np_kernel(conv.a, conv.b, 1.0, 1.0, 0.0), 0.0), rtol=1e-5, atol=1e-6
    )


def test_init_distribution_and_targets():
    w = _TUNED["w"]
    assert w.a.shape == (2, 6, 2) and w.b.shape == (2, 5, 2)
    assert float(jnp.max(jnp.abs(w.a))) <= 1 / math.sqrt(6 * 2)
    assert float(jnp.max(jnp.abs(w.b))) <= 1 / math.sqrt(5 * 2)
    assert _TUNED["stack"].a.shape == (2, 2, 4, 2) and _TUNED["stack"].alpha.shape == (2,)
    assert not isinstance(_TUNED["bias"], SnellaWeight)
    assert float(w.alpha) == 1.0 and float(w.gamma) == 1.0 and float(w.beta) == 0.0


def test_materialize_bf16_in_out_and_gradients_only_reach_factors():
    tuned = snella_init(
        jax.random.key(3), {"w": jnp.ones((6, 5), jnp.bfloat16)}, rank=4, sparsity=0.5
    )
    dense = snella_materialize(tuned)
    assert dense["w"].dtype == jnp.bfloat16
    want = 1.0 + np.asarray(snella_delta(tuned["w"]), np.float64)
    np.testing.assert_allclose(np.asarray(dense["w"], np.float64), want, rtol=1e-2, atol=1e-2)

    def loss(t):
        return jnp.sum(snella_materialize(t)["w"].astype(jnp.float32) ** 2)

    g = jax.grad(loss)(tuned)["w"]
    assert float(jnp.abs(g.sparsity)) == 0.0
    for leaf in (g.a, g.b, g.alpha, g.gamma, g.beta):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.abs(g.a).sum()) > 0


def test_optimizer_state_only_for_factors_and_scalars():
    tx = optax.partition(
        {"snella": optax.adam(1e-2), "frozen": optax.set_to_zero()}, snella_labels(_TUNED)
    )
    state = tx.init(_TUNED)
    size = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    per = sum(x.a.size + x.b.size + 3 * x.alpha.size for x in (_TUNED["w"], _TUNED["stack"]))
    assert size == 2 * per  # adam's two moments of a, b, alpha, gamma, beta; nothing for bases
    grads = jax.tree.map(jnp.ones_like, _TUNED)
    updates, _ = tx.update(grads, state, _TUNED)
    assert not bool(jnp.any(updates["w"].base)) and not bool(jnp.any(updates["w"].sparsity))
    assert not bool(jnp.any(updates["bias"]))
    assert bool(jnp.all(updates["w"].a != 0))


def test_zero_and_extreme_inputs_are_finite():
    zero = SnellaWeight(
        jnp.zeros((4, 3)),
        jnp.zeros((2, 4, 2)),
        jnp.zeros((2, 3, 2)),
        jnp.zeros(()),
        jnp.zeros(()),
        jnp.zeros(()),
        jnp.zeros(()),
    )
    for w in (zero, _weight(5, sparsity=1.0), _weight(6)):
        delta = snella_delta(w)
        g = jax.grad(lambda t: jnp.sum(snella_delta(t) ** 2))(w)
        assert bool(jnp.all(jnp.isfinite(delta)))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    big = _weight(7)
    big = SnellaWeight(
        big.base,
        big.a * 1e8,
        big.b * 1e8,
        big.alpha * 1e8,
        jnp.asarray(-1e-30),
        big.beta,
        big.sparsity,
    )
    assert bool(jnp.all(jnp.isfinite(snella_delta(big))))


@settings(deadline=None, max_examples=8)
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 5),
    heads=st.integers(1, 3),
    d=st.integers(1, 3),
    s=st.floats(0.0, 1.0),
)
def test_kernel_and_delta_shapes_property(m, n, heads, d, s):
    w = _weight(0, m=m, n=n, heads=heads, d=d, sparsity=s)
    delta = np.asarray(snella_delta(w))
    assert delta.shape == (m, n) and delta.dtype == np.float32
    assert np.isfinite(delta).all()
    assert (delta != 0).sum() <= math.ceil((1 - s) * m * n)


# ---------------------------------------------------------------------------------------------
# Importance, budget and allocation.


def test_importance_update_matches_numpy():
    rng = np.random.default_rng(0)
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.float32), _TUNED
    )
    imp = snella_importance_init(_TUNED)
    want = [
        (np.zeros(x.a.shape), np.zeros(x.a.shape), np.zeros(x.b.shape), np.zeros(x.b.shape))
        for x in (_TUNED["stack"], _TUNED["w"])
    ]
    for _ in range(3):
        imp = snella_importance_update(imp, _TUNED, grads, b1=0.85, b2=0.7)
        for i, key in enumerate(("stack", "w")):
            ia, ua, ib, ub = want[i]
            ia, ua = _np_ema(_TUNED[key].a, grads[key].a, ia, ua, 0.85, 0.7)
            ib, ub = _np_ema(_TUNED[key].b, grads[key].b, ib, ub, 0.85, 0.7)
            want[i] = (ia, ua, ib, ub)
    for i in range(2):
        np.testing.assert_allclose(imp.ipt_a[i], want[i][0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(imp.unc_a[i], want[i][1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(imp.ipt_b[i], want[i][2], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(imp.unc_b[i], want[i][3], rtol=1e-5, atol=1e-7)


def test_importance_nan_is_zeroed():
    grads = jax.tree.map(lambda x: jnp.full(jnp.shape(x), jnp.nan), _TUNED)
    imp = snella_importance_update(snella_importance_init(_TUNED), _TUNED, grads)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(imp))


@pytest.mark.parametrize("iw,fw,every", [(0, 0, 1), (2, 3, 2), (1, 0, 3)])
def test_budget_matches_numpy(iw, fw, every):
    fn = jax.jit(
        lambda s: snella_budget(
            s,
            init_count=1000.0,
            target_count=300.0,
            total_steps=20,
            init_warmup=iw,
            final_warmup=fw,
            reallocate_every=every,
        )
    )
    for step in range(0, 23):
        count, again = fn(step)
        want_count, want_again = _np_budget(step, 1000.0, 300.0, 20, iw, fw, every)
        assert abs(float(count) - want_count) <= 1.0, step
        assert bool(again) == want_again, step


@pytest.mark.parametrize("seed", range(4))
def test_allocate_counts_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    caps = rng.integers(5, 40, 6).astype(np.float64)
    scores = rng.exponential(size=6) * (rng.uniform(size=6) > 0.3)
    count = float(rng.integers(0, int(caps.sum())))
    got = np.asarray(snella_allocate_counts(jnp.asarray(scores), count, jnp.asarray(caps)))
    want = _np_alloc(scores, count, caps)
    assert np.abs(got - want).max() <= 1
    assert (got <= caps).all() and (got >= 0).all()


@settings(deadline=None)
@given(scores=st.lists(st.floats(0.0, 1e3), min_size=1, max_size=6), frac=st.floats(0.0, 1.0))
def test_allocate_counts_property(scores, frac):
    caps = np.arange(1, len(scores) + 1) * 7.0
    count = math.floor(frac * caps.sum())
    got = np.asarray(snella_allocate_counts(jnp.asarray(scores), count, jnp.asarray(caps)))
    assert got.dtype == np.int32
    assert (got >= 0).all() and (got <= caps).all()
    assert got.sum() <= count
    assert got.sum() >= count - len(scores) - 1


def test_allocate_end_to_end_matches_numpy():
    rng = np.random.default_rng(4)
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.float32), _TUNED
    )
    imp = snella_importance_init(_TUNED)
    for _ in range(2):
        imp = snella_importance_update(imp, _TUNED, grads)
    step_fn = jax.jit(
        lambda t, i, s: snella_allocate(
            t, i, s, target_sparsity=0.6, total_steps=10, init_sparsity=0.0, reallocate_every=2
        )
    )
    # the NumPy allocation: matrices in flatten order (stack[0], stack[1], w)
    scores = []
    for i in range(2):
        ia, ua, ib, ub = (
            np.asarray(x[i], np.float64) for x in (imp.ipt_a, imp.unc_a, imp.ipt_b, imp.unc_b)
        )
        if ia.ndim == 4:
            scores += [(ia[j] * ua[j]).mean() + (ib[j] * ub[j]).mean() for j in range(ia.shape[0])]
        else:
            scores.append((ia * ua).mean() + (ib * ub).mean())
    caps = np.array([12.0, 12.0, 30.0])
    for step in (0, 3, 4, 10):
        out = step_fn(_TUNED, imp, step)
        count, again = _np_budget(step, caps.sum(), 0.4 * caps.sum(), 10, 0, 0, 2)
        got = np.concatenate(
            [np.asarray(out["stack"].sparsity), np.asarray(out["w"].sparsity)[None]]
        )
        if not again:
            np.testing.assert_array_equal(got, 0.0)
            continue
        want = np.clip(1 - _np_alloc(scores, count, caps) / caps, 0, 1)
        np.testing.assert_allclose(got, want, atol=1.0 / 12 + 1e-6)
        assert ((1 - got) * caps).sum() <= count + 1e-3


# ---------------------------------------------------------------------------------------------
# Errors.


def test_errors():
    w = _weight(0)
    with pytest.raises(ValueError, match="snella_kernel: `a` has shape"):
        snella_kernel(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)))
    with pytest.raises(TypeError, match="snella_delta: `weight` must be a SnellaWeight"):
        snella_delta(jnp.zeros((3, 3)))
    with pytest.raises(TypeError, match=r"snella_init\(rank=...\) must be an int"):
        snella_init(jax.random.key(0), _PARAMS, rank=2.0)
    with pytest.raises(ValueError, match=r"snella_init\(rank=...\) must be a multiple of heads=2"):
        snella_init(jax.random.key(0), _PARAMS, rank=3)
    with pytest.raises(ValueError, match=r"snella_init\(sparsity=...\) must be in"):
        snella_init(jax.random.key(0), _PARAMS, sparsity=1.5)
    with pytest.raises(TypeError, match=r"snella_init\(matrix_spec=...\) must be a MatrixSpec"):
        snella_init(jax.random.key(0), _PARAMS, matrix_spec=(0, 1))
    with pytest.raises(TypeError, match=r"snella_init\(targets=...\) must be a function"):
        snella_init(jax.random.key(0), _PARAMS, targets=True)
    with pytest.raises(ValueError, match="snella_init: leaf 'bias' has shape"):
        snella_init(jax.random.key(0), _PARAMS, targets=lambda p: jax.tree.map(lambda _: True, p))
    imp = snella_importance_init(_TUNED)
    with pytest.raises(ValueError, match=r"snella_importance_update\(b1=...\) must be in"):
        snella_importance_update(imp, _TUNED, _TUNED, b1=1.0)
    with pytest.raises(
        ValueError, match="snella_importance_update: `trainable` has 2 SnellaWeight nodes"
    ):
        snella_importance_update(imp, _TUNED, {"w": _TUNED["w"]})
    bad = dict(
        _TUNED, w=SnellaWeight(w.base, w.a[:, :1], w.b, w.alpha, w.gamma, w.beta, w.sparsity)
    )
    with pytest.raises(ValueError, match="snella_importance_update: SnellaWeight 1 has factors"):
        snella_importance_update(imp, _TUNED, bad)
    with pytest.raises(TypeError, match=r"snella_budget\(total_steps=...\) must be an int"):
        snella_budget(0, init_count=1.0, target_count=1.0, total_steps=1.5)
    with pytest.raises(ValueError, match=r"snella_budget\(total_steps=...\) must exceed"):
        snella_budget(
            0, init_count=1.0, target_count=1.0, total_steps=3, init_warmup=2, final_warmup=1
        )
    with pytest.raises(ValueError, match="snella_allocate_counts: `scores` has shape"):
        snella_allocate_counts(jnp.ones(3), 2, jnp.ones(4))
    with pytest.raises(ValueError, match=r"snella_allocate\(target_sparsity=...\) must be in"):
        snella_allocate(_TUNED, imp, 0, target_sparsity=-0.1, total_steps=5)
    with pytest.raises(ValueError, match="snella_allocate: `trainable` has no SnellaWeight nodes"):
        snella_allocate(_PARAMS, imp, 0, target_sparsity=0.5, total_steps=5)
    with pytest.raises(ValueError, match="snella_allocate: `importance` has 1 entries"):
        snella_allocate(
            _TUNED, SnellaImportance(*(x[:1] for x in imp)), 0, target_sparsity=0.5, total_steps=5
        )


def test_gradient_flows_through_k_only():
    """d/dβ and d/dα of ``Σ G ⊙ Δ``: the mask and the magnitude weight are constants."""
    w = _weight(8, sparsity=0.4)
    g = np.random.default_rng(8).standard_normal((6, 5))
    grads = jax.grad(lambda t: jnp.sum(jnp.asarray(g, jnp.float32) * snella_delta(t)))(w)
    k = _np_kernel(w.a, w.b, float(w.alpha), float(w.gamma), float(w.beta))
    weight = np.where(np.abs(k) > np.quantile(np.abs(k), 0.4), np.abs(k), 0.0)
    k0 = _np_kernel(w.a, w.b, 0.0, float(w.gamma), 0.0)
    z = k0 / float(w.gamma)
    soft = np.exp(z - z.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(float(grads.beta), (g * weight).sum(), rtol=1e-4)
    np.testing.assert_allclose(float(grads.alpha), (g * weight * soft).sum(), rtol=1e-4)
