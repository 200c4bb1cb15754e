"""Root test configuration, loaded before any test module or doctest imports JAX."""

import os

_XLA_FLAGS = ["--xla_force_host_platform_device_count=8"]
# The suite compiles a few thousand small programs and runs each a handful of times, so XLA's CPU
# compile time dominates it. The classic emitters without LLVM optimisation compile these programs
# about 3x faster; they change code generation only, never the HLO a test builds. Set
# CLJAX_TEST_FAST_COMPILE=0 to test with XLA's default CPU code generation.
if os.environ.get("CLJAX_TEST_FAST_COMPILE", "1") != "0":
    _XLA_FLAGS += ["--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0"]
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_XLA_FLAGS]).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import cljax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# The suite compiles many small, often identical programs (the same step under several checks,
# in several worker processes): share XLA executables through JAX's persistent compilation cache.
# It is keyed on the program and the JAX / XLA versions, so a stale entry is never used. Set
# CLJAX_TEST_COMPILATION_CACHE=0 to compile everything afresh.
if os.environ.get("CLJAX_TEST_COMPILATION_CACHE", "1") != "0":
    import tempfile  # noqa: E402

    jax.config.update(
        "jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "cljax-test-compilation-cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    """Names every docstring example may use without importing them."""
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax, cljax=cljax)
