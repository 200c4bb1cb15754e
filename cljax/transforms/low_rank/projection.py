"""Gradient low-rank projection around any inner transform: GaLore and Online Subspace Descent.

For every matrix leaf (a `MatrixSpec` view; stacked leaves are batches of matrices) the gradient
``G`` (``m x n``) is projected onto a rank-``r`` basis, the inner transform runs on the small
projected gradient, and its output is projected back and scaled:

* left side: ``P`` is ``(m, r)``, ``R = Pᵀ G`` is ``(r, n)``, the direction is ``scale · P N``;
* right side: ``Q`` is ``(n, r)``, ``R = G Q`` is ``(m, r)``, the direction is ``scale · N Qᵀ``.

Leaves that are not matrices go to a fallback transform. The basis is refreshed by a `lax.cond` on
the step count, outside any `vmap` over stacked matrices.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cljax import _checks
from cljax.kernels import _common as _kernel_common
from cljax.kernels import _dispatch, _galore
from cljax.transforms.low_rank import _bases
from cljax.tree import MatrixSpec, as_matrices, from_matrices, matrix_shape

__all__ = ["ScaleByLowRankProjectionState", "scale_by_low_rank_projection"]

Side = Literal["std", "reverse_std", "left", "right"]
Projector = Literal["svd", "randomized", "subspace_iteration", "random", "online_pca"]
OnRefresh = Literal["keep", "reset", "reproject"]
Layout = Literal["flax", "torch"]
InactiveUpdate = Literal["sign_sgd", "sgd", "none"]
_SIDES = ("std", "reverse_std", "left", "right")
_PROJECTORS = ("svd", "randomized", "subspace_iteration", "random", "online_pca")
_ON_REFRESH = ("keep", "reset", "reproject")
_LAYOUTS = ("flax", "torch")
_INACTIVE = ("sign_sgd", "sgd", "none")
# Inner-state fields holding second moments: `reproject` rotates them with the squared rotation.
_SECOND_MOMENT_FIELDS = frozenset({"nu", "nu_max", "sum_of_squares", "v", "exp_avg_sq"})
_MASKED = optax.MaskedNode()
# Adam hyper-parameters of the inner transforms made by `_adam_inner`, keyed by their update
# function: the fused GaLore kernel (`cljax.kernels.galore_adam_step`) can replace them.
_ADAM_INNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_adam_of(inner: Any) -> dict | None:
    """The Adam hyper-parameters of an `_adam_inner` transform; None for any other inner."""
    try:
        return _ADAM_INNERS.get(inner.update)
    except TypeError:  # an update function that cannot be weakly referenced
        return None


def _adam_inner(
    b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, eps_root: Any = 0.0, mu_dtype: Any = None
) -> optax.GradientTransformation:
    """`optax.scale_by_adam(...)`, recorded as an inner transform the fused kernel can run."""
    tx = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)
    _ADAM_INNERS[tx.update] = {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root}
    return tx


class ScaleByLowRankProjectionState(NamedTuple):
    """State of `scale_by_low_rank_projection`.

    `projector`, `inner` and `projector_opt` mirror the parameter tree: each matrix leaf holds its
    own entry, every other leaf an empty `optax.MaskedNode`.
    """

    count: chex.Array  # int32 number of steps taken
    key: chex.Array  # uint32 PRNG key data ('randomized' and 'random' projectors)
    projector: optax.Params  # float32 (*batch, d, r) basis per matrix leaf (none for 'random')
    inner: optax.Params  # `inner`'s state on each projected leaf
    fallback: optax.OptState  # `fallback`'s state on the leaves that are not matrices
    projector_opt: optax.Params  # 'online_pca': the projector optimizer's state per matrix leaf


class _Plan(NamedTuple):
    """Static facts about one matrix leaf."""

    index: int  # position among the matrix leaves (tree order)
    spec: MatrixSpec
    name: str
    batch_shape: tuple[int, ...]
    m: int
    n: int
    left: bool  # True: P (m, r) and R = Pᵀ G; False: Q (n, r) and R = G Q
    rank: int
    offset: int  # refresh phase in [0, refresh_every) ('stagger')

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def d(self) -> int:  # length of the basis vectors
        return self.m if self.left else self.n

    @property
    def projector_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.d, self.rank)

    @property
    def projected_shape(self) -> tuple[int, ...]:
        low = (self.rank, self.n) if self.left else (self.m, self.rank)
        return (*self.batch_shape, *low)


def _is_left(side: str, layout: str, m: int, n: int) -> bool:
    """Whether the basis spans columns of ``G`` (left projector) for a side and layout.

    'std' keeps the larger dimension and compresses the smaller one; 'reverse_std' does the
    opposite. The tie (square matrices) is broken as the reference GaLore does on its PyTorch
    ``(d_out, d_in)`` weight: a 'flax' ``(d_in, d_out)`` view is transposed first.
    """
    if side in ("left", "right"):
        return side == "left"
    tm, tn = (m, n) if layout == "torch" else (n, m)
    right_on_reference = tm >= tn
    if side == "reverse_std":
        right_on_reference = not right_on_reference
    # A right projector on the transposed (PyTorch) view is a left projector on the flax view.
    return right_on_reference if layout == "flax" else not right_on_reference


def _resolve_specs(fn: str, tree: Any, matrix_spec: Any) -> tuple[list, list, Any]:
    """Returns ``(paths_and_leaves, specs, treedef)``: a MatrixSpec or None per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if isinstance(matrix_spec, MatrixSpec):
        specs = [matrix_spec if jnp.ndim(leaf) >= 2 else None for _, leaf in leaves]
    else:
        chosen = matrix_spec(tree)
        try:
            specs = treedef.flatten_up_to(chosen)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{fn}: `matrix_spec(params)` must return a tree with the structure of the "
                f"parameters, a MatrixSpec or None per leaf ({err})."
            ) from err
        for (path, _), spec in zip(leaves, specs, strict=True):
            if spec is not None and not isinstance(spec, MatrixSpec):
                raise TypeError(
                    f"{fn}: `matrix_spec(params)` gives {spec!r} for leaf "
                    f"'{_checks.leaf_name(path)}'; each entry must be a MatrixSpec or None."
                )
    return leaves, specs, treedef


