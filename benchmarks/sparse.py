"""Step time of the sparse-mask transforms against optax.adamw, and mask storage per parameter.

Uses the LLaMA-60M-like tree, the donated jitted step and the round-robin timing of
`benchmarks/step_time.py`. Every 2-D leaf (embedding, block matrices, head) is masked at the given
density (uniform random support, `cljax.random_mask`); norms stay dense. Timed entries wrap
``optax.adamw(1e-3)``:

* ``mask_updates`` at density 0.5 and 0.1 (50% and 90% sparsity), ``prune=True`` (SPDF-style static
  support, SP-06);
* ``set_rigl`` at 90% sparsity, mask update every 100 steps (the timed steps are mostly plain masked
  steps; the amortised cost of the update steps is measured separately);
* ``magnitude_pruning`` at 90% sparsity with masks recomputed every 100 steps (same);
* ``exclusive_masks`` (ExSSNeT, one task mask of density 0.1 and a union of density 0.1);
* ``lisa`` over the tree's list of blocks (``layer_list="blocks"``), 2 blocks active per period of
  20 steps (the timed steps include the periodic redraws).

Reported: median step time, the median over rounds of the ratio to optax.adamw in the same round,
optimizer-state bytes relative to adamw, the number of masks stored and their size in bits per
masked parameter per mask (rows of a leaf are padded to whole bytes), and the time of one
mask-update step (RigL regrowth, magnitude re-pruning) as a multiple of an adamw step.

Usage:
    python benchmarks/sparse.py               # full tree (58.1 M params)
    python benchmarks/sparse.py --small       # a small tree, a quick check
    python benchmarks/sparse.py --mid --repeats 5   # a 7.4 M-parameter tree of the same layout
"""

from __future__ import annotations

import argparse
import gc
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
UPDATE_EVERY = 100
CAPACITY = 4  # exclusive_masks bank: CAPACITY task masks + the current mask + the union


def _masks(params: Any, density: float) -> Any:
    dens = cljax.uniform_densities(params, density)
    return cljax.random_mask(params, dens, jax.random.key(42))


def make_entries(params: Any) -> dict[str, Any]:
    adamw = lambda: optax.adamw(LEARNING_RATE)
    m50, m10 = _masks(params, 0.5), _masks(params, 0.1)
    entries = {
        "optax.adamw": adamw(),
        "mask_updates (50% sparse)": cljax.mask_updates(adamw(), m50, prune=True),
        "mask_updates (90% sparse)": cljax.mask_updates(adamw(), m10, prune=True),
        "set_rigl (90% sparse)": cljax.set_rigl(
            adamw(), m10, update_every=UPDATE_EVERY, end_step=10**6
        ),
        "magnitude_pruning (90%)": cljax.magnitude_pruning(adamw(), 0.9, update_every=UPDATE_EVERY),
        "exclusive_masks": cljax.exclusive_masks(adamw(), capacity=CAPACITY),
        # LISA over the list of blocks: 2 blocks (plus embedding, norms, head) train per period.
        "lisa (2 blocks, layer_list)": cljax.lisa(
            adamw(), layer_list="blocks", num_active=2, interval=20
        ),
    }
    return entries


def runner(
    name: str, tx: Any, params: Any, grads: Any, *, start_count: int | None = None
) -> _st.Runner:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    own = jax.tree.map(jnp.copy, params)
    state = jax.jit(tx.init)(own)
    if name == "exclusive_masks":
        density = _masks(params, 0.1)
        dense = jax.tree.map(
            lambda m, p: jnp.ones(p.shape, bool) if m is None else m,
            density,
            params,
            is_leaf=lambda x: x is None,
        )
        state = cljax.exclusive_masks_commit_task(cljax.exclusive_masks_start_task(state, dense))
        other = cljax.random_mask(params, 0.1, jax.random.key(7))
        state = cljax.exclusive_masks_start_task(state, other)
    if start_count is not None:
        state = state._replace(count=jnp.asarray(start_count, jnp.int32))
    traffic = 2 * _st.tree_bytes(own) + _st.tree_bytes(grads) + 2 * _st.tree_bytes(state)
    return _st.Runner(name, jax.jit(step, donate_argnums=(0, 1)), (own, state), (grads,), traffic)


