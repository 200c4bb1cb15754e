"""LoRA re-parameterisation as pure pytree functions (LR-05, LR-07, LR-08, LR-09, LR-12).

A targeted leaf becomes a `LoraWeight` node holding the frozen base and the factors; everything
else in the tree is untouched. In the matrix view ``(m, n)`` of a leaf (a Flax kernel is
``(d_in, d_out)``) the effective weight is ``W = W₀ + s · a diag(gate) b`` with ``a`` of shape
``(m, r)`` (random init) and ``b`` of shape ``(r, n)`` (zeros): the paper's ``ΔW = B A`` on the
transposed PyTorch weight, ``a = Aᵀ``, ``b = Bᵀ``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from cljax import _checks
from cljax.transforms.low_rank import _bases
from cljax.tree import MatrixSpec, as_matrices, from_matrices, matrix_shape

__all__ = [
    "LoraWeight",
    "fedex_lora_average",
    "lora_apply",
    "lora_effective_rank",
    "lora_extract",
    "lora_gate_prox",
    "lora_init",
    "lora_labels",
    "lora_merge_and_reset",
    "lora_refactorize",
    "lora_reset_state",
]

Init = Literal["kaiming_uniform", "gaussian", "svd_form"]
_INITS = ("kaiming_uniform", "gaussian", "svd_form")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b", "gate"],
    meta_fields=["scale", "spec", "init"],
)
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A LoRA-adapted leaf: ``W = base + scale · a diag(gate) b`` in its matrix view.

    Attributes:
        base: The frozen weight ``W₀``, of the original leaf's shape.
        a: ``(*batch, m, r)`` input-side factor (random at init).
        b: ``(*batch, r, n)`` output-side factor (zeros at init).
        gate: ``(*batch, r)`` per-component gates (CoDyRA, AdaLoRA's singular values), or None.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)``, rsLoRA). Static.
        spec: The `MatrixSpec` of the matrix view. Static.
        init: How `a`, `b` and `gate` are (re-)initialised. Static.
    """

    base: Any
    a: Any
    b: Any
    gate: Any = None
    scale: float = 1.0
    spec: MatrixSpec = MatrixSpec()
    init: str = "kaiming_uniform"


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def _factors(key: jax.Array, batch_shape, m: int, n: int, r: int, init: str, dtype):
    ka, kb = jax.random.split(key)
    if init == "kaiming_uniform":  # PEFT: kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(fan_in), ...)
        bound = 1.0 / math.sqrt(m)
        a = jax.random.uniform(ka, (*batch_shape, m, r), jnp.float32, -bound, bound)
        b = jnp.zeros((*batch_shape, r, n), jnp.float32)
        gate = jnp.ones((*batch_shape, r), jnp.float32)
    elif init == "gaussian":
        a = jax.random.normal(ka, (*batch_shape, m, r), jnp.float32) / r
        b = jnp.zeros((*batch_shape, r, n), jnp.float32)
        gate = jnp.ones((*batch_shape, r), jnp.float32)
    else:  # 'svd_form' (AdaLoRA): small Gaussian singular vectors, zero singular values
        a = 0.02 * jax.random.normal(ka, (*batch_shape, m, r), jnp.float32)
        b = 0.02 * jax.random.normal(kb, (*batch_shape, r, n), jnp.float32)
        gate = jnp.zeros((*batch_shape, r), jnp.float32)
    return a.astype(dtype), b.astype(dtype), gate.astype(dtype)


def _delta_matrices(w: LoraWeight) -> jax.Array:
    """``(batch, m, n)`` float32: ``scale · a diag(gate) b`` for each matrix of the leaf."""
    a = w.a.astype(jnp.float32)
    a = a.reshape(-1, *a.shape[-2:])
    b = w.b.astype(jnp.float32)
    b = b.reshape(-1, *b.shape[-2:])
    if w.gate is not None:
        gate = w.gate.astype(jnp.float32).reshape(a.shape[0], 1, a.shape[-1])
        a = a * gate
    return w.scale * jnp.einsum("bmr,brn->bmn", a, b)


