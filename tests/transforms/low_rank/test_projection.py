"""Tests for `scale_by_low_rank_projection` (LR-01 GaLore, LR-03 Online Subspace Descent) against
optax's GaLore, a float64 NumPy transcription of the reference GaLore step, and the cards'
invariants."""

from __future__ import annotations

from typing import NamedTuple

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import cljax
from cljax.transforms.low_rank import _bases
from cljax.transforms.low_rank import projection as _projection
from tests.helpers import assert_trees_close, assert_trees_equal


def _grads(shapes: dict, step: int, scale: float = 1.0) -> dict:
    keys = jax.random.split(jax.random.fold_in(jax.random.key(7), step), len(shapes))
    return {
        k: scale * jax.random.normal(key, s, jnp.float32)
        for key, (k, s) in zip(keys, shapes.items(), strict=True)
    }


def _run(tx, shapes, steps, params=None, scale=1.0):
    params = params if params is not None else {k: jnp.zeros(s) for k, s in shapes.items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    outs, states = [], []
    for t in range(steps):
        updates, state = step(_grads(shapes, t, scale), state, params)
        outs.append(updates)
        states.append(state)
    return outs, states


# ---------------------------------------------------------------------------------------------
# optax.contrib.galore: the 'reverse_std' side, exact SVD, moments kept.


def test_reverse_std_reproduces_optax_galore():
    shapes = {"tall": (12, 5), "square": (6, 6), "vec": (5,)}
    kwargs = dict(rank=3, refresh_every=4)
    ours = cljax.scale_by_low_rank_projection(
        side="reverse_std", layout="torch", projector="svd", on_refresh="keep", scale=0.5, **kwargs
    )
    theirs = optax.contrib.scale_by_galore(rank=3, update_proj_gap=4, scale=0.5)
    got, got_states = _run(ours, shapes, 12)
    want, want_states = _run(theirs, shapes, 12)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_trees_close(g, w, rtol=1e-5, atol=1e-6, err=f"step {t}")
    for name in ("tall", "square"):
        np.testing.assert_allclose(
            got_states[-1].projector[name], want_states[-1].projector[name], atol=1e-6
        )


@pytest.mark.slow
def test_reverse_std_wide_matrices_match_optax_on_the_transpose():
    # optax decomposes a wide G itself; cljax decomposes the tall G.T, whose singular vectors can
    # differ in sign. optax on G.T (tall, left projector) runs exactly cljax's computation.
    shapes = {"wide": (4, 10)}
    ours = cljax.scale_by_low_rank_projection(
        side="reverse_std", layout="torch", rank=2, refresh_every=3
    )
    theirs = optax.contrib.scale_by_galore(rank=2, update_proj_gap=3)
    got, _ = _run(ours, shapes, 10)
    transposed = {"wide": (10, 4)}
    params = {"wide": jnp.zeros((10, 4))}
    state = theirs.init(params)
    for t in range(10):
        g = {"wide": _grads(shapes, t)["wide"].T}
        u, state = theirs.update(g, state, params)
        np.testing.assert_allclose(got[t]["wide"], u["wide"].T, rtol=1e-5, atol=1e-6)
    del transposed


# ---------------------------------------------------------------------------------------------
# Reference GaLore ('std'), transcribed in float64 NumPy, with the reference's Adam (epsilon on
# the uncorrected sqrt(v), bias correction folded into the step size).


class _TorchAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _torch_style_adam(b1=0.9, b2=0.999, eps=1e-6):
    """Adam as the reference GaLore's AdamW computes it, without learning rate or decay."""

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return _TorchAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(lambda m, v: step * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, _TorchAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _reference_galore_std(grads, rank, gap, alpha, gauge, b1=0.9, b2=0.999, eps=1e-6):
    """The reference GaLore step for one PyTorch-layout matrix (proj_type='std').

    `gauge(t, basis)` returns the implementation's basis at refresh step t: singular vectors are
    defined up to sign, so each reference column takes the sign that matches it.
    """
    m_dim, n_dim = grads[0].shape
    exp_avg = exp_avg_sq = None
    basis = None
    outs = []
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        if t % gap == 0:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            basis = vh[:rank].T if m_dim >= n_dim else u[:, :rank]
            signs = np.sign(np.sum(basis * np.asarray(gauge(t), np.float64), axis=0))
            basis = basis * signs
        low = g @ basis if m_dim >= n_dim else basis.T @ g
        if exp_avg is None:
            exp_avg, exp_avg_sq = np.zeros_like(low), np.zeros_like(low)
        exp_avg = b1 * exp_avg + (1 - b1) * low
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * low * low
        step = np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        norm = step * exp_avg / (np.sqrt(exp_avg_sq) + eps)
        back = norm @ basis.T if m_dim >= n_dim else basis @ norm
        outs.append(alpha * back)
    return outs


@pytest.mark.parametrize("shape", [(10, 4), (4, 9)], ids=["tall", "wide"])
def test_std_reproduces_numpy_reference_galore(shape):
    shapes = {"w": shape}
    tx = cljax.scale_by_low_rank_projection(
        _torch_style_adam(), rank=2, refresh_every=3, scale=0.25, side="std", layout="torch"
    )
    got, states = _run(tx, shapes, 9)
    grads = [_grads(shapes, t)["w"] for t in range(9)]
    want = _reference_galore_std(grads, 2, 3, 0.25, gauge=lambda t: states[t].projector["w"])
    for t in range(9):
        np.testing.assert_allclose(got[t]["w"], want[t], rtol=2e-4, atol=2e-6, err_msg=f"step {t}")
    # The reference basis shape: (n, r) for tall (right projector), (m, r) for wide (left).
    assert states[0].projector["w"].shape == ((4, 2) if shape == (10, 4) else (4, 2))
    assert states[0].inner["w"].mu.shape == ((10, 2) if shape == (10, 4) else (2, 9))


def test_square_matrix_side_follows_the_layout():
    params = {"w": jnp.zeros((6, 6))}
    flax = cljax.scale_by_low_rank_projection(rank=2, side="std", layout="flax").init(params)
    torch = cljax.scale_by_low_rank_projection(rank=2, side="std", layout="torch").init(params)
    assert flax.inner["w"].mu.shape == (2, 6)  # left projector: compresses d_in of a flax kernel
    assert torch.inner["w"].mu.shape == (6, 2)  # right projector: d_in of a PyTorch weight
    # A flax kernel is the transposed PyTorch weight: the updates are transposes of each other.
    g = jax.random.normal(jax.random.key(0), (6, 6))
    tf = cljax.scale_by_low_rank_projection(rank=2, layout="flax")
    tt = cljax.scale_by_low_rank_projection(rank=2, layout="torch")
    uf, _ = tf.update({"w": g.T}, tf.init(params))
    ut, _ = tt.update({"w": g}, tt.init(params))
    np.testing.assert_allclose(uf["w"], ut["w"].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "side, layout, shape, left",
    [
        ("std", "flax", (8, 4), False),
        ("std", "flax", (4, 8), True),
        ("reverse_std", "flax", (8, 4), True),
        ("reverse_std", "torch", (4, 4), True),
        ("reverse_std", "flax", (4, 4), False),
        ("left", "flax", (8, 4), True),
        ("right", "torch", (4, 8), False),
    ],
)
def test_side_rule(side, layout, shape, left):
    assert _projection._is_left(side, layout, *shape) is left


# ---------------------------------------------------------------------------------------------
# Card invariants.


def test_full_rank_linear_inner_equals_the_inner_transform():
    shapes = {"w": (6, 4), "k": (2, 3, 5), "b": (4,)}
    inner = optax.trace(decay=0.9)
    plain, _ = _run(inner, shapes, 6)
    for on_refresh, every in (("keep", 100), ("reproject", 2)):
        tx = cljax.scale_by_low_rank_projection(
            inner, rank=8, refresh_every=every, on_refresh=on_refresh
        )
        got, _ = _run(tx, shapes, 6)
        for t in range(6):
            assert_trees_close(got[t], plain[t], rtol=1e-5, atol=1e-5, err=f"{on_refresh} step {t}")


@pytest.mark.slow
def test_projector_is_orthonormal_and_update_lies_in_its_subspace():
    shapes = {"tall": (9, 5), "wide": (3, 7), "k": (2, 6, 4)}
    tx = cljax.scale_by_low_rank_projection(rank=2, refresh_every=2)
    outs, states = _run(tx, shapes, 3)
    for name, shape in shapes.items():
        basis = np.asarray(states[-1].projector[name]).reshape(
            -1, *states[-1].projector[name].shape[-2:]
        )
        update = np.asarray(outs[-1][name]).reshape(-1, *shape[-2:])
        for q, d in zip(basis, update, strict=True):
            np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-5)
            tall = d.shape[0] >= d.shape[1]  # 'std': right projector for tall matrices
            resid = d - d @ q @ q.T if tall else d - q @ q.T @ d
            np.testing.assert_allclose(resid, 0.0, atol=1e-5)


def test_projector_changes_only_on_refresh_steps_and_svd_runs_once_per_refresh(monkeypatch):
    calls = []
    original = _bases.svd_basis

    def counting(a, r, left):
        jax.debug.callback(lambda: calls.append(1))
        return original(a, r, left)

    monkeypatch.setattr(_bases, "svd_basis", counting)
    shapes = {"stack": (3, 6, 4)}
    tx = cljax.scale_by_low_rank_projection(rank=2, refresh_every=3)
    _, states = _run(tx, shapes, 8)
    assert len(calls) == 3  # steps 0, 3, 6: one batched SVD call for the whole stack each time
    for t in range(1, 8):
        same = np.array_equal(states[t].projector["stack"], states[t - 1].projector["stack"])
        assert same == (t % 3 != 0), f"step {t}"


def test_stagger_spreads_refreshes_over_the_period():
    shapes = {"a": (6, 4), "b": (6, 4), "c": (6, 4), "d": (6, 4)}
    tx = cljax.scale_by_low_rank_projection(rank=2, refresh_every=4, stagger=True)
    _, states = _run(tx, shapes, 9)
    offsets = {"a": 0, "b": 1, "c": 2, "d": 3}
    for name, offset in offsets.items():
        for t in range(1, 9):
            changed = not np.array_equal(states[t].projector[name], states[t - 1].projector[name])
            assert changed == (t % 4 == offset), f"{name} step {t}"


def test_keep_carries_moments_and_reset_restarts_them():
    shapes = {"w": (6, 3)}
    keep = cljax.scale_by_low_rank_projection(rank=2, refresh_every=2, on_refresh="keep")
    reset = cljax.scale_by_low_rank_projection(rank=2, refresh_every=2, on_refresh="reset")
    _, s_keep = _run(keep, shapes, 3)
    _, s_reset = _run(reset, shapes, 3)
    # Step 2 refreshes. 'keep': mu_2 = b1 mu_1 + (1 - b1) R_2 with mu_1 from the old basis.
    g2 = _grads(shapes, 2)["w"]
    low = np.asarray(g2) @ np.asarray(s_keep[2].projector["w"])
    np.testing.assert_allclose(
        s_keep[2].inner["w"].mu,
        0.9 * np.asarray(s_keep[1].inner["w"].mu) + 0.1 * low,
        rtol=1e-5,
        atol=1e-6,
    )
    assert int(s_keep[2].inner["w"].count) == 3
    # 'reset': fresh moments, and the step count (bias correction) restarts.
    np.testing.assert_allclose(s_reset[2].inner["w"].mu, 0.1 * low, rtol=1e-5, atol=1e-6)
    assert int(s_reset[2].inner["w"].count) == 1


def test_reproject_rotates_first_and_second_moments():
    shapes = {"w": (3, 7)}  # wide: left projector
    tx = cljax.scale_by_low_rank_projection(
        optax.scale_by_adam(b1=0.5, b2=0.5), rank=2, refresh_every=2, on_refresh="reproject"
    )
    _, states = _run(tx, shapes, 3)
    old, new = (np.asarray(states[t].projector["w"], np.float64) for t in (1, 2))
    rot = new.T @ old
    low = new.T @ np.asarray(_grads(shapes, 2)["w"], np.float64)
    mu = 0.5 * rot @ np.asarray(states[1].inner["w"].mu) + 0.5 * low
    nu = 0.5 * (rot * rot) @ np.asarray(states[1].inner["w"].nu) + 0.5 * low * low
    np.testing.assert_allclose(states[2].inner["w"].mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states[2].inner["w"].nu, nu, rtol=1e-5, atol=1e-6)


def test_non_matrix_leaves_get_exactly_the_fallback():
    shapes = {"w": (6, 3), "b": (3,), "s": ()}
    tx = cljax.scale_by_low_rank_projection(rank=2, refresh_every=2, scale=0.3)
    got, _ = _run(tx, shapes, 3)
    grads = [_grads(shapes, t) for t in range(3)]
    adam = optax.scale_by_adam()
    state = adam.init({"b": jnp.zeros(3), "s": jnp.zeros(())})
    step = jax.jit(adam.update)
    for t in range(3):
        u, state = step({"b": grads[t]["b"], "s": grads[t]["s"]}, state)
        assert_trees_equal({"b": got[t]["b"], "s": got[t]["s"]}, u)
    sgd = cljax.scale_by_low_rank_projection(rank=2, fallback=optax.scale(-2.0))
    out, _ = sgd.update(grads[0], sgd.init({k: jnp.zeros(s) for k, s in shapes.items()}))
    np.testing.assert_array_equal(out["b"], -2.0 * grads[0]["b"])


@pytest.mark.parametrize(
    "side, per_matrix",
    [
        ("std", lambda m, n, r: r * (2 * max(m, n) + min(m, n))),
        ("reverse_std", lambda m, n, r: r * (2 * min(m, n) + max(m, n))),
    ],
)
def test_state_float_count_equals_the_card_formula(side, per_matrix):
    params = {
        "a": jnp.zeros((16, 6)),
        "b": jnp.zeros((5, 12)),
        "k": jnp.zeros((3, 10, 4)),
        "v": jnp.zeros(7),
    }
    state = cljax.scale_by_low_rank_projection(rank=3, side=side, layout="torch").init(params)
    floats = sum(
        x.size
        for x in jax.tree.leaves((state.projector, state.inner))
        if jnp.issubdtype(x.dtype, jnp.floating)
    )
    expected = per_matrix(16, 6, 3) + per_matrix(5, 12, 3) + 3 * per_matrix(10, 4, 3)
    assert floats == expected
    # 4096 x 11008 at r = 1024 (the card's worked example), by shapes only.
    big = jax.eval_shape(
        cljax.scale_by_low_rank_projection(rank=1024, side=side).init,
        {"w": jax.ShapeDtypeStruct((4096, 11008), jnp.float32)},
    )
    count = sum(
        x.size for x in jax.tree.leaves((big.projector, big.inner)) if x.dtype == jnp.float32
    )
    assert count == per_matrix(4096, 11008, 1024)
    assert round(count / 1e6, 1) == (26.7 if side == "std" else 19.7)


# ---------------------------------------------------------------------------------------------
# Cheaper refreshes: randomized range finder and warm-started subspace iteration.


def _gapped(key, m, n, r, gap):
    ku, kv = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (m, min(m, n))))
    v, _ = jnp.linalg.qr(jax.random.normal(kv, (n, min(m, n))))
    s = jnp.concatenate([jnp.linspace(10.0, 8.0, r), gap * jnp.linspace(1.0, 0.5, min(m, n) - r)])
    return (u * s[None, :]) @ v.T


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_randomized_basis_within_subspace_error_of_svd(shape):
    g = _gapped(jax.random.key(1), *shape, 4, gap=0.1)
    exact = _bases.svd_basis(g, 4, left=True)
    approx = jax.jit(lambda g, k: _bases.randomized_basis(g, 4, k, oversample=4, power_iters=2))(
        g, jax.random.key(2)
    )
    assert float(_bases.subspace_error(approx, exact)) < 1e-3
    np.testing.assert_allclose(approx.T @ approx, np.eye(4), atol=1e-5)
    # Through the transform: the stored basis after the first refresh (right side for tall).
    tx = cljax.scale_by_low_rank_projection(rank=4, projector="randomized", oversample=4)
    _, state = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
    left = shape[0] < shape[1]
    assert float(_bases.subspace_error(state.projector["w"], _bases.svd_basis(g, 4, left))) < 1e-3


