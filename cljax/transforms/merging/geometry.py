"""Geometry-aware merging: angles, spectra, subspaces, signs and patches of task vectors.

Pure, `jax.jit`-compatible pytree functions (no optax state). Every function keeps the tree
structure and leaf dtypes of its main input and computes in float32 (bf16 inputs included).
"Per leaf" means per pytree leaf (per tensor); "global" means over all leaves together.

* `model_stock` — Model Stock (MG-09): per-leaf interpolation between the fine-tuned average and
  the base, with the ratio set by the angle between the fine-tuned offsets.
* `iso_c`, `iso_cts` — Iso-C / Iso-CTS (MG-17): summed task matrices with a flattened
  (isotropic) singular-value spectrum, optionally with task-specific directions.
* `opcm_init`, `opcm_update`, `opcm_params`, `OpcmState` — OPCM (MG-06): sequential merging with
  orthogonal projection against the merged task vector's singular subspace and a global rescale.
* `one_bit_compress`, `one_bit_decompress`, `one_bit_merge`, `OneBitTaskVector` — 1bit-Merging
  (MG-16): 1-bit sign codes with a per-leaf scale, and merging with a routed task vector.
* `atlas_init`, `atlas_apply` — aTLAS (MG-15): per-leaf, per-task learned coefficients,
  differentiable with respect to the coefficients only.
* `rws_extract`, `rws_patch`, `rws_quantize`, `rws_dequantize`, `QuantizedSignature` — Robust
  Weight Signatures (MG-20): weight-difference patches, scaled, summed, removed and quantized.
* `shadow_ft` — Shadow-FT (MG-21): graft a base model's fine-tuning delta onto its instruct twin.
* `weight_align`, `weight_align_factor` — Weight Aligning (MG-22): rescale new-class classifier
  weights to the old classes' mean norm.
* `slerp` — spherical linear interpolation of two models, per leaf (MG-47).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from cljax import _bits, _checks
from cljax.tree import MatrixSpec, as_matrices, from_matrices

__all__ = [
    "OneBitTaskVector",
    "OpcmState",
    "QuantizedSignature",
    "atlas_apply",
    "atlas_init",
    "iso_c",
    "iso_cts",
    "model_stock",
    "one_bit_compress",
    "one_bit_decompress",
    "one_bit_merge",
    "opcm_init",
    "opcm_params",
    "opcm_update",
    "rws_dequantize",
    "rws_extract",
    "rws_patch",
    "rws_quantize",
    "shadow_ft",
    "slerp",
    "weight_align",
    "weight_align_factor",
]

_ALL_MATRICES = MatrixSpec()  # default `spec`: every leaf with >= 2 dims, last two axes

ScaleRule = Literal["mean_abs", "rms"]
_SCALE_RULES = ("mean_abs", "rms")

# ---------------------------------------------------------------------------------------------
# Shared helpers (private).


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _dtype(x: Any):
    return jnp.asarray(x).dtype


def _safe_div(num: jax.Array, den: jax.Array, fallback: Any) -> jax.Array:
    """``num / den`` where ``den != 0``, else `fallback`; never divides by zero."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def _max_abs(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)) if x.size else jnp.zeros([], jnp.float32)


def _unit_scale(m: jax.Array) -> jax.Array:
    """A divisor that brings values of magnitude `m` to at most 1 (1 where `m` is 0)."""
    return jnp.where(m > 0, m, 1.0)


def _norm(x: jax.Array) -> jax.Array:
    """Overflow- and underflow-safe Euclidean norm of all entries of a float32 array."""
    s = _unit_scale(_max_abs(x))
    return s * jnp.sqrt(jnp.sum(jnp.square(x / s)))


def _global_norm(leaves: Sequence[jax.Array]) -> jax.Array:
    """Overflow-safe Euclidean norm over all entries of all float32 leaves."""
    if not leaves:
        return jnp.zeros([], jnp.float32)
    s = _unit_scale(jnp.max(jnp.stack([_max_abs(x) for x in leaves])))
    return s * jnp.sqrt(sum(jnp.sum(jnp.square(x / s)) for x in leaves))


def _check_finite(fn: str, arg: str, value: Any) -> None:
    """Raises a ValueError when a concrete number is NaN or infinite (tracers pass)."""
    number = _checks._as_float(value)
    if number is not None and not math.isfinite(number):
        raise ValueError(f"{fn}({arg}=...) must be a finite number, got {number}.")


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_sequence(fn: str, arg: str, trees: Any, min_len: int) -> None:
    if not isinstance(trees, (list, tuple)):
        raise TypeError(
            f"{fn}({arg}=...) must be a list or tuple of pytrees, got {type(trees).__name__}."
        )
    if len(trees) < min_len:
        raise ValueError(
            f"{fn}({arg}=...) must hold at least {min_len} pytree(s), got {len(trees)}."
        )


def _check_trees(
    fn: str, ref_name: str, ref: Any, arg: str, trees: Sequence[Any], start: int = 0
) -> None:
    """Checks every tree in `trees` (named ``arg[start + i]``) against `ref`."""
    for i, tree in enumerate(trees, start=start):
        _checks.check_same_structure(fn, **{ref_name: ref, f"{arg}[{i}]": tree})


def _resolve_mask(fn: str, mask: Any, tree: Any, tree_name: str) -> list[Any]:
    """Returns one boolean (Python bool or 0-d array) per leaf of `tree`."""
    n = len(jax.tree.leaves(tree))
    if mask is None:
        return [True] * n
    if callable(mask):
        raise TypeError(
            f"{fn}(mask=...) must be a tree of bools, got a callable; call it on `{tree_name}` first "
            "(e.g. ``cljax.select('conv')(params)``)."
        )
    if jax.tree.structure(mask) != jax.tree.structure(tree):
        raise ValueError(
            f"{fn}(mask=...) must be a tree of bools with the structure of `{tree_name}`, got "
            f"{jax.tree.structure(mask)} vs {jax.tree.structure(tree)}."
        )
    return jax.tree.leaves(mask)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, MatrixSpec)


def _resolve_specs(fn: str, spec: Any, tree: Any, tree_name: str) -> list[MatrixSpec | None]:
    """Returns one `MatrixSpec` (matrix leaf) or None (non-matrix leaf) per leaf of `tree`.

    A single `MatrixSpec` applies to every leaf with at least 2 dims; a tree of `MatrixSpec` /
    None with the structure of `tree` chooses leaf by leaf.
    """
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if isinstance(spec, MatrixSpec):
        specs: list[MatrixSpec | None] = []
        for path, leaf in paths_leaves:
            ndim = jnp.ndim(leaf)
            if ndim >= 2:
                spec.axes(ndim, _checks.leaf_name(path))  # validates the axes early
                specs.append(spec)
            else:
                specs.append(None)
        return specs
    spec_leaves, spec_def = jax.tree.flatten(spec, is_leaf=_is_spec_leaf)
    if spec_def != jax.tree.structure(tree):
        raise ValueError(
            f"{fn}(spec=...) must be a MatrixSpec or a tree of MatrixSpec / None with the structure "
            f"of `{tree_name}`, got {spec_def} vs {jax.tree.structure(tree)}."
        )
    for s, (path, leaf) in zip(spec_leaves, paths_leaves, strict=True):
        if not _is_spec_leaf(s):
            raise TypeError(
                f"{fn}(spec=...) leaves must be MatrixSpec or None, got {type(s).__name__} at "
                f"leaf '{_checks.leaf_name(path)}'."
            )
        if s is not None:
            shape = jnp.shape(leaf)
            if len(shape) < 2:
                raise ValueError(
                    f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {shape}; a MatrixSpec needs "
                    "at least 2 dims. Pass None for it in `spec`."
                )
            s.axes(len(shape), _checks.leaf_name(path))
    return spec_leaves


@jax.jit
def _add_weighted(start, leaves, weights):
    """``start + sum_i weights[i] * leaves[i]`` in float32, returned in `start`'s dtype."""
    total = _f32(start)
    for i, x in enumerate(leaves):
        total = total + weights[i] * _f32(x)
    return total.astype(_dtype(start))


