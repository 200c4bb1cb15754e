"""Tests for the mask builders (SP-05, SP-06): random, magnitude, top-k, N:M masks, ERK and uniform
density allocation, and the gradual-pruning schedule.

References are plain NumPy: a stable descending order with the index as tie-break gives the exact
top-k; N:M groups are ranked the same way group by group; the cubic schedule is the card's formula.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax

SHAPES = {"w": (6, 5), "b": (7,), "k": (2, 3, 4), "s": ()}


def _tree(seed: int = 0, shapes=SHAPES, ties: bool = False):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape)
        if ties:  # few distinct magnitudes: many ties at any threshold
            x = np.round(x * 2) / 2
        out[name] = jnp.asarray(x, jnp.float32)
    return out


def _expected_count(density: float, size: int) -> int:
    return min(size, math.ceil(density * size - 1e-9))


def _np_topk(values: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k of a flat array: larger value first, then earlier index."""
    order = np.lexsort((np.arange(values.size), -values))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# random_mask (SP-06).


# A few shapes (compiled once each) crossed with many densities and seeds.
PROPERTY_SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (64,)]


@settings(deadline=None)
@given(
    shape=st.sampled_from(PROPERTY_SHAPES),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_mask_has_exact_density(shape, density, seed):
    mask = cljax.random_mask({"x": jnp.zeros(shape)}, density, jax.random.key(seed))["x"]
    assert mask.shape == shape and mask.dtype == jnp.bool_
    assert int(mask.sum()) == _expected_count(density, math.prod(shape))


def test_random_mask_is_regenerable_and_keyed_by_path():
    key = jax.random.key(7)
    params = _tree()
    a = cljax.random_mask(params, 0.3, key)
    b = cljax.random_mask(params, 0.3, key)
    alone = cljax.random_mask({"w": params["w"]}, 0.3, key)  # other leaves do not matter
    np.testing.assert_array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(a["w"], alone["w"])
    other = cljax.random_mask(params, 0.3, jax.random.key(8))
    assert not np.array_equal(a["w"], other["w"])
    assert a["s"].shape == ()


def test_random_mask_per_leaf_densities_and_none():
    params = {**_tree(), "none": None}
    dens = {"w": 0.2, "b": None, "k": 1.0, "s": 0.5, "none": None}
    mask = cljax.random_mask(params, dens, jax.random.key(0))
    assert mask["b"] is None and mask["none"] is None
    assert int(mask["w"].sum()) == 6 and bool(mask["k"].all()) and bool(mask["s"])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_builders_reject_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match="density"):
        cljax.random_mask(_tree(), density, jax.random.key(0))
    with pytest.raises(ValueError, match="density"):
        cljax.magnitude_mask(_tree(), density)
    with pytest.raises(ValueError, match="density"):
        cljax.uniform_densities(_tree(), density)
    with pytest.raises(ValueError, match="density"):
        cljax.erk_densities(_tree(), density)


def test_density_tree_errors_name_the_leaf():
    with pytest.raises(ValueError, match="no entry for leaf 'b'"):
        cljax.random_mask(_tree(), {"w": 0.5, "k": 0.5, "s": 0.5}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"density\['w'\]"):
        cljax.magnitude_mask(_tree(), {"w": 2.0, "b": None, "k": None, "s": None})
    with pytest.raises(TypeError, match="not an array"):
        cljax.magnitude_mask({"w": "text"}, 0.5)


# ---------------------------------------------------------------------------------------------
# magnitude_mask and topk_mask (SP-05).


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.77, 1.0])
def test_magnitude_mask_layer_matches_numpy(density, ties):
    params = _tree(1, ties=ties)
    got = cljax.magnitude_mask(params, density)
    for name, x in params.items():
        x = np.asarray(x, np.float64).reshape(-1)
        want = _np_topk(np.abs(x), _expected_count(density, x.size))
        np.testing.assert_array_equal(np.asarray(got[name]).reshape(-1), want, err_msg=name)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_mask_global_matches_numpy(density, ties):
    params = _tree(2, ties=ties)
    got = cljax.magnitude_mask(params, density, scope="global")
    names = sorted(params)  # tree order of a dict
    flat = np.concatenate([np.abs(np.asarray(params[n], np.float64)).reshape(-1) for n in names])
    want = _np_topk(flat, _expected_count(density, flat.size))
    got_flat = np.concatenate([np.asarray(got[n]).reshape(-1) for n in names])
    np.testing.assert_array_equal(got_flat, want)


