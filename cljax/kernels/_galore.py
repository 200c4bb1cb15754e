"""GaLore-style fused projection: project the gradient, update the low-rank Adam state, project
back with the parameter-update epilogue.

For a matrix gradient ``G`` (``m x n``) and a float32 basis, with ``t = count + 1``:

* left side, ``P`` (``m x r``): ``R = Pᵀ G`` (``r x n``), back-projection ``P N``;
* right side, ``Q`` (``n x r``): ``R = G Q`` (``m x r``), back-projection ``N Qᵀ``;

where, element-wise on the low-rank ``R`` (float32),

    mu' = b1 mu + (1 - b1) R,   nu' = b2 nu + (1 - b2) R²,
    N   = (mu' / (1 - b1^t)) / (sqrt(nu' / (1 - b2^t) + eps_root) + eps),

and the epilogue on the full matrix is ``u = -lr · (scale · back + wd · p)``, returned as the
update ``u`` or, with `apply`, as the new parameter ``p + u``. That is one step of
``chain(scale_by_low_rank_projection(scale_by_adam(...), side=..., scale=...),
add_decayed_weights(wd), scale_by_learning_rate(lr))`` on a step that does not refresh the basis.

Two kernels, as the reference GaLore's fused Triton kernels: the first is a tiled matmul over the
low-rank output whose epilogue updates ``mu``, ``nu`` in place and writes ``N``; the second is a
tiled matmul over the full matrix whose epilogue reads ``p`` and writes ``u`` or ``p + u`` (in place
of ``p`` with `apply`). The full-size back-projection and update are never written to memory apart
from the result. Leading batch dims (stacked layers) are mapped with `jax.vmap`.

GPU variant: each program owns an output tile and loops over the contraction in masked chunks.
TPU variant: the contraction is the last (sequential) grid axis, accumulated in a VMEM scratch;
padded entries of a partial last chunk are zeroed before the product.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.kernels import _common, _dispatch
from cljax.kernels._common import pl, pltpu

_F32 = jnp.float32
_SCALARS = ("learning_rate", "b1", "b2", "eps", "eps_root", "bc1", "bc2", "scale", "weight_decay")
Side = Literal["left", "right"]


def _shapes(fn: str, grad, projector, mu, nu, param, side: str) -> tuple[int, int, int]:
    _checks.check_choice(fn, "side", side, ("left", "right"))
    gshape = tuple(jnp.shape(grad))
    if len(gshape) < 2:
        raise ValueError(f"{fn}: `grad` has shape {gshape}; it must be a matrix (..., m, n).")
    *batch, m, n = gshape
    batch = tuple(batch)
    pshape = tuple(jnp.shape(projector))
    if (
        len(pshape) != len(gshape)
        or pshape[:-2] != batch
        or pshape[-2] != (m if side == "left" else n)
    ):
        want = "(..., m, r)" if side == "left" else "(..., n, r)"
        raise ValueError(
            f"{fn}: `projector` has shape {pshape} but `grad` has shape {gshape}; side={side!r} "
            f"needs {want} with the same batch dims."
        )
    r = pshape[-1]
    low = (*batch, r, n) if side == "left" else (*batch, m, r)
    for name, x in (("mu", mu), ("nu", nu)):
        if tuple(jnp.shape(x)) != low:
            raise ValueError(
                f"{fn}: `{name}` has shape {jnp.shape(x)}; side={side!r} with `grad` {gshape} and "
                f"rank {r} needs {low}."
            )
    if param is not None and tuple(jnp.shape(param)) != gshape:
        raise ValueError(
            f"{fn}: `param` has shape {jnp.shape(param)} but `grad` has shape {gshape}."
        )
    return m, n, r


def _check_epilogue(fn: str, param, weight_decay, apply: bool) -> None:
    if param is None and apply:
        raise ValueError(f"{fn}(apply=True) needs `param`.")
    if param is None and _checks._as_float(weight_decay) != 0.0:
        raise ValueError(f"{fn}(weight_decay=...) needs `param`; pass the parameters or 0.")


def _scalar_values(count, hyper: dict) -> dict:
    t = optax.safe_increment(jnp.asarray(count, jnp.int32)).astype(_F32)
    out = {k: jnp.asarray(v, _F32) for k, v in hyper.items()}
    out["bc1"] = 1.0 - out["b1"] ** t
    out["bc2"] = 1.0 - out["b2"] ** t
    return out


def _adam(low, mu, nu, s):
    mu1 = s["b1"] * mu + (1.0 - s["b1"]) * low
    nu1 = s["b2"] * nu + (1.0 - s["b2"]) * (low * low)
    direction = (mu1 / s["bc1"]) / (jnp.sqrt(nu1 / s["bc2"] + s["eps_root"]) + s["eps"])
    return direction, mu1, nu1


def _update(back, p, s, apply: bool):
    u = s["scale"] * back
    if p is not None:
        u = u + s["weight_decay"] * p
    u = -s["learning_rate"] * u
    return p + u if apply else u


def reference(
    grad: jax.Array,
    projector: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    count: Any,
    *,
    side: Side,
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    scale: Any = 1.0,
    weight_decay: Any = 0.0,
    param: jax.Array | None = None,
    apply: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step in `jnp` (float32 products): the kernels' specification and the XLA path."""
    fn = "galore_adam_step"
    _shapes(fn, grad, projector, mu, nu, param, side)
    _check_epilogue(fn, param, weight_decay, apply)
    s = _scalar_values(count, _hyper(learning_rate, b1, b2, eps, eps_root, scale, weight_decay))
    g, basis = grad.astype(_F32), projector.astype(_F32)
    if side == "left":
        low = jnp.einsum("...mr,...mn->...rn", basis, g)
    else:
        low = jnp.einsum("...mn,...nr->...mr", g, basis)
    direction, mu1, nu1 = _adam(low, mu.astype(_F32), nu.astype(_F32), s)
    if side == "left":
        back = jnp.einsum("...mr,...rn->...mn", basis, direction)
    else:
        back = jnp.einsum("...mr,...nr->...mn", direction, basis)
    p = None if param is None else param.astype(_F32)
    out = _update(back, p, s, apply)
    out_dtype = param.dtype if apply else grad.dtype
    return out.astype(out_dtype), mu1.astype(mu.dtype), nu1.astype(nu.dtype)


