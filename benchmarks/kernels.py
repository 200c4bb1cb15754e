"""Time of every `cljax.kernels` op: the Pallas kernel against its XLA reference, per shape.

Each case is one jitted step whose state (parameters, moments, outputs) is donated and fed back,
so an in-place kernel really writes in place:

    state = step(fixed, state)

After compiling and a warm-up, the kernel and the XLA reference are timed alternately, one step
each per round, for `--repeats` rounds; the table gives their median step times and the median of
the per-round ratios XLA / Pallas (above 1: the kernel is faster).

Efficiency is reported against measured ceilings, on the same device in the same run:

* element-wise ops (``adam_step``, ``apply_packed_mask``, ``nm_mask``): the op's minimal traffic
  (every operand read once, every result written once) divided by the step time, as a fraction of
  the copy bandwidth of a donated ``x + 1`` (one read, one write);
* projection ops (``galore_adam_step``, ``sltrain_matmul``): the op's FLOPs (``4 m n r`` for GaLore,
  the dense-equivalent ``2 T m n`` for SLTrain) divided by the step time, as a fraction of the rate
  of a square matmul in the same dtype.

The ``transforms`` group times the transforms that call the kernels end to end (one optimizer
update and apply on one leaf, ``impl='xla'`` against ``impl='pallas'``): `cautious_adamw`,
`cwd_adamw`, `mask_updates` and `galore_adamw`. Their rows carry the dispatch op and key of the
kernel they call, so a win there is a candidate entry for that op.

On the CPU only the XLA reference is timed: Pallas runs there only in interpret mode, which is a
test tool, not a performance path. The script prints a Markdown table for ``docs/benchmarks.md``
and, on a GPU or TPU, the `cljax.kernels.Measurement` entries (shapes where the kernel won in
every round's median sense) that may be added to the dispatch table.

Usage:
    python benchmarks/kernels.py                 # full shapes (a GPU or TPU)
    python benchmarks/kernels.py --small         # small shapes, a quick check
    python benchmarks/kernels.py --only galore_adam_step --repeats 50 --json out.json
    python benchmarks/kernels.py --only transforms   # the wired transforms, end to end
    python benchmarks/kernels.py --small --interpret  # CPU: also run the kernels (interpreted)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cljax
from cljax import kernels


class Case(NamedTuple):
    """One op at one shape: a donated step for each implementation."""

    op: str  # dispatch op name
    label: str  # variant and shape, for the table
    dtype: str
    key: tuple[int, ...]  # the op's dispatch size key
    kind: str  # 'bytes' or 'flops'
    work: float  # minimal bytes moved or FLOPs done per step
    fixed: tuple  # arguments that are not donated
    init: Callable[[], tuple]  # fresh donated state
    step: Callable[[str], Callable]  # impl -> step(fixed, state) -> state


def _rand(key, shape, dtype, low=None):
    x = jax.random.normal(key, shape, jnp.float32)
    return (jnp.abs(x) if low is not None else x).astype(dtype)


def adam_cases(small: bool) -> list[Case]:
    sizes = [2**16] if small else [2**20, 2**24, 2**26]
    configs = {
        "adamw, apply": dict(weight_decay=0.1, apply=True),
        "cautious+cwd+mask, apply": dict(
            weight_decay=0.1, cautious="mean_clamp", cautious_weight_decay=True, apply=True
        ),
    }
    cases = []
    for size in sizes:
        for dtype in (jnp.float32, jnp.bfloat16):
            shape = (size // 1024, 1024)
            item = jnp.dtype(dtype).itemsize
            for name, cfg in configs.items():
                masked = "mask" in name
                k = jax.random.split(jax.random.key(size), 5)
                grad = _rand(k[0], shape, dtype)
                mask = jax.random.bernoulli(k[4], 0.5, shape) if masked else None

                def init(k=k, shape=shape, dtype=dtype):
                    return (
                        _rand(k[1], shape, dtype),
                        _rand(k[2], shape, dtype),
                        _rand(k[3], shape, dtype, 0),
                    )

                def step(impl, cfg=cfg):
                    def run(fixed, state):
                        g, m = fixed
                        return kernels.adam_step(
                            g, *state, 3, learning_rate=1e-3, mask=m, **cfg, impl=impl
                        )

                    return run

                work = size * (
                    7 * item + (1 if masked else 0)
                )  # read g, p, mu, nu (, mask); write 3
                cases.append(
                    Case("adam_step", f"{name} {shape}", jnp.dtype(dtype).name, (size,), "bytes", work,
                         (grad, mask), init, step)
                )  # fmt: skip
    return cases


def packed_mask_cases(small: bool) -> list[Case]:
    shapes = [(512, 1024)] if small else [(4096, 4096), (32000, 512), (8, 1376, 4096)]
    cases = []
    for shape in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            k = jax.random.split(jax.random.key(1), 2)
            packed = jnp.packbits(jax.random.bernoulli(k[1], 0.5, shape), axis=-1)

            def init(k=k, shape=shape, dtype=dtype):
                return (_rand(k[0], shape, dtype),)

            def step(impl):
                return lambda fixed, state: (
                    kernels.apply_packed_mask(state[0], fixed[0], impl=impl),
                )

            size = int(np.prod(shape))
            item = jnp.dtype(dtype).itemsize
            cases.append(
                Case("apply_packed_mask", str(shape), jnp.dtype(dtype).name, (size,), "bytes",
                     size * (2 * item + 1 / 8), (packed,), init, step)
            )  # fmt: skip
    return cases


def nm_cases(small: bool) -> list[Case]:
    shapes = [(256, 512)] if small else [(4096, 4096), (4096, 11008)]
    cases = []
    for shape in shapes:
        for axis in (0, -1):
            x = _rand(jax.random.key(2), shape, jnp.float32)

            def init(shape=shape):
                return (jnp.zeros(shape, jnp.bool_),)

            def step(impl, axis=axis):
                return lambda fixed, state: (kernels.nm_mask(fixed[0], 2, 4, axis=axis, impl=impl),)

            size = int(np.prod(shape))
            cases.append(
                Case("nm_mask", f"2:4 axis {axis} {shape}", "float32", (size, 4), "bytes", size * 5,
                     (x,), init, step)
            )  # fmt: skip
    return cases


def galore_cases(small: bool) -> list[Case]:
    sizes = (
        [(256, 512, 32)] if small else [(4096, 4096, 128), (4096, 11008, 128), (4096, 11008, 1024)]
    )
    cases = []
    for m, n, r in sizes:
        for dtype in (jnp.float32, jnp.bfloat16):
            side = "left" if m <= n else "right"  # 'std': compress the smaller dimension
            k = jax.random.split(jax.random.key(3), 5)
            grad = _rand(k[0], (m, n), dtype)
            basis = jnp.linalg.qr(jax.random.normal(k[1], (m if side == "left" else n, r)))[0]
            low = (r, n) if side == "left" else (m, r)

            def init(k=k, m=m, n=n, low=low, dtype=dtype):
                return (
                    _rand(k[2], (m, n), dtype),
                    _rand(k[3], low, dtype),
                    _rand(k[4], low, dtype, 0),
                )

            def step(impl, side=side):
                def run(fixed, state):
                    g, basis = fixed
                    p, mu, nu = state
                    return kernels.galore_adam_step(
                        g, basis, mu, nu, 3, side=side, learning_rate=1e-3, scale=0.25,
                        weight_decay=0.1, param=p, apply=True, impl=impl,
                    )  # fmt: skip

                return run

            cases.append(
                Case("galore_adam_step", f"{side} {m}x{n} r={r}", jnp.dtype(dtype).name, (m, n, r),
                     "flops", 4.0 * m * n * r, (grad, basis), init, step)
            )  # fmt: skip
    return cases


def sltrain_cases(small: bool) -> list[Case]:
    sizes = (
        [(512, 256, 384, 32, 0.03)]
        if small
        else [(8192, 512, 1376, 128, 0.03), (2048, 4096, 4096, 512, 0.03)]
    )
    cases = []
    for t, m, n, r, density in sizes:
        k = jax.random.split(jax.random.key(4), 5)
        count = int(density * m * n)
        support = jnp.sort(jax.random.permutation(k[0], m * n)[:count]).astype(jnp.int32)
        tiles = kernels.sltrain_tiles(support, (m, n))
        a = _rand(k[1], (m, r), jnp.float32) / np.sqrt(m)
        b = _rand(k[2], (r, n), jnp.float32)
        values = _rand(k[3], (count,), jnp.float32)
        for grad in (False, True):

            def init(k=k, t=t, m=m, n=n, grad=grad):
                return (
                    _rand(k[4], (t, m), jnp.float32),
                    jnp.zeros((t, m if grad else n), jnp.float32),
                )

            def step(impl, grad=grad, support=support):
                def forward(x, a, b, v, tiles):
                    return kernels.sltrain_matmul(
                        x, a, b, v, support, scale=0.25, tiles=tiles, impl=impl
                    )

                def run(fixed, state):
                    a, b, v, tiles = fixed
                    x, _ = state
                    if not grad:
                        return x, forward(x, a, b, v, tiles)
                    loss = lambda x, a, b, v: jnp.sum(forward(x, a, b, v, tiles) ** 2)
                    dx, *_ = jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, v)
                    return x, dx

                return run

            flops = 2.0 * t * m * n * (3 if grad else 1)
            cases.append(
                Case("sltrain_matmul", f"{'fwd+bwd' if grad else 'fwd'} T={t} {m}x{n} r={r}",
                     "float32", (t, m, n, r), "flops", flops, (a, b, values, tiles), init, step)
            )  # fmt: skip
    return cases


def _optimizer_case(op, label, dtype, key, kind, work, make, params, grads) -> Case:
    """A whole optimizer step, ``update`` then ``apply_updates``, with params and state donated.

    `make(impl)` builds the optimizer; its state layout is the same for every `impl`.
    """

    def init(params=params):
        fresh = jax.tree.map(jnp.copy, params)
        return fresh, make("xla").init(fresh)

    def step(impl):
        opt = make(impl)

        def run(fixed, state):
            p, opt_state = state
            u, opt_state = opt.update(fixed[0], opt_state, p)
            return optax.apply_updates(p, u), opt_state

        return run

    return Case(op, label, jnp.dtype(dtype).name, key, kind, work, (grads,), init, step)


def transform_cases(small: bool) -> list[Case]:
    """The transforms that call the kernels, end to end on one leaf (``impl='xla'`` vs ``'pallas'``).

    Each case's dispatch key is the key of the op the transform calls on that leaf, so a win here
    is a candidate entry for that op at that key.
    """
    sizes = [2**16] if small else [2**20, 2**24]
    galore = [(256, 512, 32)] if small else [(4096, 4096, 128), (4096, 11008, 1024)]
    cases = []
    for dtype in (jnp.float32, jnp.bfloat16):
        item = jnp.dtype(dtype).itemsize
        for size in sizes:
            shape = (size // 1024, 1024)
            k = jax.random.split(jax.random.key(6), 3)
            params = {"w": _rand(k[0], shape, dtype)}
            grads = {"w": _rand(k[1], shape, dtype)}
            masks = {"w": jax.random.bernoulli(k[2], 0.5, shape)}
            for name, factory in (
                ("cautious_adamw", cljax.cautious_adamw),
                ("cwd_adamw", cljax.cwd_adamw),
            ):
                cases.append(_optimizer_case(
                    "adam_step", f"{name} step {shape}", dtype, (size,), "bytes", size * 7 * item,
                    lambda impl, f=factory: f(1e-3, weight_decay=0.1, impl=impl), params, grads,
                ))  # fmt: skip
            cases.append(_optimizer_case(
                "apply_packed_mask", f"mask_updates(adam) step {shape}", dtype, (size,), "bytes",
                size * (7 * item + 2 / 8),
                lambda impl, masks=masks: cljax.mask_updates(optax.adam(1e-3), masks, impl=impl),
                params, grads,
            ))  # fmt: skip
        for m, n, r in galore:
            k = jax.random.split(jax.random.key(7), 2)
            params = {"w": _rand(k[0], (m, n), dtype)}
            grads = {"w": _rand(k[1], (m, n), dtype)}
            # One basis, built when the step compiles; the timed steps do not refresh it.
            cases.append(_optimizer_case(
                "galore_adam_step", f"galore_adamw step {m}x{n} r={r}", dtype, (m, n, r), "flops",
                4.0 * m * n * r,
                lambda impl, r=r: cljax.galore_adamw(1e-3, rank=r, refresh_every=2**30, impl=impl),
                params, grads,
            ))  # fmt: skip
    return cases


OPS = {
    "adam_step": adam_cases,
    "apply_packed_mask": packed_mask_cases,
    "nm_mask": nm_cases,
    "galore_adam_step": galore_cases,
    "sltrain_matmul": sltrain_cases,
    "transforms": transform_cases,
}


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def copy_bandwidth(small: bool, repeats: int) -> float:
    """Bytes/s of a donated ``x + 1`` (one read, one write)."""
    x = jnp.zeros((2**20 if small else 2**27,), jnp.float32)
    step = jax.jit(lambda x: x + 1, donate_argnums=0)
    x = _block(step(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = _block(step(x))
        times.append(time.perf_counter() - start)
    return 2 * x.size * 4 / statistics.median(times)


def matmul_rate(dtype, small: bool, repeats: int) -> float:
    """FLOP/s of a square matmul in `dtype` (XLA's default precision)."""
    size = 512 if small else 8192
    a = jax.random.normal(jax.random.key(5), (size, size)).astype(dtype)
    f = jax.jit(lambda a: a @ a)
    _block(f(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(f(a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def run_case(case: Case, impls: list[str], warmup: int, repeats: int) -> dict[str, Any]:
    steps, states = {}, {}
    for impl in impls:
        steps[impl] = jax.jit(case.step(impl), donate_argnums=1)
        states[impl] = _block(steps[impl](case.fixed, case.init()))  # compile
    for _ in range(warmup):
        for impl in impls:
            states[impl] = _block(steps[impl](case.fixed, states[impl]))
    times = {impl: [] for impl in impls}
    for round_ in range(repeats):
        order = impls if round_ % 2 == 0 else impls[::-1]
        for impl in order:
            start = time.perf_counter()
            states[impl] = _block(steps[impl](case.fixed, states[impl]))
            times[impl].append(time.perf_counter() - start)
    out = {impl: statistics.median(t) for impl, t in times.items()}
    if "pallas" in impls:
        out["speedup"] = statistics.median(
            x / p for x, p in zip(times["xla"], times["pallas"], strict=True)
        )
        out["min_speedup"] = min(x / p for x, p in zip(times["xla"], times["pallas"], strict=True))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small shapes, a quick check")
    parser.add_argument("--only", default="", help="comma-separated ops (default: all)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="on the CPU, also run the kernels in interpret mode (checks the script; times mean nothing)",
    )
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    impls = ["xla", "pallas"] if backend != "cpu" or args.interpret else ["xla"]
    chosen = [op for op in args.only.split(",") if op] or list(OPS)
    for op in chosen:
        if op not in OPS:
            raise SystemExit(f"--only: unknown op {op!r}; choose from {', '.join(OPS)}.")

    copy = copy_bandwidth(args.small, args.repeats)
    rates = {
        name: matmul_rate(dt, args.small, max(3, args.repeats // 4))
        for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    }
    when = datetime.date.today().isoformat()
    print(f"# cljax.kernels benchmark, {when}")
    print(
        f"device: {device} ({backend}); jax {jax.__version__}; python {platform.python_version()}; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )
    print(f"copy bandwidth: {copy / 1e9:.1f} GB/s; matmul rate: "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()))  # fmt: skip
    if backend == "cpu":
        print(
            "CPU: only the XLA reference is timed (Pallas runs here only in interpret mode, a test tool)."
        )
    print()
    print("| op | case | dtype | XLA ms | Pallas ms | XLA / Pallas | XLA eff. | Pallas eff. |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows, measured = [], []
    for op in chosen:
        for case in OPS[op](args.small):
            result = run_case(case, impls, args.warmup, args.repeats)
            ceiling = copy if case.kind == "bytes" else rates[case.dtype]

            def eff(seconds, case=case, ceiling=ceiling):
                return case.work / seconds / ceiling

            pallas_ms = f"{result['pallas'] * 1e3:.3f}" if "pallas" in result else "—"
            ratio = f"{result['speedup']:.2f}" if "speedup" in result else "—"
            pallas_eff = f"{eff(result['pallas']):.2f}" if "pallas" in result else "—"
            print(
                f"| {case.op} | {case.label} | {case.dtype} | {result['xla'] * 1e3:.3f} | {pallas_ms} | "
                f"{ratio} | {eff(result['xla']):.2f} | {pallas_eff} |",
                flush=True,
            )
            rows.append({"group": op, "op": case.op, "case": case.label, "dtype": case.dtype, "key": case.key,
                         "kind": case.kind, "work": case.work, **result})  # fmt: skip
            if result.get("speedup", 0.0) > 1.0 and backend != "cpu":
                measured.append((case, result))
    print()
    print(
        "Efficiency: element-wise ops as a fraction of the copy bandwidth, projections of the matmul rate."
    )
    if measured:
        print(
            "\nCandidate dispatch entries (kernel faster; widen a range only with more measurements):"
        )
        for case, result in measured:
            print(
                f"    Measurement({backend!r}, {device!r}, {case.op!r}, {case.dtype!r}, {case.key}, "
                f"{case.key}, {result['speedup']:.2f}, 'docs/benchmarks.md, {when}'),"
            )
    if args.json:
        payload = {"date": when, "device": device, "backend": backend, "jax": jax.__version__,
                   "copy_bandwidth": copy, "matmul_rate": rates, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)


if __name__ == "__main__":
    main()
