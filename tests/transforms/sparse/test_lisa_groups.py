"""Tests for LISA (SP-04) over unstacked layers: `cljax.lisa(inner, layer_list=...)`.

References: Adam written plainly in NumPy float64 over the slots of the active layers (the
card's rule, moments zeroed when a slot's layer changes), `optax.adam` / `optax.adamw` for
``num_active = N_L``, and `cljax.lisa(layers=...)` on the stacked copy of the same parameters
with the same seed (updates and whole state equal to float rounding, zeros exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

N_LAYERS = 5
LAYER = {"w": (3, 2), "b": (2,), "norm": {"scale": (3,)}}
OUTSIDE = {"embed": (4, 3), "head": (3, 4)}


def _arrays(shapes, rng, dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s), dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _tree(seed, *, container=list, n_layers=N_LAYERS, dtype=jnp.float32):
    """Unstacked params: ``blocks`` is a list (or tuple, or dict ``{0: ..., 1: ...}``) of
    identically structured layers."""
    rng = np.random.default_rng(seed)
    blocks = [_arrays(LAYER, rng, dtype) for _ in range(n_layers)]
    if container is dict:
        blocks = dict(enumerate(blocks))
    else:
        blocks = container(blocks)
    return {**_arrays(OUTSIDE, rng, dtype), "blocks": blocks}


def _children(blocks):
    return [blocks[i] for i in range(len(blocks))]


def _stacked(tree):
    """The stacked copy: ``blocks`` becomes one layer tree of ``(N_L, ...)`` leaves."""
    layers = _children(tree["blocks"])
    return {**tree, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def _np(x):
    return np.asarray(x, np.float64)


_STEP_CACHE: dict = {}


def _step(tx):
    if tx not in _STEP_CACHE:
        _STEP_CACHE[tx] = jax.jit(tx.update)
    return _STEP_CACHE[tx]


# One transform per configuration, shared by the tests (one compilation each).
LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8
TX_LIST = cljax.lisa(
    optax.adam(LR, B1, B2, EPS), layer_list="blocks", num_active=2, interval=3, seed=4
)


@pytest.mark.parametrize(
    "container",
    [list, pytest.param(tuple, marks=pytest.mark.slow), pytest.param(dict, marks=pytest.mark.slow)],
)
def test_layer_list_equals_stacked_lisa_on_the_stacked_copy(container):
    inner = optax.adamw(0.05, weight_decay=0.1)  # uses params: gathered params checked too
    tx_list = cljax.lisa(inner, layer_list="blocks", num_active=2, interval=2, seed=7)
    tx_stack = cljax.lisa(inner, layers=cljax.select("blocks"), num_active=2, interval=2, seed=7)
    params = _tree(0, container=container)
    params_s = _stacked(params)
    state, state_s = tx_list.init(params), tx_stack.init(params_s)
    assert_trees_equal(state, state_s)
    step, step_s = jax.jit(tx_list.update), jax.jit(tx_stack.update)
    actives = set()
    for t in range(8):
        grads = _tree(100 + t, container=container)
        updates, state = step(grads, state, params)
        updates_s, state_s = step_s(_stacked(grads), state_s, params_s)
        assert type(updates["blocks"]) is container
        # Two compiled programs: equal up to float rounding; zeros (inactive layers) exactly.
        assert_trees_close(_stacked(updates), updates_s, rtol=1e-6, atol=0, err=f"step {t}")
        assert_trees_close(state, state_s, rtol=1e-6, atol=0, err=f"step {t}")
        actives.add(tuple(np.asarray(state.active).tolist()))
        params = optax.apply_updates(params, updates)
        params_s = optax.apply_updates(params_s, updates_s)
    assert len(actives) > 1  # the active set changed, with one compiled step


def _numpy_lisa(params, grads_seq, actives):
    """The card's rule in float64: Adam on the active layers' slots and the always-on leaves,
    zero updates elsewhere, a slot's moments zeroed when its layer changes."""
    outside = {k: _np(params[k]) for k in OUTSIDE}
    roles = {k: None for k in ("w", "b", "scale")}
    m = {k: np.zeros_like(v) for k, v in outside.items()}
    v = {k: np.zeros_like(x) for k, x in outside.items()}
    slot_m, slot_v, prev = {}, {}, None
    out = []
    for t, (grads, active) in enumerate(zip(grads_seq, actives, strict=True), start=1):
        layers = _children(grads["blocks"])
        flat = [
            {"w": _np(g["w"]), "b": _np(g["b"]), "scale": _np(g["norm"]["scale"])} for g in layers
        ]
        if prev is None:
            slot_m = {r: np.zeros((len(active),) + flat[0][r].shape) for r in roles}
            slot_v = {r: np.zeros_like(slot_m[r]) for r in roles}
        else:
            for s, (a, b) in enumerate(zip(prev, active, strict=True)):
                if a != b:
                    for r in roles:
                        slot_m[r][s] = 0.0
                        slot_v[r][s] = 0.0
        prev = active

        def adam(g, m_, v_, t=t):
            m_ = B1 * m_ + (1 - B1) * g
            v_ = B2 * v_ + (1 - B2) * g * g
            mhat, vhat = m_ / (1 - B1**t), v_ / (1 - B2**t)
            return -LR * mhat / (np.sqrt(vhat) + EPS), m_, v_

        step = {}
        for k in OUTSIDE:
            step[k], m[k], v[k] = adam(_np(grads[k]), m[k], v[k])
        layer_updates = [{r: np.zeros_like(flat[0][r]) for r in roles} for _ in layers]
        for r in roles:
            g = np.stack([flat[a][r] for a in active])
            u, slot_m[r], slot_v[r] = adam(g, slot_m[r], slot_v[r])
            for s, a in enumerate(active):
                layer_updates[a][r] = u[s]
        step["blocks"] = layer_updates
        out.append(step)
    return out