def _hyper(learning_rate, b1, b2, eps, eps_root, scale, weight_decay) -> dict:
    return dict(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        scale=scale,
        weight_decay=weight_decay,
    )


# ---------------------------------------------------------------------------------------------
# Tiled products. A product contracts dim `lc` of `a` with dim `rc` of `b` (each 0 or 1) into an
# (I, J) output; `a` holds I along its other dim, `b` holds J.


class _Product:
    """Static layout of one tiled product ``out[i, j] = sum_k a[.., ..] b[.., ..]``."""

    def __init__(self, lc: int, rc: int, size_i: int, size_j: int, size_k: int, block):
        self.lc, self.rc = lc, rc
        self.size = (size_i, size_j, size_k)
        self.block = block  # (bi, bj, bk)

    def tile_shape(self, which: str) -> tuple[int, int]:
        bi, bj, bk = self.block
        if which == "a":
            return (bk, bi) if self.lc == 0 else (bi, bk)
        return (bk, bj) if self.rc == 0 else (bj, bk)

    def contract(self, a, b):
        return jax.lax.dot_general(
            a, b, (((self.lc,), (self.rc,)), ((), ())), preferred_element_type=_F32
        )


def _gpu_tile(ref, which: str, prod: _Product, k0, other0):
    """Loads one masked chunk of the contraction from a ref holding all of K (GPU)."""
    bi, bj, bk = prod.block
    size_i, size_j, size_k = prod.size
    contract = prod.lc if which == "a" else prod.rc
    bound = size_i if which == "a" else size_j
    shape = prod.tile_shape(which)
    kdim = 0 if contract == 0 else 1
    ks = k0 + jax.lax.broadcasted_iota(jnp.int32, shape, kdim)
    others = other0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - kdim)
    valid = (ks < size_k) & (others < bound)
    view = ref.at[pl.ds(k0, bk), :] if kdim == 0 else ref.at[:, pl.ds(k0, bk)]
    return _common.plgpu.load(view, mask=valid, other=0).astype(_F32)


