"""Tests for geometry-aware merging: MG-06 (OPCM), MG-09 (Model Stock), MG-15 (aTLAS),
MG-16 (1bit-Merging), MG-17 (Iso-C / Iso-CTS), MG-20 (Robust Weight Signatures), MG-21
(Shadow-FT), MG-22 (Weight Aligning) and MG-47 (SLERP).

Each function is checked against an independent float64 NumPy transcription of its card (full
SVDs where the card asks for them), then against the card's invariants, edge cases (zeros, ties,
extreme magnitudes), hypothesis properties, `jit` and sharded `jit` on 8 simulated devices, and
every argument error.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cljax.transforms.merging import geometry as geo
from cljax.tree import MatrixSpec
from tests.helpers import assert_trees_close, assert_trees_equal

# A tall matrix, a vector, a stack of two wide matrices and a scalar.
SHAPES = {"w": (5, 3), "b": (3,), "k": (2, 3, 4), "s": ()}
RTOL, ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def rand_tree(rng, shapes=SHAPES, scale=1.0, dtype=np.float32):
    return {k: np.asarray(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def rand_trees(seed, n, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rand_tree(rng, shapes, scale) for _ in range(n)]


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def jtree(tree, dtype=None):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def is_finite(tree):
    return all(
        bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(tree)
    )


def shapes_dtypes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


def batched(x):
    """(batch, m, n) view of a >= 2-D array for the default MatrixSpec (last two axes)."""
    return x.reshape((-1,) + x.shape[-2:])


# ---------------------------------------------------------------------------------------------
# NumPy references (float64), written from the cards.


def np_model_stock(base, finetuned, filter_wise=False):
    out = {}
    n = len(finetuned)
    for key, w0 in f64(base).items():
        ws = [f64(f)[key] for f in finetuned]
        offsets = [w - w0 for w in ws]
        if filter_wise and w0.ndim >= 2:
            groups = [[o[..., c].ravel() for o in offsets] for c in range(w0.shape[-1])]
        else:
            groups = [[o.ravel() for o in offsets]]
        ts = []
        for vecs in groups:
            coss = []
            for i, j in itertools.combinations(range(n), 2):
                prod = np.linalg.norm(vecs[i]) * np.linalg.norm(vecs[j])
                coss.append(np.clip(vecs[i] @ vecs[j] / max(prod, 1e-6), -1.0, 1.0))
            cos = np.mean(coss)
            ts.append(n * cos / (1 + (n - 1) * cos))
        t = np.asarray(ts) if (filter_wise and w0.ndim >= 2) else ts[0]
        out[key] = t * (sum(ws) / n) + (1 - t) * w0
    return out


def np_iso_c(task_vectors, scale=1.0):
    out = {}
    for key in task_vectors[0]:
        leaves = [f64(tv)[key] for tv in task_vectors]
        if leaves[0].ndim < 2:
            out[key] = scale * sum(leaves) / len(leaves)
            continue
        mats = batched(sum(leaves))
        res = []
        for m in mats:
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            res.append(np.mean(s) * u @ vt)
        out[key] = scale * np.stack(res).reshape(leaves[0].shape)
    return out


def np_cts_sizes(r, t, fraction):
    common = int(r * fraction)
    task_total = round((r - common) / t) * t
    task_total = min(task_total, (r // t) * t)
    return r - task_total, task_total // t


def np_polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def np_iso_cts_matrix(mats, fraction):
    t = len(mats)
    m, n = mats[0].shape
    common, per = np_cts_sizes(min(m, n), t, fraction)
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vt[:common]
    us, ss, vs = [], [], []
    for w in mats:
        w_ts = w - uc @ uc.T @ w
        a, b, c = np.linalg.svd(w_ts, full_matrices=False)
        us.append(a[:, :per])
        ss.append(b[:per])
        vs.append(c[:per])
    u_all = np.concatenate(us + [uc], axis=1)
    s_all = np.concatenate(ss + [sc])
    v_all = np.concatenate(vs + [vc], axis=0)
    return np.mean(s_all) * np_polar(u_all) @ np_polar(v_all)


def np_iso_cts(task_vectors, scale=1.0, fraction=0.8):
    out = {}
    for key in task_vectors[0]:
        leaves = [f64(tv)[key] for tv in task_vectors]
        if leaves[0].ndim < 2:
            out[key] = scale * sum(leaves) / len(leaves)
            continue
        stacks = [batched(x) for x in leaves]
        res = [
            np_iso_cts_matrix([s[b] for s in stacks], fraction) for b in range(stacks[0].shape[0])
        ]
        out[key] = scale * np.stack(res).reshape(leaves[0].shape)
    return out


def np_global_norm(tree):
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in tree.values()))


def np_opcm_project(delta, tau, alpha):
    """The reference code's rule with a FULL SVD: U^T tau V, zero diagonal and k x k block."""
    u, s, vt = np.linalg.svd(delta, full_matrices=True)
    v = vt.T
    split = int(np.argmax(np.cumsum(s) / np.sum(s) > alpha)) if np.sum(s) > 0 else 0
    p = u.T @ tau @ v
    np.fill_diagonal(p, 0.0)
    p[:split, :split] = 0.0
    return u @ p @ v.T, split


def np_opcm(base, models, alpha, matrix_keys=None):
    """Returns the list of (params, lambda) after each merge."""
    base = f64(base)
    history = []
    delta, lam, norms = None, 1.0, []
    for t, model in enumerate(models):
        tau = {k: v - base[k] for k, v in f64(model).items()}
        norms.append(np_global_norm(tau))
        if t == 0:
            delta, lam = tau, 1.0
        else:
            avg = np.mean(norms)
            tmp = {}
            for k in base:
                is_matrix = base[k].ndim >= 2 if matrix_keys is None else k in matrix_keys
                if is_matrix:
                    d, x = batched(delta[k]), batched(tau[k])
                    proj = np.stack([np_opcm_project(d[i], x[i], alpha)[0] for i in range(len(d))])
                    tmp[k] = lam * delta[k] + proj.reshape(base[k].shape)
                else:
                    tmp[k] = lam * delta[k] + tau[k]
            big = np_global_norm(tmp)
            lam = big / avg
            delta = {k: v * avg / big for k, v in tmp.items()}
        history.append(({k: base[k] + delta[k] for k in base}, lam))
    return history


def np_one_bit(tau, rule="mean_abs"):
    out = {}
    for k, x in f64(tau).items():
        a = np.mean(np.abs(x)) if rule == "mean_abs" else np.sqrt(np.mean(np.square(x)))
        out[k] = np.where(x >= 0, a, -a)
    return out


