"""The example notebook runs: its code cells are executed in order (no Jupyter needed)."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "continual_learning.ipynb"


def test_notebook_code_cells_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CLJAX_EXAMPLE_STEPS", "3")
    monkeypatch.chdir(tmp_path)
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    namespace: dict = {"__name__": "__notebook__"}
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells and all(not c["outputs"] for c in cells)  # stored without outputs
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}[{i}]", "exec"), namespace)
    results = namespace["results"]
    assert set(results) == {"naive", "replay", "cautious-replay"}
    assert all(r["complete"] and len(r["R"]["class"]) == 5 for r in results.values())
    if namespace.get("plt") is not None:
        namespace["plt"].close("all")
