"""Test configuration: 8 simulated CPU devices, rank promotion raises, hypothesis profile."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("cljax", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("cljax")
