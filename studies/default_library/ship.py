"""Ship the finished sources as `spot/default_library`: a new library holding the build's key
protocols and, for every source in sources.jsonl, its value and a key per recipe, rebuilt from
the committed files in runs/ (no model is loaded); write its README and the sources table of
this study's README. A source whose value does not beat zero-shot on its test split is left
out (and named); one that does not beat the best constant answer is flagged.

    python studies/default_library/ship.py
"""

from __future__ import annotations

import re
import shutil

from common import (
    HERE,
    REPO,
    SOURCES,
    beyond_prior,
    console,
    ensure_published,
    passes,
    publish_source,
    scored_rows,
    test_scores,
    with_protocols_of,
)

DEST = REPO / "spot" / "default_library"
LIBRARY_README = """# Default prompt library for `smollm2-135m` ({n} sources)

Built by `studies/default_library/` (how each source was trained and chosen: its README). Each
source has a value (its best validation checkpoint) and two keys, one per key protocol:
`gradient` (the default: the mean prompt gradient of the choices loss at a shared start) and
`trained` (SPoT's: 50 steps from the shared start). `spot library protocols` shows them. Every
entry's metadata records the command that rebuilds it (`rebuild`) and where its data comes from
(`data`: `../shared/data` files beside this repository, or the `bigbench` sdist on PyPI). Using
the library needs neither: retrieval reads only these prompt files.

Scores are on each task's test split (up to 1,000 rows; also in each entry's `test`
metadata); validation on up to 400 rows. "Best constant" is the score of always giving the same
answer (the best one). Every value beats zero-shot; one that does not beat the best constant
answer ("beyond the prior: no") learned no more than the label prior on its task: its key still
describes the task, but its value carries little of it. "Not measured": the task's data was not
on the machine that shipped the library (the bigbench 1.0.0 sdist is no longer served by PyPI).

{table}
"""


def train_time(row: dict) -> str:
    minutes = f"{row['train_seconds'] / 60:.0f} min"
    return f"{minutes} after a resume (before it: untimed)" if row.get("resumed") else minutes


PRIOR = {True: "yes", False: "**no**", None: "not measured"}


def constant(row: dict) -> str:
    return "not measured" if row["constant_test"] is None else f"{row['constant_test']:.2f}"


def sources_table(rows: list[dict]) -> str:
    """Markdown table of finished sources (`scored_rows`)."""
    lines = ["| source | metric | zero-shot test | best constant | value test | beats zero-shot "
             "(ships) | beyond the prior | test rows | value step (validation) | steps run | "
             "train time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['zero_shot_test']:.2f} | "
              f"{constant(r)} | {r['value_test']:.2f} | "
              f"{'yes' if passes(r) else '**no**'} | {PRIOR[beyond_prior(r)]} | "
              f"{r['test_rows']} | {r['value_step']} "
              f"({r['value_validation']:.2f}, {r['validation_rows']} rows) | {r['steps_run']} | "
              f"{train_time(r)} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    published = ensure_published()
    shutil.rmtree(DEST)
    library = with_protocols_of(published, DEST)
    rows = scored_rows()
    shipped = [r for r in rows if passes(r)]
    for r in rows:
        if not passes(r):
            console.print(f"[yellow]not shipped: {r['task']} ({test_scores(r)})[/yellow]")
    for r in shipped:
        publish_source(library, r["task"], r)
    report = library.verify(repair=True)
    if not report.ok:
        raise SystemExit(f"the shipped library does not verify: {report.to_dict()}")
    for name in ("lock", "lock.gate"):
        (DEST / name).unlink(missing_ok=True)
    (DEST / "README.md").write_text(LIBRARY_README.format(
        n=len(shipped), table=sources_table(shipped)))
    study = HERE / "README.md"
    text = study.read_text()
    block = (f"<!-- sources -->\nFinished: {len(rows)} of {len(SOURCES)}. Train times are wall "
             "times on the 2-core machine, shared with other jobs (sst2 ran at 0.5-0.8 examples/s "
             "beside the key study; an idle machine trains at about 8.8).\n\n"
             + sources_table(rows))
    study.write_text(re.sub(r"<!-- sources -->.*?(?=<!-- /sources -->)", lambda _: block + "\n",
                            text, flags=re.S))
    console.print(f"shipped {len(shipped)} sources to {DEST}: "
                  f"{', '.join(r['task'] for r in shipped)}")


if __name__ == "__main__":
    main()