def _gpu_product(a_ref, b_ref, prod: _Product):
    bi, bj, bk = prod.block
    i0, j0 = pl.program_id(0) * bi, pl.program_id(1) * bj
    steps = pl.cdiv(prod.size[2], bk)

    def body(step, acc):
        k0 = pl.multiple_of(step * bk, bk)
        a = _gpu_tile(a_ref, "a", prod, k0, i0)
        b = _gpu_tile(b_ref, "b", prod, k0, j0)
        return acc + prod.contract(a, b)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bi, bj), _F32))
    valid = _common.edge_mask((bi, bj), prod.size[:2], (i0, j0))
    return acc, valid


def _tpu_product_step(a_ref, b_ref, acc_ref, prod: _Product):
    """Adds one contraction chunk into the VMEM accumulator (TPU); zeroes padded K entries."""
    k = pl.program_id(2)
    bk = prod.block[2]

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    a, b = a_ref[...].astype(_F32), b_ref[...].astype(_F32)
    if prod.size[2] % bk:
        ka = k * bk + jax.lax.broadcasted_iota(jnp.int32, a.shape, prod.lc)
        kb = k * bk + jax.lax.broadcasted_iota(jnp.int32, b.shape, prod.rc)
        a = jnp.where(ka < prod.size[2], a, 0.0)
        b = jnp.where(kb < prod.size[2], b, 0.0)
    acc_ref[...] += prod.contract(a, b)
    return k == pl.num_programs(2) - 1


def _down_kernel(
    s_ref, a_ref, b_ref, mu_ref, nu_ref, d_out, mu_out, nu_out, *scratch, prod, target
):
    s = {name: s_ref[i] for i, name in enumerate(_SCALARS)}
    if target == "gpu":
        low, valid = _gpu_product(a_ref, b_ref, prod)
        mu = _common.load(mu_ref, "gpu", valid).astype(_F32)
        nu = _common.load(nu_ref, "gpu", valid).astype(_F32)
        direction, mu1, nu1 = _adam(low, mu, nu, s)
        _common.store(d_out, direction, "gpu", valid)
        _common.store(mu_out, mu1, "gpu", valid)
        _common.store(nu_out, nu1, "gpu", valid)
        return
    (acc_ref,) = scratch
    last = _tpu_product_step(a_ref, b_ref, acc_ref, prod)

    @pl.when(last)
    def _():
        direction, mu1, nu1 = _adam(
            acc_ref[...], mu_ref[...].astype(_F32), nu_ref[...].astype(_F32), s
        )
        d_out[...] = direction
        mu_out[...] = mu1.astype(mu_out.dtype)
        nu_out[...] = nu1.astype(nu_out.dtype)


def _up_kernel(s_ref, a_ref, b_ref, *refs, prod, target, has_param, apply):
    s = {name: s_ref[i] for i, name in enumerate(_SCALARS)}
    if has_param:
        p_ref, o_ref, *scratch = refs
    else:
        (o_ref, *scratch), p_ref = refs, None
    if target == "gpu":
        back, valid = _gpu_product(a_ref, b_ref, prod)
        p = None if p_ref is None else _common.load(p_ref, "gpu", valid).astype(_F32)
        _common.store(o_ref, _update(back, p, s, apply), "gpu", valid)
        return
    (acc_ref,) = scratch
    last = _tpu_product_step(a_ref, b_ref, acc_ref, prod)

    @pl.when(last)
    def _():
        p = None if p_ref is None else p_ref[...].astype(_F32)
        o_ref[...] = _update(acc_ref[...], p, s, apply).astype(o_ref.dtype)


