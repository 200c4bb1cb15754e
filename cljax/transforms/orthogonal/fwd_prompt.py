"""Fwd-Prompt (OR-10): prompt-gradient projection for positive forward transfer.

Prompt leaves live in the model's input-embedding space (a prompt ``(L, d)`` is ``L`` token
vectors of width ``d``). Per prompt leaf the state holds two orthonormal bases of that space,
both from energy-thresholded SVDs of input embeddings: ``U_old`` (old tasks' embeddings, grown
task by task with GPM's criterion) and ``U_pre`` (embeddings representing the pre-trained
knowledge). Each token vector ``g`` of the update becomes
``(I − U_old U_oldᵀ) g + w · U_pre U_preᵀ g``: its component in old tasks' space is removed (no
interference) and its component in the pre-trained space is kept with weight ``w`` (reuse of
pre-trained knowledge).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks
from cljax import tree as _tree
from cljax.transforms.orthogonal import _common
from cljax.transforms.orthogonal import input_subspace as _gpm
from cljax.transforms.orthogonal._common import Where

__all__ = ["FwdPromptState", "fwd_prompt", "fwd_prompt_add_task", "fwd_prompt_set_pretrained"]

_HIGHEST = jax.lax.Precision.HIGHEST
_PROMPT_SPEC = _tree.MatrixSpec(rows=-1, cols=-2)


class FwdPromptState(NamedTuple):
    """State of `fwd_prompt`."""

    num_tasks: chex.Array  # int32 number of `fwd_prompt_add_task` calls so far
    old_bases: optax.Params  # prompt leaf: batch + (d, capacity) float32, zero-padded; else None
    old_counts: optax.Params  # prompt leaf: int32 of the batch shape; else None
    pre_bases: optax.Params  # prompt leaf: batch + (d, pretrained_capacity) float32; else None
    pre_counts: optax.Params  # prompt leaf: int32 of the batch shape; else None
    inner: optax.OptState  # state of `inner` (EmptyState without one)


def _project_leaf(u, old, pre, weight, spec, name):
    """``(I − U_old U_oldᵀ) G + w U_pre U_preᵀ G`` per matrix (rows = embedding axis), float32."""
    mats = _tree.as_matrices(u, spec, name).astype(jnp.float32)  # (B, d, L)
    m_old = old.reshape((-1,) + old.shape[-2:])
    m_pre = pre.reshape((-1,) + pre.shape[-2:])
    on_old = jnp.einsum(
        "bic,bco->bio",
        m_old,
        jnp.einsum("bic,bio->bco", m_old, mats, precision=_HIGHEST),
        precision=_HIGHEST,
    )
    on_pre = jnp.einsum(
        "bic,bco->bio",
        m_pre,
        jnp.einsum("bic,bio->bco", m_pre, mats, precision=_HIGHEST),
        precision=_HIGHEST,
    )
    out = mats - on_old + jnp.asarray(weight, jnp.float32) * on_pre
    return _tree.from_matrices(out, spec, u.shape, name).astype(u.dtype)


def fwd_prompt(
    capacity: int | None,
    *,
    pretrained_capacity: int | None = None,
    pretrained_weight: chex.Numeric = 1.0,
    spec: _gpm.SpecArg = _PROMPT_SPEC,
    inner: optax.GradientTransformation | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Projects prompt updates off old tasks' embedding space and adds their pre-trained part.

    Each token vector ``g`` (width ``d``, the embedding axis) of a prompt leaf becomes
    ``(I − U_old U_oldᵀ) g + w · U_pre U_preᵀ g``. The first term is orthogonal to every old
    basis vector; with no pre-trained basis (or ``w = 0``) the transform is GPM on the prompt
    (projected on the embedding axis); before any task and pre-trained basis it is the identity.
    Give it the prompt leaves only, e.g. with `optax.partition`, or a `spec` function returning
    None for the other leaves.

    Args:
        capacity: Old-task basis columns per prompt leaf, at most ``d`` (None: ``d``). Static.
        pretrained_capacity: Pre-trained basis columns, at most ``d`` (None: ``d``). Static.
        pretrained_weight: ``w`` ≥ 0, the weight of the component kept in the pre-trained space.
        spec: Which axes form each matrix; its rows are the embedding axis. The default,
            ``MatrixSpec(rows=-1, cols=-2)``, fits prompts ``(..., L, d)``: leading axes are
            batch axes (one basis pair each, e.g. per layer of a deep prompt). Static.
        inner: An optimizer to run inside the projection, e.g. ``optax.adam(1e-3)``.
        where: With `inner`: ``'update'`` (default) or ``'gradient'``, as in `gpm`. Static.

    Returns:
        A transform whose state is `FwdPromptState`.

    Raises:
        ValueError: for ``capacity < 1`` or a negative `pretrained_weight`.
        TypeError: for a non-int capacity or a bad `spec` / `inner`.

    Example:
        >>> tx = cljax.fwd_prompt(capacity=2, pretrained_weight=0.5)
        >>> state = tx.init({"prompt": jnp.zeros((1, 2))})
        >>> emb = {"prompt": jnp.array([[1.0, 0.0], [0.0, 0.1]])}  # e_0 holds 99% of the energy
        >>> state = cljax.fwd_prompt_add_task(state, emb, threshold=0.995)
        >>> pre = {"prompt": jnp.array([[1.0, 1.0], [0.1, -0.1]])}
        >>> state = cljax.fwd_prompt_set_pretrained(state, pre, threshold=0.995)
        >>> g = {"prompt": jnp.array([[2.0, 4.0]])}
        >>> tx.update(g, state)[0]["prompt"]  # [0, 4] + 0.5 * [3, 3]
        Array([[1.5, 5.5]], dtype=float32)

    References:
        Zheng, Ma, Liu, Wu and Feng, "Beyond Anti-Forgetting: Multimodal Continual Instruction
        Tuning with Positive Forward Transfer", 2024. https://arxiv.org/abs/2401.09181
    """
    fn = "fwd_prompt"
    for arg, value in (("capacity", capacity), ("pretrained_capacity", pretrained_capacity)):
        if value is not None:
            _checks.check_int(fn, arg, value, 1)
    _checks.check_in_range(fn, "pretrained_weight", pretrained_weight, 0.0, float("inf"))
    _gpm._check_spec(fn, spec)
    where = _common.resolve_where(fn, inner, where)

    def leaf_state(path, p):
        name = _common.path_name(path)
        s = _gpm._leaf_spec(fn, spec, name, tuple(p.shape))
        if s is None:
            return None
        batch_shape, d, _ = _gpm._matrix_dims(fn, s, name, tuple(p.shape))
        c_old = d if capacity is None else min(capacity, d)
        c_pre = d if pretrained_capacity is None else min(pretrained_capacity, d)
        zeros = jnp.zeros(batch_shape, jnp.int32)
        return (
            jnp.zeros(batch_shape + (d, c_old), jnp.float32),
            zeros,
            jnp.zeros(batch_shape + (d, c_pre), jnp.float32),
            zeros,
        )

    def init_fn(params):
        parts = jax.tree_util.tree_map_with_path(leaf_state, params)
        old_bases, old_counts, pre_bases, pre_counts = _common.unzip_parts(parts, 4)
        return FwdPromptState(
            num_tasks=jnp.zeros([], jnp.int32),
            old_bases=old_bases,
            old_counts=old_counts,
            pre_bases=pre_bases,
            pre_counts=pre_counts,
            inner=_common.init_inner(inner, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        def project(tree, descent):
            del descent  # linear: the sign does not matter

            def leaf(path, u, old, pre):
                if _common.is_empty(u) or old is None:
                    return u
                name = _common.path_name(path)
                s = _gpm._leaf_spec(fn, spec, name, tuple(u.shape))
                return _project_leaf(u, old, pre, pretrained_weight, s, name)

            return jax.tree_util.tree_map_with_path(
                leaf, tree, state.old_bases, state.pre_bases, is_leaf=_common.is_empty
            )

        out, inner_state = _common.around_inner(
            project, inner, where, updates, state.inner, params, extra_args
        )
        return out, state._replace(inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _grow(fn, opt_state, embeddings, threshold, index, which):
    _common.require_concrete(fn, embeddings=embeddings, threshold=threshold)
    state = _tree.find_state(opt_state, FwdPromptState, index=index)
    bases_tree = state.old_bases if which == "old" else state.pre_bases
    counts_tree = state.old_counts if which == "old" else state.pre_counts
    leaves = jax.tree_util.tree_flatten_with_path(bases_tree, is_leaf=_common.is_empty)[0]
    treedef = jax.tree.structure(bases_tree, is_leaf=_common.is_empty)
    counts = treedef.flatten_up_to(counts_tree)
    names = [_common.path_name(p) for p, _ in leaves]
    given = {
        _common.path_name(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(embeddings, is_leaf=lambda x: x is None)[0]
        if x is not None
    }
    for name in given:
        if name not in names:
            raise ValueError(
                f"{fn}: `embeddings` has leaf '{name}', which the parameters do not have."
            )
        if _common.is_empty(leaves[names.index(name)][1]):
            raise ValueError(
                f"{fn}: leaf '{name}' is not projected by `fwd_prompt` (its spec gives no "
                "matrix); pass None there in `embeddings`."
            )
    thresholds = _gpm._thresholds(fn, threshold, [n for n in names if n in given])
    first = jnp.asarray(which == "pre" or int(_common.host_int(state.num_tasks)) == 0)
    new_b, new_c = [x for _, x in leaves], list(counts)
    for i, name in enumerate(names):
        basis = new_b[i]
        if _common.is_empty(basis) or name not in given:
            continue
        if name not in thresholds:
            raise ValueError(f"{fn}: `threshold` has no value for leaf '{name}'.")
        batch_shape, (d, cap) = basis.shape[:-2], basis.shape[-2:]
        x = jnp.asarray(given[name])
        _gpm._check_samples(
            fn,
            "embeddings",
            name,
            x,
            batch_shape,
            d,
            "num_tokens",
            "the leaf's batch axes, then input embeddings of the embedding width",
        )
        flat_b = basis.reshape((-1, d, cap))
        flat_c = counts[i].reshape((-1,))
        if which == "pre":  # replaced, not grown
            flat_b, flat_c = jnp.zeros_like(flat_b), jnp.zeros_like(flat_c)
        flat_x = x.reshape((flat_b.shape[0],) + x.shape[len(batch_shape) :])
        thr = jnp.asarray(thresholds[name], jnp.float32)
        b, c, needed = _gpm._GROW["activations"](flat_b, flat_c, flat_x, thr, first)
        worst = int(np.max(_common.host_int(needed))) if needed.size else 0
        if worst > cap:
            arg = "capacity" if which == "old" else "pretrained_capacity"
            raise ValueError(
                f"{fn}: leaf '{name}' needs {worst} basis columns at threshold "
                f"{thresholds[name]}, but its {arg} is {cap}. Build `fwd_prompt` with a larger "
                f"`{arg}` or lower the threshold."
            )
        new_b[i] = b.reshape(basis.shape)
        new_c[i] = c.reshape(counts[i].shape)
    bases = jax.tree.unflatten(treedef, new_b)
    counts_new = jax.tree.unflatten(treedef, new_c)
    if which == "old":
        new = state._replace(
            num_tasks=state.num_tasks + jnp.ones([], jnp.int32),
            old_bases=bases,
            old_counts=counts_new,
        )
    else:
        new = state._replace(pre_bases=bases, pre_counts=counts_new)
    return _tree.replace_state(opt_state, new, index=index)


def fwd_prompt_add_task(
    opt_state: Any, embeddings: Any, threshold: Any, *, index: int | None = None
) -> Any:
    """Grows the old-task bases from a finished task's input embeddings (GPM's energy rule).

    Per prompt leaf, with ``R = embeddings.T`` (``(d, n)``), the new directions are chosen
    exactly as `gpm_add_task` chooses them (the first task keeps the leading singular vectors
    whose cumulative energy stays below `threshold`; later tasks add residual directions while
    the captured energy is below it) and are appended to ``U_old``. Runs eagerly; nothing
    recompiles across tasks.

    Args:
        opt_state: The whole optimizer state holding one `FwdPromptState`.
        embeddings: A tree with the params' structure: per prompt leaf the task's input
            embeddings ``batch + (num_tokens, d)`` (e.g. the token embeddings of its
            instructions); None elsewhere.
        threshold: Energy threshold in [0, 1], one number or a tree with one per prompt leaf.
        index: Which `FwdPromptState` when the optimizer holds several (tree order).

    Returns:
        `opt_state` with ``U_old`` grown and the task count incremented.

    Raises:
        ValueError: no or several `FwdPromptState`s; embeddings of the wrong shape or on a
            leaf that is not projected; more columns needed than `capacity`.
        TypeError: called under `jax.jit`.

    Example:
        >>> tx = cljax.fwd_prompt(capacity=2)
        >>> state = tx.init({"prompt": jnp.zeros((3, 2))})
        >>> emb = {"prompt": jnp.array([[1.0, 0.0], [0.0, 0.1]])}
        >>> int(cljax.fwd_prompt_add_task(state, emb, 0.995).old_counts["prompt"])
        1
    """
    return _grow("fwd_prompt_add_task", opt_state, embeddings, threshold, index, "old")


def fwd_prompt_set_pretrained(
    opt_state: Any, embeddings: Any, threshold: Any, *, index: int | None = None
) -> Any:
    """Sets the pre-trained bases ``U_pre`` from embeddings of the pre-trained knowledge.

    Per prompt leaf, ``U_pre`` becomes the leading left singular vectors of ``R =
    embeddings.T`` whose cumulative energy stays below `threshold` (GPM's first-task rule); an
    earlier ``U_pre`` is replaced.

    Args:
        opt_state: The whole optimizer state holding one `FwdPromptState`.
        embeddings: Per prompt leaf ``batch + (num_tokens, d)`` embeddings representing the
            pre-trained model's knowledge (e.g. of generic instruction data); None elsewhere.
        threshold: Energy threshold in [0, 1], one number or a tree with one per prompt leaf.
        index: Which `FwdPromptState` when the optimizer holds several.

    Returns:
        `opt_state` with ``U_pre`` replaced.

    Raises:
        ValueError, TypeError: as `fwd_prompt_add_task` (with `pretrained_capacity`).

    Example:
        >>> tx = cljax.fwd_prompt(capacity=2)
        >>> state = tx.init({"prompt": jnp.zeros((3, 2))})
        >>> emb = {"prompt": jnp.array([[1.0, 0.0], [0.0, 0.1]])}
        >>> int(cljax.fwd_prompt_set_pretrained(state, emb, 0.995).pre_counts["prompt"])
        1
    """
    return _grow("fwd_prompt_set_pretrained", opt_state, embeddings, threshold, index, "pre")