def _plans(fn, tree, matrix_spec, side, layout, rank_fn, refresh_every, stagger):
    leaves, specs, treedef = _resolve_specs(fn, tree, matrix_spec)
    n_matrices = sum(spec is not None for spec in specs)
    plans, index = [], 0
    for (path, leaf), spec in zip(leaves, specs, strict=True):
        if spec is None:
            plans.append(None)
            continue
        name = _checks.leaf_name(path)
        shape = tuple(jnp.shape(leaf))
        batch_axes, _, _ = spec.axes(len(shape), name)
        _, m, n = matrix_shape(shape, spec, name)
        if m == 0 or n == 0:
            raise ValueError(
                f"{fn}: leaf '{name}' has shape {shape}; a matrix view of shape ({m}, {n}) is empty."
            )
        offset = (index * refresh_every) // n_matrices if stagger else 0
        plans.append(
            _Plan(
                index=index,
                spec=spec,
                name=name,
                batch_shape=tuple(shape[a] for a in batch_axes),
                m=m,
                n=n,
                left=_is_left(side, layout, m, n),
                rank=rank_fn(m, n),
                offset=offset,
            )
        )
        index += 1
    return leaves, plans, treedef


def _refresh_due(count: jax.Array, plan: _Plan, refresh_every: int, projector: str) -> jax.Array:
    if projector == "online_pca":
        return count == 0
    if plan.offset == 0:
        return count % refresh_every == 0
    return jnp.logical_or(count == 0, count % refresh_every == plan.offset)


def _last_refresh(count: jax.Array, plan: _Plan, refresh_every: int) -> jax.Array:
    """The step of the most recent refresh at or before `count`."""
    if plan.offset == 0:
        return count - count % refresh_every
    since = count - (count - plan.offset) % refresh_every
    return jnp.where(count < plan.offset, 0, since)


def _path_names(path) -> set[str]:
    names = set()
    for key in path:
        for attr in ("name", "key"):
            value = getattr(key, attr, None)
            if isinstance(value, str):
                names.add(value)
    return names