@jax.jit
def _add_masked_difference(start, plus, minus, keep):
    """``start + where(keep, plus - minus, 0)`` in float32, returned in `start`'s dtype."""
    diff = _f32(plus) - _f32(minus)
    return (_f32(start) + jnp.where(keep, diff, 0.0)).astype(_dtype(start))


def _svd(x: jax.Array, full_matrices: bool = False):
    """SVD ``x = u @ diag(s) @ vh`` of a 2-D float32 matrix, computed in its tall orientation."""
    m, n = x.shape
    if m >= n:
        return jnp.linalg.svd(x, full_matrices=full_matrices)
    u, s, vh = jnp.linalg.svd(x.T, full_matrices=full_matrices)
    return vh.T, s, u.T


def _polar(x: jax.Array) -> jax.Array:
    """The orthogonal polar factor ``u @ vh`` of `x` (the nearest semi-orthogonal matrix)."""
    u, _, vh = _svd(x)
    return u @ vh


def _on_matrices(f, x: jax.Array, spec: MatrixSpec, name: str, *extra) -> jax.Array:
    """Applies ``f(matrix, *extra)`` to every matrix of `x`'s view under `spec` (vmap over batch)."""
    mats = as_matrices(x, spec, name)
    out = jax.vmap(f, in_axes=(0,) + (None,) * len(extra))(mats, *extra)
    return from_matrices(out, spec, x.shape, name)


# ---------------------------------------------------------------------------------------------
# MG-09: Model Stock.


