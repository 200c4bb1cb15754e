"""AdaLoRA (LR-11): SVD-form adapters whose singular values are pruned to a global budget.

Adapters are `LoraWeight` nodes with gates (``lora_init(..., init='svd_form')``): ``ΔW = s · P
diag(λ) Q`` with ``P = a`` (``m x r``), ``λ = gate`` and ``Q = b`` (``r x n``).
`mask_adalora_budget` wraps the optimizer: it tracks smoothed sensitivities and uncertainties of
every entry and, on masking steps, keeps the ``b(t)`` triplets with the largest scores over *all*
adapters and zeroes the other ``λ``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.transforms.low_rank.lora import LoraWeight, _is_lora

__all__ = [
    "MaskAdaloraBudgetState",
    "adalora_budget_schedule",
    "adalora_orthogonality",
    "mask_adalora_budget",
]

_MASKED = optax.MaskedNode()


class MaskAdaloraBudgetState(NamedTuple):
    """State of `mask_adalora_budget`."""

    count: chex.Array  # int32 steps taken
    sensitivity: (
        optax.Params
    )  # smoothed |w · g| per adapter entry (a, b, gate); MaskedNode elsewhere
    uncertainty: optax.Params  # smoothed |I − Ī| per adapter entry
    inner: optax.OptState


def adalora_budget_schedule(
    step: jax.typing.ArrayLike,
    *,
    initial: int,
    target: int,
    total_steps: int,
    warmup_steps: int,
    final_steps: int,
    every: int,
) -> tuple[jax.Array, jax.Array]:
    """AdaLoRA's cubic budget: returns ``(budget, mask_now)`` for a 1-based `step`.

    Up to `warmup_steps` the budget is `initial` and nothing is masked; after
    ``total_steps − final_steps`` it is `target` and every step masks; in between it is
    ``⌊(initial − target) (1 − progress)³ + target⌋`` with
    ``progress = (step − warmup) / (total − final − warmup)``, and masking happens every `every`
    steps.

    Example:
        >>> b, now = cljax.adalora_budget_schedule(10, initial=24, target=8, total_steps=100,
        ...                                        warmup_steps=10, final_steps=20, every=5)
        >>> int(b), bool(now)
        (24, False)
    """
    fn = "adalora_budget_schedule"
    for name, value in (("initial", initial), ("total_steps", total_steps), ("every", every)):
        _checks.check_int(fn, name, value, 1)
    _checks.check_int(fn, "target", target, 0)
    _checks.check_int(fn, "warmup_steps", warmup_steps, 0)
    _checks.check_int(fn, "final_steps", final_steps, 0)
    if target > initial:
        raise ValueError(f"{fn}(target=...) must be <= initial ({initial}), got {target}.")
    if warmup_steps + final_steps >= total_steps:
        raise ValueError(
            f"{fn}: warmup_steps + final_steps ({warmup_steps} + {final_steps}) must be below total_steps ({total_steps})."
        )
    step = jnp.asarray(step, jnp.int32)
    span = total_steps - final_steps - warmup_steps
    progress = (step - warmup_steps).astype(jnp.float32) / span
    cubic = jnp.floor((initial - target) * (1.0 - progress) ** 3 + target).astype(jnp.int32)
    in_final = step > total_steps - final_steps
    in_warmup = step <= warmup_steps
    budget = jnp.where(in_warmup, initial, jnp.where(in_final, target, cubic))
    mask_now = jnp.where(in_warmup, False, jnp.where(in_final, True, step % every == 0))
    return budget.astype(jnp.int32), mask_now


def adalora_orthogonality(lora_params: Any) -> jax.Array:
    """``Σ (‖aᵀa − I‖_F² + ‖b bᵀ − I‖_F²)`` over adapters (and stacked matrices): ``Pᵀ P``, ``Q Qᵀ``.

    Multiply by the regularisation weight ``γ`` and add it to the loss. Zero for orthonormal
    factors.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.zeros((4, 3))}, rank=2, init="svd_form")
        >>> penalty = cljax.adalora_orthogonality(lora)
    """
    total = jnp.zeros([], jnp.float32)
    for x in jax.tree.leaves(lora_params, is_leaf=_is_lora):
        if not _is_lora(x):
            continue
        a = x.a.astype(jnp.float32)
        b = x.b.astype(jnp.float32)
        eye = jnp.eye(a.shape[-1], dtype=jnp.float32).reshape(
            (1,) * (a.ndim - 2) + (a.shape[-1],) * 2
        )
        pa = jnp.einsum("...mi,...mj->...ij", a, a) - eye
        qb = jnp.einsum("...in,...jn->...ij", b, b) - eye
        total = total + jnp.sum(pa * pa) + jnp.sum(qb * qb)
    return total


def _adapter_fields(x: LoraWeight):
    return {"a": x.a, "b": x.b, "gate": x.gate}


def mask_adalora_budget(
    inner: optax.GradientTransformation,
    *,
    target_rank: int,
    total_steps: int,
    warmup_steps: int,
    final_steps: int,
    every: int,
    initial_rank: int | None = None,
    beta1: chex.Numeric = 0.85,
    beta2: chex.Numeric = 0.85,
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` and prunes adapter singular values to AdaLoRA's global budget.

    For every entry ``w`` of the adapters' ``a``, ``b`` and ``gate`` (in `params`), with gradient
    ``g``: ``I = |w g|``, ``Ī ← β₁ Ī + (1 − β₁) I``, ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|``,
    ``s = Ī Ū``. Triplet ``i`` scores ``s(λᵢ) + mean_j s(a[j, i]) + mean_j s(b[i, j])``. On
    masking steps (`adalora_budget_schedule`, with ``initial = initial_rank · #matrices`` and
    ``target = target_rank · #matrices``) the top ``b(t)`` triplets over all adapters are kept
    (ties by position) and the others' gates are set to zero by their update (``u = −λ``); masked
    gates keep receiving gradients and are re-zeroed at every masking step. Place it around the
    whole optimizer (its updates are added to the parameters).

    Args:
        inner: The optimizer (e.g. ``optax.adamw(...)``), run on every leaf.
        target_rank: Average rank per adapter matrix at the end. Static.
        total_steps, warmup_steps, final_steps, every: Schedule (``T``, ``t_i``, ``t_f``,
            ``ΔT``). Static.
        initial_rank: Rank per matrix at the start (default: the adapters' rank). Static.
        beta1, beta2: Smoothing of sensitivity and uncertainty (0.85 in PEFT, by recollection).

    Returns:
        A transform whose state is `MaskAdaloraBudgetState`; it needs `params`.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.zeros((4, 3))}, rank=2, init="svd_form")
        >>> tx = cljax.mask_adalora_budget(optax.adam(1e-2), target_rank=1, total_steps=10,
        ...                                warmup_steps=2, final_steps=2, every=2)
        >>> state = tx.init(lora)

    References:
        Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023.
        https://arxiv.org/abs/2303.10512
    """
    fn = "mask_adalora_budget"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "target_rank", target_rank, 0)
    if initial_rank is not None:
        _checks.check_int(fn, "initial_rank", initial_rank, 1)
    _checks.check_in_range(fn, "beta1", beta1, 0.0, 1.0)
    _checks.check_in_range(fn, "beta2", beta2, 0.0, 1.0)
    # Validates the schedule's numbers once, with placeholder budgets.
    adalora_budget_schedule(
        1,
        initial=1,
        target=1,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        final_steps=final_steps,
        every=every,
    )
    inner = optax.with_extra_args_support(inner)

    def zeros_tree(params):
        def leaf(x):
            if not _is_lora(x) or x.gate is None:
                return _MASKED
            return dataclasses.replace(
                x,
                base=_MASKED,
                a=jnp.zeros(jnp.shape(x.a), jnp.float32),
                b=jnp.zeros(jnp.shape(x.b), jnp.float32),
                gate=jnp.zeros(jnp.shape(x.gate), jnp.float32),
            )

        return jax.tree.map(leaf, params, is_leaf=_is_lora)

    def init_fn(params):
        zeros = zeros_tree(params)
        return MaskAdaloraBudgetState(
            count=jnp.zeros([], jnp.int32),
            sensitivity=zeros,
            uncertainty=zeros,
            inner=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.require_params(fn, params)
        out, inner_state = inner.update(updates, state.inner, params, **extra_args)
        p_nodes, treedef = jax.tree.flatten(params, is_leaf=_is_lora)
        g_nodes = treedef.flatten_up_to(updates)
        u_nodes = treedef.flatten_up_to(out)
        sens_nodes = treedef.flatten_up_to(state.sensitivity)
        unc_nodes = treedef.flatten_up_to(state.uncertainty)
        new_sens, new_unc, scores, sizes = [], [], [], []
        for p, g, s_old, u_old in zip(p_nodes, g_nodes, sens_nodes, unc_nodes, strict=True):
            if not _is_lora(p) or p.gate is None:
                new_sens.append(s_old)
                new_unc.append(u_old)
                continue
            s_fields, u_fields, score = {}, {}, {}
            for name, w in _adapter_fields(p).items():
                importance = jnp.abs(w.astype(jnp.float32) * getattr(g, name).astype(jnp.float32))
                sens = beta1 * getattr(s_old, name) + (1.0 - beta1) * importance
                unc = beta2 * getattr(u_old, name) + (1.0 - beta2) * jnp.abs(importance - sens)
                s_fields[name], u_fields[name] = sens, unc
                score[name] = sens * unc
            triplet = score["gate"] + jnp.mean(score["a"], axis=-2) + jnp.mean(score["b"], axis=-1)
            scores.append(triplet.reshape(-1))
            sizes.append(triplet.shape)
            new_sens.append(dataclasses.replace(s_old, **s_fields))
            new_unc.append(dataclasses.replace(u_old, **u_fields))
        if scores:
            flat = jnp.concatenate(scores)
            n_matrices = sum(math.prod(s[:-1]) for s in sizes)
            initial = flat.shape[0] if initial_rank is None else initial_rank * n_matrices
            target = min(target_rank * n_matrices, initial)
            budget, mask_now = adalora_budget_schedule(
                state.count + 1,
                initial=initial,
                target=target,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                final_steps=final_steps,
                every=every,
            )
            order = jnp.argsort(-flat, stable=True)
            rank_of = (
                jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0], dtype=order.dtype))
            )
            prune = jnp.logical_and(mask_now, rank_of >= budget)
            pieces, offset = [], 0
            for size in sizes:
                pieces.append(prune[offset : offset + math.prod(size)].reshape(size))
                offset += math.prod(size)
            prune_iter = iter(pieces)
            new_out = []
            for p, u in zip(p_nodes, u_nodes, strict=True):
                if not _is_lora(p) or p.gate is None:
                    new_out.append(u)
                    continue
                cut = next(prune_iter)
                gate_update = jnp.where(cut, -p.gate, u.gate).astype(u.gate.dtype)
                new_out.append(dataclasses.replace(u, gate=gate_update))
            out = treedef.unflatten(new_out)
        return out, MaskAdaloraBudgetState(
            count=optax.safe_increment(state.count),
            sensitivity=treedef.unflatten(new_sens),
            uncertainty=treedef.unflatten(new_unc),
            inner=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