def _reproject(fn: str, plan: _Plan, old: jax.Array, new: jax.Array, inner_state: Any) -> Any:
    """Rotates every moment of the inner state from basis `old` to basis `new` (both (b, d, r))."""
    rotation = jnp.einsum("bdi,bdj->bij", new, old)  # (b, r, r): coordinates old -> new
    squared = rotation * rotation

    def rotate(path, x):
        if not hasattr(x, "shape") or tuple(x.shape) != plan.projected_shape:
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{fn}(on_refresh='reproject'): leaf '{plan.name}' has an inner-state entry of "
                f"dtype {x.dtype}; only floating-point moments can be rotated. Use "
                "on_refresh='keep' or 'reset' with quantized inner states."
            )
        rot = squared if _path_names(path) & _SECOND_MOMENT_FIELDS else rotation
        mats = x.astype(jnp.float32).reshape(plan.batch, *plan.projected_shape[-2:])
        if plan.left:
            out = jnp.einsum("bij,bjn->bin", rot, mats)
        else:
            out = jnp.einsum("bmj,bij->bmi", mats, rot)
        return out.reshape(x.shape).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(rotate, inner_state)


def _pca_loss(basis: jax.Array, target: jax.Array) -> jax.Array:
    """Online-PCA objective ``‖P Pᵀ X − X‖_F²`` for one ``(d, r)`` basis and ``(d, k)`` target."""
    err = basis @ (basis.T @ target) - target
    return jnp.sum(err * err)


def _oriented(g: jax.Array, left: bool) -> jax.Array:
    """``(b, d, k)``: the stacked matrices whose column space the basis spans."""
    return g if left else jnp.swapaxes(g, -1, -2)


