"""FRUGAL (LR-02): a state-full low-rank part and a state-free residual of each matrix gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import optax

from cljax import _checks
from cljax.transforms.low_rank._frugal_subsets import BLOCK_ORDERS, SUBSET_PROJECTORS, subset_core
from cljax.transforms.low_rank.projection import (
    _INACTIVE,
    InactiveUpdate,
    Layout,
    Side,
    _check_common,
    _low_rank_core,
)
from cljax.tree import MatrixSpec

__all__ = ["ScaleByFrugalState", "scale_by_frugal"]


FrugalProjector = Literal["svd", "randomized", "random", "blocks", "coordinates", "rows", "columns"]
BlockOrder = Literal["random", "ascending", "descending", "mirror"]
_PROJECTORS = ("svd", "randomized", "random", *SUBSET_PROJECTORS)


class ScaleByFrugalState(NamedTuple):
    """State of `scale_by_frugal`.

    For the basis projectors the fields are those of `ScaleByLowRankProjectionState`. For
    ``'blocks'``, `projector` is a tuple with one int32 ``(k_g,)`` vector per group of same-shape
    matrices (which matrix of the group each slot holds) and `inner` a tuple of `inner` states on
    ``(k_g, m, n)`` stacks. For ``'coordinates'`` / ``'rows'`` / ``'columns'``, `projector`
    mirrors the parameters with int32 ``(*batch, k)`` indices per matrix leaf and `inner` holds
    `inner`'s state on the gathered entries. `projector_opt` is unused (empty nodes) for these.
    """

    count: chex.Array  # int32 steps taken
    key: chex.Array  # uint32 PRNG key data
    projector: optax.Params  # bases, active-matrix slots or index sets (see above)
    inner: optax.Params  # `inner`'s state on the state-full part
    fallback: optax.OptState  # `fallback`'s state on the leaves that are not matrices
    projector_opt: optax.Params  # unused by FRUGAL (empty nodes)


def scale_by_frugal(
    inner: optax.GradientTransformation | None = None,
    *,
    density: float = 0.25,
    refresh_every: int = 200,
    scale: optax.ScalarOrSchedule = 1.0,
    inactive_update: InactiveUpdate = "sign_sgd",
    inactive_scale: chex.Numeric = 1.0,
    reset_statistics: bool = True,
    projector: FrugalProjector = "svd",
    block_order: BlockOrder = "random",
    side: Side = "std",
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    fallback: optax.GradientTransformation | None = None,
    stagger: bool = False,
    layout: Layout = "flax",
    seed: int = 0,
    oversample: int = 8,
    power_iters: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """FRUGAL: `inner` on part of each matrix gradient, a state-free rule on the rest.

    Basis projectors (``'svd'``, ``'randomized'``, ``'random'``). Per matrix view ``G`` with
    basis ``P`` (as in `scale_by_low_rank_projection`, rank
    ``r = max(1, round(density · min(m, n)))``): ``N = inner(down(G))`` and the residual
    ``E = G − up(down(G))`` give the direction
    ``scale · (up(N) + inactive_scale · f(E))`` with ``f = sign`` (``'sign_sgd'``), the identity
    (``'sgd'``) or zero (``'none'``); ``sign(0) = 0``. With `reset_statistics` a refresh
    re-initialises `inner` (moments and step count, so bias correction restarts). Other leaves
    get `fallback` with full state. Place it before `optax.scale_by_learning_rate`.

    Block projector (``'blocks'``, BAdam-like). The projectable tensors are the matrices of the
    matrix leaves (a stacked ``(L, m, n)`` leaf is ``L`` matrices, as its PyTorch counterpart is
    ``L`` weights). Every `refresh_every` steps (``t mod T = 0``, count before the increment)
    ``K = max(1, round(density · N))`` of the ``N`` matrices become active; the direction is
    ``scale · inner(G)`` on active matrices and ``scale · inactive_scale · f(G)`` on the others,
    which hold no state (the active ones restart from a fresh state at each refresh with
    `reset_statistics`). Static shapes need fixed slots: matrices are grouped by
    ``(m, n, dtype)`` and ``K`` is split over the groups by largest remainder (``k_g ≈
    K n_g / N``, a static count per group; a group given no slot is always state-free); the
    choice within a group follows `block_order`:
    ``'random'``, a fresh uniform ``k_g``-subset at every refresh; ``'ascending'``, consecutive
    windows of ``k_g`` matrices in tree (then layer) order, cycling through the group in
    ``ceil(n_g / k_g)`` refreshes (the last window of a cycle wraps to the start);
    ``'descending'``, the same from the last matrix; ``'mirror'``, ascending and descending
    cycles in turn.

    Coordinate projectors (``'coordinates'``: RandK over the ``m n`` entries; ``'rows'`` /
    ``'columns'``: whole rows / columns of the matrix view). Each refresh draws, per matrix, a
    uniform subset of ``max(1, round(density · D))`` of its ``D`` entries / rows / columns (stored
    as sorted int32 indices, regenerable from the key and the refresh step); `inner` runs on the
    gathered entries and the state-free rule on exactly the complement. The index set adds one
    int32 per state-full entry for ``'coordinates'`` (per row / column for the others).

    With `reset_statistics` every refresh re-initialises `inner` (moments and step count). Without
    it, the state is kept as is (as GaLore keeps its moments across bases), so a slot or an index
    position carries its moments to the entry it holds next.

    Args:
        inner: State-full transform on the projected gradients (default `optax.scale_by_adam()`).
        density: Fraction kept state-full: of each matrix's smaller dimension (basis
            projectors), of the matrices (``'blocks'``), or of each matrix's entries, rows or
            columns. Static.
        refresh_every: Steps between basis refreshes. Static.
        scale: The projected parameters' factor ``s_p`` (``proj_params_lr_scale``).
        inactive_update: State-free rule on the residual. Static.
        inactive_scale: Factor ``s_free`` on the state-free part (1.0 pre-training, 0.1
            fine-tuning in the reference).
        reset_statistics: Re-initialise `inner`'s state at every refresh. Static.
        projector: ``'svd'``, ``'randomized'`` or ``'random'`` (see
            `scale_by_low_rank_projection`), ``'blocks'``, ``'coordinates'``, ``'rows'`` or
            ``'columns'`` (above). Static.
        block_order: ``'blocks'`` only: ``'random'``, ``'ascending'``, ``'descending'`` or
            ``'mirror'`` (above). Static.
        side, matrix_spec, fallback, stagger, layout, seed, oversample, power_iters: As in
            `scale_by_low_rank_projection`; `side`, `layout`, `oversample` and `power_iters`
            concern the basis projectors only; `stagger` is not available with ``'blocks'``.

    Returns:
        A transform whose state is `ScaleByFrugalState`.

    Raises:
        ValueError, TypeError: for invalid hyper-parameters (at construction) or matrix specs
            (at `init`).

    Notes:
        Block mode chooses a static number of matrices per group of same-shape matrices (the
        reference draws ``K`` among all projectable tensors), so that the state is exactly
        ``k_g`` stacked matrices per group: Adam's state is ``2 × (state-full coordinates)``
        floats. The block orders' semantics above are cljax's reading of the card.

    Example:
        >>> tx = cljax.scale_by_frugal(density=0.5, refresh_every=10)
        >>> state = tx.init({"w": jnp.ones((8, 4))})
        >>> blocks = cljax.scale_by_frugal(projector="blocks", density=0.5)
        >>> blocks.init({"k": jnp.ones((4, 8, 4))}).inner[0].mu.shape
        (2, 8, 4)

    References:
        Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
        Scalable Training", 2024. https://arxiv.org/abs/2411.07837
    """
    fn = "scale_by_frugal"
    inner = optax.scale_by_adam() if inner is None else inner
    _checks.check_choice(fn, "projector", projector, _PROJECTORS)
    _check_common(
        fn,
        inner,
        fallback,
        refresh_every,
        side,
        "svd" if projector in SUBSET_PROJECTORS else projector,
        "keep",
        layout,
        matrix_spec,
        stagger,
        seed,
        oversample,
        power_iters,
    )
    _checks.check_choice(fn, "block_order", block_order, BLOCK_ORDERS)
    if projector == "blocks" and stagger:
        raise ValueError(
            f"{fn}(stagger=True) is not available with projector='blocks': all blocks switch "
            "together. Use stagger=False."
        )
    _checks.check_choice(fn, "inactive_update", inactive_update, _INACTIVE)
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{fn}(density=...) must be a float, got {density!r}.")
    _checks.check_in_range(fn, "density", density, 0.0, 1.0, low_inclusive=False)
    _checks.check_in_range(fn, "inactive_scale", inactive_scale, 0.0)
    if not callable(scale):
        _checks.check_in_range(fn, "scale", scale)
    if not isinstance(reset_statistics, bool):
        raise TypeError(f"{fn}(reset_statistics=...) must be a bool, got {reset_statistics!r}.")
    if projector in SUBSET_PROJECTORS:
        return subset_core(
            fn,
            ScaleByFrugalState,
            inner=inner,
            fallback=inner if fallback is None else fallback,
            density=float(density),
            refresh_every=refresh_every,
            scale=scale,
            projector=projector,
            block_order=block_order,
            reset_statistics=reset_statistics,
            matrix_spec=matrix_spec,
            stagger=stagger,
            seed=seed,
            residual=inactive_update,
            residual_scale=inactive_scale,
        )
    if power_iters is None:
        power_iters = 2
    return _low_rank_core(
        fn,
        ScaleByFrugalState,
        inner=inner,
        fallback=inner if fallback is None else fallback,
        rank_fn=lambda m, n: max(1, min(round(density * min(m, n)), min(m, n))),
        refresh_every=refresh_every,
        scale=scale,
        side=side,
        projector=projector,
        on_refresh="reset" if reset_statistics else "keep",
        matrix_spec=matrix_spec,
        stagger=stagger,
        layout=layout,
        seed=seed,
        oversample=oversample,
        power_iters=power_iters,
        projector_optimizer=None,
        reorthonormalize=False,
        residual=inactive_update if inactive_update != "none" else "none",
        residual_scale=inactive_scale,
    )
