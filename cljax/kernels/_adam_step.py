"""Fused element-wise optimizer step: Adam moments, cautious mask, (cautious) weight decay and an
element-wise mask in one pass over memory, with an in-place apply variant.

Per element, with the step count ``count`` before the step (``t = count + 1``), float32 math:

    mu'  = b1 mu + (1 - b1) g
    nu'  = b2 nu + (1 - b2) g²
    d    = (mu' / (1 - b1^t)) / (sqrt(nu' / (1 - b2^t) + eps_root) + eps)          (Adam)
    d    = d · 1[mu' g > 0] · c                     if `cautious` (C-AdamW; c from the leaf's mask)
    d    = d + wd · 1[mu' p >= 0 or d = 0] · p      if `cautious_weight_decay` (CWD)
         = d + wd · p                               otherwise (AdamW)
    u    = -lr · d · mask                           (mask: optional, element-wise)
    out  = p + u if `apply` else u

The cautious mask tests Adam's first moment ``mu'``, which has the direction's sign (its
denominator is positive); ``c`` is the normalisation of `cljax.cautious` over the whole leaf, a
reduction computed before the element-wise pass. Returns ``(out, mu', nu')``; the moments are
written in place of ``mu`` and ``nu`` (and ``out`` in place of ``p`` when `apply`) through
``input_output_aliases``, so a jitted step that donates them moves each byte once.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.kernels import _common, _dispatch
from cljax.kernels._common import pl

Normalization = Literal["mean_clamp", "mean_eps", "numel_sum", "none"]
_NORMALIZATIONS = ("mean_clamp", "mean_eps", "numel_sum", "none")
_F32 = jnp.float32
# Order of the float scalars handed to the kernel.
_SCALARS = ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay", "bc1", "bc2", "caution")


def _check(fn: str, grad, param, mu, nu, mask, cautious) -> None:
    shape = jnp.shape(grad)
    for name, x in (("param", param), ("mu", mu), ("nu", nu), ("mask", mask)):
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(
                f"{fn}: `{name}` has shape {jnp.shape(x)} but `grad` has shape {shape}; every "
                "operand is one leaf of the same shape."
            )
    if cautious is not None:
        _checks.check_choice(fn, "cautious", cautious, (None, *_NORMALIZATIONS))


def _bias_corrections(count: Any, b1: Any, b2: Any) -> tuple[jax.Array, jax.Array]:
    t = optax.safe_increment(jnp.asarray(count, jnp.int32)).astype(_F32)
    return 1.0 - jnp.asarray(b1, _F32) ** t, 1.0 - jnp.asarray(b2, _F32) ** t


def _agree_strict(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sign(a) * jnp.sign(b) > 0


def _caution_scale(phi: jax.Array, normalization: str, clamp: Any) -> jax.Array:
    """The factor `cljax.cautious` applies to the kept coordinates of one leaf."""
    phi = phi.astype(_F32)
    if normalization == "mean_clamp":
        return 1.0 / jnp.maximum(jnp.mean(phi), jnp.asarray(clamp, _F32))
    if normalization == "mean_eps":
        return 1.0 / (jnp.mean(phi) + jnp.asarray(clamp, _F32))
    if normalization == "numel_sum":
        return jnp.asarray(phi.size, _F32) / (jnp.sum(phi) + 1.0)
    return jnp.ones((), _F32)


def _first_moment(g: jax.Array, mu: jax.Array, b1: Any) -> jax.Array:
    return b1 * mu + (1.0 - b1) * g


def _math(g, p, mu, nu, keep, s: dict, *, cautious: bool, cwd: bool, apply: bool):
    """The per-element step on float32 values; `keep` is a boolean mask or None."""
    mu1 = _first_moment(g, mu, s["b1"])
    nu1 = s["b2"] * nu + (1.0 - s["b2"]) * (g * g)
    d = (mu1 / s["bc1"]) / (jnp.sqrt(nu1 / s["bc2"] + s["eps_root"]) + s["eps"])
    if cautious:
        phi = _agree_strict(mu1, g)
        d = jnp.where(phi, d * s["caution"], 0.0)
    if cwd:
        decayed = jnp.sign(mu1) * jnp.sign(p) >= 0
        if cautious:
            decayed = decayed | ~phi  # a masked direction is zero: a tie, decayed as in CWD
        d = d + jnp.where(decayed, s["weight_decay"] * p, 0.0)
    else:
        d = d + s["weight_decay"] * p
    u = -s["learning_rate"] * d
    if keep is not None:
        u = jnp.where(keep, u, 0.0)
    return (p + u if apply else u), mu1, nu1


def _scalars(count, hyper: dict, caution: Any) -> dict:
    bc1, bc2 = _bias_corrections(count, hyper["b1"], hyper["b2"])
    out = {k: jnp.asarray(hyper[k], _F32) for k in _SCALARS[:6]}
    out.update(bc1=bc1, bc2=bc2, caution=jnp.asarray(caution, _F32))
    return out


def _caution(grad, mu, hyper: dict, cautious: str | None, clamp: Any) -> jax.Array:
    """The cautious normalisation of the whole leaf (one reduction over ``1[mu' g > 0]``)."""
    if cautious is None:
        return jnp.ones((), _F32)
    g, m = grad.astype(_F32), mu.astype(_F32)
    phi = _agree_strict(_first_moment(g, m, jnp.asarray(hyper["b1"], _F32)), g)
    return _caution_scale(phi, cautious, clamp)


def _hyper(learning_rate, b1, b2, eps, eps_root, weight_decay) -> dict:
    return dict(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
    )


def reference(
    grad: jax.Array,
    param: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    count: Any,
    *,
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    cautious: Normalization | None = None,
    clamp: Any = 1e-3,
    cautious_weight_decay: bool = False,
    mask: jax.Array | None = None,
    apply: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step in `jnp`: the specification of the kernel and the XLA path (see the module)."""
    _check("adam_step", grad, param, mu, nu, mask, cautious)
    hyper = _hyper(learning_rate, b1, b2, eps, eps_root, weight_decay)
    s = _scalars(count, hyper, _caution(grad, mu, hyper, cautious, clamp))
    keep = None if mask is None else jnp.asarray(mask) != 0
    out, mu1, nu1 = _math(
        *(x.astype(_F32) for x in (grad, param, mu, nu)),
        keep,
        s,
        cautious=cautious is not None,
        cwd=cautious_weight_decay,
        apply=apply,
    )
    out_dtype = param.dtype if apply else grad.dtype
    return out.astype(out_dtype), mu1.astype(mu.dtype), nu1.astype(nu.dtype)


def _kernel(s_ref, *refs, target, view, block, has_mask, cautious, cwd, apply):
    if has_mask:
        g_ref, p_ref, mu_ref, nu_ref, m_ref, o_ref, mu_out, nu_out = refs
    else:
        g_ref, p_ref, mu_ref, nu_ref, o_ref, mu_out, nu_out = refs
        m_ref = None
    valid = None
    if target == "gpu":
        starts = (pl.program_id(0) * block[0], pl.program_id(1) * block[1])
        valid = _common.edge_mask(block, view, starts)
    g, p, mu, nu = (
        _common.load(r, target, valid).astype(_F32) for r in (g_ref, p_ref, mu_ref, nu_ref)
    )
    keep = None if m_ref is None else _common.load(m_ref, target, valid) != 0
    s = {name: s_ref[i] for i, name in enumerate(_SCALARS)}
    out, mu1, nu1 = _math(g, p, mu, nu, keep, s, cautious=cautious, cwd=cwd, apply=apply)
    _common.store(o_ref, out, target, valid)
    _common.store(mu_out, mu1, target, valid)
    _common.store(nu_out, nu1, target, valid)


def pallas(
    grad: jax.Array,
    param: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    count: Any,
    *,
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    cautious: Normalization | None = None,
    clamp: Any = 1e-3,
    cautious_weight_decay: bool = False,
    mask: jax.Array | None = None,
    apply: bool = False,
    target: Literal["gpu", "tpu"] | None = None,
    block: tuple[int, int] | None = None,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step as one Pallas kernel over a 2-D view of the leaf (see the module docstring).

    Tested in interpret mode against the reference, and lowered to Triton IR (GPU) and Mosaic
    (TPU) in the tests; not yet compiled or run on a GPU or TPU.

    Args:
        grad, param, mu, nu, count, learning_rate, b1, b2, eps, eps_root, weight_decay,
            cautious, clamp, cautious_weight_decay, mask, apply: As in `adam_step`.
        target: ``'gpu'`` (Triton) or ``'tpu'`` (Mosaic) variant; default from the back end.
        block: Block shape on the 2-D view (default per target).
        interpret: Run in interpret mode (default: on the CPU only), or TPU interpret params.

    Returns:
        ``(out, mu', nu')`` as `reference`.
    """
    fn = "adam_step"
    _check(fn, grad, param, mu, nu, mask, cautious)
    target = _common.resolve_target(fn, target)
    shape = tuple(jnp.shape(grad))
    if grad.size == 0:
        return reference(
            grad,
            param,
            mu,
            nu,
            count,
            learning_rate=learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            weight_decay=weight_decay,
            cautious=cautious,
            clamp=clamp,
            cautious_weight_decay=cautious_weight_decay,
            mask=mask,
            apply=apply,
        )
    view = _common.rows_view(shape)
    has_mask = mask is not None
    min_rows = 32 if has_mask or any(x.dtype.itemsize == 1 for x in (grad, param, mu, nu)) else 16
    block = _common.elementwise_block(fn, *view, target, block, min_rows=min_rows)
    hyper = _hyper(learning_rate, b1, b2, eps, eps_root, weight_decay)
    s = _scalars(count, hyper, _caution(grad, mu, hyper, cautious, clamp))
    svec, sspec = _common.scalar_operand([s[k] for k in _SCALARS], target)
    operands = [grad, param, mu, nu]
    if has_mask:
        m = jnp.asarray(mask)
        if target == "tpu" and m.dtype == jnp.bool_:
            m = m.astype(jnp.int8)  # Mosaic has no boolean memory
        operands.append(m)
    operands = [x.reshape(view) for x in operands]
    spec = pl.BlockSpec(block, lambda i, j: (i, j))
    out_dtype = param.dtype if apply else grad.dtype
    out_shape = [
        jax.ShapeDtypeStruct(view, out_dtype),
        jax.ShapeDtypeStruct(view, mu.dtype),
        jax.ShapeDtypeStruct(view, nu.dtype),
    ]
    # Operand 0 is the scalar vector: grad 1, param 2, mu 3, nu 4.
    aliases = {3: 1, 4: 2}
    if apply:
        aliases[2] = 0
    kernel = functools.partial(
        _kernel,
        target=target,
        view=view,
        block=block,
        has_mask=has_mask,
        cautious=cautious is not None,
        cwd=cautious_weight_decay,
        apply=apply,
    )
    out, mu1, nu1 = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(view[0], block[0]), pl.cdiv(view[1], block[1])),
        in_specs=[sspec] + [spec] * len(operands),
        out_specs=[spec, spec, spec],
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_common.compiler_params(target, ("parallel", "parallel")),
        interpret=_common.resolve_interpret(interpret),
    )(svec, *operands)
    return out.reshape(shape), mu1.reshape(shape), nu1.reshape(shape)


def adam_step(
    grad: jax.Array,
    param: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    count: Any,
    *,
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    cautious: Normalization | None = None,
    clamp: Any = 1e-3,
    cautious_weight_decay: bool = False,
    mask: jax.Array | None = None,
    apply: bool = False,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One fused AdamW / C-AdamW / CWD step on one leaf; returns ``(out, mu', nu')``.

    Gives the updates of ``optax.adamw`` (``cautious=None``, ``cautious_weight_decay=False``),
    of `cljax.cautious_adamw` (``cautious='mean_clamp'``) or of `cljax.cwd_adamw`
    (``cautious_weight_decay=True``), with the step count ``count`` of Adam's state before the
    step. ``out`` is the update ``u`` (``apply=False``) or the new parameter ``p + u``
    (``apply=True``, written in place of `param` when it is donated). An element-wise `mask`
    zeroes ``u`` where it is zero or False (pruned weights stay put); the moments still see the
    gradient. Formulas are in the module docstring.

    Args:
        grad: Gradient ``g`` of one leaf, any shape.
        param: Parameters ``p``, same shape.
        mu: First moment (any float dtype), same shape.
        nu: Second moment, same shape.
        count: Adam's int32 step count before this step.
        learning_rate: ``lr``, a float or a traced scalar.
        b1, b2, eps, eps_root: As in `optax.scale_by_adam`.
        weight_decay: Decoupled decay ``wd`` (effective decay ``lr · wd``).
        cautious: None, or the normalisation of `cljax.cautious` (``'mean_clamp'``, C-AdamW's
            default; ``'mean_eps'``, ``'numel_sum'`` or ``'none'``). Static.
        clamp: The clamp of the cautious normalisation.
        cautious_weight_decay: Decay only where the direction does not grow the weight (CWD).
            Static.
        mask: Optional element-wise keep-mask (bool or numbers), same shape.
        apply: Return the new parameter instead of the update. Static.
        impl: ``'auto'`` (Pallas only where `cljax.kernels` has a measured win for this back
            end and shape, else XLA), ``'xla'`` or ``'pallas'`` (on the CPU: interpret mode).
            Static.

    Returns:
        ``(out, mu', nu')``: ``out`` in `grad`'s dtype (`param`'s when `apply`), the moments in
        their own dtypes.

    Example:
        >>> z = jnp.zeros(4)
        >>> u, mu, nu = cljax.kernels.adam_step(jnp.ones(4), z, z, z, 0, learning_rate=0.1)
        >>> u
        Array([-0.1, -0.1, -0.1, -0.1], dtype=float32)

    References:
        Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
        Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", 2024.
        Chen et al., "Cautious Weight Decay", 2025.
    """
    fn = "adam_step"
    _check(fn, grad, param, mu, nu, mask, cautious)
    kwargs = dict(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
        cautious=cautious,
        clamp=clamp,
        cautious_weight_decay=cautious_weight_decay,
        mask=mask,
        apply=apply,
    )
    chosen = _dispatch.resolve(fn, impl, "adam_step", (jnp.size(grad),), str(jnp.result_type(grad)))
    if chosen == "pallas":
        return pallas(grad, param, mu, nu, count, **kwargs)
    return reference(grad, param, mu, nu, count, **kwargs)
