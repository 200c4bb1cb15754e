"""Ready-made optimizers of the cautious-decay family, each mirroring the optax alias it extends."""

from __future__ import annotations

from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.kernels import _adam_step as _kernel
from cljax.kernels import _common as _kernel_common
from cljax.kernels import _dispatch
from cljax.transforms.cautious import (
    Normalization,
    _cautious_decay_leaf,
    add_cautious_weight_decay,
    cautious,
    scale_by_adamp,
    scale_by_grams,
    scale_by_upgd,
)

__all__ = ["adamp", "cautious_adamw", "cautious_lion", "cwd_adamw", "cwd_lion", "grams", "upgd"]


def cautious_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    eps_root: chex.Numeric = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    normalization: Normalization = "mean_clamp",
    clamp: chex.Numeric = 1e-3,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> optax.GradientTransformationExtraArgs:
    """C-AdamW: AdamW whose Adam direction is masked where it disagrees with the gradient.

    ``chain(cautious(scale_by_adam(...)), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``: the decay is not masked, as in the paper.

    With ``impl='pallas'`` each leaf's whole step (moments, cautious mask, decay, learning rate)
    is one fused kernel, `cljax.kernels.adam_step`; the state is the chain's, so the two paths
    can be swapped between steps. The kernel covers ``nesterov=False`` only.

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov: As in
            `optax.adamw`.
        normalization, clamp: As in `cljax.cautious`.
        impl: ``'xla'``: the chain above. ``'pallas'``: the fused kernel on every leaf (on the
            CPU in Pallas interpret mode, for tests); a ValueError with ``nesterov=True``.
            ``'auto'`` (default): the kernel on the leaves where `cljax.kernels` holds a
            measured win for the back end, dtype and size (none yet, so the chain everywhere).
            Static.

    Raises:
        ValueError: an unknown `impl`, or ``impl='pallas'`` with ``nesterov=True``.

    Example:
        >>> opt = cljax.cautious_adamw(1e-3)
        >>> state = opt.init({"w": jnp.zeros(3)})

    References:
        Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", 2024.
    """
    chain = optax.chain(
        cautious(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
            normalization=normalization,
            clamp=clamp,
            # Adam's direction has its first moment's sign (the denominator is positive); testing
            # the moment spares XLA a pass that writes the direction to memory. Nesterov's
            # direction mixes in the gradient, so it is tested itself.
            mask_source="direction" if nesterov else "momentum",
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _dispatched(
        "cautious_adamw",
        chain,
        impl=impl,
        nesterov=nesterov,
        hyper=dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        cautious=normalization,
        clamp=clamp,
        cwd=False,
    )


def cautious_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.99,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any = None,
    *,
    normalization: Normalization = "mean_clamp",
    clamp: chex.Numeric = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """C-Lion: Lion whose sign direction is masked where it disagrees with the gradient.

    ``chain(cautious(scale_by_lion(...)), add_decayed_weights(...), scale_by_learning_rate(...))``.
    The first C-Lion used ``normalization='numel_sum'``; the default is the paper's mean clamp.

    Args:
        learning_rate, b1, b2, mu_dtype, weight_decay, mask: As in `optax.lion`.
        normalization, clamp: As in `cljax.cautious`.

    References:
        Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", 2024.
    """
    return optax.chain(
        cautious(optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype), normalization=normalization, clamp=clamp),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def cwd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    eps_root: chex.Numeric = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> optax.GradientTransformationExtraArgs:
    """AdamW with Cautious Weight Decay: decay only where it agrees with the Adam direction.

    ``chain(scale_by_adam(...), add_cautious_weight_decay(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``; with ``weight_decay=0`` it is `optax.adam`.

    With ``impl='pallas'`` each leaf's whole step (moments, cautious decay, learning rate) is one
    fused kernel, `cljax.kernels.adam_step`, on the same state. The kernel covers
    ``nesterov=False`` only.

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov: As in
            `optax.adamw`.
        impl: ``'xla'``: the chain above. ``'pallas'``: the fused kernel on every leaf (on the
            CPU in Pallas interpret mode, for tests); a ValueError with ``nesterov=True``.
            ``'auto'`` (default): the kernel on the leaves where `cljax.kernels` holds a
            measured win for the back end, dtype and size (none yet, so the chain everywhere).
            Static.

    Raises:
        ValueError: an unknown `impl`, or ``impl='pallas'`` with ``nesterov=True``.

    Example:
        >>> opt = cljax.cwd_adamw(1e-3, weight_decay=0.1)

    References:
        Chen et al., "Cautious Weight Decay", 2025. https://arxiv.org/abs/2510.12402
    """
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov)
    chain = optax.chain(
        _with_cautious_decay(adam, weight_decay, mask, sign_from_mu=not nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _dispatched(
        "cwd_adamw",
        chain,
        impl=impl,
        nesterov=nesterov,
        hyper=dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        cautious=None,
        clamp=1e-3,
        cwd=True,
    )


def _with_cautious_decay(
    adam: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule,
    mask: Any,
    *,
    sign_from_mu: bool,
) -> optax.GradientTransformationExtraArgs:
    """`adam` followed by Cautious Weight Decay, in one transform whose state is `adam`'s.

    Gives ``chain(adam, add_cautious_weight_decay(weight_decay, mask))``'s updates. With
    `sign_from_mu`, the decay's sign test reads Adam's new first moment instead of the direction
    ``mu_hat / (sqrt(nu_hat) + eps)``: the denominator is positive, so both have one sign (they
    differ only where the direction underflows to zero). Reading the moment, which the step writes
    anyway, lets XLA compute the direction once, inside the parameter-update loop, instead of
    writing it to memory for a second reader (1.9x -> 1.05x of `optax.adamw`'s step time on the
    CPU). A scheduled `weight_decay` is evaluated at Adam's step count, as
    `add_cautious_weight_decay` evaluates it at its own.
    """
    is_none = lambda x: x is None
    if not callable(weight_decay):
        add_cautious_weight_decay(weight_decay)  # validates the value

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("cwd_adamw: `update` needs `params`; pass the current parameters.")
        strength = weight_decay(state.count) if callable(weight_decay) else weight_decay
        direction, state = adam.update(updates, state, params)
        sign_source = state.mu if sign_from_mu else direction

        def decay(d, p, ref):
            return jax.tree.map(lambda *x: _cautious_decay_leaf(*x, strength), d, p, ref, is_leaf=is_none)

        if mask is None:
            return decay(direction, params, sign_source), state
        where = mask(params) if callable(mask) else mask
        out = jax.tree.map(
            lambda on, d, p, ref: decay(d, p, ref) if on else d,
            where,
            direction,
            params,
            sign_source,
            is_leaf=is_none,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(adam.init, update_fn)


def _decay_flags(mask: Any, params: Any, treedef: Any) -> list:
    """Per leaf of `treedef`: whether `mask` (a tree, prefix or function of params) decays it."""
    if mask is None:
        return [True] * treedef.num_leaves
    where = mask(params) if callable(mask) else mask
    full = jax.tree.map(
        lambda on, sub: jax.tree.map(lambda _: on, sub, is_leaf=_is_none),
        where,
        params,
        is_leaf=_is_none,
    )
    return [bool(on) for on in treedef.flatten_up_to(full)]


def _is_none(x: Any) -> bool:
    return x is None


def _dispatched(
    fn: str,
    chain: optax.GradientTransformationExtraArgs,
    *,
    impl: str,
    nesterov: bool,
    hyper: dict,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Any,
    cautious: str | None,
    clamp: chex.Numeric,
    cwd: bool,
) -> optax.GradientTransformationExtraArgs:
    """`chain`, or the same optimizer stepping each leaf with the fused `cljax.kernels.adam_step`.

    `chain`'s state is ``(adam, decay, learning rate)`` for C-AdamW (`cwd` False) and
    ``(adam, learning rate)`` for CWD; the fused update reads and writes that same state (Adam's
    moments and count, the schedule counts), so both paths give the same updates and states.
    A scheduled decay is evaluated at the decay state's count (C-AdamW, as
    `optax.add_decayed_weights`) or at Adam's (CWD, as `_with_cautious_decay`).
    """
    _kernel_common.check_impl(fn, impl)
    if impl == "xla":
        return chain
    if nesterov:
        if impl == "pallas":
            raise ValueError(
                f"{fn}(impl='pallas'): the fused Adam kernel (cljax.kernels.adam_step) does not "
                "cover nesterov=True; use impl='xla' or 'auto'."
            )
        return chain

    def pick(g: Any) -> str | None:
        if g is None:
            return None
        if impl == "pallas":
            return "pallas"
        return _dispatch.choose("adam_step", (jnp.size(g),), str(jnp.result_type(g)))

    def update_fn(updates, state, params=None, **extra_args):
        grads, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
        picks = [pick(g) for g in grads]
        if "pallas" not in picks:  # `auto` without a measured win: exactly the chain
            return chain.update(updates, state, params, **extra_args)
        _checks.require_params(fn, params)
        adam, lr_state = state[0], state[-1]
        count = adam.count
        if callable(learning_rate):
            lr = learning_rate(lr_state.count)
            lr_state = lr_state._replace(count=optax.safe_increment(lr_state.count))
        else:
            lr = learning_rate
        decay_state = None if cwd else state[1]
        if not callable(weight_decay):
            wd = weight_decay
        elif cwd:
            wd = weight_decay(count)
        else:
            inner = decay_state.inner_state if mask is not None else decay_state
            wd = weight_decay(inner.count)
            ticked = inner._replace(count=optax.safe_increment(inner.count))
            decay_state = decay_state._replace(inner_state=ticked) if mask is not None else ticked
        flags = _decay_flags(mask, params, treedef)
        outs, mus, nus = [], [], []
        for g, p, mu, nu, on, chosen in zip(
            grads,
            treedef.flatten_up_to(params),
            treedef.flatten_up_to(adam.mu),
            treedef.flatten_up_to(adam.nu),
            flags,
            picks,
            strict=True,
        ):
            if g is None:
                outs.append(None)
                mus.append(mu)
                nus.append(nu)
                continue
            u, mu, nu = _kernel.adam_step(
                g,
                p,
                mu,
                nu,
                count,
                learning_rate=lr,
                weight_decay=wd if on else 0.0,
                cautious=cautious,
                clamp=clamp,
                cautious_weight_decay=cwd,
                impl=chosen,
                **hyper,
            )
            outs.append(u)
            mus.append(mu)
            nus.append(nu)
        adam = adam._replace(
            count=optax.safe_increment(count), mu=treedef.unflatten(mus), nu=treedef.unflatten(nus)
        )
        new_state = (adam, lr_state) if cwd else (adam, decay_state, lr_state)
        return treedef.unflatten(outs), new_state

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def cwd_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.99,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Lion with Cautious Weight Decay.

    ``chain(scale_by_lion(...), add_cautious_weight_decay(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``.

    Args:
        learning_rate, b1, b2, mu_dtype, weight_decay, mask: As in `optax.lion`.

    References:
        Chen et al., "Cautious Weight Decay", 2025. https://arxiv.org/abs/2510.12402
    """
    return optax.chain(
        optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
        add_cautious_weight_decay(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def grams(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    eps_root: chex.Numeric = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Grams: Adam's magnitude, the gradient's sign, decoupled weight decay.

    ``chain(scale_by_grams(...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``. `weight_decay` defaults to 0, as in the authors'
    package.

    Args:
        learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: As in `optax.adamw`.

    References:
        Cao, Li and Song, "Grams: Gradient Descent with Adaptive Momentum Scaling", 2024.
    """
    return optax.chain(
        scale_by_grams(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamp(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    *,
    delta: chex.Numeric = 0.1,
    wd_ratio: chex.Numeric = 0.1,
    nesterov: bool = False,
    mu_dtype: Any = None,
    channel_axis: int = -1,
) -> optax.GradientTransformationExtraArgs:
    """AdamP: Adam that removes the radial component of updates to scale-invariant weights.

    ``chain(scale_by_adamp(...), scale_by_learning_rate(learning_rate))``; defaults follow the
    reference implementation (``weight_decay=0``, ``delta=0.1``, ``wd_ratio=0.1``).

    Args:
        learning_rate: Learning rate or schedule.
        b1, b2, eps, weight_decay, delta, wd_ratio, nesterov, mu_dtype, channel_axis: As in
            `cljax.scale_by_adamp`.

    References:
        Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
        Weights", ICLR 2021.
    """
    return optax.chain(
        scale_by_adamp(
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            mu_dtype=mu_dtype,
            channel_axis=channel_axis,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def upgd(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    beta_utility: chex.Numeric = 0.999,
    sigma: chex.Numeric = 1e-3,
    mask: Any = None,
    *,
    protect: bool = True,
    normalization: Literal["global", "local"] = "global",
    seed: int | Any = 0,
) -> optax.GradientTransformationExtraArgs:
    """UPGD: utility-gated, perturbed SGD with decoupled weight decay.

    ``chain(scale_by_upgd(...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, i.e.
    ``w <- (1 - lr wd) w - lr (g + xi)(1 - s)``.

    Args:
        learning_rate: Learning rate or schedule.
        weight_decay, mask: As in `optax.add_decayed_weights`.
        beta_utility, sigma, protect, normalization, seed: As in `cljax.scale_by_upgd`.

    References:
        Elsayed and Mahmood, "Addressing Loss of Plasticity and Catastrophic Forgetting in
        Continual Learning", ICLR 2024.
    """
    return optax.chain(
        scale_by_upgd(beta_utility, sigma, protect=protect, normalization=normalization, seed=seed),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
