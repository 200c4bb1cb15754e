"""The conformance suite: every registered transform passes every check here.

Checks: jit without retracing, unknown extra args ignored, `params=None` handling, state
`eval_shape` stable step after step for float32 and bfloat16, updates keep the parameter dtype and
stay finite, scalar / 1-D / 2-D / stacked 3-D leaves, `optax.chain` / `optax.masked` /
`optax.partition` (frozen leaves allocate no state) / `optax.MultiSteps`, `None` leaves,
`optax.inject_hyperparams` equal to the plain factory, `jax.pmap` over 8 devices with pmean'd
gradients equal to one device, sharded `jit` on an 8-device mesh with state placed by
`cljax.state_shardings` equal to unsharded, orbax save -> restore -> continue bit-identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cljax
from tests.conformance.registry import CASES, NOT_TRANSFORMS, Case
from tests.helpers import assert_trees_close, assert_trees_equal

IDS = list(CASES)
CASE_LIST = [CASES[k] for k in IDS]
# Every check runs on every case. The first case registered for a transform factory is its primary
# case; later cases of the same factory are variants, and the ready-made optimizers
# (`cljax.optimizers`, chains of transforms that have their own primary cases) are compositions.
# Variants and compositions run the composition, distribution and checkpoint checks (the costly
# ones, several compilations each) only in the slow suite (``pytest -m slow``); primary transform
# cases run them by default.
parametrize_cases = pytest.mark.parametrize("case", CASE_LIST, ids=IDS)
_PRIMARY = {}
for _name, _case in CASES.items():
    _PRIMARY.setdefault(_case.factory, _name)


def _costly_checks_by_default(name: str) -> bool:
    case = CASES[name]
    return _PRIMARY[case.factory] == name and not case.factory.__module__.startswith("cljax.optimizers")


parametrize_cases_variants_slow = pytest.mark.parametrize(
    "case",
    [pytest.param(CASES[k], id=k, marks=[] if _costly_checks_by_default(k) else [pytest.mark.slow]) for k in IDS],
)

SHAPES = {"scalar": (), "vec": (8,), "mat": (8, 4), "stack": (2, 8, 4)}
SPECS = {"scalar": P(), "vec": P("data"), "mat": P("data", "model"), "stack": P(None, "data", "model")}
N_DEVICES = 8


def make_params(dtype=jnp.float32, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    return {
        name: jax.random.normal(k, shape, jnp.float32).astype(dtype)
        for k, (name, shape) in zip(keys, SHAPES.items(), strict=True)
    }


def make_grads(params, step: int, replica: int = 0):
    """Deterministic pseudo-gradients for a step (and a replica, for data-parallel tests)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), step), replica)
    keys = jax.random.split(key, len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    out = [jax.random.normal(k, p.shape, jnp.float32).astype(p.dtype) for k, p in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, out)


def build(case: Case) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(case.factory(**case.kwargs))


def make_step(tx, case: Case, traces: list | None = None):
    def step(params, state, grads):
        if traces is not None:
            traces.append(None)  # runs only while tracing
        updates, state = tx.update(grads, state, params, **case.extra_args, unknown_extra=1)
        return optax.apply_updates(params, updates), state, updates

    return step


def jit_update(tx, case: Case):
    """`tx.update` with the case's extra args, compiled: one program instead of op-by-op dispatch."""
    update = jax.jit(lambda updates, state, params, extra: tx.update(updates, state, params, **extra))
    return lambda updates, state, params: update(updates, state, params, case.extra_args)


def run(tx, case: Case, params, steps: int, start: int = 0, state=None):
    step = jax.jit(make_step(tx, case))
    state = tx.init(params) if state is None else state
    for i in range(start, start + steps):
        params, state, _ = step(params, state, make_grads(params, i))
    return params, state


def shape_of(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "weak_type", False)), jax.eval_shape(lambda: tree))


# ---------------------------------------------------------------------------------------------


def test_every_public_transform_has_a_case():
    factories = {case.factory.__name__ for case in CASES.values()}
    missing = sorted(n for n in cljax.__all__ if n not in NOT_TRANSFORMS and n not in factories)
    assert not missing, f"public names without a conformance case: {missing}"