def np_slerp(a, b, t, threshold=0.9995, eps=1e-8):
    out = {}
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        ux = x / nx if nx > eps else x
        uy = y / ny if ny > eps else y
        dot = np.clip(np.sum(ux * uy), -1, 1)
        if abs(dot) > threshold:
            out[k] = (1 - t) * x + t * y
        else:
            om = np.arccos(dot)
            out[k] = (np.sin((1 - t) * om) * x + np.sin(t * om) * y) / np.sin(om)
    return out


def np_weight_align(kernel, num_old, class_axis=-1):
    w = np.moveaxis(np.asarray(kernel, np.float64), class_axis, 0)
    norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
    gamma = norms[:num_old].mean() / norms[num_old:].mean()
    w = w.copy()
    w[num_old:] *= gamma
    return np.moveaxis(w, 0, class_axis), gamma


# ---------------------------------------------------------------------------------------------
# MG-09: Model Stock.


@pytest.mark.filterwarnings("ignore:model_stock:UserWarning")
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(n, filter_wise):
    trees = rand_trees(0 + n, n + 1)
    base = trees[0]
    # Correlated offsets (positive cosines), as fine-tuned runs from one base are.
    shared = rand_trees(99, 1)[0]
    finetuned = [{k: base[k] + shared[k] + 0.7 * t[k] for k in base} for t in trees[1:]]
    out = geo.model_stock(jtree(base), [jtree(f) for f in finetuned], filter_wise=filter_wise)
    assert_trees_close(out, np_model_stock(base, finetuned, filter_wise), rtol=RTOL, atol=ATOL)


@pytest.mark.filterwarnings("ignore:model_stock:UserWarning")
def test_model_stock_invariants():
    base, d = rand_trees(1, 2)
    # cos = 1 (parallel offsets): t = 1, the mean of the models.
    parallel = [{k: base[k] + c * d[k] for k in base} for c in (1.0, 2.0, 3.0)]
    mean = {k: sum(f64(p)[k] for p in parallel) / 3 for k in base}
    assert_trees_close(geo.model_stock(base, parallel), mean, rtol=RTOL, atol=ATOL)
    # cos = 0 (orthogonal offsets): t = 0, the base.
    e1 = {k: np.zeros_like(v) for k, v in base.items()}
    e2 = {k: np.zeros_like(v) for k, v in base.items()}
    e1["w"][0, 0], e2["w"][1, 1] = 1.0, 1.0
    e1["b"][0], e2["b"][1] = 2.0, 3.0
    orth = [{k: base[k] + e1[k] for k in base}, {k: base[k] + e2[k] for k in base}]
    out = geo.model_stock(base, orth)
    assert_trees_close({k: out[k] for k in ("w", "b")}, {k: base[k] for k in ("w", "b")})
    # N = 2: the paper's t = 2 cos / (1 + cos).
    a, b = rand_trees(2, 2)
    two = [{k: base[k] + a[k] + b[k] for k in base}, {k: base[k] + a[k] - 0.5 * b[k] for k in base}]
    da, db = (f64(two[0])["w"] - base["w"]).ravel(), (f64(two[1])["w"] - base["w"]).ravel()
    cos = da @ db / np.linalg.norm(da) / np.linalg.norm(db)
    t = 2 * cos / (1 + cos)
    expected = t * (f64(two[0])["w"] + f64(two[1])["w"]) / 2 + (1 - t) * base["w"]
    np.testing.assert_allclose(geo.model_stock(base, two)["w"], expected, rtol=RTOL, atol=ATOL)
    # Symmetric in the models.
    three = [{k: base[k] + a[k] + c * b[k] for k in base} for c in (0.1, 0.5, 0.9)]
    first = geo.model_stock(base, three)
    for perm in ([2, 0, 1], [1, 2, 0]):
        assert_trees_close(geo.model_stock(base, [three[i] for i in perm]), first, rtol=1e-6)


def test_model_stock_zero_offsets_and_pole_stay_finite():
    base = rand_trees(3, 1)[0]
    out = geo.model_stock(base, [base, base])
    assert_trees_close(out, base, rtol=0, atol=0)
    d = rand_trees(4, 1)[0]
    anti = [{k: base[k] + d[k] for k in base}, {k: base[k] - d[k] for k in base}]
    with pytest.warns(UserWarning, match="negative mean cosine"):
        out = geo.model_stock(base, anti)  # cos = -1, 1 + cos = 0: t = 0
    assert is_finite(out)
    assert_trees_close(out, base, rtol=1e-6, atol=1e-6)


def test_model_stock_bf16_keeps_dtype_and_structure():
    trees = rand_trees(5, 3)
    out = geo.model_stock(
        jtree(trees[0], jnp.bfloat16), [jtree(t, jnp.bfloat16) for t in trees[1:]]
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    assert jax.tree.structure(out) == jax.tree.structure(trees[0])


def test_model_stock_errors():
    base = rand_trees(6, 1)[0]
    with pytest.raises(TypeError, match=r"model_stock\(finetuned=...\) must be a list or tuple"):
        geo.model_stock(base, base)
    with pytest.raises(ValueError, match=r"model_stock\(finetuned=...\) must hold at least 2"):
        geo.model_stock(base, [base])
    bad = dict(base, w=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"leaf 'w' has shape \(3, 5\) in `finetuned\[1\]`"):
        geo.model_stock(base, [base, bad])
    with pytest.raises(ValueError, match=r"model_stock\(filter_wise=...\) must be one of"):
        geo.model_stock(base, [base, base], filter_wise="yes")


# ---------------------------------------------------------------------------------------------
# MG-17: Iso-C and Iso-CTS.


def test_iso_c_matches_numpy():
    tvs = rand_trees(10, 3)
    out = geo.iso_c([jtree(t) for t in tvs], scale=0.7)
    assert_trees_close(out, np_iso_c(tvs, 0.7), rtol=RTOL, atol=ATOL)


def test_iso_c_invariants():
    tvs = rand_trees(11, 3)
    scale = 1.3
    out = geo.iso_c(tvs, scale=scale)
    total = sum(f64(t)["w"] for t in tvs)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    merged = np.asarray(out["w"], np.float64)
    # All singular values equal scale * mean(S); same singular vectors as the sum.
    np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), scale * s.mean(), rtol=1e-5)
    np.testing.assert_allclose(u.T @ merged @ vt.T, scale * s.mean() * np.eye(3), atol=1e-5)
    # Non-matrix leaves are averaged, not summed.
    np.testing.assert_allclose(out["b"], scale * sum(f64(t)["b"] for t in tvs) / 3, rtol=1e-6)
    # One task: that task's matrix with a flattened spectrum.
    one = geo.iso_c([tvs[0]])
    u1, s1, vt1 = np.linalg.svd(f64(tvs[0])["w"], full_matrices=False)
    np.testing.assert_allclose(one["w"], s1.mean() * u1 @ vt1, rtol=RTOL, atol=ATOL)