def test_magnitude_mask_invariant_to_sign_flips_and_topk_is_signed():
    params = _tree(3)
    flipped = jax.tree.map(lambda x: -x, params)
    for scope in ("layer", "global"):
        a, b = cljax.magnitude_mask(params, 0.4, scope), cljax.magnitude_mask(flipped, 0.4, scope)
        for n in params:
            np.testing.assert_array_equal(a[n], b[n])
    got = cljax.topk_mask(params, 0.4)
    x = np.asarray(params["w"], np.float64).reshape(-1)
    np.testing.assert_array_equal(
        np.asarray(got["w"]).reshape(-1), _np_topk(x, _expected_count(0.4, x.size))
    )


def test_magnitude_mask_global_over_large_leaf_counts_exactly():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(70_000), jnp.float32)
    mask = cljax.magnitude_mask({"a": x, "b": jnp.full(10, 3.0)}, 0.25, scope="global")
    assert int(mask["a"].sum()) + int(mask["b"].sum()) == _expected_count(0.25, 70_010)
    assert bool(mask["b"].all())  # 3 is far above the 75th percentile of |N(0, 1)| (1.15)


def test_magnitude_mask_errors():
    with pytest.raises(ValueError, match="scope"):
        cljax.magnitude_mask(_tree(), 0.5, scope="row")
    with pytest.raises(TypeError, match="one float"):
        cljax.magnitude_mask(_tree(), {"w": 0.5, "b": 0.5, "k": 0.5, "s": 0.5}, scope="global")


@settings(deadline=None)
@given(
    shape=st.sampled_from(PROPERTY_SHAPES[1:]),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
)
def test_magnitude_mask_property(shape, density, seed):
    x = np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float32)  # heavy ties
    got = np.asarray(cljax.magnitude_mask({"x": jnp.asarray(x)}, density)["x"]).reshape(-1)
    k = _expected_count(density, x.size)
    assert got.sum() == k
    np.testing.assert_array_equal(got, _np_topk(np.abs(x.reshape(-1)).astype(np.float64), k))


# ---------------------------------------------------------------------------------------------
# nm_mask (SP-05).


def _np_nm(x: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(x.astype(np.float64)), axis, -1)
    groups = moved.reshape(-1, m)
    out = np.stack([_np_topk(g, n) for g in groups]).reshape(moved.shape)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize(
    ("shape", "n", "m", "axis"),
    [
        ((4, 8), 2, 4, -1),
        ((8, 3), 2, 4, 0),
        ((2, 6, 4), 1, 3, 1),
        ((3, 40), 5, 20, -1),
        ((16,), 4, 16, 0),
    ],
)
def test_nm_mask_matches_numpy_and_every_group_is_exact(shape, n, m, axis):
    x = np.round(np.random.default_rng(0).standard_normal(shape) * 2) / 2  # ties
    got = np.asarray(cljax.nm_mask(jnp.asarray(x, jnp.float32), n, m, axis))
    np.testing.assert_array_equal(got, _np_nm(x, n, m, axis))
    groups = np.moveaxis(got, axis, -1).reshape(-1, m)
    assert (groups.sum(axis=1) == n).all()


@settings(deadline=None)
@given(
    rows=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 4]),
    m=st.sampled_from([1, 2, 4, 5]),
    data=st.data(),
)
def test_nm_mask_property(rows, groups, m, data):
    n = data.draw(st.integers(1, m))
    x = np.asarray(
        data.draw(
            st.lists(st.integers(-2, 2), min_size=rows * groups * m, max_size=rows * groups * m)
        )
    )
    x = x.reshape(rows, groups * m).astype(np.float32)
    got = np.asarray(cljax.nm_mask(jnp.asarray(x), n, m))
    np.testing.assert_array_equal(got, _np_nm(x, n, m, -1))
    np.testing.assert_array_equal(got, np.asarray(cljax.nm_mask(jnp.asarray(-x), n, m)))


def test_nm_mask_errors():
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="n <= m"):
        cljax.nm_mask(x, 3, 2)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        cljax.nm_mask(x, 2, 4)
    with pytest.raises(ValueError, match="scalar"):
        cljax.nm_mask(jnp.ones(()), 1, 1)
    with pytest.raises(ValueError, match="out of range"):
        cljax.nm_mask(x, 1, 2, axis=2)
    with pytest.raises(ValueError, match="n"):
        cljax.nm_mask(x, 0, 2)
    with pytest.raises(TypeError, match="n"):
        cljax.nm_mask(x, 1.0, 2)
    with pytest.raises(TypeError, match="axis"):
        cljax.nm_mask(x, 1, 2, axis=None)