def _low_rank_core(
    fn: str,
    state_cls: type,
    *,
    inner: optax.GradientTransformation,
    fallback: optax.GradientTransformation,
    rank_fn: Callable[[int, int], int],
    refresh_every: int,
    scale: Any,
    side: str,
    projector: str,
    on_refresh: str,
    matrix_spec: Any,
    stagger: bool,
    layout: str,
    seed: int,
    oversample: int,
    power_iters: int,
    projector_optimizer: optax.GradientTransformation | None,
    reorthonormalize: bool,
    residual: str,
    residual_scale: Any,
    impl: str = "xla",
    fused_adam: dict | None = None,
) -> optax.GradientTransformationExtraArgs:
    inner = optax.with_extra_args_support(inner)

    def use_kernel(plan: _Plan, dtype: Any) -> bool:
        """Whether this leaf's projection, Adam step and back-projection run fused."""
        if impl == "xla" or fused_adam is None or residual != "none":
            return False
        if impl == "pallas":
            return True
        key = (plan.m, plan.n, plan.rank)
        return _dispatch.choose("galore_adam_step", key, str(jnp.dtype(dtype))) == "pallas"

    fallback = optax.with_extra_args_support(fallback)

    def plans_of(tree):
        return _plans(fn, tree, matrix_spec, side, layout, rank_fn, refresh_every, stagger)

    def init_fn(params):
        leaves, plans, treedef = plans_of(params)
        projectors, inner_states, popt_states, fallback_leaves = [], [], [], []
        for (_, leaf), plan in zip(leaves, plans, strict=True):
            if plan is None:
                projectors.append(_MASKED)
                inner_states.append(_MASKED)
                popt_states.append(_MASKED)
                fallback_leaves.append(leaf)
                continue
            dtype = jnp.result_type(leaf)
            zeros_basis = jnp.zeros(plan.projector_shape, jnp.float32)
            projectors.append(_MASKED if projector == "random" else zeros_basis)
            inner_states.append(inner.init(jnp.zeros(plan.projected_shape, dtype)))
            popt_states.append(
                projector_optimizer.init(zeros_basis) if projector == "online_pca" else _MASKED
            )
            fallback_leaves.append(_MASKED)
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            projector=treedef.unflatten(projectors),
            inner=treedef.unflatten(inner_states),
            fallback=fallback.init(treedef.unflatten(fallback_leaves)),
            projector_opt=treedef.unflatten(popt_states),
        )

    def projected_step(plan, g, mats, basis, inner_state, scale_now, extra_args):
        """Projection, `inner` on the projected gradient, back-projection and scale (XLA)."""
        dtype = g.dtype
        if plan.left:
            low = jnp.einsum("bmr,bmn->brn", basis, mats)
        else:
            low = jnp.einsum("bmn,bnr->bmr", mats, basis)
        low = low.reshape(plan.projected_shape).astype(dtype)
        direction, inner_state = inner.update(low, inner_state, None, **extra_args)
        direction = direction.astype(jnp.float32).reshape(plan.batch, *plan.projected_shape[-2:])
        if plan.left:
            full = jnp.einsum("bmr,brn->bmn", basis, direction)
        else:
            full = jnp.einsum("bmr,bnr->bmn", direction, basis)

        if residual != "none" and plan.rank < min(plan.m, plan.n):  # full rank: no residual
            if plan.left:
                kept = jnp.einsum("bmr,brn->bmn", basis, jnp.einsum("bmr,bmn->brn", basis, mats))
            else:
                kept = jnp.einsum("bmr,bnr->bmn", jnp.einsum("bmn,bnr->bmr", mats, basis), basis)
            rest = mats - kept
            free = jnp.sign(rest) if residual == "sign_sgd" else rest
            full = full + jnp.asarray(residual_scale, jnp.float32) * free

        full = full * jnp.asarray(scale_now, jnp.float32)
        return from_matrices(full, plan.spec, g.shape, plan.name).astype(dtype), inner_state

    def matrix_update(plan, g, basis_entry, inner_state, popt_state, count, key, extra_args):
        dtype = g.dtype
        mats = as_matrices(g, plan.spec, plan.name).astype(jnp.float32)  # (b, m, n)
        oriented = _oriented(mats, plan.left)  # (b, d, k)
        due = _refresh_due(count, plan, refresh_every, projector)
        leaf_key = jax.random.fold_in(jax.random.wrap_key_data(key), plan.index)

        def random_bases(step):
            keys = jax.random.split(jax.random.fold_in(leaf_key, step), plan.batch)
            return jax.vmap(lambda k: _bases.random_basis(k, plan.d, plan.rank))(keys)

        def build(old):
            if projector in ("svd", "online_pca"):
                return jax.vmap(lambda a: _bases.svd_basis(a, plan.rank, left=True))(oriented)
            keys = jax.random.split(jax.random.fold_in(leaf_key, count), plan.batch)
            randomized = lambda: jax.vmap(
                lambda a, k: _bases.randomized_basis(
                    a, plan.rank, k, oversample=oversample, power_iters=power_iters
                )
            )(oriented, keys)
            if projector == "randomized":
                return randomized()
            warm = lambda: jax.vmap(
                lambda a, p: _bases.subspace_iteration_basis(a, p, power_iters=power_iters)
            )(oriented, old)
            return jax.lax.cond(count == 0, randomized, warm)  # the first basis has no warm start

        def on_new_basis(old, new, state):
            if on_refresh == "reset":
                return inner.init(jnp.zeros(plan.projected_shape, dtype))
            if on_refresh == "reproject":
                return _reproject(fn, plan, old, new, state)
            return state

        if projector == "random":
            basis = random_bases(_last_refresh(count, plan, refresh_every))
            if on_refresh != "keep":
                previous = lambda: random_bases(
                    _last_refresh(jnp.maximum(count - 1, 0), plan, refresh_every)
                )
                inner_state = jax.lax.cond(
                    due, lambda: on_new_basis(previous(), basis, inner_state), lambda: inner_state
                )
            new_entry = basis_entry
        else:
            old = basis_entry.reshape(plan.batch, plan.d, plan.rank)

            def refresh():
                new = build(old)
                return new, on_new_basis(old, new, inner_state)

            basis, inner_state = jax.lax.cond(due, refresh, lambda: (old, inner_state))
            new_entry = basis

        scale_now = scale(count) if callable(scale) else scale
        if use_kernel(plan, dtype):
            out, inner_state = _fused_adam_step(plan, g, basis, inner_state, scale_now, fused_adam)
        else:
            out, inner_state = projected_step(
                plan, g, mats, basis, inner_state, scale_now, extra_args
            )

        if projector == "online_pca":
            norms = jnp.sqrt(jnp.sum(oriented * oriented, axis=(1, 2), keepdims=True))
            target = oriented / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
            grad = jax.vmap(jax.grad(_pca_loss))(basis, target)
            stored = basis.reshape(plan.projector_shape)
            step, popt_state = projector_optimizer.update(
                grad.reshape(plan.projector_shape), popt_state, stored
            )
            moved = (stored + step.astype(jnp.float32)).reshape(plan.batch, plan.d, plan.rank)
            if reorthonormalize:
                moved = jax.vmap(lambda p: jnp.linalg.qr(p)[0])(moved)
            new_entry = moved
        if projector != "random":
            new_entry = new_entry.reshape(plan.projector_shape)
        return out, new_entry, inner_state, popt_state

    def update_fn(updates, state, params=None, **extra_args):
        leaves, plans, treedef = plans_of(updates)
        projectors = treedef.flatten_up_to(state.projector)
        inner_states = treedef.flatten_up_to(state.inner)
        popt_states = treedef.flatten_up_to(state.projector_opt)
        param_leaves = None if params is None else treedef.flatten_up_to(params)
        fallback_grads, fallback_params = [], []
        for i, ((_, leaf), plan) in enumerate(zip(leaves, plans, strict=True)):
            fallback_grads.append(leaf if plan is None else _MASKED)
            if param_leaves is not None:
                fallback_params.append(param_leaves[i] if plan is None else _MASKED)
        fallback_out, fallback_state = fallback.update(
            treedef.unflatten(fallback_grads),
            state.fallback,
            None if params is None else treedef.unflatten(fallback_params),
            **extra_args,
        )
        fallback_leaves = iter(jax.tree.leaves(fallback_out))

        outs, new_proj, new_inner, new_popt = [], [], [], []
        for (_, leaf), plan, basis_entry, inner_state, popt_state in zip(
            leaves, plans, projectors, inner_states, popt_states, strict=True
        ):
            if plan is None:
                outs.append(next(fallback_leaves))
                new_proj.append(basis_entry)
                new_inner.append(inner_state)
                new_popt.append(popt_state)
                continue
            out, basis_entry, inner_state, popt_state = matrix_update(
                plan, leaf, basis_entry, inner_state, popt_state, state.count, state.key, extra_args
            )
            outs.append(out)
            new_proj.append(basis_entry)
            new_inner.append(inner_state)
            new_popt.append(popt_state)
        new_state = state_cls(
            count=optax.safe_increment(state.count),
            key=state.key,
            projector=treedef.unflatten(new_proj),
            inner=treedef.unflatten(new_inner),
            fallback=fallback_state,
            projector_opt=treedef.unflatten(new_popt),
        )
        return treedef.unflatten(outs), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _fused_adam_step(
    plan: _Plan, g: jax.Array, basis: jax.Array, state: Any, scale_now: Any, hyper: dict
) -> tuple[jax.Array, Any]:
    """`projected_step` for an Adam inner, as the fused kernel `cljax.kernels.galore_adam_step`.

    The kernel's epilogue ``-lr · (scale · back + wd · p)`` with ``lr = -1`` and ``wd = 0`` is the
    scaled direction ``scale · back``; the Adam state (`optax.ScaleByAdamState`) keeps its layout.
    """
    low_shape = plan.projected_shape[-2:]
    mats = as_matrices(g, plan.spec, plan.name)  # (b, m, n), g's dtype: the kernel reads float32
    operands = (
        mats,
        basis,
        state.mu.reshape(plan.batch, *low_shape),
        state.nu.reshape(plan.batch, *low_shape),
    )
    if not plan.batch_shape:  # one matrix: no vmap over a batch of one
        operands = tuple(x[0] for x in operands)
    full, mu, nu = _galore.galore_adam_step(
        *operands,
        state.count,
        side="left" if plan.left else "right",
        learning_rate=-1.0,
        scale=scale_now,
        impl="pallas",
        **hyper,
    )
    full = full.reshape(plan.batch, plan.m, plan.n)
    out = from_matrices(full, plan.spec, g.shape, plan.name).astype(g.dtype)
    state = state._replace(
        count=optax.safe_increment(state.count),
        mu=mu.reshape(state.mu.shape),
        nu=nu.reshape(state.nu.shape),
    )
    return out, state