def _stale_and_rotated():
    g0 = _gapped(jax.random.key(3), 30, 20, 3, gap=0.05)
    noise = jax.random.normal(jax.random.key(4), (30, 30))
    rotation = jnp.linalg.qr(jnp.eye(30) + 0.3 * noise)[0]
    return g0, rotation @ g0  # the same spectrum in a rotated column space


def test_subspace_iteration_refines_a_stale_basis():
    g0, g1 = _stale_and_rotated()
    stale = _bases.svd_basis(g0, 3, left=True)
    exact = _bases.svd_basis(g1, 3, left=True)
    assert float(_bases.subspace_error(stale, exact)) > 0.3
    one_step = jax.jit(lambda a, p: _bases.subspace_iteration_basis(a, p, power_iters=1))(g1, stale)
    assert float(_bases.subspace_error(one_step, exact)) < 1e-2
    np.testing.assert_allclose(one_step.T @ one_step, np.eye(3), atol=1e-5)


@pytest.mark.slow
def test_subspace_iteration_projector_warm_starts_from_the_stored_basis():
    g0, g1 = _stale_and_rotated()
    exact = _bases.svd_basis(g1, 3, left=True)
    # Step 0 sees g0 (randomized first basis), step 2 (a refresh) warm-starts from it.
    tx = cljax.scale_by_low_rank_projection(
        rank=3, refresh_every=2, projector="subspace_iteration", side="left"
    )
    state = tx.init({"w": g0})
    step = jax.jit(tx.update)
    for g in (g0, g0, g1):
        _, state = step({"w": g}, state)
    assert float(_bases.subspace_error(state.projector["w"], exact)) < 1e-2


