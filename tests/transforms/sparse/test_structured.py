"""Tests for the structured sparse fine-tuning transforms (SP-18 DiaBlo, SP-13 S²FT).

References are written in float64 NumPy from the cards: AdamW applied to the diagonal blocks
(cut out with explicit loops) or to the selected slices, zero updates everywhere else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax import MatrixSpec, select
from cljax.transforms.sparse.structured import (
    DiabloState,
    S2ftGroup,
    S2ftState,
    diablo,
    s2ft,
    s2ft_permutations,
    s2ft_permute,
)
from tests.helpers import assert_trees_close

LR, B1, B2, EPS, WD = 0.05, 0.9, 0.99, 1e-8, 0.1


def _adamw():
    return optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)


def _np_adamw_on(params, grads_seq, gather, scatter):
    """Float64 AdamW on the views `gather` cuts out of each leaf; `scatter` writes them back."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(gather(k, v)) for k, v in p.items()}
    nu = {k: np.zeros_like(gather(k, v)) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = gather(k, np.asarray(grads[k], np.float64))
            mu[k] = B1 * mu[k] + (1 - B1) * g
            nu[k] = B2 * nu[k] + (1 - B2) * g * g
            direction = (mu[k] / (1 - B1**t)) / (np.sqrt(nu[k] / (1 - B2**t)) + EPS)
            view_p = gather(k, p[k])
            p[k] = scatter(k, p[k], view_p - LR * (direction + WD * view_p))
    return p


def _run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _tree(seed, shapes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# SP-18 DiaBlo.

DIABLO_SHAPES = {"w": (6, 9), "k": (2, 3, 6), "b": (6,)}  # N = 3 divides 6, 9 and 3


def _np_blocks(x, n_blocks):
    """The diagonal blocks of the last two axes, cut out with loops: (..., N, m/N, n/N)."""
    m, n = x.shape[-2:]
    bm, bn = m // n_blocks, n // n_blocks
    return np.stack(
        [x[..., i * bm : (i + 1) * bm, i * bn : (i + 1) * bn] for i in range(n_blocks)], axis=-3
    )


def _np_put_blocks(x, blocks, n_blocks):
    x = x.copy()
    m, n = x.shape[-2:]
    bm, bn = m // n_blocks, n // n_blocks
    for i in range(n_blocks):
        x[..., i * bm : (i + 1) * bm, i * bn : (i + 1) * bn] = blocks[..., i, :, :]
    return x


def _block_mask(shape, n_blocks):
    return _np_put_blocks(
        np.zeros(shape, bool),
        np.ones(shape[:-2] + (n_blocks, shape[-2] // n_blocks, shape[-1] // n_blocks), bool),
        n_blocks,
    )


def test_diablo_matches_numpy_blockwise_adamw():
    params = _tree(0, DIABLO_SHAPES)
    grads_seq = [_tree(10 + i, DIABLO_SHAPES) for i in range(4)]
    got, _ = _run(diablo(_adamw(), 3), params, grads_seq)

    def gather(k, x):
        return _np_blocks(x, 3) if x.ndim >= 2 else np.zeros((0,))

    def scatter(k, x, view):
        return _np_put_blocks(x, view, 3) if x.ndim >= 2 else x

    want = _np_adamw_on(params, grads_seq, gather, scatter)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_diablo_off_diagonal_never_changes_and_state_is_blocks_only():
    params = _tree(1, DIABLO_SHAPES)
    grads_seq = [_tree(20 + i, DIABLO_SHAPES) for i in range(3)]
    tx = diablo(_adamw(), 3)
    got, state = _run(tx, params, grads_seq)
    for k in ("w", "k"):
        off = ~_block_mask(DIABLO_SHAPES[k], 3)
        np.testing.assert_array_equal(np.asarray(got[k])[off], np.asarray(params[k])[off])
        assert np.all(np.asarray(got[k])[~off] != np.asarray(params[k])[~off])
    np.testing.assert_array_equal(got["b"], params["b"])  # not a target: frozen
    assert isinstance(state, DiabloState)
    adam = state.inner_state[0]
    block_size = 6 * 9 // 3 + 2 * 3 * 6 // 3
    assert _size(adam.mu) == _size(adam.nu) == block_size
    assert adam.mu["w"].shape == (1, 3, 2, 3) and adam.mu["k"].shape == (2, 3, 1, 2)


def test_diablo_zero_gradients_leave_the_model_unchanged():
    params = _tree(2, DIABLO_SHAPES)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = diablo(optax.adam(0.1), 3)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0)


def test_diablo_targets_and_matrix_spec_for_conv_kernels():
    params = {"conv": jnp.ones((3, 3, 2, 6)), "w": jnp.ones((4, 4))}
    spec = MatrixSpec(rows=(0, 1, 2), cols=3)  # (18, 6) matrices
    tx = diablo(optax.sgd(1.0), 2, targets=select("conv"), spec=spec)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    mats = np.asarray(updates["conv"]).reshape(18, 6)
    np.testing.assert_array_equal(mats, -_block_mask((18, 6), 2).astype(np.float32))
    np.testing.assert_array_equal(updates["w"], 0.0)


def test_diablo_keeps_bf16_and_handles_none_leaves():
    params = {"w": jnp.ones((4, 4), jnp.bfloat16), "none": None}
    tx = diablo(optax.adam(0.1), 4)
    grads = {"w": jnp.ones((4, 4), jnp.bfloat16), "none": None}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16 and updates["none"] is None
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32) != 0, np.eye(4, dtype=bool))


@settings(max_examples=5, deadline=None)
@given(
    batch=st.integers(1, 3),
    n_blocks=st.integers(1, 4),
    bm=st.integers(1, 3),
    bn=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_diablo_update_is_the_block_diagonal_part(batch, n_blocks, bm, bn, seed):
    shape = (batch, n_blocks * bm, n_blocks * bn)
    g = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    tx = diablo(optax.sgd(1.0), n_blocks)
    updates, _ = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros(shape)}))
    np.testing.assert_array_equal(
        np.asarray(updates["w"]), np.where(_block_mask(shape, n_blocks), -g, 0.0)
    )