def _check_common(
    fn,
    inner,
    fallback,
    refresh_every,
    side,
    projector,
    on_refresh,
    layout,
    matrix_spec,
    stagger,
    seed,
    oversample,
    power_iters,
):
    _checks.check_transform(fn, "inner", inner)
    if fallback is not None:
        _checks.check_transform(fn, "fallback", fallback)
    _checks.check_int(fn, "refresh_every", refresh_every, 1)
    _checks.check_choice(fn, "side", side, _SIDES)
    _checks.check_choice(fn, "projector", projector, _PROJECTORS)
    _checks.check_choice(fn, "on_refresh", on_refresh, _ON_REFRESH)
    _checks.check_choice(fn, "layout", layout, _LAYOUTS)
    if not isinstance(matrix_spec, MatrixSpec) and not callable(matrix_spec):
        raise TypeError(
            f"{fn}(matrix_spec=...) must be a MatrixSpec or a function params -> tree of "
            f"MatrixSpec / None, got {type(matrix_spec).__name__}."
        )
    if not isinstance(stagger, bool):
        raise TypeError(f"{fn}(stagger=...) must be a bool, got {stagger!r}.")
    _checks.check_int(fn, "seed", seed, 0)
    _checks.check_int(fn, "oversample", oversample, 0)
    if power_iters is not None:
        _checks.check_int(fn, "power_iters", power_iters, 0)


