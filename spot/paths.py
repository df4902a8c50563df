"""Where SPoT keeps caches and finds the shared task data (both overridable by env vars)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """`$SPOT_CACHE`, default `~/.cache/spot`."""
    return Path(os.environ.get("SPOT_CACHE", Path.home() / ".cache" / "spot")).expanduser()


def data_dir() -> Path:
    """`$SPOT_DATA`, default `<repo>/../shared/data` (the task files are read in place)."""
    return Path(os.environ.get("SPOT_DATA", REPO_ROOT.parent / "shared" / "data")).expanduser()