def _pairwise_mean_cos(offsets: jax.Array, clamp: float) -> jax.Array:
    """Mean over pairs ``i < j`` of the clamped cosine between rows of ``offsets[:, g, :]``.

    `offsets` has shape ``(N, G, K)``: N models, G groups (filters), K entries each. Returns
    shape ``(G,)``. The cosine is ``<a, b> / max(|a| |b|, clamp)`` clipped to [-1, 1], computed
    on max-abs-scaled vectors so huge or tiny entries neither overflow nor underflow.
    """
    scale = _unit_scale(jnp.max(jnp.abs(offsets), axis=-1))  # (N, G)
    unit = offsets / scale[..., None]
    norms = jnp.sqrt(jnp.sum(jnp.square(unit), axis=-1))  # (N, G)
    n = offsets.shape[0]
    total = jnp.zeros(offsets.shape[1], jnp.float32)
    for i in range(n):
        for j in range(i + 1, n):
            dot = jnp.sum(unit[i] * unit[j], axis=-1)
            floor = clamp / (scale[i] * scale[j])  # the clamp, in the scaled units
            cos = dot / jnp.maximum(norms[i] * norms[j], floor)
            total = total + jnp.clip(cos, -1.0, 1.0)
    return total / (n * (n - 1) // 2)


@functools.partial(jax.jit, static_argnames=("filter_wise",))
def _model_stock_leaf(w0, finetuned, *, filter_wise):
    """Model Stock for one leaf; returns the merged leaf and the smallest mean cosine."""
    n = len(finetuned)
    w0_32 = _f32(w0)
    offsets = jnp.stack([_f32(f) - w0_32 for f in finetuned])  # (N, *shape)
    shape = w0_32.shape
    per_filter = filter_wise and len(shape) >= 2
    if per_filter:
        grouped = jnp.moveaxis(offsets, -1, 1).reshape(n, shape[-1], -1)  # (N, C, K)
    else:
        grouped = offsets.reshape(n, 1, -1)
    cos = _pairwise_mean_cos(grouped, 1e-6)  # (G,)
    den = 1.0 + (n - 1) * cos
    pole = jnp.abs(den) < 1e-6
    t = jnp.where(pole, 0.0, n * cos / jnp.where(pole, 1.0, den))
    mean_offset = jnp.mean(offsets, axis=0)
    if per_filter:
        moved = jnp.moveaxis(mean_offset, -1, 0).reshape(shape[-1], -1)
        step = jnp.moveaxis((t[:, None] * moved).reshape((shape[-1],) + shape[:-1]), 0, -1)
    else:
        step = t[0] * mean_offset
    return (w0_32 + step).astype(_dtype(w0)), jnp.min(cos)


def model_stock(base: Any, finetuned: Sequence[Any], *, filter_wise: bool = False) -> Any:
    """Interpolates fine-tuned average and base at a per-leaf angle (Model Stock).

    Per leaf (per tensor), with ``N = len(finetuned)`` and offsets ``d_i = w_i - w_0``:
    ``cos = mean_{i<j} clip(<d_i, d_j> / max(|d_i| |d_j|, 1e-6), -1, 1)``,
    ``t = N cos / (1 + (N - 1) cos)`` and ``w = t * mean_i(w_i) + (1 - t) * w_0``. With two models
    this is the paper's ``t = 2 cos / (1 + cos)``. Zero offsets give ``cos = 0``, so ``t = 0``.

    Args:
        base: The pre-trained parameters ``w_0``, any pytree.
        finetuned: A list or tuple of at least 2 fine-tuned parameter pytrees with `base`'s
            structure and leaf shapes.
        filter_wise: If True, one angle per output unit: per index of the last axis of each leaf
            with at least 2 dims (Flax layout, outputs last; a PyTorch ``(d_out, d_in)`` weight
            must be transposed first). 1-D and scalar leaves always use one angle. Static.

    Returns:
        The merged parameters, with `base`'s structure and dtypes.

    Raises:
        TypeError: if `finetuned` is not a list or tuple.
        ValueError: if it holds fewer than 2 pytrees, or a tree or leaf shape differs from `base`.

    Example:
        >>> base = {"w": jnp.zeros(2)}
        >>> finetuned = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
        >>> cljax.model_stock(base, finetuned)["w"]  # orthogonal offsets: t = 0, the base
        Array([0., 0.], dtype=float32)

    Notes:
        * Several models: the angle is the mean pairwise cosine (mergekit's reading; the paper
          uses two models).
        * A negative mean cosine gives ``t < 0`` (extrapolation away from the average); the
          reference behaviour is kept, and a `UserWarning` names the leaves when called outside
          `jit`.
        * Where ``1 + (N - 1) cos`` is below 1e-6 in magnitude (the reference divides by zero),
          ``t = 0`` is used, so the result stays finite.
        * The result is computed as ``w_0 + t * mean_i(d_i)``, equal to the formula above.

    References:
        Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
        https://arxiv.org/abs/2403.19522
    """
    fn = "model_stock"
    _check_sequence(fn, "finetuned", finetuned, 2)
    _check_trees(fn, "base", base, "finetuned", finetuned)
    _checks.check_choice(fn, "filter_wise", filter_wise, (False, True))
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    ft_leaves = [jax.tree.leaves(f) for f in finetuned]
    out, negative = [], []
    for i, (path, w0) in enumerate(paths_leaves):
        merged, min_cos = _model_stock_leaf(w0, [f[i] for f in ft_leaves], filter_wise=filter_wise)
        out.append(merged)
        if not _is_tracer(min_cos) and float(min_cos) < 0:
            negative.append(_checks.leaf_name(path))
    if negative:
        warnings.warn(
            f"model_stock: leaves {negative} have a negative mean cosine between fine-tuned "
            "offsets, so t < 0 extrapolates away from their average (reference behaviour kept).",
            UserWarning,
            stacklevel=2,
        )
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# MG-17: Iso-C and Iso-CTS.


def _iso_c_matrix(total: jax.Array) -> jax.Array:
    """``mean(S) * U @ Vh`` for ``total = U diag(S) Vh`` (computed on a max-abs-scaled copy)."""
    c = _unit_scale(_max_abs(total))
    u, s, vh = _svd(total / c)
    return (jnp.mean(s) * c) * (u @ vh)


def _cts_sizes(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Common-subspace size and per-task size for a rank-`r` view (reference arithmetic)."""
    common = int(r * common_fraction)
    task_total = round((r - common) / num_tasks) * num_tasks
    task_total = min(task_total, (r // num_tasks) * num_tasks)  # never more than r directions
    return r - task_total, task_total // num_tasks


def _iso_cts_matrix(tasks: jax.Array, common_fraction: float) -> jax.Array:
    """Iso-CTS for one matrix position; `tasks` has shape ``(T, m, n)``."""
    num_tasks, m, n = tasks.shape
    common, per_task = _cts_sizes(min(m, n), num_tasks, common_fraction)
    c = _unit_scale(_max_abs(tasks))
    tasks = tasks / c
    u, s, vh = _svd(jnp.sum(tasks, axis=0))
    u_common = u[:, :common]
    # Task-specific parts: each task matrix with its common-subspace (left) component removed.
    specific = tasks - jnp.einsum("mk,kj,tjn->tmn", u_common, u_common.T, tasks)
    u_t, s_t, vh_t = jax.vmap(_svd)(specific)
    u_all = jnp.concatenate([u_t[i, :, :per_task] for i in range(num_tasks)] + [u_common], axis=1)
    s_all = jnp.concatenate([s_t[i, :per_task] for i in range(num_tasks)] + [s[:common]])
    vh_all = jnp.concatenate([vh_t[i, :per_task] for i in range(num_tasks)] + [vh[:common]], axis=0)
    return (jnp.mean(s_all) * c) * (_polar(u_all) @ _polar(vh_all))


@functools.partial(jax.jit, static_argnames=("spec", "fraction"))
def _iso_leaf(leaves, scale, *, spec, fraction):
    """One leaf of Iso-C (``fraction`` None) or Iso-CTS; returns it in the first leaf's dtype."""
    name = ""  # shapes were validated by the caller
    xs = [_f32(x) for x in leaves]
    if spec is None:
        merged = sum(xs) / len(xs)
    elif fraction is None:
        merged = _on_matrices(_iso_c_matrix, sum(xs), spec, name)
    else:
        mats = jnp.stack([as_matrices(x, spec, name) for x in xs], axis=1)  # (B, T, m, n)
        out = jax.vmap(lambda t: _iso_cts_matrix(t, fraction))(mats)
        merged = from_matrices(out, spec, xs[0].shape, name)
    return (jnp.asarray(scale, jnp.float32) * merged).astype(_dtype(leaves[0]))


def _iso_merge(fn: str, task_vectors, scale, spec, fraction) -> Any:
    _check_sequence(fn, "task_vectors", task_vectors, 1)
    _check_trees(fn, "task_vectors[0]", task_vectors[0], "task_vectors", task_vectors[1:], 1)
    _check_finite(fn, "scale", scale)
    specs = _resolve_specs(fn, spec, task_vectors[0], "task_vectors[0]")
    treedef = jax.tree.structure(task_vectors[0])
    flat = [jax.tree.leaves(tv) for tv in task_vectors]
    out = []
    for i, leaf_spec in enumerate(specs):
        out.append(_iso_leaf([f[i] for f in flat], scale, spec=leaf_spec, fraction=fraction))
    return jax.tree.unflatten(treedef, out)


def iso_c(
    task_vectors: Sequence[Any],
    *,
    scale: jax.typing.ArrayLike = 1.0,
    spec: Any = _ALL_MATRICES,
) -> Any:
    """Sums task matrices and flattens the sum's singular-value spectrum (Iso-C).

    Per matrix (per leaf; each matrix of a stacked leaf separately): ``M = sum_t tau_t``,
    ``U S Vh = svd(M)`` and ``M_iso = mean(S) * U @ Vh`` — every singular value replaced by their
    mean. Non-matrix leaves (1-D, scalars, or None in `spec`) are averaged over tasks. The whole
    result is multiplied by `scale`; add it to the base: ``theta = theta_0 + iso_c(...)``.

    Args:
        task_vectors: A list or tuple of task-vector pytrees (fine-tuned minus base) with one
            structure and leaf shapes.
        scale: The scaling factor ``alpha``, tuned on validation data in the paper.
        spec: Which leaves are matrices and how to view them: a `cljax.MatrixSpec` for every leaf
            with at least 2 dims (default: the last two axes, others are batch axes), or a tree
            with `task_vectors[0]`'s structure holding a `MatrixSpec` or None per leaf. Static.

    Returns:
        The merged task vector, with `task_vectors[0]`'s structure and dtypes.

    Raises:
        TypeError: if `task_vectors` is not a list or tuple, or `spec` holds other objects.
        ValueError: if it is empty, trees or leaf shapes differ, `scale` is NaN, or `spec` does
            not fit the tree.

    Example:
        >>> tv = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]]), "b": jnp.array([2.0])}
        >>> merged = cljax.iso_c([tv])  # singular values (3, 1) become (2, 2)
        >>> merged["w"], merged["b"]
        (Array([[2., 0.],
               [0., 2.]], dtype=float32), Array([2.], dtype=float32))

    Notes:
        * SVDs run in float32 on the tall orientation of each matrix, after dividing by its
          largest magnitude, so zero matrices give zeros and huge entries do not overflow.
        * `scale` multiplies the averaged non-matrix leaves too, as the reference code does.

    References:
        Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
        Task-Specific Subspaces", ICML 2025. https://arxiv.org/abs/2502.04959
    """
    return _iso_merge("iso_c", task_vectors, scale, spec, None)


def iso_cts(
    task_vectors: Sequence[Any],
    *,
    scale: jax.typing.ArrayLike = 1.0,
    common_fraction: float = 0.8,
    spec: Any = _ALL_MATRICES,
) -> Any:
    """Isotropic merge in a common plus task-specific subspaces (Iso-CTS).

    Per ``(m, n)`` matrix with ``r = min(m, n)`` and ``T`` tasks: ``k = int(r * common_fraction)``,
    then ``p = round((r - k) / T)`` directions per task and ``k = r - T p`` common directions.
    The common subspace is the top-``k`` singular triplets ``(U_k, S_k, Vh_k)`` of
    ``M = sum_t tau_t``. For each task, ``tau_t - U_k U_k^T tau_t`` (its component outside the
    common left subspace) contributes its top-``p`` singular triplets. The ``r`` left vectors and
    the ``r`` right vectors are each replaced by their orthogonal polar factor, and the result is
    ``mean(all r singular values) * U' @ Vh'``. Non-matrix leaves are averaged; everything is
    multiplied by `scale`.

    Args:
        task_vectors: A list or tuple of task-vector pytrees with one structure and leaf shapes.
        scale: The scaling factor ``alpha`` applied to the whole merged task vector.
        common_fraction: Fraction of ``min(m, n)`` given to the common subspace, in [0, 1]
            (0.8 in the reference configuration). Static.
        spec: As in `iso_c`. Static.

    Returns:
        The merged task vector, with `task_vectors[0]`'s structure and dtypes.

    Raises:
        TypeError: if `task_vectors` is not a list or tuple, or `spec` holds other objects.
        ValueError: if it is empty, trees or leaf shapes differ, `common_fraction` is outside
            [0, 1], or `spec` does not fit the tree.

    Example:
        >>> tvs = [{"w": jnp.eye(4)}, {"w": 2.0 * jnp.eye(4)}]
        >>> cljax.iso_cts(tvs, common_fraction=0.5)["w"].shape
        (4, 4)

    Notes:
        * Where ``round((r - k) / T) * T`` would exceed ``r`` (very small matrices; the
          reference then slices with a negative size), the task-specific total is lowered to the
          largest multiple of ``T`` not above ``r``.
        * Python's ``round`` (half to even) is used, as in the reference code.

    References:
        Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
        Task-Specific Subspaces", ICML 2025. https://arxiv.org/abs/2502.04959
    """
    _checks.check_in_range("iso_cts", "common_fraction", common_fraction, 0.0, 1.0)
    return _iso_merge("iso_cts", task_vectors, scale, spec, float(common_fraction))


# ---------------------------------------------------------------------------------------------
# MG-06: OPCM.


class OpcmState(NamedTuple):
    """State of an OPCM sequential merge; its size is constant in the model count."""

    base: Any  # the pre-trained parameters theta_0
    delta: Any  # merged task vector (merged - theta_0), in the base leaves' dtypes
    scale: jax.Array  # float32 lambda_t (1 after the first model)
    norm_sum: jax.Array  # float32 sum of the global norms ||tau_i|| of the merged models
    count: jax.Array  # int32 number of models merged so far
    alpha: jax.Array  # float32 energy threshold of the frozen singular block


def opcm_init(base: Any, *, alpha: jax.typing.ArrayLike = 0.5) -> OpcmState:
    """Starts an OPCM sequential merge at the pre-trained parameters.

    Args:
        base: The pre-trained parameters ``theta_0``, any pytree.
        alpha: Energy threshold in [0, 1] on the cumulative singular-value mass (not squared)
            that sizes the frozen block ``k``; 0.5 in the reference configuration.

    Returns:
        An `OpcmState` with no model merged (``opcm_params`` returns `base`).

    Raises:
        ValueError: if `alpha` is outside [0, 1].

    Example:
        >>> state = cljax.opcm_init({"w": jnp.zeros((3, 2))}, alpha=0.5)
        >>> int(state.count)
        0

    References:
        Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to
        Scalable Continual Model Merging", NeurIPS 2025. https://arxiv.org/abs/2501.09522
    """
    _checks.check_in_range("opcm_init", "alpha", alpha, 0.0, 1.0)
    return OpcmState(
        base=base,
        delta=jax.tree.map(jnp.zeros_like, base),
        scale=jnp.ones([], jnp.float32),
        norm_sum=jnp.zeros([], jnp.float32),
        count=jnp.zeros([], jnp.int32),
        alpha=jnp.asarray(alpha, jnp.float32),
    )


def _opcm_project(delta: jax.Array, tau: jax.Array, alpha: jax.Array) -> jax.Array:
    """Removes from `tau` the diagonal and top-left ``k x k`` block of ``U^T tau V``.

    ``U, V`` are the singular vectors of `delta`; ``k`` is the first index whose cumulative
    singular-value fraction exceeds `alpha` (0 when none does).
    """
    c = _unit_scale(_max_abs(delta))
    u, s, vh = _svd(delta / c)
    total = jnp.sum(s)
    fraction = _safe_div(jnp.cumsum(s), total, 0.0)
    k = jnp.argmax(fraction > alpha)
    r = s.shape[0]
    idx = jnp.arange(r)
    drop = ((idx[:, None] < k) & (idx[None, :] < k)) | (idx[:, None] == idx[None, :])
    coords = u.T @ tau @ vh.T  # (r, r): the part of U^T tau V that can be dropped
    return tau - u @ jnp.where(drop, coords, 0.0) @ vh


def _project_leaf(delta, tau, leaf_spec, name, alpha):
    """Applies `_opcm_project` to each matrix of a leaf's view."""
    d = as_matrices(delta, leaf_spec, name)
    t = as_matrices(tau, leaf_spec, name)
    out = jax.vmap(_opcm_project, in_axes=(0, 0, None))(d, t, alpha)
    return from_matrices(out, leaf_spec, tau.shape, name)


def opcm_update(state: OpcmState, finetuned: Any, *, spec: Any = _ALL_MATRICES) -> OpcmState:
    """Merges one more fine-tuned model into an OPCM state.

    With ``tau_t = finetuned - theta_0`` and the merged task vector ``Delta`` of the previous
    models: the first model is taken as it is (``Delta = tau_1``, ``lambda_1 = 1``). Later
    models, per matrix (`spec`): ``U S V^T = svd(Delta)``, ``P = U^T tau_t V`` with its diagonal
    and its top-left ``k x k`` block set to zero (``k``: the first index where
    ``cumsum(S) / sum(S) > alpha``), ``tau'_t = U P V^T``; other leaves keep ``tau'_t = tau_t``.
    Then ``W = lambda_{t-1} Delta + tau'_t``, ``N = ||W||`` (global, over all leaves),
    ``nbar`` = mean of the global norms ``||tau_i||`` so far, ``Delta <- W * nbar / N`` and
    ``lambda_t = N / nbar``. So ``||Delta|| = nbar`` after every merge.

    Args:
        state: An `OpcmState` from `opcm_init` or a previous `opcm_update`.
        finetuned: The next fine-tuned parameters, with the base's structure and leaf shapes.
        spec: Which leaves are linear-layer weight matrices (projected) and how to view them:
            a `cljax.MatrixSpec` for every leaf with at least 2 dims, or a tree of `MatrixSpec` /
            None. Pass None for embeddings and other non-linear-layer matrices to follow the
            reference, which projects only linear layers. Static; use the same on every call.

    Returns:
        The new `OpcmState`, with the same shapes and dtypes (``jit`` compiles it once).

    Raises:
        ValueError: if a tree or leaf shape differs from the base, or `spec` does not fit.
        TypeError: if `state` is not an `OpcmState`, or `spec` holds other objects.

    Example:
        >>> state = cljax.opcm_init({"w": jnp.zeros((3, 2))})
        >>> state = cljax.opcm_update(state, {"w": jnp.ones((3, 2))})
        >>> cljax.opcm_params(state)["w"].shape
        (3, 2)

    Notes:
        * The projection is written as ``tau - U[:, :r] (P_r * drop) V[:, :r]^T`` with an
          economy SVD (``r = min(m, n)``): every dropped coordinate lies in the first ``r``
          rows and columns of ``P``, so this equals the reference's full-SVD ``U P V^T`` exactly,
          at a fraction of the cost.
        * Directions of numerically-zero singular values are arbitrary (as in any SVD); their
          diagonal coordinates are dropped too, as in the reference.
        * The model order is the call order; the reference shuffles models with a seed.

    References:
        Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to
        Scalable Continual Model Merging", NeurIPS 2025. https://arxiv.org/abs/2501.09522
    """
    fn = "opcm_update"
    if not isinstance(state, OpcmState):
        raise TypeError(f"{fn}(state=...) must be an OpcmState, got {type(state).__name__}.")
    _checks.check_same_structure(fn, base=state.base, finetuned=finetuned)
    specs = _resolve_specs(fn, spec, state.base, "base")
    base_leaves, treedef = jax.tree.flatten(state.base)
    new_delta, new_scale, tau_norm = _opcm_core(
        base_leaves,
        jax.tree.leaves(state.delta),
        jax.tree.leaves(finetuned),
        state.scale,
        state.norm_sum,
        state.count,
        state.alpha,
        specs=tuple(specs),
    )
    return OpcmState(
        base=state.base,
        delta=jax.tree.unflatten(treedef, new_delta),
        scale=new_scale,
        norm_sum=state.norm_sum + tau_norm,
        count=state.count + 1,
        alpha=state.alpha,
    )


@functools.partial(jax.jit, static_argnames=("specs",))
def _opcm_core(base, delta, finetuned, scale, norm_sum, count, alpha, *, specs):
    """One OPCM merge on flat leaf lists; returns (new delta leaves, lambda_t, ||tau_t||)."""
    dtypes = [_dtype(b) for b in base]
    deltas = [_f32(d) for d in delta]
    taus = [_f32(f) - _f32(b) for f, b in zip(finetuned, base, strict=True)]
    tau_norm = _global_norm(taus)

    def first(_):
        return [t.astype(dt) for t, dt in zip(taus, dtypes, strict=True)], jnp.ones([], jnp.float32)

    def later(_):
        merged = []
        for d, tau, leaf_spec in zip(deltas, taus, specs, strict=True):
            if leaf_spec is not None:
                tau = _project_leaf(d, tau, leaf_spec, "", alpha)
            merged.append(scale * d + tau)
        mean_norm = (norm_sum + tau_norm) / (count + 1).astype(jnp.float32)
        big = _global_norm(merged)
        factor = _safe_div(mean_norm, big, 0.0)
        new = [(w * factor).astype(dt) for w, dt in zip(merged, dtypes, strict=True)]
        return new, _safe_div(big, mean_norm, 1.0)

    new_delta, new_scale = jax.lax.cond(count == 0, first, later, None)
    return new_delta, new_scale, tau_norm


def opcm_params(state: OpcmState) -> Any:
    """Returns the merged parameters ``theta_0 + Delta`` of an OPCM state.

    Args:
        state: An `OpcmState`.

    Returns:
        Parameters with the base's structure and dtypes.

    Example:
        >>> state = cljax.opcm_init({"w": jnp.zeros(2)})
        >>> cljax.opcm_params(cljax.opcm_update(state, {"w": jnp.ones(2)}))["w"]
        Array([1., 1.], dtype=float32)
    """
    return jax.tree.map(lambda b, d: (_f32(b) + _f32(d)).astype(_dtype(b)), state.base, state.delta)


# ---------------------------------------------------------------------------------------------
# MG-16: 1bit-Merging.


class OneBitTaskVector(NamedTuple):
    """A task vector as 1-bit signs and one scale per leaf (`one_bit_compress`)."""

    signs: Any  # per leaf: uint8 array of ceil(size / 8) bytes, bit 1 where tau >= 0
    scale: Any  # per leaf: float32 scalar a; the leaf decodes to a * (+1 or -1)


@functools.partial(jax.jit, static_argnames=("scale_rule",))
def _one_bit_leaf(leaf, keep, *, scale_rule):
    """Packed sign bits (1 where ``x >= 0``) and the float32 scale of one leaf."""
    x = _f32(leaf)
    if x.size == 0:
        a = jnp.zeros([], jnp.float32)
    elif scale_rule == "mean_abs":
        a = jnp.mean(jnp.abs(x))
    else:
        a = _norm(x) / math.sqrt(x.size)
    return _bits.pack_bits(x >= 0), jnp.where(keep, a, 0.0).astype(jnp.float32)


def one_bit_compress(
    task_vector: Any, *, scale_rule: ScaleRule = "mean_abs", mask: Any = None
) -> OneBitTaskVector:
    """Compresses a task vector to 1-bit signs and a scale per leaf (1bit-Merging).

    Per leaf (per tensor): ``tau_hat = a * sign(tau)`` with one bit per entry (zeros get ``+a``)
    and ``a = mean(|tau|)`` (``'mean_abs'``, the least-squares optimal scale for this sign
    pattern) or ``a = sqrt(mean(tau^2))`` (``'rms'``, keeps the leaf's norm).

    Args:
        task_vector: A task-vector pytree.
        scale_rule: ``'mean_abs'`` (default) or ``'rms'``. Static.
        mask: Optional tree of bools with `task_vector`'s structure; leaves marked False are
            dropped (scale 0, they decode to zeros), e.g. to keep a chat vector only in attention
            layers as the paper's layer targeting does. Their bits are still stored.

    Returns:
        A `OneBitTaskVector` of packed uint8 signs and float32 scales, with `task_vector`'s
        structure in each field.

    Raises:
        ValueError: if `scale_rule` is unknown or `mask` does not fit the tree.
        TypeError: if `mask` is a callable.

    Example:
        >>> code = cljax.one_bit_compress({"w": jnp.array([0.5, -1.5, 1.0, -1.0])})
        >>> float(code.scale["w"]), code.signs["w"].dtype
        (1.0, dtype('uint8'))

    Notes:
        * The paper's scale rule and its layer-type targeting are unverified (card MG-16); both
          are options here, with the least-squares scale as the default.

    References:
        Liu et al., "1bit-Merging: Dynamic Quantized Merging for Large Language Models", 2025.
        https://arxiv.org/abs/2502.10743
    """
    fn = "one_bit_compress"
    _checks.check_choice(fn, "scale_rule", scale_rule, _SCALE_RULES)
    keep = _resolve_mask(fn, mask, task_vector, "task_vector")
    leaves, treedef = jax.tree.flatten(task_vector)
    signs, scales = [], []
    for leaf, k in zip(leaves, keep, strict=True):
        packed, a = _one_bit_leaf(leaf, jnp.asarray(k, jnp.bool_), scale_rule=scale_rule)
        signs.append(packed)
        scales.append(a)
    return OneBitTaskVector(
        signs=jax.tree.unflatten(treedef, signs), scale=jax.tree.unflatten(treedef, scales)
    )


def one_bit_decompress(compressed: OneBitTaskVector, like: Any) -> Any:
    """Decodes a `OneBitTaskVector` to ``a * (+1 or -1)`` per entry.

    Args:
        compressed: The output of `one_bit_compress`.
        like: A pytree with the original structure, leaf shapes and dtypes (e.g. the base).

    Returns:
        The decoded task vector, with `like`'s structure and dtypes.

    Raises:
        ValueError: if the trees differ or a leaf's packed bytes do not match its shape.

    Example:
        >>> like = {"w": jnp.zeros(4)}
        >>> code = cljax.one_bit_compress({"w": jnp.array([0.5, -1.5, 1.0, -1.0])})
        >>> cljax.one_bit_decompress(code, like)["w"]
        Array([ 1., -1.,  1., -1.], dtype=float32)
    """
    fn = "one_bit_decompress"
    if not isinstance(compressed, OneBitTaskVector):
        raise TypeError(
            f"{fn}(compressed=...) must be a OneBitTaskVector, got {type(compressed).__name__}."
        )
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    for field in ("signs", "scale"):
        tree = getattr(compressed, field)
        if jax.tree.structure(tree) != treedef:
            raise ValueError(
                f"{fn}: `compressed.{field}` has a different tree structure from `like`: "
                f"{jax.tree.structure(tree)} vs {treedef}."
            )
    out = []
    for (path, leaf), packed, a in zip(
        paths_leaves,
        jax.tree.leaves(compressed.signs),
        jax.tree.leaves(compressed.scale),
        strict=True,
    ):
        shape = jnp.shape(leaf)
        need = _bits.packed_size(shape)
        if jnp.shape(packed) != (need,):
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {shape} in `like`, which needs "
                f"{need} packed bytes, but its signs have shape {jnp.shape(packed)}."
            )
        out.append(_decode_leaf(packed, a, shape=tuple(shape), dtype=_dtype(leaf)))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _decode_leaf(packed, a, *, shape, dtype):
    bits = _bits.unpack_bits(packed, shape)
    return (jnp.where(bits, 1.0, -1.0) * _f32(a)).astype(dtype)


def one_bit_merge(
    base: Any,
    compressed: Sequence[OneBitTaskVector],
    *,
    route: Any = None,
    scale: jax.typing.ArrayLike = 1.0,
) -> Any:
    """Adds 1-bit task vectors to the base, the routed one in full (1bit-Merging).

    ``theta = theta_0 + tau_hat_route + scale * sum_{t != route} tau_hat_t``; without a route,
    ``theta_0 + scale * sum_t tau_hat_t`` (task arithmetic on the 1-bit vectors). ``scale = 0``
    with a route applies only the routed task vector (task-specific routing).

    Args:
        base: The pre-trained parameters.
        compressed: A list or tuple of `OneBitTaskVector` for `base`'s structure.
        route: The routed task index (a Python int, or an int32 scalar from a router under
            `jit`), or None.
        scale: Weight of the other (merged) task vectors.

    Returns:
        The merged parameters, with `base`'s structure and dtypes.

    Raises:
        TypeError: if `compressed` is not a list or tuple of `OneBitTaskVector`, or `route` is
            not an integer.
        ValueError: if it is empty, `route` is out of range, or a tree does not fit `base`.

    Example:
        >>> base = {"w": jnp.zeros(2)}
        >>> codes = [cljax.one_bit_compress({"w": jnp.array([1.0, -1.0])}),
        ...          cljax.one_bit_compress({"w": jnp.array([2.0, 2.0])})]
        >>> cljax.one_bit_merge(base, codes, route=1, scale=0.0)["w"]
        Array([2., 2.], dtype=float32)

    Notes:
        * The paper routes each input to one task vector with a learned router; routing is the
          caller's: pass the chosen index as `route`.

    References:
        Liu et al., "1bit-Merging: Dynamic Quantized Merging for Large Language Models", 2025.
        https://arxiv.org/abs/2502.10743
    """
    fn = "one_bit_merge"
    if isinstance(compressed, OneBitTaskVector):
        raise TypeError(
            f"{fn}(compressed=...) must be a list or tuple of OneBitTaskVector, got a single "
            "OneBitTaskVector; wrap it in a list."
        )
    _check_sequence(fn, "compressed", compressed, 1)
    for i, c in enumerate(compressed):
        if not isinstance(c, OneBitTaskVector):
            raise TypeError(
                f"{fn}(compressed=...) must hold OneBitTaskVector items, got "
                f"{type(c).__name__} at index {i}."
            )
    _check_finite(fn, "scale", scale)
    n = len(compressed)
    if route is not None:
        integral = isinstance(route, int) or (
            hasattr(route, "dtype") and jnp.issubdtype(route.dtype, jnp.integer)
        )
        if isinstance(route, bool) or not integral or jnp.ndim(route) != 0:
            raise TypeError(
                f"{fn}(route=...) must be an integer task index or None, got {route!r}."
            )
        if not _is_tracer(route) and not 0 <= int(route) < n:
            raise ValueError(f"{fn}(route=...) must be in [0, {n - 1}], got {int(route)}.")
        weights = jnp.where(jnp.arange(n) == route, 1.0, jnp.asarray(scale, jnp.float32))
    else:
        weights = jnp.full((n,), scale, jnp.float32)
    decoded = [jax.tree.leaves(one_bit_decompress(c, base)) for c in compressed]
    leaves, treedef = jax.tree.flatten(base)
    out = []
    for i, b in enumerate(leaves):
        out.append(_add_weighted(b, [d[i] for d in decoded], weights))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# MG-15: aTLAS.


def atlas_init(base: Any, num_tasks: int, *, value: float = 0.0) -> Any:
    """Returns aTLAS coefficients: a float32 ``(num_tasks,)`` vector per leaf.

    Args:
        base: The pre-trained parameters (only the tree structure is used).
        num_tasks: Number of task vectors ``T``. Static.
        value: Initial value of every coefficient (0 starts at ``theta_0``; a constant ``c``
            starts at task arithmetic with scale ``c``).

    Returns:
        A pytree with `base`'s structure whose leaves are float32 arrays of shape ``(T,)``;
        train it with any optax optimizer.

    Raises:
        TypeError, ValueError: if `num_tasks` is not an int >= 1.

    Example:
        >>> coefs = cljax.atlas_init({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, 3, value=0.3)
        >>> coefs["w"].shape
        (3,)
    """
    _checks.check_int("atlas_init", "num_tasks", num_tasks, 1)
    _check_finite("atlas_init", "value", value)
    return jax.tree.map(lambda _: jnp.full((num_tasks,), value, jnp.float32), base)


def atlas_apply(base: Any, task_vectors: Sequence[Any], coefficients: Any) -> Any:
    """Adds task vectors block by block with learned coefficients (aTLAS).

    Per leaf ``b`` (one parameter block): ``theta_b = theta_0_b + sum_t lambda_{t,b} tau_{t,b}``.
    Differentiable in `coefficients` only: `base` and `task_vectors` pass through
    `jax.lax.stop_gradient`, so ``d L / d lambda_{t,b} = <d L / d theta_b, tau_{t,b}>``.

    Args:
        base: The pre-trained parameters ``theta_0``.
        task_vectors: A list or tuple of ``T`` task-vector pytrees with `base`'s structure.
        coefficients: A pytree with `base`'s structure whose leaves have shape ``(T,)``
            (see `atlas_init`).

    Returns:
        The composed parameters, with `base`'s structure and dtypes.

    Raises:
        TypeError: if `task_vectors` is not a list or tuple.
        ValueError: if it is empty, a tree does not fit `base`, or a coefficient leaf is not
            ``(T,)``.

    Example:
        >>> base = {"w": jnp.zeros(2)}
        >>> tvs = [{"w": jnp.ones(2)}, {"w": jnp.array([1.0, -1.0])}]
        >>> coefs = {"w": jnp.array([0.5, 0.25])}
        >>> cljax.atlas_apply(base, tvs, coefs)["w"]
        Array([0.75, 0.25], dtype=float32)

    Notes:
        * Blocks are pytree leaves (the paper's default granularity).
        * The learning loop (supervised, few-shot or entropy objective) is the caller's:
          ``jax.grad(lambda c: loss(atlas_apply(base, tvs, c)))``.
        * All ``T x B`` task-vector blocks are inputs; the paper's memory saving from mixing only
          the most informative blocks comes from passing fewer (or zero) task vectors.

    References:
        Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic
        Scaling", NeurIPS 2024. https://arxiv.org/abs/2407.02880
    """
    fn = "atlas_apply"
    _check_sequence(fn, "task_vectors", task_vectors, 1)
    _check_trees(fn, "base", base, "task_vectors", task_vectors)
    n = len(task_vectors)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
    if jax.tree.structure(coefficients) != treedef:
        raise ValueError(
            f"{fn}: `coefficients` has a different tree structure from `base`: "
            f"{jax.tree.structure(coefficients)} vs {treedef}."
        )
    coef_leaves = jax.tree.leaves(coefficients)
    for (path, _), c in zip(paths_leaves, coef_leaves, strict=True):
        if jnp.shape(c) != (n,):
            raise ValueError(
                f"{fn}: leaf '{_checks.leaf_name(path)}' has shape {jnp.shape(c)} in `coefficients`; "
                f"it needs shape ({n},), one coefficient per task vector."
            )
    flat = [jax.tree.leaves(jax.lax.stop_gradient(tv)) for tv in task_vectors]
    out = []
    for i, ((_, b), c) in enumerate(zip(paths_leaves, coef_leaves, strict=True)):
        start = jax.lax.stop_gradient(b)
        out.append(_add_weighted(start, [f[i] for f in flat], _f32(c)))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# MG-20: Robust Weight Signatures.


class QuantizedSignature(NamedTuple):
    """A signature as int8 codes and one float32 step per leaf (`rws_quantize`)."""

    codes: Any  # per leaf: int8 array, |code| <= 2**(bits - 1) - 1
    step: Any  # per leaf: float32 scalar; the leaf decodes to code * step


def rws_extract(robust: Any, clean: Any, *, mask: Any = None) -> Any:
    """Returns a robust weight signature: ``robust - clean`` on selected leaves.

    Args:
        robust: Parameters trained for robustness (e.g. on corrupted data).
        clean: Parameters of the same architecture trained on clean data.
        mask: Optional tree of bools with `clean`'s structure selecting the leaves kept in the
            signature (the paper keeps the shallowest layers); None keeps every leaf.

    Returns:
        The signature, with `clean`'s structure and dtypes (computed in float32).

    Raises:
        ValueError: if the trees or leaf shapes differ, or `mask` does not fit.
        TypeError: if `mask` is a callable.

    Example:
        >>> clean = {"conv": jnp.zeros(2), "head": jnp.zeros(2)}
        >>> robust = {"conv": jnp.ones(2), "head": jnp.ones(2)}
        >>> cljax.rws_extract(robust, clean, mask={"conv": True, "head": False})["head"]
        Array([0., 0.], dtype=float32)

    Notes:
        * The paper projects the weight difference before using it as a signature; that
          projection is unverified (card MG-20), so this signature is the plain weight
          difference restricted to the selected leaves.

    References:
        Cai, Zhang and Wang, "Robust Weight Signatures: Gaining Robustness as Easy as Patching
        Weights?", ICML 2023. https://arxiv.org/abs/2302.12480
    """
    fn = "rws_extract"
    _checks.check_same_structure(fn, clean=clean, robust=robust)
    keep = _resolve_mask(fn, mask, clean, "clean")
    leaves, treedef = jax.tree.flatten(clean)
    out = []
    for c, r, k in zip(leaves, jax.tree.leaves(robust), keep, strict=True):
        zero = jnp.zeros_like(c)
        out.append(_add_masked_difference(zero, r, c, jnp.asarray(k, jnp.bool_)))
    return jax.tree.unflatten(treedef, out)


def rws_patch(params: Any, signatures: Sequence[Any], *, scale: Any = 1.0) -> Any:
    """Patches parameters with signatures: ``theta + sum_i scale_i * RWS_i``.

    Patching with ``scale=-s`` removes a patch added with ``scale=s``; several signatures
    compose by summing.

    Args:
        params: The parameters to patch (e.g. the clean model, or an updated backbone).
        signatures: A list or tuple of signature pytrees with `params`' structure (from
            `rws_extract`, or `rws_dequantize`).
        scale: The patch strength ``alpha``: one number for all signatures, or a list or tuple
            with one number per signature.

    Returns:
        The patched parameters, with `params`' structure and dtypes.

    Raises:
        TypeError: if `signatures` is not a list or tuple.
        ValueError: if it is empty, a tree does not fit `params`, or `scale` has the wrong length.

    Example:
        >>> params = {"w": jnp.ones(2)}
        >>> sig = {"w": jnp.array([0.5, -0.5])}
        >>> cljax.rws_patch(params, [sig], scale=2.0)["w"]
        Array([2., 0.], dtype=float32)

    References:
        Cai, Zhang and Wang, "Robust Weight Signatures: Gaining Robustness as Easy as Patching
        Weights?", ICML 2023. https://arxiv.org/abs/2302.12480
    """
    fn = "rws_patch"
    _check_sequence(fn, "signatures", signatures, 1)
    _check_trees(fn, "params", params, "signatures", signatures)
    n = len(signatures)
    if isinstance(scale, (list, tuple)):
        if len(scale) != n:
            raise ValueError(
                f"{fn}(scale=...) must be one number or {n} numbers (one per signature), got "
                f"{len(scale)}."
            )
        scales = list(scale)
    else:
        scales = [scale] * n
    for s in scales:
        _check_finite(fn, "scale", s)
    leaves, treedef = jax.tree.flatten(params)
    flat = [jax.tree.leaves(s) for s in signatures]
    out = []
    weights = jnp.stack([jnp.asarray(w, jnp.float32) for w in scales])
    for i, p in enumerate(leaves):
        out.append(_add_weighted(p, [f[i] for f in flat], weights))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("top",))