def test_iso_zero_and_extreme_matrices_stay_finite():
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for fn in (geo.iso_c, functools.partial(geo.iso_cts, common_fraction=0.5)):
        out = fn([zeros, zeros])
        assert_trees_equal(out, jtree(zeros))
        huge = rand_trees(12, 2, scale=1e30)
        out = fn(huge)
        assert is_finite(out)
        ref = np_iso_c(huge) if fn is geo.iso_c else np_iso_cts(huge, fraction=0.5)
        assert_trees_close(out, ref, rtol=1e-4, atol=1e-5 * 1e30)  # float32 SVD: error ~ norm


def test_iso_spec_tree_and_conv_kernel():
    shapes = {"conv": (2, 2, 3, 4), "emb": (6, 3), "b": (4,)}
    tvs = rand_trees(13, 2, shapes)
    spec = {"conv": MatrixSpec(rows=(0, 1, 2), cols=3), "emb": None, "b": None}
    out = geo.iso_c(tvs, spec=spec)
    # 'emb' has None: averaged like a vector.
    np.testing.assert_allclose(out["emb"], (f64(tvs[0])["emb"] + f64(tvs[1])["emb"]) / 2, rtol=1e-6)
    conv = (f64(tvs[0])["conv"] + f64(tvs[1])["conv"]).reshape(12, 4)
    u, s, vt = np.linalg.svd(conv, full_matrices=False)
    np.testing.assert_allclose(
        out["conv"], (s.mean() * u @ vt).reshape(2, 2, 3, 4), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_iso_cts_matches_numpy(fraction):
    shapes = {"w": (8, 6), "b": (6,), "k": (2, 5, 7), "s": ()}
    tvs = rand_trees(14, 3, shapes)
    out = geo.iso_cts([jtree(t) for t in tvs], scale=0.9, common_fraction=fraction)
    assert_trees_close(out, np_iso_cts(tvs, 0.9, fraction), rtol=RTOL, atol=ATOL)


def test_iso_cts_invariants_and_small_matrices():
    shapes = {"w": (8, 6), "tiny": (2, 3)}
    tvs = rand_trees(15, 3, shapes)
    out = geo.iso_cts(tvs, scale=2.0, common_fraction=0.5)
    s = np.linalg.svd(np.asarray(out["w"], np.float64), compute_uv=False)
    np.testing.assert_allclose(s, s[0], rtol=1e-5)  # isotropic spectrum
    # 'tiny' (r = 2 < T = 3 with common_fraction = 0): all-common fallback, still isotropic.
    out0 = geo.iso_cts(tvs, common_fraction=0.0)
    assert_trees_close(out0, np_iso_cts(tvs, 1.0, 0.0), rtol=RTOL, atol=ATOL)
    assert np_cts_sizes(2, 3, 0.0) == (2, 0)
    assert geo._cts_sizes(6, 3, 0.5) == np_cts_sizes(6, 3, 0.5) == (3, 1)
    # With common_fraction = 1 every direction is common: Iso-CTS equals Iso-C.
    assert_trees_close(geo.iso_cts(tvs, common_fraction=1.0), geo.iso_c(tvs), rtol=1e-5, atol=1e-5)


def test_iso_errors():
    tvs = rand_trees(16, 2)
    with pytest.raises(TypeError, match=r"iso_c\(task_vectors=...\) must be a list or tuple"):
        geo.iso_c(tvs[0])
    with pytest.raises(ValueError, match=r"iso_c\(task_vectors=...\) must hold at least 1"):
        geo.iso_c([])
    bad = dict(tvs[1], w=np.zeros((3, 5), np.float32))
    with pytest.raises(
        ValueError,
        match=r"iso_c: leaf 'w' has shape \(3, 5\) in `task_vectors\[1\]` but \(5, 3\) in `task_vectors\[0\]`",
    ):
        geo.iso_c([tvs[0], bad])
    with pytest.raises(ValueError, match=r"iso_c\(scale=...\) must be a finite number"):
        geo.iso_c(tvs, scale=float("nan"))
    with pytest.raises(ValueError, match=r"iso_cts\(common_fraction=...\) must be in \[0.0, 1.0\]"):
        geo.iso_cts(tvs, common_fraction=1.5)
    with pytest.raises(ValueError, match=r"iso_c\(spec=...\) must be a MatrixSpec or a tree"):
        geo.iso_c(tvs, spec={"w": MatrixSpec()})
    spec = {"w": MatrixSpec(), "b": MatrixSpec(), "k": None, "s": None}
    with pytest.raises(ValueError, match=r"iso_c: leaf 'b' has shape \(3,\); a MatrixSpec needs"):
        geo.iso_c(tvs, spec=spec)
    with pytest.raises(TypeError, match=r"iso_c\(spec=...\) leaves must be MatrixSpec or None"):
        geo.iso_c(tvs, spec={"w": "rows", "b": None, "k": None, "s": None})


# ---------------------------------------------------------------------------------------------
# MG-06: OPCM.


def _opcm_models(seed, n, shapes=SHAPES):
    base, *taus = rand_trees(seed, n + 1, shapes)
    return base, [{k: base[k] + 0.5 * t[k] for k in base} for t in taus]


@pytest.fixture(scope="module")
def opcm_update_jit():
    traces = []

    def update(state, finetuned):
        traces.append(None)
        return geo.opcm_update(state, finetuned)

    return jax.jit(update), traces


def test_opcm_matches_numpy_full_svd_and_compiles_once(opcm_update_jit):
    update, traces = opcm_update_jit
    traces.clear()
    base, models = _opcm_models(20, 5)
    expected = np_opcm(base, models, alpha=0.5)
    state = geo.opcm_init(jtree(base), alpha=0.5)
    for t, model in enumerate(models):
        state = update(state, jtree(model))
        params, lam = expected[t]
        assert_trees_close(geo.opcm_params(state), params, rtol=RTOL, atol=ATOL, err=f"model {t}:")
        np.testing.assert_allclose(float(state.scale), lam, rtol=1e-5)
        assert int(state.count) == t + 1
    assert len(traces) == 1, "opcm_update retraced: the state changed shape or dtype"


def test_opcm_spec_tree_projects_only_selected_matrices():
    base, models = _opcm_models(27, 3)
    spec = {"w": None, "k": MatrixSpec(), "b": None, "s": None}  # e.g. 'w' an embedding
    state = geo.opcm_init(base, alpha=0.6)
    for model in models:
        state = geo.opcm_update(state, model, spec=spec)
    expected, lam = np_opcm(base, models, 0.6, matrix_keys={"k"})[-1]
    assert_trees_close(geo.opcm_params(state), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(state.scale), lam, rtol=1e-5)


def test_opcm_state_is_constant_size():
    base, models = _opcm_models(21, 5)
    state = geo.opcm_init(jtree(base))
    shapes = []
    for model in models:
        state = geo.opcm_update(state, jtree(model))
        shapes.append(jax.eval_shape(lambda s: s, state))
    assert shapes[0] == shapes[-1]
    assert jax.eval_shape(geo.opcm_init, jtree(base)) == shapes[0]


def test_opcm_norm_invariant_and_projection_zeros():
    base, models = _opcm_models(22, 4)
    state = geo.opcm_init(jtree(base), alpha=0.4)
    norms = []
    for t, model in enumerate(models):
        prev_delta, prev_scale = f64(state.delta), float(state.scale)
        state = geo.opcm_update(state, jtree(model))
        norms.append(np_global_norm({k: f64(model)[k] - base[k] for k in base}))
        delta = f64(state.delta)
        np.testing.assert_allclose(np_global_norm(delta), np.mean(norms), rtol=1e-5)
        if t == 0:
            continue
        # tau' = W - lambda_{t-1} Delta with W = Delta_new * lambda_t.
        cleaned = {k: delta[k] * float(state.scale) - prev_scale * prev_delta[k] for k in base}
        for k in ("w", "k"):
            for d, c in zip(batched(prev_delta[k]), batched(cleaned[k]), strict=True):
                u, s, vt = np.linalg.svd(d, full_matrices=True)
                coords = u.T @ c @ vt.T
                split = int(np.argmax(np.cumsum(s) / s.sum() > 0.4))
                np.testing.assert_allclose(np.diag(coords), 0.0, atol=1e-5)
                np.testing.assert_allclose(coords[:split, :split], 0.0, atol=1e-5)
        tau = {k: f64(model)[k] - base[k] for k in base}
        for k in ("b", "s"):  # non-matrix leaves are not projected
            np.testing.assert_allclose(cleaned[k], tau[k], rtol=1e-4, atol=1e-5)


def test_opcm_frozen_block_task_vector_keeps_direction():
    shapes = {"w": (6, 5), "b": (5,)}
    rng = np.random.default_rng(23)
    base = rand_tree(rng, shapes)
    q1, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    q2, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    spectrum = np.array([10.0, 9.0, 1.0, 0.5, 0.1])
    tau1 = {"w": q1[:, :5] @ np.diag(spectrum) @ q2.T, "b": rng.standard_normal(5)}
    # alpha = 0.95: cumsum fractions (.485, .922, .971, ...) give k = 2.
    assert int(np.argmax(np.cumsum(spectrum) / spectrum.sum() > 0.95)) == 2
    block = rng.standard_normal((2, 2))
    tau2 = {"w": q1[:, :2] @ block @ q2[:, :2].T, "b": np.zeros(5)}
    state = geo.opcm_init(jtree(base), alpha=0.95)
    state = geo.opcm_update(state, jtree({k: base[k] + tau1[k] for k in base}))
    before = f64(state.delta)
    state = geo.opcm_update(state, jtree({k: base[k] + tau2[k] for k in base}))
    after = f64(state.delta)
    ratio = np_global_norm(after) / np_global_norm(before)
    assert_trees_close(after, {k: ratio * v for k, v in before.items()}, rtol=1e-4, atol=1e-5)


def test_opcm_lambda_grows_like_sqrt_t():
    shapes = {"w": (48, 40), "b": (400,)}
    base, models = _opcm_models(24, 8, shapes)
    state = geo.opcm_init(jtree(base))
    update = jax.jit(geo.opcm_update)
    for t, model in enumerate(models, start=1):
        state = update(state, jtree(model))
        assert 0.75 * math.sqrt(t) <= float(state.scale) <= 1.05 * math.sqrt(t), (
            t,
            float(state.scale),
        )


def test_opcm_zero_task_vectors_and_bf16():
    base = rand_trees(25, 1)[0]
    state = geo.opcm_init(jtree(base, jnp.bfloat16))
    for _ in range(3):
        state = geo.opcm_update(state, jtree(base, jnp.bfloat16))
    params = geo.opcm_params(state)
    assert is_finite(state) and is_finite(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert_trees_equal(params, jtree(base, jnp.bfloat16))
    assert float(state.scale) == 1.0


def test_opcm_errors():
    base = rand_trees(26, 1)[0]
    with pytest.raises(ValueError, match=r"opcm_init\(alpha=...\) must be in \[0.0, 1.0\]"):
        geo.opcm_init(base, alpha=1.5)
    state = geo.opcm_init(base)
    bad = dict(base, k=np.zeros((2, 4, 3), np.float32))
    with pytest.raises(
        ValueError, match=r"opcm_update: leaf 'k' has shape \(2, 4, 3\) in `finetuned`"
    ):
        geo.opcm_update(state, bad)
    with pytest.raises(ValueError, match=r"opcm_update\(spec=...\) must be a MatrixSpec or a tree"):
        geo.opcm_update(state, base, spec=[MatrixSpec()])
    with pytest.raises(TypeError, match=r"opcm_update\(state=...\) must be an OpcmState"):
        geo.opcm_update(base, base)


# ---------------------------------------------------------------------------------------------
# MG-16: 1bit-Merging.


@pytest.mark.parametrize("rule", ["mean_abs", "rms"])
def test_one_bit_round_trip_matches_numpy(rule):
    tau = rand_trees(30, 1)[0]
    tau["w"][0, 0] = 0.0  # zeros decode to +a
    code = geo.one_bit_compress(jtree(tau), scale_rule=rule)
    out = geo.one_bit_decompress(code, jtree(tau))
    assert_trees_close(out, np_one_bit(tau, rule), rtol=1e-6, atol=1e-7)


def test_one_bit_invariants():
    tau = rand_trees(31, 1)[0]
    code = geo.one_bit_compress(tau)
    out = geo.one_bit_decompress(code, tau)
    for k, x in tau.items():
        a = float(code.scale[k])
        values = np.unique(np.asarray(out[k]))
        assert set(values.tolist()) <= {a, -a} and len(values) == min(2, x.size)
        # Bit count equals the leaf size: ceil(size / 8) packed bytes.
        assert code.signs[k].shape == (math.ceil(max(x.size, 1) / 8),) or x.size == 0
        assert code.signs[k].dtype == jnp.uint8
        # a = mean|tau| is the least-squares optimal scale of the sign pattern.
        x64 = np.asarray(x, np.float64)
        sign = np.where(x64 >= 0, 1.0, -1.0)
        errors = [np.sum(np.square(x64 - c * sign)) for c in (a, 1.01 * a, 0.99 * a)]
        np.testing.assert_allclose(a, np.sum(np.abs(x)) / x.size, rtol=1e-6)
        assert errors[0] <= min(errors[1:])


def test_one_bit_mask_and_merge_matches_numpy():
    base, t1, t2, t3 = rand_trees(32, 4)
    codes = [geo.one_bit_compress(t) for t in (t1, t2, t3)]
    dec = [np_one_bit(t) for t in (t1, t2, t3)]
    out = geo.one_bit_merge(jtree(base), codes, route=1, scale=0.3)
    expected = {k: base[k] + dec[1][k] + 0.3 * (dec[0][k] + dec[2][k]) for k in base}
    assert_trees_close(out, expected, rtol=RTOL, atol=ATOL)
    out = geo.one_bit_merge(base, codes, scale=0.5)
    expected = {k: base[k] + 0.5 * (dec[0][k] + dec[1][k] + dec[2][k]) for k in base}
    assert_trees_close(out, expected, rtol=RTOL, atol=ATOL)
    # A traced route from a router under jit.
    merge = jax.jit(lambda r: geo.one_bit_merge(base, codes, route=r, scale=0.0))
    assert_trees_close(
        merge(jnp.int32(2)), {k: base[k] + dec[2][k] for k in base}, rtol=RTOL, atol=ATOL
    )
    # Mask: dropped leaves decode to zeros.
    mask = {"w": True, "b": False, "k": True, "s": False}
    masked = geo.one_bit_decompress(geo.one_bit_compress(t1, mask=mask), base)
    np.testing.assert_array_equal(masked["b"], 0.0)
    np.testing.assert_allclose(masked["w"], dec[0]["w"], rtol=1e-6)


def test_one_bit_errors():
    base, tau = rand_trees(33, 2)
    code = geo.one_bit_compress(tau)
    with pytest.raises(ValueError, match=r"one_bit_compress\(scale_rule=...\) must be one of"):
        geo.one_bit_compress(tau, scale_rule="max")
    with pytest.raises(
        TypeError, match=r"one_bit_compress\(mask=...\) must be a tree of bools, got a callable"
    ):
        geo.one_bit_compress(tau, mask=lambda p: p)
    with pytest.raises(
        ValueError, match=r"one_bit_compress\(mask=...\) must be a tree of bools with the structure"
    ):
        geo.one_bit_compress(tau, mask={"w": True})
    with pytest.raises(
        TypeError, match=r"one_bit_decompress\(compressed=...\) must be a OneBitTaskVector"
    ):
        geo.one_bit_decompress(tau, base)
    with pytest.raises(
        ValueError, match=r"one_bit_decompress: `compressed.signs` has a different tree"
    ):
        geo.one_bit_decompress(code, {"w": base["w"]})
    bad_like = dict(base, w=np.zeros((6, 3), np.float32))
    with pytest.raises(
        ValueError, match=r"one_bit_decompress: leaf 'w' has shape \(6, 3\) in `like`"
    ):
        geo.one_bit_decompress(code, bad_like)
    with pytest.raises(
        TypeError, match=r"one_bit_merge\(compressed=...\) must hold OneBitTaskVector"
    ):
        geo.one_bit_merge(base, [tau])
    with pytest.raises(
        TypeError, match=r"one_bit_merge\(compressed=...\) must be a list or tuple of OneBit"
    ):
        geo.one_bit_merge(base, code)
    with pytest.raises(
        TypeError, match=r"one_bit_merge\(compressed=...\) must be a list or tuple of pytrees"
    ):
        geo.one_bit_merge(base, {"a": code})
    with pytest.raises(ValueError, match=r"one_bit_merge\(compressed=...\) must hold at least 1"):
        geo.one_bit_merge(base, [])
    with pytest.raises(ValueError, match=r"one_bit_merge\(route=...\) must be in \[0, 0\], got 3"):
        geo.one_bit_merge(base, [code], route=3)
    with pytest.raises(
        TypeError, match=r"one_bit_merge\(route=...\) must be an integer task index"
    ):
        geo.one_bit_merge(base, [code], route=0.5)
    with pytest.raises(ValueError, match=r"one_bit_merge\(scale=...\) must be a finite number"):
        geo.one_bit_merge(base, [code], scale=float("inf"))


# ---------------------------------------------------------------------------------------------
# MG-15: aTLAS.


def test_atlas_matches_numpy_and_reduces_to_task_arithmetic():
    base, *tvs = rand_trees(40, 4)
    rng = np.random.default_rng(41)
    coefs = {k: rng.standard_normal(3).astype(np.float32) for k in base}
    out = geo.atlas_apply(jtree(base), [jtree(t) for t in tvs], jtree(coefs))
    expected = {
        k: f64(base)[k] + sum(float(coefs[k][t]) * f64(tvs[t])[k] for t in range(3)) for k in base
    }
    assert_trees_close(out, expected, rtol=RTOL, atol=ATOL)
    init = geo.atlas_init(base, 3, value=0.4)
    assert all(c.shape == (3,) and c.dtype == jnp.float32 for c in jax.tree.leaves(init))
    arithmetic = {k: f64(base)[k] + 0.4 * sum(f64(t)[k] for t in tvs) for k in base}
    assert_trees_close(geo.atlas_apply(base, tvs, init), arithmetic, rtol=RTOL, atol=ATOL)


def test_atlas_gradient_is_inner_product_and_stops_at_inputs():
    base, *tvs = rand_trees(42, 3)
    target = rand_trees(43, 1)[0]
    coefs = geo.atlas_init(base, 2, value=0.3)

    def loss_theta(theta):
        return sum(
            jnp.sum(jnp.square(theta[k] - target[k]) * (1.0 + i))
            for i, k in enumerate(sorted(theta))
        )

    base_j, tvs_j = jtree(base), tuple(jtree(x) for x in tvs)

    def loss(c, b=base_j, t=tvs_j):
        return loss_theta(geo.atlas_apply(b, list(t), c))

    grad = jax.jit(jax.grad(loss))(coefs)
    theta = geo.atlas_apply(base, tvs, coefs)
    g_theta = jax.grad(loss_theta)(theta)
    for k in base:
        expected = [
            float(np.sum(np.asarray(g_theta[k], np.float64) * f64(tvs[t])[k])) for t in range(2)
        ]
        np.testing.assert_allclose(grad[k], expected, rtol=1e-5, atol=1e-5)
    # No gradient reaches the base or the task vectors.
    g_base = jax.jit(jax.grad(lambda b: loss(coefs, b)))(base_j)
    g_tvs = jax.jit(jax.grad(lambda t: loss(coefs, t=t)))(tvs_j)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves((g_base, g_tvs)))


def test_atlas_errors():
    base, tv = rand_trees(44, 2)
    coefs = geo.atlas_init(base, 1)
    with pytest.raises(ValueError, match=r"atlas_init\(num_tasks=...\) must be >= 1"):
        geo.atlas_init(base, 0)
    with pytest.raises(TypeError, match=r"atlas_init\(num_tasks=...\) must be an int"):
        geo.atlas_init(base, 2.0)
    with pytest.raises(ValueError, match=r"atlas_init\(value=...\) must be a finite number"):
        geo.atlas_init(base, 2, value=float("nan"))
    with pytest.raises(
        ValueError,
        match=r"atlas_apply: leaf 'b' has shape \(2,\) in `coefficients`; it needs shape \(1,\)",
    ):
        geo.atlas_apply(base, [tv], dict(coefs, b=jnp.zeros(2)))
    with pytest.raises(
        ValueError, match=r"atlas_apply: `coefficients` has a different tree structure"
    ):
        geo.atlas_apply(base, [tv], {"w": jnp.zeros(1)})
    with pytest.raises(
        ValueError, match=r"atlas_apply: leaf 'w' has shape \(3, 5\) in `task_vectors\[0\]`"
    ):
        geo.atlas_apply(base, [dict(tv, w=np.zeros((3, 5)))], coefs)
    with pytest.raises(TypeError, match=r"atlas_apply\(task_vectors=...\) must be a list or tuple"):
        geo.atlas_apply(base, tv, coefs)


# ---------------------------------------------------------------------------------------------
# MG-20: Robust Weight Signatures.


def test_rws_extract_patch_unpatch():
    clean, robust, other = rand_trees(50, 3)
    mask = {"w": True, "b": True, "k": False, "s": False}  # "shallow layers" only
    sig = geo.rws_extract(jtree(robust), jtree(clean), mask=mask)
    expected = {
        k: (f64(robust)[k] - f64(clean)[k]) if mask[k] else np.zeros(SHAPES[k]) for k in clean
    }
    assert_trees_close(sig, expected, rtol=RTOL, atol=1e-6)
    patched = geo.rws_patch(clean, [sig], scale=0.8)
    for k in ("k", "s"):  # only selected layers change
        np.testing.assert_array_equal(patched[k], clean[k])
    assert_trees_close(geo.rws_patch(patched, [sig], scale=-0.8), clean, rtol=1e-6, atol=1e-6)
    # Composable: two signatures with one scale each.
    sig2 = geo.rws_extract(other, clean)
    both = geo.rws_patch(clean, [sig, sig2], scale=[0.5, 2.0])
    expected = {k: f64(clean)[k] + 0.5 * f64(sig)[k] + 2.0 * f64(sig2)[k] for k in clean}
    assert_trees_close(both, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rws_quantize_round_trip(bits):
    sig = rand_trees(51, 1)[0]
    sig["b"][:] = 0.0  # a zero leaf: zero codes, zero step
    q = geo.rws_quantize(sig, bits=bits)
    top = 2 ** (bits - 1) - 1
    for k, x in sig.items():
        codes = np.asarray(q.codes[k])
        assert codes.dtype == np.int8 and np.all(np.abs(codes) <= top)
        step = np.abs(x).max() / top if x.size else 0.0
        np.testing.assert_allclose(float(q.step[k]), step, rtol=1e-6)
        np.testing.assert_array_equal(codes, np.round(x / step) if step else 0)
    back = geo.rws_dequantize(q)
    assert is_finite(back)
    for k, x in sig.items():
        assert np.all(np.abs(np.asarray(back[k]) - x) <= float(q.step[k]) / 2 + 1e-7)


def test_rws_errors():
    clean, robust = rand_trees(52, 2)
    sig = geo.rws_extract(robust, clean)
    with pytest.raises(ValueError, match=r"rws_extract: leaf 'w' has shape \(3, 5\) in `robust`"):
        geo.rws_extract(dict(robust, w=np.zeros((3, 5))), clean)
    with pytest.raises(ValueError, match=r"rws_extract\(mask=...\) must be a tree of bools"):
        geo.rws_extract(robust, clean, mask={"w": True})
    with pytest.raises(ValueError, match=r"rws_patch\(scale=...\) must be one number or 1 numbers"):
        geo.rws_patch(clean, [sig], scale=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"rws_patch\(scale=...\) must be a finite number"):
        geo.rws_patch(clean, [sig], scale=float("nan"))
    with pytest.raises(TypeError, match=r"rws_patch\(signatures=...\) must be a list or tuple"):
        geo.rws_patch(clean, sig)
    with pytest.raises(ValueError, match=r"rws_quantize\(bits=...\) must be <= 8"):
        geo.rws_quantize(sig, bits=9)
    with pytest.raises(ValueError, match=r"rws_quantize\(bits=...\) must be >= 2"):
        geo.rws_quantize(sig, bits=1)
    with pytest.raises(
        TypeError, match=r"rws_dequantize\(quantized=...\) must be a QuantizedSignature"
    ):
        geo.rws_dequantize(sig)


# ---------------------------------------------------------------------------------------------
# MG-21: Shadow-FT.


def test_shadow_ft_matches_numpy_and_invariants():
    instruct, base, tuned = rand_trees(60, 3)
    out = geo.shadow_ft(jtree(instruct), jtree(base), jtree(tuned))
    expected = {k: f64(instruct)[k] + f64(tuned)[k] - f64(base)[k] for k in base}
    assert_trees_close(out, expected, rtol=RTOL, atol=ATOL)
    # Zero delta gives the instruct model exactly.
    assert_trees_equal(geo.shadow_ft(jtree(instruct), jtree(base), jtree(base)), jtree(instruct))
    # Mask and vocabulary mismatch.
    mask = {"w": False, "b": True, "k": True, "s": True}
    out = geo.shadow_ft(instruct, base, tuned, mask=mask)
    np.testing.assert_array_equal(out["w"], instruct["w"])
    wide = dict(instruct, w=np.ones((7, 3), np.float32))  # e.g. an embedding with a larger vocab
    out = geo.shadow_ft(wide, base, tuned, skip_mismatched=True)
    np.testing.assert_array_equal(out["w"], wide["w"])
    np.testing.assert_allclose(out["b"], expected["b"], rtol=RTOL)


def test_shadow_ft_errors():
    instruct, base, tuned = rand_trees(61, 3)
    with pytest.raises(
        ValueError,
        match=r"shadow_ft: leaf 'w' has shape \(7, 3\) in `instruct` but \(5, 3\) in `base`",
    ):
        geo.shadow_ft(dict(instruct, w=np.ones((7, 3))), base, tuned)
    with pytest.raises(ValueError, match=r"shadow_ft: leaf 'b' has shape \(4,\) in `tuned_base`"):
        geo.shadow_ft(instruct, base, dict(tuned, b=np.ones(4)))
    with pytest.raises(ValueError, match=r"shadow_ft: `instruct` has a different tree structure"):
        geo.shadow_ft({"w": instruct["w"]}, base, tuned)
    with pytest.raises(ValueError, match=r"shadow_ft\(skip_mismatched=...\) must be one of"):
        geo.shadow_ft(instruct, base, tuned, skip_mismatched="no")
    with pytest.raises(
        TypeError, match=r"shadow_ft\(mask=...\) must be a tree of bools, got a callable"
    ):
        geo.shadow_ft(instruct, base, tuned, mask=lambda p: p)


# ---------------------------------------------------------------------------------------------
# MG-22: Weight Aligning.


@pytest.mark.parametrize("shape,class_axis", [((6, 5), -1), ((5, 6), 0), ((3, 4, 5), -1)])
def test_weight_align_matches_numpy(shape, class_axis):
    kernel = rand_trees(70, 1, {"k": shape})[0]["k"]
    kernel = kernel * np.where(np.arange(5) >= 3, 3.0, 1.0).reshape(
        [5 if a == class_axis % len(shape) else 1 for a in range(len(shape))]
    ).astype(np.float32)  # new classes have larger weights, as after plain fine-tuning
    out = geo.weight_align(jnp.asarray(kernel), num_old=3, class_axis=class_axis)
    expected, gamma = np_weight_align(kernel, 3, class_axis)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        geo.weight_align_factor(kernel, num_old=3, class_axis=class_axis), gamma, rtol=1e-5
    )
    # Mean norms of old and new classes are equal afterwards; old weights unchanged.
    w = np.moveaxis(np.asarray(out, np.float64), class_axis, 0).reshape(5, -1)
    norms = np.linalg.norm(w, axis=1)
    np.testing.assert_allclose(norms[:3].mean(), norms[3:].mean(), rtol=1e-5)
    old = np.moveaxis(kernel, class_axis, 0)[:3]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(out), class_axis, 0)[:3], old)


