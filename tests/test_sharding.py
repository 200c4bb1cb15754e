"""Tests for `cljax.sharding`: optimizer-state shardings derived from parameter shardings, on 8
simulated CPU devices arranged as a (data=4, model=2) mesh."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cljax
from cljax.sharding import tied_spec
from tests.helpers import assert_trees_close

MESH_SHAPE = {"data": 4, "model": 2}

# Parameter shapes and their specs: a matrix, a stacked (L, m, n) leaf, a vector, a leaf sharded
# over both mesh axes at once, a matrix with a trailing None in its spec, a scalar.
SHAPES = {"w": (8, 6), "k": (2, 8, 6), "b": (6,), "e": (16, 4), "r": (8, 6), "s": ()}
SPECS = {
    "w": P("data", "model"),
    "k": P(None, "data", "model"),
    "b": P("model"),
    "e": P(("data", "model")),
    "r": P("data", None),
    "s": P(),
}


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "conftest.py should give 8 simulated CPU devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


@pytest.fixture(scope="module")
def params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        k: jax.random.normal(key, shape)
        for key, (k, shape) in zip(keys, SHAPES.items(), strict=True)
    }


@pytest.fixture(scope="module")
def param_shardings(mesh):
    return {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}


# ---------------------------------------------------------------------------------------------
# A small test transform with low-rank state: per (m, n) matrix (or (L, m, n) stack) an (m, r)
# left projector and an (n, r) right projector, r = 3 (divides neither mesh axis).

RANK = 3


class _ProjectorState(NamedTuple):
    count: jax.Array
    left: optax.Params  # (..., m, r)
    right: optax.Params  # (..., n, r)


def _projector_transform() -> optax.GradientTransformation:
    def shape(p, axis):
        return (*p.shape[:-2], p.shape[axis], RANK) if p.ndim >= 2 else (1, RANK)

    def init_fn(params):
        return _ProjectorState(
            count=jnp.zeros([], jnp.int32),
            left=jax.tree.map(lambda p: jnp.zeros(shape(p, -2), p.dtype), params),
            right=jax.tree.map(lambda p: jnp.zeros(shape(p, -1), p.dtype), params),
        )

    def update_fn(updates, state, params=None):
        del params
        return updates, state._replace(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def _partition():
    labels = cljax.label_by_path({"frozen": "^b$", "slow": "^k$"}, default="fast")
    return optax.partition(
        {
            "frozen": optax.set_to_zero(),
            "slow": optax.sgd(1e-2, momentum=0.9),
            "fast": optax.adam(1e-3),
        },
        labels,
    )


TRANSFORMS = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3, weight_decay=0.1),
    "chain": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-3)
    ),
    "partition": _partition,
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    "multi_steps": lambda: optax.MultiSteps(
        optax.adam(1e-3), every_k_schedule=2
    ).gradient_transformation(),
    "cwd_adamw": lambda: cljax.cwd_adamw(1e-3, weight_decay=0.1),
    "upgd": lambda: cljax.upgd(1e-3, weight_decay=1e-4),
    "galore": lambda: optax.contrib.galore(learning_rate=1e-3, rank=4),
    "projector": _projector_transform,
}


def _assert_divides(shardings, state):
    """Each spec divides its leaf, and no mesh axis appears twice in one spec."""
    for (path, sharding), leaf in zip(
        jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree.leaves(state), strict=True
    ):
        name = jax.tree_util.keystr(path)
        assert isinstance(sharding, NamedSharding), name
        spec, shape = sharding.spec, leaf.shape
        assert len(spec) <= len(shape), f"{name}: spec {spec} longer than shape {shape}"
        used = []
        for size, entry in zip(shape, spec, strict=False):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            used += axes
            assert size % math.prod(MESH_SHAPE[a] for a in axes) == 0, (
                f"{name}: {spec} does not divide {shape}"
            )
        assert len(used) == len(set(used)), f"{name}: {spec} reuses a mesh axis"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_state_shardings_structure_and_placement(name, mesh, params, param_shardings):
    tx = TRANSFORMS[name]()
    shardings = cljax.state_shardings(tx, params, param_shardings)
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    assert all(s.mesh == mesh for s in jax.tree.leaves(shardings))
    _assert_divides(shardings, abstract)

    state = jax.device_put(tx.init(params), shardings)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)

    jitted = jax.jit(tx.init, out_shardings=shardings)(jax.device_put(params, param_shardings))
    for leaf, sharding in zip(jax.tree.leaves(jitted), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert_trees_close(jitted, tx.init(params))

    # Every scalar (counts, injected hyper-parameters) is replicated.
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        if leaf.ndim == 0:
            assert sharding.spec == P()


@pytest.mark.parametrize(
    "name",
    ["adam", "adamw", "chain", "partition", "inject_hyperparams", "multi_steps", "cwd_adamw"],
)
def test_adam_moments_get_exactly_the_parameter_spec(name, params, param_shardings):
    tx = TRANSFORMS[name]()
    shardings = cljax.state_shardings(tx, params, param_shardings)
    adam = cljax.find_state(shardings, optax.ScaleByAdamState)
    assert adam.count.spec == P()
    trained = {k for k, v in adam.mu.items() if isinstance(v, NamedSharding)}
    assert trained == (set(SHAPES) - {"b", "k"} if name == "partition" else set(SHAPES))
    for moments in (adam.mu, adam.nu):
        for k in trained:
            assert moments[k].spec == SPECS[k], k  # P("data", None) stays as written
    if name == "multi_steps":
        acc = cljax.find_state(shardings, optax.MultiStepsState).acc_grads
        assert {k: v.spec for k, v in acc.items()} == SPECS
    if name == "partition":
        trace = cljax.find_state(shardings, optax.TraceState).trace
        assert trace["k"].spec == SPECS["k"]
        assert jax.tree.leaves(shardings.inner_states["frozen"]) == []  # frozen: no state at all
    if name == "inject_hyperparams":
        injected = cljax.find_state(shardings, optax.InjectStatefulHyperparamsState)
        assert injected.hyperparams["learning_rate"].spec == P()


def test_upgd_state_shardings(params, param_shardings):
    shardings = cljax.state_shardings(cljax.upgd(1e-3), params, param_shardings)
    upgd = cljax.find_state(shardings, cljax.ScaleByUpgdState)
    assert upgd.count.spec == P() and upgd.key.spec == P()  # PRNG key data: replicated
    assert {k: v.spec for k, v in upgd.utility.items()} == SPECS


def test_low_rank_projectors_get_row_spec_and_replicated_rank(params, param_shardings):
    shardings = cljax.state_shardings(_projector_transform(), params, param_shardings)
    assert shardings.count.spec == P()
    # (m, r): the parameter's row spec, rank replicated; (n, r): the column spec.
    assert shardings.left["w"].spec == P("data") and shardings.right["w"].spec == P("model")
    assert shardings.left["r"].spec == P("data") and shardings.right["r"].spec == P()
    # Stacked (L, m, n) parameters: (L, m, r) and (L, n, r).
    assert shardings.left["k"].spec == P(None, "data") and shardings.right["k"].spec == P(
        None, "model"
    )
    assert shardings.left["e"].spec == P(("data", "model")) and shardings.right["e"].spec == P()
    for k in ("b", "s"):  # (1, r) placeholders: nothing to tie
        assert shardings.left[k].spec == P() and shardings.right[k].spec == P()

    galore = cljax.state_shardings(
        optax.contrib.galore(learning_rate=1e-3, rank=4), params, param_shardings
    )
    state = cljax.find_state(galore, optax.contrib.GaLoreState)
    abstract = cljax.find_state(
        jax.eval_shape(optax.contrib.galore(learning_rate=1e-3, rank=4).init, params),
        optax.contrib.GaLoreState,
    )
    assert abstract.projector["w"].shape == (8, 4)
    assert state.projector["w"].spec == P("data")  # row spec, rank axis replicated
    assert abstract.base_optimizer_state.mu["w"].shape == (4, 6)
    assert state.base_optimizer_state.mu["w"].spec == P(None, "model")  # projected (r, n) moment


def test_low_rank_family_state_shardings(params, param_shardings):
    """Per-matrix inner states (``inner/<param path>/mu``) are tied to their parameter too."""
    tx = cljax.scale_by_low_rank_projection(rank=3, refresh_every=2)
    shardings = cljax.state_shardings(tx, params, param_shardings)
    _assert_divides(shardings, jax.eval_shape(tx.init, params))
    state = cljax.find_state(shardings, cljax.ScaleByLowRankProjectionState)
    # 'std' on tall (8, 6): right projector (6, r) with the column spec; moments (8, r), row spec.
    assert state.projector["w"].spec == P("model") and state.inner["w"].mu.spec == P("data")
    assert state.projector["k"].spec == P(None, "model")
    assert state.inner["k"].mu.spec == P(None, "data") and state.inner["k"].nu.spec == P(
        None, "data"
    )
    assert state.inner["e"].mu.spec == P(("data", "model")) and state.projector["e"].spec == P()
    assert state.inner["w"].count.spec == P() and state.key.spec == P()
    assert state.fallback.mu["b"].spec == SPECS["b"]  # 1-D leaves: the fallback's own moments
    dion = cljax.find_state(
        cljax.state_shardings(cljax.scale_by_dion(rank=3), params, param_shardings),
        cljax.ScaleByDionState,
    )
    assert dion.momentum["w"].spec == SPECS["w"] and dion.q["w"].spec == P("model")
    eight_bit = cljax.quantize_state(optax.scale_by_adam(), block_size=8, min_size=8)
    quantized = cljax.state_shardings(eight_bit, params, param_shardings).inner
    assert quantized.mu["w"].codes.spec == SPECS["w"] and quantized.mu["s"].spec == P()


def test_jitted_sharded_low_rank_step_matches_unsharded(params, param_shardings):
    tx = cljax.galore_adamw(1e-2, rank=3, refresh_every=2, weight_decay=0.1)
    shardings = cljax.state_shardings(tx, params, param_shardings)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sharded = jax.jit(
        step,
        in_shardings=(param_shardings, shardings, param_shardings),
        out_shardings=(param_shardings, shardings),
    )
    p_sharded = jax.device_put(params, param_shardings)
    s_sharded = jax.jit(tx.init, out_shardings=shardings)(p_sharded)
    p_plain, s_plain = params, tx.init(params)
    for t in range(3):
        keys = jax.random.split(jax.random.key(200 + t), len(SHAPES))
        grads = {k: jax.random.normal(key, SHAPES[k]) for key, k in zip(keys, SHAPES, strict=True)}
        p_sharded, s_sharded = sharded(p_sharded, s_sharded, jax.device_put(grads, param_shardings))
        p_plain, s_plain = jax.jit(step)(p_plain, s_plain, grads)
    assert_trees_close(p_sharded, p_plain, rtol=1e-5, atol=1e-5)
    state = cljax.find_state(s_sharded, cljax.ScaleByLowRankProjectionState)
    assert state.inner["w"].mu.sharding.spec == P("data")


def test_non_dividing_axes_are_replicated(mesh):
    # Shapes only: (6, 8) cannot be split 4 ways along rows, (12,) not 8 ways.
    params = {
        "w": jax.ShapeDtypeStruct((6, 8), jnp.float32),
        "v": jax.ShapeDtypeStruct((12,), jnp.float32),
    }
    param_shardings = {
        "w": NamedSharding(mesh, P("data", "model")),
        "v": NamedSharding(mesh, P(("data", "model"))),
    }
    tx = optax.adam(1e-3)
    shardings = cljax.state_shardings(tx, params, param_shardings)
    adam = cljax.find_state(shardings, optax.ScaleByAdamState)
    assert adam.mu["w"].spec == P(None, "model")
    assert adam.mu["v"].spec == P()
    concrete = {"w": jnp.zeros((6, 8)), "v": jnp.zeros(12)}
    state = jax.jit(tx.init, out_shardings=shardings)(concrete)
    _assert_divides(shardings, state)


def test_bare_array_params(mesh):
    x = jnp.ones((8, 6))
    tx = optax.adam(1e-3)
    shardings = cljax.state_shardings(tx, x, NamedSharding(mesh, P("data", "model")))
    assert shardings[0].mu.spec == P("data", "model") and shardings[0].nu.spec == P("data", "model")
    assert shardings[0].count.spec == P()
    jax.device_put(tx.init(x), shardings)


def test_params_with_none_leaves(mesh):
    params = {"w": jnp.ones((8, 6)), "frozen": None}
    param_shardings = {"w": NamedSharding(mesh, P("data")), "frozen": None}
    shardings = cljax.state_shardings(optax.adam(1e-3), params, param_shardings)
    assert shardings[0].mu["w"].spec == P("data") and shardings[0].mu["frozen"] is None


@pytest.mark.parametrize("name", ["adamw", "cwd_adamw", "upgd", "projector"])
def test_jitted_sharded_step_matches_unsharded(name, params, param_shardings):
    tx = TRANSFORMS[name]()
    shardings = cljax.state_shardings(tx, params, param_shardings)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sharded_step = jax.jit(
        step,
        in_shardings=(param_shardings, shardings, param_shardings),
        out_shardings=(param_shardings, shardings),
    )
    plain_step = jax.jit(step)

    p_sharded = jax.device_put(params, param_shardings)
    s_sharded = jax.jit(tx.init, out_shardings=shardings)(p_sharded)
    p_plain, s_plain = params, tx.init(params)
    for t in range(3):
        keys = jax.random.split(jax.random.key(100 + t), len(SHAPES))
        grads = {k: jax.random.normal(key, SHAPES[k]) for key, k in zip(keys, SHAPES, strict=True)}
        p_sharded, s_sharded = sharded_step(
            p_sharded, s_sharded, jax.device_put(grads, param_shardings)
        )
        p_plain, s_plain = plain_step(p_plain, s_plain, grads)
    assert_trees_close(p_sharded, p_plain, rtol=1e-5, atol=1e-6)
    assert_trees_close(s_sharded, s_plain, rtol=1e-5, atol=1e-6)
    for leaf, sharding in zip(jax.tree.leaves(s_sharded), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert p_sharded["w"].sharding.spec == SPECS["w"]


# ---------------------------------------------------------------------------------------------
# tied_spec, the per-leaf rule.


def test_tied_spec_same_shape_is_the_parameter_spec():
    spec = P("data", "model")
    assert tied_spec((8, 6), (8, 6), spec, MESH_SHAPE) is spec
    written = P("data", None)
    assert tied_spec((8, 6), (8, 6), written, MESH_SHAPE) is written
    assert tied_spec((8, 6), (8, 6), P("data"), MESH_SHAPE) == P("data")
    assert tied_spec((), (), P(), MESH_SHAPE) == P()
    assert tied_spec((8, 6), (8, 6), P(), MESH_SHAPE) == P()


@pytest.mark.parametrize(
    "state_shape, param_shape, param_spec, expected",
    [
        ((8, 3), (8, 6), P("data", "model"), P("data")),  # (m, r): row spec, rank replicated
        (
            (6, 3),
            (8, 6),
            P("data", "model"),
            P("model"),
        ),  # (n, r): transposed projector, column spec
        ((3, 6), (8, 6), P("data", "model"), P(None, "model")),  # (r, n) projected moment
        ((3, 8), (8, 6), P("data", "model"), P(None, "data")),  # (r, m)
        ((8,), (8, 6), P("data", "model"), P("data")),  # row statistic (Adafactor-like)
        ((6,), (8, 6), P("data", "model"), P("model")),  # column statistic
        ((2, 8, 6), (8, 6), P("data", "model"), P(None, "data", "model")),  # stacked state
        ((2, 8, 3), (2, 8, 6), P(None, "data", "model"), P(None, "data")),  # stacked (L, m, r)
        ((), (8, 6), P("data", "model"), P()),  # a scalar tied to a matrix
        ((5, 7), (8, 6), P("data", "model"), P()),  # nothing in common
    ],
)
def test_tied_spec_projectors_and_statistics(state_shape, param_shape, param_spec, expected):
    assert tied_spec(state_shape, param_shape, param_spec, MESH_SHAPE) == expected


def test_tied_spec_duplicated_sizes():
    spec = P("data", "model")
    # m == n: the same position wins when the ranks agree ...
    assert tied_spec((8, 8), (8, 8), spec, MESH_SHAPE) is spec
    assert tied_spec((8, 3), (8, 8), spec, MESH_SHAPE) == P("data")
    assert tied_spec((3, 8), (8, 8), spec, MESH_SHAPE) == P(None, "model")
    # ... and with a different rank two candidate axes are ambiguous: replicated.
    assert tied_spec((8,), (8, 8), spec, MESH_SHAPE) == P()
    assert tied_spec((2, 8, 3), (8, 8), spec, MESH_SHAPE) == P()


def test_tied_spec_never_reuses_a_mesh_axis():
    spec = P("data", "model")
    assert tied_spec((8, 8), (8, 6), spec, MESH_SHAPE) == P("data")  # second 8 would reuse "data"
    assert tied_spec((6, 6), (8, 6), spec, MESH_SHAPE) == P("model")
    assert tied_spec((6, 8, 6), (8, 6), spec, MESH_SHAPE) == P("model", "data")
    both = P(("data", "model"))
    assert tied_spec((16, 16), (16, 4), both, MESH_SHAPE) == P(("data", "model"))
    assert tied_spec((4, 16, 16), (16, 4), both, MESH_SHAPE) == P(None, ("data", "model"))


def test_tied_spec_tuple_mesh_axes():
    both = P(("data", "model"))
    assert tied_spec((16, 4), (16, 4), both, MESH_SHAPE) is both
    assert tied_spec((16,), (16, 4), both, MESH_SHAPE) == P(("data", "model"))
    assert tied_spec((4, 16), (16, 4), both, MESH_SHAPE) == P(None, ("data", "model"))
    assert tied_spec((16, 2), (16, 4), both, MESH_SHAPE) == P(("data", "model"))
    # A tuple on the second dim, alongside a free first dim.
    assert tied_spec((3, 16), (4, 16), P(None, ("model", "data")), MESH_SHAPE) == P(
        None, ("model", "data")
    )


def test_tied_spec_non_dividing_axes_are_replicated():
    assert tied_spec((6,), (6,), P("data"), MESH_SHAPE) == P()
    assert tied_spec((12,), (12,), P(("data", "model")), MESH_SHAPE) == P()
    assert tied_spec((6, 8), (6, 8), P("data", "model"), MESH_SHAPE) == P(None, "model")
    assert tied_spec((4, 6), (4, 6), P("data", "model"), MESH_SHAPE) == P("data", "model")
    assert tied_spec((4, 6), (4, 6), P("data", "model"), {"data": 4, "model": 4}) == P("data")


# ---------------------------------------------------------------------------------------------
# Errors.


def test_param_shardings_structure_mismatch(params, param_shardings):
    missing = {k: v for k, v in param_shardings.items() if k != "w"}
    with pytest.raises(
        ValueError, match=r"state_shardings: `param_shardings` must have the structure of `params`"
    ):
        cljax.state_shardings(optax.adam(1e-3), params, missing)
    with pytest.raises(
        ValueError, match=r"state_shardings: `param_shardings` must have the structure of `params`"
    ):
        cljax.state_shardings(optax.adam(1e-3), params, list(param_shardings.values()))


def test_param_shardings_must_be_named_shardings(mesh, params, param_shardings):
    bad = dict(param_shardings, k=P("data"))  # a bare PartitionSpec
    with pytest.raises(
        ValueError,
        match=r"state_shardings: leaf 'k' has sharding .*; every parameter needs a NamedSharding",
    ):
        cljax.state_shardings(optax.adam(1e-3), params, bad)
    nested = {"enc": {"w": jnp.ones((8, 6))}, "b": jnp.ones(6)}
    bad = {
        "enc": {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])},
        "b": NamedSharding(mesh, P()),
    }
    with pytest.raises(
        ValueError, match=r"state_shardings: leaf 'enc/w' has sharding SingleDeviceSharding"
    ):
        cljax.state_shardings(optax.adam(1e-3), nested, bad)
    with pytest.raises(ValueError, match=r"state_shardings: leaf '<root>' has sharding None"):
        cljax.state_shardings(optax.adam(1e-3), jnp.ones(3), None)


def test_param_shardings_on_different_meshes(mesh):
    devices = np.array(jax.devices())
    first = Mesh(devices[:4].reshape(2, 2), ("data", "model"))
    second = Mesh(devices[4:].reshape(2, 2), ("data", "model"))  # same shape, other devices
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    shardings = {"a": NamedSharding(first, P("data")), "b": NamedSharding(second, P("data"))}
    with pytest.raises(
        ValueError,
        match=r"state_shardings: leaf 'b' has a sharding on mesh .*; leaf 'a' uses mesh .* one mesh",
    ):
        cljax.state_shardings(optax.adam(1e-3), params, shardings)


def test_params_without_leaves():
    with pytest.raises(ValueError, match=r"state_shardings: `params` has no leaves"):
        cljax.state_shardings(optax.adam(1e-3), {}, {})
    with pytest.raises(ValueError, match=r"state_shardings: `params` has no leaves"):
        cljax.state_shardings(optax.adam(1e-3), {"w": None}, {"w": None})