def _quantize_leaf(leaf, *, top):
    x = _f32(leaf)
    step = _max_abs(x) / top
    code = jnp.round(_safe_div(x, step, 0.0))
    return jnp.clip(code, -top, top).astype(jnp.int8), step.astype(jnp.float32)


def rws_quantize(signature: Any, *, bits: int = 8) -> QuantizedSignature:
    """Quantizes a signature per leaf to symmetric `bits`-bit integer codes.

    Per leaf: ``step = max|x| / (2**(bits-1) - 1)`` and ``code = round(x / step)`` (zero leaves
    give zero codes and step 0). Codes are stored as int8 whatever `bits` is.

    Args:
        signature: A signature pytree (e.g. from `rws_extract`).
        bits: Code width in [2, 8]. Static.

    Returns:
        A `QuantizedSignature` with `signature`'s structure in each field.

    Raises:
        TypeError, ValueError: if `bits` is not an int in [2, 8].

    Example:
        >>> q = cljax.rws_quantize({"w": jnp.array([1.0, -0.6, 0.0])}, bits=2)
        >>> q.codes["w"]
        Array([ 1, -1,  0], dtype=int8)
    """
    fn = "rws_quantize"
    _checks.check_int(fn, "bits", bits, 2)
    if bits > 8:
        raise ValueError(f"{fn}(bits=...) must be <= 8 (codes are stored as int8), got {bits}.")
    top = 2 ** (bits - 1) - 1
    leaves, treedef = jax.tree.flatten(signature)
    codes, steps = [], []
    for leaf in leaves:
        code, step = _quantize_leaf(leaf, top=top)
        codes.append(code)
        steps.append(step)
    return QuantizedSignature(
        codes=jax.tree.unflatten(treedef, codes), step=jax.tree.unflatten(treedef, steps)
    )


