"""Merge time of 8 task vectors on a LLaMA-60M-like tree, and ComPEFT compression.

Every merge in `cljax.transforms.merging.task_vectors` is jit-compiled with its options static and
called on the same list of 8 random float32 task vectors (58.1 M params each, 75 leaves: embedding
32000x512; 8 blocks of four 512x512, two 512x1376 and one 1376x512 matrices and two 512-vectors;
final 512 norm; 512x32000 head). After one compile-and-run call, each merge is timed `--repeats`
times in a row and the median is reported, with the input throughput (8 x 232 MB read per merge).
Results are deleted between methods so that at most one merge's buffers are alive.

ComPEFT (density 0.1) compresses and decompresses one task vector; the table gives the compressed
size over the float32 size and both times.

With `--topk`, the threshold of a top-10% selection on one 32000x512 leaf (16.4 M entries) is also
timed three ways: `jnp.sort`, `jax.lax.top_k` and the radix select on the float bit pattern that
the library uses (three histogram passes of 11, 11 and 10 bits).

Usage:
    python benchmarks/merging.py                # full tree (a few minutes)
    python benchmarks/merging.py --small        # a small tree, a quick check
    python benchmarks/merging.py --mid --topk   # 8 x 3.6 M params, a 4.1 M-entry top-k
    python benchmarks/merging.py --only ties_merge,pcb_merge --repeats 3 --topk
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cljax.transforms.merging import compression as comp
from cljax.transforms.merging import task_vectors as tv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as _st  # noqa: E402  (the shared tree layout)

N_TASKS = 8
DARE_DENSITY = 0.1
COMPEFT_DENSITY = 0.1


def _dare_linear(tvs: list, key: jax.Array) -> Any:
    keys = jax.random.split(key, len(tvs))
    return tv.task_arithmetic(
        [tv.dare(t, DARE_DENSITY, k) for t, k in zip(tvs, keys, strict=True)], 1.0
    )


# name -> (jitted merge of the task-vector list, extra positional args, description)
MERGES: dict[str, tuple[Callable, tuple, str]] = {
    "task_arithmetic": (
        jax.jit(functools.partial(tv.task_arithmetic, weights=0.3)),
        (),
        "weights 0.3",
    ),
    "uniform_soup": (jax.jit(tv.uniform_soup), (), "mean"),
    "ties_merge": (
        jax.jit(functools.partial(tv.ties_merge, density=0.2)),
        (),
        "density 0.2, per tensor",
    ),
    "ties_merge (global)": (
        jax.jit(functools.partial(tv.ties_merge, density=0.2, scope="global")),
        (),
        "density 0.2, whole model",
    ),
    "dare + task_arithmetic": (
        jax.jit(_dare_linear),
        (jax.random.key(0),),
        f"density {DARE_DENSITY}",
    ),
    "breadcrumbs": (
        jax.jit(functools.partial(tv.breadcrumbs, beta=0.85, gamma=0.993)),
        (),
        "beta 0.85, gamma 0.993",
    ),
    "magmax": (jax.jit(tv.magmax), (), ""),
    "pcb_merge": (
        jax.jit(functools.partial(tv.pcb_merge, ratio=0.1)),
        (),
        "ratio 0.1, whole model",
    ),
    "pcb_merge (per tensor)": (
        jax.jit(functools.partial(tv.pcb_merge, ratio=0.1, scope="per_tensor")),
        (),
        "ratio 0.1, per tensor",
    ),
}


def llama_like_shapes(small: bool, mid: bool = False) -> dict[str, Any]:
    """Shapes of a LLaMA-60M-like tree (58.1 M params, 75 leaves), of a 3.6 M-parameter one
    (`mid`) or of a much smaller one."""
    if small:
        return _st.llama_shapes(1000, 64, 172, 2)
    if mid:
        return _st.llama_shapes(4000, 256, 688, 2)
    return _st.llama_shapes(32000, 512, 1376, 8)


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


def delete(tree: Any) -> None:
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            x.delete()


def timed(fn: Callable, *args, repeats: int) -> tuple[float, float, Any]:
    """Returns (first call incl. compile, median of `repeats` later calls, last output)."""
    start = time.perf_counter()
    out = fn(*args)
    block(out)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        delete(out)
        start = time.perf_counter()
        out = fn(*args)
        block(out)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def topk_thresholds(n_rows: int, width: int, repeats: int) -> list[tuple[str, float]]:
    """Times the k-th largest magnitude (k = 10%) of one leaf three ways."""
    x = jax.random.normal(jax.random.key(7), (n_rows, width), jnp.float32)
    n = x.size
    k = n // 10

    def order_statistic(x):
        buckets = tv._pack([jnp.abs(x)], batch_ndim=0)
        key = tv._order_keys([(buckets, n - k)], batch_ndim=0)[0]
        return tv._from_sortable(key)

    methods = {
        "jnp.sort": jax.jit(lambda x: jnp.sort(jnp.abs(x).reshape(-1))[n - k]),
        "jax.lax.top_k": jax.jit(lambda x: lax.top_k(jnp.abs(x).reshape(-1), k)[0][-1]),
        "order statistic (cljax)": jax.jit(order_statistic),
    }
    results, values = [], []
    for name, fn in methods.items():
        _, median, out = timed(fn, x, repeats=repeats)
        values.append(float(out))
        results.append((name, median))
    assert len(set(values)) == 1, f"thresholds disagree: {values}"
    return results


def header(args: argparse.Namespace, n_params: int, n_leaves: int) -> str:
    device = jax.devices()[0]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    lines = [
        "# cljax merging benchmark",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- jax {jax.__version__}, jaxlib {jax.lib.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}",
        f"- device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)",
        f"- CPU: os.cpu_count()={os.cpu_count()}, usable={affinity}, "
        f"{platform.processor() or platform.machine()}; load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"- OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', 'unset')!r}",
        f"- tree: {N_TASKS} task vectors of {n_params / 1e6:.1f} M float32 params in {n_leaves} "
        f"leaves ({'small' if args.small else 'mid' if args.mid else 'LLaMA-60M-like'})",
        f"- timing: one compile-and-run call, then the median of {args.repeats} calls",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (default 5)")
    parser.add_argument("--small", action="store_true", help="a much smaller tree, a quick check")
    parser.add_argument(
        "--mid", action="store_true", help="a 3.6 M-parameter tree (width 256, 2 blocks)"
    )
    parser.add_argument("--topk", action="store_true", help="also time top-k threshold methods")
    parser.add_argument(
        "--only", default="", help=f"comma-separated merges; choices: {list(MERGES)}"
    )
    args = parser.parse_args(argv)

    names = list(MERGES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in MERGES]
        if unknown:
            parser.error(f"--only: unknown {unknown}; choose from {list(MERGES)}")

    shapes = llama_like_shapes(args.small, args.mid)
    tvs = [random_tree(shapes, jax.random.key(i), 1e-3) for i in range(N_TASKS)]
    n_params = sum(x.size for x in jax.tree.leaves(tvs[0]))
    n_leaves = len(jax.tree.leaves(tvs[0]))
    print(header(args, n_params, n_leaves), flush=True)
    input_bytes = N_TASKS * tree_bytes(tvs[0])

    # Each row is printed as soon as it is measured, so that a long run keeps what it has done.
    print()
    print(
        f"| merge of {N_TASKS} task vectors | options | first call s (incl. compile) | "
        "median s | input GB/s |"
    )
    print("|---|---|---:|---:|---:|", flush=True)
    for name in names:
        fn, extra, note = MERGES[name]
        print(f"  {name} ...", file=sys.stderr, flush=True)
        first, median, out = timed(fn, tvs, *extra, repeats=args.repeats)
        delete(out)
        gc.collect()
        gbps = input_bytes / median / 1e9
        print(f"| {name} | {note} | {first:.2f} | {median:.3f} | {gbps:.2f} |", flush=True)

    # ComPEFT on one task vector.
    one = tvs[0]
    for t in tvs[1:]:
        delete(t)
    tvs = [one]
    gc.collect()
    compress = jax.jit(functools.partial(comp.compeft_compress, density=COMPEFT_DENSITY, alpha=1.0))
    decompress = jax.jit(comp.compeft_decompress)
    print("  compeft ...", file=sys.stderr, flush=True)
    c_first, c_median, packed = timed(compress, one, repeats=args.repeats)
    d_first, d_median, dense = timed(decompress, packed, repeats=args.repeats)
    ratio = tree_bytes(packed) / tree_bytes(one)
    print()
    print(
        "| ComPEFT, one task vector | compressed / float32 bytes | bits per param | "
        "compress s (first) | compress s | decompress s (first) | decompress s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| density {COMPEFT_DENSITY}, per tensor | {ratio:.4f} | {32 * ratio:.2f} | "
        f"{c_first:.2f} | {c_median:.3f} | {d_first:.2f} | {d_median:.3f} |"
    )
    delete(packed)
    delete(dense)

    if args.topk:
        rows_, width = (1000, 64) if args.small else (8000, 512) if args.mid else (32000, 512)
        print()
        print(f"| k-th largest magnitude of a {rows_}x{width} leaf (k = 10%) | median s |")
        print("|---|---:|")
        for name, median in topk_thresholds(rows_, width, args.repeats):
            print(f"| {name} | {median:.3f} |")


if __name__ == "__main__":
    main()