def _specs(prod: _Product, target: str):
    """BlockSpecs of `a`, `b` and of the (I, J) output tiles, and the grid."""
    bi, bj, bk = prod.block
    size_i, size_j, size_k = prod.size
    if target == "gpu":  # every program holds all of K and loops over it
        a_block = (size_k, bi) if prod.lc == 0 else (bi, size_k)
        b_block = (size_k, bj) if prod.rc == 0 else (bj, size_k)
        a_map = (lambda i, j: (0, i)) if prod.lc == 0 else (lambda i, j: (i, 0))
        b_map = (lambda i, j: (0, j)) if prod.rc == 0 else (lambda i, j: (j, 0))
        out = pl.BlockSpec((bi, bj), lambda i, j: (i, j))
        grid = (pl.cdiv(size_i, bi), pl.cdiv(size_j, bj))
    else:
        a_block = prod.tile_shape("a")
        b_block = prod.tile_shape("b")
        a_map = (lambda i, j, k: (k, i)) if prod.lc == 0 else (lambda i, j, k: (i, k))
        b_map = (lambda i, j, k: (k, j)) if prod.rc == 0 else (lambda i, j, k: (j, k))
        out = pl.BlockSpec((bi, bj), lambda i, j, k: (i, j))
        grid = (pl.cdiv(size_i, bi), pl.cdiv(size_j, bj), pl.cdiv(size_k, bk))
    return pl.BlockSpec(a_block, a_map), pl.BlockSpec(b_block, b_map), out, grid


def _block(fn: str, target: str, size_i: int, size_j: int, size_k: int, block):
    """Checks a user (bi, bj, bk) block or picks one."""
    if block is None:
        if target == "gpu":
            pick = lambda size, cap: max(16, min(_common.next_pow2(size), cap))
            return pick(size_i, 64), pick(size_j, 64), pick(size_k, 32)
        pick = lambda size, cap: size if size <= cap else cap
        return pick(size_i, 256), pick(size_j, 512), pick(size_k, 512)
    if (
        not isinstance(block, tuple)
        or len(block) != 3
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)
    ):
        raise ValueError(
            f"{fn}(block=...) must be three positive ints (bi, bj, bk), got {block!r}."
        )
    if target == "gpu" and not all(_common.is_pow2(b) and b >= 16 for b in block):
        raise ValueError(
            f"{fn}(block=...) must be powers of two >= 16 for target='gpu' (Triton dots), got {block}."
        )
    if target == "tpu":
        for b, size in zip(block, (size_i, size_j, size_k), strict=True):
            if b != size and b % 128:
                raise ValueError(
                    f"{fn}(block=...) must be multiples of 128 or whole dims for target='tpu' "
                    f"(Mosaic), got {block} for products of sizes {(size_i, size_j, size_k)}."
                )
    return block


def _call(kernel, prod, target, operands, specs_extra, out_shape, aliases, interpret):
    a_spec, b_spec, out_spec, grid = _specs(prod, target)
    scratch = [] if target == "gpu" else [pltpu.VMEM(prod.block[:2], _F32)]
    semantics = None if target == "gpu" else ("parallel", "parallel", "arbitrary")
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[specs_extra[0], a_spec, b_spec] + [out_spec] * (len(operands) - 3),
        out_specs=[out_spec] * len(out_shape),
        out_shape=out_shape,
        scratch_shapes=scratch,
        input_output_aliases=aliases,
        compiler_params=_common.compiler_params(target, semantics),
        interpret=interpret,
    )(*operands)


