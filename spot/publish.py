"""Publishing sources under a library's key protocol, and re-keying a library's sources.

A source is its value prompt (the best checkpoint) plus one key per recipe, each made by the
library's protocol for that recipe (`spot.task_embedding`). A library without a protocol for
the recipe gets the default one (`default_protocol`) on first publish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from library import KeyProtocol, Library, Published
from library.prompt_file import load_prompt
from spot.backbones.base import Backbone
from spot.task_embedding import default_protocol, embed_task, key_metadata
from spot.tasks import Task, get_task


def ensure_protocol(source: Any, backbone: Backbone, recipe: str) -> tuple[KeyProtocol, np.ndarray]:
    """The library's `recipe` protocol for this backbone, registering the default if it has none."""
    if any(p.recipe == recipe for p, _ in source.protocols(backbone.identity)):
        return source.protocol(backbone.identity, recipe)
    protocol, start = default_protocol(backbone, recipe)
    source.register_protocol(protocol, start)
    return protocol, start


def publish_source(
    source: Any, backbone: Backbone, task: Task, value: Path | tuple[np.ndarray, dict],
    recipe: str, metadata: dict[str, str] | None = None,
) -> Published:
    """Publish a trained value with its key made by the library's `recipe` protocol."""
    protocol, start = ensure_protocol(source, backbone, recipe)
    key = embed_task(backbone, task, protocol, start, show_progress=True)
    value = load_prompt(value) if isinstance(value, Path) else value
    return source.publish((key, key_metadata(protocol, task)), value,
                          {"task": task.name, **(metadata or {})})


@dataclasses.dataclass(frozen=True)
class Rekeyed:
    """One source of a re-keying: its value id, task, and the new key id or why there is none."""

    value: str
    task: str
    key: str | None
    skipped: str | None  # "done" (it already had a key of this protocol) or the failure


def rekey(library: Library, backbone: Backbone, recipe: str) -> Iterator[Rekeyed]:
    """Give every value of `backbone` a key under the library's `recipe` protocol.

    Values untouched; sources that already have such a key are skipped (so it resumes); a source
    whose task cannot be loaded (from its `task` metadata) is reported and left as it is."""
    protocol, start = ensure_protocol(library, backbone, recipe)
    offset = 0
    while page := library.list(backbone=backbone.identity, role="value", limit=500, offset=offset):
        offset += len(page)
        for value in page:
            keys = library.list(backbone=backbone.identity, role="key", task=value.task,
                                limit=10_000)
            done = [k for k in keys if k.pair == value.id and k.protocol == protocol.id]
            if done:
                yield Rekeyed(value.id, value.task, done[0].id, "done")
                continue
            try:
                task = get_task(value.task)
                task.load("train")
            except (KeyError, ValueError, OSError) as error:
                yield Rekeyed(value.id, value.task, None, f"{type(error).__name__}: {error}")
                continue
            key = embed_task(backbone, task, protocol, start, show_progress=True)
            ids = library.publish((key, key_metadata(protocol, task)), library.load(value.id))
            yield Rekeyed(value.id, value.task, ids.key, None)
