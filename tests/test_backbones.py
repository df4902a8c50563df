"""`spot.backbones.load` turns on JAX's persistent compilation cache unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = (
    "import jax, os; from spot.backbones import enable_compilation_cache as e; e(); "
    "print(jax.config.jax_compilation_cache_dir)"
)


def cache_setting(tmp_path, **env: str) -> str:
    """The cache directory JAX ends up with in a fresh process (no test-suite settings)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    clean.update(SPOT_CACHE=str(tmp_path), **env)
    run = subprocess.run([sys.executable, "-c", CHECK], env=clean, capture_output=True, text=True,
                         check=True)
    return run.stdout.strip()


def test_compilation_cache_defaults_to_spot_cache(tmp_path):
    assert cache_setting(tmp_path) == str(tmp_path / "jax-compilation-cache")


def test_compilation_cache_respects_jax_setting_and_opt_out(tmp_path):
    own = str(tmp_path / "mine")
    assert cache_setting(tmp_path, JAX_COMPILATION_CACHE_DIR=own) == own
    assert cache_setting(tmp_path, SPOT_COMPILATION_CACHE="0") == "None"