def _pallas_matrix(g, basis, mu, nu, p, svec, sspec, *, side, apply, target, blocks, interpret):
    """One matrix: the down kernel then the up kernel."""
    m, n = g.shape
    r = basis.shape[-1]
    if side == "left":  # R = Pᵀ G (r, n); back = P N
        down = _Product(0, 0, r, n, m, blocks[0])
        up = _Product(1, 0, m, n, r, blocks[1])
        down_ops, low_shape = (basis, g), (r, n)
    else:  # R = G Q (m, r); back = N Qᵀ
        down = _Product(1, 0, m, r, n, blocks[0])
        up = _Product(1, 1, m, n, r, blocks[1])
        down_ops, low_shape = (g, basis), (m, r)
    direction, mu1, nu1 = _call(
        functools.partial(_down_kernel, prod=down, target=target),
        down,
        target,
        [svec, *down_ops, mu, nu],
        [sspec],
        [
            jax.ShapeDtypeStruct(low_shape, _F32),
            jax.ShapeDtypeStruct(low_shape, mu.dtype),
            jax.ShapeDtypeStruct(low_shape, nu.dtype),
        ],
        {3: 1, 4: 2},
        interpret,
    )
    up_ops = (basis, direction) if side == "left" else (direction, basis)
    operands = [svec, *up_ops] + ([] if p is None else [p])
    out_dtype = p.dtype if apply else g.dtype
    (out,) = _call(
        functools.partial(_up_kernel, prod=up, target=target, has_param=p is not None, apply=apply),
        up,
        target,
        operands,
        [sspec],
        [jax.ShapeDtypeStruct((m, n), out_dtype)],
        {3: 0} if apply else {},
        interpret,
    )
    return out, mu1, nu1