def scale_by_low_rank_projection(
    inner: optax.GradientTransformation | None = None,
    *,
    rank: int = 128,
    refresh_every: int = 200,
    scale: optax.ScalarOrSchedule = 1.0,
    side: Side = "std",
    projector: Projector = "svd",
    on_refresh: OnRefresh = "keep",
    matrix_spec: MatrixSpec | Callable[[Any], Any] = MatrixSpec(),
    fallback: optax.GradientTransformation | None = None,
    stagger: bool = False,
    layout: Layout = "flax",
    seed: int = 0,
    oversample: int = 8,
    power_iters: int | None = None,
    projector_optimizer: optax.GradientTransformation | None = None,
    reorthonormalize: bool = False,
    impl: Literal["auto", "xla", "pallas"] = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` on each matrix gradient projected onto a rank-`rank` basis (GaLore).

    For a matrix view ``G`` (``m x n``) and step count ``t`` (before the increment, so the first
    step refreshes): if the basis is due, it is rebuilt from ``G`` (float32); the projected
    gradient ``R = Pᵀ G`` (``r x n``, left side) or ``R = G Q`` (``m x r``, right side) goes
    through `inner`; its output ``N`` comes back as ``scale · P N`` or ``scale · N Qᵀ``. Each
    matrix leaf has its own `inner` state, on the small ``R``; ``r = min(rank, m, n)``.

    Leaves with batch axes (stacked ``(L, m, n)`` layers) are ``L`` matrices, each with its own
    basis; the refresh is one `lax.cond` per leaf on the step count, outside the `vmap` over the
    stack. Leaves that `matrix_spec` does not select (by default those with fewer than two dims)
    go to `fallback`, unscaled. Place it before `optax.scale_by_learning_rate`; `inner` gets no
    `params` (its shapes differ), so put weight decay outside.

    Args:
        inner: The transform run on projected gradients (default `optax.scale_by_adam()`); it
            must not need `params` (not `optax.adamw`, LAMB or LARS).
        rank: Rank ``r`` of the projection. Static.
        refresh_every: Steps ``T`` between basis refreshes (the reference's ``update_proj_gap``);
            for ``'online_pca'`` it sets the default projector learning rate ``1/T``. Static.
        scale: Factor ``alpha`` on the projected leaves' output (0.25 in the reference recipes),
            a number or a schedule of the step count.
        side: ``'std'`` (reference GaLore): compress the smaller dimension (right projector for
            tall, left for wide matrices); ``'reverse_std'`` (optax's ``galore``): compress the
            larger one; ``'left'`` / ``'right'``: always that side. Static.
        projector: How the basis is built at a refresh: ``'svd'`` (exact, of the tall
            orientation); ``'randomized'`` (range finder with `oversample` extra columns and
            `power_iters` power iterations, default 2); ``'subspace_iteration'`` (`power_iters`
            rounds, default 1, of subspace iteration warm-started from the previous basis; the
            first basis is randomized); ``'random'`` (a random orthonormal basis regenerated
            each step from the key and the refresh step, so it is never stored); ``'online_pca'``
            (Online Subspace Descent: an SVD at step 0, then one `projector_optimizer` step per
            step on ``‖P Pᵀ Ĝ − Ĝ‖²``, ``Ĝ = G / ‖G‖_F``, after the basis was used). Static.
        on_refresh: What a refresh does to `inner`'s state: ``'keep'`` it (reference GaLore),
            ``'reset'`` it to ``inner.init`` (moments and step count), or ``'reproject'`` its
            moments into the new basis with ``M = P_newᵀ P_old`` (first moments by ``M``, second
            moments by ``M ⊙ M``, which keeps them non-negative). Static.
        matrix_spec: A `MatrixSpec` applied to every leaf with at least two dims, or a function
            ``params -> tree`` giving a `MatrixSpec` or None (fallback) per leaf, e.g.
            ``lambda p: jax.tree.map(lambda s: MatrixSpec() if s else None, cljax.select("attn|mlp")(p))``.
            Static.
        fallback: Transform for the other leaves (default: `inner`, i.e. Adam by default).
        stagger: Spread refreshes over the period: the ``i``-th of ``k`` matrix leaves refreshes
            at steps ``0`` and ``t ≡ ⌊i T / k⌋ (mod T)``, so no single step pays every SVD. Static.
        layout: ``'flax'`` (rows are inputs, ``(d_in, d_out)``) or ``'torch'`` (rows are outputs).
            Only decides the side of square matrices under ``'std'`` / ``'reverse_std'``, as the
            reference does on a PyTorch weight. Static.
        seed: Seed of the PRNG key kept in the state. Static.
        oversample: Extra sketch columns of the randomized range finder. Static.
        power_iters: Power (or subspace) iterations per refresh; None for the default. Static.
        projector_optimizer: ``'online_pca'`` only: optimizer of the basis (default
            ``optax.adamw(1 / refresh_every, weight_decay=0.01)``, PyTorch AdamW's defaults as in
            the reference).
        reorthonormalize: ``'online_pca'`` only: QR the basis after each projector step (off in
            the reference). Static.
        impl: How a matrix leaf's projection, Adam step and back-projection run when `inner`
            is Adam (``inner=None``, or `cljax.galore_adamw`'s): ``'pallas'`` as the fused
            kernel `cljax.kernels.galore_adam_step` (two tiled products whose epilogues update
            the moments and write the scaled direction; on the CPU in Pallas interpret mode, for
            tests), with the basis built as usual; ``'xla'`` as separate XLA ops; ``'auto'``
            (default) the kernel only on the leaves where `cljax.kernels` holds a measured win
            for the back end, dtype and ``(m, n, rank)`` (none yet, so XLA everywhere). Any
            other `inner` runs through XLA, and ``'pallas'`` then raises. Static.

    Returns:
        A transform whose state is `ScaleByLowRankProjectionState`.

    Raises:
        ValueError, TypeError: for invalid hyper-parameters or matrix specs (at construction
            or at `init`); ``impl='pallas'`` with an `inner` other than Adam.

    Example:
        >>> tx = cljax.scale_by_low_rank_projection(rank=2, refresh_every=10)
        >>> state = tx.init({"w": jnp.ones((8, 4)), "b": jnp.ones(4)})
        >>> state.projector["w"].shape, state.inner["w"].mu.shape
        ((4, 2), (8, 2))

    References:
        Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
        ICML 2024. https://arxiv.org/abs/2403.03507

        Liang et al., "Memory-Efficient LLM Training with Online Subspace Descent", 2024.
        https://arxiv.org/abs/2408.12857
    """
    fn = "scale_by_low_rank_projection"
    inner = _adam_inner() if inner is None else inner
    _check_common(
        fn,
        inner,
        fallback,
        refresh_every,
        side,
        projector,
        on_refresh,
        layout,
        matrix_spec,
        stagger,
        seed,
        oversample,
        power_iters,
    )
    _checks.check_int(fn, "rank", rank, 1)
    if not callable(scale):
        _checks.check_in_range(fn, "scale", scale)
    _kernel_common.check_impl(fn, impl)
    fused_adam = _fused_adam_of(inner)
    if impl == "pallas" and fused_adam is None:
        raise ValueError(
            f"{fn}(impl='pallas'): the fused GaLore kernel (cljax.kernels.galore_adam_step) runs "
            "Adam only; leave inner=None (optax.scale_by_adam's defaults) or use impl='xla' or "
            "'auto' with another inner transform."
        )
    if not isinstance(reorthonormalize, bool):
        raise TypeError(f"{fn}(reorthonormalize=...) must be a bool, got {reorthonormalize!r}.")
    if projector_optimizer is not None:
        _checks.check_transform(fn, "projector_optimizer", projector_optimizer)
    if projector == "online_pca" and projector_optimizer is None:
        projector_optimizer = optax.adamw(1.0 / refresh_every, weight_decay=0.01)
    if power_iters is None:
        power_iters = 1 if projector == "subspace_iteration" else 2
    return _low_rank_core(
        fn,
        ScaleByLowRankProjectionState,
        inner=inner,
        fallback=inner if fallback is None else fallback,
        rank_fn=lambda m, n: min(rank, m, n),
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
        projector_optimizer=projector_optimizer,
        reorthonormalize=reorthonormalize,
        residual="none",
        residual_scale=0.0,
        impl=impl,
        fused_adam=fused_adam,
    )