@pytest.mark.slow
def test_random_projector_is_regenerated_from_the_key_and_never_stored():
    shapes = {"w": (8, 5)}
    tx = cljax.scale_by_low_rank_projection(
        rank=2, refresh_every=3, projector="random", side="left"
    )
    outs, states = _run(tx, shapes, 4)
    assert jax.tree.leaves(states[0].projector) == []
    again, _ = _run(tx, shapes, 4)
    assert_trees_equal(outs, again)
    # Within a period the (regenerated) basis is the same: updates lie in one 2-D column space.
    cols = np.concatenate([np.asarray(outs[t]["w"]) for t in range(3)], axis=1)
    assert np.linalg.matrix_rank(cols, tol=1e-4) == 2
    other = cljax.scale_by_low_rank_projection(rank=2, refresh_every=3, projector="random", seed=1)
    moved, _ = _run(other, shapes, 1)
    assert not np.allclose(moved[0]["w"], outs[0]["w"])


# ---------------------------------------------------------------------------------------------
# Online Subspace Descent.


def test_online_pca_with_zero_projector_lr_equals_a_single_svd():
    shapes = {"w": (7, 4), "k": (2, 3, 6)}
    frozen = cljax.scale_by_low_rank_projection(
        rank=2, projector="online_pca", projector_optimizer=optax.adamw(0.0, weight_decay=0.01)
    )
    once = cljax.scale_by_low_rank_projection(rank=2, refresh_every=10**6, projector="svd")
    got, _ = _run(frozen, shapes, 5)
    want, _ = _run(once, shapes, 5)
    for t in range(5):
        assert_trees_close(got[t], want[t], rtol=1e-6, atol=1e-7)


