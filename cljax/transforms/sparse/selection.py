"""Layer, module and row selection: MIGU (SP-14), bottom-layer freezing (SP-22), surgical
fine-tuning by Fisher layer scores (SP-15) and FPF (SP-16).

* `migu` — per step, only the output rows of each layer whose output magnitudes on the current
  batch are large get updated (the mask is recomputed every step from the activations passed in).
* `freeze_bottom_layers` — embeddings and the first blocks are frozen without optimizer state.
* `surgical_layer_scores` / `surgical_fine_tuning` — layer sums of a diagonal Fisher, and a
  transform that trains only the top-scored layers.
* `fpf` — trains only a chosen set of (forgetting-prone) modules.

The three fixed selections share one mechanism: a frozen leaf is replaced by `optax.MaskedNode`
before the inner optimizer (no state) and gets ``u = 0``; a stacked leaf ``(N_L, ...)`` whose
layers are partly frozen is sliced with static indices, so its inner state holds the trained
layers only (as LISA's, SP-04).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cljax import _checks
from cljax.transforms.sparse import _common

__all__ = [
    "FpfState",
    "FreezeBottomLayersState",
    "MiguState",
    "SurgicalFineTuningState",
    "freeze_bottom_layers",
    "fpf",
    "migu",
    "surgical_fine_tuning",
    "surgical_layer_scores",
]

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# A fixed trainable subset of leaves and stacked layers.
#
# A plan has one entry per flattened leaf (None leaves included): True (train), False (frozen) or
# a tuple of layer indices along axis 0 (train those layers of a stacked leaf).


def _flat(tree: Any) -> tuple[list, Any]:
    return jax.tree.flatten(tree, is_leaf=_common.is_none)


def _reduce(tree: Any, plan: list) -> Any:
    """The part of `tree` the inner optimizer sees: frozen leaves become `optax.MaskedNode`."""
    if tree is None:
        return None
    leaves, treedef = _flat(tree)
    out = []
    for x, entry in zip(leaves, plan, strict=True):
        if x is None or entry is True:
            out.append(x)
        elif entry is False:
            out.append(optax.MaskedNode())
        else:
            out.append(jnp.take(x, np.asarray(entry, np.int32), axis=0))
    return jax.tree.unflatten(treedef, out)


def _expand(reduced: Any, like: Any, plan: list) -> Any:
    """Updates of the full tree: zeros for frozen leaves and layers."""
    leaves, treedef = _flat(like)
    got = jax.tree.leaves(reduced, is_leaf=_common.is_none)
    it = iter(got)
    out = []
    for g, entry in zip(leaves, plan, strict=True):
        if g is None:
            out.append(next(it))  # a None leaf stays None
        elif entry is True:
            out.append(next(it))
        elif entry is False:
            out.append(jnp.zeros_like(g))
        else:
            u = next(it)
            out.append(jnp.zeros_like(g).at[np.asarray(entry, np.int32)].set(u.astype(g.dtype)))
    return jax.tree.unflatten(treedef, out)


def _layer_plan(fn: str, layers: Any, stacked: Any, params: Any, train) -> list:
    """Per flattened leaf: True, False or a tuple of trained layer indices.

    `train(label)` says whether a layer trains: an unstacked leaf labelled `label` is one layer,
    row `i` of a stacked leaf labelled `label` is the layer ``(label, i)``; leaves labelled None
    are in no layer (`train(None)` decides for them).
    """
    labels = _common.label_tree(fn, "layers", layers, params)
    flags = _stacked_flags(fn, stacked, params)
    plan = []
    for (path, p), label, is_stacked in zip(
        jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0],
        _leaves_like(labels, params),
        _leaves_like(flags, params),
        strict=True,
    ):
        if p is None:
            plan.append(True)
        elif is_stacked and label is not None:
            _check_stackable(fn, path, p)
            n = jnp.shape(p)[0]
            rows = tuple(i for i in range(n) if train((label, i)))
            plan.append(True if len(rows) == n else (rows if rows else False))
        else:
            plan.append(bool(train(label)))
    return plan


def _leaves_like(tree: Any, like: Any) -> list:
    """The entries of `tree` (a label or flag tree built from `like`) in `like`'s leaf order;
    labels that are themselves tuples stay whole."""
    return jax.tree.structure(like, is_leaf=_common.is_none).flatten_up_to(tree)


def _stacked_flags(fn: str, stacked: Any, params: Any) -> Any:
    if stacked is None:
        return jax.tree.map(lambda p: None if p is None else False, params, is_leaf=_common.is_none)
    return _common.bool_tree(fn, "stacked", stacked, params)


def _check_stackable(fn: str, path, p) -> None:
    if jnp.ndim(p) == 0:
        raise ValueError(
            f"{fn}: leaf '{_common.path_name(path) or '<root>'}' is a scalar; stacked leaves need "
            "a leading layer axis."
        )


def _subset_transform(fn: str, inner: optax.GradientTransformation, plan_of, state_cls):
    """Runs `inner` on the trained part of the tree only (see `_reduce`); frozen parts get 0."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return state_cls(inner_state=inner.init(_reduce(params, plan_of(params))))

    def update_fn(updates, state, params=None, **extra_args):
        plan = plan_of(updates)
        directions, inner_state = inner.update(
            _reduce(updates, plan), state.inner_state, _reduce(params, plan), **extra_args
        )
        return _expand(directions, updates, plan), state_cls(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# SP-22: freeze the bottom layers.


class FreezeBottomLayersState(NamedTuple):
    """State of `freeze_bottom_layers`."""

    inner_state: Any  # state of `inner` for the trained leaves and layers only


def freeze_bottom_layers(
    inner: optax.GradientTransformation,
    *,
    num_frozen: int,
    depth: Any,
    stacked: Any = None,
    embeddings: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Freezes the embeddings and the first `num_frozen` blocks; the rest trains with `inner`.

    `depth` gives each leaf its block index (an int; None for leaves outside the blocks: head,
    final norm). A leaf of depth ``d < num_frozen`` is frozen; a `stacked` leaf ``(N_L, ...)``
    holds blocks ``d + i`` along its leading axis (``d`` None counts as 0), and its blocks below
    `num_frozen` are frozen. Leaves selected by `embeddings` are frozen whatever their depth.
    Frozen leaves get ``u = 0`` and no optimizer state; a partly frozen stack gets state for its
    trained blocks only.

    Tied input and output embeddings are one leaf in JAX, so they are frozen or trained
    together.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        num_frozen: Number of bottom blocks frozen (``L_f``), ``>= 0``. Static.
        depth: A label tree or a function of the params: one int block index (or None) per
            leaf. Static.
        stacked: A bool tree or a function of the params: leaves with a leading block axis.
            None: no stacked leaves. Static.
        embeddings: A bool tree or a function of the params: leaves frozen as embeddings.
            None: embeddings (if any) follow `depth`. Static.

    Returns:
        A transform whose state is `FreezeBottomLayersState`.

    Raises:
        TypeError: a depth that is not an int or None.
        ValueError: a negative depth; a scalar stacked leaf; `num_frozen` below 0.

    Example:
        >>> params = {"embed": jnp.ones((8, 4)), "blocks": jnp.ones((3, 4, 4)), "head": jnp.ones(4)}
        >>> tx = cljax.freeze_bottom_layers(optax.adam(1e-3), num_frozen=1,
        ...     depth=lambda p: {"embed": None, "blocks": 0, "head": None},
        ...     stacked=cljax.select("blocks"), embeddings=cljax.select("embed"))
        >>> tx.init(params).inner_state[0].mu["blocks"].shape
        (2, 4, 4)

    References:
        Zheng et al., "Spurious Forgetting in Continual Learning of Language Models", ICLR 2025.
        https://arxiv.org/abs/2501.13453
    """
    fn = "freeze_bottom_layers"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "num_frozen", num_frozen, 0)

    def plan_of(params):
        depths = _common.label_tree(fn, "depth", depth, params)
        frozen_embed = (
            _common.bool_tree(fn, "embeddings", embeddings, params)
            if embeddings is not None
            else jax.tree.map(
                lambda p: None if p is None else False, params, is_leaf=_common.is_none
            )
        )
        flags = _stacked_flags(fn, stacked, params)
        plan = []
        for (path, p), d, e, s in zip(
            jax.tree_util.tree_flatten_with_path(params, is_leaf=_common.is_none)[0],
            _leaves_like(depths, params),
            _leaves_like(frozen_embed, params),
            _leaves_like(flags, params),
            strict=True,
        ):
            if p is None:
                plan.append(True)
                continue
            name = _common.path_name(path) or "<root>"
            if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer))):
                raise TypeError(
                    f"{fn}: `depth` of leaf '{name}' must be an int or None, got {d!r}."
                )
            if d is not None and d < 0:
                raise ValueError(f"{fn}: `depth` of leaf '{name}' must be >= 0, got {d}.")
            if e:
                plan.append(False)
            elif s:
                _check_stackable(fn, path, p)
                start = 0 if d is None else int(d)
                n = jnp.shape(p)[0]
                rows = tuple(i for i in range(n) if start + i >= num_frozen)
                plan.append(True if len(rows) == n else (rows if rows else False))
            else:
                plan.append(d is None or d >= num_frozen)
        return plan

    return _subset_transform(fn, inner, plan_of, FreezeBottomLayersState)


# ---------------------------------------------------------------------------------------------
# SP-15: surgical fine-tuning by Fisher layer scores.


def surgical_layer_scores(
    fisher: Any, *, layers: Any, stacked: Any = None
) -> dict[Hashable, jax.Array]:
    """Sums a diagonal Fisher over each layer: ``score_l = sum_{theta in l} F_theta``.

    `fisher` is a diagonal Fisher (``mean (d log p(y|x) / d theta)^2`` over examples, e.g. from
    `cljax.fisher_diagonal`; the estimator, empirical or true, is chosen there). Leaves with the
    same label in `layers` form one layer; row ``i`` of a `stacked` leaf labelled ``l`` is the
    layer ``(l, i)``. Leaves labelled None are not scored.

    Args:
        fisher: A tree of non-negative arrays (the parameters' structure).
        layers: A label tree or a function of the tree: one hashable label (or None) per leaf.
        stacked: A bool tree or a function: leaves with a leading layer axis. None: none.

    Returns:
        ``{layer: float32 score}``, layers in tree order (first appearance).

    Raises:
        ValueError: a label tree missing a leaf; a scalar stacked leaf.

    Example:
        >>> fisher = {"a": jnp.ones(2), "b": jnp.full(3, 2.0)}
        >>> scores = cljax.surgical_layer_scores(fisher, layers={"a": "a", "b": "b"})
        >>> {k: float(v) for k, v in scores.items()}
        {'a': 2.0, 'b': 6.0}

    References:
        Lodha et al., "On Surgical Fine-tuning for Language Encoders", Findings of EMNLP 2023.
        https://arxiv.org/abs/2310.17041
    """
    fn = "surgical_layer_scores"
    labels = _common.label_tree(fn, "layers", layers, fisher)
    flags = _stacked_flags(fn, stacked, fisher)
    scores: dict[Hashable, jax.Array] = {}
    for (path, f), label, s in zip(
        jax.tree_util.tree_flatten_with_path(fisher, is_leaf=_common.is_none)[0],
        _leaves_like(labels, fisher),
        _leaves_like(flags, fisher),
        strict=True,
    ):
        if f is None or label is None:
            continue
        f = jnp.asarray(f, _F32)
        if s:
            _check_stackable(fn, path, f)
            per_row = jnp.sum(f.reshape(f.shape[0], -1), axis=1)
            for i in range(f.shape[0]):
                key = (label, i)
                scores[key] = scores.get(key, jnp.zeros([], _F32)) + per_row[i]
        else:
            scores[label] = scores.get(label, jnp.zeros([], _F32)) + jnp.sum(f)
    return scores


class SurgicalFineTuningState(NamedTuple):
    """State of `surgical_fine_tuning`."""

    inner_state: Any  # state of `inner` for the selected layers only


def _top_layers(fn: str, scores: Mapping, num_layers: int) -> frozenset:
    """The `num_layers` highest scores; ties go to the earlier layer (mapping order)."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(
            f"{fn}(scores=...) must be a non-empty mapping layer -> score, got {scores!r}."
        )
    if num_layers > len(scores):
        raise ValueError(
            f"{fn}(num_layers={num_layers}) must be <= the number of scored layers {len(scores)}."
        )
    names = list(scores)
    values = []
    for name in names:
        try:
            value = float(scores[name])
        except (TypeError, jax.errors.ConcretizationTypeError) as err:
            raise TypeError(
                f"{fn}: the score of layer {name!r} must be a concrete number, got {scores[name]!r}."
            ) from err
        if not np.isfinite(value):
            raise ValueError(
                f"{fn}: the score of layer {name!r} is {value}; scores must be finite."
            )
        values.append(value)
    order = sorted(range(len(names)), key=lambda i: (-values[i], i))
    return frozenset(names[i] for i in order[:num_layers])


def surgical_fine_tuning(
    inner: optax.GradientTransformation,
    *,
    scores: Mapping[Hashable, Any],
    num_layers: int,
    layers: Any,
    stacked: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Trains only the `num_layers` layers with the highest Fisher scores; the rest is frozen.

    `scores` comes from `surgical_layer_scores` (computed once, before fine-tuning, on the
    target task). The selection is made when the transform is built: the top `num_layers`
    scores, ties to the earlier layer. Leaves of unselected layers and leaves labelled None get
    ``u = 0`` and no optimizer state; a `stacked` leaf keeps state for its selected rows only.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        scores: ``{layer: score}`` with concrete values. Static.
        num_layers: Number of layers trained (``k``), ``1 <= num_layers <= len(scores)``. Static.
        layers: The label tree or function used for `surgical_layer_scores`. Static.
        stacked: As in `surgical_layer_scores`. Static.

    Returns:
        A transform whose state is `SurgicalFineTuningState`.

    Raises:
        ValueError: empty scores, non-finite scores, ``num_layers > len(scores)``.
        TypeError: traced scores.

    Example:
        >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
        >>> tx = cljax.surgical_fine_tuning(optax.sgd(0.1), scores={"a": 1.0, "b": 5.0},
        ...     num_layers=1, layers={"a": "a", "b": "b"})
        >>> updates, _ = tx.update({"a": jnp.ones(2), "b": jnp.ones(3)}, tx.init(params))
        >>> updates["a"].tolist(), updates["b"].tolist()
        ([0.0, 0.0], [-0.1..., -0.1..., -0.1...])

    References:
        Lodha et al., "On Surgical Fine-tuning for Language Encoders", Findings of EMNLP 2023.
        https://arxiv.org/abs/2310.17041
    """
    fn = "surgical_fine_tuning"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_int(fn, "num_layers", num_layers, 1)
    chosen = _top_layers(fn, scores, num_layers)

    def plan_of(params):
        return _layer_plan(fn, layers, stacked, params, lambda label: label in chosen)

    return _subset_transform(fn, inner, plan_of, SurgicalFineTuningState)


# ---------------------------------------------------------------------------------------------
# SP-16: FPF.


class FpfState(NamedTuple):
    """State of `fpf`."""

    inner_state: Any  # state of `inner` for the selected modules only


def fpf(
    inner: optax.GradientTransformation, *, modules: Any
) -> optax.GradientTransformationExtraArgs:
    """Fine-tunes only the selected (forgetting-prone) modules; every other leaf is frozen.

    The optimizer of an FPF round: after training with any continual-learning method (FPF) or
    `k` times during training instead of replay at every step (k-FPF), the runner trains the
    selected modules on the replay buffer with this transform (a fresh state per round). Which
    modules are forgetting-prone depends on the architecture and is the caller's choice.
    Unselected leaves get ``u = 0`` and no optimizer state.

    Args:
        inner: Any optax transformation.
        modules: A bool tree or a function of the params: the leaves trained. Static.

    Returns:
        A transform whose state is `FpfState`.

    Example:
        >>> params = {"conv": jnp.ones((3, 3)), "fc": jnp.ones(2)}
        >>> tx = cljax.fpf(optax.sgd(0.1), modules=cljax.select("fc"))
        >>> updates, _ = tx.update({"conv": jnp.ones((3, 3)), "fc": jnp.ones(2)}, tx.init(params))
        >>> float(jnp.abs(updates["conv"]).sum()), updates["fc"].shape
        (0.0, (2,))

    References:
        Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023.
        https://arxiv.org/abs/2304.04158
    """
    fn = "fpf"
    _checks.check_transform(fn, "inner", inner)

    def plan_of(params):
        flags = _common.bool_tree(fn, "modules", modules, params)
        return [True if f is None else bool(f) for f in _leaves_like(flags, params)]

    return _subset_transform(fn, inner, plan_of, FpfState)


# ---------------------------------------------------------------------------------------------
# SP-14: MIGU.


class MiguState(NamedTuple):
    """State of `migu`."""

    inner_state: Any  # the mask is recomputed every step: nothing else is kept


def _row_mask(
    fn: str, name: str, a: Any, shape: tuple, threshold: Any, output_axis: int, axis_name
) -> jax.Array:
    """The leaf-shaped mask of the rows (output units) whose normalized magnitude reaches the
    `threshold` quantile of its layer."""
    a = jnp.asarray(a, _F32)
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"{fn}: leaf '{name}' is a scalar; it has no output units to mask.")
    if ndim == 1:
        want = tuple(shape)
    else:
        in_axis = ndim - 2 if output_axis == -1 else ndim - 1
        want = tuple(s for i, s in enumerate(shape) if i != in_axis)
    if a.shape != want:
        raise ValueError(
            f"{fn}: leaf '{name}' has shape {tuple(shape)}; its activations must have shape {want} "
            f"(mean |output| per output unit), got {a.shape}."
        )
    if axis_name is not None:
        a = lax.pmean(a, axis_name)
    total = jnp.sum(a, axis=-1, keepdims=True)
    a = jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), a)
    cut = jnp.quantile(a, jnp.asarray(threshold, _F32), axis=-1, keepdims=True)
    keep = a >= cut
    if ndim > 1:
        keep = jnp.expand_dims(keep, -2 if output_axis == -1 else -1)
    return jnp.broadcast_to(keep, shape)


def migu(
    inner: optax.GradientTransformation,
    *,
    threshold: jax.typing.ArrayLike,
    output_axis: int = -1,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """MIGU: updates only the output units whose normalized output magnitude is large.

    For each leaf given activations, ``a_j = mean_batch |y_j|`` over its output units ``j`` is
    normalized to sum 1 (L1), and unit ``j`` is updated only when ``a_j >= quantile(a,
    threshold)`` (linear interpolation, as `numpy.quantile`). The mask multiplies the gradient
    before `inner` and the final update after it (SP-MASK rule 1), so masked units are
    bit-identical for the step even under momentum or decoupled decay. The mask is recomputed
    every step from `activations`; leaves without activations are updated normally.

    `update` takes the keyword-only extra argument `activations`: a (partial) tree whose paths
    name parameter leaves; for a matrix leaf with output axis `output_axis` (``-1``: Flax
    ``(d_in, d_out)`` kernels; ``-2``: PyTorch ``(d_out, d_in)``) it is the leaf's shape
    without its input axis, e.g. ``(d_out,)``, or ``(N_L, d_out)`` for a stacked kernel; for a
    1-D leaf (a bias, a LoRA B vector) it has the leaf's shape. Entries for leaves absent from
    the updates are ignored (the transform may sit inside `optax.masked` or `optax.partition`).
    Collect them with Flax ``sow``
    on the same batch as the gradient. For the LoRA variant, pass them for the ``lora_B``
    leaves only.

    Args:
        inner: Any optax transformation; wrap the whole optimizer (decay included).
        threshold: The quantile ``q`` in [0, 1]; about ``1 - q`` of each layer's units update.
            ``q = 0`` is the inner optimizer. The paper's value is not fixed here (no default).
        output_axis: ``-1`` or ``-2``: which of a leaf's last two axes holds the output units.
            Static.
        axis_name: A mapped axis name (``pmap`` / ``shard_map``) over which the activations are
            averaged, as the reference averages them across devices; None: not averaged. Static.

    Returns:
        A transform whose state is `MiguState`.

    Raises:
        ValueError: `threshold` outside [0, 1], `output_axis` not -1 or -2, an activation of the
            wrong shape, activations for a scalar leaf.

    Example:
        >>> tx = cljax.migu(optax.sgd(1.0), threshold=0.5)
        >>> params = {"w": jnp.ones((2, 4))}
        >>> acts = {"w": jnp.array([4.0, 1.0, 3.0, 2.0])}
        >>> updates, _ = tx.update({"w": jnp.ones((2, 4))}, tx.init(params), activations=acts)
        >>> updates["w"][0].tolist()
        [-1.0, 0.0, -1.0, 0.0]

    References:
        Du et al., "Unlocking Continual Learning Abilities in Language Models", 2024.
        https://arxiv.org/abs/2406.17245
    """
    fn = "migu"
    _checks.check_transform(fn, "inner", inner)
    _checks.check_in_range(fn, "threshold", threshold, 0.0, 1.0)
    _checks.check_choice(fn, "output_axis", output_axis, (-1, -2))
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return MiguState(inner_state=inner.init(params))

    def update_fn(updates, state, params=None, *, activations, **extra_args):
        by_name = _common.by_path(activations, fn, "activations")

        def mask_of(path, g):
            if g is None:
                return None
            name = _common.path_name(path)
            a = by_name.get(name)
            if a is None:
                return None
            return _row_mask(fn, name or "<root>", a, g.shape, threshold, output_axis, axis_name)

        masks = jax.tree_util.tree_map_with_path(mask_of, updates, is_leaf=_common.is_none)

        def apply(x, m):
            return x if x is None or m is None else jnp.where(m, x, jnp.zeros_like(x))

        gated = jax.tree.map(apply, updates, masks, is_leaf=_common.is_none)
        directions, inner_state = inner.update(gated, state.inner_state, params, **extra_args)
        out = jax.tree.map(apply, directions, masks, is_leaf=_common.is_none)
        return out, MiguState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
