"""SNELLA: a sparse weight update merged from two factors through a kernel, with a per-matrix budget.

A targeted ``(m, n)`` matrix view (a Flax kernel, ``(d_in, d_out)``) is tuned as ``W = W₀ + Δ``:

* Kernelized merge (`snella_kernel`). The factors ``a`` (``(H, m, d)``) and ``b`` (``(H, n, d)``)
  give ``K₀ = Σ_h c (−1)^h ‖a_h[i] − b_h[j]‖₂`` (Euclidean distances between rows, ``c = 0.1``,
  ``H = 2`` heads of ``d = rank / H`` columns), then
  ``K = K₀ + α softmax_j(K₀ / γ) + β`` with three trainable scalars per matrix.
* Sparsification (`snella_delta`). With the matrix's sparsity ``s``, entries of ``|K|`` at or
  below the linear-interpolation ``s``-quantile of ``|K|`` are dropped and the kept ones are
  weighted by their (gradient-stopped) magnitude: ``Δ = K ⊙ sg(|K| ⊙ 1[|K| > q_s(|K|)])``.
* Bi-level allocation. Inside a matrix, entries compete by ``|K|`` at every forward pass. Across
  matrices, `snella_importance_update` keeps per-entry EMAs of the sensitivity ``|p ⊙ g|`` and of
  its uncertainty for ``a`` and ``b``; `snella_allocate` splits a global count of kept entries
  (cubic schedule, `snella_budget`) among matrices in proportion to their scores, capped at each
  matrix's size (`snella_allocate_counts`), and sets each matrix's sparsity from its share.

These rules come from the SNELLA reference code (``model/vision_transformer_timm.py``, class
``SNELLA``; ``sparse_allocator.py``; ``train_alloc_ema.py``, ``engine.py`` and the released
``scripts/*/snella32/*.sh``), not from the abstract alone.

Only ``a``, ``b``, ``alpha``, ``gamma`` and ``beta`` train (`snella_labels`); the base weight and
the sparsity are frozen, so they carry no optimizer state under `optax.partition`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cljax import _checks
from cljax.tree import MatrixSpec, from_matrices, matrix_shape

__all__ = [
    "SnellaImportance",
    "SnellaWeight",
    "snella_allocate",
    "snella_allocate_counts",
    "snella_budget",
    "snella_delta",
    "snella_importance_init",
    "snella_importance_update",
    "snella_init",
    "snella_kernel",
    "snella_labels",
    "snella_materialize",
]

_F32 = jnp.float32
_REF = (
    'Reference: "Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition for Vision '
    'Models" (SNELLA, 2025), https://arxiv.org/abs/2510.24037; code https://github.com/ssfgunner/SNELL.'
)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "a", "b", "alpha", "gamma", "beta", "sparsity"],
    meta_fields=["spec", "coeff"],
)
@dataclasses.dataclass(frozen=True)
class SnellaWeight:
    """A SNELLA-adapted leaf: ``W = base + Δ(a, b, alpha, gamma, beta; sparsity)`` in its matrix view.

    Attributes:
        base: The frozen pre-trained weight ``W₀``, of the original leaf's shape.
        a: ``(*batch, H, m, d)`` row factor (``In_Qs`` of the reference), float32.
        b: ``(*batch, H, n, d)`` column factor (``Out_Qs``), float32.
        alpha: ``(*batch,)`` weight of the softmax term, 1 at init.
        gamma: ``(*batch,)`` softmax temperature, 1 at init.
        beta: ``(*batch,)`` offset, 0 at init.
        sparsity: ``(*batch,)`` fraction of entries dropped (the quantile level), float32; set by
            `snella_allocate`, never trained.
        spec: The `MatrixSpec` of the matrix view. Static.
        coeff: ``c`` of ``K₀`` (0.1). Static.
    """

    base: Any
    a: Any
    b: Any
    alpha: Any
    gamma: Any
    beta: Any
    sparsity: Any
    spec: MatrixSpec = MatrixSpec()
    coeff: float = 0.1


class SnellaImportance(NamedTuple):
    """Importance EMAs of `snella_importance_update`, one entry per `SnellaWeight` (flatten order).

    Attributes:
        ipt_a: EMAs of ``|a ⊙ ∂a|``, each of ``a``'s shape.
        ipt_b: EMAs of ``|b ⊙ ∂b|``.
        unc_a: EMAs of ``|ipt − EMA(ipt)|`` for ``a``.
        unc_b: The same for ``b``.
    """

    ipt_a: tuple
    ipt_b: tuple
    unc_a: tuple
    unc_b: tuple


def _is_snella(x: Any) -> bool:
    return isinstance(x, SnellaWeight)


def _nodes(trainable: Any) -> list[SnellaWeight]:
    return [x for x in jax.tree.leaves(trainable, is_leaf=_is_snella) if _is_snella(x)]


# ---------------------------------------------------------------------------------------------
# Kernel and masked delta.


def _safe_dist(x, y):
    """``‖x_i − y_j‖₂`` for ``x (…, m, d)``, ``y (…, n, d)``; gradient 0 at distance 0."""
    d2 = jnp.sum(jnp.square(x[..., :, None, :] - y[..., None, :, :]), axis=-1)
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def snella_kernel(
    a: jax.Array,
    b: jax.Array,
    alpha: jax.typing.ArrayLike = 1.0,
    gamma: jax.typing.ArrayLike = 1.0,
    beta: jax.typing.ArrayLike = 0.0,
    *,
    coeff: float = 0.1,
) -> jax.Array:
    """Returns the merged matrix ``K = K₀ + α softmax(K₀ / γ, axis=-1) + β``, in float32.

    ``K₀[i, j] = Σ_h coeff · (−1)^h · ‖a[h, i] − b[h, j]‖₂``. The temperature is kept at least
    the smallest normal float32 in magnitude and the softmax logits are clipped to finite values,
    so no finite input gives a non-finite output (the reference divides by ``γ`` as is).

    Args:
        a: ``(*batch, H, m, d)`` row factor.
        b: ``(*batch, H, n, d)`` column factor.
        alpha: Softmax weight, broadcast against ``batch``.
        gamma: Softmax temperature, broadcast against ``batch``.
        beta: Offset, broadcast against ``batch``.
        coeff: ``c`` (0.1 in the reference). Static.

    Returns:
        ``(*batch, m, n)`` float32.

    Raises:
        ValueError: factors whose batch, head or column dims disagree.

    Example:
        >>> k = cljax.snella_kernel(jnp.ones((2, 3, 4)), jnp.zeros((2, 5, 4)))
        >>> k.shape
        (3, 5)

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code class ``SNELLA``.
    """
    fn = "snella_kernel"
    a = jnp.asarray(a, _F32)
    b = jnp.asarray(b, _F32)
    if (
        a.ndim < 3
        or b.ndim < 3
        or a.shape[:-3] != b.shape[:-3]
        or a.shape[-3] != b.shape[-3]
        or a.shape[-1] != b.shape[-1]
    ):
        raise ValueError(
            f"{fn}: `a` has shape {a.shape} and `b` has shape {b.shape}; they need (*batch, H, m, d) "
            "and (*batch, H, n, d) with the same batch, H and d."
        )
    heads, batch = a.shape[-3], a.shape[:-3]
    signs = jnp.asarray([(-1.0) ** h for h in range(heads)], _F32).reshape(
        (1,) * len(batch) + (heads, 1, 1)
    )
    k0 = jnp.sum(coeff * signs * _safe_dist(a, b), axis=-3)
    expand = lambda v: jnp.broadcast_to(jnp.asarray(v, _F32), batch)[..., None, None]
    alpha, gamma, beta = expand(alpha), expand(gamma), expand(beta)
    tiny = jnp.finfo(_F32).tiny
    gamma = jnp.where(jnp.abs(gamma) < tiny, jnp.where(gamma < 0, -tiny, tiny), gamma)
    big = jnp.finfo(_F32).max / 4
    logits = jnp.clip(k0 / gamma, -big, big)
    return k0 + alpha * jax.nn.softmax(logits, axis=-1) + beta


def _sparsify(k, sparsity):
    """``k ⊙ sg(|k| ⊙ 1[|k| > quantile(|k|, sparsity)])`` for one ``(m, n)`` matrix.

    The mask is read off the one sort of ``|k|`` (positions past the entries ``≤`` the threshold),
    so it cannot disagree with the threshold when XLA recomputes ``k`` in several fusions.
    """
    mag = lax.stop_gradient(jnp.abs(k))
    size = mag.size
    ordered, order = lax.sort((mag.reshape(-1), jnp.arange(size, dtype=jnp.int32)), num_keys=1)
    last = size - 1
    pos = jnp.clip(lax.stop_gradient(sparsity), 0.0, 1.0) * last
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, last)
    hi = jnp.minimum(lo + 1, last)
    frac = pos - lo.astype(_F32)
    # linear interpolation (torch.quantile's default), exact at both ends
    thres = ordered[lo] + frac * (ordered[hi] - ordered[lo])
    dropped = jnp.sum(ordered <= thres)
    keep = jnp.zeros((size,), bool).at[order].set(jnp.arange(size) >= dropped).reshape(mag.shape)
    return k * jnp.where(keep, mag, 0.0)


def snella_delta(weight: SnellaWeight) -> jax.Array:
    """Returns the sparse update ``Δ = K ⊙ sg(|K| ⊙ 1[|K| > q_s(|K|)])`` in the leaf's shape.

    ``K`` is `snella_kernel` of the weight's factors, ``q_s`` the linear-interpolation quantile of
    ``|K|`` at the weight's `sparsity` ``s`` (per matrix). Kept entries are multiplied by their
    own magnitude, and gradients flow through ``K`` only, as in the reference (``SNELLA.sparsify``).
    At ``s = 0`` the smallest entry is still dropped (strict ``>``).

    Args:
        weight: A `SnellaWeight`.

    Returns:
        Float32 array of the base leaf's shape, zero outside the kept entries.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> cljax.snella_delta(tuned["w"]).shape
        (4, 3)

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code ``SNELLA.sparsify``.
    """
    if not _is_snella(weight):
        raise TypeError(
            f"snella_delta: `weight` must be a SnellaWeight, got {type(weight).__name__}."
        )
    shape = tuple(jnp.shape(weight.base))
    nb, m, n = matrix_shape(shape, weight.spec)
    a = jnp.reshape(weight.a, (nb,) + tuple(jnp.shape(weight.a))[-3:])
    b = jnp.reshape(weight.b, (nb,) + tuple(jnp.shape(weight.b))[-3:])
    flat = lambda v: jnp.reshape(jnp.asarray(v, _F32), (nb,))
    k = snella_kernel(
        a, b, flat(weight.alpha), flat(weight.gamma), flat(weight.beta), coeff=weight.coeff
    )
    delta = jax.vmap(_sparsify)(k, flat(weight.sparsity))
    return from_matrices(delta, weight.spec, shape)


def snella_materialize(trainable: Any) -> Any:
    """Returns the dense weights ``W₀ + Δ`` (`snella_delta`), in the bases' dtypes.

    Differentiable: use it in the forward pass; ``a``, ``b``, ``alpha``, ``gamma`` and ``beta``
    get gradients. Leaves that are not `SnellaWeight` are returned as they are.

    Args:
        trainable: A tree with `SnellaWeight` nodes (from `snella_init`).

    Returns:
        A tree of dense arrays.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> cljax.snella_materialize(tuned)["w"].shape
        (4, 3)

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037.
    """

    def leaf(x):
        if not _is_snella(x):
            return x
        dtype = jnp.result_type(x.base)
        return (jnp.asarray(x.base, _F32) + snella_delta(x)).astype(dtype)

    return jax.tree.map(leaf, trainable, is_leaf=_is_snella)


# ---------------------------------------------------------------------------------------------
# Construction.


def snella_init(
    key: jax.Array,
    params: Any,
    *,
    rank: int = 32,
    heads: int = 2,
    sparsity: float = 0.0,
    coeff: float = 0.1,
    targets: Callable[[Any], Any] | None = None,
    matrix_spec: MatrixSpec = MatrixSpec(),
) -> Any:
    """Wraps each targeted leaf in a `SnellaWeight` with fresh factors.

    As in the reference, ``a`` and ``b`` are drawn from ``U(−1/√(m d), 1/√(m d))`` and
    ``U(−1/√(n d), 1/√(n d))`` (Kaiming-uniform with ``a = √5`` on ``(H, m, d)``), ``d = rank / H``,
    ``alpha = gamma = 1``, ``beta = 0``. The update is not zero at init (the reference adds the
    sparse ``Δ`` from the first step).

    Args:
        key: PRNG key.
        params: The pre-trained parameters.
        rank: Total factor width ``H · d`` (``low_rank_dim``, 32 in the released scripts). Static.
        heads: ``H``, the number of distance kernels (2 in the reference). Static.
        sparsity: Initial sparsity of every matrix (``init_thres``: 0 for FGVC, 0.01 for VTAB).
        coeff: ``c`` of ``K₀`` (0.1). Static.
        targets: None (every leaf with at least two dims) or ``params -> tree of bools``.
        matrix_spec: The matrix view of targeted leaves.

    Returns:
        The tree with `SnellaWeight` nodes; other leaves unchanged.

    Raises:
        TypeError: a non-int `rank`/`heads`, a `matrix_spec` that is not a MatrixSpec, or a
            non-callable `targets`.
        ValueError: `rank` not divisible by `heads`, `sparsity` outside [0, 1], or a targeted
            leaf with fewer than two dims.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=4)
        >>> tuned["w"].a.shape, tuned["w"].b.shape
        ((2, 4, 2), (2, 3, 2))

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037.
    """
    fn = "snella_init"
    _checks.check_int(fn, "rank", rank)
    _checks.check_int(fn, "heads", heads)
    if rank % heads:
        raise ValueError(f"{fn}(rank=...) must be a multiple of heads={heads}, got {rank}.")
    _checks.check_in_range(fn, "sparsity", sparsity, 0.0, 1.0)
    if not isinstance(matrix_spec, MatrixSpec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec, got {type(matrix_spec).__name__}."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if targets is None:
        chosen = [jnp.ndim(x) >= 2 for _, x in leaves]
    else:
        if not callable(targets):
            raise TypeError(
                f"{fn}(targets=...) must be a function params -> tree of bools, got {type(targets).__name__}."
            )
        chosen = [bool(c) for c in treedef.flatten_up_to(targets(params))]
    d = rank // heads
    out = []
    keys = jax.random.split(key, max(len(leaves), 1))
    for i, ((path, leaf), sel) in enumerate(zip(leaves, chosen, strict=True)):
        if not sel:
            out.append(leaf)
            continue
        name = _checks.leaf_name(path)
        shape = tuple(jnp.shape(leaf))
        if len(shape) < 2:
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {shape}; a SNELLA leaf needs at least two dims. Leave it out of `targets`."
            )
        batch_axes, _, _ = matrix_spec.axes(len(shape), name)
        batch = tuple(shape[ax] for ax in batch_axes)
        _, m, n = matrix_shape(shape, matrix_spec, name)
        ka, kb = jax.random.split(keys[i])
        ba, bb = 1.0 / math.sqrt(m * d), 1.0 / math.sqrt(n * d)
        out.append(
            SnellaWeight(
                base=leaf,
                a=jax.random.uniform(ka, batch + (heads, m, d), _F32, -ba, ba),
                b=jax.random.uniform(kb, batch + (heads, n, d), _F32, -bb, bb),
                alpha=jnp.ones(batch, _F32),
                gamma=jnp.ones(batch, _F32),
                beta=jnp.zeros(batch, _F32),
                sparsity=jnp.full(batch, sparsity, _F32),
                spec=matrix_spec,
                coeff=float(coeff),
            )
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def snella_labels(trainable: Any, *, others: str = "frozen") -> Any:
    """Labels for `optax.partition`: ``'snella'`` on the factors and scalars, ``'frozen'`` on the rest.

    The base weights and the sparsities are ``'frozen'``, so with ``optax.set_to_zero()`` for
    that label only ``a``, ``b``, ``alpha``, ``gamma`` and ``beta`` hold optimizer state.

    Args:
        trainable: A tree with `SnellaWeight` nodes.
        others: Label of leaves outside any SNELLA weight (``'frozen'``, or ``'snella'`` to train
            a head with the same optimizer).

    Returns:
        A tree of strings of the same structure.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> tx = optax.partition({"snella": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
        ...                      cljax.snella_labels(tuned))

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037.
    """

    def leaf(x):
        if not _is_snella(x):
            return others
        return dataclasses.replace(
            x,
            base="frozen",
            a="snella",
            b="snella",
            alpha="snella",
            gamma="snella",
            beta="snella",
            sparsity="frozen",
        )

    return jax.tree.map(leaf, trainable, is_leaf=_is_snella)


# ---------------------------------------------------------------------------------------------
# Importance scores.


def snella_importance_init(trainable: Any) -> SnellaImportance:
    """Returns zero importance EMAs for every `SnellaWeight` of `trainable`.

    Args:
        trainable: A tree with `SnellaWeight` nodes.

    Returns:
        A `SnellaImportance` of zeros.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> cljax.snella_importance_init(tuned).ipt_a[0].shape
        (2, 4, 1)

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code ``sparse_allocator.py``.
    """
    nodes = _nodes(trainable)
    za = tuple(jnp.zeros(jnp.shape(x.a), _F32) for x in nodes)
    zb = tuple(jnp.zeros(jnp.shape(x.b), _F32) for x in nodes)
    return SnellaImportance(za, zb, za, zb)


def snella_importance_update(
    importance: SnellaImportance,
    trainable: Any,
    grads: Any,
    *,
    b1: jax.typing.ArrayLike = 0.85,
    b2: jax.typing.ArrayLike = 0.85,
) -> SnellaImportance:
    """One step of the sensitivity and uncertainty EMAs for ``a`` and ``b``.

    For each factor ``p`` with gradient ``g``: ``I = |p ⊙ g|`` (NaN → 0),
    ``Ī ← b1 Ī + (1 − b1) I`` and ``Ū ← b2 Ū + (1 − b2) |I − Ī|`` (with the new ``Ī``). The
    reference calls this after every optimizer step with the updated factors and that step's
    gradients.

    Args:
        importance: The current `SnellaImportance`.
        trainable: The tree with `SnellaWeight` nodes.
        grads: Gradients of the loss for `trainable` (the same structure).
        b1: Sensitivity EMA rate (0.85 in the released scripts).
        b2: Uncertainty EMA rate (0.85).

    Returns:
        The updated `SnellaImportance`.

    Raises:
        ValueError: `b1` or `b2` outside (0, 1), or `grads` / `importance` that do not match
            `trainable`.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, rank=2)
        >>> imp = cljax.snella_importance_init(tuned)
        >>> imp = cljax.snella_importance_update(imp, tuned, tuned)
        >>> bool(imp.ipt_a[0].sum() > 0)
        True

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code ``Allocator.update_ipt``.
    """
    fn = "snella_importance_update"
    _checks.check_in_range(fn, "b1", b1, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    _checks.check_in_range(fn, "b2", b2, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    nodes, gnodes = _nodes(trainable), _nodes(grads)
    if len(gnodes) != len(nodes) or len(importance.ipt_a) != len(nodes):
        raise ValueError(
            f"{fn}: `trainable` has {len(nodes)} SnellaWeight nodes, `grads` {len(gnodes)} and "
            f"`importance` {len(importance.ipt_a)}; pass matching trees."
        )

    def step(p, g, ipt, unc):
        cur = jnp.abs(jnp.asarray(p, _F32) * jnp.asarray(g, _F32))
        cur = jnp.where(jnp.isnan(cur), 0.0, cur)
        ipt = b1 * ipt + (1.0 - b1) * cur
        unc = b2 * unc + (1.0 - b2) * jnp.abs(cur - ipt)
        return ipt, unc

    ia, ib, ua, ub = [], [], [], []
    for i, (x, g) in enumerate(zip(nodes, gnodes, strict=True)):
        if jnp.shape(g.a) != jnp.shape(x.a) or jnp.shape(g.b) != jnp.shape(x.b):
            raise ValueError(
                f"{fn}: SnellaWeight {i} has factors {jnp.shape(x.a)}, {jnp.shape(x.b)} but gradients "
                f"{jnp.shape(g.a)}, {jnp.shape(g.b)}."
            )
        new_ia, new_ua = step(x.a, g.a, importance.ipt_a[i], importance.unc_a[i])
        new_ib, new_ub = step(x.b, g.b, importance.ipt_b[i], importance.unc_b[i])
        ia.append(new_ia)
        ua.append(new_ua)
        ib.append(new_ib)
        ub.append(new_ub)
    return SnellaImportance(tuple(ia), tuple(ib), tuple(ua), tuple(ub))


# ---------------------------------------------------------------------------------------------
# Budget and allocation.


def snella_budget(
    step: jax.typing.ArrayLike,
    *,
    init_count: jax.typing.ArrayLike,
    target_count: jax.typing.ArrayLike,
    total_steps: int,
    init_warmup: int = 0,
    final_warmup: int = 0,
    reallocate_every: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The global count of kept entries at `step`, and whether to reallocate then.

    ``step ≤ init_warmup``: ``init_count``, no reallocation. ``step > total_steps −
    final_warmup``: ``target_count``, reallocate. Otherwise
    ``floor(target + (init − target) (1 − (step − init_warmup) / (total_steps − final_warmup −
    init_warmup))³)``, reallocating when ``step % reallocate_every == 0``. In the reference a
    step is an epoch and ``total_steps`` the number of allocation epochs (100).

    Args:
        step: The current step (an int, may be traced).
        init_count: Kept entries at the start, ``Σ (1 − init sparsity) m n``.
        target_count: Kept entries at the end, ``Σ (1 − target sparsity) m n``.
        total_steps: Steps of the schedule. Static.
        init_warmup: Steps at `init_count` first (0 in the released scripts). Static.
        final_warmup: Steps at `target_count` last (0). Static.
        reallocate_every: Reallocation interval while the count decreases (1). Static.

    Returns:
        ``(count, reallocate)``: float32 and bool scalars.

    Raises:
        TypeError: non-int static arguments.
        ValueError: ``total_steps <= init_warmup + final_warmup``.

    Example:
        >>> count, again = cljax.snella_budget(5, init_count=100.0, target_count=20.0, total_steps=10)
        >>> float(count), bool(again)
        (30.0, True)

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code ``Allocator.schedule_threshold``.
    """
    fn = "snella_budget"
    _checks.check_int(fn, "total_steps", total_steps)
    _checks.check_int(fn, "init_warmup", init_warmup, 0)
    _checks.check_int(fn, "final_warmup", final_warmup, 0)
    _checks.check_int(fn, "reallocate_every", reallocate_every)
    if total_steps <= init_warmup + final_warmup:
        raise ValueError(
            f"{fn}(total_steps=...) must exceed init_warmup + final_warmup = {init_warmup + final_warmup}, got {total_steps}."
        )
    step = jnp.asarray(step, jnp.int32)
    init = jnp.asarray(init_count, _F32)
    target = jnp.asarray(target_count, _F32)
    frac = 1.0 - (step - init_warmup).astype(_F32) / float(total_steps - final_warmup - init_warmup)
    mid = jnp.floor(target + (init - target) * frac**3)
    early = step <= init_warmup
    late = step > total_steps - final_warmup
    count = jnp.where(early, init, jnp.where(late, target, mid))
    again = jnp.where(early, False, jnp.where(late, True, step % reallocate_every == 0))
    return count, again