def test_layer_list_matches_a_numpy_adam_on_the_active_slots():
    params = _tree(1)
    state = TX_LIST.init(params)
    grads_seq = [_tree(200 + t) for t in range(9)]
    got, actives = [], []
    for grads in grads_seq:
        updates, state = _step(TX_LIST)(grads, state, params)
        got.append(updates)
        actives.append(tuple(np.asarray(state.active).tolist()))
    assert len(set(actives)) > 1
    want = _numpy_lisa(params, grads_seq, actives)
    for t, (u, w) in enumerate(zip(got, want, strict=True)):
        for k in OUTSIDE:
            np.testing.assert_allclose(_np(u[k]), w[k], rtol=1e-5, atol=1e-7, err_msg=f"{t} {k}")
        for i, layer in enumerate(u["blocks"]):
            flat = {"w": layer["w"], "b": layer["b"], "scale": layer["norm"]["scale"]}
            for r, x in flat.items():
                np.testing.assert_allclose(
                    _np(x), w["blocks"][i][r], rtol=1e-5, atol=1e-7, err_msg=f"{t} {i} {r}"
                )


def test_layer_list_period_invariants():
    """Exactly `num_active` layers change per period, the others bit-identical; the always-on
    leaves change every step; the active set is constant within a period; the inner state is
    ``(num_active, ...)``."""
    params = _tree(2)
    state = TX_LIST.init(params)
    mu = cljax.find_state(state, optax.ScaleByAdamState).mu
    assert mu["blocks"]["w"].shape == (2, 3, 2)
    assert mu["blocks"]["norm"]["scale"].shape == (2, 3)
    assert mu["embed"].shape == OUTSIDE["embed"]
    seen = []
    for period in range(4):
        start = params
        for i in range(3):
            before = params
            updates, state = _step(TX_LIST)(_tree(300 + 3 * period + i), state, params)
            if i == 0:
                active = tuple(np.asarray(state.active).tolist())
                assert len(set(active)) == 2 and list(active) == sorted(active)
            assert tuple(np.asarray(state.active).tolist()) == active
            params = optax.apply_updates(params, updates)
            for k in OUTSIDE:
                assert not np.array_equal(params[k], before[k]), (period, i, k)
            for layer in range(N_LAYERS):
                if layer not in active:
                    assert_trees_equal(
                        updates["blocks"][layer],
                        jax.tree.map(jnp.zeros_like, updates["blocks"][layer]),
                    )
        changed = [
            layer
            for layer in range(N_LAYERS)
            if not all(
                np.array_equal(a, b)
                for a, b in zip(
                    jax.tree.leaves(params["blocks"][layer]),
                    jax.tree.leaves(start["blocks"][layer]),
                    strict=True,
                )
            )
        ]
        assert changed == list(active), period
        seen.append(active)
    assert len(set(seen)) > 1


