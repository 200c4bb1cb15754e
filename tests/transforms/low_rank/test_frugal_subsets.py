"""Tests for FRUGAL's block and coordinate projectors (LR-02) against float64 NumPy
transcriptions of the card's rule (Adam on the state-full subset, signSGD / SGD on exactly the
complement, statistics reset at each refresh) and the card's invariants."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import cljax
from cljax.transforms.low_rank._frugal_subsets import block_counts
from tests.helpers import assert_trees_close

B1, B2, EPS = 0.9, 0.999, 1e-8
SHAPES = {"a": (4, 3), "c": (2, 5), "k": (3, 4, 3)}


def _grads(shapes, step, dtype=jnp.float32):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(5), step), len(shapes))
    return {
        k: jax.random.normal(key, s).astype(dtype)
        for key, (k, s) in zip(keys, shapes.items(), strict=True)
    }


_STEPS: dict = {}


def _run(tx, shapes, steps, key=None):
    """Runs `tx` for `steps` steps; the jitted update is shared per (key) across tests."""
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    state = tx.init(params)
    step = _STEPS.setdefault(key, jax.jit(tx.update)) if key is not None else jax.jit(tx.update)
    outs, states = [], []
    for t in range(steps):
        u, state = step(_grads(shapes, t), state, params)
        outs.append(u)
        states.append(state)
    return outs, states


def _matrices(tree):
    """Tree order, then layer order: the list of (name, layer or None, matrix) in float64."""
    out = []
    for name in sorted(tree):
        x = np.asarray(tree[name], np.float64)
        if x.ndim == 2:
            out.append((name, None, x))
        else:
            out.extend((name, i, x[i]) for i in range(x.shape[0]))
    return out


def _free(rule, x):
    return {"sign_sgd": np.sign(x), "sgd": x, "none": np.zeros_like(x)}[rule]


class _Adam:
    """Bias-corrected Adam (optax's form) on an array of moments, with a restartable count."""

    def __init__(self, shape):
        self.mu, self.nu, self.count = np.zeros(shape), np.zeros(shape), 0

    def step(self, g):
        self.count += 1
        self.mu = B1 * self.mu + (1 - B1) * g
        self.nu = B2 * self.nu + (1 - B2) * g * g
        mu_hat = self.mu / (1 - B1**self.count)
        nu_hat = self.nu / (1 - B2**self.count)
        return mu_hat / (np.sqrt(nu_hat) + EPS)


def _window(order, refresh, n, k):
    """The card's block orders as read in the docstring, written with list slicing."""
    per_cycle = -(-n // k)
    cycle, w = divmod(refresh, per_cycle)
    forwards = (list(range(n)) * 2)[w * k : w * k + k]
    backwards = [n - 1 - p for p in forwards]
    if order == "ascending" or (order == "mirror" and cycle % 2 == 0):
        return forwards
    return backwards


def _reference_blocks(shapes, steps, counts, order, gap, s_p, s_free, rule, reset, chosen):
    """FRUGAL block mode. Groups: (4, 3) matrices [a, k0, k1, k2] and (2, 5) matrices [c]."""
    outs = []
    adams = None
    for t in range(steps):
        mats = _matrices({k: v for k, v in _grads(shapes, t).items()})
        groups = {}
        for name, layer, x in mats:
            groups.setdefault(x.shape, []).append((name, layer, x))
        if t % gap == 0:
            active = {}
            for g, (shape, members) in enumerate(groups.items()):
                k = counts[g]
                if order == "random":
                    active[shape] = list(chosen(t, g))
                else:
                    active[shape] = _window(order, t // gap, len(members), k)
            if reset or adams is None:
                adams = {shape: _Adam((counts[g], *shape)) for g, shape in enumerate(groups)}
        out = {name: np.zeros(s) for name, s in shapes.items()}
        for shape, members in groups.items():
            sel = active[shape]
            low = np.stack([members[j][2] for j in sel])
            direction = adams[shape].step(low)
            for j, (name, layer, x) in enumerate(members):
                d = direction[sel.index(j)] if j in sel else s_free * _free(rule, x)
                if layer is None:
                    out[name] = s_p * d
                else:
                    out[name][layer] = s_p * d
        outs.append(out)
    return outs


# N = 5 matrices (four (4, 3), one (2, 5)); density 0.5: K = round(2.5) = 3, quotas 3·4/5 = 2.4
# and 3·1/5 = 0.6: floors (2, 0), the leftover slot to the larger remainder: (2, 1).
COUNTS = (2, 1)


@pytest.mark.parametrize("order", ["ascending", "descending", "mirror", "random"])
def test_blocks_match_numpy_reference(order):
    tx = cljax.scale_by_frugal(
        projector="blocks",
        block_order=order,
        density=0.5,
        refresh_every=2,
        scale=0.7,
        inactive_scale=0.2,
    )
    got, states = _run(tx, SHAPES, 9)
    chosen = lambda t, g: np.asarray(states[t].projector[g])
    for t in range(0, 9, 2):
        for g, k in enumerate(COUNTS):
            sel = chosen(t, g)
            assert sel.shape == (k,) and len(set(sel.tolist())) == k
    want = _reference_blocks(SHAPES, 9, COUNTS, order, 2, 0.7, 0.2, "sign_sgd", True, chosen)
    for t in range(9):
        for name in SHAPES:
            np.testing.assert_allclose(
                got[t][name], want[t][name], rtol=1e-4, atol=1e-5, err_msg=f"{name} step {t}"
            )


def test_blocks_random_order_changes_and_is_regenerable():
    tx = cljax.scale_by_frugal(projector="blocks", density=0.5, refresh_every=1, seed=3)
    _, first = _run(tx, SHAPES, 6, key="blocks_random")
    _, again = _run(tx, SHAPES, 6, key="blocks_random")
    picks = {tuple(np.asarray(s.projector[0]).tolist()) for s in first}
    assert len(picks) > 1  # six draws of 2 of 4 matrices are not all equal
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.projector[0], b.projector[0])


def test_blocks_without_reset_keep_the_slot_state():
    tx = cljax.scale_by_frugal(
        projector="blocks",
        block_order="ascending",
        density=0.5,
        refresh_every=2,
        reset_statistics=False,
        inactive_update="sgd",
    )
    got, _ = _run(tx, SHAPES, 5)
    want = _reference_blocks(SHAPES, 5, COUNTS, "ascending", 2, 1.0, 1.0, "sgd", False, None)
    for t in range(5):
        for name in SHAPES:
            np.testing.assert_allclose(got[t][name], want[t][name], rtol=1e-4, atol=1e-5)


def _reference_subsets(shapes, steps, kind, gap, s_p, s_free, rule, indices):
    """FRUGAL RandK / rows / columns per matrix, reset at refresh; `indices(t, name)` (b, k)."""
    outs, adams = [], {}
    for t in range(steps):
        grads = _grads(shapes, t)
        out = {}
        for name, shape in shapes.items():
            g = np.asarray(grads[name], np.float64).reshape(-1, *shape[-2:])
            idx = np.asarray(indices(t, name)).reshape(g.shape[0], -1)
            b, m, n = g.shape
            mask = np.zeros((b, m, n), bool)
            for i in range(b):
                if kind == "coordinates":
                    mask[i].flat[idx[i]] = True
                elif kind == "rows":
                    mask[i, idx[i], :] = True
                else:
                    mask[i, :, idx[i]] = True
            low = g[mask]  # the chosen entries, row-major order (sorted indices)
            if t % gap == 0:
                adams[name] = _Adam(low.shape)
            d = np.where(mask, 0.0, s_free * _free(rule, g))
            d[mask] = adams[name].step(low)
            out[name] = (s_p * d).reshape(shape)
        outs.append(out)
    return outs


@pytest.mark.parametrize("kind", ["coordinates", "rows", "columns"])
def test_subsets_match_numpy_reference(kind):
    tx = cljax.scale_by_frugal(
        projector=kind, density=0.4, refresh_every=3, scale=0.5, inactive_scale=0.3
    )
    got, states = _run(tx, SHAPES, 7)
    d_of = {"coordinates": lambda m, n: m * n, "rows": lambda m, n: m, "columns": lambda m, n: n}
    for name, shape in SHAPES.items():
        d = d_of[kind](*shape[-2:])
        for t in range(7):
            idx = np.asarray(states[t].projector[name]).reshape(
                -1, states[t].projector[name].shape[-1]
            )
            assert idx.shape[-1] == max(1, math.floor(0.4 * d + 0.5))
            for row in idx:
                assert np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < d
            if t % 3:
                np.testing.assert_array_equal(
                    idx, np.asarray(states[t - 1].projector[name]).reshape(idx.shape)
                )
    want = _reference_subsets(
        SHAPES, 7, kind, 3, 0.5, 0.3, "sign_sgd", lambda t, name: states[t].projector[name]
    )
    for t in range(7):
        for name in SHAPES:
            np.testing.assert_allclose(
                got[t][name], want[t][name], rtol=1e-4, atol=1e-5, err_msg=f"{name} step {t}"
            )


def test_coordinates_stagger_spreads_the_refreshes():
    shapes = {"a": (4, 3), "c": (2, 5)}
    tx = cljax.scale_by_frugal(projector="coordinates", density=0.5, refresh_every=4, stagger=True)
    _, states = _run(tx, shapes, 7)
    changed = {
        name: [
            t
            for t in range(1, 7)
            if np.any(np.asarray(states[t].projector[name]) != states[t - 1].projector[name])
        ]
        for name in shapes
    }
    assert changed == {"a": [4], "c": [2, 6]}  # offsets 0 and ⌊1 · 4 / 2⌋ = 2
    assert [int(s.inner["c"].count) for s in states] == [1, 2, 1, 2, 3, 4, 1]


@pytest.mark.parametrize("projector", ["blocks", "coordinates"])
def test_reset_zeroes_moments_and_restarts_bias_correction(projector):
    shapes = {"w": (6, 4)}
    tx = cljax.scale_by_frugal(projector=projector, density=0.5, refresh_every=3)
    _, states = _run(tx, shapes, 4)
    inner = (lambda s: s.inner[0]) if projector == "blocks" else (lambda s: s.inner["w"])
    assert [int(inner(s).count) for s in states] == [1, 2, 3, 1]
    g = np.asarray(_grads(shapes, 3)["w"])
    low = g[None] if projector == "blocks" else g.reshape(-1)[np.asarray(states[3].projector["w"])]
    np.testing.assert_allclose(inner(states[3]).mu, 0.1 * low, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("projector", ["blocks", "coordinates", "rows", "columns"])
def test_full_density_equals_adam(projector):
    shapes = {"w": (6, 4), "k": (2, 3, 5), "b": (4,)}
    tx = cljax.scale_by_frugal(
        projector=projector, density=1.0, refresh_every=2, reset_statistics=False
    )
    got, _ = _run(tx, shapes, 5)
    want, _ = _run(optax.scale_by_adam(), shapes, 5)
    for t in range(5):
        assert_trees_close(got[t], want[t], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("projector", ["blocks", "coordinates", "rows", "columns"])
def test_free_part_touches_exactly_the_complement_with_fixed_sign_magnitude(projector):
    shapes = {"a": (4, 3), "k": (3, 4, 3)}
    free_only = cljax.scale_by_frugal(
        optax.set_to_zero(), projector=projector, density=0.5, scale=2.0, inactive_scale=0.3
    )
    state_only = cljax.scale_by_frugal(
        optax.identity(), projector=projector, density=0.5, inactive_update="none"
    )
    (free,), _ = _run(free_only, shapes, 1)
    (full,), _ = _run(state_only, shapes, 1)
    g = _grads(shapes, 0)
    for name in shapes:
        f, s, x = (np.asarray(v[name]) for v in (free, full, g))
        chosen = s != 0
        assert np.all(f[~chosen] != 0) and np.all(f[chosen] == 0)  # exactly the complement
        np.testing.assert_allclose(np.abs(f[~chosen]), 0.6, rtol=1e-6)  # η·s_p·s_free, η = 1
        np.testing.assert_array_equal(s[chosen], x[chosen])  # identity inner: down(g) untouched
    assert 0 < sum(int(np.sum(np.asarray(v) != 0)) for v in jax.tree.leaves(full)) < 48


def test_state_float_count_is_twice_the_state_full_coordinates():
    params = {"a": jnp.zeros((12, 8)), "k": jnp.zeros((3, 12, 8)), "c": jnp.zeros((5, 4))}

    def floats(tx):
        inner = tx.init(params).inner
        return sum(x.size for x in jax.tree.leaves(inner) if x.dtype == jnp.float32)

    # Blocks: N = 5 (four 12x8, one 5x4), K = round(0.25·5) = 1, quotas 0.8 and 0.2: (1, 0).
    assert floats(cljax.scale_by_frugal(projector="blocks", density=0.25)) == 2 * 12 * 8
    coords = round(0.25 * 96) * 4 + round(0.25 * 20)
    assert floats(cljax.scale_by_frugal(projector="coordinates", density=0.25)) == 2 * coords
    rows = round(0.25 * 12) * 8 * 4 + round(0.25 * 5) * 4
    assert floats(cljax.scale_by_frugal(projector="rows", density=0.25)) == 2 * rows


@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    density=st.floats(0.01, 1.0),
)
def test_block_counts_split_round_density_n_by_largest_remainder(sizes, density):
    counts = block_counts(sizes, density)
    total = sum(sizes)
    k = min(total, max(1, math.floor(density * total + 0.5)))
    assert sum(counts) == k
    for c, s in zip(counts, sizes, strict=True):
        assert 0 <= c <= s and abs(c - k * s / total) < 1


@pytest.mark.parametrize("projector", ["blocks", "rows"])
def test_zero_gradients_stay_finite_and_dtypes_are_kept(projector):
    tx = cljax.scale_by_frugal(projector=projector, density=0.5)
    params = {"w": jnp.zeros((6, 4), jnp.bfloat16), "k": jnp.zeros((2, 3, 5)), "b": jnp.zeros(3)}
    out, _ = jax.jit(tx.update)(params, tx.init(params))
    for u, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        assert u.dtype == p.dtype and not np.any(np.asarray(u, np.float32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(projector="blocks", block_order="shuffled"),
            ValueError,
            r"scale_by_frugal\(block_order=...\) must be one of 'random', 'ascending'",
        ),
        (
            dict(projector="blocks", stagger=True),
            ValueError,
            r"scale_by_frugal\(stagger=True\) is not available with projector='blocks'",
        ),
        (
            dict(projector="diagonal"),
            ValueError,
            r"\(projector=...\) must be one of .*'blocks', 'coordinates', 'rows', 'columns'",
        ),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        cljax.scale_by_frugal(**kwargs)
