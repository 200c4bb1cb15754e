"""FRUGAL (LR-02): a state-full low-rank part and a state-free residual of each matrix gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import optax

from cljax import _checks
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


class ScaleByFrugalState(NamedTuple):
    """State of `scale_by_frugal`; the fields are those of `ScaleByLowRankProjectionState`."""

    count: chex.Array
    key: chex.Array
    projector: optax.Params
    inner: optax.Params
    fallback: optax.OptState
    projector_opt: optax.Params


def scale_by_frugal(
    inner: optax.GradientTransformation | None = None,
    *,
    density: float = 0.25,
    refresh_every: int = 200,
    scale: optax.ScalarOrSchedule = 1.0,
    inactive_update: InactiveUpdate = "sign_sgd",
    inactive_scale: chex.Numeric = 1.0,
    reset_statistics: bool = True,
    projector: Literal["svd", "randomized", "random"] = "svd",
    side: Side = "std",
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    fallback: optax.GradientTransformation | None = None,
    stagger: bool = False,
    layout: Layout = "flax",
    seed: int = 0,
    oversample: int = 8,
    power_iters: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """FRUGAL: `inner` on a low-rank part of each matrix gradient, a state-free rule on the rest.

    Per matrix view ``G`` with basis ``P`` (as in `scale_by_low_rank_projection`, rank
    ``r = max(1, round(density · min(m, n)))``): ``N = inner(down(G))`` and the residual
    ``E = G − up(down(G))`` give the direction
    ``scale · (up(N) + inactive_scale · f(E))`` with ``f = sign`` (``'sign_sgd'``), the identity
    (``'sgd'``) or zero (``'none'``); ``sign(0) = 0``. With `reset_statistics` a refresh
    re-initialises `inner` (moments and step count, so bias correction restarts). Other leaves
    get `fallback` with full state. Place it before `optax.scale_by_learning_rate`.

    Args:
        inner: State-full transform on the projected gradients (default `optax.scale_by_adam()`).
        density: Fraction of each matrix's smaller dimension kept state-full. Static.
        refresh_every: Steps between basis refreshes. Static.
        scale: The projected parameters' factor ``s_p`` (``proj_params_lr_scale``).
        inactive_update: State-free rule on the residual. Static.
        inactive_scale: Factor ``s_free`` on the state-free part (1.0 pre-training, 0.1
            fine-tuning in the reference).
        reset_statistics: Re-initialise `inner`'s state at every refresh. Static.
        projector: ``'svd'``, ``'randomized'`` or ``'random'`` (see
            `scale_by_low_rank_projection`). Static.
        side, matrix_spec, fallback, stagger, layout, seed, oversample, power_iters: As in
            `scale_by_low_rank_projection`.

    Returns:
        A transform whose state is `ScaleByFrugalState`.

    Notes:
        The reference's default projector picks whole tensors (BAdam-like blocks); cljax offers
        the SVD, randomized and random projectors (the reference's 'svd' and random-subspace
        modes), with rank from `density` as above.

    Example:
        >>> tx = cljax.scale_by_frugal(density=0.5, refresh_every=10)
        >>> state = tx.init({"w": jnp.ones((8, 4))})

    References:
        Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
        Scalable Training", 2024. https://arxiv.org/abs/2411.07837
    """
    fn = "scale_by_frugal"
    inner = optax.scale_by_adam() if inner is None else inner
    _check_common(
        fn,
        inner,
        fallback,
        refresh_every,
        side,
        projector,
        "keep",
        layout,
        matrix_spec,
        stagger,
        seed,
        oversample,
        power_iters,
    )
    _checks.check_choice(fn, "projector", projector, ("svd", "randomized", "random"))
    _checks.check_choice(fn, "inactive_update", inactive_update, _INACTIVE)
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{fn}(density=...) must be a float, got {density!r}.")
    _checks.check_in_range(fn, "density", density, 0.0, 1.0, low_inclusive=False)
    _checks.check_in_range(fn, "inactive_scale", inactive_scale, 0.0)
    if not callable(scale):
        _checks.check_in_range(fn, "scale", scale)
    if not isinstance(reset_statistics, bool):
        raise TypeError(f"{fn}(reset_statistics=...) must be a bool, got {reset_statistics!r}.")
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
