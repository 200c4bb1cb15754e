"""Step time of every cljax optimizer against optax.adamw on a LLaMA-60M-like parameter tree.

Each optimizer runs one jit-compiled step with the parameters and the optimizer state donated:

    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

on a fixed random gradient tree (an argument, not donated). After a warm-up, the optimizers are
timed round-robin, one step each per round, starting from a different optimizer every round, so
that load from other processes hits all of them alike. An optimizer whose warm-up step takes
longer than `--slow-seconds` joins only `--slow-repeats` of the rounds, spread evenly over the run
(its ratio uses the baseline's times from the same rounds), so that one very slow optimizer does
not stretch the whole run. A donated element-wise ``x + 1`` over a
tree of the same size is timed in the same rounds and gives the copy bandwidth (read + write).

Reported per optimizer: the median step time, the median over rounds of the step time divided by
optax.adamw's step time in the same round, and the achieved bandwidth as a fraction of the copy
bandwidth. The achieved bandwidth is the optimizer's *minimal* traffic divided by its median step
time, the minimal traffic being one read of params, grads and state and one write of params and
state (e.g. 28 B/param for AdamW in float32). Work that needs more than one pass (a per-tensor
mean before it can be applied, a per-row norm) or extra copies shows up as a lower fraction.

Usage:
    python benchmarks/step_time.py                     # full tree (58.1 M params)
    python benchmarks/step_time.py --small             # a small tree, a quick check
    python benchmarks/step_time.py --only adamw,cwd_adamw --repeats 50
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cljax

LEARNING_RATE = 1e-3

# name -> factory taking the learning rate; the baseline comes first.
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "optax.adamw": optax.adamw,
    "optax.lion": optax.lion,
    "cautious_adamw": cljax.cautious_adamw,
    "cautious_lion": cljax.cautious_lion,
    "cwd_adamw": cljax.cwd_adamw,
    "cwd_lion": cljax.cwd_lion,
    "grams": cljax.grams,
    "adamp": cljax.adamp,
    "upgd": cljax.upgd,
}
BASELINE = "optax.adamw"
COPY = "copy (x + 1)"


def llama_shapes(vocab: int, width: int, hidden: int, depth: int) -> dict[str, Any]:
    """Shapes of a LLaMA-style tree: embedding, `depth` attention + SwiGLU blocks, norms, head."""
    block = {
        "attn": {name: (width, width) for name in ("q", "k", "v", "o")},
        "mlp": {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)},
        "attn_norm": (width,),
        "mlp_norm": (width,),
    }
    return {
        "embed": (vocab, width),
        "blocks": [block] * depth,
        "final_norm": (width,),
        "head": (width, vocab),
    }


def llama_like_shapes(small: bool, mid: bool = False) -> dict[str, Any]:
    """The LLaMA-60M-like tree (58.1 M params, 75 leaves), a mid-size one (`mid`: vocabulary
    8000, width 256, 4 blocks, 7.4 M params) or a much smaller one (`small`)."""
    if small:
        return llama_shapes(1000, 64, 172, 2)
    if mid:
        return llama_shapes(8000, 256, 688, 4)
    return llama_shapes(32000, 512, 1376, 8)


def random_tree(shapes: Any, key: jax.Array, scale: float) -> Any:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    arrays = [
        scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, arrays)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def block(tree: Any) -> None:
    for x in jax.tree.leaves(tree):
        x.block_until_ready()


class Runner:
    """One timed entry: a donated jitted step plus the buffers it owns."""

    def __init__(self, name: str, step: Callable, carry: tuple, extra: tuple, bytes_per_step: int):
        self.name = name
        self.step = step
        self.carry = carry  # donated every step, replaced by the step's outputs
        self.extra = extra  # not donated
        self.bytes_per_step = bytes_per_step
        self.times: dict[int, float] = {}  # round -> seconds
        self.every = 1  # joins the rounds i with i % every == 0

    def run(self) -> float:
        start = time.perf_counter()
        self.carry = self.step(*self.carry, *self.extra)
        block(self.carry)
        return time.perf_counter() - start

    def free(self) -> None:
        for x in jax.tree.leaves(self.carry):
            x.delete()
        self.carry = ()


def optimizer_runner(name: str, params: Any, grads: Any) -> Runner:
    tx = OPTIMIZERS[name](LEARNING_RATE)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    own_params = jax.tree.map(jnp.copy, params)  # this optimizer's own, donated copy
    state = jax.jit(tx.init)(own_params)
    traffic = 2 * tree_bytes(own_params) + tree_bytes(grads) + 2 * tree_bytes(state)
    return Runner(
        name, jax.jit(step, donate_argnums=(0, 1)), (own_params, state), (grads,), traffic
    )


def prepared_runner(
    name: str, tx: Any, prepare: Callable, extra: Callable, params: Any, grads: Any
) -> Runner:
    """A runner for `tx` whose state is `prepare`d (task memory filled) before timing, with
    ``extra()`` passed as keyword extra args every step; records the state's bytes."""
    extra_args = extra()

    def step(params, state, grads, extra_args):
        updates, state = tx.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state

    own = jax.tree.map(jnp.copy, params)
    state = prepare(jax.jit(tx.init)(own))
    traffic = 2 * tree_bytes(own) + tree_bytes(grads) + 2 * tree_bytes(state)
    r = Runner(
        name, jax.jit(step, donate_argnums=(0, 1)), (own, state), (grads, extra_args), traffic
    )
    r.state_bytes = tree_bytes(state)
    return r