# ---------------------------------------------------------------------------------------------
# ERK and uniform allocation.


def _erk_params():
    return {
        "conv": jnp.zeros((3, 3, 8, 16)),
        "dense": jnp.zeros((64, 32)),
        "small": jnp.zeros((4, 2)),
        "head": jnp.zeros((32, 10)),
        "bias": jnp.zeros(16),
    }


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_erk_densities_follow_the_definition(density):
    params = _erk_params()
    dens = cljax.erk_densities(params, density)
    assert dens["bias"] is None  # 1-D leaves stay dense and out of the budget
    sparse = {k: v for k, v in dens.items() if v is not None}
    raw = {k: sum(params[k].shape) / params[k].size for k in sparse}
    assert all(0 < d <= 1 for d in sparse.values())
    not_dense = [k for k in sparse if sparse[k] < 1.0]
    if not_dense:  # one epsilon for every layer that is not dense; dense layers would exceed 1
        eps = {sparse[k] / raw[k] for k in not_dense}
        np.testing.assert_allclose(min(eps), max(eps), rtol=1e-9)
        assert all(min(eps) * raw[k] >= 1 - 1e-9 for k in sparse if sparse[k] == 1.0)
    sizes = {k: params[k].size for k in sparse}
    target = density * sum(sizes.values())
    np.testing.assert_allclose(sum(sparse[k] * sizes[k] for k in sparse), target, rtol=1e-9)
    masks = cljax.random_mask(params, dens, jax.random.key(0))
    kept = sum(int(masks[k].sum()) for k in sparse)
    assert abs(kept - target) <= len(sparse)  # one entry per layer of rounding


def test_erk_power_zero_is_uniform_and_uniform_densities():
    params = _erk_params()
    erk = cljax.erk_densities(params, 0.3, power_scale=0.0)
    uni = cljax.uniform_densities(params, 0.3)
    for k in params:
        if uni[k] is None:
            assert erk[k] is None
        else:
            np.testing.assert_allclose(erk[k], 0.3)
    picked = cljax.uniform_densities(params, 0.3, include=cljax.select("head|bias"))
    assert picked["bias"] == 0.3 and picked["dense"] is None
    with pytest.raises(ValueError, match="power_scale"):
        cljax.erk_densities(params, 0.3, power_scale=-1.0)


# ---------------------------------------------------------------------------------------------
# Gradual pruning schedule.


def test_gradual_pruning_schedule_matches_the_formula():
    s_i, s_f, t0, t1, dt = 0.1, 0.8, 10, 70, 15
    schedule = cljax.gradual_pruning_schedule(s_f, t0, t1, initial_sparsity=s_i, update_every=dt)
    values = np.asarray([float(schedule(t)) for t in range(0, 90)])
    for t in range(0, 90):
        if t <= t0:
            want = s_i
        elif t >= t1:
            want = s_f
        else:
            tk = t0 + ((t - t0) // dt) * dt
            want = s_f + (s_i - s_f) * (1 - (tk - t0) / (t1 - t0)) ** 3
        np.testing.assert_allclose(values[t], want, rtol=1e-6, err_msg=f"t={t}")
    assert (np.diff(values) >= -1e-7).all()
    changes = {t for t in range(1, 90) if values[t] != values[t - 1]}
    assert changes <= {t0 + i * dt for i in range(10)} | {t1}
    jitted = jax.jit(schedule)(jnp.int32(40))
    np.testing.assert_allclose(jitted, values[40])


def test_gradual_pruning_schedule_errors():
    with pytest.raises(ValueError, match="final_sparsity"):
        cljax.gradual_pruning_schedule(1.0, 0, 10)
    with pytest.raises(ValueError, match="end_step"):
        cljax.gradual_pruning_schedule(0.5, 10, 10)
    with pytest.raises(ValueError, match="update_every"):
        cljax.gradual_pruning_schedule(0.5, 0, 10, update_every=0)
    with pytest.raises(ValueError, match="power"):
        cljax.gradual_pruning_schedule(0.5, 0, 10, power=0.0)
