"""Test setup: 8 fake CPU devices (set before JAX starts) and small shared fixtures."""

import os
import sys

# 8 fake CPU devices for sharding tests. Tests compile many tiny programs and run each a few
# times: XLA's CPU backend optimizations cost more compile time than they save (about 2x).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)  # `from configs import base` in tests, as entry points allow

import pytest  # noqa: E402


def pytest_configure(config):
    # Many tests compile the same small programs (model init, train steps); a session-wide
    # persistent compilation cache turns the repeats into cache hits.
    import tempfile

    import jax

    # With pytest-xdist (-n 2) the controller creates the folder before its workers start, and
    # they inherit it through the environment: one cache for the whole run.
    cache = os.environ.get("T5X_LIKE_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="jax-cache-")
    os.environ["T5X_LIKE_TEST_JAX_CACHE"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A model and run small enough to train for a few steps in seconds."""
    from configs import base

    cfg = base.get_config()
    cfg.steps = 4
    cfg.log_every_steps = 2
    cfg.model.hidden_dim = 32
    cfg.model.num_layers = 2
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.mlp_dim = 64
    cfg.model.max_len = 32
    cfg.data.batch_size = 8
    cfg.data.synthetic_docs = 400
    cfg.data.vocab_size = 300
    cfg.data.cache_dir = str(tmp_path / "data_cache")
    cfg.optimizer.warmup_steps = 2
    cfg.checkpoint.every_steps = 2
    cfg.eval.every_steps = 0
    cfg.eval.steps = 2
    return cfg
