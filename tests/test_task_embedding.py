"""Key protocols: deterministic task embeddings from a shared start, checked by the library."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest
from tiny_tasks import polarity_rows, polarity_task, register_tiny_tasks

from library import KeyProtocol, Library, NoProtocolWarning, ProtocolMismatch, similarity
from spot.task_embedding import default_protocol, embed_task, key_metadata
from spot.tasks import Task, get_task


def shuffled(task: Task, seed: int = 0) -> Task:
    """The task with its training labels permuted: same texts and answers, no signal."""
    rows = task.load("train")
    labels = np.random.default_rng(seed).permutation([r.label for r in rows])
    train = [dataclasses.replace(r, label=int(label)) for r, label in zip(rows, labels, strict=True)]
    splits = {"train": train, "validation": task.load("validation"), "test": task.load("test")}
    return Task(task.name + "_shuffled", task.family, task.num_choices, task.metrics, lambda: splits)


@pytest.fixture(scope="module", params=["gradient", "trained"])
def protocol(request, tiny_llama):
    return default_protocol(tiny_llama, request.param, prompt_length=4)


def test_same_task_same_protocol_same_key(tiny_llama, protocol):
    spec, start = protocol
    task = polarity_task()
    first = embed_task(tiny_llama, task, spec, start)
    again = embed_task(tiny_llama, polarity_task("other_name"), spec, start)
    assert first.shape == (4, tiny_llama.d_model) and np.isfinite(first).all()
    assert np.abs(first - (start if spec.recipe == "trained" else 0)).max() > 0
    np.testing.assert_array_equal(first, again)


def test_label_shuffled_copy_is_less_similar_than_the_task(tiny_llama, protocol):
    spec, start = protocol
    task = polarity_task()
    key, noise = (embed_task(tiny_llama, t, spec, start) for t in (task, shuffled(task)))
    metric = "delta-flat" if spec.recipe == "trained" else "flat"
    assert similarity(key, noise, metric, start) < similarity(key, key, metric, start) - 1e-3


def test_choice_gradient_tells_a_resample_from_a_label_shuffle(tiny_llama):
    """Another sample of the task lies nearer it than its label-shuffled copy (on this random
    tiny model the LM-objective keys do not separate the two: both follow the answer words)."""
    spec, start = default_protocol(tiny_llama, "gradient", prompt_length=4, objective="choices")
    task = polarity_task()
    rows = polarity_rows(256, 7)
    resample = Task("resampled", "sentiment", 2, ("accuracy",),
                    lambda: {"train": rows, "validation": rows, "test": rows})
    key, same, noise = (embed_task(tiny_llama, t, spec, start)
                        for t in (task, resample, shuffled(task)))
    assert similarity(key, same, "flat") > similarity(key, noise, "flat") + 0.1


def test_wrong_backbone_or_start_is_refused(tiny_llama, protocol):
    spec, start = protocol
    with pytest.raises(ValueError, match="not protocol"):
        embed_task(tiny_llama, polarity_task(), spec, start + 1)
    other = dataclasses.replace(spec, backbone="llama-other")
    with pytest.raises(ValueError, match="for backbone llama-other"):
        embed_task(tiny_llama, polarity_task(), other, start)


def publish_key(library: Library, tiny_llama, spec: KeyProtocol, start, task: Task):
    key = embed_task(tiny_llama, task, spec, start)
    value = np.ones_like(start)
    return library.publish((key, key_metadata(spec, task)),
                           (value, {"backbone": spec.backbone, "task": task.name}))


def test_library_holds_one_protocol_per_recipe(tmp_path, tiny_llama):
    names = register_tiny_tasks()
    library = Library(tmp_path / "lib")
    gradient, start = default_protocol(tiny_llama, "gradient", prompt_length=4)
    library.register_protocol(gradient, start)
    library.register_protocol(gradient, start)  # idempotent
    ids = publish_key(library, tiny_llama, gradient, start, get_task(names[0]))

    other, other_start = default_protocol(tiny_llama, "gradient", prompt_length=4, seed=1)
    with pytest.raises(ProtocolMismatch, match="differs in .*seed: 1 != 0"):
        library.register_protocol(other, other_start)
    before = library.count()
    with pytest.raises(ProtocolMismatch, match="seed: 1 != 0"):
        publish_key(library, tiny_llama, other, other_start, get_task(names[1]))
    with pytest.raises(ProtocolMismatch, match="records none"):
        library.publish(np.ones((4, tiny_llama.d_model)), None,
                        {"task": "x", "backbone": tiny_llama.identity})
    assert library.count() == before  # nothing written

    trained, _ = default_protocol(tiny_llama, "trained", prompt_length=4)
    with pytest.raises(ProtocolMismatch, match="no 'trained' key protocol"):
        publish_key(library, tiny_llama, trained, start, get_task(names[1]))
    library.register_protocol(trained, start)  # a second recipe, the same start
    both = publish_key(library, tiny_llama, trained, start, get_task(names[0]))
    assert both.value == ids.value  # one value, a key per recipe
    assert [p.id for p, default in library.protocols() if default] == [gradient.id]

    query = embed_task(tiny_llama, get_task(names[0]), gradient, start)
    (match,) = library.query(query, tiny_llama.identity, "flat", k=5)
    assert match.entry.id == ids.key and match.entry.protocol == gradient.id
    assert match.similarity == pytest.approx(1.0, abs=1e-5)
    trained_query = embed_task(tiny_llama, get_task(names[0]), trained, start)
    (match,) = library.query(trained_query, tiny_llama.identity, "delta-token", 5, "trained")
    assert match.entry.id == both.key
    with pytest.raises(Exception, match="needs keys of a 'trained'"):
        library.query(query, tiny_llama.identity, "delta-mean")

    # the protocol survives a restart and verify; deleting the value removes both keys
    reopened = Library(tmp_path / "lib")
    assert reopened.protocol(tiny_llama.identity, "trained")[0] == trained
    np.testing.assert_array_equal(reopened.protocol(tiny_llama.identity)[1], start)
    report = reopened.verify()
    assert report.ok and not report.orphans, report
    assert sorted(reopened.delete(ids.value)) == sorted([ids.key, ids.value, both.key])
    assert reopened.count() == 0 and reopened.verify().ok


def test_library_from_before_protocols_still_loads(tmp_path):
    """A schema-1 manifest (no protocols) is migrated in place; its keys report no protocol."""
    root = tmp_path / "old"
    Library(root).publish(np.ones((2, 8)), np.ones((2, 8)), {"task": "t", "backbone": "b"})
    with sqlite3.connect(root / "manifest.sqlite") as conn:  # back to the version-1 layout
        conn.execute("DROP TABLE protocols")
        conn.execute("ALTER TABLE entries DROP COLUMN protocol")
        conn.execute("UPDATE info SET value = '1' WHERE name = 'schema_version'")
    library = Library(root)
    assert library.resolve_protocol("b") is None
    with pytest.warns(NoProtocolWarning):
        (match,) = library.query(np.ones((2, 8)), "b", "token")
    assert match.entry.protocol is None and match.entry.task == "t"