def test_layer_list_all_layers_equals_plain_optax():
    params = _tree(3, container=dict)
    grads_seq = [_tree(400 + t, container=dict) for t in range(5)]
    for inner in (optax.adam(0.05), optax.adamw(0.05, weight_decay=0.1)):
        tx = cljax.lisa(inner, layer_list="blocks", num_active=N_LAYERS, interval=2)
        got, want = params, params
        state, ref_state = tx.init(params), inner.init(params)
        for grads in grads_seq:
            updates, state = tx.update(grads, state, got)
            ref_updates, ref_state = inner.update(grads, ref_state, want)
            assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-8)
            got = optax.apply_updates(got, updates)
            want = optax.apply_updates(want, ref_updates)


def test_layer_list_is_one_compiled_step():
    params = _tree(4)
    traces = []

    @jax.jit
    def train(params, state, grads):
        traces.append(None)  # runs only while tracing
        updates, state = TX_LIST.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = TX_LIST.init(params)
    actives = set()
    for t in range(7):
        params, state = train(params, state, _tree(500 + t))
        actives.add(tuple(np.asarray(state.active).tolist()))
    assert len(actives) > 1 and len(traces) == 1


def test_layer_list_draws_layers_uniformly():
    params = _tree(5, n_layers=4)
    tx = cljax.lisa(optax.sgd(0.1), layer_list="blocks", num_active=2, interval=1, seed=3)
    step = jax.jit(tx.update)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    counts = np.zeros(4)
    for _ in range(200):
        updates, state = step(grads, state, params)
        nonzero = [bool(np.any(np.asarray(updates["blocks"][i]["w"]))) for i in range(4)]
        assert sum(nonzero) == 2
        counts += nonzero
    # Each layer is active with probability 1/2: 100 of 200 expected, sd ~7.
    assert np.all(np.abs(counts - 100) < 35), counts


def test_layer_list_state_reset_on_new_layers():
    tx = cljax.lisa(optax.adam(0.05, b1=0.9), layer_list="blocks", num_active=2, interval=2, seed=0)
    params = _tree(6)
    state = tx.init(params)
    step = jax.jit(tx.update)
    fresh = 0
    for t in range(10):
        before = np.asarray(state.active)
        mu_before = _np(cljax.find_state(state, optax.ScaleByAdamState).mu["blocks"]["w"])
        grads = _tree(600 + t)
        _, state = step(grads, state, params)
        after = np.asarray(state.active)
        mu = _np(cljax.find_state(state, optax.ScaleByAdamState).mu["blocks"]["w"])
        for slot in range(2):
            moved = before[slot] != after[slot]
            fresh += int(moved)
            history = 0.0 if moved else mu_before[slot]
            np.testing.assert_allclose(
                mu[slot],
                0.9 * history + 0.1 * _np(grads["blocks"][after[slot]]["w"]),
                rtol=1e-5,
                atol=1e-7,
            )
    assert fresh > 0


@pytest.mark.slow
def test_layer_list_on_a_tiny_llama():
    """The experiments' `TinyLlama` (``params["blocks"]`` from an `nnx.List`) trains with
    ``layer_list="blocks"`` exactly as the stacked copy does."""
    from flax import nnx

    from cljax.experiments.models import TinyLlama, functional

    model = TinyLlama(11, dim=8, depth=3, heads=2, hidden=8, rngs=nnx.Rngs(0))
    params = functional(model).params
    tx_list = cljax.lisa(optax.adam(1e-2), layer_list="blocks", num_active=1, interval=1, seed=1)
    tx_stack = cljax.lisa(
        optax.adam(1e-2), layers=cljax.select("^blocks"), num_active=1, interval=1, seed=1
    )
    state, state_s = tx_list.init(params), tx_stack.init(_stacked(params))
    assert cljax.find_state(state, optax.ScaleByAdamState).mu["blocks"]["wq"]["kernel"].shape == (
        1,
        8,
        8,
    )
    for t in range(3):
        grads = jax.tree.map(lambda p, t=t: jnp.full_like(p, 0.1 * (t + 1)), params)
        updates, state = tx_list.update(grads, state, params)
        updates_s, state_s = tx_stack.update(_stacked(grads), state_s, _stacked(params))
        assert_trees_close(_stacked(updates), updates_s, rtol=1e-6, atol=0)
        assert_trees_close(state, state_s, rtol=1e-6, atol=0)

    # The same through `nnx.Optimizer` on the NNX state (``blocks`` an `nnx.List`).
    opt = nnx.Optimizer(model, tx_list, wrt=nnx.Param)
    mu = cljax.find_state(opt.opt_state, optax.ScaleByAdamState).mu
    assert mu["blocks"]["wq"]["kernel"].shape == (1, 8, 8)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = nnx.grad(lambda m: (m(jnp.arange(4)[None]) ** 2).mean())(model)
    opt.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    changed = [
        i
        for i in range(3)
        if not all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(after["blocks"][i]),
                jax.tree.leaves(before["blocks"][i]),
                strict=True,
            )
        )
    ]
    assert len(changed) == 1
    assert not np.array_equal(after["embed"]["embedding"], before["embed"]["embedding"])


