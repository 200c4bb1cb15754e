"""WISE: lifelong editing in a side memory, with random-mask knowledge shards merged by TIES.

WISE edits a copy ``W'_v`` (the side memory) of one FFN value (down-projection) matrix and
leaves the pre-trained ``W_v`` (the main memory) alone. Edits come in groups; group ``i`` (a
knowledge shard) trains the side memory from its starting value under a random element mask of
density ``ρ`` drawn from ``fold_in(key, i)``, and the shards are merged by TIES into one side
memory. At inference a router sends an input to the side memory when its activation score
``‖A(x) (W'_v − W_v)‖₂`` is large.

The optimizer side composes existing pieces: `mask_updates` (the shard's mask in state, bit
packed) with the masks of `wise_shard_masks`, and `mask_updates_set` to move to the next shard.

* `wise_shard_masks` — shard ``i``'s masks, regenerated bit for bit from the key and ``i``.
* `wise_merge` — the TIES merge of the shards' edits onto the side memory they started from.
* `wise_activation_score` — the routing score of the side memory for given activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cljax import _checks
from cljax.transforms.merging.task_vectors import ties_merge
from cljax.transforms.sparse import _common
from cljax.transforms.sparse.masks import random_mask

__all__ = [
    "wise_activation_score",
    "wise_merge",
    "wise_shard_masks",
]


def wise_shard_masks(
    params: Any, density: float, key: jax.Array, shard: int, *, targets: Any = None
) -> Any:
    """Returns the random element masks of knowledge shard `shard` (WISE).

    Each targeted leaf gets exactly ``ceil(density · size)`` ones, uniformly at random, from
    ``cljax.random_mask(..., fold_in(key, shard))``: the same key and shard give the same masks
    bit for bit (nothing needs storing between shards), and different shards overlap only by
    chance (about ``density²`` of the entries). Leaves that are not targets get all-False masks,
    which `mask_updates` freezes without optimizer state.

    Train a shard with ``cljax.mask_updates(optimizer, masks)``; move to the next shard with
    ``cljax.mask_updates_set(opt_state, wise_shard_masks(..., shard + 1))`` after saving the
    shard's side memory and resetting it to the shard's starting value.

    Args:
        params: The side-memory parameters (only shapes are read).
        density: ``ρ``, the fraction of each leaf a shard may change, in (0, 1].
        key: PRNG key shared by all shards.
        shard: Index of the shard (an int or a traced int32).
        targets: Which leaves are side memory: a bool tree or a function of the parameters; None
            targets every leaf.

    Returns:
        A tree of boolean arrays with the structure of `params`.

    Raises:
        ValueError: a density outside (0, 1]; a `targets` tree that misses a leaf.

    Example:
        >>> masks = cljax.wise_shard_masks({"w": jnp.zeros((4, 4))}, 0.25, jax.random.key(0), 1)
        >>> int(masks["w"].sum())
        4

    References:
        Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
        Language Models", NeurIPS 2024. https://arxiv.org/abs/2405.14768
    """
    fn = "wise_shard_masks"
    _checks.check_in_range(fn, "density", density, 0.0, 1.0, low_inclusive=False)
    chosen = _common.bool_tree(fn, "targets", targets, params)
    masks = random_mask(params, density, jax.random.fold_in(key, shard))
    return jax.tree.map(
        lambda m, take: None if m is None else (m if take else jnp.zeros_like(m)),
        masks,
        chosen,
        is_leaf=_common.is_none,
    )


def wise_merge(
    start: Any,
    shards: Sequence[Any],
    *,
    density: float = 1.0,
    weights: Any = None,
) -> Any:
    """Merges knowledge shards into one side memory with TIES (WISE).

    Returns ``start + TIES(shard_1 − start, …, shard_k − start)``: trim each shard's edit to its
    `density` largest-magnitude entries (1 keeps all), elect a sign per entry, and average the
    agreeing edits (`cljax.ties_merge` with ``sign='total'``). Edits on disjoint masks do not
    interact, so they are kept as they are: the merge of disjoint shards is their sum.

    Args:
        start: The side memory every shard started from (a copy of ``W_v``, or the previous
            merge).
        shards: The side memories after training each shard.
        density: Kept fraction of each edit for the TIES trim, in (0, 1]. Static.
        weights: Per-shard weights (None: 1 each).

    Returns:
        The merged side memory, in the dtypes of `start`.

    Raises:
        ValueError: `shards` empty, or trees whose structures or shapes differ from `start`.

    Example:
        >>> start = {"w": jnp.zeros(3)}
        >>> shards = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([0.0, 2.0, 0.0])}]
        >>> cljax.wise_merge(start, shards)["w"]
        Array([1., 2., 0.], dtype=float32)

    References:
        Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
        Language Models", NeurIPS 2024. https://arxiv.org/abs/2405.14768
    """
    fn = "wise_merge"
    if not isinstance(shards, (list, tuple)) or not shards:
        raise ValueError(
            f"{fn}: `shards` is empty or not a list; pass the trained side memories of every shard."
        )
    for shard in shards:
        _checks.check_same_structure(fn, start=start, shard=shard)
    edits = [
        jax.tree.map(lambda s, b: s.astype(jnp.float32) - b.astype(jnp.float32), shard, start)
        for shard in shards
    ]
    merged = ties_merge(edits, weights, density=density, sign="total")
    return jax.tree.map(lambda b, e: (b.astype(jnp.float32) + e).astype(b.dtype), start, merged)


def wise_activation_score(activations: jax.Array, side: jax.Array, main: jax.Array) -> jax.Array:
    """Returns WISE's routing score ``‖A(x) (W'_v − W_v)‖₂`` for each activation vector.

    The score is large when the side memory changes the layer's output for `activations`
    (in-scope inputs, routed to the side memory) and small otherwise; the router compares it
    with a threshold. Computed in float32.

    Args:
        activations: ``A(x)``, inputs of the value matrix, ``(..., d_in)`` (one per token).
        side: ``W'_v``, ``(d_in, d_out)`` (Flax layout: ``y = A W``).
        main: ``W_v``, of the same shape.

    Returns:
        float32 scores of shape ``(...)``, one per activation vector; reduce over tokens as the
        router needs.

    Raises:
        ValueError: matrices that are not 2-D or differ in shape, or activations whose last dim
            is not ``d_in``.

    Notes:
        The reference implementation scores ``‖σ(A W'_v) − σ(A W_v)‖₂`` with the model's
        activation function ``σ`` and averages over tokens; the card and the paper define the
        linear score computed here.

    Example:
        >>> cljax.wise_activation_score(jnp.ones((2, 3)), jnp.eye(3), jnp.zeros((3, 3)))
        Array([1.7320508, 1.7320508], dtype=float32)

    References:
        Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
        Language Models", NeurIPS 2024. https://arxiv.org/abs/2405.14768
    """
    fn = "wise_activation_score"
    if jnp.ndim(side) != 2 or jnp.shape(side) != jnp.shape(main):
        raise ValueError(
            f"{fn}: `side` has shape {jnp.shape(side)} and `main` {jnp.shape(main)}; both must be the same "
            "(d_in, d_out) matrix."
        )
    if jnp.ndim(activations) < 1 or jnp.shape(activations)[-1] != jnp.shape(side)[0]:
        raise ValueError(
            f"{fn}: `activations` has shape {jnp.shape(activations)}; its last dim must be d_in = {jnp.shape(side)[0]}."
        )
    delta = jnp.asarray(side, jnp.float32) - jnp.asarray(main, jnp.float32)
    return jnp.linalg.norm(jnp.asarray(activations, jnp.float32) @ delta, axis=-1)