def snella_allocate_counts(
    scores: jax.Array, count: jax.typing.ArrayLike, capacities: jax.Array
) -> jax.Array:
    """Splits `count` kept entries among matrices in proportion to `scores`, capped by `capacities`.

    ``x = min(cap, ⌊count · s / Σs⌋)``; then, while entries remain, the remainder is shared
    among the matrices below their cap in proportion to their scores (capped again); finally
    ``⌊x⌋``. All-zero scores share uniformly, and so does a remainder whose open matrices all
    score zero (the reference divides by zero there). Each round fills at least one more matrix or places
    the whole remainder, so the loop runs a fixed ``len(scores) + 1`` rounds.

    Args:
        scores: ``(L,)`` non-negative per-matrix scores.
        count: Entries to keep in total (at most ``Σ capacities``).
        capacities: ``(L,)`` matrix sizes ``m n``.

    Returns:
        ``(L,)`` int32 kept counts.

    Raises:
        ValueError: `scores` and `capacities` that are not matching vectors.

    Example:
        >>> cljax.snella_allocate_counts(jnp.array([3.0, 1.0]), 8, jnp.array([5.0, 10.0])).tolist()
        [5, 3]

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code ``Allocator.param_alloc``.
    """
    fn = "snella_allocate_counts"
    scores = jnp.asarray(scores, _F32)
    caps = jnp.asarray(capacities, _F32)
    if scores.ndim != 1 or scores.shape != caps.shape:
        raise ValueError(
            f"{fn}: `scores` has shape {scores.shape} and `capacities` {caps.shape}; pass two (L,) vectors."
        )
    count = jnp.asarray(count, _F32)
    total = jnp.sum(scores)
    n = scores.shape[0]
    share = jnp.where(
        total > 0, scores / jnp.where(total > 0, total, 1.0), jnp.full_like(scores, 1.0 / n)
    )
    alloc = jnp.minimum(caps, jnp.floor(count * share))

    def body(_, alloc):
        delta = count - jnp.sum(alloc)
        room = caps - alloc
        open_ = room != 0
        s_open = jnp.sum(jnp.where(open_, share, 0.0))
        weight = jnp.where(s_open > 0, share, jnp.ones_like(share))  # open matrices all scored 0
        w_open = jnp.sum(jnp.where(open_, weight, 0.0))
        add = jnp.minimum(delta * weight / jnp.where(w_open > 0, w_open, 1.0), room)
        go = (delta > 0) & (w_open > 0)
        return jnp.where(go & open_, alloc + add, alloc)

    alloc = lax.fori_loop(0, n + 1, body, alloc)
    return jnp.floor(alloc).astype(jnp.int32)


