"""Tests for the orthogonal family's ready-made optimizers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import cljax
from tests.helpers import assert_trees_close


def test_auon_optimizer_adds_decay_and_learning_rate():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}
    g = {"w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}
    opt = cljax.auon(0.1, weight_decay=0.01)
    u, _ = opt.update(g, opt.init(params), params)
    d, _ = cljax.scale_by_auon().update(g, cljax.scale_by_auon().init(params))
    assert_trees_close(u, {"w": -0.1 * (d["w"] + 0.01 * params["w"])}, rtol=1e-6, atol=1e-7)
