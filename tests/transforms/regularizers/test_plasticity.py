"""Tests for the plasticity methods: CA-08 (shrink and perturb) and CA-04 (continual backprop).

Continual backprop is checked against a float64 NumPy transcription of the generate-and-test
loop (contribution utility, ages, running mean activation, accumulated replacement count,
bias compensation, zeroed outgoing weights) on a two-hidden-layer MLP; the re-drawn incoming
weights are random, so for them the test checks the bound and the positions instead of values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cljax
from tests.helpers import assert_trees_close, assert_trees_equal

# ---------------------------------------------------------------------------------------------
# CA-08: shrink and perturb.


def test_shrink_perturb_formula_identity_and_determinism():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.bfloat16),
    }
    noise = {
        "w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }
    out = cljax.shrink_perturb(params, shrink=0.4, noise_scale=0.1, noise=noise)
    np.testing.assert_allclose(
        out["w"], 0.4 * np.float64(params["w"]) + 0.1 * np.float64(noise["w"]), rtol=1e-6
    )
    assert out["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.float32(out["b"]),
        0.4 * np.float32(params["b"]) + 0.1 * np.float32(noise["b"]),
        rtol=1e-2,
    )
    assert_trees_equal(
        cljax.shrink_perturb(params, jax.random.key(0), shrink=1.0, noise_scale=0.0), params
    )
    a = cljax.shrink_perturb(params, jax.random.key(1), shrink=0.5, noise_scale=0.01)
    assert_trees_equal(
        a, cljax.shrink_perturb(params, jax.random.key(1), shrink=0.5, noise_scale=0.01)
    )
    c = cljax.shrink_perturb(params, jax.random.key(2), shrink=0.5, noise_scale=0.01)
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))


def test_shrink_perturb_noise_is_standard_normal_times_scale():
    params = {"w": jnp.zeros((200, 100))}
    out = cljax.shrink_perturb(params, jax.random.key(3), shrink=0.5, noise_scale=0.2)["w"]
    assert abs(float(jnp.mean(out))) < 0.005
    assert abs(float(jnp.std(out)) - 0.2) < 0.005


def test_add_shrink_perturb_acts_every_k_steps_on_the_new_parameters():
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    u = {"w": jnp.full((2, 3), 0.5)}
    tx = cljax.add_shrink_perturb(0.5, 0.0, every=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(1, 7):
        out, state = update(u, state, params)
        if step % 3:
            assert_trees_equal(out, u)
        else:
            np.testing.assert_allclose(
                np.asarray(params["w"] + out["w"]), 0.5 * (np.asarray(params["w"]) + 0.5), rtol=1e-6
            )
    noisy = cljax.add_shrink_perturb(1.0, 0.1)
    zeros = {"w": jnp.zeros((300, 100))}
    out, _ = noisy.update(zeros, noisy.init(zeros), zeros)
    assert abs(float(jnp.std(out["w"])) - 0.1) < 0.003


def test_shrink_perturb_errors():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"shrink_perturb\(shrink=...\) must be in \[0.0, 1.0\]"):
        cljax.shrink_perturb(params, jax.random.key(0), shrink=1.5, noise_scale=0.0)
    with pytest.raises(ValueError, match=r"shrink_perturb\(noise_scale=...\) must be in"):
        cljax.shrink_perturb(params, jax.random.key(0), shrink=0.5, noise_scale=-1.0)
    with pytest.raises(ValueError, match="shrink_perturb: pass `key`"):
        cljax.shrink_perturb(params, shrink=0.5, noise_scale=0.1)
    with pytest.raises(ValueError, match="shrink_perturb: `noise` has a different tree structure"):
        cljax.shrink_perturb(params, shrink=0.5, noise_scale=0.1, noise={"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"add_shrink_perturb\(every=...\) must be >= 1"):
        cljax.add_shrink_perturb(0.5, 0.1, every=0)
    with pytest.raises(
        TypeError, match=r"add_shrink_perturb\(seed=...\) must be an int or a PRNG key"
    ):
        cljax.add_shrink_perturb(0.5, 0.1, seed=1.5)
    with pytest.raises(ValueError, match="add_shrink_perturb: `update` needs `params`"):
        tx = cljax.add_shrink_perturb(0.5, 0.1)
        tx.update(params, tx.init(params), None)


# ---------------------------------------------------------------------------------------------
# CA-04: continual backprop.

SIZES = (3, 5, 4, 2)  # input, hidden 0, hidden 1, output
LAYERS = [
    cljax.CbpLayer("l0/kernel", "l0/bias", "l1/kernel", "l1/bias"),
    cljax.CbpLayer("l1/kernel", "l1/bias", "l2/kernel", "l2/bias"),
]


def init_mlp(seed):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        params[f"l{i}"] = {
            "kernel": np.asarray(rng.standard_normal((a, b)) / np.sqrt(a), np.float32),
            "bias": np.asarray(0.1 * rng.standard_normal(b), np.float32),
        }
    return params


def forward(params, x):
    """Returns the hidden activations (ReLU) and the output."""
    h0 = jax.nn.relu(x @ params["l0"]["kernel"] + params["l0"]["bias"][None, :])
    h1 = jax.nn.relu(h0 @ params["l1"]["kernel"] + params["l1"]["bias"][None, :])
    return (h0, h1), h1 @ params["l2"]["kernel"] + params["l2"]["bias"][None, :]


def loss_and_acts(params, x, y):
    acts, out = forward(params, x)
    return jnp.mean((out - y) ** 2), acts


class NpGnT:
    """Float64 generate-and-test bookkeeping of the reference, on a dict-of-dicts MLP."""

    def __init__(self, rate, maturity, decay, k_max):
        self.rate, self.m, self.eta, self.k = rate, maturity, decay, k_max
        n = [SIZES[1], SIZES[2]]
        self.util = [np.zeros(u) for u in n]
        self.mean = [np.zeros(u) for u in n]
        self.age = [np.zeros(u, int) for u in n]
        self.pending = [0.0, 0.0]

    def step(self, new_params, acts):
        """Applies GnT to `new_params` (θ⁺, float64, edited in place); returns the reset masks."""
        chosen = []
        for i, h in enumerate(acts):
            h = np.float64(h)
            self.age[i] += 1
            self.mean[i] = self.eta * self.mean[i] + (1 - self.eta) * h.mean(0)
            w_out = new_params[f"l{i + 1}"]["kernel"]
            self.util[i] = self.eta * self.util[i] + (1 - self.eta) * np.abs(w_out).mean(
                1
            ) * np.abs(h).mean(0)
            corr = 1 - self.eta ** self.age[i]
            eligible = np.where(self.age[i] > self.m)[0]
            self.pending[i] += self.rate * len(eligible)
            n = int(min(np.floor(self.pending[i]), self.k, len(eligible)))
            self.pending[i] -= n
            order = eligible[np.argsort((self.util[i] / corr)[eligible], kind="stable")]
            chosen.append((order[:n], corr))
        resets = []
        for i, (units, corr) in enumerate(chosen):
            nxt = new_params[f"l{i + 1}"]
            nxt["bias"] = nxt["bias"] + (
                nxt["kernel"][units, :] * (self.mean[i][units] / corr[units])[:, None]
            ).sum(0)
            nxt["kernel"][units, :] = 0.0
            new_params[f"l{i}"]["bias"][units] = 0.0
            for arr in (self.util, self.mean):
                arr[i][units] = 0.0
            self.age[i][units] = 0
            mask = np.zeros(SIZES[i + 1], bool)
            mask[units] = True
            resets.append(mask)
        return resets


def run_cbp(tx, params, steps, seed=0):
    rng = np.random.default_rng(seed)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    return state, rng


def test_continual_backprop_matches_numpy_generate_and_test():
    rate, maturity, decay, k_max, lr = 0.4, 2, 0.9, 2, 0.05
    params = init_mlp(0)
    tx = cljax.continual_backprop(
        optax.sgd(lr),
        LAYERS,
        replacement_rate=rate,
        maturity=maturity,
        decay=decay,
        max_replacements=k_max,
        seed=3,
    )
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    ref = NpGnT(rate, maturity, decay, k_max)
    rng = np.random.default_rng(1)
    total_resets = 0
    step = jax.jit(lambda p, s, g, a: tx.update(g, s, p, activations=a))
    for t in range(10):
        x = jnp.asarray(rng.standard_normal((6, SIZES[0])), jnp.float32)
        y = jnp.asarray(rng.standard_normal((6, SIZES[-1])), jnp.float32)
        grads, acts = jax.grad(loss_and_acts, has_aux=True)(jp, x, y)
        out, state = step(jp, state, grads, list(acts))
        new = jax.tree.map(lambda p, u: np.float64(p) + np.float64(u), jp, out)
        expected = jax.tree.map(lambda p, g: np.float64(p) - lr * np.float64(g), jp, grads)
        resets = ref.step(expected, acts)
        for i, mask in enumerate(resets):
            assert mask.sum() <= k_max
            assert np.all(ref.age[i][mask] == 0)
            total_resets += int(mask.sum())
            # Incoming columns of reset units are fresh draws within the bound; elsewhere exact.
            bound = math.sqrt(2.0) * math.sqrt(3.0 / SIZES[i])
            got_k = new[f"l{i}"]["kernel"]
            assert np.all(np.abs(got_k[:, mask]) <= bound + 1e-6)
            expected[f"l{i}"]["kernel"][:, mask] = got_k[:, mask]
        assert_trees_close(new, expected, rtol=1e-5, atol=1e-6, err=f"step {t}:")
        for i in range(2):
            np.testing.assert_allclose(state.utility[i], ref.util[i], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(state.mean_activation[i], ref.mean[i], rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(state.age[i], ref.age[i])
            np.testing.assert_allclose(state.pending[i], ref.pending[i], rtol=1e-5, atol=1e-6)
        jp = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), jp, out)
    assert total_resets >= 4, "the test should exercise several replacements"


def test_continual_backprop_zero_rate_is_the_inner_optimizer_and_compensation_preserves_the_output():
    params = jax.tree.map(jnp.asarray, init_mlp(2))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, SIZES[0])), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, SIZES[-1])), jnp.float32)
    grads, acts = jax.grad(loss_and_acts, has_aux=True)(params, x, y)
    with jax.numpy_dtype_promotion("standard"):
        plain = optax.adam(0.01)
        tx = cljax.continual_backprop(optax.adam(0.01), LAYERS, replacement_rate=0.0, maturity=0)
        s, ps = tx.init(params), plain.init(params)
        update, plain_update = jax.jit(tx.update), jax.jit(plain.update)
        for _ in range(3):
            out, s = update(grads, s, params, activations=list(acts))
            want, ps = plain_update(grads, ps, params)
            assert_trees_equal(out, want)

        # Force one replacement in layer 0 at the first eligible step (maturity 0, rate 1).
        tx = cljax.continual_backprop(
            optax.adam(0.01), LAYERS[:1], replacement_rate=1.0 / SIZES[1], maturity=0
        )
        s = tx.init(params)
        out, s = jax.jit(tx.update)(grads, s, params, activations=[acts[0]])
    reset = np.asarray(s.age[0]) == 0
    assert reset.sum() == 1
    new = jax.tree.map(lambda p, u: p + u, params, out)
    np.testing.assert_array_equal(
        np.asarray(new["l1"]["kernel"])[reset], 0.0
    )  # outgoing weights exactly 0
    np.testing.assert_array_equal(np.asarray(new["l0"]["bias"])[reset], 0.0)
    # For an input whose reset unit equals its (bias-corrected) mean activation, the next
    # layer's pre-activation is unchanged by the reset.
    eta = 0.99
    mean_hat = (1 - eta) * np.asarray(acts[0]).mean(0) / (1 - eta)
    h = np.asarray(acts[0])[0].copy()
    h[reset] = mean_hat[reset]
    adam_step = plain_update(grads, plain.init(params), params)[0]
    stepped = jax.tree.map(lambda p, u: p + u, params, adam_step)
    before = h @ np.asarray(stepped["l1"]["kernel"]) + np.asarray(stepped["l1"]["bias"])
    h_after = h.copy()
    h_after[reset] = 0.0
    after = h_after @ np.asarray(new["l1"]["kernel"]) + np.asarray(new["l1"]["bias"])
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    # Adam's moments at the reset weights are zero.
    adam = cljax.find_state(s.inner, optax.ScaleByAdamState)
    for leaf, mask in (("kernel", reset[None, :]), ("bias", reset)):
        for mom in (adam.mu, adam.nu):
            values = np.asarray(mom["l0"][leaf])
            np.testing.assert_array_equal(values[np.broadcast_to(mask, values.shape)], 0.0)
    np.testing.assert_array_equal(np.asarray(adam.mu["l1"]["kernel"])[reset], 0.0)
    assert np.all(np.asarray(adam.nu["l1"]["kernel"])[~reset] > 0)


_BOUND_CONFIGS = {
    (maturity, k): cljax.continual_backprop(
        optax.sgd(0.01), LAYERS, replacement_rate=0.9, maturity=maturity, max_replacements=k, seed=5
    )
    for maturity, k in ((0, 3), (3, 1))
}
_BOUND_STEPS = {
    c: jax.jit(
        lambda p, s, a, tx=tx: tx.update(jax.tree.map(jnp.zeros_like, p), s, p, activations=a)
    )
    for c, tx in _BOUND_CONFIGS.items()
}


@pytest.mark.parametrize("config", list(_BOUND_CONFIGS), ids=["maturity0_k3", "maturity3_k1"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_continual_backprop_never_resets_young_units_and_respects_the_bound(config, seed):
    maturity, k_max = config
    params = jax.tree.map(jnp.asarray, init_mlp(seed % 100))
    state = _BOUND_CONFIGS[config].init(params)
    rng = np.random.default_rng(seed)
    for _ in range(maturity + 3):
        acts = [jnp.asarray(np.abs(rng.standard_normal((2, n))), jnp.float32) for n in SIZES[1:3]]
        old_age = [np.asarray(a) for a in state.age]
        out, state = _BOUND_STEPS[config](params, state, acts)
        for i in range(2):
            reset = np.asarray(state.age[i]) == 0
            assert reset.sum() <= k_max
            assert np.all(old_age[i][reset] + 1 > maturity), (
                "a unit younger than the maturity was reset"
            )
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
        params = optax.apply_updates(params, out)


def test_continual_backprop_errors():
    params = jax.tree.map(jnp.asarray, init_mlp(0))
    sgd = optax.sgd(0.1)
    with pytest.raises(
        TypeError, match=r"continual_backprop\(layers=...\) must be a non-empty list of CbpLayer"
    ):
        cljax.continual_backprop(sgd, LAYERS[0])
    with pytest.raises(TypeError, match=r"entry 0 must be a CbpLayer"):
        cljax.continual_backprop(sgd, [("l0/kernel",)])
    with pytest.raises(
        ValueError, match=r"continual_backprop\(decay=...\) must be in \[0.0, 1.0\)"
    ):
        cljax.continual_backprop(sgd, LAYERS, decay=1.0)
    with pytest.raises(
        ValueError, match=r"continual_backprop\(max_replacements=...\) must be >= 1"
    ):
        cljax.continual_backprop(sgd, LAYERS, max_replacements=0)
    with pytest.raises(TypeError, match=r"continual_backprop\(reset_moments=...\) must be a bool"):
        cljax.continual_backprop(sgd, LAYERS, reset_moments=1)
    with pytest.raises(
        ValueError, match=r"layers\[0\].kernel = 'dense/kernel' is not a parameter path"
    ):
        cljax.continual_backprop(sgd, [cljax.CbpLayer("dense/kernel")]).init(params)
    with pytest.raises(
        ValueError,
        match=r"leaf 'l0/bias' \(layers\[0\].kernel\) has shape \(5,\); it must have 2 dims",
    ):
        cljax.continual_backprop(sgd, [cljax.CbpLayer("l0/bias")]).init(params)
    with pytest.raises(ValueError, match=r"leaf 'l1/bias' has shape \(4,\); the layer has 5 units"):
        cljax.continual_backprop(sgd, [cljax.CbpLayer("l0/kernel", "l1/bias")]).init(params)
    with pytest.raises(
        ValueError, match=r"leaf 'l2/kernel' has shape \(4, 2\); its rows must be the 5 units"
    ):
        cljax.continual_backprop(sgd, [cljax.CbpLayer("l0/kernel", next_kernel="l2/kernel")]).init(
            params
        )
    with pytest.raises(ValueError, match=r"layers\[0\] has a next_bias but no next_kernel"):
        cljax.continual_backprop(sgd, [cljax.CbpLayer("l0/kernel", next_bias="l1/bias")]).init(
            params
        )
    with pytest.raises(ValueError, match=r"leaf 'l2/bias' has shape \(2,\); it needs \(4,\)"):
        cljax.continual_backprop(
            sgd, [cljax.CbpLayer("l0/kernel", None, "l1/kernel", "l2/bias")]
        ).init(params)
    with pytest.raises(ValueError, match=r"max_replacements=...\) must be at most the 5 units"):
        cljax.continual_backprop(sgd, LAYERS[:1], max_replacements=6).init(params)
    tx = cljax.continual_backprop(sgd, LAYERS)
    state = tx.init(params)
    with pytest.raises(
        ValueError, match="`activations` must be a list with one array per layer \\(2\\)"
    ):
        tx.update(params, state, params, activations=[jnp.ones((1, 5))])
    with pytest.raises(
        ValueError, match=r"activations\[1\] has shape \(1, 5\); layer 'l1/kernel' has 4 units"
    ):
        tx.update(params, state, params, activations=[jnp.ones((1, 5)), jnp.ones((1, 5))])
    with pytest.raises(TypeError, match="activations"):
        tx.update(params, state, params)
