"""Models: shapes, layer inputs keyed by kernel paths, conv patches, causality of the LM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cljax.experiments import models as Mo


def _flat_params(params):
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): v
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [
        ("mlp", (64,), {"hidden": (16, 16)}),
        ("cnn", (64,), {"spatial": (8, 8), "channels": (4, 8), "dense": 16}),
        # The 1-D CNN's patches are checked by `test_conv_patches_times_kernel_is_the_convolution`.
        pytest.param(
            "cnn",
            (40,),
            {"channels": (4, 8), "dense": 16, "kernel_size": 5},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_layer_inputs_reproduce_every_kernel_product(name, shape, kwargs):
    model = Mo.build_model(name, shape, 10, seed=0, **kwargs)
    f = Mo.functional(model)
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    logits, inputs, hidden = jax.jit(
        lambda p, x: (f.apply(p, x), f.layer_inputs(p, x), f.hidden_activations(p, x))
    )(f.params, x)
    flat = _flat_params(f.params)
    assert set(inputs) == {k for k in flat if k.endswith("kernel")}
    for path, acts in inputs.items():
        kernel = flat[path]
        assert acts.ndim == 2 and acts.shape[1] == int(np.prod(kernel.shape[:-1]))
    # The head's input times its kernel plus bias is the model's output.
    out = inputs["head/kernel"] @ flat["head/kernel"] + flat["head/bias"][None, :]
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
    # Hidden activations are post-ReLU, one (rows, units) matrix per hidden layer.
    assert all(float(h.min()) >= 0.0 and h.ndim == 2 for h in hidden.values())
    if name == "mlp":
        assert list(hidden) == ["layers/0", "layers/1"] and hidden["layers/1"].shape == (3, 16)


def test_conv_patches_times_kernel_is_the_convolution():
    for spatial, window in (((6, 5), (3, 3)), ((11,), (5,))):
        conv = nnx.Conv(3, 4, window, strides=2, padding="SAME", rngs=nnx.Rngs(0))
        x = np.random.default_rng(2).normal(size=(2, *spatial, 3)).astype(np.float32)
        kernel, bias = conv.kernel[...], conv.bias[...]

        @jax.jit
        def both(x, kernel, bias, window=window, conv=conv):
            patches = Mo.conv_patches(x, window, (2,) * len(window))
            return patches @ kernel.reshape(-1, 4) + bias[None, :], conv(x).reshape(-1, 4)

        got, want = both(x, kernel, bias)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="spatial dims"):
        Mo.conv_patches(jnp.zeros((1, 2, 2, 2, 2, 1)), (1, 1, 1, 1), (1, 1, 1, 1))


def test_tiny_llama_is_causal_and_exposes_every_kernel():
    model = Mo.TinyLlama(20, dim=8, depth=1, heads=2, rngs=nnx.Rngs(0))
    f = Mo.functional(model)
    rng = np.random.default_rng(0)  # NumPy inputs: no eager JAX operation to compile
    tokens = rng.integers(0, 20, (2, 10)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % 20
    q = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)

    @jax.jit
    def everything(p, tokens, changed, q):
        return (
            f.apply(p, tokens),
            f.apply(p, changed),
            f.layer_inputs(p, tokens),
            f.hidden_activations(p, tokens),
            Mo._rope(q),
        )

    a, b, inputs, hidden, rotated = everything(f.params, tokens, changed, q)
    assert a.shape == (2, 10, 20)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 6:], b[:, 6:])
    flat = _flat_params(f.params)
    assert set(inputs) == {k for k in flat if k.endswith("kernel")}
    np.testing.assert_allclose(
        (inputs["head/kernel"] @ flat["head/kernel"]).reshape(2, 10, 20), a, rtol=1e-5, atol=1e-5
    )
    assert set(hidden) == {"blocks/0"}
    # Rotary embeddings rotate pairs of coordinates: norms are kept, position 0 is unchanged.
    np.testing.assert_allclose(
        np.linalg.norm(rotated, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5
    )
    np.testing.assert_allclose(rotated[:, 0], q[:, 0], rtol=1e-6)


def test_model_errors():
    with pytest.raises(ValueError, match="must be one of"):
        Mo.build_model("resnet", (64,), 10, seed=0)
    with pytest.raises(ValueError, match="does not hold inputs"):
        Mo.build_model("cnn", (64,), 10, seed=0, spatial=(7, 7))
    with pytest.raises(ValueError, match="divisible"):
        Mo.TinyLlama(10, dim=10, heads=3, rngs=nnx.Rngs(0))
