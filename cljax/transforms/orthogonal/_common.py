"""Shared pieces of the orthogonal family (private).

* `resolve_where` / `around_inner`: the projection point of rule OR-P. Without an inner
  optimizer a transform projects what it receives; with one, ``where='gradient'`` projects the
  gradient before it and ``where='update'`` projects the final update it emits.
* `aligned_leaves`: extra arguments (memory gradients, activations) matched to the updates by
  key path, so they keep working under `optax.masked` / `optax.partition` (whose inner updates
  hold `optax.MaskedNode` where the extra argument still holds an array) and with `None` leaves.
* `orthonormal_extend`: appends the leading columns of a candidate block to a zero-padded
  fixed-capacity orthonormal basis, re-orthogonalised against it (used by GPM, FOT and PCA-OGD).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _checks

Where = Literal["update", "gradient"]
WHERES = ("update", "gradient")


def mm(a, b):
    """Float32 matmul at full precision (no TF32 / bf16 passes on GPU and TPU)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def is_empty(x: Any) -> bool:
    """True for the leaves a transform passes through: `None` and `optax.MaskedNode`."""
    return x is None or isinstance(x, optax.MaskedNode)


def path_name(path) -> str:
    return _checks.leaf_name(path)


def resolve_where(fn: str, inner: Any, where: Where | None) -> Where | None:
    """Checks `inner` / `where` and returns the projection point (None without `inner`)."""
    if inner is None:
        if where is not None:
            raise ValueError(
                f"{fn}(where=...) needs `inner`: without an inner optimizer the transform "
                "projects what it receives and its chain position decides. Pass `inner=` or drop `where`."
            )
        return None
    _checks.check_transform(fn, "inner", inner)
    where = "update" if where is None else where
    _checks.check_choice(fn, "where", where, WHERES)
    return where


def around_inner(project, inner, where, updates, inner_state, params, extra_args):
    """Runs ``project(x, descent)`` before or after `inner` and returns ``(out, inner_state)``.

    `descent` is True when `x` is a final update (it points against the gradient), which matters
    to the sign-sensitive constraints of GEM and A-GEM only.
    """
    if inner is None:
        return project(updates, False), inner_state
    inner = optax.with_extra_args_support(inner)
    if where == "gradient":
        return inner.update(project(updates, False), inner_state, params, **extra_args)
    out, inner_state = inner.update(updates, inner_state, params, **extra_args)
    return project(out, True), inner_state


def init_inner(inner, params):
    return optax.EmptyState() if inner is None else inner.init(params)


def aligned_leaves(fn: str, arg: str, updates: Any, other: Any, lead: tuple[int, ...] = ()) -> list:
    """Returns `other`'s leaves in the order of `updates`' leaves (`None` for empty ones).

    Leaves are matched by key path, so `other` may hold arrays where `updates` holds `None` or
    `optax.MaskedNode` (masked, partitioned or absent leaves); these are skipped. Every array
    leaf of `updates` needs a leaf of shape ``lead + update.shape`` in `other`.
    """
    other_leaves = jax.tree_util.tree_flatten_with_path(other, is_leaf=lambda x: x is None)[0]
    by_name = {path_name(p): x for p, x in other_leaves}
    up_leaves = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_empty)[0]
    known = {path_name(p) for p, _ in up_leaves}
    unknown = sorted(set(by_name) - known)
    if unknown:
        raise ValueError(
            f"{fn}: `{arg}` has leaf '{unknown[0]}', which the updates do not have. "
            f"Give `{arg}` the parameters' structure."
        )
    out = []
    for path, u in up_leaves:
        name = path_name(path)
        if is_empty(u):
            out.append(None)
            continue
        x = by_name.get(name)
        if x is None:
            raise ValueError(
                f"{fn}: leaf '{name}' has no entry in `{arg}`; give `{arg}` the parameters' structure."
            )
        want = tuple(lead) + tuple(u.shape)
        if tuple(jnp.shape(x)) != want:
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {tuple(jnp.shape(x))} in `{arg}`; it must be {want} "
                f"(the update's shape {tuple(u.shape)}"
                + (f" after the leading axes {tuple(lead)})." if lead else ").")
            )
        out.append(x)
    return out