def test_diablo_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"num_blocks=3 must divide both"):
        diablo(optax.sgd(1.0), 3).init({"w": jnp.ones((6, 4))})
    with pytest.raises(ValueError, match=r"num_blocks=\.\.\.\) must be >= 1"):
        diablo(optax.sgd(1.0), 0)
    with pytest.raises(TypeError, match=r"num_blocks=\.\.\.\) must be an int"):
        diablo(optax.sgd(1.0), 2.0)
    with pytest.raises(TypeError, match=r"diablo\(spec=\.\.\.\) must be a cljax.MatrixSpec"):
        diablo(optax.sgd(1.0), 2, spec=(0, 1))
    with pytest.raises(TypeError, match=r"diablo\(inner=\.\.\.\) must be an optax"):
        diablo("sgd", 2)
    with pytest.raises(ValueError, match=r"out of range"):
        diablo(optax.sgd(1.0), 2, targets={"b": True}).init({"b": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"`targets` has no entry for leaf 'b'"):
        diablo(optax.sgd(1.0), 2, targets={"w": True}).init(
            {"w": jnp.ones((2, 2)), "b": jnp.ones(4)}
        )


# ---------------------------------------------------------------------------------------------
# SP-13 S²FT.

D, HEADS, HEAD_DIM, FFN, T = 6, 3, 2, 5, 4
BLOCK_SHAPES = {
    "q/kernel": (D, HEADS * HEAD_DIM),
    "q/bias": (HEADS * HEAD_DIM,),
    "k/kernel": (D, HEADS * HEAD_DIM),
    "k/bias": (HEADS * HEAD_DIM,),
    "v/kernel": (D, HEADS * HEAD_DIM),
    "v/bias": (HEADS * HEAD_DIM,),
    "o/kernel": (HEADS * HEAD_DIM, D),
    "o/bias": (D,),
    "up/kernel": (D, FFN),
    "gate/kernel": (D, FFN),
    "gate/scale": (FFN,),
    "down/kernel": (FFN, D),
}


def _block_params(seed, batch=()):
    rng = np.random.default_rng(seed)
    flat = {k: rng.standard_normal(batch + s) * 0.5 for k, s in BLOCK_SHAPES.items()}
    tree = {}
    for k, v in flat.items():
        outer, inner = k.split("/")
        tree.setdefault(outer, {})[inner] = jnp.asarray(v, jnp.float32)
    return tree


def _block_groups(batch_ndim=0, heads=1, channels=2):
    attention = S2ftGroup(
        coupled=tuple((f"{m}/{p}", -1) for m in "qkv" for p in ("kernel", "bias"))
        + (("o/kernel", -2),),
        trained=("o/kernel",),
        num_selected=heads,
        unit_size=HEAD_DIM,
        batch_ndim=batch_ndim,
    )
    ffn = S2ftGroup(
        coupled=(("up/kernel", -1), ("gate/kernel", -1), ("gate/scale", -1), ("down/kernel", -2)),
        trained=("down/kernel",),
        num_selected=channels,
        batch_ndim=batch_ndim,
    )
    return (attention, ffn)


def _np_block(params, x):
    """One transformer block (multi-head attention + gated FFN, residuals), float64 NumPy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    proj = lambda m: (x @ p[m]["kernel"] + p[m]["bias"]).reshape(T, HEADS, HEAD_DIM)
    q, k, v = proj("q"), proj("k"), proj("v")
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(HEAD_DIM)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    heads = np.einsum("hts,shd->thd", attn, v).reshape(T, HEADS * HEAD_DIM)
    h = x + heads @ p["o"]["kernel"] + p["o"]["bias"]
    gate = h @ p["gate"]["kernel"] * p["gate"]["scale"]
    ffn = (gate / (1 + np.exp(-gate))) * (h @ p["up"]["kernel"])
    return h + ffn @ p["down"]["kernel"]


def test_s2ft_co_permutation_leaves_the_block_function_unchanged():
    params = _block_params(0)
    groups = _block_groups()
    perms = s2ft_permutations(params, groups, key=jax.random.key(3))
    assert all(not np.array_equal(p, np.arange(p.shape[-1])) for p in perms)  # a real reordering
    permuted = s2ft_permute(params, groups, perms)
    x = np.random.default_rng(1).standard_normal((T, D))
    np.testing.assert_allclose(_np_block(permuted, x), _np_block(params, x), atol=1e-5)
    assert np.abs(np.asarray(permuted["o"]["kernel"]) - np.asarray(params["o"]["kernel"])).max() > 0
    back = s2ft_permute(permuted, groups, perms, inverse=True)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_s2ft_permute_moves_whole_units():
    params = _block_params(1)
    groups = _block_groups()
    perms = s2ft_permutations(params, groups, key=jax.random.key(0))
    permuted = s2ft_permute(params, groups, perms)
    heads, channels = np.asarray(perms[0]), np.asarray(perms[1])
    o = np.asarray(params["o"]["kernel"]).reshape(HEADS, HEAD_DIM, D)
    np.testing.assert_array_equal(
        np.asarray(permuted["o"]["kernel"]).reshape(HEADS, HEAD_DIM, D), o[heads]
    )
    np.testing.assert_array_equal(
        permuted["gate"]["scale"], np.asarray(params["gate"]["scale"])[channels]
    )


def _slice_reference(params, grads_seq, groups):
    sizes = {}
    for g in groups:
        for path in g.trained:
            axis = dict(g.coupled)[path]
            sizes[path] = (axis, g.num_selected * g.unit_size)
    flat_p = {f"{a}/{b}": v for a, sub in params.items() for b, v in sub.items()}
    flat_g = [{f"{a}/{b}": v for a, sub in g.items() for b, v in sub.items()} for g in grads_seq]

    def gather(k, x):
        if k not in sizes:
            return np.zeros((0,))
        axis, size = sizes[k]
        return np.take(x, np.arange(size), axis=axis)

    def scatter(k, x, view):
        if k not in sizes:
            return x
        axis, size = sizes[k]
        x = np.moveaxis(x.copy(), axis, 0)
        x[:size] = np.moveaxis(view, axis, 0)
        return np.moveaxis(x, 0, axis)

    return _np_adamw_on(flat_p, flat_g, gather, scatter)


def test_s2ft_matches_numpy_sliced_adamw_and_keeps_state_to_the_slices():
    groups = _block_groups(heads=2, channels=3)
    params = _block_params(2)
    grads_seq = [_block_params(30 + i) for i in range(3)]
    tx = s2ft(_adamw(), groups)
    got, state = _run(tx, params, grads_seq)
    want = _slice_reference(params, grads_seq, groups)
    got_flat = {f"{a}/{b}": v for a, sub in got.items() for b, v in sub.items()}
    assert_trees_close(got_flat, want, rtol=1e-5, atol=1e-6)
    assert isinstance(state, S2ftState)
    mu = state.inner_state[0].mu
    assert mu["o"]["kernel"].shape == (2 * HEAD_DIM, D) and mu["down"]["kernel"].shape == (3, D)
    assert _size(mu) == 2 * HEAD_DIM * D + 3 * D


def test_s2ft_end_to_end_changes_only_the_selected_units_in_the_original_layout():
    batch = (2,)  # two stacked layers, each with its own selection
    groups = _block_groups(batch_ndim=1, heads=1, channels=2)
    base = _block_params(4, batch)
    perms = s2ft_permutations(base, groups, key=jax.random.key(7))
    tx = s2ft(optax.adam(0.1), groups)
    tuned, _ = _run(
        tx, s2ft_permute(base, groups, perms), [_block_params(40 + i, batch) for i in range(2)]
    )
    tuned = s2ft_permute(tuned, groups, perms, inverse=True)
    delta = jax.tree.map(
        lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), tuned, base
    )
    for name in BLOCK_SHAPES:
        outer, inner = name.split("/")
        if name not in ("o/kernel", "down/kernel"):
            np.testing.assert_array_equal(delta[outer][inner], 0.0, err_msg=name)
    # The adapter: the selected units' rows, at their original indices, reproduce the tuned model.
    for (path, unit), perm in zip((("o", HEAD_DIM), ("down", 1)), perms, strict=True):
        k = 1 if path == "o" else 2
        d = delta[path]["kernel"].reshape(2, -1, unit, D)
        for layer in range(2):
            chosen = np.asarray(perm[layer, :k])
            rest = np.setdiff1d(np.arange(d.shape[1]), chosen)
            assert np.all(np.abs(d[layer, chosen]) > 0)
            np.testing.assert_array_equal(d[layer, rest], 0.0)
            adapter = d[layer, chosen]
            rebuilt = (
                np.asarray(base[path]["kernel"][layer], np.float64).reshape(-1, unit, D).copy()
            )
            rebuilt[chosen] += adapter
            np.testing.assert_allclose(
                rebuilt.reshape(-1, D),
                np.asarray(tuned[path]["kernel"][layer], np.float64),
                atol=1e-6,
            )


def test_s2ft_permutations_by_scores_and_key_are_deterministic():
    params = _block_params(0, (2,))
    groups = _block_groups(batch_ndim=1)
    scores = [
        jnp.asarray([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2]]),
        jnp.asarray(np.arange(10.0).reshape(2, 5)),
    ]
    heads, channels = s2ft_permutations(params, groups, scores=scores)
    np.testing.assert_array_equal(heads, [[1, 2, 0], [0, 1, 2]])
    np.testing.assert_array_equal(channels, [[4, 3, 2, 1, 0]] * 2)
    a = s2ft_permutations(params, groups, key=jax.random.key(5))
    b = s2ft_permutations(params, groups, key=jax.random.key(5))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(
            np.sort(np.asarray(x), axis=-1), np.broadcast_to(np.arange(x.shape[-1]), x.shape)
        )


@settings(max_examples=5, deadline=None)
@given(
    units=st.integers(1, 6),
    unit_size=st.integers(1, 3),
    other=st.integers(1, 3),
    axis=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_s2ft_permute_is_a_bijection_on_units(units, unit_size, other, axis, seed):
    shape = (units * unit_size, other) if axis == 0 else (other, units * unit_size)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
    group = S2ftGroup(coupled=(("w", axis),), trained=("w",), num_selected=1, unit_size=unit_size)
    perms = s2ft_permutations({"w": x}, group, key=jax.random.key(seed))
    y = s2ft_permute({"w": x}, group, perms)["w"]
    blocks = np.moveaxis(np.asarray(x), axis, 0).reshape(units, unit_size, other)
    np.testing.assert_array_equal(
        np.moveaxis(np.asarray(y), axis, 0).reshape(units, unit_size, other),
        blocks[np.asarray(perms[0])],
    )
    np.testing.assert_array_equal(s2ft_permute({"w": y}, group, perms, inverse=True)["w"], x)


def test_s2ft_rejects_bad_groups_and_inputs():
    tx = optax.sgd(1.0)
    g = S2ftGroup(coupled=(("w", 0),), trained=("w",), num_selected=1)
    params = {"w": jnp.ones((4, 2)), "b": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"must be an S2ftGroup or a non-empty sequence"):
        s2ft(tx, ())
    with pytest.raises(TypeError, match=r"entry 0 must be an S2ftGroup"):
        s2ft(tx, [("w", 0)])
    with pytest.raises(ValueError, match=r"entry 0 has no coupled tensors"):
        s2ft(tx, g._replace(coupled=()))
    with pytest.raises(TypeError, match=r"coupled entries must be \(path str, axis int\)"):
        s2ft(tx, g._replace(coupled=(("w", 0.0),)))
    with pytest.raises(ValueError, match=r"a path appears twice"):
        s2ft(tx, g._replace(coupled=(("w", 0), ("w", 1))))
    with pytest.raises(ValueError, match=r"trained path 'b' is not among its coupled paths"):
        s2ft(tx, g._replace(trained=("b",)))
    with pytest.raises(ValueError, match=r"path 'w' is trained by two groups"):
        s2ft(tx, [g, g])
    with pytest.raises(ValueError, match=r"groups\[0\].num_selected=\.\.\.\) must be >= 1"):
        s2ft(tx, g._replace(num_selected=0))
    with pytest.raises(ValueError, match=r"group 0 names leaf 'x', which is not in the tree"):
        s2ft_permute(params, g._replace(coupled=(("w", 0), ("x", 0))), [jnp.arange(4)])
    with pytest.raises(ValueError, match=r"must be a non-batch axis \(batch_ndim=1\)"):
        s2ft(tx, g._replace(batch_ndim=1)).init(params)
    with pytest.raises(ValueError, match=r"not a multiple of unit_size=3"):
        s2ft(tx, g._replace(unit_size=3)).init(params)
    with pytest.raises(ValueError, match=r"group 0 needs batch shape \(\) and 4 units"):
        s2ft(tx, g._replace(coupled=(("w", 0), ("b", 0)))).init(params)
    with pytest.raises(ValueError, match=r"selects num_selected=5 units but its tensors have 4"):
        s2ft(tx, g._replace(num_selected=5)).init(params)
    with pytest.raises(ValueError, match=r"exactly one of `key`"):
        s2ft_permutations(params, g)
    with pytest.raises(ValueError, match=r"got 2 score arrays for 1 groups"):
        s2ft_permutations(params, g, scores=[jnp.ones(4)] * 2)
    with pytest.raises(ValueError, match=r"scores\[0\] has shape \(3,\); group 0 needs \(4,\)"):
        s2ft_permutations(params, g, scores=[jnp.ones(3)])
    with pytest.raises(ValueError, match=r"got 2 permutations for 1 groups"):
        s2ft_permute(params, g, [jnp.arange(4)] * 2)
    with pytest.raises(ValueError, match=r"permutations\[0\] has shape \(3,\)"):
        s2ft_permute(params, g, [jnp.arange(3)])
    other = S2ftGroup(coupled=(("w", 1),), trained=(), num_selected=1)
    with pytest.raises(ValueError, match=r"leaf 'w' belongs to two groups"):
        s2ft_permute(params, [g, other], [jnp.arange(4), jnp.arange(2)])


def test_plain_gradient_transformations_get_extra_args_dropped():
    plain = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda u, s, p=None: (u, s))
    params = {"w": jnp.ones((2, 2))}
    for tx in (
        diablo(plain, 2),
        s2ft(plain, S2ftGroup(coupled=(("w", 0),), trained=("w",), num_selected=1)),
    ):
        updates, _ = tx.update(params, tx.init(params), params, unknown_extra=1)
        assert updates["w"].shape == (2, 2)
