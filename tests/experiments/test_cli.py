"""The command line: outputs of `run`, `list`, `compare`, `--resume`, and clear errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest

from cljax.experiments import cli
from cljax.experiments.benchmarks import BENCHMARKS
from cljax.experiments.methods import METHODS
from tests.experiments.conftest import HAS_MATPLOTLIB, SMALL_ARGS


def _fails(capsys, argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_run_prints_the_table_and_writes_every_output(cli_experiment):
    assert cli_experiment.code == 0
    out = cli_experiment.out
    assert "naive seed 0: ACC (class-IL)" in cli_experiment.stdout
    assert (
        "| method | ACC | BWT | FWT | F_max | F_first | min-ACC | WC-ACC |" in cli_experiment.stdout
    )
    assert (out / "results.md").read_text() in cli_experiment.stdout
    for name in ("results.json", "runs/naive_seed0.json", "runs/replay_seed0.json"):
        assert (out / name).is_file(), name
    assert any((out / "checkpoints" / "replay_seed0").iterdir())
    exp = json.loads((out / "results.json").read_text())
    assert exp["versions"]["jax"] and exp["stream"]["tasks"][0]["classes"] == [0, 1, 2, 3, 4]
    if HAS_MATPLOTLIB:
        for name in (
            "heatmap_naive_class.png",
            "heatmap_replay_task.png",
            "curves_naive.png",
            "acc_vs_memory.png",
        ):
            assert (out / name).stat().st_size > 1000, name


def test_resume_reuses_finished_runs(cli_experiment, capsys, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cli_experiment.out, out)
    before = json.loads((out / "runs" / "naive_seed0.json").read_text())
    argv = [
        "run",
        "split-digits",
        "--methods",
        "naive",
        "--out",
        str(out),
        "--resume",
        "--no-plots",
        "--no-progress",
        *SMALL_ARGS,
    ]
    assert cli.main(argv) == 0
    assert "naive seed 0" in capsys.readouterr().out
    after = json.loads((out / "runs" / "naive_seed0.json").read_text())
    assert after == before  # loaded, not re-run (the wall time would differ)
    assert json.loads((out / "results.json").read_text())["methods"] == ["naive"]


def test_list_names_every_benchmark_and_method(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (*BENCHMARKS, *METHODS):
        assert f"  {name} " in out, name


def test_compare_builds_one_table(cli_experiment, capsys):
    assert cli.main(["compare", str(cli_experiment.out), str(cli_experiment.out)]) == 0
    out = capsys.readouterr().out
    assert out.count("| split-digits | class | replay |") == 2
    _fails(capsys, ["compare", str(cli_experiment.out / "missing")], "no results.json")


def test_unknown_benchmark_or_method_fails_with_the_choices(capsys):
    _fails(capsys, ["run", "mnist"], "unknown benchmark 'mnist'; choose from: split-digits")
    _fails(
        capsys,
        ["run", "split-digits", "--methods", "naive,ewcc"],
        "unknown method(s) 'ewcc'; choose from: naive",
    )


def test_bad_arguments_fail_clearly(capsys, tmp_path):
    out = str(tmp_path / "x")
    _fails(capsys, ["run", "split-digits", "--seeds", "a,b"], "comma-separated integers")
    _fails(capsys, ["run", "split-digits", "--methods", ","], "comma-separated names")
    _fails(capsys, ["run", "split-digits", "--set", "lr"], "KEY=VALUE")
    _fails(
        capsys,
        ["run", "split-digits", "--out", out, "--set", "replay.nope=1"],
        "method 'replay' has no hyper-parameter 'nope'",
    )
    _fails(
        capsys,
        ["run", "split-digits", "--out", out, "--set", "decay=0.5"],
        "no selected method has 'decay'",
    )
    _fails(capsys, ["run", "split-digits", "--out", out, "--tasks", "3"], "divide the 10 classes")
    _fails(
        capsys,
        ["run", "split-digits", "--out", out, "--batch-size", "30", "--devices", "8"],
        "does not divide over 8 devices",
    )
    _fails(capsys, ["frobnicate"], "invalid choice")


def test_a_method_that_refuses_the_model_fails_before_any_run(capsys, tmp_path):
    out = tmp_path / "cnn"
    argv = ["run", "split-digits", "--out", str(out), "--methods", "naive,cbp", "--model", "cnn"]
    _fails(capsys, [*argv, *SMALL_ARGS, "--no-plots"], "method 'cbp'")
    assert not (out / "runs").exists()  # naive, listed first, did not train


def test_parsers():
    assert cli._assignment("replay.buffer_size=500") == ("replay.buffer_size", 500)
    assert cli._assignment("learning_rate=3e-3") == ("learning_rate", 3e-3)
    assert cli._assignment("restart=True") == ("restart", True)
    assert cli._assignment("name=adam") == ("name", "adam")
    assert cli._int_list("0,1, 2") == [0, 1, 2]
    args = cli.build_parser().parse_args(["run", "split-digits"])
    assert args.methods == ["naive", "replay"] and args.seeds == [0] and args.devices == 1


def test_devices_flag_requests_host_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo")
    cli._ensure_host_devices(4)
    assert cli.os.environ["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
    cli._ensure_host_devices(2)  # already set: unchanged
    assert cli.os.environ["XLA_FLAGS"].count("device_count") == 1


@pytest.mark.slow
def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "cljax.experiments", "list"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "split-digits" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "cljax.experiments", "run", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "unknown benchmark 'nope'" in done.stderr


def test_main_is_importable_without_running():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        import cljax.experiments.__main__  # noqa: F401  (guarded by __name__)
    assert buffer.getvalue() == ""
