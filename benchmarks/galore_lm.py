"""A miniature of the GaLore pre-training result: a small LLaMA-style character-level LM.

The model (RMSNorm, rotary attention, SwiGLU MLP, untied embedding and head, layers stacked on a
leading axis and run with `lax.scan`) is trained from scratch on text that ships with Python (the
standard library's own source files, read in sorted order), with

* `optax.adamw`,
* `cljax.galore_adamw` at rank ``d_model / 4`` (attention and MLP matrices projected, each
  stacked ``(L, m, n)`` leaf as ``L`` matrices; embedding, head and norms on plain Adam, as in the
  reference recipes), and
* `cljax.frugal` (density 0.25, signSGD on the residual, same selection),

for the same number of steps from the same initialisation and batches. Reported: final
validation loss (nats per character) and optimizer-state bytes, each as a ratio to AdamW's.
Target: GaLore within 5% of AdamW's loss at no more than half its optimizer-state memory.

Usage:
    python benchmarks/galore_lm.py            # d_model 128, 4 layers, 2000 steps (CPU: minutes)
    python benchmarks/galore_lm.py --small    # a tiny model and 30 steps, a quick check
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cljax

MATRICES = "blocks/(wq|wk|wv|wo|w_gate|w_up|w_down)$"


def load_text(max_chars: int) -> str:
    """Concatenated standard-library sources, sorted by path, up to `max_chars` characters."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            chunks.append(text)
            total += len(text)
            if total >= max_chars:
                return "".join(chunks)[:max_chars]
    return "".join(chunks)[:max_chars]


def encode(text: str) -> tuple[np.ndarray, int]:
    """Printable ASCII plus newline map to their own ids; everything else to one extra id."""
    table = np.full(256, 96, np.int32)
    for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"]):
        table[ord(c)] = i
    data = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)
    return table[data], 97


def init_params(key, vocab, d, layers, hidden):
    ks = jax.random.split(key, 9)
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) / math.sqrt(fan_in)  # noqa: E731
    return {
        "embed": 0.02 * jax.random.normal(ks[0], (vocab, d)),
        "blocks": {
            "attn_norm": jnp.ones((layers, d)),
            "wq": normal(ks[1], (layers, d, d), d),
            "wk": normal(ks[2], (layers, d, d), d),
            "wv": normal(ks[3], (layers, d, d), d),
            "wo": normal(ks[4], (layers, d, d), d) / math.sqrt(2 * layers),
            "mlp_norm": jnp.ones((layers, d)),
            "w_gate": normal(ks[5], (layers, d, hidden), d),
            "w_up": normal(ks[6], (layers, d, hidden), d),
            "w_down": normal(ks[7], (layers, hidden, d), hidden) / math.sqrt(2 * layers),
        },
        "final_norm": jnp.ones(d),
        "head": normal(ks[8], (d, vocab), d),
    }


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def rotary(x):
    """Rotary position embedding on (batch, seq, heads, head_dim)."""
    _, seq, _, dim = x.shape
    half = dim // 2
    freqs = 1.0 / (10000.0 ** (jnp.arange(half) / half))
    angles = jnp.arange(seq)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def forward(params, tokens, heads):
    x = params["embed"][tokens]
    batch, seq, d = x.shape
    mask = jnp.tril(jnp.ones((seq, seq), bool))

    def layer(x, p):
        h = rms_norm(x, p["attn_norm"])
        split = lambda w: (h @ w).reshape(batch, seq, heads, d // heads)  # noqa: E731
        q, k, v = rotary(split(p["wq"])), rotary(split(p["wk"])), split(p["wv"])
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        logits = jnp.where(mask[None, None], logits, -1e9)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(
            batch, seq, d
        )
        x = x + att @ p["wo"]
        h = rms_norm(x, p["mlp_norm"])
        x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
        return x, None

    x, _ = jax.lax.scan(layer, x, params["blocks"])
    return rms_norm(x, params["final_norm"]) @ params["head"]


def loss_fn(params, batch, heads):
    logits = forward(params, batch[:, :-1], heads)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))


def matrix_spec(params):
    chosen = cljax.select(MATRICES)(params)
    return jax.tree.map(lambda c: cljax.MatrixSpec() if c else None, chosen)


def batches(data, key, batch, seq):
    starts = jax.random.randint(key, (batch,), 0, len(data) - seq - 1)
    return jnp.stack([jax.lax.dynamic_slice(data, (s,), (seq + 1,)) for s in starts])