def rws_dequantize(quantized: QuantizedSignature) -> Any:
    """Decodes a `QuantizedSignature` to float32 leaves ``code * step``.

    Args:
        quantized: The output of `rws_quantize`.

    Returns:
        A float32 signature pytree, ready for `rws_patch`.

    Raises:
        TypeError: if `quantized` is not a `QuantizedSignature`.

    Example:
        >>> q = cljax.rws_quantize({"w": jnp.array([1.0, -0.5])}, bits=8)
        >>> cljax.rws_dequantize(q)["w"].dtype
        dtype('float32')
    """
    if not isinstance(quantized, QuantizedSignature):
        raise TypeError(
            f"rws_dequantize(quantized=...) must be a QuantizedSignature, got "
            f"{type(quantized).__name__}."
        )
    return jax.tree.map(
        lambda c, s: c.astype(jnp.float32) * _f32(s), quantized.codes, quantized.step
    )


# ---------------------------------------------------------------------------------------------
# MG-21: Shadow-FT.


def shadow_ft(
    instruct: Any,
    base: Any,
    tuned_base: Any,
    *,
    mask: Any = None,
    skip_mismatched: bool = False,
) -> Any:
    """Grafts a base model's fine-tuning delta onto its instruct model (Shadow-FT).

    Per leaf: ``theta_I' = theta_I + (theta_B' - theta_B)``, computed in float32.

    Args:
        instruct: The instruct model's parameters ``theta_I``.
        base: The paired base model's parameters ``theta_B`` (same architecture).
        tuned_base: The base model after fine-tuning ``theta_B'`` (a LoRA delta must be merged
            into the weights first).
        mask: Optional tree of bools with `instruct`'s structure: leaves marked False keep
            ``theta_I``.
        skip_mismatched: If True, leaves whose shape differs between `instruct` and `base`
            (e.g. embeddings of a different vocabulary) keep ``theta_I``; if False they raise.
            Static.

    Returns:
        The grafted instruct parameters, with `instruct`'s structure and dtypes.

    Raises:
        ValueError: if `base` and `tuned_base` differ in structure or shapes, `instruct` differs
            in structure (or in shapes without `skip_mismatched`), or `mask` does not fit.
        TypeError: if `mask` is a callable.

    Example:
        >>> instruct = {"w": jnp.array([1.0, 2.0])}
        >>> base, tuned = {"w": jnp.zeros(2)}, {"w": jnp.array([0.5, 0.0])}
        >>> cljax.shadow_ft(instruct, base, tuned)["w"]
        Array([1.5, 2. ], dtype=float32)

    References:
        Wu et al., "Shadow-FT: Tuning Instruct via Base", 2025. https://arxiv.org/abs/2505.12716
    """
    fn = "shadow_ft"
    _checks.check_choice(fn, "skip_mismatched", skip_mismatched, (False, True))
    _checks.check_same_structure(fn, base=base, tuned_base=tuned_base)
    if jax.tree.structure(instruct) != jax.tree.structure(base):
        raise ValueError(
            f"{fn}: `instruct` has a different tree structure from `base`: "
            f"{jax.tree.structure(instruct)} vs {jax.tree.structure(base)}."
        )
    if not skip_mismatched:
        _checks.check_same_structure(fn, base=base, instruct=instruct)
    keep = _resolve_mask(fn, mask, instruct, "instruct")
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(instruct)
    out = []
    for (_, i_leaf), b, t, k in zip(
        paths_leaves, jax.tree.leaves(base), jax.tree.leaves(tuned_base), keep, strict=True
    ):
        if jnp.shape(i_leaf) != jnp.shape(b):
            out.append(i_leaf)  # only reachable with skip_mismatched
            continue
        out.append(_add_masked_difference(i_leaf, t, b, jnp.asarray(k, jnp.bool_)))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# MG-22: Weight Aligning.


