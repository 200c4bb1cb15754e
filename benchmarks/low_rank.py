"""Low-rank projection benchmark: step time and state bytes against optax, and refresh cost.

Part 1, on the LLaMA-60M-like tree of `step_time.py` (rank 128, refresh every 200 steps): each
optimizer runs a jit-compiled, donated step (params and state donated, a fixed gradient tree as
argument), in two variants compiled separately: the step count forced to a refresh step (``0``)
and to a plain step (``1``). The optimizers are timed round-robin, one step each per round, so
machine load hits them alike. Reported: median refresh and plain step times, the amortised time
``(refresh + (T − 1) · plain) / T`` and its ratio to optax.adamw's and optax.contrib.galore's,
and the optimizer-state bytes next to the analytic formula.

Part 2: the cost of one basis refresh at rank 128 for matrices of the tree's shapes and larger:
exact SVD (of the tall orientation), randomized range finder (8 oversampling columns, 2 power
iterations, the projector's default, and 1 power iteration) and one warm-started
subspace-iteration step, with the subspace error
``‖(I − B Bᵀ) U_r‖₂`` against the exact basis on a matrix with a spectral gap after ``r``, and
the captured energy ``‖Bᵀ G‖_F² / ‖U_rᵀ G‖_F²`` on a matrix without one.

`merged_lora` (LoRA with the adapters in the optimizer state) runs in part 1 beside them: it has
no refresh, so its two variants are the same step.

Usage:
    python benchmarks/low_rank.py            # the full tree, rank 128 (minutes; needs ~4 GiB)
    python benchmarks/low_rank.py --small    # a small tree, rank 16, a quick check
    OPENBLAS_NUM_THREADS=1 python benchmarks/low_rank.py --part 2   # refresh cost only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402  (the tree builder and the run header)

import cljax  # noqa: E402
from cljax.transforms.low_rank import _bases  # noqa: E402

LEARNING_RATE = 1e-3


def optimizers(rank: int, every: int) -> dict[str, Callable[[], optax.GradientTransformation]]:
    galore = dict(rank=rank, refresh_every=every, scale=0.25)
    return {
        "optax.adamw": lambda: optax.adamw(LEARNING_RATE),
        "optax.contrib.galore": lambda: optax.contrib.galore(
            LEARNING_RATE, rank=rank, update_proj_gap=every, scale=0.25
        ),
        "galore_adamw (std, svd)": lambda: cljax.galore_adamw(LEARNING_RATE, **galore),
        "galore_adamw (reverse_std, svd)": lambda: cljax.galore_adamw(
            LEARNING_RATE, side="reverse_std", **galore
        ),
        "galore_adamw (std, randomized)": lambda: cljax.galore_adamw(
            LEARNING_RATE, projector="randomized", **galore
        ),
        "galore_adamw (std, subspace_iteration)": lambda: cljax.galore_adamw(
            LEARNING_RATE, projector="subspace_iteration", **galore
        ),
        "frugal (density 0.25, svd)": lambda: cljax.frugal(
            LEARNING_RATE, density=0.25, refresh_every=every
        ),
        # LoRA on merged weights: Adam on rank-r adapters of every matrix (no refresh).
        "merged_lora (adam)": lambda: cljax.merged_lora(optax.adam(LEARNING_RATE), rank=rank),
    }


def _count_setter(tx_state: Any, count: int) -> Any:
    """Forces the projection's step count (refresh or not) in a cljax or optax state."""
    for kind in (
        cljax.ScaleByLowRankProjectionState,
        cljax.ScaleByFrugalState,
        optax.contrib.GaLoreState,
    ):
        found = cljax.find_states(tx_state, kind)
        if found:
            new = found[0]._replace(count=jnp.full_like(found[0].count, count))
            return cljax.replace_state(tx_state, new, state_type=kind)
    return tx_state


