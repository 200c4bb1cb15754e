"""The runner end to end: outputs, no recompilation, resume, data parallelism, hooks, protocols."""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.experiments import data as D
from cljax.experiments import metrics as M
from cljax.experiments.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from cljax.experiments.methods import METHODS, Method
from cljax.experiments.models import Functional
from cljax.experiments.runner import _build_compiled, make_config, run
from tests.experiments.conftest import SMALL, small_config

_SUMMARY_KEYS = {
    "acc",
    "bwt",
    "fwt",
    "forgetting_max",
    "forgetting_first",
    "min_acc",
    "wc_acc",
    "nfr",
    "pfr",
    "final_loss",
    "delta_ce",
}


def _run_json(cli_experiment, method: str) -> dict:
    return json.loads((cli_experiment.out / "runs" / f"{method}_seed0.json").read_text())


def test_results_hold_every_number(cli_experiment):
    assert cli_experiment.code == 0
    exp = json.loads((cli_experiment.out / "results.json").read_text())
    assert exp["methods"] == ["naive", "replay"] and exp["scenarios"] == ["task", "class"]
    assert exp["config"]["replay"]["hparams"]["buffer_size"] == 200
    for method in ("naive", "replay"):
        r = exp["runs"][method]["0"]
        assert r["complete"]
        for s in ("task", "class"):
            R = np.asarray(r["R"][s])
            assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
            assert set(r["metrics"][s]) == _SUMMARY_KEYS
            assert r["metrics"][s]["acc"] == pytest.approx(R[-1].mean())
            # The stored metrics are `summarize` of the stored matrix and baseline.
            ref = M.summarize(R, r["baseline"][s])
            assert {k: r["metrics"][s][k] for k in ref} == pytest.approx(ref)
            assert set(r["continual"][s]) >= {"min_acc", "wc_acc", "aaa", "wf", "stability_gap"}
            # Task-IL accuracy is never below class-IL accuracy for the same predictions.
        assert np.all(np.asarray(r["R"]["task"]) >= np.asarray(r["R"]["class"]) - 1e-12)
        assert r["task_ends"] == [6, 12]
        assert r["log"]["step"] == [0, 3, 6, 9, 12]
        mem = r["memory"]
        assert (
            mem["total"]
            == mem["params"] + mem["optimizer_state"] + mem["cl_memory"] + mem["replay_buffer"]
        )
        assert r["compute"]["gradient_steps"] == 12
    naive, replay = exp["runs"]["naive"]["0"], exp["runs"]["replay"]["0"]
    assert naive["memory"]["replay_buffer"] == 0
    # 200 stored digits: 64 float32 pixels, an int32 label and an int32 task id each.
    assert replay["memory"]["replay_buffer"] == 200 * (64 * 4 + 4 + 4) + 4 + 2 * 4
    assert replay["compute"]["examples_per_step"] == 2 * naive["compute"]["examples_per_step"]
    assert naive["memory"]["params"] == (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10) * 4
    assert (
        naive["memory"]["optimizer_state"] == 2 * naive["memory"]["params"] + 4
    )  # Adam: mu, nu, count
    summary = exp["summary"]["replay"]["metrics"]["class"]["acc"]
    assert summary["n"] == 1 and summary["mean"] == pytest.approx(replay["metrics"]["class"]["acc"])


def test_task_il_accuracy_masks_logits_to_the_task_classes():
    # A "model" that returns its input: the evaluation sees chosen logits directly.
    identity = Functional(None, lambda p, x: x, lambda p, x: {}, lambda p, x: {})
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50, 6)).astype(np.float32)
    y = np.stack([rng.integers(0, 3, 50), rng.integers(3, 6, 50)]).astype(np.int32)
    mask = np.ones((2, 50), bool)
    mask[1, 40:] = False  # padding
    classes = np.zeros((2, 6), bool)
    classes[0, :3] = classes[1, 3:] = True
    out = jax.device_get(_build_compiled(identity).evaluate(None, logits, y, mask, classes))
    for t in range(2):
        m = mask[t]
        pred_all = logits[t].argmax(-1)
        pred_task = np.where(classes[t][None, :], logits[t], -np.inf).argmax(-1)
        assert out["acc"][t] == pytest.approx(np.mean(pred_all[m] == y[t][m]))
        assert out["acc_task"][t] == pytest.approx(np.mean(pred_task[m] == y[t][m]))
        assert out["acc_task"][t] >= out["acc"][t]
        inside = classes[t][pred_all]  # masking never changes a prediction already in the task
        np.testing.assert_array_equal(pred_task[inside], pred_all[inside])
        z = logits[t].astype(np.float64)
        ce = np.log(np.exp(z).sum(-1)) - z[np.arange(50), y[t]]
        assert out["loss"][t] == pytest.approx(np.mean(ce[m]), rel=1e-5)


