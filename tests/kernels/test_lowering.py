"""Every kernel lowers for the hardware it is written for, checked on the CPU.

`jax.jit(...).trace(...).lower(lowering_platforms=...)` runs the Pallas lowering of another back
end without its device: ``'cuda'`` lowers the GPU variant to Triton IR (the
``__gpu$xla.gpu.triton`` custom call), ``'tpu'`` lowers the TPU variant to Mosaic (the
``tpu_custom_call``) under an abstract TPU device of a named generation. This catches what
interpret mode cannot: a primitive or block shape the compiler back end rejects, a GPU kernel
routed to the wrong GPU back end. What it cannot catch is anything later in the device compiler
(Triton's PTX passes, Mosaic's layout passes in libtpu), nor speed.

Operand shapes are abstract (`jax.ShapeDtypeStruct`), so nothing is computed and the large shapes
of the benchmark table cost no memory.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cljax
from cljax.kernels import _adam_step, _galore, _nm_mask, _packed_mask, _sltrain

PLATFORM = {"gpu": "cuda", "tpu": "tpu"}
CUSTOM_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# Device kinds of the TPU generations the TPU variant is lowered for (`jax.devices()[0].device_kind`).
TPU_KINDS = ("TPU v5 lite", "TPU v6 lite")
F32, BF16 = jnp.float32, jnp.bfloat16


def _abstract(shape, dtype=F32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _device(target: str, tpu_kind: str):
    """The TPU variant's lowering reads chip facts (tiling) from the device: name one."""
    if target != "tpu":
        return contextlib.nullcontext()
    from jax._src import mesh as mesh_lib

    device = mesh_lib.AbstractDevice(tpu_kind, 1, "tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def lowered_calls(fn, args, target: str, tpu_kind: str = TPU_KINDS[0]) -> list[str]:
    """Lowers ``jit(fn)(*args)`` for `target`'s platform; returns the custom-call targets."""
    with _device(target, tpu_kind):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(PLATFORM[target],))
    return re.findall(r"custom_call @([\w$.]+)", lowered.as_text())


def assert_lowers(fn, args, target: str, kernels: int = 1, tpu_kind: str = TPU_KINDS[0]) -> None:
    calls = lowered_calls(fn, args, target, tpu_kind)
    got = calls.count(CUSTOM_CALL[target])
    assert got == kernels, f"{target}: {got} {CUSTOM_CALL[target]} calls, want {kernels}: {calls}"


TARGETS = ("gpu", "tpu")


# ---------------------------------------------------------------------------------------------
# Fused element-wise Adam step.


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "shape, dtype",
    [((300, 257), F32), ((7,), BF16), ((4, 33, 65), F32), ((1024, 4096), BF16)],
    ids=["odd-f32", "vector-bf16", "3d-f32", "large-bf16"],
)
def test_adam_step_lowers(target, shape, dtype):
    x = _abstract(shape, dtype)
    keep = _abstract(shape, jnp.bool_)
    everything = dict(
        weight_decay=0.1,
        cautious="mean_clamp",
        cautious_weight_decay=True,
        apply=True,
    )
    assert_lowers(_adam(target), (x, x, x, x), target)
    assert_lowers(_adam(target, masked=True, **everything), (x, x, x, x, keep), target)


def _adam(target, masked=False, **options):
    """`adam_step`'s kernel as a function of its arrays (and the keep-mask when `masked`)."""

    def step(g, p, mu, nu, keep=None):
        return _adam_step.pallas(
            g,
            p,
            mu,
            nu,
            jnp.int32(3),
            learning_rate=1e-3,
            mask=keep,
            target=target,
            interpret=False,
            **options,
        )

    return step if masked else (lambda g, p, mu, nu: step(g, p, mu, nu))


# ---------------------------------------------------------------------------------------------
# Packed-mask apply and N:M selection.


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "shape, dtype", [((300, 257), F32), ((3, 40, 1030), BF16), ((5,), F32)], ids=str
)
def test_apply_packed_mask_lowers(target, shape, dtype):
    packed = _abstract(_packed_mask.packed_shape(shape), jnp.uint8)
    fn = lambda x, p: _packed_mask.pallas(x, p, target=target, interpret=False)
    assert_lowers(fn, (_abstract(shape, dtype), packed), target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "shape, n, m, axis, dtype",
    [
        ((256, 512), 2, 4, -1, F32),
        ((300, 260), 2, 4, 0, BF16),
        ((64, 96), 2, 8, -1, F32),
        ((8, 16, 32), 1, 4, 1, F32),
    ],
    ids=str,
)
def test_nm_mask_lowers(target, shape, n, m, axis, dtype):
    fn = lambda x: _nm_mask.pallas(x, n, m, axis=axis, target=target, interpret=False)
    assert_lowers(fn, (_abstract(shape, dtype),), target)


