"""Small Flax NNX models for the experiment streams: an MLP, a small CNN, a tiny LLaMA-style LM.

Every model is called on a batch and returns logits, and also exposes what continual-learning
methods need at a task boundary:

* ``layer_inputs(x)``: the input activations of every weight matrix, keyed by the kernel's
  parameter path (``'layers/0/kernel'``) as 2-D ``(rows, d_in)`` arrays, ready for GPM-style
  input-subspace bases. Convolution kernels get their im2col patches with features ordered like
  the kernel's ``(*window, C_in)`` axes, so ``patches @ kernel.reshape(-1, C_out)`` is the
  convolution.
* ``hidden_activations(x)``: post-ReLU activations of every hidden layer, ``(N, units)``
  (convolution channels are units, positions are folded into the batch), for dead-unit counts
  and effective rank (EX-06).

`build_model` returns a model for a stream and `functional` turns it into pure functions of a
parameter pytree (a plain nested dict), which is what optax and the runner work with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CNN", "MLP", "Functional", "TinyLlama", "build_model", "conv_patches", "functional"]


def _flatten(x: jax.Array, input_ndim: int) -> jax.Array:
    return x.reshape(x.shape[: x.ndim - input_ndim] + (-1,))


class MLP(nnx.Module):
    """A ReLU multi-layer perceptron: flatten, hidden layers, linear head.

    Args:
        in_features: Flattened input size.
        num_classes: Output size.
        hidden: Widths of the hidden layers.
        rngs: `nnx.Rngs` for the initialization.

    Example:
        >>> from cljax.experiments.models import MLP
        >>> from flax import nnx
        >>> jax.eval_shape(lambda: MLP(64, 10, (32,), rngs=nnx.Rngs(0))(jnp.zeros((2, 64)))).shape
        (2, 10)
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_features, *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def _run(self, x, inputs=None, hidden=None):
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            if inputs is not None:
                inputs[f"layers/{i}/kernel"] = x
            x = nnx.relu(layer(x))
            if hidden is not None:
                hidden[f"layers/{i}"] = x
        if inputs is not None:
            inputs["head/kernel"] = x
        return self.head(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._run(x)

    def layer_inputs(self, x: jax.Array) -> dict[str, jax.Array]:
        """Input activations of every kernel, keyed by its parameter path."""
        inputs: dict[str, jax.Array] = {}
        self._run(x, inputs=inputs)
        return inputs

    def hidden_activations(self, x: jax.Array) -> dict[str, jax.Array]:
        """Post-ReLU activations ``(N, units)`` of every hidden layer."""
        hidden: dict[str, jax.Array] = {}
        self._run(x, hidden=hidden)
        return hidden


def conv_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
    """im2col patches of a channels-last batch, features ordered like a Flax kernel's axes.

    Args:
        x: ``(N, *spatial, C)``.
        window: The kernel's spatial size.
        strides: The convolution's strides (padding is ``'SAME'``).

    Returns:
        ``(N * prod(out_spatial), prod(window) * C)``: ``patches @ kernel.reshape(-1, C_out)``
        equals the convolution with a ``(*window, C, C_out)`` kernel.

    Example:
        >>> from cljax.experiments.models import conv_patches
        >>> jax.eval_shape(lambda x: conv_patches(x, (3, 3), (2, 2)), jnp.ones((2, 8, 8, 1))).shape
        (32, 9)
    """
    nd = len(window)
    spatial = "HWD"[:nd] if nd <= 3 else None
    if spatial is None:
        raise ValueError(f"conv_patches: need 1 to 3 spatial dims, got {nd}.")
    spec = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    p = jax.lax.conv_general_dilated_patches(
        x, tuple(window), tuple(strides), "SAME", dimension_numbers=spec
    )
    c = x.shape[-1]
    k = math.prod(window)
    out_spatial = p.shape[1:-1]
    p = p.reshape(p.shape[0], *out_spatial, c, k)  # features come channel-major
    p = jnp.swapaxes(p, -1, -2)  # (..., window, C): the kernel's (*window, C_in) order
    return p.reshape(-1, k * c)


class CNN(nnx.Module):
    """A small ReLU convolutional network for 1-D or 2-D inputs (channels-last, 'SAME' padding).

    ``conv(channels[0], stride 1) -> conv(channels[1], stride 2) -> ... -> flatten -> dense ->
    head``. A flat input is reshaped to `spatial` with one channel.

    Args:
        spatial: Spatial shape of an input, ``(8, 8)`` for digits or ``(40,)`` for MNIST-1D.
        num_classes: Output size.
        channels: Channels of the convolutions (the first has stride 1, the others stride 2).
        kernel_size: Window size along every spatial axis.
        dense: Width of the hidden dense layer.
        rngs: `nnx.Rngs`.

    Example:
        >>> from cljax.experiments.models import CNN
        >>> from flax import nnx
        >>> jax.eval_shape(lambda: CNN((40,), 10, (4, 8), dense=16, rngs=nnx.Rngs(0))(jnp.zeros((2, 40)))).shape
        (2, 10)
    """

    def __init__(
        self,
        spatial: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        *,
        kernel_size: int = 3,
        dense: int = 64,
        rngs: nnx.Rngs,
    ):
        self.spatial = tuple(int(s) for s in spatial)
        nd = len(self.spatial)
        self.window = (kernel_size,) * nd
        self.strides = tuple((1,) * nd if i == 0 else (2,) * nd for i in range(len(channels)))
        convs, c_in, size = [], 1, list(self.spatial)
        for c, stride in zip(channels, self.strides, strict=True):
            convs.append(nnx.Conv(c_in, c, self.window, strides=stride, padding="SAME", rngs=rngs))
            size = [math.ceil(s / st) for s, st in zip(size, stride, strict=True)]
            c_in = c
        self.convs = nnx.List(convs)
        self.dense = nnx.Linear(math.prod(size) * c_in, dense, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def _run(self, x, inputs=None, hidden=None):
        x = x.reshape((x.shape[0], *self.spatial, 1))
        for i, conv in enumerate(self.convs):
            if inputs is not None:
                inputs[f"convs/{i}/kernel"] = conv_patches(x, self.window, self.strides[i])
            x = nnx.relu(conv(x))
            if hidden is not None:
                hidden[f"convs/{i}"] = x.reshape(-1, x.shape[-1])
        x = x.reshape(x.shape[0], -1)
        if inputs is not None:
            inputs["dense/kernel"] = x
        x = nnx.relu(self.dense(x))
        if hidden is not None:
            hidden["dense"] = x
        if inputs is not None:
            inputs["head/kernel"] = x
        return self.head(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._run(x)

    def layer_inputs(self, x: jax.Array) -> dict[str, jax.Array]:
        """Input activations (patches for convolutions) of every kernel, keyed by its path."""
        inputs: dict[str, jax.Array] = {}
        self._run(x, inputs=inputs)
        return inputs

    def hidden_activations(self, x: jax.Array) -> dict[str, jax.Array]:
        """Post-ReLU activations of every hidden layer (channels as units)."""
        hidden: dict[str, jax.Array] = {}
        self._run(x, hidden=hidden)
        return hidden


def _rope(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form) on ``(N, L, H, D)``, D even."""
    length, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]  # (L, D/2)
    cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class _Block(nnx.Module):
    def __init__(self, dim: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.wq = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.wv = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.w_gate = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.w_up = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.w_down = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x, prefix, inputs):
        n, length, dim = x.shape
        h = self.attn_norm(x)
        if inputs is not None:
            flat = h.reshape(-1, dim)
            for name in ("wq", "wk", "wv"):
                inputs[f"{prefix}/{name}/kernel"] = flat
        split = lambda t: t.reshape(n, length, self.heads, dim // self.heads)  # noqa: E731
        q, k, v = _rope(split(self.wq(h))), _rope(split(self.wk(h))), split(self.wv(h))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) / math.sqrt(
            dim // self.heads
        )
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attn = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, dim)
        if inputs is not None:
            inputs[f"{prefix}/wo/kernel"] = attn.reshape(-1, dim)
        x = x + self.wo(attn)
        h = self.mlp_norm(x)
        if inputs is not None:
            flat = h.reshape(-1, dim)
            inputs[f"{prefix}/w_gate/kernel"] = flat
            inputs[f"{prefix}/w_up/kernel"] = flat
        g = nnx.silu(self.w_gate(h)) * self.w_up(h)
        if inputs is not None:
            inputs[f"{prefix}/w_down/kernel"] = g.reshape(-1, g.shape[-1])
        return x + self.w_down(g)


class TinyLlama(nnx.Module):
    """A tiny LLaMA-style causal language model.

    Token embedding, `depth` pre-norm blocks (RMSNorm, multi-head causal attention with rotary
    position embeddings, RMSNorm, SwiGLU MLP; no biases), a final RMSNorm and an untied head.

    Args:
        vocab_size: Vocabulary size.
        dim: Model width (divisible by `heads`, head size even).
        depth: Number of blocks.
        heads: Attention heads.
        hidden: SwiGLU hidden width (default ``round(8 * dim / 3)``, a multiple of 8).
        rngs: `nnx.Rngs`.

    Example:
        >>> from cljax.experiments.models import TinyLlama
        >>> from flax import nnx
        >>> model = lambda: TinyLlama(96, dim=16, depth=1, heads=2, rngs=nnx.Rngs(0))
        >>> jax.eval_shape(lambda: model()(jnp.zeros((2, 8), jnp.int32))).shape
        (2, 8, 96)

    References:
        Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023.
        https://arxiv.org/abs/2302.13971
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        hidden: int | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % heads or (dim // heads) % 2:
            raise ValueError(
                f"TinyLlama: `dim` ({dim}) must be divisible by `heads` ({heads}) into even head sizes."
            )
        hidden = hidden or 8 * math.ceil(8 * dim / 3 / 8)
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.blocks = nnx.List([_Block(dim, heads, hidden, rngs=rngs) for _ in range(depth)])
        self.final_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, use_bias=False, rngs=rngs)

    def _run(self, tokens, inputs=None):
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, f"blocks/{i}", inputs)
        x = self.final_norm(x)
        if inputs is not None:
            inputs["head/kernel"] = x.reshape(-1, x.shape[-1])
        return self.head(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self._run(tokens)

    def layer_inputs(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """Input activations ``(N * L, d_in)`` of every kernel, keyed by its parameter path."""
        inputs: dict[str, jax.Array] = {}
        self._run(tokens, inputs)
        return inputs

    def hidden_activations(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """The inputs of each block's down projection (SwiGLU activations), ``(N * L, hidden)``."""
        return {
            k[: -len("/w_down/kernel")]: v
            for k, v in self.layer_inputs(tokens).items()
            if k.endswith("/w_down/kernel")
        }


class Functional(NamedTuple):
    """Pure functions of a parameter pytree (a nested dict) for one NNX model."""

    params: Any  # the initial parameters
    apply: Callable[[Any, jax.Array], jax.Array]  # (params, x) -> logits
    layer_inputs: Callable[[Any, jax.Array], dict[str, jax.Array]]
    hidden_activations: Callable[[Any, jax.Array], dict[str, jax.Array]]


def functional(model: nnx.Module) -> Functional:
    """Splits an NNX model into its parameters (a plain nested dict) and pure functions.

    Args:
        model: An `MLP`, `CNN`, `TinyLlama` or any NNX module with the same three methods.

    Returns:
        A `Functional` whose functions take the parameters as their first argument.

    Example:
        >>> from cljax.experiments.models import MLP, functional
        >>> from flax import nnx
        >>> f = functional(nnx.eval_shape(lambda: MLP(4, 3, (8,), rngs=nnx.Rngs(0))))
        >>> jax.eval_shape(f.apply, f.params, jnp.ones((2, 4))).shape
        (2, 3)
    """
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def call(method):
        def fn(p, x):
            return getattr(nnx.merge(graphdef, p), method)(x)

        return fn

    return Functional(params, call("__call__"), call("layer_inputs"), call("hidden_activations"))


MODELS = ("mlp", "cnn", "tiny_llama")


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, seed: int, **kwargs: Any
) -> nnx.Module:
    """Builds ``'mlp'``, ``'cnn'`` or ``'tiny_llama'`` for a stream's inputs and outputs.

    Args:
        name: The model name.
        input_shape: Shape of one input.
        num_classes: Output size (the vocabulary for ``'tiny_llama'``).
        seed: Initialization seed.
        **kwargs: Passed to the model's constructor (``hidden=``, ``channels=``, ``dim=`` ...);
            ``spatial=`` views flat inputs as images for the CNN (``(8, 8)`` for the digits).

    Raises:
        ValueError: for an unknown model name.

    Example:
        >>> from cljax.experiments.models import build_model
        >>> from flax import nnx
        >>> nnx.eval_shape(lambda: build_model("cnn", (64,), 10, seed=0, spatial=(8, 8))).spatial
        (8, 8)
    """
    rngs = nnx.Rngs(seed)
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, rngs=rngs, **kwargs)
    if name == "cnn":
        spatial = tuple(kwargs.pop("spatial", None) or input_shape)
        if math.prod(spatial) != math.prod(input_shape):
            raise ValueError(
                f"build_model: `spatial` {spatial} does not hold inputs of shape {tuple(input_shape)}."
            )
        return CNN(spatial, num_classes, rngs=rngs, **kwargs)
    if name == "tiny_llama":
        return TinyLlama(num_classes, rngs=rngs, **kwargs)
    raise ValueError(f"build_model(name=...) must be one of {', '.join(MODELS)}, got {name!r}.")
