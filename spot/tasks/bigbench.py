"""BIG-bench JSON tasks, read from PyPI's `bigbench==1.0.0` sdist (never installed).

The archive is $SPOT_BIGBENCH, else $SPOT_CACHE/bigbench-1.0.0.tar.gz (SPOT_CACHE defaults
to ~/.cache/spot); `ensure_bigbench_archive()` (or `python -m spot.tasks --fetch-bigbench`)
downloads it with pip. The first load extracts every registered task's
`benchmark_tasks/<name>/task.json` in one pass over the tar into $SPOT_CACHE/bigbench/<name>.json
(byte-for-byte), and later loads read only those files.

Examples are the ones with `input` and `target_scores` over exactly the task's answer set and a
unique best score (the label); others are dropped and counted. The text follows BIG-bench's own
JSON formatting: task_prefix + example_input_prefix + input (+ the answers, each after
choice_prefix, when append_choices_to_input, in the fixed answer order here rather than
BIG-bench's per-example shuffle) + example_output_prefix, with BIG-bench's defaults and outer
whitespace stripped. Splits: test = 20% (capped at 1000), then validation = 10% of the rest
(capped at 1000), by spot.tasks.splits' hash order.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from spot.paths import cache_dir
from spot.tasks.core import Example, MissingDataError, Task, TaskError
from spot.tasks.registry import register_task
from spot.tasks.splits import split_single

VERSION = "1.0.0"
ARCHIVE = f"bigbench-{VERSION}.tar.gz"
MEMBER = re.compile(
    rf"^bigbench-{re.escape(VERSION)}/bigbench/benchmark_tasks/([^/]+)/task\.json$"
)
TEST_FRACTION = 0.2

log = logging.getLogger("spot.tasks")

# BIG-bench task -> (answer set in choice order, metrics). Chosen for a fixed answer set and
# >= 180 usable examples, spread over sentiment/emotion, pragmatics, NLI, logic, commonsense,
# fact checking (vitaminc) and word order (hyperbaton, which BIG-bench tags "paraphrase").
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "social_support": (
        ("unsupportive", "neutral", "supportive"),
        ("macro_f1", "accuracy"),
    ),
    "snarks": (("(a)", "(b)"), ("accuracy",)),
    "implicatures": (("no", "yes"), ("accuracy",)),
    "metaphor_boolean": (("False", "True"), ("accuracy",)),
    "epistemic_reasoning": (("entailment", "non-entailment"), ("accuracy",)),
    "presuppositions_as_nli": (
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
    ),
    "formal_fallacies_syllogisms_negation": (("valid", "invalid"), ("accuracy",)),
    "logical_fallacy_detection": (("Valid", "Invalid"), ("accuracy",)),
    "navigate": (("False", "True"), ("accuracy",)),
    "sports_understanding": (("implausible", "plausible"), ("accuracy",)),
    "strategyqa": (("No", "Yes"), ("accuracy",)),
    "winowhy": (("incorrect", "correct"), ("accuracy",)),
    "anachronisms": (("No", "Yes"), ("accuracy",)),
    "vitaminc_fact_verification": (("True", "False", "Neither"), ("accuracy",)),
    "hyperbaton": (("a", "b"), ("accuracy",)),
    "intent_recognition": (
        (
            "add_to_playlist",
            "book_restaurant",
            "get_weather",
            "play_music",
            "rate_book",
            "search_creative_work",
            "search_screening_event",
        ),
        ("accuracy",),
    ),
}


def archive_path() -> Path:
    return Path(os.environ.get("SPOT_BIGBENCH") or cache_dir() / ARCHIVE).expanduser()


def ensure_bigbench_archive(python: str | None = None) -> Path:
    """The archive's path, first fetching it with `<python> -m pip download` if missing.

    `python` (default: this interpreter) picks the pip to use: pip >= 26 refuses this sdist
    because its setup.py declares a `bleurt @ file://` requirement, so pass an interpreter
    with an older pip (the error says so). Only the default location is filled in; a missing
    $SPOT_BIGBENCH is an error. The file lands in a temporary folder, then is renamed.
    """
    path = archive_path()
    if path.is_file():
        return path
    if os.environ.get("SPOT_BIGBENCH"):
        raise MissingDataError(f"SPOT_BIGBENCH={path} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".bigbench-") as tmp:
        command = [python or sys.executable, "-m", "pip", "download", "--no-deps"]
        command += ["--no-binary=:all:", "--no-cache-dir", f"bigbench=={VERSION}"]
        command += ["-d", tmp]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        downloaded = Path(tmp) / ARCHIVE
        if result.returncode != 0 or not downloaded.is_file():
            hint = ""
            if "direct URL dependencies" in result.stderr:
                hint = (
                    "\nThis pip rejects the sdist's file:// requirement; retry with an "
                    "interpreter whose pip is older than 26, e.g. "
                    "`python -m spot.tasks --fetch-bigbench /path/to/python`, "
                    f"or put the archive at {path} yourself."
                )
            raise TaskError(
                f"`{' '.join(command)}` failed (exit {result.returncode}):\n"
                f"{result.stderr[-2000:]}{hint}"
            )
        os.replace(downloaded, path)
    return path


def _extract(names: set[str]) -> None:
    """Copy the task.json of each name from the archive into the cache, in one pass."""
    archive = archive_path()
    if not archive.is_file():
        raise MissingDataError(
            f"BIG-bench archive {archive} not found: set SPOT_BIGBENCH, or run "
            "`python -m spot.tasks --fetch-bigbench` to download it"
        )
    target = cache_dir() / "bigbench"
    target.mkdir(parents=True, exist_ok=True)
    missing = set(names)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            match = MEMBER.match(member.name)
            if not match or match.group(1) not in missing:
                continue
            data = tar.extractfile(member)
            if data is None:
                raise TaskError(f"{archive}: {member.name} is not a regular file")
            final = target / f"{match.group(1)}.json"
            part = final.with_name(f".{final.name}.{os.getpid()}.part")
            part.write_bytes(data.read())
            os.replace(part, final)
            missing.discard(match.group(1))
            if not missing:
                break
    if missing:
        raise TaskError(f"{archive} has no task.json for {sorted(missing)}")


def task_json(name: str) -> dict[str, Any]:
    """The task's parsed task.json, extracting all registered tasks' files on first use."""
    path = cache_dir() / "bigbench" / f"{name}.json"
    if not path.is_file():
        cached = {
            n for n in TASKS if (cache_dir() / "bigbench" / f"{n}.json").is_file()
        }
        _extract((set(TASKS) - cached) | {name})
    return json.loads(path.read_text(encoding="utf-8"))


def examples(
    name: str, data: dict[str, Any], answers: tuple[str, ...]
) -> list[Example]:
    """Usable examples of one task.json, formatted; the rest dropped with a logged count."""
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    listed = choice_prefix + choice_prefix.join(answers)
    head = data.get("task_prefix", "") + data.get("example_input_prefix", "\nQ: ")
    tail = (listed if data.get("append_choices_to_input", True) else "") + data.get(
        "example_output_prefix", "\nA: "
    )
    choices = tuple(" " + answer for answer in answers)
    kept, dropped = [], 0
    for example in data["examples"]:
        scores = example.get("target_scores")
        if not isinstance(example.get("input"), str) or not isinstance(scores, dict):
            dropped += 1
            continue
        numeric = all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in scores.values()
        )
        best = max(scores.values()) if numeric and scores else None
        winners = [answer for answer, score in scores.items() if score == best]
        if best is None or set(scores) != set(answers) or len(winners) != 1:
            dropped += 1
            continue
        text = (head + example["input"] + tail).strip()
        kept.append(Example(text, choices, answers.index(winners[0])))
    if dropped:
        log.warning(
            "bigbench %s: dropped %d of %d examples (no input/target_scores over %s with one best)",
            name,
            dropped,
            len(data["examples"]),
            answers,
        )
    return kept


def load(name: str, answers: tuple[str, ...]) -> dict[str, list[Example]]:
    pool = examples(name, task_json(name), answers)
    return split_single(f"bigbench_{name}", pool, TEST_FRACTION)


for _name, (_answers, _metrics) in TASKS.items():
    _load = functools.partial(load, _name, _answers)
    register_task(Task(f"bigbench_{_name}", "bigbench", len(_answers), _metrics, _load))
