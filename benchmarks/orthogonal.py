"""Step time and memory of the orthogonal family against optax.adamw, at 0, 5 and 20 stored tasks.

Uses the LLaMA-60M-like tree, the donated jitted step and the round-robin timing of
`benchmarks/step_time.py`. Every entry is a whole optimizer around ``optax.adamw(1e-3)``; the
projection constrains adamw's final update (``inner=adamw``, ``where='update'``):

* ``gpm(adamw)`` with bases sized and filled for 0, 5 and 20 tasks: each task adds about
  ``--directions`` input directions per matrix (`gpm_add_task` on random activations at threshold
  1), and the capacity is ``tasks * directions`` (the step cost follows the capacity, not the
  count). The embedding (a lookup, not a matmul on inputs) is not projected.
* ``cuber(adamw)`` with the same bases, one column block per task, after one `cuber_correlate`
  on a random gradient (the step projects with per-task scales instead of GPM's single basis).
* ``ogd(adamw)`` with ``--ogd-per-task`` stored whole-model vectors per task.
* ``agem(adamw)`` with one memory gradient, and ``gem(adamw)`` with one memory gradient per stored
  task, passed as extra arguments (the extra backward passes that compute them are not timed).
* ``osft(adamw)`` preserving half of every matrix's rank (PEFT's default), after one
  `osft_decompose` (its "memory per task" column is the frozen factors, not per task);
* ``auon`` (AuON on the matrices, Adam on the other leaves), the Muon-style alternative.

Reported: median step time, the median over rounds of the ratio to optax.adamw in the same
round, optimizer-state bytes relative to adamw's, and the continual-learning memory per stored
task (bases or stored vectors in the state, or memory gradients passed each step; at capacity).

Usage:
    python benchmarks/orthogonal.py                 # full tree (58.1 M params; GEM/OGD at 20
                                                    #   tasks hold 20 copies of the gradients)
    python benchmarks/orthogonal.py --small         # a small tree, a quick check
    python benchmarks/orthogonal.py --mid           # a 7.3 M-parameter tree (memory scaling)
    python benchmarks/orthogonal.py --only gpm,gem --tasks 0,5,20
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as _st  # noqa: E402  (the shared tree builder and timing loop)

import cljax  # noqa: E402

LEARNING_RATE = 1e-3


def _not_embedding(path: str, shape: tuple[int, ...]):
    return None if path == "embed" or len(shape) < 2 else cljax.MatrixSpec()


def _random_like(params, key, lead=()):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            1e-3 * jax.random.normal(k, lead + p.shape, jnp.float32)
            for k, p in zip(keys, leaves, strict=True)
        ],
    )


def _gpm_entry(params, tasks: int, directions: int):
    capacity = max(1, tasks * directions)
    tx = cljax.gpm(capacity, spec=_not_embedding, inner=optax.adamw(LEARNING_RATE))

    def prepare(state):
        for t in range(tasks):
            key = jax.random.key(100 + t)

            def acts(path, p, key=key):
                if _not_embedding(_path(path), p.shape) is None:
                    return None
                return jax.random.normal(
                    jax.random.fold_in(key, p.shape[0]), (directions, p.shape[0])
                )

            state = cljax.gpm_add_task(state, jax.tree_util.tree_map_with_path(acts, params), 1.0)
        return state

    def memory(state):
        found = cljax.find_state(state, cljax.GpmState)
        return _st.tree_bytes(found.bases) / max(tasks, 1)

    return tx, prepare, lambda: {}, memory


def _cuber_entry(params, tasks: int, directions: int):
    capacity = max(1, tasks * directions)
    tx = cljax.cuber(capacity, max(tasks, 1), spec=_not_embedding, inner=optax.adamw(LEARNING_RATE))

    def prepare(state):
        # The gpm entry's activations (cuber_add_task selects columns as gpm_add_task does),
        # then one correlation judgement from a random gradient, as before a new task.
        for t in range(tasks):
            key = jax.random.key(100 + t)

            def acts(path, p, key=key):
                if _not_embedding(_path(path), p.shape) is None:
                    return None
                return jax.random.normal(
                    jax.random.fold_in(key, p.shape[0]), (directions, p.shape[0])
                )

            state = cljax.cuber_add_task(state, jax.tree_util.tree_map_with_path(acts, params), 1.0)
        grads = jax.tree_util.tree_map_with_path(
            lambda path, g: None if _not_embedding(_path(path), g.shape) is None else g,
            _random_like(params, jax.random.key(500)),
        )
        return cljax.cuber_correlate(state, grads, 0.5, spec=_not_embedding) if tasks else state

    def memory(state):
        found = cljax.find_state(state, cljax.CuberState)
        return _st.tree_bytes(found.bases) / max(tasks, 1)

    return tx, prepare, lambda: {}, memory


def _peak_resident() -> int:
    """Peak resident set size of this process in bytes (Linux and macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _path(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _ogd_entry(params, tasks: int, per_task: int):
    capacity = max(1, tasks * per_task)
    tx = cljax.ogd(capacity, inner=optax.adamw(LEARNING_RATE))

    def prepare(state):
        # donate=True: each call writes into the basis in place, so filling it needs the basis
        # plus a few model-sized vectors (a non-donated call also holds the old basis).
        for t in range(tasks):
            state = cljax.ogd_add_task(
                state, _random_like(params, jax.random.key(200 + t), (per_task,)), donate=True
            )
        return state

    def memory(state):
        return _st.tree_bytes(cljax.find_state(state, cljax.OgdState).basis) / max(tasks, 1)

    return tx, prepare, lambda: {}, memory


def make_entries(
    params: Any, tasks: list[int], directions: int, ogd_per_task: int
) -> dict[str, tuple]:
    """name -> (tx, prepare(state) -> state, extra_args() -> dict, memory(state) -> bytes per task)."""
    none = lambda s: s
    no_extra = lambda: {}
    zero = lambda s: 0.0
    entries: dict[str, tuple] = {"optax.adamw": (optax.adamw(LEARNING_RATE), none, no_extra, zero)}
    for t in tasks:
        entries[f"gpm(adamw), {t} tasks"] = _gpm_entry(params, t, directions)
    for t in tasks:
        entries[f"cuber(adamw), {t} tasks"] = _cuber_entry(params, t, directions)
    for t in tasks:
        if t > 0:
            entries[f"ogd(adamw), {t} tasks x {ogd_per_task}"] = _ogd_entry(params, t, ogd_per_task)
    memory_grad = _random_like(params, jax.random.key(300))
    entries["agem(adamw)"] = (
        cljax.agem(inner=optax.adamw(LEARNING_RATE)),
        none,
        lambda: {"memory_grads": memory_grad},
        lambda s: float(_st.tree_bytes(memory_grad)),
    )
    for t in tasks:
        if t > 0:
            task_grads = _random_like(params, jax.random.key(400 + t), (t,))
            entries[f"gem(adamw), {t} tasks"] = (
                cljax.gem(inner=optax.adamw(LEARNING_RATE)),
                none,
                lambda g=task_grads: {"task_grads": g},
                lambda s, g=task_grads, t=t: _st.tree_bytes(g) / t,
            )
    osft = cljax.osft(None, spec=_not_embedding, inner=optax.adamw(LEARNING_RATE))
    entries["osft(adamw), half rank"] = (
        osft,
        lambda s: cljax.osft_decompose(s, params, rank=0.5, spec=_not_embedding),
        no_extra,
        lambda s: float(
            _st.tree_bytes(cljax.find_state(s, cljax.OsftState).left)
            + _st.tree_bytes(cljax.find_state(s, cljax.OsftState).right)
        ),
    )
    entries["auon"] = (cljax.auon(LEARNING_RATE), none, no_extra, zero)
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed rounds after compiling (default 2)"
    )
    parser.add_argument(
        "--small", action="store_true", help="a much smaller tree, for a quick check"
    )
    parser.add_argument(
        "--mid",
        action="store_true",
        help="a mid-size tree (7.3 M params: vocab 8000, width 256, 4 blocks), between the two",
    )
    parser.add_argument(
        "--tasks", default="0,5,20", help="stored-task counts, comma-separated (default 0,5,20)"
    )
    parser.add_argument(
        "--directions", type=int, default=8, help="GPM input directions added per task (default 8)"
    )
    parser.add_argument(
        "--ogd-per-task", type=int, default=1, help="OGD vectors stored per task (default 1)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated substrings of entry names to time (adamw always)",
    )
    args = parser.parse_args(argv)
    tasks = [int(t) for t in args.tasks.split(",") if t.strip()]

    shapes = _st.llama_like_shapes(args.small, args.mid)
    params = _st.random_tree(shapes, jax.random.key(0), 0.02)
    grads = _st.random_tree(shapes, jax.random.key(1), 1e-3)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    entries = make_entries(params, tasks, args.directions, args.ogd_per_task)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        entries = {
            k: v for k, v in entries.items() if k == "optax.adamw" or any(w in k for w in wanted)
        }

    runners = [_st.copy_runner(params)]
    for name, (tx, prepare, extra, memory) in entries.items():
        r = _st.prepared_runner(name, tx, prepare, extra, params, grads)
        r.memory_per_task = memory(r.carry[1])
        runners.append(r)
        gc.collect()
    resident = _st.tree_bytes(grads) + sum(_st.tree_bytes(r.carry) for r in runners)
    print(_st.header(args, n_params, len(jax.tree.leaves(params)), resident), flush=True)
    print(
        f"- GPM directions per task: {args.directions}; OGD vectors per task: {args.ogd_per_task}"
    )
    del params
    for r in runners:  # compile, then warm up
        r.run()
    for _ in range(args.warmup):
        for r in runners:
            r.run()
    for i in range(args.repeats):
        start = i % len(runners)
        for r in runners[start:] + runners[:start]:
            r.times[i] = r.run()
        if (i + 1) % max(1, args.repeats // 10) == 0:
            print(f"  round {i + 1}/{args.repeats}", file=sys.stderr, flush=True)

    baseline = runners[1]
    print()
    print(
        "| optimizer | median ms | ratio to optax.adamw | state bytes / adamw's | CL memory per task (MiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for r in runners[1:]:
        median = statistics.median(r.times.values())
        ratio = statistics.median(t / baseline.times[i] for i, t in r.times.items())
        print(
            f"| {r.name} | {1e3 * median:.1f} | {ratio:.2f} | {r.state_bytes / baseline.state_bytes:.2f} "
            f"| {r.memory_per_task / 2**20:.2f} |"
        )
    print(f"\nPeak resident memory of the process: {_peak_resident() / 2**30:.2f} GiB")
    for r in runners:
        r.free()


if __name__ == "__main__":
    main()