def _layer_scores(importance: SnellaImportance) -> list[jax.Array]:
    out = []
    for ia, ib, ua, ub in zip(*importance, strict=True):
        sa = jnp.mean(ia * ua, axis=(-3, -2, -1))
        sb = jnp.mean(ib * ub, axis=(-3, -2, -1))
        out.append(sa + sb)
    return out


def snella_allocate(
    trainable: Any,
    importance: SnellaImportance,
    step: jax.typing.ArrayLike,
    *,
    target_sparsity: jax.typing.ArrayLike,
    total_steps: int,
    init_sparsity: jax.typing.ArrayLike = 0.0,
    init_warmup: int = 0,
    final_warmup: int = 0,
    reallocate_every: int = 1,
) -> Any:
    """Sets every matrix's sparsity from the global budget at `step` and the importance scores.

    Each matrix (each entry of a stacked leaf) scores ``mean(Ī_a ⊙ Ū_a) + mean(Ī_b ⊙ Ū_b)``; the
    budget of `snella_budget` (from ``init_count = Σ (1 − init_sparsity) m n`` to
    ``target_count = Σ (1 − target_sparsity) m n``) is split by `snella_allocate_counts`, and a
    matrix keeping ``k`` of its ``m n`` entries gets sparsity ``clip(1 − k / (m n), 0, 1)``. When
    `snella_budget` says not to reallocate, the tree is returned unchanged. The reference calls
    this at the start of each epoch; jit-compatible (fixed shapes).

    Args:
        trainable: A tree with `SnellaWeight` nodes.
        importance: From `snella_importance_update`.
        step: The current schedule step (the epoch in the reference).
        target_sparsity: Average fraction of entries dropped at the end (``target_ratio``; tuned
            per task in the released scripts, from 0 to 0.93, so it has no default).
        total_steps: See `snella_budget`. Static.
        init_sparsity: The sparsity `snella_init` used.
        init_warmup: See `snella_budget`. Static.
        final_warmup: See `snella_budget`. Static.
        reallocate_every: See `snella_budget`. Static.

    Returns:
        `trainable` with new `sparsity` leaves.

    Raises:
        ValueError: sparsities outside [0, 1], a tree without `SnellaWeight` nodes, or
            `importance` that does not match `trainable`.

    Example:
        >>> tuned = cljax.snella_init(jax.random.key(0), {"u": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}, rank=2)
        >>> imp = cljax.snella_importance_update(cljax.snella_importance_init(tuned), tuned, tuned)
        >>> tuned = cljax.snella_allocate(tuned, imp, 10, target_sparsity=0.5, total_steps=10)
        >>> bool(0.0 < tuned["u"].sparsity < 1.0)
        True

    References:
        SNELLA (2025), https://arxiv.org/abs/2510.24037; reference code ``Allocator.update`` and
        ``Allocator.mask_to_target_ratio``.
    """
    fn = "snella_allocate"
    _checks.check_in_range(fn, "target_sparsity", target_sparsity, 0.0, 1.0)
    _checks.check_in_range(fn, "init_sparsity", init_sparsity, 0.0, 1.0)
    nodes = _nodes(trainable)
    if not nodes:
        raise ValueError(
            f"{fn}: `trainable` has no SnellaWeight nodes; build it with `snella_init`."
        )
    if len(importance.ipt_a) != len(nodes):
        raise ValueError(
            f"{fn}: `importance` has {len(importance.ipt_a)} entries for {len(nodes)} SnellaWeight nodes; "
            "build it with `snella_importance_init(trainable)`."
        )
    sizes = [matrix_shape(tuple(jnp.shape(x.base)), x.spec)[1:] for x in nodes]
    caps = jnp.concatenate(
        [
            jnp.full((math.prod(jnp.shape(x.sparsity)),), m * n, _F32)
            for x, (m, n) in zip(nodes, sizes, strict=True)
        ]
    )
    cap_total = jnp.sum(caps)
    init_count = (1.0 - jnp.asarray(init_sparsity, _F32)) * cap_total
    target_count = (1.0 - jnp.asarray(target_sparsity, _F32)) * cap_total
    count, again = snella_budget(
        step,
        init_count=init_count,
        target_count=target_count,
        total_steps=total_steps,
        init_warmup=init_warmup,
        final_warmup=final_warmup,
        reallocate_every=reallocate_every,
    )
    scores = jnp.concatenate([s.reshape(-1) for s in _layer_scores(importance)])
    kept = snella_allocate_counts(scores, count, caps)
    new_sparsity = jnp.clip(1.0 - kept.astype(_F32) / caps, 0.0, 1.0)
    it = iter(range(len(nodes)))
    offsets = [0]
    for x in nodes:
        offsets.append(offsets[-1] + math.prod(jnp.shape(x.sparsity)))

    def leaf(x):
        if not _is_snella(x):
            return x
        i = next(it)
        new = new_sparsity[offsets[i] : offsets[i + 1]].reshape(jnp.shape(x.sparsity))
        return dataclasses.replace(x, sparsity=jnp.where(again, new, jnp.asarray(x.sparsity, _F32)))

    return jax.tree.map(leaf, trainable, is_leaf=_is_snella)
