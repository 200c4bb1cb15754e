"""Step time of the regularizers family's transforms against optax.adamw.

Uses the LLaMA-60M-like tree, the donated jitted step and the round-robin timing of
`benchmarks/step_time.py`. Every entry is a whole optimizer built around ``optax.adamw(1e-3)``
(or ``optax.adam``), with its task memory filled before timing so the penalties do real work:

* ``ewc_adamw`` online (one accumulated pair) and separate mode with ``--capacities`` task slots
  (all consolidated; the step cost depends on the capacity, not on how many are valid);
* ``l2_anchor_adamw``, ``mas_adamw`` (coupled), ``si(adamw)`` (after one consolidation);
* ``scale_by_tag`` (RMSProp variant, capacity 3, at the third task) + learning rate;
* ``clip_by_component_norm`` (per leaf) + adamw;
* ``add_spectral_penalty`` and ``add_wasserstein_penalty`` + adamw (power iteration / per-leaf sort);
* ``petal(adam)`` (model-wide quantile of the squared gradient) and its SRes variant
  (``restore='random'``: a Bernoulli draw per entry instead of the quantile);
* ``hierarchical_reg(adamw)`` (layer-wise and element-wise pull to the initial weights, path
  integral accumulated every step; the step does the same work whatever the importances hold);
* ``continual_backprop(adamw)`` on every MLP block (``up`` → ``down``), random activations for a
  batch of 8 tokens per step, replacement rate 1e-4 (almost every step takes the no-reset branch);
* ``add_shrink_perturb`` every step after adamw.

AQC and neural consolidation are left out: they approximate the old loss over a small head's
flattened parameters (AQC's ``P × P`` Hessian, NC's regressor), not a 58 M-parameter tree.

Reported: the median step time, the median over rounds of the ratio to optax.adamw in the same
round, and the optimizer-state bytes relative to adamw's.

Usage:
    python benchmarks/regularizers.py                  # full tree (58.1 M params)
    python benchmarks/regularizers.py --small          # a small tree, a quick check
    python benchmarks/regularizers.py --only ewc,petal --capacities 1,5,20
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as _st  # noqa: E402  (the shared tree builder and timing loop)

import cljax  # noqa: E402

LEARNING_RATE = 1e-3
ACT_BATCH = 8


def _ones_like(params):
    return jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, jnp.float32), params)


def _shifted(params):
    return jax.tree.map(lambda p: p * 0.9, params)


def _mlp_layers(params) -> list[cljax.CbpLayer]:
    return [
        cljax.CbpLayer(kernel=f"blocks/{i}/mlp/up", next_kernel=f"blocks/{i}/mlp/down")
        for i in range(len(params["blocks"]))
    ]


def make_entries(params: Any, capacities: list[int]) -> dict[str, tuple[Any, Callable, Callable]]:
    """name -> (tx, prepare(state) -> state, extra_args(key) -> dict)."""
    adamw = lambda: optax.adamw(LEARNING_RATE)
    none = lambda s: s
    no_extra = lambda: {}
    fisher, anchor = _ones_like(params), _shifted(params)
    entries: dict[str, tuple[Any, Callable, Callable]] = {"optax.adamw": (adamw(), none, no_extra)}
    entries["ewc_adamw (online)"] = (
        cljax.ewc_adamw(LEARNING_RATE, 1.0, online=True),
        lambda s: cljax.ewc_consolidate(s, anchor, fisher),
        no_extra,
    )
    for cap in capacities:
        if cap <= 1:
            continue

        def fill(s, cap=cap):
            for _ in range(cap):
                s = cljax.ewc_consolidate(s, anchor, fisher)
            return s

        entries[f"ewc_adamw (separate, {cap} tasks)"] = (
            cljax.ewc_adamw(LEARNING_RATE, 1.0, capacity=cap),
            fill,
            no_extra,
        )
    entries["l2_anchor_adamw"] = (cljax.l2_anchor_adamw(LEARNING_RATE, 0.1), none, no_extra)
    entries["mas_adamw"] = (
        cljax.mas_adamw(LEARNING_RATE, 1.0),
        lambda s: cljax.mas_consolidate(s, anchor, fisher),
        no_extra,
    )
    entries["si(adamw)"] = (
        cljax.si(adamw(), 1.0),
        lambda s: cljax.si_consolidate(s, anchor),
        no_extra,
    )
    entries["scale_by_tag (rmsprop, 3 tasks)"] = (
        optax.chain(cljax.scale_by_tag(3), optax.scale_by_learning_rate(LEARNING_RATE)),
        lambda s: cljax.tag_next_task(cljax.tag_next_task(s)),
        no_extra,
    )
    entries["clip_by_component_norm + adamw"] = (
        optax.chain(cljax.clip_by_component_norm(1.0), adamw()),
        none,
        no_extra,
    )
    entries["add_spectral_penalty + adamw"] = (
        optax.chain(cljax.add_spectral_penalty(1e-3), adamw()),
        none,
        no_extra,
    )
    entries["add_wasserstein_penalty + adamw"] = (
        optax.chain(cljax.add_wasserstein_penalty(1e-3), adamw()),
        none,
        no_extra,
    )
    entries["petal(adam)"] = (cljax.petal(optax.adam(LEARNING_RATE)), none, no_extra)
    entries["petal(adam), SRes"] = (
        cljax.petal(optax.adam(LEARNING_RATE), restore="random"),
        none,
        no_extra,
    )
    entries["hierarchical_reg(adamw)"] = (cljax.hierarchical_reg(adamw(), 1.0), none, no_extra)
    hidden = params["blocks"][0]["mlp"]["up"].shape[1]
    acts = [
        jax.random.uniform(jax.random.key(i), (ACT_BATCH, hidden))
        for i in range(len(params["blocks"]))
    ]
    entries["continual_backprop(adamw)"] = (
        cljax.continual_backprop(adamw(), _mlp_layers(params), replacement_rate=1e-4, maturity=100),
        none,
        lambda: {"activations": acts},
    )
    entries["adamw + add_shrink_perturb"] = (
        optax.chain(adamw(), cljax.add_shrink_perturb(0.9999, 1e-5)),
        none,
        no_extra,
    )
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
        "--capacities",
        default="5",
        help="EWC separate-mode capacities, comma-separated (default 5)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated substrings of entry names to time (adamw always)",
    )
    args = parser.parse_args(argv)
    capacities = [int(c) for c in args.capacities.split(",") if c.strip()]

    shapes = _st.llama_like_shapes(args.small)
    params = _st.random_tree(shapes, jax.random.key(0), 0.02)
    grads = _st.random_tree(shapes, jax.random.key(1), 1e-3)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    entries = make_entries(params, capacities)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        entries = {
            k: v for k, v in entries.items() if k == "optax.adamw" or any(w in k for w in wanted)
        }

    runners = [_st.copy_runner(params)]
    for name, (tx, prepare, extra) in entries.items():
        runners.append(_st.prepared_runner(name, tx, prepare, extra, params, grads))
        gc.collect()
    resident = _st.tree_bytes(grads) + sum(_st.tree_bytes(r.carry) for r in runners)
    print(_st.header(args, n_params, len(jax.tree.leaves(params)), resident), flush=True)
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
    print("| optimizer | median ms | ratio to optax.adamw | state bytes / adamw's |")
    print("|---|---:|---:|---:|")
    for r in runners[1:]:
        median = statistics.median(r.times.values())
        ratio = statistics.median(t / baseline.times[i] for i, t in r.times.items())
        print(
            f"| {r.name} | {1e3 * median:.1f} | {ratio:.2f} | {r.state_bytes / baseline.state_bytes:.2f} |"
        )
    for r in runners:
        r.free()


if __name__ == "__main__":
    main()
