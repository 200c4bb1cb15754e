"""Ready-made optimizers of the low-rank family: GaLore-AdamW, FRUGAL, Online Subspace Descent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import chex
import optax

from cljax.transforms.low_rank.dion import scale_by_dion
from cljax.transforms.low_rank.frugal import BlockOrder, FrugalProjector, scale_by_frugal
from cljax.transforms.low_rank.projection import (
    InactiveUpdate,
    Layout,
    OnRefresh,
    Projector,
    Side,
    _adam_inner,
    scale_by_low_rank_projection,
)
from cljax.tree import MatrixSpec

__all__ = ["dion", "frugal", "galore_adamw", "online_subspace_descent"]


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    refresh_every: int = 200,
    scale: optax.ScalarOrSchedule = 0.25,
    side: Side = "std",
    projector: Projector = "svd",
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    eps_root: chex.Numeric = 0.0,
    mu_dtype: Any = None,
    on_refresh: OnRefresh = "keep",
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    stagger: bool = False,
    layout: Layout = "flax",
    seed: int = 0,
    oversample: int = 8,
    power_iters: int | None = None,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> optax.GradientTransformationExtraArgs:
    """GaLore-AdamW: Adam on rank-`rank` projected matrix gradients, plus decoupled decay.

    ``chain(scale_by_low_rank_projection(scale_by_adam(b1, b2, eps), rank=..., scale=...),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``: the update
    is ``u = −η (α D + λ W)``, decay on the full weight. Leaves that are not matrices get plain
    Adam.

    Args:
        learning_rate: Learning rate ``η`` or a schedule.
        rank, refresh_every, scale, side, projector, on_refresh, matrix_spec, stagger, layout,
            seed, oversample, power_iters: As in `cljax.scale_by_low_rank_projection`; the
            defaults are the reference GaLore's 60M recipe (``rank=128, T=200, α=0.25``,
            ``side='std'``).
        b1, b2, eps, eps_root, mu_dtype: As in `optax.scale_by_adam`.
        weight_decay, mask: As in `optax.add_decayed_weights`.
        impl: As in `cljax.scale_by_low_rank_projection`: ``'pallas'`` runs each matrix leaf's
            projection, Adam step and back-projection as the fused kernel
            `cljax.kernels.galore_adam_step`; ``'auto'`` (default) only where a measured win is
            recorded (none yet: XLA). Static.

    Example:
        >>> opt = cljax.galore_adamw(1e-2, rank=2, refresh_every=10)
        >>> state = opt.init({"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)})

    Notes:
        The reference's Adam adds ``eps`` to the uncorrected ``sqrt(v)`` and decays the already
        updated weight; optax's Adam and decay differ from it by ``O(eps)`` early in training and
        ``O(η² λ)``.

    References:
        Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
        ICML 2024. https://arxiv.org/abs/2403.03507
    """
    return optax.chain(
        scale_by_low_rank_projection(
            _adam_inner(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
            rank=rank,
            refresh_every=refresh_every,
            scale=scale,
            side=side,
            projector=projector,
            on_refresh=on_refresh,
            matrix_spec=matrix_spec,
            stagger=stagger,
            layout=layout,
            seed=seed,
            oversample=oversample,
            power_iters=power_iters,
            impl=impl,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    refresh_every: int = 200,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    inactive_update: InactiveUpdate = "sign_sgd",
    inactive_scale: chex.Numeric = 1.0,
    scale: optax.ScalarOrSchedule = 1.0,
    reset_statistics: bool = True,
    projector: FrugalProjector = "svd",
    block_order: BlockOrder = "random",
    side: Side = "std",
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    stagger: bool = False,
    layout: Layout = "flax",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """FRUGAL: Adam on part of each matrix gradient, signSGD on the rest, AdamW decay.

    ``chain(scale_by_frugal(scale_by_adam(b1, b2, eps), ...), add_decayed_weights(weight_decay,
    mask), scale_by_learning_rate(learning_rate))``: decay reaches every parameter, projected or
    not, as in the reference. Leaves that are not matrices get plain Adam.

    Args:
        learning_rate: Learning rate or schedule.
        density, refresh_every, inactive_update, inactive_scale, scale, reset_statistics,
            projector, block_order, side, matrix_spec, stagger, layout, seed: As in
            `cljax.scale_by_frugal` (``projector='blocks'`` is the reference's default FRUGAL;
            the default here stays ``'svd'``).
        b1, b2, eps: As in `optax.scale_by_adam`.
        weight_decay, mask: As in `optax.add_decayed_weights`.

    Example:
        >>> opt = cljax.frugal(1e-3, density=0.5, refresh_every=10)
        >>> blocks = cljax.frugal(1e-3, projector="blocks", block_order="ascending")

    References:
        Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
        Scalable Training", 2024. https://arxiv.org/abs/2411.07837
    """
    return optax.chain(
        scale_by_frugal(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            density=density,
            refresh_every=refresh_every,
            scale=scale,
            inactive_update=inactive_update,
            inactive_scale=inactive_scale,
            reset_statistics=reset_statistics,
            projector=projector,
            block_order=block_order,
            side=side,
            matrix_spec=matrix_spec,
            stagger=stagger,
            layout=layout,
            seed=seed,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def online_subspace_descent(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    refresh_every: int = 200,
    scale: optax.ScalarOrSchedule = 0.25,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    side: Side = "std",
    projector_weight_decay: chex.Numeric = 0.01,
    projector_optimizer: optax.GradientTransformation | None = None,
    reorthonormalize: bool = False,
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    layout: Layout = "flax",
) -> optax.GradientTransformationExtraArgs:
    """Online Subspace Descent: GaLore-AdamW whose bases follow an online-PCA step every step.

    The basis starts from an SVD at step 0; after each step it takes one AdamW step (weight decay
    `projector_weight_decay`, PyTorch's default, as in the reference) on ``‖P Pᵀ Ĝ − Ĝ‖²`` with
    learning rate ``(1 / refresh_every) · η_t / η_0``, tracking the main schedule.

    Args:
        learning_rate: Learning rate ``η`` or a schedule.
        rank, scale, side, matrix_spec, layout, reorthonormalize: As in
            `cljax.scale_by_low_rank_projection` with ``projector='online_pca'``.
        refresh_every: ``T`` of the projector learning rate ``1/T``. Static.
        b1, b2, eps: As in `optax.scale_by_adam`.
        weight_decay, mask: As in `optax.add_decayed_weights`.
        projector_weight_decay: AdamW decay of the basis.
        projector_optimizer: Replaces the default projector AdamW (then `refresh_every` and
            `projector_weight_decay` do not set its learning rate and decay).

    Example:
        >>> opt = cljax.online_subspace_descent(1e-2, rank=2)

    References:
        Liang et al., "Memory-Efficient LLM Training with Online Subspace Descent", 2024.
        https://arxiv.org/abs/2408.12857
    """
    if callable(learning_rate):
        first = learning_rate(0)
        projector_lr = lambda count: learning_rate(count) / (first * refresh_every)  # noqa: E731
    else:
        projector_lr = 1.0 / refresh_every
    return optax.chain(
        scale_by_low_rank_projection(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            rank=rank,
            refresh_every=refresh_every,
            scale=scale,
            side=side,
            projector="online_pca",
            matrix_spec=matrix_spec,
            layout=layout,
            projector_optimizer=(
                optax.adamw(projector_lr, weight_decay=projector_weight_decay)
                if projector_optimizer is None
                else projector_optimizer
            ),
            reorthonormalize=reorthonormalize,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def dion(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    mu: chex.Numeric = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Dion: low-rank orthonormalized updates for matrices, Adam for the rest, decoupled decay.

    ``chain(scale_by_dion(rank, mu, fallback=scale_by_adam(b1, b2, eps)),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``:
    ``u = −η (sqrt(max(1, m/n)) P Qᵀ + λ W)`` on matrices.

    Args:
        learning_rate: Learning rate or schedule.
        rank, mu, matrix_spec, seed: As in `cljax.scale_by_dion`.
        weight_decay, mask: As in `optax.add_decayed_weights`.
        b1, b2, eps: Adam's, for the non-matrix leaves.

    Example:
        >>> opt = cljax.dion(1e-2, rank=2)

    References:
        Ahn et al., "Dion: Distributed Orthonormalized Updates", 2025.
        https://arxiv.org/abs/2504.05295
    """
    return optax.chain(
        scale_by_dion(
            rank,
            mu,
            matrix_spec=matrix_spec,
            fallback=optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            seed=seed,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
