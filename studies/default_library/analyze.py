"""Write the grid's results into this study's README (between the grid markers) and its
figures into figures/: the retrieval-quality tables for every key recipe x metric, each
target's baseline at the grid's budget against the same init trained long, and the figures of
`spot heatmap`. Runs on a partial grid (the README says what is missing).

    python studies/default_library/analyze.py
"""

from __future__ import annotations

import json
import math
import re
import statistics

from common import HERE, SOURCES, done_rows, passing_sources
from grid import GRID, TARGETS

from spot.analysis_io import Study, load_study
from spot.figures import write_figures
from spot.retrieval_quality import RetrievalQuality, retrieval_quality, retrieval_quality_markdown

K = 3  # the rule's k
ALPHA = 0.05


def long_baselines_markdown(study: Study) -> str:
    """Each target's seed-0 baseline at the grid's budget vs its init trained long."""
    path = GRID / "long_baselines.jsonl"
    if not path.is_file():
        return "The long baselines (how far the grid's budget is from convergence) have not run."
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    short = {r.target: r.baseline_score for r in study.rows if r.seed == 0}
    steps = json.loads((HERE / "target.json").read_text())["steps"]
    lines = [f"| target | init | baseline at {steps} steps (test) | long run: value step / steps "
             "run | long run test | gap |", "|---|---|---|---|---|---|"]
    for r in rows:
        at_t = short.get(r["target"])
        gap = "–" if at_t is None else f"{r['test'] - at_t:+.2f}"
        lines.append(f"| {r['target']} | {r['init']} | "
                     f"{'–' if at_t is None else f'{at_t:.2f}'} | {r['value_step']} / "
                     f"{r['steps_run']} | {r['test']:.2f} | {gap} |")
    gaps = [r["test"] - short[r["target"]] for r in rows if r["target"] in short]
    if gaps:
        lines.append(f"\nMean gap {statistics.mean(gaps):+.2f} points over {len(gaps)} targets.")
    return "\n".join(lines)


def default_choice(quality: list[RetrievalQuality], default: str) -> tuple[str, str]:
    """(the default by the README's rule, a Markdown paragraph saying why): the name with the
    highest mean gain kept at K (ties: mean Spearman) replaces `default` (the library's, which
    the grid picked by: `Study.pick_by`) if its gain is above the default's and beats random
    with p < ALPHA."""
    def rank(q: RetrievalQuality) -> tuple[float, float]:
        return tuple(x if math.isfinite(x) else -math.inf for x in (q.gain[K], q.correlation.rho))

    best = max(quality, key=rank)
    current = next(q for q in quality if q.name == default)
    switch = best is not current and best.gain[K] > current.gain[K] and best.p_value[K] < ALPHA
    choice = best.name if switch else default
    if switch:
        verdict = f"changes to {choice}"
    elif best is current:
        verdict = f"stays {default}"
    else:
        verdict = f"stays {default}; the grid cannot tell the protocols apart"
    text = (f"**The library's default, by the rule above: it {verdict}.** Highest gain kept at "
            f"k={K}: {best.name}, {best.gain[K]:.2f} against {best.random[K]:.2f} for random "
            f"picks (p {best.p_value[K]:.3f}; times {len(quality)}, Bonferroni: "
            f"{min(1.0, len(quality) * best.p_value[K]):.3f}); {default}: "
            f"{current.gain[K]:.2f} (p {current.p_value[K]:.3f}).")
    return choice, text


def grid_status(study: Study) -> list[str]:
    """What the grid still lacks (a bold line), or nothing when it is complete."""
    built = done_rows(HERE / "sources.jsonl")
    lacking = []
    if unbuilt := [s for s in SOURCES if s not in built]:
        lacking.append(f"candidate sources not built: {', '.join(unbuilt)}")
    if missing := [s for s in passing_sources() if s not in study.sources]:
        lacking.append(f"sources that beat zero-shot are not in it yet ({', '.join(missing)})")
    if missing := [t for t in TARGETS if t not in study.targets]:
        lacking.append(f"targets have no cells yet ({', '.join(missing)})")
    wanted = {*study.config.get("seeds", ()), *study.config.get("pick_seeds", ())}
    seeds = {t: {r.seed for r in study.rows if r.target == t} for t in study.targets}
    if few := [t for t, s in seeds.items() if s != wanted]:
        lacking.append(f"targets lack their pick seeds ({', '.join(few)})")
    if not lacking:
        return []
    return [f"**A partial grid over {len(study.sources)} sources ({', '.join(study.sources)}): "
            + "; ".join(lacking) + ". Its numbers are not the study's result.**"]


def main() -> None:
    study = load_study(GRID)
    figures = write_figures(study, HERE / "figures")
    status = grid_status(study)
    quality = retrieval_quality(study)
    _, choice = default_choice(quality, study.pick_by)
    block = "\n\n".join([
        "<!-- grid -->", *status, choice, retrieval_quality_markdown(study, quality=quality),
        "### The grid's budget against a long baseline", long_baselines_markdown(study),
        "Figures (`figures/`): " + ", ".join(f"`{p.name}`" for p in figures) + "\n"])
    readme = HERE / "README.md"
    readme.write_text(re.sub(r"<!-- grid -->.*?(?=<!-- /grid -->)", lambda _: block,
                             readme.read_text(), flags=re.S))
    print(f"README and {len(figures)} figures written")


if __name__ == "__main__":
    main()