def tree_dot(a: list, b: list) -> jax.Array:
    """Sum over aligned leaf lists of ``<a_i, b_i>`` in float32 (a global inner product)."""
    total = jnp.zeros([], jnp.float32)
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            continue
        total = total + jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
    return total


def is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def require_concrete(fn: str, **trees: Any) -> None:
    """Task-boundary functions run eagerly (they are jitted inside and check capacities)."""
    for name, tree in trees.items():
        if is_traced(tree):
            raise TypeError(
                f"{fn}: `{name}` is traced; call {fn} outside `jax.jit` (it compiles its own work "
                "once per shape and checks the capacity on the host)."
            )


def as_float(fn: str, arg: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{fn}({arg}=...) must be a number, got {type(value).__name__} {value!r}."
        ) from err


def orthonormal_extend(basis, count, cands, k_rule, s2, energy, rtol):
    """Appends up to `k_rule` leading columns of `cands` to a zero-padded orthonormal `basis`.

    Args:
        basis: (d, c) float32; columns ``[0, count)`` orthonormal, the rest zero.
        count: int32 number of valid columns.
        cands: (d, r) float32 unit candidate directions, most important first.
        k_rule: int32 number of candidates the selection rule asks for.
        s2: (r,) energies of the candidates (squared singular values).
        energy: scalar reference energy; candidates with ``s2 <= rtol * energy`` are dropped.
        rtol: relative energy below which a candidate is numerical noise.

    Returns:
        ``(basis, new_count, needed)``: `needed` is ``count + k`` before clipping to the
        capacity, `k` being the number of candidates kept. The appended columns are the leading
        candidates re-projected off the basis and orthonormalised (QR), so the whole basis stays
        orthonormal to float32 precision.
    """
    d, c = basis.shape
    r = cands.shape[1]
    resid = cands - mm(basis, mm(basis.T, cands))
    resid = resid - mm(basis, mm(basis.T, resid))  # twice is enough
    norms = jnp.linalg.norm(resid, axis=0)
    ok = (s2 > rtol * energy) & (norms > 0.5)  # noise, or a direction already in the basis
    k_ok = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    k = jnp.minimum(jnp.minimum(k_rule, k_ok), d - count).astype(jnp.int32)
    keep = (jnp.arange(r) < k).astype(jnp.float32)
    q, _ = jnp.linalg.qr(resid * keep[None, :])
    q = q * keep[None, :]
    j = jnp.arange(c)
    src = jnp.clip(j - count, 0, r - 1)
    take = (j >= count) & (j < count + k)
    new = jnp.where(take[None, :], jnp.take(q, src, axis=1), basis)
    needed = (count + k).astype(jnp.int32)
    return new, jnp.minimum(needed, c).astype(jnp.int32), needed


def left_singular(x):
    """Left singular vectors and values of a (d, n) matrix, decomposing its tall orientation."""
    d, n = x.shape
    if n > d:  # wide: decompose the tall transpose; its right vectors are our left ones
        _, s, vt = jnp.linalg.svd(x.T, full_matrices=False)
        return vt.T, s
    u, s, _ = jnp.linalg.svd(x, full_matrices=False)
    return u, s


def host_int(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def unzip_parts(parts: Any, n: int) -> list[Any]:
    """Splits a tree whose leaves are plain ``n``-tuples (or None) into ``n`` trees (None kept)."""
    is_part = lambda x: isinstance(x, tuple) and len(x) == n and not hasattr(x, "_fields")
    return [
        jax.tree.map(
            lambda x, i=i: None if x is None else x[i],
            parts,
            is_leaf=lambda x: x is None or is_part(x),
        )
        for i in range(n)
    ]