def _check_kernel(fn: str, kernel: Any, num_old: int, class_axis: int) -> None:
    if not hasattr(kernel, "shape"):
        raise TypeError(f"{fn}(kernel=...) must be an array, got {type(kernel).__name__}.")
    shape = tuple(kernel.shape)
    if len(shape) < 2:
        raise ValueError(
            f"{fn}: `kernel` has shape {shape}; it needs at least 2 dims with classes along "
            "`class_axis`. Pass the classifier's weight matrix."
        )
    _checks.check_int(fn, "class_axis", class_axis, -len(shape))
    if class_axis >= len(shape):
        raise ValueError(
            f"{fn}(class_axis=...) must be < {len(shape)} for shape {shape}, got {class_axis}."
        )
    classes = shape[class_axis]
    _checks.check_int(fn, "num_old", num_old, 1)
    if num_old >= classes:
        raise ValueError(
            f"{fn}(num_old=...) must be < the {classes} classes along axis {class_axis} of shape "
            f"{shape} (at least one new class), got {num_old}."
        )


@functools.partial(jax.jit, static_argnames=("num_old", "class_axis"))
def _class_gamma(kernel, *, num_old, class_axis):
    """``mean_old ||w_c|| / mean_new ||w_c||`` (1 when the new norms are all zero)."""
    classes = kernel.shape[class_axis]
    rows = jnp.moveaxis(_f32(kernel), class_axis, 0).reshape(classes, -1)
    s = _unit_scale(jnp.max(jnp.abs(rows), axis=1))
    norms = s * jnp.sqrt(jnp.sum(jnp.square(rows / s[:, None]), axis=1))
    return _safe_div(jnp.mean(norms[:num_old]), jnp.mean(norms[num_old:]), 1.0)