class Entry:
    def __init__(self, name: str, tx: optax.GradientTransformation, params: Any, grads: Any):
        self.name = name
        self.grads = grads

        def make(count):
            def step(params, state, grads):
                state = _count_setter(state, count)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            return jax.jit(step, donate_argnums=(0, 1))

        self.steps = {"refresh": make(0), "plain": make(1)}
        own = jax.tree.map(jnp.copy, params)
        self.carry = (own, jax.jit(tx.init)(own))
        self.state_bytes = step_time.tree_bytes(self.carry[1])
        self.state_floats = sum(
            x.size for x in jax.tree.leaves(self.carry[1]) if jnp.issubdtype(x.dtype, jnp.floating)
        )
        self.times: dict[str, list[float]] = {"refresh": [], "plain": []}

    def run(self, kind: str) -> float:
        start = time.perf_counter()
        self.carry = self.steps[kind](*self.carry, self.grads)
        step_time.block(self.carry)
        return time.perf_counter() - start


def analytic_floats(shapes: Any, rank: int, side: str) -> int:
    """Adam floats of GaLore: r(2 max + min) ('std') or r(2 min + max) per matrix, 2 size else."""
    total = 0
    for shape in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)):
        if len(shape) >= 2:
            m, n = shape[-2], shape[-1]
            batch = math.prod(shape[:-2])
            r = min(rank, m, n)
            big, small = max(m, n), min(m, n)
            total += batch * r * ((2 * big + small) if side == "std" else (2 * small + big))
        else:
            total += 2 * math.prod(shape)
    return total


def part1(args) -> None:
    shapes = step_time.llama_like_shapes(args.small)
    params = step_time.random_tree(shapes, jax.random.key(0), 0.02)
    grads = step_time.random_tree(shapes, jax.random.key(1), 1e-3)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    entries = [
        Entry(name, make(), params, grads)
        for name, make in optimizers(args.rank, args.every).items()
    ]
    del params
    resident = step_time.tree_bytes(grads) + sum(step_time.tree_bytes(e.carry) for e in entries)
    print(
        step_time.header(args, n_params, len(jax.tree.leaves(grads)), resident).replace(
            "step-time", "low-rank"
        )
    )
    print(
        f"- rank {args.rank}, refresh every {args.every}; amortised = (refresh + {args.every - 1} plain) / {args.every}"
    )
    for e in entries:  # compile and warm up both variants
        for kind in ("refresh", "plain"):
            e.run(kind)
    for i in range(args.repeats):
        order = entries[i % len(entries) :] + entries[: i % len(entries)]
        for e in order:
            e.times["plain"].append(e.run("plain"))
        if i < args.refresh_repeats:
            for e in order:
                e.times["refresh"].append(e.run("refresh"))
    med = {e.name: {k: statistics.median(v) for k, v in e.times.items()} for e in entries}
    amortised = {
        name: (t["refresh"] + (args.every - 1) * t["plain"]) / args.every for name, t in med.items()
    }
    base, galore = amortised["optax.adamw"], amortised["optax.contrib.galore"]
    adamw_bytes = entries[0].state_bytes
    print()
    print(
        "| optimizer | refresh step (ms) | plain step (ms) | amortised (ms) | vs adamw | vs optax galore | state MiB | state vs adamw |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for e in entries:
        t = med[e.name]
        print(
            f"| {e.name} | {1e3 * t['refresh']:.1f} | {1e3 * t['plain']:.2f} | {1e3 * amortised[e.name]:.2f} | "
            f"{amortised[e.name] / base:.2f}x | {amortised[e.name] / galore:.2f}x | "
            f"{e.state_bytes / 2**20:.1f} | {e.state_bytes / adamw_bytes:.3f} |"
        )
    print()
    for e in entries:
        if e.name.startswith("galore_adamw (std") or e.name.startswith("galore_adamw (reverse"):
            side = "reverse_std" if "reverse" in e.name else "std"
            formula = analytic_floats(shapes, args.rank, side)
            print(
                f"- {e.name}: float32 state entries {e.state_floats:,}; analytic r(2max+min) / r(2min+max) formula {formula:,}; equal: {e.state_floats == formula}"
            )


def _gapped(key, m, n, r, gap):
    ku, kv = jax.random.split(key)
    k = min(m, n)
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (m, k)))
    v, _ = jnp.linalg.qr(jax.random.normal(kv, (n, k)))
    s = jnp.concatenate([jnp.linspace(10.0, 5.0, r), gap * jnp.linspace(1.0, 0.1, k - r)])
    return (u * s[None, :]) @ v.T