def test_layer_list_without_the_node_trains_every_leaf():
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
    grads = {"a": jnp.full((3,), 0.5), "b": jnp.full((2, 2), -1.0)}
    tx = cljax.lisa(optax.sgd(0.1), layer_list="blocks", num_active=1)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, grads))


def test_layer_list_root_and_single_leaf_layers():
    """``layer_list=""``: the params are the list; each layer may be a single array."""
    params = [jnp.full((2, 3), float(i)) for i in range(4)]
    tx = cljax.lisa(optax.sgd(1.0), layer_list="", num_active=3, interval=1)
    updates, state = tx.update([jnp.ones((2, 3))] * 4, tx.init(params), params)
    active = np.asarray(state.active).tolist()
    for i, u in enumerate(updates):
        np.testing.assert_array_equal(np.asarray(u), -1.0 if i in active else 0.0)


@settings(max_examples=5, deadline=None)
@given(
    n_layers=st.integers(1, 4),
    data=st.data(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    scale=st.sampled_from([0.0, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_layer_list_properties(n_layers, data, dtype, scale, seed):
    """Any size and dtype: dtypes kept, finite output (zero and huge gradients), exactly
    `num_active` layers receive nonzero updates from nonzero gradients."""
    num_active = data.draw(st.integers(1, n_layers))
    params = _tree(seed, n_layers=n_layers, dtype=dtype)
    grads = jax.tree.map(lambda p: jnp.full_like(p, scale), params)
    tx = cljax.lisa(
        optax.adam(0.1), layer_list="blocks", num_active=num_active, interval=1, seed=seed
    )
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
            assert u.dtype == p.dtype and u.shape == p.shape
            assert np.all(np.isfinite(np.asarray(u, np.float32)))
        moved = [
            any(np.any(np.asarray(x, np.float32)) for x in jax.tree.leaves(layer))
            for layer in updates["blocks"]
        ]
        assert sum(moved) == (num_active if scale else 0)
    assert cljax.find_state(state, optax.ScaleByAdamState).nu["blocks"]["w"].shape == (
        num_active,
        3,
        2,
    )


def test_layer_list_errors():
    params = _tree(7)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="exactly one of `layers`"):
        cljax.lisa(sgd, layers=cljax.select("blocks"), layer_list="blocks")
    with pytest.raises(ValueError, match="exactly one of `layers`"):
        cljax.lisa(sgd)
    with pytest.raises(TypeError, match=r"layer_list=...\) must be a path string"):
        cljax.lisa(sgd, layer_list=["blocks"])
    with pytest.raises(ValueError, match=r"layer_list='embed'\) names a leaf of shape \(4, 3\)"):
        cljax.lisa(sgd, layer_list="embed").init(params)
    with pytest.raises(ValueError, match="num_active=6"):
        cljax.lisa(sgd, layer_list="blocks", num_active=6).init(params)
    bad = _tree(7)
    bad["blocks"][3] = {**bad["blocks"][3], "w": jnp.ones((2, 3))}
    with pytest.raises(
        ValueError, match=r"leaf 'blocks/3/w' has shape \(2, 3\) .* 'blocks/0/w' has \(3, 2\)"
    ):
        cljax.lisa(sgd, layer_list="blocks").init(bad)
    bad = _tree(7)
    bad["blocks"][1] = {**bad["blocks"][1], "b": bad["blocks"][1]["b"].astype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="leaf 'blocks/1/b' .* dtype bfloat16"):
        cljax.lisa(sgd, layer_list="blocks").init(bad)
    bad = _tree(7)
    bad["blocks"][2] = {"w": bad["blocks"][2]["w"]}
    with pytest.raises(
        ValueError, match=r"layer 'blocks/2' has leaves \['w'\] but layer 'blocks/0'"
    ):
        cljax.lisa(sgd, layer_list="blocks").init(bad)
    shared = [{"x": jnp.ones(2)}, {"x": jnp.ones(2)}]
    with pytest.raises(ValueError, match="occurs 2 times"):
        cljax.lisa(sgd, layer_list="a", num_active=1).init({"a": shared, "b": shared})


def test_layer_list_in_partition_and_with_none_leaves():
    """Leaves frozen by `optax.partition` (MaskedNode inside every layer) allocate no state and
    get zero updates; None leaves stay None."""
    params = _tree(8, n_layers=3)
    for layer in params["blocks"]:
        layer["b"] = None
    labels = cljax.label_by_path({"frozen": "norm"}, default="train")
    lisa = cljax.lisa(optax.adam(0.1), layer_list="blocks", num_active=1, interval=1, seed=2)
    tx = optax.partition({"train": lisa, "frozen": optax.set_to_zero()}, labels)
    state = tx.init(params)
    mu = cljax.find_state(state, optax.ScaleByAdamState).mu
    assert isinstance(mu["blocks"]["norm"]["scale"], optax.MaskedNode)
    assert mu["blocks"]["w"].shape == (1, 3, 2) and mu["blocks"]["b"] is None
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
        active = int(cljax.find_state(state, cljax.LisaState).active[0])
        for i, layer in enumerate(updates["blocks"]):
            assert layer["b"] is None
            assert not np.any(np.asarray(layer["norm"]["scale"]))
            assert bool(np.all(np.asarray(layer["w"]) != 0)) == (i == active)


@pytest.mark.slow
def test_layer_list_sharded_jit_equals_one_device():
    """Parameters sharded on a 4 x 2 mesh, state placed by `cljax.state_shardings`."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    params = {
        "embed": jnp.asarray(np.random.default_rng(9).standard_normal((8, 4)), jnp.float32),
        "blocks": [
            {"w": jnp.full((8, 4), 0.1 * i), "b": jnp.full((4,), -0.1 * i)} for i in range(3)
        ],
    }
    shardings = jax.tree.map(
        lambda p: NamedSharding(mesh, P("data", "model") if p.ndim == 2 else P("model")), params
    )
    tx = cljax.lisa(
        optax.adamw(0.1, weight_decay=0.1), layer_list="blocks", num_active=2, interval=1
    )
    step = jax.jit(tx.update)
    sharded = jax.device_put(params, shardings)
    state = jax.jit(tx.init, out_shardings=cljax.state_shardings(tx, params, shardings))(sharded)
    plain, plain_state = params, tx.init(params)
    for t in range(3):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p + t), params)
        updates, state = step(jax.device_put(grads, shardings), state, sharded)
        sharded = optax.apply_updates(sharded, updates)
        plain_updates, plain_state = step(grads, plain_state, plain)
        plain = optax.apply_updates(plain, plain_updates)
    assert_trees_close(sharded, plain, rtol=1e-6, atol=1e-7)
    assert_trees_close(state, plain_state, rtol=1e-6, atol=1e-7)


def test_layer_list_empty_or_masked_out_node_has_no_layers():
    lisa = cljax.lisa(optax.sgd(1.0), layer_list="blocks", num_active=1)
    params = {"a": jnp.ones(2), "blocks": []}
    updates, _ = lisa.update({"a": jnp.ones(2), "blocks": []}, lisa.init(params), params)
    np.testing.assert_array_equal(updates["a"], -1.0)
    params = _tree(10, n_layers=2)
    tx = optax.masked(lisa, {"embed": True, "head": True, "blocks": False})
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["embed"], -1.0)
    assert_trees_equal(updates["blocks"], grads["blocks"])  # optax.masked passes them through