@parametrize_cases
def test_jit_does_not_retrace_and_ignores_unknown_extras(case):
    tx, traces = build(case), []
    params = make_params()
    step = jax.jit(make_step(tx, case, traces))
    state = tx.init(params)
    for i in range(4):
        params, state, _ = step(params, state, make_grads(params, i))
    assert len(traces) == 1, "state changed shape, dtype or weak type between steps"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@parametrize_cases
def test_state_shape_and_dtype_are_stable(case, dtype):
    tx = build(case)
    params = make_params(dtype)
    state = tx.init(params)
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
        lambda x: (x.shape, x.dtype), jax.eval_shape(lambda: state)
    )
    step = jax.jit(make_step(tx, case))
    first = shape_of(state)
    for i in range(3):
        params, state, updates = step(params, state, make_grads(params, i))
        assert shape_of(state) == first, f"state changed at step {i}"
        for name, u in updates.items():
            assert u.dtype == dtype, f"leaf '{name}': update dtype {u.dtype} != param dtype {dtype}"
            assert u.shape == SHAPES[name]
            assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))), f"leaf '{name}' not finite"


STRICT = {k: c for k, c in CASES.items() if c.strict_dtypes}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(STRICT.values()), ids=list(STRICT))
def test_strict_dtype_promotion(case, dtype):
    """cljax's own arithmetic never relies on implicit dtype promotion."""
    tx = build(case)
    params = make_params(dtype)
    with jax.numpy_dtype_promotion("strict"):  # applies while the update is traced
        state = tx.init(params)
        update = jit_update(tx, case)
        for i in range(2):
            updates, state = update(make_grads(params, i), state, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))


@parametrize_cases
def test_params_none(case):
    tx = build(case)
    params = make_params()
    state = tx.init(params)
    grads = make_grads(params, 0)
    update = jit_update(tx, case)
    if case.needs_params:
        with pytest.raises(ValueError, match="params"):
            update(grads, state, None)
    else:
        updates, _ = update(grads, state, None)
        assert jax.tree.structure(updates) == jax.tree.structure(grads)


