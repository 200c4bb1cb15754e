"""Tests of the SLTrain product (`cljax.kernels.sltrain_matmul`) and its tiles.

The reference is checked against `cljax.sltrain_apply` (bitwise: it is the same formula) and a
dense float64 NumPy product; the tiles against the support they bucket. The Pallas kernels (both
target variants) are checked against the reference in interpret mode, forward and through
`jax.grad` (the custom VJP against autodiff of the reference), with token, row and column counts
that the blocks do not divide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cljax
from cljax.kernels import _dispatch, _sltrain
from tests.kernels import kernel_testing as kt


def _operands(rng, batch, m, n, r, density, dtype=jnp.float32):
    k = max(1, int(density * m * n))
    support = jnp.asarray(np.sort(rng.choice(m * n, k, replace=False)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((*batch, m)), dtype)
    a = jnp.asarray(rng.standard_normal((m, r)) / np.sqrt(m), dtype)
    b = jnp.asarray(rng.standard_normal((r, n)), dtype)
    values = jnp.asarray(rng.standard_normal(k), dtype)
    return x, a, b, values, support


def _dense_np(x, a, b, values, support, scale):
    f64 = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
    m, n = a.shape[0], b.shape[1]
    s = np.zeros(m * n)
    s[np.asarray(support)] = f64(values)
    return f64(x) @ (scale * f64(a) @ f64(b) + s.reshape(m, n))


# ---------------------------------------------------------------------------------------------
# The reference and the tiles.


def test_reference_is_sltrain_apply():
    x, a, b, values, support = _operands(np.random.default_rng(4), (2, 5), 12, 10, 3, 0.2)
    w = cljax.SparseLowRankWeight(a, b, values, scale=2.0, shape=(12, 10), spec=cljax.MatrixSpec())
    got = _sltrain.reference(x, a, b, values, support, scale=2.0)
    np.testing.assert_array_equal(got, cljax.sltrain_apply(x, w, support))
    # `sltrain_apply` dispatches: with tiles it runs the kernel (interpreted on the CPU).
    tiles = cljax.kernels.sltrain_tiles(support, (12, 10), block=(16, 16))
    kernel = jax.jit(lambda x, w, tl: cljax.sltrain_apply(x, w, support, tiles=tl, impl="pallas"))
    kt.assert_close(kernel(x, w, tiles), got, jnp.float32, scale=float(jnp.max(jnp.abs(got))))


def test_reference_matches_dense_numpy():
    x, a, b, values, support = _operands(np.random.default_rng(0), (3, 4), 9, 7, 2, 0.3)
    got = _sltrain.reference(x, a, b, values, support, scale=0.75)
    np.testing.assert_allclose(got, _dense_np(x, a, b, values, support, 0.75), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [(4, 8), (16, 16), (3, 5)])
def test_tiles_hold_every_entry_once(block):
    rng = np.random.default_rng(1)
    m, n = 13, 21
    support = np.sort(rng.choice(m * n, 60, replace=False))
    tiles = cljax.kernels.sltrain_tiles(support, (m, n), block=block)
    bk, bn = block
    nt, kt, cap = tiles.src.shape
    assert (nt, kt) == (-(-n // bn), -(-m // bk)) and cap >= 16 and cap & (cap - 1) == 0
    src, rows, cols = (np.asarray(t) for t in (tiles.src, tiles.rows, tiles.cols))
    j, kk, _ = np.nonzero(src >= 0)
    found = src[src >= 0]
    np.testing.assert_array_equal(np.sort(found), np.arange(60))  # each entry exactly once
    global_rows = kk * bk + rows[src >= 0]
    global_cols = j * bn + cols[src >= 0]
    np.testing.assert_array_equal(global_rows * n + global_cols, support[found])
    t = tiles.transpose()
    assert t.shape == (n, m) and t.block == (bn, bk)
    np.testing.assert_array_equal(t.rows, np.swapaxes(cols, 0, 1))


def test_tiles_errors():
    support = jnp.array([0, 1, 2, 3])
    with pytest.raises(
        ValueError, match=r"sltrain_tiles\(capacity=2\) is too small: a \(2, 2\) tile holds 4"
    ):
        cljax.kernels.sltrain_tiles(support, (2, 2), block=(2, 2), capacity=2)
    with pytest.raises(ValueError, match=r"sltrain_tiles: `support` has indices outside \[0, 3\)"):
        cljax.kernels.sltrain_tiles(support, (1, 3), block=(2, 2))
    with pytest.raises(TypeError, match="sltrain_tiles: `support` is traced"):
        jax.jit(lambda s: cljax.kernels.sltrain_tiles(s, (2, 2), block=(2, 2)).src)(support)


# ---------------------------------------------------------------------------------------------
# The kernels against the reference, forward and backward.

# (tokens, m, n, rank, density), the tile block, the token block.
SETUPS = {
    "gpu": ((37, 70, 90, 5, 0.15), (32, 64), 16),
    "tpu": ((20, 150, 140, 6, 0.1), (128, 128), 16),
}


@functools.cache
def _jitted(target, interpret, scale, block_tokens):
    interp = kt.interpret_arg(target, interpret)
    run = lambda x, a, b, v, tiles: _sltrain.pallas(
        x, a, b, v, tiles, scale=scale, target=target, block_tokens=block_tokens, interpret=interp
    )
    loss = lambda *args: jnp.sum(jnp.sin(run(*args).astype(jnp.float32)))
    return jax.jit(run), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


@functools.cache
def _reference_grad(scale):
    loss = lambda x, a, b, v, s: jnp.sum(
        jnp.sin(_sltrain.reference(x, a, b, v, s, scale=scale).astype(jnp.float32))
    )
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


class TestSltrainMatmul:
    interpret = False  # compiled: needs a GPU or TPU

    def check(self, request, target, dtype, setup=None, batch_split=False, grads=True):
        kt.skip_unless_runnable(target, self.interpret)
        (t, m, n, r, density), block, bt = setup or SETUPS[target]
        batch = (3, t // 3) if batch_split else (t,)
        x, a, b, values, support = _operands(kt.case_rng(request), batch, m, n, r, density, dtype)
        tiles = cljax.kernels.sltrain_tiles(support, (m, n), block=block)
        forward, grad = _jitted(target, self.interpret, 0.5, bt)
        want = _sltrain.reference(x, a, b, values, support, scale=0.5)
        got = forward(x, a, b, values, tiles)
        assert got.dtype == want.dtype
        kt.assert_close(
            got,
            want,
            dtype,
            f"{target} forward",
            scale=float(jnp.max(jnp.abs(want.astype(jnp.float32)))),
        )
        if not grads:
            return
        got_grads = grad(x, a, b, values, tiles)
        want_grads = _reference_grad(0.5)(x, a, b, values, support)
        for name, g, w in zip(("x", "a", "b", "values"), got_grads, want_grads, strict=True):
            assert g.dtype == w.dtype, f"d{name}: dtype {g.dtype} != {w.dtype}"
            scale = 10 * float(jnp.max(jnp.abs(w.astype(jnp.float32))))  # sums over T and m
            kt.assert_close(g, w, dtype, f"{target} d{name}", scale=scale)

    def test_matches_reference_and_its_gradient(self, request):
        self.check(request, "gpu", jnp.float32)

    def test_tpu_variant_matches_reference(self, request):
        self.check(request, "tpu", jnp.float32, grads=False)

    @pytest.mark.slow
    def test_tpu_variant_gradient_matches_reference(self, request):
        self.check(request, "tpu", jnp.float32)

    def test_bf16_with_leading_dims(self, request):
        self.check(request, "gpu", jnp.bfloat16, batch_split=True, grads=False)

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", kt.DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("target", kt.TARGETS)
    @pytest.mark.parametrize(
        "sizes", [(1, 16, 16, 1, 0.5), (64, 33, 129, 16, 0.05), (5, 130, 17, 3, 0.3)]
    )
    def test_matches_reference_many_sizes(self, request, target, dtype, sizes):
        block = (16, 16) if target == "gpu" else (128, 128)
        self.check(request, target, dtype, setup=(sizes, block, 16 if target == "gpu" else 8))


class TestSltrainMatmulInterpret(TestSltrainMatmul):
    interpret = True  # the same tests, on the CPU, in interpret mode


# ---------------------------------------------------------------------------------------------
# The dispatcher and argument errors.


def test_dispatch(monkeypatch):
    x, a, b, values, support = _operands(np.random.default_rng(2), (4,), 16, 16, 2, 0.25)
    want = _sltrain.reference(x, a, b, values, support, scale=0.5)
    for impl in ("auto", "xla"):
        got = cljax.kernels.sltrain_matmul(x, a, b, values, support, scale=0.5, impl=impl)
        np.testing.assert_array_equal(got, want)
    tiles = cljax.kernels.sltrain_tiles(support, (16, 16), block=(16, 16))
    got = jax.jit(
        lambda x, a, b, v, s, tl: cljax.kernels.sltrain_matmul(
            x, a, b, v, s, scale=0.5, tiles=tl, impl="pallas"
        )
    )(x, a, b, values, support, tiles)
    kt.assert_close(got, want, jnp.float32, scale=float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match=r"sltrain_matmul\(impl='pallas'\) needs `tiles`"):
        cljax.kernels.sltrain_matmul(x, a, b, values, support, impl="pallas")
    monkeypatch.setattr(_dispatch, "choose", lambda *a, **k: "pallas")  # measured, but no tiles
    np.testing.assert_array_equal(
        cljax.kernels.sltrain_matmul(x, a, b, values, support, scale=0.5), want
    )


def test_errors():
    x, a, b, values, support = _operands(np.random.default_rng(3), (4,), 16, 16, 2, 0.25)
    fn = cljax.kernels.sltrain_matmul
    with pytest.raises(
        ValueError, match=r"`a` \(16, 2\) and `b` \(3, 16\) must be \(m, r\) and \(r, n\)"
    ):
        fn(x, a, jnp.zeros((3, 16)), values, support)
    with pytest.raises(
        ValueError, match=r"`x` has shape \(4, 15\); its last dim must be the 16 rows"
    ):
        fn(x[:, :15], a, b, values, support)
    with pytest.raises(ValueError, match=r"`values` \(64,\) and `support` \(63,\) must be"):
        fn(x, a, b, values, support[:63])
    with pytest.raises(ValueError, match=r"sltrain_matmul\(impl=...\) must be"):
        fn(x, a, b, values, support, impl="gpu")
    tiles = cljax.kernels.sltrain_tiles(support, (16, 16), block=(16, 16))
    with pytest.raises(TypeError, match=r"sltrain_matmul\(tiles=...\) must be the SparseTiles"):
        _sltrain.pallas(x, a, b, values, tiles.src, target="gpu")
    with pytest.raises(
        ValueError, match=r"`tiles` were built for a \(16, 16\) matrix, but .* give \(16, 8\)"
    ):
        _sltrain.pallas(x, a, b[:, :8], values, tiles, target="gpu")
    odd = cljax.kernels.sltrain_tiles(support, (16, 16), block=(8, 12))
    with pytest.raises(
        ValueError, match=r"target='gpu' needs tile blocks that are powers of two >= 16"
    ):
        _sltrain.pallas(x, a, b, values, odd, target="gpu")
    with pytest.raises(
        ValueError, match=r"target='tpu' needs tile blocks that are multiples of 128"
    ):
        _sltrain.pallas(x, a, b, values, odd, target="tpu")
    with pytest.raises(ValueError, match=r"block_tokens=...\) must be a power of two >= 16"):
        _sltrain.pallas(x, a, b, values, tiles, target="gpu", block_tokens=24)
    with pytest.raises(ValueError, match=r"block_tokens=...\) must be a multiple of 8"):
        _sltrain.pallas(x, a, b, values, tiles, target="tpu", block_tokens=12)
    with pytest.raises(TypeError, match="the kernel path needs a Python float `scale`"):
        jax.jit(lambda s: _sltrain.pallas(x, a, b, values, tiles, scale=s, target="gpu"))(0.5)