def test_online_pca_projector_step_follows_the_objective():
    shapes = {"w": (7, 4)}  # tall, 'std': right projector B^T = Q (4, 2), target X = G^T
    tx = cljax.scale_by_low_rank_projection(
        rank=2, projector="online_pca", projector_optimizer=optax.sgd(0.05)
    )
    _, states = _run(tx, shapes, 2)
    g = np.asarray(_grads(shapes, 1)["w"], np.float64)
    q = np.asarray(states[0].projector["w"], np.float64)
    gh = g / np.linalg.norm(g)
    # Closed form of the card (PyTorch layout, B = Qᵀ): ∇_B = 2B(EᵀĜ + ĜᵀE), E = ĜBᵀB − Ĝ.
    b = q.T
    e = gh @ b.T @ b - gh
    grad_b = 2 * b @ (e.T @ gh + gh.T @ e)
    np.testing.assert_allclose(states[1].projector["w"], q - 0.05 * grad_b.T, rtol=1e-4, atol=1e-6)
    # The autodiff gradient of the objective matches the same closed form.
    auto = jax.grad(_projection._pca_loss)(
        jnp.asarray(q, jnp.float32), jnp.asarray(gh.T, jnp.float32)
    )
    np.testing.assert_allclose(auto, grad_b.T, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_online_pca_loss_decreases_for_a_small_step():
    target = jax.random.normal(jax.random.key(0), (9, 6))
    target = target / jnp.linalg.norm(target)
    basis = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (9, 2)))[0]
    losses = []
    for _ in range(30):
        losses.append(float(_projection._pca_loss(basis, target)))
        basis = basis - 0.05 * jax.grad(_projection._pca_loss)(basis, target)
    assert all(b <= a + 1e-7 for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]


