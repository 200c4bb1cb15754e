"""Tests for `cljax.tree`: path-pattern selection, labels for `optax.partition`, matrix views and
finding / replacing sub-states inside nested optax states."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cljax
from cljax.tree import leaf_paths
from tests.helpers import assert_trees_close, assert_trees_equal

# ---------------------------------------------------------------------------------------------
# A parameter tree with nested dicts, a list, a NamedTuple and a registered dataclass.


class Head(NamedTuple):
    kernel: jax.Array
    bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Embed:  # a dataclass pytree: attribute keys, like NamedTuple fields
    table: jax.Array
    scale: jax.Array


def _params():
    key = iter(jax.random.split(jax.random.key(0), 16))
    normal = lambda *shape: jax.random.normal(next(key), shape)
    return {
        "encoder": {
            "layers": [
                {"kernel": normal(4, 3), "bias": normal(3)},
                {"kernel": normal(3, 3), "bias": normal(3)},
            ],
            "norm": {"scale": normal(3)},
        },
        "head": Head(kernel=normal(3, 2), bias=normal(2)),
        "embed": Embed(table=normal(5, 4), scale=normal(4)),
    }


PATHS = [
    "embed/table",
    "embed/scale",
    "encoder/layers/0/bias",
    "encoder/layers/0/kernel",
    "encoder/layers/1/bias",
    "encoder/layers/1/kernel",
    "encoder/norm/scale",
    "head/kernel",
    "head/bias",
]


def _by_path(tree) -> dict[str, Any]:
    """Flattens a tree to {path string: leaf}."""
    return dict(zip(jax.tree.leaves(leaf_paths(tree)), jax.tree.leaves(tree), strict=True))


# ---------------------------------------------------------------------------------------------
# select / exclude.


def test_leaf_paths_join_keys_with_slashes():
    assert sorted(jax.tree.leaves(leaf_paths(_params()))) == sorted(PATHS)


def test_leaf_paths_of_a_bare_array_is_the_empty_path():
    assert leaf_paths(jnp.ones(3)) == ""


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("kernel$", {"encoder/layers/0/kernel", "encoder/layers/1/kernel", "head/kernel"}),
        ("layers/0/", {"encoder/layers/0/kernel", "encoder/layers/0/bias"}),
        ("^head/", {"head/kernel", "head/bias"}),  # NamedTuple attribute keys
        ("^embed/table$", {"embed/table"}),  # dataclass attribute keys
        (
            ["bias$", "^embed/"],
            {
                "encoder/layers/0/bias",
                "encoder/layers/1/bias",
                "head/bias",
                "embed/table",
                "embed/scale",
            },
        ),  # a list: any pattern matches
        (re.compile("SCALE", re.IGNORECASE), {"encoder/norm/scale", "embed/scale"}),
        ("no_such_leaf", set()),
    ],
)
def test_select_and_exclude_match_regex_over_paths(pattern, expected):
    params = _params()
    selected = _by_path(cljax.select(pattern)(params))
    excluded = _by_path(cljax.exclude(pattern)(params))
    assert {p for p, v in selected.items() if v} == expected
    assert {p for p, v in excluded.items() if not v} == expected
    assert jax.tree.structure(cljax.select(pattern)(params)) == jax.tree.structure(params)
    assert all(isinstance(v, bool) for v in selected.values())


def test_select_uses_search_not_fullmatch():
    params = {"dense_kernel_0": jnp.ones(2), "bias": jnp.ones(2)}
    assert cljax.select("kernel")(params) == {"dense_kernel_0": True, "bias": False}
    assert cljax.select("^kernel$")(params) == {"dense_kernel_0": False, "bias": False}


def test_select_on_a_bare_array_root():
    x = jnp.ones(3)
    assert cljax.select("")(x) is True
    assert cljax.select("^$")(x) is True
    assert cljax.select(".")(x) is False  # the root's path is empty, not '<root>'
    assert cljax.select("root")(x) is False
    assert cljax.exclude("root")(x) is True
    assert cljax.label_by_path({"a": "root"}, default="b")(x) == "b"


def test_select_skips_none_leaves():
    params = {"w": jnp.ones((2, 2)), "frozen": None}
    assert cljax.select("w|frozen")(params) == {"w": True, "frozen": None}


def test_select_is_a_mask_for_optax_masked():
    params = _params()
    updates = jax.tree.map(jnp.ones_like, params)
    tx = optax.masked(optax.scale(3.0), cljax.select("kernel$"))
    out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    for path, leaf in _by_path(out).items():
        np.testing.assert_array_equal(leaf, 3.0 if path.endswith("kernel") else 1.0, err_msg=path)


def test_exclude_is_a_mask_for_add_decayed_weights():
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optax.add_decayed_weights(0.5, mask=cljax.exclude(["bias$", "scale$"]))
    out, _ = tx.update(zeros, tx.init(params), params)
    got, p = _by_path(out), _by_path(params)
    decayed = {path for path in PATHS if not path.endswith(("bias", "scale"))}
    assert decayed == {
        "embed/table",
        "encoder/layers/0/kernel",
        "encoder/layers/1/kernel",
        "head/kernel",
    }
    for path in PATHS:
        expected = (
            0.5 * p[path] if path in decayed else jnp.zeros_like(p[path])
        )  # masked: untouched
        np.testing.assert_allclose(got[path], expected, rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("fn", [cljax.select, cljax.exclude])
def test_select_errors(fn):
    name = fn.__name__
    with pytest.raises(
        ValueError, match=rf"{name}\(pattern=\.\.\.\) is not a valid regular expression: '\('"
    ):
        fn("(")
    with pytest.raises(
        ValueError, match=rf"{name}\(pattern=\.\.\.\) is not a valid regular expression: '\[a-'"
    ):
        fn(["ok", "[a-"])
    with pytest.raises(
        TypeError,
        match=rf"{name}\(pattern=\.\.\.\) must be a string, a compiled regex or a list of them, got int",
    ):
        fn(3)
    with pytest.raises(
        TypeError,
        match=rf"{name}\(pattern=\.\.\.\) must be a string, a compiled regex or a list of them, got int",
    ):
        fn(["kernel", 3])
    with pytest.raises(
        TypeError,
        match=rf"{name}\(pattern=\.\.\.\) must be a string, a compiled regex or a list of them, got dict",
    ):
        fn({"kernel": 1})
    with pytest.raises(TypeError, match=rf"{name}\(pattern=\.\.\.\) must be a str regex"):
        fn(re.compile(b"kernel"))
    with pytest.raises(ValueError, match=rf"{name}\(pattern=\.\.\.\) is empty; pass at least one"):
        fn([])


# ---------------------------------------------------------------------------------------------
# label_by_path with optax.partition.


def test_label_by_path_first_matching_rule_wins():
    params = _params()
    rules = {"frozen": "layers/0/", "slow": "^encoder/", "head": ["^head/"]}
    labels = _by_path(cljax.label_by_path(rules, default="train")(params))
    assert labels == {
        "encoder/layers/0/kernel": "frozen",
        "encoder/layers/0/bias": "frozen",
        "encoder/layers/1/kernel": "slow",
        "encoder/layers/1/bias": "slow",
        "encoder/norm/scale": "slow",
        "head/kernel": "head",
        "head/bias": "head",
        "embed/table": "train",
        "embed/scale": "train",
    }
    # Rule order matters: with "slow" first, it takes every encoder leaf.
    reordered = {"slow": "^encoder/", "frozen": "layers/0/"}
    labels = _by_path(cljax.label_by_path(reordered, default="train")(params))
    assert "frozen" not in labels.values()
    assert labels["encoder/layers/0/kernel"] == "slow"


def test_label_by_path_with_partition_frozen_leaves_allocate_no_state():
    params = _params()
    labels = cljax.label_by_path({"frozen": ["^encoder/", "^embed/"]}, default="train")
    tx = optax.partition({"frozen": optax.set_to_zero(), "train": optax.adam(0.1)}, labels)
    state = tx.init(params)

    frozen_state = state.inner_states["frozen"]
    assert jax.tree.leaves(frozen_state) == []  # set_to_zero: no arrays at all

    adam = cljax.find_state(state, optax.ScaleByAdamState)
    trained = {p for p in PATHS if p.startswith("head/")}
    assert set(_by_path(adam.mu)) == trained  # frozen leaves are MaskedNode, not zeros
    assert set(_by_path(adam.nu)) == trained
    assert len(jax.tree.leaves(state)) == 1 + 2 * len(trained)  # count + mu + nu

    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    for path, leaf in _by_path(updates).items():
        expected = -0.1 if path in trained else 0.0  # first Adam step: -lr * sign(g)
        np.testing.assert_allclose(leaf, expected, rtol=1e-5, err_msg=path)


def test_label_by_path_errors():
    with pytest.raises(
        TypeError,
        match=r"label_by_path\(rules=\.\.\.\) must be a mapping label -> pattern, got list",
    ):
        cljax.label_by_path([("a", "b")], default="c")
    with pytest.raises(
        ValueError, match=r"label_by_path\(pattern=\.\.\.\) is not a valid regular expression"
    ):
        cljax.label_by_path({"a": "(b"}, default="c")
    with pytest.raises(ValueError, match=r"label_by_path\(pattern=\.\.\.\) is empty"):
        cljax.label_by_path({"a": []}, default="c")
    with pytest.raises(TypeError, match=r"label_by_path\(pattern=\.\.\.\) must be a string"):
        cljax.label_by_path({"a": 1.5}, default="c")


# ---------------------------------------------------------------------------------------------
# Matrix views.


def _arange(*shape, dtype=jnp.float32):
    return jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def _round_trip(x, spec):
    mats = cljax.as_matrices(x, spec)
    back = cljax.from_matrices(mats, spec, x.shape)
    assert_trees_equal(back, x)
    return mats


def test_matrix_view_of_a_2d_leaf_is_itself():
    x = _arange(4, 3)
    mats = _round_trip(x, cljax.MatrixSpec())
    assert mats.shape == (1, 4, 3)
    assert_trees_equal(mats[0], x)
    assert cljax.matrix_shape((4, 3)) == (1, 4, 3)


def test_matrix_view_of_stacked_layers():
    x = _arange(5, 4, 3)
    mats = _round_trip(x, cljax.MatrixSpec())
    assert mats.shape == (5, 4, 3)
    assert_trees_equal(mats, x)
    assert cljax.matrix_shape(x.shape) == (5, 4, 3)


def test_matrix_view_of_a_conv_kernel():
    x = _arange(3, 3, 2, 5)  # (kh, kw, c_in, c_out)
    spec = cljax.MatrixSpec(rows=(0, 1, 2), cols=3)
    mats = _round_trip(x, spec)
    assert mats.shape == (1, 18, 5)
    assert_trees_equal(mats[0], x.reshape(18, 5))
    assert cljax.matrix_shape(x.shape, spec) == (1, 18, 5)


@pytest.mark.parametrize(
    "shape, spec, order, expected",
    [
        ((4, 3), cljax.MatrixSpec(rows=1, cols=0), (1, 0), (1, 3, 4)),  # transposed view
        ((2, 3, 4, 5), cljax.MatrixSpec(rows=(-1, 0), cols=2), (1, 3, 0, 2), (3, 10, 4)),
        ((2, 3, 4), cljax.MatrixSpec(rows=-3, cols=(-1, 1)), (0, 2, 1), (1, 2, 12)),
        ((2, 3, 4, 5), cljax.MatrixSpec(rows=2, cols=(-4,)), (1, 3, 2, 0), (15, 4, 2)),
    ],
)
def test_matrix_view_with_arbitrary_axis_orders(shape, spec, order, expected):
    x = _arange(*shape)
    mats = _round_trip(x, spec)
    assert mats.shape == expected
    assert_trees_equal(mats, jnp.transpose(x, order).reshape(expected))
    assert cljax.matrix_shape(shape, spec) == expected


def test_matrix_view_keeps_dtype():
    x = _arange(2, 4, 3, dtype=jnp.bfloat16)
    mats = _round_trip(x, cljax.MatrixSpec(rows=(0, 2), cols=1))
    assert mats.dtype == jnp.bfloat16


@st.composite
def _shape_and_spec(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    perm = draw(st.permutations(range(ndim)))
    n_rows = draw(st.integers(1, ndim - 1))
    n_cols = draw(st.integers(1, ndim - n_rows))
    negate = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
    signed = [a - ndim if neg else a for a, neg in zip(perm, negate, strict=True)]
    rows, cols = tuple(signed[:n_rows]), tuple(signed[n_rows : n_rows + n_cols])
    as_int = lambda axes: axes[0] if len(axes) == 1 and draw(st.booleans()) else axes
    return shape, cljax.MatrixSpec(rows=as_int(rows), cols=as_int(cols))


@given(_shape_and_spec(), st.integers(0, 2**31 - 1))
def test_matrix_view_round_trip_property(shape_spec, seed):
    shape, spec = shape_spec
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    mats = cljax.as_matrices(jnp.asarray(x), spec, name="w")
    back = cljax.from_matrices(mats, spec, shape, name="w")
    assert_trees_equal(back, jnp.asarray(x))

    ndim = len(shape)
    norm = lambda axes: tuple(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))
    rows, cols = norm(spec.rows), norm(spec.cols)
    batch = tuple(a for a in range(ndim) if a not in rows + cols)
    size = lambda axes: int(np.prod([shape[a] for a in axes]))
    b, m, n = size(batch), size(rows), size(cols)
    assert cljax.matrix_shape(shape, spec) == (b, m, n)
    assert mats.shape == (b, m, n)
    np.testing.assert_array_equal(
        np.asarray(mats), np.transpose(x, batch + rows + cols).reshape(b, m, n)
    )
    # Element by element: row index = row axes in order (C order), column index likewise.
    mats = np.asarray(mats)

    def flat(index, axes):
        return (
            np.ravel_multi_index([index[a] for a in axes], [shape[a] for a in axes]) if axes else 0
        )

    for index in np.ndindex(*shape):
        assert mats[flat(index, batch), flat(index, rows), flat(index, cols)] == x[index]


def test_matrix_spec_axes_normalises_negative_axes():
    assert cljax.MatrixSpec().axes(2) == ((), (0,), (1,))
    assert cljax.MatrixSpec().axes(4) == ((0, 1), (2,), (3,))
    assert cljax.MatrixSpec(rows=(-1, 0), cols=2).axes(4) == ((1,), (3, 0), (2,))


def test_matrix_spec_errors():
    with pytest.raises(
        ValueError,
        match=r"MatrixSpec: leaf 'enc/b' has 1 dims; axis -2 of MatrixSpec\(rows=-2, cols=-1\) is out of range",
    ):
        cljax.as_matrices(jnp.ones(3), name="enc/b")
    with pytest.raises(
        ValueError,
        match=r"MatrixSpec: a leaf has 1 dims; axis -2 .* is out of range\. Route leaves",
    ):
        cljax.as_matrices(jnp.ones(3))
    with pytest.raises(ValueError, match=r"MatrixSpec: leaf 's' has 0 dims"):
        cljax.matrix_shape((), name="s")
    with pytest.raises(
        ValueError,
        match=r"MatrixSpec: leaf 'w' has 3 dims; axis 5 of MatrixSpec\(rows=0, cols=5\) is out of range",
    ):
        cljax.MatrixSpec(rows=0, cols=5).axes(3, "w")
    with pytest.raises(ValueError, match=r"MatrixSpec: leaf 'w' has 3 dims; axis -4"):
        cljax.matrix_shape((2, 3, 4), cljax.MatrixSpec(rows=(-4,), cols=0), name="w")
    with pytest.raises(
        ValueError, match=r"MatrixSpec: leaf 'w' axes repeat between or within rows and cols"
    ):
        cljax.as_matrices(jnp.ones((2, 3, 4)), cljax.MatrixSpec(rows=(0, 1), cols=1), name="w")
    with pytest.raises(
        ValueError, match=r"MatrixSpec: a leaf axes repeat between or within rows and cols"
    ):
        cljax.MatrixSpec(rows=(0, -3), cols=1).axes(3)  # -3 is axis 0 again
    with pytest.raises(ValueError, match=r"axes repeat"):
        cljax.MatrixSpec(rows=0, cols=(1, 1)).axes(3)
    with pytest.raises(ValueError, match=r"MatrixSpec: rows and cols each need at least one axis"):
        cljax.MatrixSpec(rows=(), cols=1).axes(2)
    with pytest.raises(TypeError, match=r"MatrixSpec: axes must be ints, got 1\.5"):
        cljax.MatrixSpec(rows=(0, 1.5), cols=2).axes(3)
    with pytest.raises(TypeError, match=r"MatrixSpec: axes must be ints, got True"):
        cljax.MatrixSpec(rows=True, cols=0).axes(2)
    with pytest.raises(
        TypeError, match=r"MatrixSpec: rows and cols must be an int or a tuple of ints, got 1\.5"
    ):
        cljax.MatrixSpec(rows=1.5, cols=0).axes(2)
    with pytest.raises(
        TypeError, match=r"MatrixSpec: rows and cols must be an int or a tuple of ints, got '0'"
    ):
        cljax.MatrixSpec(rows="0", cols=1).axes(2)
    with pytest.raises(
        ValueError,
        match=r"from_matrices: leaf 'w' has matrix view shape \(1, 3, 4\); shape \(4, 3\)",
    ):
        cljax.from_matrices(jnp.ones((1, 3, 4)), cljax.MatrixSpec(), (4, 3), name="w")
    with pytest.raises(ValueError, match=r"from_matrices: leaf '<leaf>' has matrix view shape"):
        cljax.from_matrices(jnp.ones((2, 4, 3)), cljax.MatrixSpec(), (4, 3))


# ---------------------------------------------------------------------------------------------
# find_state / find_states / replace_state.

SMALL = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
# optax.inject_hyperparams(optax.adam) holds an InjectStatefulHyperparamsState (a sibling class of
# InjectHyperparamsState, not a subclass): a tuple query finds either.
INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _nested_tx():
    labels = cljax.label_by_path({"adam": "w"}, default="sgd")
    inner = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.partition(
            {
                "adam": optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
                "sgd": optax.masked(optax.trace(0.9), cljax.select("b")),
            },
            labels,
        ),
    )
    return optax.MultiSteps(inner, every_k_schedule=2)


def test_find_state_inside_nested_wrappers():
    state = _nested_tx().init(SMALL)
    adam = cljax.find_state(state, optax.ScaleByAdamState)
    assert isinstance(adam, optax.ScaleByAdamState)
    assert set(_by_path(adam.mu)) == {"w"} and adam.mu["w"].shape == (4, 3)
    assert adam.mu["b"] == optax.MaskedNode()  # partition masks the "sgd" leaf out
    trace = cljax.find_state(state, optax.TraceState)
    assert set(_by_path(trace.trace)) == {"b"}
    injected = cljax.find_state(state, INJECTED)
    np.testing.assert_allclose(injected.hyperparams["learning_rate"], 1e-3)
    assert cljax.find_state(state, optax.MultiStepsState) is state  # the root itself matches
    assert isinstance(cljax.find_state(state, optax.PartitionState), optax.PartitionState)


def test_find_states_includes_nested_matches_outer_first():
    state = _nested_tx().init(SMALL)
    masked = cljax.find_states(state, optax.MaskedState)
    # partition wraps each group in a MaskedState; the "sgd" group holds optax.masked's own.
    assert len(masked) == 3
    assert isinstance(masked[0].inner_state, INJECTED)
    assert masked[2] is masked[1].inner_state
    assert isinstance(masked[2].inner_state, optax.TraceState)


def test_find_state_errors_list_the_state_types_held():
    state = _nested_tx().init(SMALL)
    with pytest.raises(
        ValueError, match=r"find_state: no ScaleByUpgdState in the optimizer state; it holds \["
    ) as info:
        cljax.find_state(state, cljax.ScaleByUpgdState)
    for held in (
        "MultiStepsState",
        "PartitionState",
        "MaskedState",
        "InjectStatefulHyperparamsState",
        "ScaleByAdamState",
        "TraceState",
        "EmptyState",
    ):
        assert held in str(info.value)
    with pytest.raises(ValueError, match=r"find_state: no ScaleByUpgdState or TraceState in"):
        cljax.find_state(optax.adam(1e-3).init(SMALL), (cljax.ScaleByUpgdState, optax.TraceState))
    with pytest.raises(
        ValueError,
        match=r"no ScaleByAdamState in the optimizer state; it holds no NamedTuple states",
    ):
        cljax.find_state((), optax.ScaleByAdamState)
    with pytest.raises(ValueError, match=r"replace_state: no ScaleByAdamState"):
        cljax.replace_state(optax.sgd(0.1).init(SMALL), optax.adam(1e-3).init(SMALL)[0])


def test_find_state_several_matches_need_index():
    tx = optax.chain(optax.scale_by_adam(b1=0.5), optax.clip(1.0), optax.scale_by_adam(b1=0.9))
    state = tx.init(SMALL)
    with pytest.raises(
        ValueError,
        match=r"find_state: found 2 states of type ScaleByAdamState; pass `index=` \(0 to 1",
    ):
        cljax.find_state(state, optax.ScaleByAdamState)
    assert cljax.find_state(state, optax.ScaleByAdamState, index=0) is state[0]
    assert cljax.find_state(state, optax.ScaleByAdamState, index=1) is state[2]
    assert cljax.find_state(state, optax.ScaleByAdamState, index=-1) is state[2]
    assert cljax.find_states(state, optax.ScaleByAdamState) == [state[0], state[2]]
    with pytest.raises(ValueError, match=r"find_state\(index=\.\.\.\) must be in \[0, 2\), got 2"):
        cljax.find_state(state, optax.ScaleByAdamState, index=2)
    with pytest.raises(ValueError, match=r"find_state\(index=\.\.\.\) must be in \[0, 2\), got -3"):
        cljax.find_state(state, optax.ScaleByAdamState, index=-3)
    with pytest.raises(
        TypeError, match=r"find_state\(index=\.\.\.\) must be an int or None, got 1\.0"
    ):
        cljax.find_state(state, optax.ScaleByAdamState, index=1.0)
    with pytest.raises(
        ValueError, match=r"replace_state: found 2 states of type ScaleByAdamState; pass `index=`"
    ):
        cljax.replace_state(state, state[0])


def test_find_state_predicate_and_tuple_queries():
    tx = optax.chain(optax.trace(0.9), optax.scale_by_adam(), optax.scale_by_rms())
    state = tx.init(SMALL)
    has_mu = lambda s: isinstance(s, tuple) and "mu" in getattr(s, "_fields", ())
    assert cljax.find_state(state, has_mu) is state[1]
    both = cljax.find_states(state, (optax.TraceState, optax.ScaleByRmsState))
    assert both == [state[0], state[2]]  # tree order
    with pytest.raises(
        ValueError, match=r"find_state: found 2 states of type TraceState or ScaleByRmsState"
    ):
        cljax.find_state(state, (optax.TraceState, optax.ScaleByRmsState))

    def no_match(s):
        return False

    with pytest.raises(ValueError, match=r"find_state: no no_match in the optimizer state"):
        cljax.find_state(state, no_match)
    for bad in (3, "ScaleByAdamState", (), (optax.TraceState, 3)):
        with pytest.raises(
            TypeError,
            match=r"find_state\(state_type=\.\.\.\) must be a type, a tuple of types or a predicate",
        ):
            cljax.find_states(state, bad)


def _changed_leaves(before, after) -> list[str]:
    """Paths whose leaf differs (not the same object); asserts the structure is unchanged."""
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(before)
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(after)
    assert a_def == b_def
    return [
        jax.tree_util.keystr(p)
        for (p, b), (_, a) in zip(b_leaves, a_leaves, strict=True)
        if a is not b
    ]


def test_replace_state_changes_exactly_one_sub_state():
    state = _nested_tx().init(SMALL)
    adam = cljax.find_state(state, optax.ScaleByAdamState)
    new = adam._replace(mu=jax.tree.map(lambda m: m + 1.0, adam.mu), count=adam.count + 5)
    out = cljax.replace_state(state, new)
    assert cljax.find_state(out, optax.ScaleByAdamState) is new
    changed = _changed_leaves(state, out)
    assert len(changed) == 2
    assert any(c.endswith(".count") for c in changed) and any(".mu" in c for c in changed)
    assert_trees_equal(cljax.replace_state(out, adam), state)  # and back
    # The original is not modified.
    assert_trees_equal(cljax.find_state(state, optax.ScaleByAdamState), adam)


def test_replace_state_with_index_query_and_nested_matches():
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_adam())
    state = tx.init(SMALL)
    new = state[1]._replace(count=jnp.array(7, jnp.int32))
    out = cljax.replace_state(state, new, index=1)
    assert out[0] is state[0] and out[1] is new
    out = cljax.replace_state(state, new, index=-2)
    assert out[0] is new and out[1] is state[1]

    trace = optax.TraceState(trace={"w": jnp.full((4, 3), 2.0), "b": jnp.zeros(3)})
    out = cljax.replace_state(
        state, trace, state_type=lambda s: isinstance(s, optax.ScaleByAdamState), index=0
    )
    assert out[0] is trace and out[1] is state[1]

    # The third MaskedState is nested inside the second: replacing it leaves the outer ones alone.
    state = _nested_tx().init(SMALL)
    masked = cljax.find_states(state, optax.MaskedState)
    new_inner = optax.MaskedState(
        inner_state=optax.TraceState(trace={"b": jnp.full(3, 4.0), "w": optax.MaskedNode()})
    )
    out = cljax.replace_state(state, new_inner, index=2)
    found = cljax.find_states(out, optax.MaskedState)
    assert len(found) == 3 and found[0] is masked[0] and found[2] is new_inner
    assert found[1].inner_state is new_inner
    changed = _changed_leaves(state, out)
    assert len(changed) == 1 and ".trace['b']" in changed[0]


class _WithNone(NamedTuple):
    missing: Any
    value: jax.Array


def test_replace_state_keeps_none_and_empty_nodes():
    state = (
        _WithNone(missing=None, value=jnp.ones(2)),
        optax.EmptyState(),
        optax.MaskedNode(),
        (),
        optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32), mu={"w": None}, nu={"w": jnp.ones(2)}
        ),
    )
    adam = state[4]
    new = adam._replace(count=jnp.ones([], jnp.int32))
    out = cljax.replace_state(state, new)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert out[0].missing is None and out[0].value is state[0].value
    assert out[1] == optax.EmptyState() and out[2] == optax.MaskedNode() and out[3] == ()
    assert out[4] is new
    assert cljax.find_state(out, _WithNone) == out[0]


def test_find_and_replace_state_in_a_cljax_chain():
    params = {"w": jax.random.normal(jax.random.key(1), (4, 3)), "b": jnp.ones(3)}

    def cwd_chain(weight_decay):  # the transforms cwd_adamw is made of, as a user would chain them
        return optax.chain(
            optax.scale_by_adam(), cljax.add_cautious_weight_decay(weight_decay), optax.scale_by_learning_rate(1e-3)
        )

    tx = cwd_chain(1e-4)
    state = tx.init(params)
    adam = cljax.find_state(state, optax.ScaleByAdamState)
    assert_trees_equal(adam.mu, jax.tree.map(jnp.zeros_like, params))
    with pytest.raises(
        ValueError,
        match=r"no AddCautiousWeightDecayState .* it holds \['EmptyState', 'ScaleByAdamState'\]",
    ):
        cljax.find_state(state, cljax.AddCautiousWeightDecayState)  # constant decay: stateless

    scheduled = cwd_chain(optax.linear_schedule(0.1, 0.0, 10)).init(params)
    cwd = cljax.find_state(scheduled, cljax.AddCautiousWeightDecayState)
    bumped = cljax.replace_state(scheduled, cwd._replace(count=jnp.array(4, jnp.int32)))
    assert int(cljax.find_state(bumped, cljax.AddCautiousWeightDecayState).count) == 4
    assert bumped[0] is scheduled[0] and bumped[2] is scheduled[2]

    # Replace the Adam moments and check the next update uses them.
    mu = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    nu = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    state2 = cljax.replace_state(state, adam._replace(mu=mu, nu=nu, count=jnp.array(10, jnp.int32)))
    grads = jax.tree.map(jnp.zeros_like, params)
    tx0 = cwd_chain(0.0)
    updates, new_state = jax.jit(tx0.update)(grads, state2, params)
    b1, b2, t = 0.9, 0.999, 11
    m_hat = 0.9 * 0.5 / (1 - b1**t)
    v_hat = 0.999 * 0.25 / (1 - b2**t)
    expected = -1e-3 * m_hat / (np.sqrt(v_hat) + 1e-8)
    assert_trees_close(
        updates, jax.tree.map(lambda p: jnp.full_like(p, expected), params), rtol=1e-5
    )
    assert int(cljax.find_state(new_state, optax.ScaleByAdamState).count) == 11

    upgd_state = cljax.upgd(1e-3).init(params)
    found = cljax.find_state(upgd_state, cljax.ScaleByUpgdState)
    assert found.utility["w"].shape == (4, 3)


def test_find_and_replace_state_under_jit():
    tx = optax.chain(optax.clip(1.0), optax.adam(1e-3))
    state = tx.init(SMALL)

    @jax.jit
    def bump(state):
        adam = cljax.find_state(state, optax.ScaleByAdamState)
        return cljax.replace_state(
            state, adam._replace(nu=jax.tree.map(lambda v: v + 2.0, adam.nu))
        )

    out = bump(state)
    assert_trees_equal(
        cljax.find_state(out, optax.ScaleByAdamState).nu,
        jax.tree.map(lambda p: jnp.full_like(p, 2.0), SMALL),
    )
    assert_trees_equal(
        cljax.find_state(out, optax.ScaleByAdamState).mu,
        cljax.find_state(state, optax.ScaleByAdamState).mu,
    )
