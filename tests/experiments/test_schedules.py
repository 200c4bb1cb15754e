"""Continual pre-training (EX-21): learning-rate schedules of a run, replay fraction, loss tables."""

from __future__ import annotations

import contextlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.experiments import replay as Rp
from cljax.experiments import results as Rs
from cljax.experiments.benchmarks import get_benchmark
from cljax.experiments.cli import main
from cljax.experiments.experiment import run_experiment
from cljax.experiments.methods import METHODS, RUN_SETTINGS, Method, check_overrides
from cljax.experiments.runner import (
    SCHEDULES,
    learning_rate_schedule,
    make_config,
    preflight,
    run,
)

# Two tasks of five digit classes, 5 steps each in chunks of 2 (the last chunk is padded).
_TINY = {"num_tasks": 2, "steps_per_task": 5, "eval_every": 2, "eval_subsample": 20}


def _reference_lr(t: int, settings: dict, peak: float, task_steps: list[int]) -> float:
    """The schedule written out in float64: warm-up + cosine per task or over the whole run."""
    w, low = settings["warmup_steps"], settings["min_lr_ratio"] * peak
    if settings["schedule"] == "cosine":
        s, n = t, sum(task_steps)
    else:
        start = 0
        for n in task_steps:
            if t < start + n:
                break
            start += n
        s = t - start if t < sum(task_steps) else t - (sum(task_steps) - task_steps[-1])
        n = task_steps[-1] if t >= sum(task_steps) else n
    if s < w:
        return peak * s / w
    s = min(s, n)
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * (s - w) / (n - w)))


def _check_against_reference(settings, peak, task_steps, ts):
    lr = learning_rate_schedule(settings, peak, task_steps)
    got = np.asarray([float(lr(jnp.int32(t))) for t in ts])
    want = np.asarray([_reference_lr(t, settings, peak, task_steps) for t in ts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * peak)
    return got


def test_rewarm_cosine_matches_the_formula_around_task_boundaries():
    settings = {"schedule": "rewarm_cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}
    steps, peak = [10, 10, 10], 2e-3
    got = _check_against_reference(settings, peak, steps, range(32))
    for b in (0, 10, 20):  # warm-up starts at 0, peaks after W steps, decays towards eta_min
        assert got[b] == 0.0
        assert got[b + 3] == pytest.approx(peak, rel=1e-6)
        assert got[b + 9] > 0.1 * peak
    assert got[30] == pytest.approx(0.1 * peak, rel=1e-6)  # the end of the last decay
    # OT-04: the re-warmed schedule is the first task's schedule shifted to each boundary.
    np.testing.assert_array_equal(got[10:20], got[:10])
    np.testing.assert_array_equal(got[20:30], got[:10])


def test_rewarm_cosine_with_unequal_tasks_and_no_warmup():
    settings = {"schedule": "rewarm_cosine", "warmup_steps": 0, "min_lr_ratio": 0.0}
    got = _check_against_reference(settings, 1.0, [4, 7, 5], range(18))
    assert got[0] == got[4] == got[11] == pytest.approx(1.0)  # no warm-up: each task starts at peak


def test_cosine_over_the_whole_run_ignores_task_boundaries():
    settings = {"schedule": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1}
    got = _check_against_reference(settings, 1e-2, [10, 10, 10], range(33))
    assert got[4] == pytest.approx(1e-2, rel=1e-6) and np.all(np.diff(got[4:31]) < 0)
    assert got[30] == got[32] == pytest.approx(1e-3, rel=1e-6)


@settings(deadline=None)
@given(
    name=st.sampled_from(["cosine", "rewarm_cosine"]),
    steps=st.lists(st.integers(2, 12), min_size=1, max_size=4),
    warm=st.integers(0, 10),
    ratio=st.floats(0.0, 1.0),
    peak=st.floats(1e-5, 1.0),
)
def test_schedule_property_matches_reference_and_stays_in_range(name, steps, warm, ratio, peak):
    warm = min(warm, min(steps) - 1)
    settings = {"schedule": name, "warmup_steps": warm, "min_lr_ratio": ratio}
    got = _check_against_reference(settings, peak, steps, range(sum(steps) + 2))
    assert np.all(np.isfinite(got)) and np.all(got >= 0) and np.all(got <= peak * (1 + 1e-6))


def test_constant_schedule_is_none_and_settings_are_normalised():
    assert learning_rate_schedule({}, 1e-3, [5, 5]) is None
    cfg = make_config("split-digits", "naive", **_TINY)
    assert cfg.schedule == {} and "schedule" not in cfg.to_json()
    assert make_config("split-digits", "naive", overrides={"schedule": "constant"}, **_TINY) == cfg
    cfg = make_config("split-digits", "naive", overrides={"schedule": "cosine"}, steps_per_task=40)
    assert cfg.schedule == {"schedule": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1}
    assert cfg.to_json()["schedule"] == cfg.schedule
    assert set(RUN_SETTINGS) == {"schedule", "warmup_steps", "min_lr_ratio"}
    assert SCHEDULES == ("constant", "cosine", "rewarm_cosine")
    check_overrides({"naive": METHODS["naive"]}, {"schedule": "cosine", "min_lr_ratio": 0.0})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"schedule": "step"}, "unknown learning-rate schedule 'step'; choose from: constant"),
        ({"warmup_steps": 3}, "warmup_steps set with a constant learning rate"),
        ({"schedule": "cosine", "warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"schedule": "cosine", "warmup_steps": 1.5}, "warmup_steps must be an int >= 0"),
        ({"schedule": "cosine", "min_lr_ratio": 2.0}, r"min_lr_ratio must be a number in \[0, 1\]"),
    ],
)
def test_schedule_settings_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config("split-digits", "naive", overrides=overrides, **_TINY)