def _sub_jaxprs(value):
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)
    elif hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr


def _primitive_names(jaxpr, top_level_only: bool) -> list[str]:
    """Primitive names in a jaxpr and its sub-jaxprs; with `top_level_only`, not inside a cond."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if top_level_only and eqn.primitive.name == "cond":
            continue
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                names += _primitive_names(sub, top_level_only)
    return names


def test_online_pca_step_has_no_svd_outside_the_first_step_branch():
    params = {"w": jnp.zeros((6, 4)), "k": jnp.zeros((2, 5, 3))}
    tx = cljax.scale_by_low_rank_projection(rank=2, projector="online_pca")
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params)).jaxpr
    assert "svd" in _primitive_names(jaxpr, top_level_only=False)
    assert "svd" not in _primitive_names(jaxpr, top_level_only=True)


# ---------------------------------------------------------------------------------------------
# Finite output: zero gradients and rank >= min(m, n), every projector and refresh policy.


@pytest.mark.parametrize(
    "projector",
    [
        "svd",
        "online_pca",
        pytest.param("randomized", marks=pytest.mark.slow),
        pytest.param("subspace_iteration", marks=pytest.mark.slow),
        pytest.param("random", marks=pytest.mark.slow),
    ],
)
def test_zero_gradients_and_full_rank_stay_finite(projector):
    shapes = {"w": (6, 4), "k": (2, 3, 5), "b": (4,)}
    for rank, on_refresh in ((2, "reproject"), (9, "keep")):
        tx = cljax.scale_by_low_rank_projection(
            rank=rank, refresh_every=2, projector=projector, on_refresh=on_refresh
        )
        for scale in (0.0, 1.0):
            outs, states = _run(tx, shapes, 3, scale=scale)
            for leaf in jax.tree.leaves((outs, states)):
                if jnp.issubdtype(leaf.dtype, jnp.floating):
                    assert bool(jnp.all(jnp.isfinite(leaf))), (projector, rank, scale)
            if scale == 0.0:
                assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(outs))


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 7),
    n=st.integers(1, 7),
    batch=st.integers(0, 2),
    rank=st.integers(1, 8),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    side=st.sampled_from(["std", "reverse_std", "left", "right"]),
)
def test_shapes_dtypes_and_subspace_property(m, n, batch, rank, dtype, side):
    shape = (batch, m, n) if batch else (m, n)
    g = jax.random.normal(jax.random.key(m * 31 + n), shape).astype(dtype)
    tx = cljax.scale_by_low_rank_projection(optax.identity(), rank=rank, side=side)
    out, state = tx.update({"w": g}, tx.init({"w": g}))
    assert out["w"].shape == shape and out["w"].dtype == dtype
    r = min(rank, m, n)
    assert state.projector["w"].shape[-1] == r and state.projector["w"].dtype == jnp.float32
    # With an identity inner the output is the projection of G: idempotent under the same basis.
    again, _ = tx.update(out, state._replace(count=jnp.ones([], jnp.int32)))
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(
        np.asarray(again["w"], np.float32),
        np.asarray(out["w"], np.float32),
        atol=tol * 10,
        rtol=tol,
    )


# ---------------------------------------------------------------------------------------------
# Matrix specs and errors.


def test_matrix_spec_function_selects_leaves_and_views():
    params = {"conv": jnp.zeros((3, 3, 4, 8)), "dense": jnp.zeros((6, 5)), "b": jnp.zeros(5)}

    def spec(p):
        return {"conv": cljax.MatrixSpec(rows=(0, 1, 2), cols=3), "dense": None, "b": None}

    tx = cljax.scale_by_low_rank_projection(rank=2, matrix_spec=spec)
    state = tx.init(params)
    assert state.projector["conv"].shape == (8, 2)  # (36, 8) view, 'std': right projector
    assert isinstance(state.projector["dense"], optax.MaskedNode)
    assert state.fallback.mu["dense"].shape == (6, 5)
    out, _ = tx.update(jax.tree.map(jnp.ones_like, params), state)
    assert out["conv"].shape == (3, 3, 4, 8)


@pytest.mark.slow
def test_batch_axes_in_the_middle():
    spec = cljax.MatrixSpec(rows=0, cols=2)  # (m, L, n): L matrices (m, n)
    g = jax.random.normal(jax.random.key(0), (6, 2, 4))
    tx = cljax.scale_by_low_rank_projection(optax.identity(), rank=4, matrix_spec=spec)
    out, state = tx.update({"w": g}, tx.init({"w": g}))
    assert state.projector["w"].shape == (2, 4, 4)
    np.testing.assert_allclose(out["w"], g, atol=1e-5)  # full rank, identity inner


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, r"scale_by_low_rank_projection\(rank=...\) must be >= 1"),
        (dict(rank=2.0), TypeError, r"\(rank=...\) must be an int"),
        (dict(refresh_every=0), ValueError, r"\(refresh_every=...\) must be >= 1"),
        (dict(side="up"), ValueError, r"\(side=...\) must be one of 'std'"),
        (dict(projector="qr"), ValueError, r"\(projector=...\) must be one of 'svd'"),
        (dict(on_refresh="rotate"), ValueError, r"\(on_refresh=...\) must be one of 'keep'"),
        (dict(layout="jax"), ValueError, r"\(layout=...\) must be one of 'flax'"),
        (dict(matrix_spec=(0, 1)), TypeError, r"\(matrix_spec=...\) must be a MatrixSpec"),
        (dict(stagger=1), TypeError, r"\(stagger=...\) must be a bool"),
        (dict(seed=-1), ValueError, r"\(seed=...\) must be >= 0"),
        (dict(oversample=-1), ValueError, r"\(oversample=...\) must be >= 0"),
        (dict(power_iters=-1), ValueError, r"\(power_iters=...\) must be >= 0"),
        (dict(scale=float("nan")), ValueError, r"\(scale=...\) must be in"),
        (dict(reorthonormalize="yes"), TypeError, r"\(reorthonormalize=...\) must be a bool"),
        (dict(projector_optimizer=3), TypeError, r"\(projector_optimizer=...\) must be an optax"),
        (dict(inner=optax.adam), TypeError, r"\(inner=...\) must be an optax"),
        (dict(fallback="adam"), TypeError, r"\(fallback=...\) must be an optax"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        cljax.scale_by_low_rank_projection(**kwargs)


def test_bad_matrix_specs_name_the_leaf():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    wrong_structure = cljax.scale_by_low_rank_projection(matrix_spec=lambda p: [None])
    with pytest.raises(
        ValueError, match=r"`matrix_spec\(params\)` must return a tree with the structure"
    ):
        wrong_structure.init(params)
    wrong_entry = cljax.scale_by_low_rank_projection(matrix_spec=lambda p: {"w": (0, 1), "b": None})
    with pytest.raises(
        TypeError, match=r"gives \(0, 1\) for leaf 'w'; each entry must be a MatrixSpec"
    ):
        wrong_entry.init(params)
    too_few_dims = cljax.scale_by_low_rank_projection(
        matrix_spec=lambda p: {"w": None, "b": cljax.MatrixSpec()}
    )
    with pytest.raises(ValueError, match=r"leaf 'b' has 1 dims"):
        too_few_dims.init(params)
    empty = cljax.scale_by_low_rank_projection()
    with pytest.raises(
        ValueError, match=r"leaf 'e' has shape \(0, 3\); a matrix view of shape \(0, 3\) is empty"
    ):
        empty.init({"e": jnp.zeros((0, 3))})


def test_reproject_rejects_integer_moments():
    class _IntState(NamedTuple):
        codes: jax.Array

    inner = optax.GradientTransformation(
        lambda p: _IntState(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.uint8), p)),
        lambda u, s, p=None: (u, s),
    )
    tx = cljax.scale_by_low_rank_projection(inner, rank=2, on_refresh="reproject")
    params = {"w": jnp.zeros((5, 3))}
    with pytest.raises(
        ValueError,
        match=r"on_refresh='reproject'\): leaf 'w' has an inner-state entry of dtype uint8",
    ):
        tx.update({"w": jnp.ones((5, 3))}, tx.init(params))