def weight_align_factor(kernel: Any, *, num_old: int, class_axis: int = -1) -> jax.Array:
    """Returns Weight Aligning's ``gamma = mean_old ||w_c|| / mean_new ||w_c||``.

    Args:
        kernel: The classifier weights, classes along `class_axis`; the first `num_old` classes
            are old, the rest new.
        num_old: Number of old classes, in [1, classes - 1]. Static.
        class_axis: The class axis: -1 for a Flax ``(d_in, classes)`` kernel, 0 for a PyTorch
            ``(classes, d_in)`` weight. Static.

    Returns:
        A float32 scalar; 1 when every new-class weight is zero.

    Raises:
        TypeError, ValueError: for a non-array or <2-D kernel, or a bad `num_old` / `class_axis`.

    Example:
        >>> kernel = jnp.array([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]])  # (d_in=2, classes=3)
        >>> float(cljax.weight_align_factor(kernel, num_old=2))  # mean(5, 0) / 1
        2.5

    References:
        Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning",
        CVPR 2020. https://arxiv.org/abs/1911.07053
    """
    _check_kernel("weight_align_factor", kernel, num_old, class_axis)
    return _class_gamma(kernel, num_old=num_old, class_axis=class_axis % kernel.ndim)


def weight_align(kernel: Any, *, num_old: int, class_axis: int = -1) -> jax.Array:
    """Rescales new-class weights to the old classes' mean norm (Weight Aligning).

    ``w_c <- gamma * w_c`` for every new class ``c``, with
    ``gamma = mean_{c old} ||w_c|| / mean_{c new} ||w_c||`` (norms over all other axes); old
    classes are unchanged. Call it after each incremental task's training (with distillation).

    Args:
        kernel: The classifier weights; the first `num_old` classes along `class_axis` are old.
        num_old: Number of old classes, in [1, classes - 1]. Static.
        class_axis: -1 for a Flax ``(d_in, classes)`` kernel, 0 for a PyTorch weight. Static.

    Returns:
        The aligned kernel, with `kernel`'s shape and dtype.

    Raises:
        TypeError, ValueError: for a non-array or <2-D kernel, or a bad `num_old` / `class_axis`.

    Example:
        >>> kernel = jnp.array([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]])
        >>> cljax.weight_align(kernel, num_old=2)[:, 2]
        Array([2.5, 0. ], dtype=float32)

    Notes:
        * Biases are left as they are (as in PyCIL's implementation); scale a bias yourself with
          `weight_align_factor` if wanted. The paper's non-negative weight clipping during
          training is not part of this function.

    References:
        Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning",
        CVPR 2020. https://arxiv.org/abs/1911.07053
    """
    _check_kernel("weight_align", kernel, num_old, class_axis)
    return _weight_align_impl(kernel, num_old=num_old, class_axis=class_axis % kernel.ndim)