def test_nm_mask_tpu_variant_lowers_for_a_group_length_not_a_power_of_two():
    fn = lambda x: _nm_mask.pallas(x, 2, 6, axis=-1, target="tpu", interpret=False)
    assert_lowers(fn, (_abstract((16, 384)),), "tpu")


# ---------------------------------------------------------------------------------------------
# GaLore projection + Adam (two kernels: down product with the moment update, up product with
# the epilogue).


def _galore_args(m, n, r, side, dtype):
    grad = _abstract((m, n), dtype)
    basis = _abstract((m, r) if side == "left" else (n, r))
    moment = _abstract((r, n) if side == "left" else (m, r))
    return grad, basis, moment


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "m, n, r, dtype",
    [(300, 200, 17, F32), (256, 512, 64, BF16), (4096, 11008, 1024, BF16)],
    ids=["odd", "small", "issue-size"],
)
def test_galore_adam_step_lowers(target, side, m, n, r, dtype):
    grad, basis, moment = _galore_args(m, n, r, side, dtype)

    def apply(g, b, mu, nu, p):
        return _galore.pallas(
            g,
            b,
            mu,
            nu,
            jnp.int32(2),
            side=side,
            learning_rate=1e-3,
            weight_decay=0.1,
            param=p,
            apply=True,
            target=target,
            interpret=False,
        )

    assert_lowers(apply, (grad, basis, moment, moment, grad), target, kernels=2)


def test_galore_adam_step_lowers_for_stacked_matrices():
    grad = _abstract((3, 128, 96))
    basis, moment = _abstract((3, 128, 16)), _abstract((3, 16, 96))

    def update(g, b, mu, nu):
        return _galore.pallas(
            g,
            b,
            mu,
            nu,
            jnp.int32(0),
            side="left",
            learning_rate=1e-3,
            target="gpu",
            interpret=False,
        )

    assert_lowers(update, (grad, basis, moment, moment), "gpu", kernels=2)


# ---------------------------------------------------------------------------------------------
# SLTrain product, forward and gradient.


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_sltrain_matmul_and_its_gradient_lower(target, dtype):
    t, m, n, r = (100, 130, 70, 8) if target == "gpu" else (40, 256, 128, 8)
    rng = np.random.default_rng(0)
    k = m * n // 20
    support = jnp.asarray(np.sort(rng.choice(m * n, k, replace=False)), jnp.int32)
    block = (64, 64) if target == "gpu" else (128, 128)
    tiles = cljax.kernels.sltrain_tiles(support, (m, n), block=block)

    def forward(x, a, b, v):
        return _sltrain.pallas(x, a, b, v, tiles, scale=2.0, target=target, interpret=False)

    def loss(x, a, b, v):
        return jnp.sum(forward(x, a, b, v).astype(F32) ** 2)

    args = (_abstract((t, m), dtype), _abstract((m, r), dtype), _abstract((r, n), dtype))
    args += (_abstract((k,), dtype),)
    forward_calls = lowered_calls(forward, args, target).count(CUSTOM_CALL[target])
    assert forward_calls >= 1
    grad_calls = lowered_calls(jax.grad(loss, argnums=(0, 1, 2, 3)), args, target)
    # The backward pass adds its own kernels (the transposed product and the sampled product).
    assert grad_calls.count(CUSTOM_CALL[target]) > forward_calls


# ---------------------------------------------------------------------------------------------
# Across TPU generations, and the GPU back end Pallas picks.


@pytest.mark.parametrize("tpu_kind", TPU_KINDS)
def test_eight_bit_operands_lower_on_each_tpu_generation(tpu_kind):
    # 8-bit memory (the int8 mask, the packed bytes) is where the chip's tiling enters.
    x = _abstract((300, 257))

    keep = _abstract((300, 257), jnp.bool_)
    assert_lowers(_adam("tpu", masked=True), (x, x, x, x, keep), "tpu", tpu_kind=tpu_kind)
    packed = _abstract(_packed_mask.packed_shape((64, 2048)), jnp.uint8)
    fn = lambda y, p: _packed_mask.pallas(y, p, target="tpu", interpret=False)
    assert_lowers(fn, (_abstract((64, 2048)), packed), "tpu", tpu_kind=tpu_kind)


def test_gpu_variant_is_lowered_with_triton_whatever_the_default_gpu_back_end():
    # Since JAX 0.7 a `pallas_call` without compiler parameters lowers with Mosaic GPU, which
    # rejects these kernels; they must name Triton themselves.
    x = _abstract((300, 257))
    fn = _adam("gpu")
    from jax._src import config

    for use_mosaic_gpu in (True, False):
        with config.jax_pallas_use_mosaic_gpu(use_mosaic_gpu):
            assert_lowers(fn, (x, x, x, x), "gpu")