def copy_runner(params: Any) -> Runner:
    def step(x):
        return (jax.tree.map(lambda a: a + 1.0, x),)

    x = jax.tree.map(jnp.copy, params)
    return Runner(COPY, jax.jit(step, donate_argnums=(0,)), (x,), (), 2 * tree_bytes(x))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args: argparse.Namespace, n_params: int, n_leaves: int, resident: int) -> str:
    device = jax.devices()[0]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    lines = [
        "# cljax step-time benchmark",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- jax {jax.__version__}, jaxlib {jax.lib.__version__}, optax {optax.__version__}, "
        f"cljax {cljax.__version__}, numpy {np.__version__}, python {platform.python_version()}",
        f"- device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)",
        f"- CPU: os.cpu_count()={os.cpu_count()}, usable={affinity}, {cpu_model()}",
        f"- OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', 'unset')!r}",
        f"- tree: {n_params / 1e6:.1f} M float32 params in {n_leaves} leaves "
        f"({'small' if args.small else 'LLaMA-60M-like'}); resident buffers {resident / 2**30:.2f} GiB",
        f"- rounds: {args.warmup} warm-up + {args.repeats} timed, one step per optimizer per round, "
        "round-robin with a rotating start; ratios are medians of per-round ratios",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds (default 40)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed rounds after compiling (default 2)"
    )
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=2.0,
        help="a warm-up step longer than this marks an optimizer slow (default 2 s)",
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=6,
        help="rounds a slow optimizer is timed in (default 6)",
    )
    parser.add_argument(
        "--small", action="store_true", help="a much smaller tree, for a quick check"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated optimizers to time ({BASELINE} is always included); "
        f"choices: {', '.join(OPTIMIZERS)}",
    )
    args = parser.parse_args(argv)

    names = list(OPTIMIZERS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in OPTIMIZERS and f"optax.{n}" not in OPTIMIZERS]
        if unknown:
            parser.error(f"--only: unknown {unknown}; choose from {list(OPTIMIZERS)}")
        wanted = [n if n in OPTIMIZERS else f"optax.{n}" for n in wanted]
        names = [BASELINE] + [n for n in names if n in wanted and n != BASELINE]

    shapes = llama_like_shapes(args.small)
    params = random_tree(shapes, jax.random.key(0), 0.02)
    grads = random_tree(shapes, jax.random.key(1), 1e-3)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_leaves = len(jax.tree.leaves(params))

    runners = [copy_runner(params)] + [optimizer_runner(n, params, grads) for n in names]
    del params  # every runner holds its own copy
    gc.collect()
    resident = tree_bytes(grads) + sum(tree_bytes(r.carry) for r in runners)
    print(header(args, n_params, n_leaves, resident), flush=True)

    for r in runners:  # compile, then warm up
        r.run()
    for _ in range(args.warmup):
        for r in runners:
            warm = r.run()
            if warm > args.slow_seconds and r.name not in (COPY, BASELINE):
                r.every = max(1, math.ceil(args.repeats / args.slow_repeats))
    slow = [f"{r.name} (every {r.every} rounds)" for r in runners if r.every > 1]
    if slow:
        print(
            f"- slow (warm-up step > {args.slow_seconds} s), timed in fewer rounds: {', '.join(slow)}"
        )

    for i in range(args.repeats):
        start = i % len(runners)
        for r in runners[start:] + runners[:start]:
            if i % r.every == 0:
                r.times[i] = r.run()
        if (i + 1) % max(1, args.repeats // 10) == 0:
            print(f"  round {i + 1}/{args.repeats}", file=sys.stderr, flush=True)

    copy, baseline = runners[0], runners[1]
    copy_bw = copy.bytes_per_step / statistics.median(copy.times.values())
    print()
    print(
        f"copy bandwidth (donated x + 1, read + write): {copy_bw / 1e9:.1f} GB/s, "
        f"median {1e3 * statistics.median(copy.times.values()):.1f} ms per pass"
    )
    print()
    print(
        "| optimizer | timed steps | median ms | ratio to optax.adamw | min traffic (B/param) "
        "| fraction of copy bandwidth |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in runners[1:]:
        median = statistics.median(r.times.values())
        ratio = statistics.median(t / baseline.times[i] for i, t in r.times.items())
        fraction = r.bytes_per_step / median / copy_bw
        print(
            f"| {r.name} | {len(r.times)} | {1e3 * median:.1f} | {ratio:.2f} | "
            f"{r.bytes_per_step / n_params:.0f} | {fraction:.2f} |"
        )
    for r in runners:
        r.free()
    grads = None


if __name__ == "__main__":
    main()