def run(name, tx, params, train, val, args):
    state = tx.init(params)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

    @jax.jit
    def step(params, state, key):
        data = batches(train, key, args.batch, args.seq)
        loss, grads = jax.value_and_grad(loss_fn)(params, data, args.heads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    eval_loss = jax.jit(lambda p, d: loss_fn(p, d, args.heads))
    start = time.perf_counter()
    for t in range(args.steps):
        params, state, loss = step(
            params, state, jax.random.fold_in(jax.random.key(args.seed + 1), t)
        )
        if (t + 1) % max(1, args.steps // 10) == 0:
            print(
                f"  {name}: step {t + 1}/{args.steps} train loss {float(loss):.4f}",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - start
    vkeys = jax.random.split(jax.random.key(10**6), args.eval_batches)
    val_loss = float(
        np.mean([float(eval_loss(params, batches(val, k, args.batch, args.seq))) for k in vkeys])
    )
    return val_loss, state_bytes, elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model, 30 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--chars", type=int, default=None, help="characters of text to load")
    parser.add_argument("--eval-batches", type=int, default=None)
    parser.add_argument("--lr-adamw", type=float, default=3e-3)
    parser.add_argument(
        "--lr-galore", type=float, default=1e-2, help="with scale 0.25, as the reference"
    )
    parser.add_argument("--lr-frugal", type=float, default=3e-3)
    parser.add_argument("--refresh-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small
    args.steps = args.steps or (30 if small else 2000)
    args.d_model = args.d_model or (32 if small else 128)
    args.layers = args.layers or (1 if small else 4)
    args.seq = args.seq or (32 if small else 128)
    args.batch = args.batch or (8 if small else 32)
    args.chars = args.chars or (200_000 if small else 4_000_000)
    args.eval_batches = args.eval_batches or (4 if small else 50)
    if args.d_model % (4 * args.heads):
        parser.error("--d-model must be a multiple of 4 * --heads")

    ids, vocab = encode(load_text(args.chars))
    split = int(0.9 * len(ids))
    train, val = jnp.asarray(ids[:split]), jnp.asarray(ids[split:])
    hidden = 8 * ((8 * args.d_model // 3 + 7) // 8)
    params = init_params(jax.random.key(args.seed), vocab, args.d_model, args.layers, hidden)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rank = args.d_model // 4
    warmup = max(1, args.steps // 20)
    schedule = lambda peak: optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, args.steps, 0.1 * peak
    )  # noqa: E731
    optimizers = {
        "adamw": optax.adamw(schedule(args.lr_adamw), weight_decay=0.0),
        "galore_adamw": cljax.galore_adamw(
            schedule(args.lr_galore),
            rank=rank,
            refresh_every=args.refresh_every,
            scale=0.25,
            matrix_spec=matrix_spec,
        ),
        "frugal": cljax.frugal(
            schedule(args.lr_frugal),
            density=0.25,
            refresh_every=args.refresh_every,
            matrix_spec=matrix_spec,
        ),
    }
    print(
        "# GaLore miniature: character-level LLaMA-style LM on the Python standard library's source"
    )
    print()
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(
        f"- jax {jax.__version__}, optax {optax.__version__}, cljax {cljax.__version__}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )
    print(
        f"- text: {len(ids):,} characters ({split:,} train), vocabulary {vocab}; model d_model {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, MLP {hidden}, {n_params:,} params"
    )
    print(
        f"- {args.steps} steps, batch {args.batch} x {args.seq}, warm-up {warmup} + cosine to 10%; "
        f"lr adamw {args.lr_adamw}, galore {args.lr_galore} (rank {rank}, scale 0.25, T {args.refresh_every}), "
        f"frugal {args.lr_frugal} (density 0.25); seed {args.seed}"
    )
    results: dict[str, Any] = {}
    for name, tx in optimizers.items():
        results[name] = run(name, tx, params, train, val, args)
    base_loss, base_bytes, _ = results["adamw"]
    print()
    print("| optimizer | val loss | loss / adamw | state MiB | state / adamw | train time (s) |")
    print("|---|---|---|---|---|---|")
    for name, (loss, nbytes, elapsed) in results.items():
        print(
            f"| {name} | {loss:.4f} | {loss / base_loss:.3f} | {nbytes / 2**20:.2f} | "
            f"{nbytes / base_bytes:.3f} | {elapsed:.0f} |"
        )
    loss, nbytes, _ = results["galore_adamw"]
    ok = loss <= 1.05 * base_loss and nbytes <= 0.5 * base_bytes
    print()
    print(
        f"- target (galore within 5% of adamw's loss at <= half its state): {'met' if ok else 'not met'}"
    )


if __name__ == "__main__":
    main()