def test_weight_align_zero_new_classes():
    kernel = np.ones((4, 3), np.float32)
    kernel[:, 2] = 0.0
    out = geo.weight_align(kernel, num_old=2)
    np.testing.assert_array_equal(out, kernel)
    assert float(geo.weight_align_factor(kernel, num_old=2)) == 1.0
    bf = geo.weight_align(jnp.asarray(kernel, jnp.bfloat16), num_old=1)
    assert bf.dtype == jnp.bfloat16


def test_weight_align_errors():
    kernel = np.ones((4, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"weight_align: `kernel` has shape \(3,\); it needs at least 2 dims"
    ):
        geo.weight_align(np.ones(3, np.float32), num_old=1)
    with pytest.raises(TypeError, match=r"weight_align\(kernel=...\) must be an array"):
        geo.weight_align([[1.0, 2.0]], num_old=1)
    with pytest.raises(ValueError, match=r"weight_align\(num_old=...\) must be < the 3 classes"):
        geo.weight_align(kernel, num_old=3)
    with pytest.raises(ValueError, match=r"weight_align\(num_old=...\) must be >= 1"):
        geo.weight_align(kernel, num_old=0)
    with pytest.raises(ValueError, match=r"weight_align_factor\(class_axis=...\) must be < 2"):
        geo.weight_align_factor(kernel, num_old=1, class_axis=2)
    with pytest.raises(ValueError, match=r"weight_align_factor\(class_axis=...\) must be >= -2"):
        geo.weight_align_factor(kernel, num_old=1, class_axis=-3)


# ---------------------------------------------------------------------------------------------
# MG-47: SLERP.


def test_slerp_matches_numpy():
    a, b = rand_trees(80, 2)
    b["b"] = 2.0 * a["b"] + 1e-5  # nearly parallel: linear fallback
    b["s"] = np.zeros((), np.float32)  # a zero leaf (not normalized)
    for t in (0.0, 0.3, 1.0):
        out = geo.slerp(jtree(a), jtree(b), t=t)
        assert_trees_close(out, np_slerp(a, b, t), rtol=RTOL, atol=ATOL, err=f"t={t}:")
    assert_trees_close(geo.slerp(a, b, t=0.0), a, rtol=1e-6, atol=1e-6)
    # Unit vectors stay on the sphere.
    u = {"x": np.array([1.0, 0.0, 0.0], np.float32)}
    v = {"x": np.array([0.0, 0.6, 0.8], np.float32)}
    np.testing.assert_allclose(np.linalg.norm(geo.slerp(u, v, t=0.37)["x"]), 1.0, rtol=1e-6)


def test_slerp_errors():
    a, b = rand_trees(81, 2)
    with pytest.raises(ValueError, match=r"slerp\(t=...\) must be in \[0.0, 1.0\]"):
        geo.slerp(a, b, t=1.5)
    with pytest.raises(ValueError, match=r"slerp\(dot_threshold=...\) must be in"):
        geo.slerp(a, b, t=0.5, dot_threshold=2.0)
    with pytest.raises(ValueError, match=r"slerp\(eps=...\) must be in"):
        geo.slerp(a, b, t=0.5, eps=-1.0)
    with pytest.raises(ValueError, match=r"slerp: leaf 'b' has shape \(4,\) in `b`"):
        geo.slerp(a, dict(b, b=np.ones(4)), t=0.5)


# ---------------------------------------------------------------------------------------------
# Hypothesis properties: finite output, shapes and dtypes kept, on zeros and extreme magnitudes.

# A small pool, so compiled kernels are reused across examples (each new shape compiles).
LEAF_SHAPES = st.sampled_from([(), (7,), (1, 1), (3, 2), (2, 5), (2, 3, 3)])


@st.composite
def trees(draw, count):
    shapes = {f"l{i}": draw(LEAF_SHAPES) for i in range(draw(st.integers(1, 2)))}
    seed = draw(st.integers(0, 2**31 - 1))
    exponent = draw(st.integers(-15, 15))
    zero_frac = draw(st.sampled_from([0.0, 0.5, 1.0]))
    dtype = draw(st.sampled_from([np.float32, jnp.bfloat16]))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tree = {}
        for k, s in shapes.items():
            x = rng.standard_normal(s) * 10.0**exponent
            x = np.where(rng.random(s) < zero_frac, 0.0, x)
            tree[k] = jnp.asarray(x, dtype)
        out.append(tree)
    return out


def assert_finite_like(out, like):
    assert is_finite(out)
    assert shapes_dtypes(out) == shapes_dtypes(like)


@settings(max_examples=10, deadline=None)
@given(ts=trees(4))
def test_property_merges_are_finite(ts):
    base, a, b, c = ts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_finite_like(geo.model_stock(base, [a, b, c]), base)
        assert_finite_like(geo.model_stock(base, [a, b], filter_wise=True), base)
    assert_finite_like(geo.iso_c([a, b, c]), a)
    assert_finite_like(geo.iso_cts([a, b, c], common_fraction=0.5), a)
    assert_finite_like(geo.slerp(a, b, t=0.4), a)
    assert_finite_like(geo.shadow_ft(a, base, b), a)
    assert_finite_like(geo.rws_patch(base, [geo.rws_dequantize(geo.rws_quantize(a))]), base)
    codes = [geo.one_bit_compress(x) for x in (a, b)]
    assert_finite_like(geo.one_bit_merge(base, codes, route=0, scale=0.5), base)
    assert_finite_like(geo.atlas_apply(base, [a, b], geo.atlas_init(base, 2, value=0.5)), base)


@settings(max_examples=6, deadline=None)
@given(ts=trees(4))
def test_property_opcm_is_finite_and_keeps_norm(ts):
    base, *models = ts
    state = geo.opcm_init(base, alpha=0.5)
    for m in models:
        state = geo.opcm_update(state, m)
    assert_finite_like(geo.opcm_params(state), base)
    assert is_finite(state)
    if all(x.dtype == jnp.float32 for x in jax.tree.leaves(base)):
        norms = [
            float(geo._global_norm([jnp.asarray(m[k], jnp.float32) - base[k] for k in base]))
            for m in models
        ]
        got = float(
            geo._global_norm([jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(state.delta)])
        )
        np.testing.assert_allclose(got, np.mean(norms), rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    classes=st.integers(2, 6),
    d_in=st.integers(1, 4),
    exponent=st.integers(-15, 15),
    seed=st.integers(0, 2**31 - 1),
    zero_new=st.booleans(),
)
def test_property_weight_align_is_finite(classes, d_in, exponent, seed, zero_new):
    rng = np.random.default_rng(seed)
    kernel = (rng.standard_normal((d_in, classes)) * 10.0**exponent).astype(np.float32)
    num_old = int(rng.integers(1, classes))
    if zero_new:
        kernel[:, num_old:] = 0.0
    out = geo.weight_align(kernel, num_old=num_old)
    assert out.shape == kernel.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


# ---------------------------------------------------------------------------------------------
# jit and sharded jit on 8 simulated devices.

SHARD_SHAPES = {"w": (8, 6), "k": (2, 4, 6), "b": (8,), "s": ()}
SHARD_SPECS = {"w": P("data", "model"), "k": P(None, "data", "model"), "b": P("data"), "s": P()}


def _shard(tree, mesh):
    return {
        k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, SHARD_SPECS[k]))
        for k, v in tree.items()
    }