def pallas(
    grad: jax.Array,
    projector: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    count: Any,
    *,
    side: Side,
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    scale: Any = 1.0,
    weight_decay: Any = 0.0,
    param: jax.Array | None = None,
    apply: bool = False,
    target: Literal["gpu", "tpu"] | None = None,
    blocks: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`reference` as two Pallas kernels (see the module docstring).

    Tested in interpret mode against the reference, and lowered to Triton IR (GPU) and Mosaic
    (TPU) in the tests; not yet compiled or run on a GPU or TPU. On the GPU the float32 products
    use Triton's default precision (TF32 on recent GPUs, as XLA's default precision).

    Args:
        grad, projector, mu, nu, count, side, learning_rate, b1, b2, eps, eps_root, scale,
            weight_decay, param, apply: As in `galore_adam_step`.
        target: ``'gpu'`` or ``'tpu'`` variant; default from the back end.
        blocks: ``((bi, bj, bk), (bi, bj, bk))`` output-tile and contraction blocks of the down
            and up products (GPU: powers of two >= 16; TPU: multiples of 128 or whole dims).
        interpret: Interpret mode (default: on the CPU only).

    Returns:
        ``(out, mu', nu')`` as `reference`.
    """
    fn = "galore_adam_step"
    m, n, r = _shapes(fn, grad, projector, mu, nu, param, side)
    _check_epilogue(fn, param, weight_decay, apply)
    target = _common.resolve_target(fn, target)
    kwargs = dict(
        side=side,
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        scale=scale,
        weight_decay=weight_decay,
        param=param,
        apply=apply,
    )
    if grad.size == 0 or r == 0:
        return reference(grad, projector, mu, nu, count, **kwargs)
    if side == "left":
        sizes = ((r, n, m), (m, n, r))
    else:
        sizes = ((m, r, n), (m, n, r))
    if blocks is None:
        blocks = (None, None)
    if not isinstance(blocks, tuple) or len(blocks) != 2:
        raise ValueError(f"{fn}(blocks=...) must be a pair of (bi, bj, bk) blocks, got {blocks!r}.")
    blocks = tuple(_block(fn, target, *size, b) for size, b in zip(sizes, blocks, strict=True))
    s = _scalar_values(count, _hyper(learning_rate, b1, b2, eps, eps_root, scale, weight_decay))
    svec, sspec = _common.scalar_operand([s[k] for k in _SCALARS], target)
    run = functools.partial(
        _pallas_matrix,
        side=side,
        apply=apply,
        target=target,
        blocks=blocks,
        interpret=_common.resolve_interpret(interpret),
    )
    batch = grad.shape[:-2]
    if not batch:
        return run(grad, projector.astype(_F32), mu, nu, param, svec, sspec)
    flat = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])
    if param is None:
        mapped = jax.vmap(lambda g, b, mu_, nu_: run(g, b, mu_, nu_, None, svec, sspec))
        out, mu1, nu1 = mapped(flat(grad), flat(projector.astype(_F32)), flat(mu), flat(nu))
    else:
        mapped = jax.vmap(lambda g, b, mu_, nu_, p: run(g, b, mu_, nu_, p, svec, sspec))
        out, mu1, nu1 = mapped(
            flat(grad), flat(projector.astype(_F32)), flat(mu), flat(nu), flat(param)
        )
    return out.reshape(grad.shape), mu1.reshape(mu.shape), nu1.reshape(nu.shape)


def galore_adam_step(
    grad: jax.Array,
    projector: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    count: Any,
    *,
    side: Side,
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    scale: Any = 1.0,
    weight_decay: Any = 0.0,
    param: jax.Array | None = None,
    apply: bool = False,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One GaLore Adam step on a matrix with a fixed basis; returns ``(out, mu', nu')``.

    Projects ``G`` onto the basis (``R = Pᵀ G``, left, or ``R = G Q``, right), runs Adam on ``R``
    with the low-rank moments, projects the direction back and applies
    ``u = -lr · (scale · back + wd · p)``: ``out`` is ``u``, or ``p + u`` with `apply`. The same
    as one step of ``chain(cljax.scale_by_low_rank_projection(optax.scale_by_adam(...),
    side=..., scale=...), optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))``
    between basis refreshes (the refresh itself, an SVD, stays outside). Formulas are in the
    module docstring. Products accumulate in float32.

    Args:
        grad: Gradient ``G``, ``(..., m, n)``; leading dims are stacked matrices.
        projector: The basis, ``(..., m, r)`` (left) or ``(..., n, r)`` (right), float32.
        mu: Low-rank first moment, ``(..., r, n)`` (left) or ``(..., m, r)`` (right).
        nu: Low-rank second moment, same shape.
        count: Adam's int32 step count before this step.
        side: ``'left'`` or ``'right'``. Static.
        learning_rate: ``lr``.
        b1, b2, eps, eps_root: As in `optax.scale_by_adam`.
        scale: GaLore's ``alpha`` on the back-projected direction.
        weight_decay: Decoupled decay ``wd``; needs `param` unless 0.
        param: Parameters ``p`` (``(..., m, n)``), for the decay and `apply`.
        apply: Return ``p + u`` (written in place of `param` when it is donated). Static.
        impl: ``'auto'`` (Pallas only where `cljax.kernels` has a measured win for this back
            end and shape, else XLA), ``'xla'`` or ``'pallas'`` (on the CPU: interpret mode).
            Static.

    Returns:
        ``(out, mu', nu')``: ``out`` in `grad`'s dtype (`param`'s with `apply`), the moments in
        their own dtypes.

    Example:
        >>> basis = jnp.eye(4, 2)
        >>> z = jnp.zeros((2, 3))
        >>> u, mu, nu = cljax.kernels.galore_adam_step(jnp.ones((4, 3)), basis, z, z, 0,
        ...                                            side="left", learning_rate=0.1)
        >>> u.shape, mu.shape
        ((4, 3), (2, 3))

    References:
        Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
        ICML 2024. https://arxiv.org/abs/2403.03507
    """
    fn = "galore_adam_step"
    m, n, r = _shapes(fn, grad, projector, mu, nu, param, side)
    _check_epilogue(fn, param, weight_decay, apply)
    kwargs = dict(
        side=side,
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        scale=scale,
        weight_decay=weight_decay,
        param=param,
        apply=apply,
    )
    chosen = _dispatch.resolve(fn, impl, "galore_adam_step", (m, n, r), str(jnp.result_type(grad)))
    if chosen == "pallas":
        return pallas(grad, projector, mu, nu, count, **kwargs)
    return reference(grad, projector, mu, nu, count, **kwargs)