def test_warmup_longer_than_a_task_is_refused():
    settings = {"schedule": "rewarm_cosine", "warmup_steps": 5, "min_lr_ratio": 0.1}
    with pytest.raises(ValueError, match=r"warmup_steps=5 must be shorter than a task \(5 steps\)"):
        learning_rate_schedule(settings, 1e-3, [5, 5])
    with pytest.raises(ValueError, match=r"shorter than task 1 \(3 steps\)"):
        learning_rate_schedule(settings, 1e-3, [6, 3])
    with pytest.raises(ValueError, match=r"shorter than the run \(10 steps\)"):
        learning_rate_schedule({**settings, "schedule": "cosine", "warmup_steps": 10}, 1.0, [5, 5])


# ---------------------------------------------------------------------------------------------
# The schedule inside the runner.

_STREAM = get_benchmark("split-digits").stream(2)


def _ones() -> optax.GradientTransformation:
    """Every update leaf set to ones: the step moves each parameter by exactly -lr_t."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(jnp.ones_like, updates))


def _probe_method(restart: bool) -> tuple[Method, list]:
    """A method whose parameters move by -lr_t per step; it records the parameters at task ends."""
    seen: list = []

    def end(state, ctx):
        seen.append(float(np.asarray(jax.device_get(state.params["head"]["bias"]))[0]))
        return state

    def start(state, ctx):  # a fresh optimizer state (its schedule count back to 0) per task
        return state._replace(opt_state=ctx.tx.init(state.params)) if restart else state

    spec = Method(
        "probe",
        lambda hp: optax.chain(_ones(), optax.scale_by_learning_rate(hp["learning_rate"])),
        on_task_start=start,
        on_task_end=end,
    )
    return spec, seen


def _bias0(cfg) -> float:
    """The probe's initial first head bias (the model initialised with the config's seed)."""
    from flax import nnx

    from cljax.experiments.models import build_model

    net = build_model(
        cfg.model, _STREAM.input_shape, _STREAM.num_classes, seed=cfg.seed, **cfg.model_kwargs
    )
    return float(np.asarray(nnx.to_pure_dict(nnx.state(net))["head"]["bias"])[0])


@pytest.mark.parametrize(("schedule", "restart"), [("rewarm_cosine", False), ("cosine", True)])
def test_the_run_step_drives_the_schedule_without_recompiling(schedule, restart):
    # With `restart` a hook re-initialises the optimizer (count 0) at every task start; the
    # schedule still follows the run's step, so the whole-run cosine does not restart.
    spec, seen = _probe_method(restart)
    overrides = {"schedule": schedule, "warmup_steps": 2, "min_lr_ratio": 0.2}
    cfg = make_config("split-digits", "probe", method_spec=spec, overrides=overrides, **_TINY)
    result = run(cfg, stream=_STREAM, method_spec=spec)
    peak, b0 = cfg.hparams["learning_rate"], _bias0(cfg)
    lrs = [_reference_lr(t, cfg.schedule, peak, [5, 5]) for t in range(10)]
    # Each step moves the bias by -lr_t (padded steps of the last chunk move nothing).
    np.testing.assert_allclose(seen, [b0 - sum(lrs[:5]), b0 - sum(lrs)], rtol=1e-5, atol=1e-8)
    assert result["compilations"]["traces"]["train_chunk"] == 1
    assert result["compilations"]["xla_per_task"][1:] == [0]


def test_constant_is_bit_identical_to_a_flat_schedule_and_the_default():
    base = run(make_config("split-digits", "naive", **_TINY), stream=_STREAM)
    flat = {"schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 1.0}  # eta_t = eta_max
    other = run(make_config("split-digits", "naive", overrides=flat, **_TINY), stream=_STREAM)
    for key in ("R", "loss_matrix", "train_loss", "log", "baseline"):
        assert other[key] == base[key], key
    assert "schedule" not in base["config"] and other["config"]["schedule"] == flat


def test_resume_with_a_schedule_equals_an_uninterrupted_run(tmp_path):
    overrides = {"schedule": "cosine", "warmup_steps": 2}
    cfg = make_config("split-digits", "naive", overrides=overrides, **_TINY)
    full = run(cfg, stream=_STREAM)
    run(cfg, stream=_STREAM, checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    resumed = run(cfg, stream=_STREAM, checkpoint_dir=tmp_path / "ckpt", resume=True)
    for key in ("R", "loss_matrix", "train_loss", "log"):
        assert resumed[key] == full[key], key
    other = make_config("split-digits", "naive", overrides={"schedule": "rewarm_cosine"}, **_TINY)
    with pytest.raises(ValueError, match="other settings .*schedule"):
        run(other, stream=_STREAM, checkpoint_dir=tmp_path / "ckpt", resume=True)


def test_methods_that_cannot_take_a_schedule_are_refused_in_preflight():
    sched = {"schedule": "cosine"}
    cfg = make_config("split-digits", "gem", overrides={**sched, "gem.where": "update"}, **_TINY)
    with pytest.raises(ValueError, match="method 'gem' cannot take the learning-rate schedule"):
        preflight(cfg, _STREAM)
    preflight(make_config("split-digits", "gem", overrides=sched, **_TINY), _STREAM)
    fixed = Method("fixed", lambda hp: optax.sgd(0.1))  # ignores hp['learning_rate']
    cfg = make_config("split-digits", "fixed", method_spec=fixed, overrides=sched, **_TINY)
    with pytest.raises(ValueError, match=r"method 'fixed' cannot .* does not scale by hp\["):
        preflight(cfg, _STREAM, fixed)
    preflight(make_config("split-digits", "fixed", method_spec=fixed, **_TINY), _STREAM, fixed)
    text = Method("text", optax.adam, defaults={"learning_rate": "high"})
    cfg = make_config("split-digits", "text", method_spec=text, overrides=sched, **_TINY)
    with pytest.raises(ValueError, match="its learning_rate 'high' is not a number"):
        preflight(cfg, _STREAM, text)
    out = io.StringIO()
    with pytest.raises(SystemExit) as err, contextlib.redirect_stderr(out):
        main(
            ["run", "split-digits", "--methods", "gem", "--set", "schedule=rewarm_cosine"]
            + ["--set", "gem.where=update", "--steps", "5", "--tasks", "2"]
        )
    assert err.value.code == 2 and "method 'gem' cannot take" in out.getvalue()


@pytest.mark.slow
def test_every_registered_method_takes_a_schedule():
    for name in METHODS:
        cfg = make_config("split-digits", name, overrides={"schedule": "rewarm_cosine"}, **_TINY)
        preflight(cfg, _STREAM)  # every registered method's default takes one


# ---------------------------------------------------------------------------------------------
# Replay as a fraction of each batch.

_mix = jax.jit(Rp.buffer_mix)


def _filled_buffer():
    """Capacity 12: four examples of tasks 0, 1 and 2 (labels 10 + task, inputs the slot id)."""
    buf = Rp.buffer_init(12, jnp.zeros(2), jnp.zeros((), jnp.int32), num_tasks=3)
    for t in range(3):
        x = jnp.full((4, 2), 1.0 + t)
        buf = Rp.buffer_add(buf, x, jnp.full((4,), 10 + t, jnp.int32), t, jax.random.key(t))
    return buf


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.25, 1.0])
def test_replay_fraction_matches_the_setting_in_expectation(fraction):
    buf, b, n = _filled_buffer(), 64, 200
    x, y = jnp.zeros((b, 2)), jnp.zeros((b,), jnp.int32)
    keys = jax.random.split(jax.random.key(7), n)
    xs, ys, rep = jax.vmap(lambda k: _mix(buf, k, x, y, 2, fraction))(keys)
    rep = np.asarray(rep)
    realised = rep.mean()
    sd = math.sqrt(fraction * (1 - fraction) / rep.size)
    assert abs(realised - fraction) <= 4 * sd + 1e-12
    ys, xs = np.asarray(ys), np.asarray(xs)
    assert set(np.unique(ys[rep]).tolist()) <= {10, 11}  # only earlier tasks (< 2) are replayed
    assert np.all(ys[~rep] == 0) and np.all(xs[~rep] == 0)
    np.testing.assert_array_equal(xs[rep][:, 0], ys[rep] - 9.0)  # inputs travel with their labels


def test_replay_fraction_replaces_nothing_without_earlier_tasks():
    buf = _filled_buffer()
    x, y = jnp.zeros((8, 2)), jnp.zeros((8,), jnp.int32)
    _, y0, rep = _mix(buf, jax.random.key(0), x, y, 0, 1.0)  # task 0: nothing earlier is stored
    assert not np.any(np.asarray(rep)) and np.all(np.asarray(y0) == 0)


@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(1, 9),
    fraction=st.floats(0.0, 1.0),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_replay_mix_keeps_shapes_and_dtypes(b, fraction, dtype):
    buf = _filled_buffer()
    x, y = jnp.zeros((b, 2), dtype), jnp.zeros((b,), jnp.int32)
    xm, ym, rep = Rp.buffer_mix(buf, jax.random.key(b), x, y, 1, fraction)
    assert xm.shape == x.shape and xm.dtype == x.dtype and ym.dtype == y.dtype
    assert rep.shape == (b,) and rep.dtype == jnp.bool_


def test_replay_fraction_in_the_runner_and_its_validation():
    cfg = make_config("split-digits", "replay", overrides={"replay.replay_fraction": 0.25}, **_TINY)
    result = run(cfg, stream=_STREAM)
    assert result["compute"]["examples_per_step"] == cfg.batch_size  # no extra examples
    assert result["compilations"]["xla_per_task"][1:] == [0]
    default = make_config("split-digits", "replay", **_TINY)
    assert default.hparams["replay_fraction"] is None
    bad = make_config("split-digits", "replay", overrides={"replay.replay_fraction": 1.5}, **_TINY)
    with pytest.raises(ValueError, match="'replay_fraction' must be None .* or a number in"):
        preflight(bad, _STREAM)


# ---------------------------------------------------------------------------------------------
# Loss tables and the command line.


def _reference_curves(log):
    up, down = [], []
    for k, row in zip(log["task"], log["loss"], strict=True):
        if k >= 0:
            up.append(sum(row[:k]) / k if k else None)
            down.append(row[k])
    return up, down


def test_cli_run_with_a_schedule_and_the_loss_table(tmp_path):
    out = tmp_path / "cpt"
    args = ["run", "split-digits", "--methods", "replay", "--out", str(out), "--no-progress"]
    args += ["--no-plots", "--tasks", "2", "--steps", "5", "--eval-every", "2"]
    args += ["--set", "schedule=rewarm_cosine", "--set", "warmup_steps=1"]
    args += ["--set", "replay.replay_fraction=0.25"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    exp = json.loads((out / "results.json").read_text())
    cfg = exp["config"]["replay"]
    assert cfg["schedule"] == {"schedule": "rewarm_cosine", "warmup_steps": 1, "min_lr_ratio": 0.1}
    assert cfg["hparams"]["replay_fraction"] == 0.25
    r = exp["runs"]["replay"]["0"]
    curves = Rs.loss_curves(r)
    up, down = _reference_curves(r["log"])
    assert curves["upstream"] == pytest.approx(up) and curves["downstream"] == pytest.approx(down)
    L = np.asarray(r["loss_matrix"])
    summary = Rs.loss_over_time(r)
    assert summary["final_upstream"] == pytest.approx(L[1, 0])
    assert summary["final_downstream"] == pytest.approx(L[1, 1])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["compare", "--losses", str(out)]) == 0
    row = stdout.getvalue().strip().splitlines()[-1]
    assert "rewarm_cosine (warm-up 1, min 0.1), replay 0.25" in row
    assert f"{summary['final_upstream']:.2f}" in row


def test_run_experiment_refuses_before_any_run(tmp_path):
    overrides = {"schedule": "cosine", "gem.where": "update"}
    with pytest.raises(ValueError, match="method 'gem' cannot take the learning-rate schedule"):
        run_experiment("split-digits", ["naive", "gem"], out=tmp_path / "x", overrides=overrides)
    assert not (tmp_path / "x").exists()
