"""Tests for the low-rank family's ready-made optimizers: `galore_adamw` against
`optax.contrib.galore`, and each optimizer against its documented chain (learning rate, decay on
every leaf, projector schedule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import cljax
from tests.helpers import assert_trees_close

PARAMS = {"w": jnp.full((10, 4), 0.5), "k": jnp.full((2, 6, 3), -0.3), "b": jnp.ones(4)}


def _grads(t):
    keys = jax.random.split(jax.random.key(t), 3)
    return {
        k: jax.random.normal(key, PARAMS[k].shape)
        for key, k in zip(keys, sorted(PARAMS), strict=True)
    }


def _train(tx, steps=6, params=PARAMS):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(steps):
        updates, state = step(_grads(t), state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_galore_adamw_reverse_std_matches_optax_galore_with_decay():
    params = {"w": PARAMS["w"], "b": PARAMS["b"]}  # optax skips stacked leaves: leave them out
    ours = cljax.galore_adamw(
        1e-2,
        rank=2,
        refresh_every=3,
        scale=1.0,
        side="reverse_std",
        layout="torch",
        weight_decay=0.1,
    )
    theirs = optax.contrib.galore(1e-2, rank=2, update_proj_gap=3, weight_decay=0.1)

    def train(tx):
        p, state = params, tx.init(params)
        for t in range(8):
            g = {k: v for k, v in _grads(t).items() if k in params}
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return p

    assert_trees_close(train(ours), train(theirs), rtol=1e-5, atol=1e-6)


def test_galore_adamw_is_its_chain():
    got = _train(cljax.galore_adamw(1e-2, rank=2, refresh_every=2, scale=0.25, weight_decay=0.1))
    want = _train(
        optax.chain(
            cljax.scale_by_low_rank_projection(
                optax.scale_by_adam(), rank=2, refresh_every=2, scale=0.25
            ),
            optax.add_decayed_weights(0.1),
            optax.scale_by_learning_rate(1e-2),
        )
    )
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_frugal_decays_every_parameter():
    got = _train(
        cljax.frugal(1e-2, density=0.5, refresh_every=2, weight_decay=0.1, inactive_scale=0.1)
    )
    want = _train(
        optax.chain(
            cljax.scale_by_frugal(
                optax.scale_by_adam(), density=0.5, refresh_every=2, inactive_scale=0.1
            ),
            optax.add_decayed_weights(0.1),
            optax.scale_by_learning_rate(1e-2),
        )
    )
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    # With zero gradients only the decay moves the parameters: p <- (1 - lr * wd) p, everywhere.
    tx = cljax.frugal(1e-2, density=0.5, weight_decay=0.1)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    u, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    assert_trees_close(u, jax.tree.map(lambda p: -1e-3 * p, PARAMS), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("projector", ["blocks", "coordinates"])
def test_frugal_at_full_density_equals_adamw(projector):
    # Every coordinate state-full and the statistics kept across refreshes: plain AdamW.
    got = _train(
        cljax.frugal(
            1e-2,
            density=1.0,
            refresh_every=2,
            weight_decay=0.1,
            projector=projector,
            reset_statistics=False,
        )
    )
    want = _train(optax.adamw(1e-2, weight_decay=0.1))
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_online_subspace_descent_projector_lr_tracks_the_schedule():
    schedule = optax.linear_schedule(1e-2, 1e-3, 6)
    got = _train(
        cljax.online_subspace_descent(schedule, rank=2, refresh_every=50, weight_decay=0.1)
    )
    projector_lr = lambda c: schedule(c) / (schedule(0) * 50)  # noqa: E731
    want = _train(
        optax.chain(
            cljax.scale_by_low_rank_projection(
                optax.scale_by_adam(),
                rank=2,
                scale=0.25,
                projector="online_pca",
                projector_optimizer=optax.adamw(projector_lr, weight_decay=0.01),
            ),
            optax.add_decayed_weights(0.1),
            optax.scale_by_learning_rate(schedule),
        )
    )
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_dion_is_its_chain():
    got = _train(cljax.dion(1e-2, rank=2, mu=0.9, weight_decay=0.1))
    want = _train(
        optax.chain(
            cljax.scale_by_dion(2, 0.9, fallback=optax.scale_by_adam()),
            optax.add_decayed_weights(0.1),
            optax.scale_by_learning_rate(1e-2),
        )
    )
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