def _delta(w: LoraWeight) -> jax.Array:
    """The dense ``scale · a diag(gate) b`` in the base leaf's shape (float32)."""
    return from_matrices(_delta_matrices(w), w.spec, jnp.shape(w.base))


def _targets(fn: str, params: Any, targets: Callable | None, matrix_spec: MatrixSpec):
    if not isinstance(matrix_spec, MatrixSpec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec, got {type(matrix_spec).__name__}."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if targets is None:
        chosen = [jnp.ndim(leaf) >= 2 for _, leaf in leaves]
    else:
        if not callable(targets):
            raise TypeError(
                f"{fn}(targets=...) must be a function params -> tree of bools (e.g. "
                f"cljax.select('attn|mlp')), got {type(targets).__name__}."
            )
        try:
            chosen = treedef.flatten_up_to(targets(params))
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{fn}: `targets(params)` must return a bool per parameter leaf ({err})."
            ) from err
        for (path, leaf), sel in zip(leaves, chosen, strict=True):
            if sel and jnp.ndim(leaf) < 2:
                raise ValueError(
                    f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {jnp.shape(leaf)}; an adapted "
                    "leaf needs at least two dims. Leave vectors out of `targets`."
                )
    return leaves, treedef, [bool(c) for c in chosen]


def _layout(fn: str, params: Any, targets: Callable | None, matrix_spec: MatrixSpec):
    """``(leaves with paths, treedef, plan)``: per leaf None (not adapted) or
    ``(name, batch_shape, m, n)`` of its matrix view."""
    leaves, treedef, chosen = _targets(fn, params, targets, matrix_spec)
    plan = []
    for (path, leaf), sel in zip(leaves, chosen, strict=True):
        if not sel:
            plan.append(None)
            continue
        name = _checks.leaf_name(path)
        shape = jnp.shape(leaf)
        batch_axes, _, _ = matrix_spec.axes(len(shape), name)
        _, m, n = matrix_shape(shape, matrix_spec, name)
        plan.append((name, tuple(shape[ax] for ax in batch_axes), m, n))
    return leaves, treedef, plan


