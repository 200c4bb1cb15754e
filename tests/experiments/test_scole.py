"""SCoLe streams (EX-12): the class draws, the per-task data, and knowledge accumulation."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cljax.experiments import cli
from cljax.experiments import data as D
from cljax.experiments import results as Res
from cljax.experiments.benchmarks import BENCHMARKS, Benchmark
from cljax.experiments.methods import Method
from cljax.experiments.runner import make_config, run
from tests.experiments.conftest import HAS_MATPLOTLIB

_TINY = {"steps_per_task": 4, "eval_every": 2, "eval_subsample": 20}


def _tiny_bench(stream: D.Stream) -> Benchmark:
    return Benchmark(
        "tiny SCoLe", lambda n: stream, "mlp", {"hidden": (16,)}, probe_size=8, **_TINY
    )


def _same_stream(a: D.Stream, b: D.Stream) -> bool:
    fields = ("x_train", "y_train", "x_test", "y_test")
    same_tasks = all(
        s.classes == t.classes and all(np.array_equal(getattr(s, f), getattr(t, f)) for f in fields)
        for s, t in zip(a.tasks, b.tasks, strict=True)
    )
    return same_tasks and all(
        np.array_equal(u, v) for u, v in zip(a.pool_test, b.pool_test, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# The class draws.


@pytest.mark.parametrize("base", ["digits", "mnist1d"])
def test_recurrence_one_makes_every_task_the_whole_pool(base):
    stream = D.scole(6, base=base, pool_size=7, classes_per_task=2, recurrence=1.0, num_samples=200)
    for task in stream.tasks:
        assert task.classes == tuple(range(7))
        assert set(np.unique(task.y_train).tolist()) == set(range(7))
    assert stream.num_classes == 7 and stream.scenarios == ("class",)


@given(
    num_tasks=st.integers(1, 30),
    pool_size=st.integers(2, 10),
    k=st.integers(1, 10),
    recurrence=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_class_draws_are_sorted_subsets_of_the_pool_with_at_least_k_classes(
    num_tasks, pool_size, k, recurrence, seed
):
    k = min(k, pool_size)
    draws = D.scole_classes(
        num_tasks, pool_size=pool_size, classes_per_task=k, recurrence=recurrence, seed=seed
    )
    assert len(draws) == num_tasks
    for classes in draws:
        assert list(classes) == sorted(set(classes))
        assert set(classes) <= set(range(pool_size)) and len(classes) >= k
        if recurrence == 0.0:
            assert len(classes) == k
        if recurrence == 1.0:
            assert classes == tuple(range(pool_size))


@pytest.mark.parametrize("recurrence", [0.0, 0.3])
def test_each_class_occurs_with_the_stated_probability(recurrence):
    # P(c in task) = k/C + (1 - k/C) r for every class: binomial frequency over 4000 tasks.
    C, k, T = 10, 2, 4000
    draws = D.scole_classes(T, pool_size=C, classes_per_task=k, recurrence=recurrence, seed=5)
    member = np.zeros((T, C))
    for t, classes in enumerate(draws):
        member[t, list(classes)] = 1.0
    p = k / C + (1 - k / C) * recurrence
    tol = 5 * np.sqrt(p * (1 - p) / T)
    np.testing.assert_allclose(member.mean(axis=0), p, atol=tol)


def test_same_seed_same_stream_other_seed_other_classes():
    a = D.scole(20, samples_per_class=10, seed=3)
    assert _same_stream(a, D.scole(20, samples_per_class=10, seed=3))
    b = D.scole(20, samples_per_class=10, seed=4)
    assert [t.classes for t in a.tasks] != [t.classes for t in b.tasks]
    # The class sequence does not depend on the data sub-sampling, nor the data on the seed.
    c = D.scole(20, samples_per_class=25, seed=3)
    assert [t.classes for t in a.tasks] == [t.classes for t in c.tasks]
    np.testing.assert_array_equal(a.pool_test[0], b.pool_test[0])
    assert "seed 3" in a.description and "recurrence 0" in a.description


# ---------------------------------------------------------------------------------------------
# The per-task data.


def test_logged_classes_are_the_tasks_labels_and_the_test_split_is_complete():
    stream = D.scole(15, classes_per_task=3, recurrence=0.2, samples_per_class=12, seed=1)
    x_tr, y_tr, x_te, y_te = D.load_digits_split()
    for task, classes in zip(
        stream.tasks, D.scole_classes(15, classes_per_task=3, recurrence=0.2, seed=1), strict=True
    ):
        assert task.classes == classes
        assert set(np.unique(task.y_train).tolist()) == set(classes)
        assert set(np.unique(task.y_test).tolist()) == set(classes)
        te = np.isin(y_te, classes)
        np.testing.assert_array_equal(task.x_test, x_te[te])
        np.testing.assert_array_equal(task.y_test, y_te[te])
    np.testing.assert_array_equal(stream.pool_test[1], y_te)
    np.testing.assert_array_equal(stream.pool_test[0], x_te)


def test_per_task_sample_counts_and_subsets_without_replacement():
    spc = 12
    stream = D.scole(10, classes_per_task=2, recurrence=0.25, samples_per_class=spc, seed=2)
    x_tr, y_tr, _, _ = D.load_digits_split()
    assert len(np.unique(x_tr, axis=0)) == len(x_tr)  # so each image identifies its row
    subsets = []
    for task in stream.tasks:
        assert len(task.y_train) == spc * len(task.classes)
        np.testing.assert_array_equal(
            np.bincount(task.y_train, minlength=10)[list(task.classes)], spc
        )
        # Every training example is a training example of the digits with its own label, and
        # none is repeated within a task.
        matches = (task.x_train[:, None, :] == x_tr[None, :, :]).all(-1)
        np.testing.assert_array_equal(matches.sum(axis=1), 1)
        idx = matches.argmax(axis=1)
        np.testing.assert_array_equal(y_tr[idx], task.y_train)
        assert len(set(idx.tolist())) == len(idx)
        subsets.append(set(idx.tolist()))
    # Fresh draws per task: two tasks sharing a class do not reuse the same subset throughout.
    assert len({frozenset(s) for s in subsets}) == len(subsets)
    full = D.scole(3, samples_per_class=None, seed=2)
    for task in full.tasks:
        assert len(task.y_train) == int(np.isin(y_tr, task.classes).sum())


def test_mnist1d_pool_is_standardized_and_smaller_pools_relabel_nothing():
    stream = D.scole(4, base="mnist1d", pool_size=4, samples_per_class=20, num_samples=400)
    assert stream.input_shape == (40,) and stream.num_classes == 4
    x_pool, y_pool = stream.pool_test
    assert set(np.unique(y_pool).tolist()) == {0, 1, 2, 3}
    assert x_pool.dtype == np.float32 and np.all(np.isfinite(x_pool))
    assert all(task.y_train.dtype == np.int32 for task in stream.tasks)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"base": "cifar"}, ValueError, r"scole\(base=...\) must be one of 'digits', 'mnist1d'"),
        (
            {"pool_size": 11},
            ValueError,
            r"scole\(pool_size=...\) must be at least 2 and at most 10",
        ),
        ({"pool_size": 2.0}, TypeError, r"scole\(pool_size=...\) must be an int"),
        ({"classes_per_task": 0}, ValueError, r"scole\(classes_per_task=...\) must be at least 1"),
        ({"classes_per_task": 11}, ValueError, r"at most 10, got 11"),
        ({"recurrence": 1.5}, ValueError, r"scole\(recurrence=...\) must be in \[0, 1\]"),
        ({"num_tasks": 0}, ValueError, r"scole\(num_tasks=...\) must be at least 1"),
        ({"samples_per_class": 500}, ValueError, r"scole\(samples_per_class=...\) must be at most"),
        (
            {"samples_per_class": 0},
            ValueError,
            r"scole\(samples_per_class=...\) must be at least 1",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        D.scole(**{"num_tasks": 3, **kwargs})


def test_bad_class_draw_arguments_name_scole_classes():
    with pytest.raises(ValueError, match=r"scole_classes\(classes_per_task=...\) must be at least"):
        D.scole_classes(3, pool_size=4, classes_per_task=5)
    with pytest.raises(TypeError, match=r"scole_classes\(num_tasks=...\) must be an int"):
        D.scole_classes(True)


@given(
    pool_size=st.integers(2, 10),
    k=st.integers(1, 10),
    recurrence=st.sampled_from([0.0, 0.5, 1.0]),
    spc=st.sampled_from([1, 7, None]),
    seed=st.integers(0, 1000),
)
def test_any_valid_arguments_give_well_formed_tasks(pool_size, k, recurrence, spc, seed):
    k = min(k, pool_size)
    stream = D.scole(
        3,
        pool_size=pool_size,
        classes_per_task=k,
        recurrence=recurrence,
        samples_per_class=spc,
        seed=seed,
    )
    for task in stream.tasks:
        assert task.x_train.dtype == np.float32 and task.x_train.shape[1:] == (64,)
        assert task.y_train.dtype == np.int32 and task.y_test.dtype == np.int32
        assert len(task.x_train) == len(task.y_train) > 0 and len(task.x_test) > 0
        assert task.y_train.max() < pool_size and np.isfinite(task.x_train).all()
    assert set(np.unique(stream.pool_test[1]).tolist()) == set(range(pool_size))


# ---------------------------------------------------------------------------------------------
# Knowledge accumulation in the runner.


def _np_mlp_logits(params, x: np.ndarray) -> np.ndarray:
    """The MLP in float64 NumPy: ReLU hidden layers (in index order), then the linear head."""
    h = np.asarray(x, np.float64)
    for i in sorted(params["layers"], key=int):
        layer = params["layers"][i]
        h = np.maximum(h @ np.asarray(layer["kernel"], np.float64) + layer["bias"], 0.0)
    return h @ np.asarray(params["head"]["kernel"], np.float64) + params["head"]["bias"]


def _recording(evaluated: list) -> Method:
    def start(state, ctx):
        if ctx.task_id == 0:
            evaluated.append(jax.device_get(state.params))  # the random-init model
        return state

    def end(state, ctx):
        evaluated.append(jax.device_get(state.params))  # the model evaluated at this task end
        return state

    return Method(
        "plain SGD that records the evaluated parameters",
        lambda hp: optax.sgd(0.1),
        on_task_start=start,
        on_task_end=end,
        references="-",
    )


_STREAM = D.scole(3, classes_per_task=2, samples_per_class=8, seed=7)


def test_pool_accuracy_equals_a_numpy_evaluation_at_every_task_end():
    evaluated: list = []
    spec = _recording(evaluated)
    bench = _tiny_bench(_STREAM)
    r = run(make_config(bench, "rec", method_spec=spec), stream=_STREAM, method_spec=spec)
    acc = r["accumulation"]
    x_pool, y_pool = _STREAM.pool_test
    expected = [np.mean(_np_mlp_logits(p, x_pool).argmax(-1) == y_pool) for p in evaluated]
    # One example of 360 may flip on a float32 / float64 near-tie.
    np.testing.assert_allclose(acc["task_end_acc"], expected[1:], atol=1.0 / len(y_pool) + 1e-9)
    assert acc["acc"][0] == pytest.approx(expected[0], abs=1.0 / len(y_pool) + 1e-9)
    # Same evaluation points as the periodic log; the task ends are among them.
    assert acc["step"] == r["log"]["step"] and acc["task"] == r["log"]["task"]
    ends = [acc["acc"][acc["step"].index(s)] for s in r["task_ends"]]
    assert ends == acc["task_end_acc"]
    assert acc["task_classes"] == [list(t.classes) for t in _STREAM.tasks]
    m = r["metrics"]["class"]
    assert m["pool_acc"] == acc["task_end_acc"][-1]
    assert m["pool_acc_mean"] == pytest.approx(np.mean(acc["task_end_acc"]))


def test_pool_accuracy_uses_the_methods_evaluated_parameters():
    zeros = Method(
        "evaluates an all-zero network (every logit 0: argmax is class 0)",
        lambda hp: optax.sgd(0.1),
        eval_params=lambda state, hp: jax.tree.map(lambda a: a * 0, state.params),
        references="-",
    )
    bench = _tiny_bench(_STREAM)
    r = run(make_config(bench, "zeros", method_spec=zeros), stream=_STREAM, method_spec=zeros)
    share_of_zeros = np.mean(_STREAM.pool_test[1] == 0)
    np.testing.assert_allclose(r["accumulation"]["acc"], share_of_zeros, rtol=1e-6)


def test_padded_pool_evaluation_over_devices_counts_only_real_examples():
    stream = D.scole(2, pool_size=7, samples_per_class=8, seed=1)  # 252 pool examples: padded
    assert len(stream.pool_test[1]) % 8
    bench = _tiny_bench(stream)
    one = run(make_config(bench, "naive", batch_size=8), stream=stream)
    eight = run(make_config(bench, "naive", batch_size=8, devices=8), stream=stream)
    # The random-init model is the same: its pool accuracy must be too.
    assert eight["accumulation"]["acc"][0] == pytest.approx(one["accumulation"]["acc"][0])
    np.testing.assert_allclose(
        eight["accumulation"]["acc"], one["accumulation"]["acc"], atol=3 / 252
    )


def test_resumed_run_continues_the_accumulation_curve(tmp_path):
    bench = _tiny_bench(_STREAM)
    cfg = make_config(bench, "naive")
    whole = run(cfg, stream=_STREAM)
    run(cfg, stream=_STREAM, checkpoint_dir=tmp_path, stop_after=2)
    resumed = run(cfg, stream=_STREAM, checkpoint_dir=tmp_path, resume=True)
    for key in ("step", "task", "task_end_acc"):
        assert resumed["accumulation"][key] == whole["accumulation"][key]
    np.testing.assert_allclose(resumed["accumulation"]["acc"], whole["accumulation"]["acc"])


def test_summary_and_tables_report_the_accumulation_curve():
    runs = {
        "naive": {
            str(seed): {
                "metrics": {"class": {"acc": 0.5, "pool_acc": c[-1], "pool_acc_mean": np.mean(c)}},
                "R": {"class": [[0.5]]},
                "accumulation": {"task_end_acc": c},
            }
            for seed, c in enumerate([[0.2, 0.4, 0.6, 0.8], [0.2, 0.2, 0.4, 0.6]])
        },
        "plain": {"0": {"metrics": {"class": {"acc": 0.5}}, "R": {"class": [[0.5]]}}},
    }
    summary = Res.summarize_runs(runs, ["class"])
    curve = summary["naive"]["accumulation"]
    assert [a["mean"] for a in curve] == pytest.approx([0.2, 0.3, 0.5, 0.7])
    assert curve[1]["std"] == pytest.approx(np.std([0.4, 0.2], ddof=1))
    assert "accumulation" not in summary["plain"]
    text = Res.markdown_tables(summary, ["class"])
    assert "Knowledge accumulation" in text
    assert "| naive | 70.0 ± 14.1 | 42.5 ± 10.6 | 20.0 ± 0.0 | 30.0 ± 14.1 | 50.0 ± 14.1 |" in text
    assert "| plain | - | - | - | - | - |" in text
    assert "Knowledge accumulation" not in Res.markdown_tables(
        Res.summarize_runs({"plain": runs["plain"]}, ["class"]), ["class"]
    )


def test_streams_without_a_pool_log_no_accumulation(cli_experiment):
    r = json.loads((cli_experiment.out / "runs" / "naive_seed0.json").read_text())
    assert "accumulation" not in r and "pool_acc" not in r["metrics"]["class"]
    assert "Knowledge accumulation" not in cli_experiment.stdout


def test_cli_runs_scole_digits_and_prints_the_accumulation_table(tmp_path):
    assert "scole-digits" in BENCHMARKS
    out = tmp_path / "scole"
    argv = ["run", "scole-digits", "--methods", "naive", "--out", str(out), "--tasks", "3"]
    argv += ["--steps", "4", "--eval-every", "2", "--no-progress"]
    if not HAS_MATPLOTLIB:
        argv.append("--no-plots")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    text = stdout.getvalue()
    assert "all-class ACC" in text and "## Knowledge accumulation" in text
    exp = json.loads((out / "results.json").read_text())
    assert exp["scenarios"] == ["class"] and exp["stream"]["pool_test"] == 360
    draws = D.scole_classes(3, pool_size=10, classes_per_task=2, seed=0)
    assert [t["classes"] for t in exp["stream"]["tasks"]] == [list(c) for c in draws]
    assert [t["train"] for t in exp["stream"]["tasks"]] == [80, 80, 80]
    r = exp["runs"]["naive"]["0"]
    assert len(r["accumulation"]["task_end_acc"]) == 3
    assert r["metrics"]["class"]["pool_acc"] == r["accumulation"]["task_end_acc"][-1]
    if HAS_MATPLOTLIB:
        assert (out / "accumulation.png").stat().st_size > 1000