def _cases():
    return {
        "model_stock": (
            functools.partial(geo.model_stock, filter_wise=True),
            lambda ts: (ts[0], ts[1:4]),
        ),
        "iso_c": (functools.partial(geo.iso_c, scale=0.5), lambda ts: (ts[:3],)),
        "iso_cts": (functools.partial(geo.iso_cts, common_fraction=0.5), lambda ts: (ts[:3],)),
        "opcm": (
            lambda b, m1, m2: geo.opcm_params(
                geo.opcm_update(geo.opcm_update(geo.opcm_init(b), m1), m2)
            ),
            lambda ts: (ts[0], ts[1], ts[2]),
        ),
        "one_bit": (
            lambda b, ts: geo.one_bit_merge(b, [geo.one_bit_compress(t) for t in ts], route=1),
            lambda ts: (ts[0], ts[1:3]),
        ),
        "atlas": (
            lambda b, tvs: geo.atlas_apply(b, tvs, geo.atlas_init(b, 2, value=0.3)),
            lambda ts: (ts[0], ts[1:3]),
        ),
        "rws": (
            lambda c, r: geo.rws_patch(
                c, [geo.rws_dequantize(geo.rws_quantize(geo.rws_extract(r, c)))]
            ),
            lambda ts: (ts[0], ts[1]),
        ),
        "shadow_ft": (geo.shadow_ft, lambda ts: (ts[0], ts[1], ts[2])),
        "weight_align": (
            lambda t: (
                geo.weight_align(t["w"], num_old=4, class_axis=0),
                geo.weight_align_factor(t["k"], num_old=2),
            ),
            lambda ts: (ts[0],),
        ),
        "slerp": (functools.partial(geo.slerp, t=0.3), lambda ts: (ts[0], ts[1])),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_jit_and_sharded_jit_match_eager(name):
    fn, make_args = _cases()[name]
    ts = rand_trees(90, 4, SHARD_SHAPES)
    args = make_args([jtree(t) for t in ts])
    expected = fn(*args)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    def shard(x):
        if isinstance(x, dict) and {k: jnp.shape(v) for k, v in x.items()} == SHARD_SHAPES:
            return _shard(x, mesh)
        if isinstance(x, (list, tuple)):
            return type(x)(shard(y) for y in x)
        return x

    sharded = tuple(shard(a) for a in args)
    out = jax.jit(fn)(*sharded)
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-5, err=name)