def _scale(rank: int, alpha: float | None, rslora: bool) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); 1 without `alpha`."""
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def lora_init(
    key: jax.Array,
    params: Any,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
    init: Init = "kaiming_uniform",
    rslora: bool = False,
    gates: bool = False,
) -> Any:
    """Replaces each targeted leaf by a `LoraWeight` whose delta is zero at init.

    Args:
        key: PRNG key; leaf ``i`` uses ``fold_in(key, i)``.
        params: The (pre-trained) parameters; they become the frozen bases.
        rank: Adapter rank ``r``. Static.
        alpha: Scale numerator: ``scale = alpha / r`` (``alpha / sqrt(r)`` with `rslora`);
            None gives ``scale = 1``.
        targets: Function ``params -> tree of bools`` choosing the adapted leaves (e.g.
            ``cljax.select("attn|mlp")``); default: every leaf with at least two dims.
        matrix_spec: Matrix view of the adapted leaves (batch axes get one adapter each).
        init: ``'kaiming_uniform'`` (PEFT: ``a ~ U(±1/sqrt(m))``, ``b = 0``), ``'gaussian'``
            (``a ~ N(0, 1/r²)``, ``b = 0``) or ``'svd_form'`` (AdaLoRA: ``a, b ~ N(0, 0.02²)``,
            gates 0).
        rslora: Use ``alpha / sqrt(r)``.
        gates: Add per-component gates (CoDyRA, AdaLoRA); ``'svd_form'`` always has them.

    Returns:
        The parameter tree with `LoraWeight` nodes; `lora_apply` gives back plain parameters,
        equal to `params` at init (``'svd_form'`` included: its gates are zero).

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> lora["w"].a.shape, lora["w"].b.shape
        ((4, 2), (2, 3))

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
        https://arxiv.org/abs/2106.09685
    """
    fn = "lora_init"
    _checks.check_int(fn, "rank", rank, 1)
    _checks.check_choice(fn, "init", init, _INITS)
    if alpha is not None:
        _checks.check_in_range(fn, "alpha", alpha, 0.0, math.inf, low_inclusive=False)
    leaves, treedef, plan = _layout(fn, params, targets, matrix_spec)
    scale = _scale(rank, alpha, rslora)
    with_gates = gates or init == "svd_form"
    out = []
    for i, ((_, leaf), entry) in enumerate(zip(leaves, plan, strict=True)):
        if entry is None:
            out.append(leaf)
            continue
        _, batch_shape, m, n = entry
        a, b, gate = _factors(
            jax.random.fold_in(key, i), batch_shape, m, n, rank, init, jnp.result_type(leaf)
        )
        out.append(LoraWeight(leaf, a, b, gate if with_gates else None, scale, matrix_spec, init))
    return treedef.unflatten(out)


def lora_apply(lora_params: Any) -> Any:
    """Returns plain parameters: each `LoraWeight` becomes ``base + scale · a diag(gate) b``.

    The sum is taken in float32 and cast to the base's dtype.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> bool(jnp.all(cljax.lora_apply(lora)["w"] == 1.0))
        True
    """

    def leaf(x):
        if not _is_lora(x):
            return x
        return (x.base.astype(jnp.float32) + _delta(x)).astype(jnp.result_type(x.base))

    return jax.tree.map(leaf, lora_params, is_leaf=_is_lora)


def _reinit(w: LoraWeight, key: jax.Array, base: Any) -> LoraWeight:
    batch_shape = jnp.shape(w.a)[:-2]
    m, r = jnp.shape(w.a)[-2:]
    n = jnp.shape(w.b)[-1]
    a, b, gate = _factors(key, batch_shape, m, n, r, w.init, jnp.result_type(w.a))
    return dataclasses.replace(w, base=base, a=a, b=b, gate=None if w.gate is None else gate)


def lora_merge_and_reset(
    lora_params: Any,
    key: jax.Array,
    *,
    fraction: float = 1.0,
    remainder: Literal["drop", "keep"] = "drop",
) -> Any:
    """Merges each adapter into its base and re-initialises it (ReLoRA / PeriodicLoRA stage end).

    ``W₀ ← W₀ + fraction · scale · a diag(gate) b``. With ``remainder='drop'`` (full unloading)
    `a` is drawn afresh from ``fold_in(key, i)``, ``b = 0`` and the gates reset, so with
    ``fraction=1`` the model function is unchanged (below 1 the rest is dropped). With
    ``remainder='keep'`` (partial unloading) the adapter keeps the unmerged part:
    ``b ← (1 − fraction) · b`` with `a` and the gates unchanged, so ``W₀ + scale · a diag(gate) b``
    (the model function) is unchanged for every `fraction` and `key` is unused. Reset the adapters'
    optimizer state too: `lora_reset_state`.

    Args:
        lora_params: A tree with `LoraWeight` nodes.
        key: PRNG key for the new factors.
        fraction: Part ``γ`` of the adapter merged (1 = full unloading).
        remainder: ``'drop'`` (re-initialise the adapter) or ``'keep'`` (scale it by
            ``1 − fraction``).

    Returns:
        The tree with merged bases and re-initialised (or scaled) adapters.

    Raises:
        ValueError: `fraction` outside [0, 1]; an unknown `remainder`.

    Notes:
        PeriodicLoRA's momentum-based unloading merges only part of the adapter at a stage end;
        its exact rule is not stated in the sources cljax follows, so it is not reproduced.
        ``remainder='keep'`` with ``fraction < 1`` is the clearly defined partial unloading
        ``W₀ ← W₀ + γ ΔW``, ``ΔW ← (1 − γ) ΔW``.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> lora = cljax.lora_merge_and_reset(lora, jax.random.key(1))
        >>> part = cljax.lora_merge_and_reset(lora, jax.random.key(2), fraction=0.5, remainder="keep")

    References:
        "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA Optimization", 2024.
    """
    fn = "lora_merge_and_reset"
    _checks.check_in_range(fn, "fraction", fraction, 0.0, 1.0)
    _checks.check_choice(fn, "remainder", remainder, ("drop", "keep"))
    leaves, treedef = jax.tree.flatten(lora_params, is_leaf=_is_lora)
    out = []
    for i, x in enumerate(leaves):
        if not _is_lora(x):
            out.append(x)
            continue
        merged = (x.base.astype(jnp.float32) + fraction * _delta(x)).astype(jnp.result_type(x.base))
        if remainder == "keep":
            kept = (x.b.astype(jnp.float32) * (1.0 - fraction)).astype(jnp.result_type(x.b))
            out.append(dataclasses.replace(x, base=merged, b=kept))
        else:
            out.append(_reinit(x, jax.random.fold_in(key, i), merged))
    return treedef.unflatten(out)


def _factor_paths(lora_params: Any) -> set[tuple]:
    paths = set()
    for path, x in jax.tree_util.tree_flatten_with_path(lora_params, is_leaf=_is_lora)[0]:
        if _is_lora(x):
            for field in ("a", "b", "gate"):
                if getattr(x, field) is not None:
                    paths.add((*path, jax.tree_util.GetAttrKey(field)))
    return paths


def lora_reset_state(opt_state: Any, lora_params: Any) -> Any:
    """Returns `opt_state` with the adapters' optimizer statistics zeroed and their counts restarted.

    A state leaf belongs to an adapter factor when the factor's path ends its own path (``mu/w/a``
    for the factor ``w/a``), as optax states mirror the parameters; those floating leaves become
    zeros. A state with a ``count`` field whose other leaves all belong to factors (an adapter-only
    group of an `optax.partition`) restarts its count, so bias correction starts over.

    Args:
        opt_state: The whole optimizer state.
        lora_params: The adapted parameter tree the state belongs to.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> opt = optax.adam(1e-3)
        >>> state = cljax.lora_reset_state(opt.init(lora), lora)
    """
    factors = _factor_paths(lora_params)
    longest = max((len(p) for p in factors), default=0)

    def tied(path) -> bool:
        return any(
            tuple(path[len(path) - k :]) in factors for k in range(1, min(longest, len(path)) + 1)
        )

    def walk(node, path):
        children, treedef = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node
        )
        if len(children) == 1 and children[0][1] is node:  # an array leaf
            leaf = node
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and tied(path):
                return jnp.zeros_like(leaf), True
            return leaf, False
        rebuilt, flags = [], []
        for key_path, child in children:
            new, flag = walk(child, (*path, *key_path))
            rebuilt.append(new)
            flags.append(flag)
        out = treedef.unflatten(rebuilt)
        fields = getattr(node, "_fields", ())
        if "count" in fields:
            others = [
                (p, x)
                for p, x in jax.tree_util.tree_flatten_with_path(node)[0]
                if not (p and getattr(p[0], "name", None) == "count")
            ]
            if others and all(tied((*path, *p)) for p, _ in others):
                out = out._replace(count=jnp.zeros_like(node.count))
        return out, any(flags)

    return walk(opt_state, ())[0]


def lora_labels(lora_params: Any, *, others: str = "frozen") -> Any:
    """Labels for `optax.partition`: ``'lora'`` on factors and gates, ``'frozen'`` on bases.

    Args:
        lora_params: A tree with `LoraWeight` nodes.
        others: Label of the leaves outside any adapter (``'frozen'`` or ``'lora'``).

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> tx = optax.partition({"lora": optax.adam(1e-3), "frozen": optax.set_to_zero()},
        ...                      cljax.lora_labels(lora))
    """

    def leaf(x):
        if not _is_lora(x):
            return others
        gate = None if x.gate is None else "lora"
        return dataclasses.replace(x, base="frozen", a="lora", b="lora", gate=gate)

    return jax.tree.map(leaf, lora_params, is_leaf=_is_lora)


def lora_extract(
    base: Any,
    finetuned: Any,
    *,
    rank: int,
    targets: Callable | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> Any:
    """Extracts a rank-`rank` LoRA from a dense delta by truncated SVD (``scale = 1``).

    For each targeted matrix ``Δ = W_ft − W₀ ≈ U_r Σ_r V_rᵀ``: ``a = U_r Σ_r^½``,
    ``b = Σ_r^½ V_rᵀ``, base ``W₀``. Other leaves keep their fine-tuned values.

    Example:
        >>> base = {"w": jnp.zeros((4, 3))}
        >>> lora = cljax.lora_extract(base, {"w": jnp.ones((4, 3))}, rank=1)
        >>> bool(jnp.allclose(cljax.lora_apply(lora)["w"], 1.0, atol=1e-5))
        True
    """
    fn = "lora_extract"
    _checks.check_int(fn, "rank", rank, 1)
    _checks.check_same_structure(fn, base=base, finetuned=finetuned)
    leaves, treedef, chosen = _targets(fn, base, targets, matrix_spec)
    out = []
    for (path, w0), w1, sel in zip(leaves, treedef.flatten_up_to(finetuned), chosen, strict=True):
        if not sel:
            out.append(w1)
            continue
        name = _checks.leaf_name(path)
        delta = as_matrices(
            jnp.asarray(w1, jnp.float32) - jnp.asarray(w0, jnp.float32), matrix_spec, name
        )
        r = min(rank, *delta.shape[-2:])
        u, s, v = jax.vmap(lambda d, r=r: _bases.svd_factors(d, r))(delta)
        root = jnp.sqrt(s)[:, None, :]
        batch_axes, _, _ = matrix_spec.axes(jnp.ndim(w0), name)
        batch_shape = tuple(jnp.shape(w0)[ax] for ax in batch_axes)
        dtype = jnp.result_type(w0)
        a = (u * root).reshape(*batch_shape, u.shape[1], r).astype(dtype)
        b = jnp.swapaxes(v * root, -1, -2).reshape(*batch_shape, r, v.shape[1]).astype(dtype)
        out.append(LoraWeight(w0, a, b, None, 1.0, matrix_spec))
    return treedef.unflatten(out)


def fedex_lora_average(adapters: Sequence[Any], *, weights: Sequence[float] | None = None) -> Any:
    """Averages LoRA-adapted trees exactly: FedEx-LoRA.

    Factors are averaged (``ā = Σ wᵢ aᵢ``, ``b̄ = Σ wᵢ bᵢ``, gates likewise) and the base absorbs
    the residual ``Σ wᵢ sᵢ aᵢ diag(gᵢ) bᵢ − s ā diag(ḡ) b̄``, so that
    ``lora_apply(result) = Σ wᵢ lora_apply(adapterᵢ)``. Other leaves (and the bases) are averaged.

    Args:
        adapters: Trees from `lora_init` with the same structure (the clients' adapters).
        weights: Non-negative weights, normalised to sum 1 (default uniform).

    Example:
        >>> one = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> merged = cljax.fedex_lora_average([one, one])

    References:
        Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
        Foundation Models", 2024. https://arxiv.org/abs/2410.09432
    """
    fn = "fedex_lora_average"
    adapters = list(adapters)
    if not adapters:
        raise ValueError(f"{fn}: `adapters` is empty; pass at least one adapted tree.")
    structure = jax.tree.structure(adapters[0])
    for i, other in enumerate(adapters[1:], start=1):
        if jax.tree.structure(other) != structure:
            raise ValueError(
                f"{fn}: adapter {i} has a different tree structure (or LoRA scales/specs) from adapter 0."
            )
        _checks.check_same_structure(fn, first=adapters[0], other=other)
    if weights is None:
        w = [1.0 / len(adapters)] * len(adapters)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(adapters) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(
                f"{fn}(weights=...) must be {len(adapters)} non-negative numbers with a positive sum, got {list(weights)}."
            )
        total = sum(w)
        w = [x / total for x in w]

    def mean(*xs):
        return sum(wi * jnp.asarray(x, jnp.float32) for wi, x in zip(w, xs, strict=True))

    def leaf(*xs):
        if not _is_lora(xs[0]):
            return mean(*xs).astype(jnp.result_type(xs[0]))
        dtype = jnp.result_type(xs[0].base)
        avg = dataclasses.replace(
            xs[0],
            a=mean(*(x.a for x in xs)),
            b=mean(*(x.b for x in xs)),
            gate=None if xs[0].gate is None else mean(*(x.gate for x in xs)),
        )
        residual = mean(*(_delta(x) for x in xs)) - _delta(avg)
        base = mean(*(x.base for x in xs)) + residual
        return dataclasses.replace(
            avg,
            base=base.astype(dtype),
            a=avg.a.astype(jnp.result_type(xs[0].a)),
            b=avg.b.astype(jnp.result_type(xs[0].b)),
            gate=None if avg.gate is None else avg.gate.astype(jnp.result_type(xs[0].gate)),
        )

    return jax.tree.map(leaf, *adapters, is_leaf=_is_lora)


def lora_refactorize(lora_params: Any) -> Any:
    """Re-factors each adapter into balanced factors without changing ``a diag(gate) b``.

    ``a diag(gate) b = U S Vᵀ`` (via QR of both factors and an ``r x r`` SVD);
    ``a = U S^½``, ``b = S^½ Vᵀ``, gates set to one, so ``‖a‖_F = ‖b‖_F``. Reset the factors'
    moments afterwards (`lora_reset_state`), as the low-rank pre-training study does.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> lora = cljax.lora_refactorize(lora)

    References:
        "Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic Advances
        and Benchmarking", 2025.
    """

    def balance(a, b):
        qa, ra = jnp.linalg.qr(a)
        qb, rb = jnp.linalg.qr(b.T)
        u, s, vh = jnp.linalg.svd(ra @ rb.T)
        root = jnp.sqrt(s)
        return qa @ (u * root[None, :]), (root[:, None] * vh) @ qb.T

    def leaf(x):
        if not _is_lora(x):
            return x
        a = x.a.astype(jnp.float32)
        if x.gate is not None:
            a = a * x.gate.astype(jnp.float32)[..., None, :]
        batch = jnp.shape(a)[:-2]
        new_a, new_b = jax.vmap(balance)(
            a.reshape(-1, *a.shape[-2:]), x.b.astype(jnp.float32).reshape(-1, *x.b.shape[-2:])
        )
        return dataclasses.replace(
            x,
            a=new_a.reshape(*batch, *new_a.shape[-2:]).astype(jnp.result_type(x.a)),
            b=new_b.reshape(*batch, *new_b.shape[-2:]).astype(jnp.result_type(x.b)),
            gate=None if x.gate is None else jnp.ones_like(x.gate),
        )

    return jax.tree.map(leaf, lora_params, is_leaf=_is_lora)


def lora_gate_prox(lora_params: Any, threshold: jax.typing.ArrayLike) -> Any:
    """Soft-thresholds every adapter gate: ``g ← sign(g) · max(|g| − threshold, 0)`` (CoDyRA).

    The proximal step of ``β Σ ‖gate‖₁``, applied after the optimizer step with
    ``threshold = η · β`` (the same learning rate as the step).

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2, gates=True)
        >>> lora = cljax.lora_gate_prox(lora, 1e-3)

    References:
        "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning
        Vision-Language Models with Dynamic Rank-Selective LoRA", 2024.
    """
    _checks.check_in_range("lora_gate_prox", "threshold", threshold, 0.0)

    def leaf(x):
        if not _is_lora(x) or x.gate is None:
            return x
        g = x.gate.astype(jnp.float32)
        shrunk = jnp.sign(g) * jnp.maximum(jnp.abs(g) - threshold, 0.0)
        return dataclasses.replace(x, gate=shrunk.astype(jnp.result_type(x.gate)))

    return jax.tree.map(leaf, lora_params, is_leaf=_is_lora)


def lora_effective_rank(lora_params: Any) -> Any:
    """Number of nonzero gates of each adapter (its rank without gates), ``(*batch,)`` int32.

    Non-adapter leaves map to None.

    Example:
        >>> lora = cljax.lora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2, gates=True)
        >>> int(cljax.lora_effective_rank(lora)["w"])
        2
    """

    def leaf(x):
        if not _is_lora(x):
            return None
        if x.gate is None:
            return jnp.full(jnp.shape(x.a)[:-2], jnp.shape(x.a)[-1], jnp.int32)
        return jnp.sum(x.gate != 0, axis=-1).astype(jnp.int32)

    return jax.tree.map(leaf, lora_params, is_leaf=_is_lora)