def part2(args) -> None:
    r = args.rank
    if args.small:
        sizes = [(64, 172), (172, 64), (64, 1000)]
    else:
        sizes = [(512, 512), (512, 1376), (1376, 512), (2048, 2048), (512, 32000)]
    print()
    print(
        f"Refresh cost at rank {r} (tall orientation decomposed; median of {args.refresh_timing} runs)"
    )
    print()
    print(
        "| matrix | svd (ms) | randomized (ms) | speed-up | randomized, 1 power it. (ms) | speed-up | subspace iteration, 1 step (ms) | speed-up | err randomized | err rand. 1 it. | err subspace it. | energy randomized | energy rand. 1 it. | energy subspace it. |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, n in sizes:
        a_gap = _gapped(jax.random.key(m + n), m, n, r, gap=0.05)
        # The basis is over the smaller dimension ('std'): the rows of the oriented (d, k) matrix.
        oriented = a_gap.T if m >= n else a_gap
        flat = jax.random.normal(jax.random.key(7), oriented.shape)
        svd = jax.jit(lambda a: _bases.svd_basis(a, r, left=True))
        rnd = jax.jit(lambda a, k: _bases.randomized_basis(a, r, k, oversample=8, power_iters=2))
        rnd1 = jax.jit(lambda a, k: _bases.randomized_basis(a, r, k, oversample=8, power_iters=1))
        sub = jax.jit(lambda a, p: _bases.subspace_iteration_basis(a, p, power_iters=1))
        exact = svd(oriented)
        stale = svd(
            oriented
            + 0.3 * jax.random.normal(jax.random.key(3), oriented.shape) * jnp.std(oriented)
        )
        key = jax.random.key(5)
        calls = {
            "svd": (svd, (oriented,)),
            "rnd": (rnd, (oriented, key)),
            "rnd1": (rnd1, (oriented, key)),
            "sub": (sub, (oriented, stale)),
        }
        for f, a in calls.values():
            jax.block_until_ready(f(*a))
        runs: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.refresh_timing):  # alternate the methods so machine load hits all
            for name, (f, a) in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(f(*a))
                runs[name].append(time.perf_counter() - start)
        t_svd, t_rnd, t_rnd1, t_sub = (statistics.median(runs[n]) for n in calls)
        err_rnd = float(_bases.subspace_error(rnd(oriented, key), exact))
        err_rnd1 = float(_bases.subspace_error(rnd1(oriented, key), exact))
        err_sub = float(_bases.subspace_error(sub(oriented, stale), exact))
        best = svd(flat)

        def energy(b, flat=flat, best=best):
            return float(jnp.sum((b.T @ flat) ** 2) / jnp.sum((best.T @ flat) ** 2))

        flat_stale = svd(flat + 0.3 * jax.random.normal(jax.random.key(4), flat.shape))
        print(
            f"| {m}x{n} | {1e3 * t_svd:.1f} | {1e3 * t_rnd:.1f} | {t_svd / t_rnd:.1f}x | "
            f"{1e3 * t_rnd1:.1f} | {t_svd / t_rnd1:.1f}x | {1e3 * t_sub:.1f} | {t_svd / t_sub:.1f}x | "
            f"{err_rnd:.1e} | {err_rnd1:.1e} | {err_sub:.1e} | {energy(rnd(flat, key)):.4f} | "
            f"{energy(rnd1(flat, key)):.4f} | {energy(sub(flat, flat_stale)):.4f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", action="store_true", help="a small tree and rank 16, a quick check"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed plain-step rounds")
    parser.add_argument(
        "--refresh-repeats", type=int, default=None, help="timed refresh-step rounds"
    )
    parser.add_argument(
        "--refresh-timing", type=int, default=None, help="runs per refresh-cost entry"
    )
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--every", type=int, default=200, help="refresh period T (default 200)")
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    args = parser.parse_args(argv)
    args.rank = args.rank or (16 if args.small else 128)
    args.repeats = args.repeats or (5 if args.small else 30)
    args.refresh_repeats = args.refresh_repeats or (2 if args.small else 5)
    args.refresh_timing = args.refresh_timing or (3 if args.small else 5)
    args.warmup, args.slow_seconds, args.slow_repeats = 1, 0.0, 0  # for step_time.header
    if args.part in ("1", "both"):
        part1(args)
    if args.part in ("2", "both"):
        part2(args)


if __name__ == "__main__":
    main()