@functools.partial(jax.jit, static_argnames=("num_old", "class_axis"))
def _weight_align_impl(kernel, *, num_old, class_axis):
    classes = kernel.shape[class_axis]
    gamma = _class_gamma(kernel, num_old=num_old, class_axis=class_axis)
    factor = jnp.where(jnp.arange(classes) >= num_old, gamma, 1.0).reshape(
        tuple(classes if a == class_axis else 1 for a in range(kernel.ndim))
    )
    return (_f32(kernel) * factor).astype(kernel.dtype)


# ---------------------------------------------------------------------------------------------
# MG-47: SLERP.


@functools.partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def _slerp_leaf(a, b, t, *, dot_threshold, eps):
    a32, b32 = _f32(a), _f32(b)
    na, nb = _norm(a32), _norm(b32)
    ua = jnp.where(na > eps, a32 / jnp.where(na > eps, na, 1.0), a32)
    ub = jnp.where(nb > eps, b32 / jnp.where(nb > eps, nb, 1.0), b32)
    dot = jnp.clip(jnp.sum(ua * ub), -1.0, 1.0)
    linear = jnp.abs(dot) > dot_threshold
    omega = jnp.arccos(jnp.where(linear, 0.0, dot))
    sin_omega = jnp.sin(omega)
    s0 = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin_omega)
    s1 = jnp.where(linear, t, jnp.sin(t * omega) / sin_omega)
    return (s0 * a32 + s1 * b32).astype(_dtype(a))


def slerp(
    a: Any,
    b: Any,
    *,
    t: jax.typing.ArrayLike,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> Any:
    """Spherical linear interpolation of two models, leaf by leaf (SLERP merging).

    Per leaf (per tensor, flattened): ``cos(Omega) = <a, b> / (|a| |b|)`` and
    ``slerp = [sin((1 - t) Omega) a + sin(t Omega) b] / sin(Omega)``; where
    ``|cos(Omega)| > dot_threshold`` (nearly parallel or anti-parallel) it falls back to
    ``(1 - t) a + t b``. The norms only set the angle; `a` and `b` enter unnormalized.

    Args:
        a: The first model's parameters (returned at ``t = 0``).
        b: The second model's parameters (returned at ``t = 1``), with `a`'s structure.
        t: Interpolation weight in [0, 1].
        dot_threshold: Cosine magnitude above which linear interpolation is used. Static.
        eps: Leaves with a norm at most `eps` are not normalized. Static.

    Returns:
        The interpolated parameters, with `a`'s structure and dtypes.

    Raises:
        ValueError: if trees or shapes differ, or `t` / `dot_threshold` / `eps` are out of range.

    Example:
        >>> a, b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
        >>> cljax.slerp(a, b, t=0.5)["w"]  # on the unit circle, not the chord
        Array([0.70710677, 0.70710677], dtype=float32)

    Notes:
        * Follows mergekit's ``slerp`` (threshold 0.9995, normalization guard `eps`); which
          tensors and ``t`` the domain-adaptation study used are unverified (card MG-47).

    References:
        Lu, Luu and Buehler, "Fine-tuning large language models for domain adaptation:
        Exploration of training strategies, scaling, model merging and synergistic
        capabilities", 2024. https://arxiv.org/abs/2409.03444
    """
    fn = "slerp"
    _checks.check_same_structure(fn, a=a, b=b)
    _checks.check_in_range(fn, "t", t, 0.0, 1.0)
    _checks.check_in_range(fn, "dot_threshold", dot_threshold, 0.0, 1.0)
    _checks.check_in_range(fn, "eps", eps, 0.0)
    t32 = jnp.asarray(t, jnp.float32)
    return jax.tree.map(
        lambda x, y: _slerp_leaf(x, y, t32, dot_threshold=float(dot_threshold), eps=float(eps)),
        a,
        b,
    )