def mask_bits(state: Any, params: Any) -> float:
    """Bits of stored masks per masked parameter (uint8 leaves of the state over the masked size)."""
    masked = sum(
        p.size
        for p, m in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(cljax.uniform_densities(params, 0.5), is_leaf=lambda x: x is None),
            strict=True,
        )
        if m is not None
    )
    packed = sum(x.nbytes for x in jax.tree.leaves(state) if x.dtype == jnp.uint8)
    return 8 * packed / masked


def update_step_cost(
    name: str, tx: Any, params: Any, grads: Any, baseline_ms: float, repeats: int
) -> float:
    """Time of a mask-update step (count set to a multiple of UPDATE_EVERY) over an adamw step."""
    r = runner(name, tx, params, grads, start_count=UPDATE_EVERY)
    r.run()  # compile
    times = []
    for _ in range(repeats):
        own, state = r.carry
        r.carry = (own, state._replace(count=jnp.asarray(UPDATE_EVERY, jnp.int32)))
        times.append(r.run())
    r.free()
    return 1e3 * statistics.median(times) / baseline_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument(
        "--small", action="store_true", help="a much smaller tree, for a quick check"
    )
    parser.add_argument(
        "--mid", action="store_true", help="a 7.4 M-parameter tree (width 256, 4 blocks)"
    )
    args = parser.parse_args(argv)

    shapes = _st.llama_like_shapes(args.small, args.mid)
    params = _st.random_tree(shapes, jax.random.key(0), 0.02)
    grads = _st.random_tree(shapes, jax.random.key(1), 1e-3)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_leaves = len(jax.tree.leaves(params))
    entries = make_entries(params)
    runners = [runner(name, tx, params, grads) for name, tx in entries.items()]
    state_bytes = {r.name: _st.tree_bytes(r.carry[1]) for r in runners}
    bits = {r.name: mask_bits(r.carry[1], params) for r in runners}
    gc.collect()
    resident = _st.tree_bytes(grads) + sum(_st.tree_bytes(r.carry) for r in runners)
    args.slow_seconds = float("inf")
    print(
        _st.header(args, n_params, n_leaves, resident).replace("step-time", "sparse step-time"),
        flush=True,
    )

    for r in runners:
        r.run()
    for _ in range(args.warmup):
        for r in runners:
            r.run()
    for i in range(args.repeats):
        start = i % len(runners)
        for r in runners[start:] + runners[:start]:
            r.times[i] = r.run()
    baseline = runners[0]
    base_ms = 1e3 * statistics.median(baseline.times.values())
    print()
    print(
        "| transform (inner optax.adamw) | median ms | ratio to optax.adamw | state / adamw state "
        "| masks stored | bits per masked param per mask |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in runners:
        median = 1e3 * statistics.median(r.times.values())
        ratio = statistics.median(t / baseline.times[i] for i, t in r.times.items())
        state_ratio = state_bytes[r.name] / state_bytes[baseline.name]
        stored = (CAPACITY + 2) if r.name == "exclusive_masks" else (1 if bits[r.name] else 0)
        b = f"{bits[r.name] / stored:.2f}" if stored else "-"
        print(
            f"| {r.name} | {median:.1f} | {ratio:.2f} | {state_ratio:.3f} | {stored or '-'} | {b} |"
        )
    for r in runners:
        r.free()
    gc.collect()

    print()
    print(
        f"| mask-update step (every {UPDATE_EVERY} steps) | step / adamw step | amortised ratio added |"
    )
    print("|---|---:|---:|")
    for name in ("set_rigl (90% sparse)", "magnitude_pruning (90%)"):
        cost = update_step_cost(
            name, entries[name], params, grads, base_ms, max(3, args.repeats // 10)
        )
        print(f"| {name} | {cost:.1f} | {cost / UPDATE_EVERY:.3f} |")
    grads = None


if __name__ == "__main__":
    main()