@parametrize_cases
def test_inject_hyperparams_matches_plain_factory(case):
    injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.kwargs)
    plain = build(case)
    params = make_params()
    got, got_state = run(injected, case, params, 3)
    want, _ = run(plain, case, params, 3)
    # Injected hyper-parameters are float32 arrays, so e.g. ``1 - b2`` rounds differently from the
    # Python-float computation (1.3e-5 relative for b2 = 0.999): compare at 1e-4.
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)
    numeric = {k for k, v in case.kwargs.items() if k not in case.static_args and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(got_state.hyperparams), "a float hyper-parameter was not injected"


@parametrize_cases_variants_slow
def test_chain_and_masked(case):
    params = make_params()
    alone, _ = run(build(case), case, params, 2)
    chained, _ = run(optax.chain(optax.identity(), build(case)), case, params, 2)
    assert_trees_close(chained, alone, rtol=0, atol=0)
    mask = {name: name != "vec" for name in SHAPES}
    masked, _ = run(optax.masked(build(case), mask), case, params, 2)
    reference = {**params, "vec": params["vec"] + sum(make_grads(params, i)["vec"] for i in range(2))}
    np.testing.assert_allclose(masked["vec"], reference["vec"], rtol=1e-6)
    if case.leafwise:
        assert_trees_close({k: masked[k] for k in SHAPES if k != "vec"}, {k: alone[k] for k in SHAPES if k != "vec"})


@parametrize_cases_variants_slow
def test_partition_frozen_leaves_allocate_no_state(case):
    params = make_params()
    labels = {name: "frozen" if name in ("vec", "stack") else "train" for name in SHAPES}
    tx = optax.partition({"train": build(case), "frozen": optax.set_to_zero()}, labels)
    state = tx.init(params)
    trainable = {k: v for k, v in params.items() if labels[k] == "train"}
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    assert size(state) == size(build(case).init(trainable))
    new_params, _ = run(tx, case, params, 2, state=state)
    for name in ("vec", "stack"):
        np.testing.assert_array_equal(new_params[name], params[name])
    if case.leafwise:
        alone, _ = run(build(case), case, trainable, 2)
        assert_trees_close({k: new_params[k] for k in trainable}, alone)


@parametrize_cases_variants_slow
def test_multisteps_and_none_leaves(case):
    params = make_params()
    tx = optax.MultiSteps(case.factory(**case.kwargs), every_k_schedule=2)
    state = tx.init(params)
    g0, g1 = make_grads(params, 0), make_grads(params, 1)
    update = jit_update(tx, case)
    u0, state = update(g0, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(u0))
    u1, state = update(g1, state, params)
    plain = build(case)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    want, _ = jit_update(plain, case)(mean, plain.init(params), params)
    assert_trees_close(u1, want, rtol=1e-5, atol=1e-7)

    with_none = {**params, "none": None}
    tx = build(case)
    updates, _ = jit_update(tx, case)({**make_grads(params, 0), "none": None}, tx.init(with_none), with_none)
    assert updates["none"] is None


# ---------------------------------------------------------------------------------------------
# Distribution.


def _replicated_grads(params, step: int):
    per_device = [make_grads(params, step, replica=r) for r in range(N_DEVICES)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_device)


@parametrize_cases_variants_slow
def test_pmap_with_pmean_matches_single_device(case):
    assert jax.device_count() >= N_DEVICES, "conftest must simulate 8 CPU devices"
    tx = build(case)
    params = make_params()

    @functools.partial(jax.pmap, axis_name="batch")
    def pstep(params, state, grads):
        grads = jax.lax.pmean(grads, "batch")
        updates, state = tx.update(grads, state, params, **case.extra_args)
        return optax.apply_updates(params, updates), state

    step = jax.jit(make_step(tx, case))  # the single-device step every other check compiles too

    replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (N_DEVICES,) + x.shape), tree)
    p_params, p_state = replicate(params), replicate(tx.init(params))
    s_params, s_state = params, tx.init(params)
    for i in range(3):
        grads = _replicated_grads(params, i)
        p_params, p_state = pstep(p_params, p_state, grads)
        s_params, s_state, _ = step(s_params, s_state, jax.tree.map(lambda g: jnp.mean(g, axis=0), grads))
    for leaf in jax.tree.leaves((p_params, p_state)):
        leaf = np.asarray(leaf)
        assert (leaf == leaf[:1]).all(), "replicas diverged"
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    assert_trees_close(first(p_params), s_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(first(p_state), s_state, rtol=1e-5, atol=1e-6, code_atol=case.code_atol)


@parametrize_cases_variants_slow
def test_sharded_jit_matches_unsharded(case):
    mesh = Mesh(np.array(jax.devices()[:N_DEVICES]).reshape(4, 2), ("data", "model"))
    tx = build(case)
    params = make_params()
    param_shardings = {k: NamedSharding(mesh, SPECS[k]) for k in SHAPES}
    state_shardings = cljax.state_shardings(tx, params, param_shardings)
    s_params = jax.device_put(params, param_shardings)
    s_state = jax.jit(tx.init, out_shardings=state_shardings)(s_params)
    step = make_step(tx, case)
    sharded = jax.jit(
        step,
        in_shardings=(param_shardings, state_shardings, param_shardings),
        out_shardings=(param_shardings, state_shardings, param_shardings),
    )
    plain = jax.jit(step)
    u_params, u_state = params, tx.init(params)
    for i in range(3):
        grads = make_grads(params, i)
        s_params, s_state, _ = sharded(s_params, s_state, jax.device_put(grads, param_shardings))
        u_params, u_state, _ = plain(u_params, u_state, grads)
    for leaf, sharding in zip(jax.tree.leaves(s_state), jax.tree.leaves(state_shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert_trees_close(s_params, u_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(s_state, u_state, rtol=1e-5, atol=1e-6, code_atol=case.code_atol)


# ---------------------------------------------------------------------------------------------
# Checkpointing.


@parametrize_cases_variants_slow
def test_orbax_round_trip_is_bit_identical(case, tmp_path):
    tx = build(case)
    params = make_params()
    straight_params, straight_state = run(tx, case, params, 4)

    mid_params, mid_state = run(tx, case, params, 2)
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "ckpt"
    checkpointer.save(path, {"params": mid_params, "opt_state": mid_state})
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": mid_params, "opt_state": mid_state})
    restored = checkpointer.restore(path, target)
    assert_trees_equal(restored, {"params": mid_params, "opt_state": mid_state})
    resumed_params, resumed_state = run(tx, case, restored["params"], 2, start=2, state=restored["opt_state"])
    assert_trees_equal(resumed_params, straight_params)
    assert_trees_equal(resumed_state, straight_state)