def test_no_recompilation_across_tasks(cli_experiment):
    for method in ("naive", "replay"):
        comp = _run_json(cli_experiment, method)["compilations"]
        assert comp["traces"] == {"train_chunk": 1}
        assert comp["xla_per_task"][1:] == [0] * (len(comp["xla_per_task"]) - 1)


def test_resume_equals_an_uninterrupted_run(cli_experiment, tmp_path):
    cfg = small_config("naive")
    partial = run(cfg, checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    assert not partial["complete"] and len(partial["R"]["class"]) == 1
    resumed = run(cfg, checkpoint_dir=tmp_path / "ckpt", resume=True)
    full = _run_json(cli_experiment, "naive")
    for key in (
        "R",
        "baseline",
        "loss_matrix",
        "log",
        "train_loss",
        "plasticity",
        "flips",
        "metrics",
        "continual",
        "memory",
        "task_ends",
    ):
        assert resumed[key] == full[key], key
    with pytest.raises(ValueError, match="other settings .*steps_per_task"):
        run(small_config("naive", steps_per_task=5), checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(ValueError, match="needs a `checkpoint_dir`"):
        run(cfg, resume=True)


def test_data_parallel_over_8_devices_matches_one_device(cli_experiment):
    assert len(jax.devices()) >= 8
    r8 = run(small_config("replay", devices=8))
    r1 = _run_json(cli_experiment, "replay")
    np.testing.assert_allclose(r8["train_loss"]["loss"], r1["train_loss"]["loss"], rtol=1e-4)
    for s in ("task", "class"):
        np.testing.assert_allclose(r8["R"][s], r1["R"][s], atol=2 / 180)
    with pytest.raises(ValueError, match="does not divide over 3 devices"):
        small_config("naive", devices=3)
    with pytest.raises(ValueError, match="only .* device"):
        run(small_config("naive", devices=64, batch_size=64))


class _ProbeState(NamedTuple):
    count: jax.Array
    memory_norm: jax.Array


def _needs_memory_grads() -> optax.GradientTransformationExtraArgs:
    """A transform that requires A-GEM's and GEM's extra arguments and records what it got."""

    def init(params):
        del params
        return _ProbeState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

    def update(updates, state, params=None, *, memory_grads, task_grads, **extra):
        del params, extra
        grads, valid = task_grads
        assert jax.tree.leaves(grads)[0].shape[0] == 2 and valid.shape == (2,)
        return updates, _ProbeState(state.count + 1, optax.tree.norm(memory_grads))

    return optax.GradientTransformationExtraArgs(init, update)


def _probe_task_end(state, ctx):
    acts = ctx.layer_inputs(state.params, 16)
    fisher = ctx.empirical_fisher(state.params, 32, batch_size=16)
    energy = sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(acts))
    return state._replace(
        extra={"fisher": fisher, "energy": energy, "tasks": state.extra["tasks"] + 1}
    )


PROBE = Method(
    "a method that uses every hook input",
    lambda hp: optax.chain(_needs_memory_grads(), optax.sgd(hp["learning_rate"])),
    defaults={"buffer_size": 16},
    buffer="per_task",
    init_extra=lambda params, hp: {
        "fisher": jax.tree.map(jnp.zeros_like, params),
        "energy": jnp.zeros([]),
        "tasks": jnp.zeros([], jnp.int32),
    },
    on_task_end=_probe_task_end,
    step_extras=lambda ctx: {"memory_grads": ctx.memory_grads(), "task_grads": ctx.task_grads()},
    cl_state_types=(_ProbeState,),
    references="-",
)


def test_custom_method_hooks_reach_the_jitted_step_and_never_recompile():
    cfg = make_config("split-digits", "probe", method_spec=PROBE, **SMALL)
    r = run(cfg, method_spec=PROBE)
    assert r["complete"]
    assert r["compilations"]["xla_per_task"][1] == 0
    assert r["compilations"]["traces"]["train_chunk"] == 1
    assert r["memory"]["cl_memory"] > r["memory"]["params"]  # Fisher + probe state
    assert r["memory"]["replay_buffer"] > 0


def test_online_protocol_sees_each_example_at_most_once():
    cfg = make_config(
        "online-split-digits", "naive", num_tasks=2, eval_subsample=180, eval_every=50
    )
    stream = get_benchmark("online-split-digits").stream(2)
    r = run(cfg, stream=stream)
    steps = [len(t.x_train) // 10 for t in stream.tasks]
    assert r["compute"]["gradient_steps"] == sum(steps)
    assert r["task_ends"] == [steps[0], steps[0] + steps[1]]
    assert r["log"]["step"] == [0, 50, steps[0], steps[0] + 50, sum(steps)]


@pytest.mark.slow
def test_language_model_stream_runs_end_to_end():
    bench = Benchmark(
        "tiny char LM",
        lambda n: D.char_lm(("prose", "code"), context=16, max_chars=2000),
        "tiny_llama",
        {"dim": 16, "depth": 1, "heads": 2},
        steps_per_task=4,
        eval_every=2,
        eval_subsample=12,
        batch_size=8,
    )
    stream = bench.stream(None)
    r = run(make_config(bench, "replay", overrides={"replay.buffer_size": 8}), stream=stream)
    assert r["complete"] and np.asarray(r["R"]["domain"]).shape == (2, 2)
    assert 0.0 <= r["metrics"]["domain"]["acc"] <= 1.0
    assert r["plasticity"]["dead_fraction"] == [None, None]  # SwiGLU units are not ReLU units
    # The loss matrix is the next-character cross-entropy: about log(96) or more untrained, and
    # training on the first domain lowers it.
    assert r["baseline_loss"][0] > 0.9 * np.log(D.CHAR_VOCAB_SIZE)
    assert r["loss_matrix"][0][0] < r["baseline_loss"][0]


def test_run_and_experiment_argument_errors(tmp_path):
    from cljax.experiments import experiment

    with pytest.raises(ValueError, match="char-lm has 4 text domains"):
        get_benchmark("char-lm").stream(5)
    tiny = Benchmark("tiny", lambda n: D.split_digits(), "mlp", batch_size=400, online=True)
    with pytest.raises(ValueError, match="pass `stream=`"):
        run(make_config(tiny, "naive"))
    with pytest.raises(ValueError, match="online mode needs at least one batch"):
        run(make_config(tiny, "naive"), stream=tiny.stream(None))
    with pytest.raises(ValueError, match="`methods` is empty"):
        experiment.run_experiment("split-digits", [], out=tmp_path)
    with pytest.raises(ValueError, match="`seeds` is empty"):
        experiment.run_experiment("split-digits", ["naive"], seeds=[], out=tmp_path)


def test_plots_need_matplotlib(monkeypatch):
    import sys

    from cljax.experiments import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        plots.plot_accuracy_matrix([[1.0]], "unused.png")


def test_make_config_validates():
    with pytest.raises(ValueError, match="unknown benchmark 'mnist'"):
        make_config("mnist", "naive")
    with pytest.raises(ValueError, match="unknown method 'ewcc'"):
        make_config("split-digits", "ewcc")
    with pytest.raises(ValueError, match="steps_per_task"):
        make_config("split-digits", "naive", steps_per_task=-1)
    with pytest.raises(ValueError, match="num_tasks"):
        make_config("split-digits", "naive", num_tasks=0)
    cfg = make_config("split-digits", "naive", model="cnn")
    assert cfg.model == "cnn" and dict(cfg.model_kwargs) == {}


# ---------------------------------------------------------------------------------------------
# Slow: every registered method and every benchmark at a tiny budget.


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_without_recompiling(method):
    r = run(small_config(method))
    assert r["complete"]
    assert r["compilations"]["xla_per_task"][1:] == [0]
    for s in ("task", "class"):
        assert all(v is None or np.isfinite(v) for v in r["metrics"][s].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_runs(name):
    bench = BENCHMARKS[name]
    tasks = 2 if name != "split-digits-domain" else 5
    cfg = make_config(name, "naive", num_tasks=tasks, steps_per_task=4, eval_every=2)
    r = run(cfg)
    assert r["complete"] and len(r["task_ends"]) == tasks
    assert set(r["metrics"]) == set(bench.stream(tasks).scenarios)
