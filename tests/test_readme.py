"""README.md's Python examples run as written, and the task-boundary example shows EWC working."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(source: str) -> str:
    out = io.StringIO()
    # User code, as a user runs it: JAX's default rank promotion, not the suite's strict setting.
    with contextlib.redirect_stdout(out), jax.numpy_rank_promotion("allow"):
        exec(compile(source, str(README), "exec"), {"__name__": "readme"})
    return out.getvalue()


def test_readme_has_the_two_examples():
    assert len(BLOCKS) == 2, f"README.md has {len(BLOCKS)} python blocks; this test expects 2"


def test_chain_example_trains():
    printed = _run(BLOCKS[0])
    before, after = (float(v) for v in re.findall(r"loss (?:before|after 500 steps): ([0-9.e+-]+)", printed))
    assert after < 1e-2 * before


def _task_losses(printed: str) -> list[list[float]]:
    return [[float(v) for v in row.split(", ")] for row in re.findall(r"losses \[([^\]]*)\]", printed)]


def test_task_boundary_example_keeps_the_first_task():
    source = BLOCKS[1]
    assert "strength=10.0" in source
    with_ewc = _task_losses(_run(source))
    naive = _task_losses(_run(source.replace("strength=10.0", "strength=0.0")))
    assert len(with_ewc) == len(naive) == 2
    assert with_ewc[0] == pytest.approx(naive[0])  # identical until the first consolidation
    assert with_ewc[1][0] < 0.5 * naive[1][0], "EWC should keep the first task's loss well below naive"
    assert naive[1][1] < with_ewc[1][1]  # and pays for it on the second task
