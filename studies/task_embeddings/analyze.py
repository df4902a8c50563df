"""Similarity matrices and family clustering of the keys `run.py` wrote.

    python studies/task_embeddings/analyze.py   # writes results.json, figures/, prints tables
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from library import load_prompt, similarity
from library.protocol import KeyProtocol

HERE = Path(__file__).resolve().parent
PERMUTATIONS = 10_000
FIGURE_METRICS = {"gradient-choices": ("token",), "trained-lm": ("delta-flat",),
                  "answer-words (control)": ("mean",)}


def load_keys(folder: Path) -> tuple[KeyProtocol, np.ndarray, dict[str, np.ndarray], dict]:
    from run import FAMILIES

    start, meta = load_prompt(folder / "_start.safetensors")
    keys, seconds = {}, {}
    for task in FAMILIES:
        path = folder / f"{task}.safetensors"
        if path.is_file():
            keys[task], info = load_prompt(path)
            seconds[task] = float(info["seconds"])
    return KeyProtocol.from_json(meta["protocol"]), start, keys, seconds


def protocol_name(protocol: KeyProtocol) -> str:
    return f"{protocol.recipe}-{protocol.objective}"


def answer_words(tasks: list[str]) -> tuple[None, None, dict[str, np.ndarray], dict]:
    """A control with no training signal: each task's answer-word token embeddings [n, d]."""
    from spot import backbones
    from spot.prompts import token_embeddings
    from spot.tasks import get_task

    model = backbones.load()
    keys = {t: token_embeddings(model, list(get_task(t).load("train")[0].choices))
            for t in tasks}
    return None, None, keys, {}


def metrics_for(protocol: KeyProtocol) -> list[str]:
    base = ["mean", "token", "flat"]
    return base + [f"delta-{m}" for m in base] if protocol.recipe == "trained" else base


def nn_share(matrix: np.ndarray, families: list[str]) -> float:
    """Share of tasks with a family partner whose nearest other task is in their family."""
    hits, count = 0, 0
    for i, family in enumerate(families):
        if families.count(family) < 2:
            continue
        row = matrix[i].copy()
        row[i] = -np.inf
        hits += families[int(np.argmax(row))] == family
        count += 1
    return hits / count


def within_between(matrix: np.ndarray, families: list[str]) -> tuple[float, float]:
    pairs = list(itertools.combinations(range(len(families)), 2))
    within = [matrix[i, j] for i, j in pairs if families[i] == families[j]]
    between = [matrix[i, j] for i, j in pairs if families[i] != families[j]]
    return float(np.mean(within)), float(np.mean(between)) if between else float("nan")


def permutation_p(matrix: np.ndarray, families: list[str], observed: float) -> float:
    """P(share >= observed) when family labels are shuffled (+1 smoothed)."""
    rng = np.random.default_rng(0)
    hits = sum(nn_share(matrix, list(rng.permutation(families))) >= observed
               for _ in range(PERMUTATIONS))
    return (hits + 1) / (PERMUTATIONS + 1)


def main() -> None:
    from run import FAMILIES

    results = {}
    sets = [load_keys(folder) for folder in sorted(p for p in (HERE / "keys").iterdir()
                                                    if p.is_dir())]
    sets.append(answer_words(list(FAMILIES)))
    for protocol, start, keys, seconds in sets:
        tasks = list(keys)
        families = [FAMILIES[t] for t in tasks]
        name = "answer-words (control)" if protocol is None else protocol_name(protocol)
        entry = {"protocol": None if protocol is None else json.loads(protocol.to_json()),
                 "tasks": tasks, "families": families, "seconds": seconds, "metrics": {}}
        for metric in (["mean", "token"] if protocol is None else metrics_for(protocol)):
            matrix = np.array([[similarity(keys[a], keys[b], metric, start) for b in tasks]
                               for a in tasks])
            share = nn_share(matrix, families)
            within, between = within_between(matrix, families)
            off = matrix[~np.eye(len(tasks), dtype=bool)]
            entry["metrics"][metric] = {
                "matrix": matrix.round(4).tolist(), "nn_same_family": share,
                "nn_p": permutation_p(matrix, families, share), "within": within,
                "between": between, "off_diagonal_range": [float(off.min()), float(off.max())],
            }
        results[name] = entry
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print("| protocol | metric | NN in family | p (shuffled families) | within | between | "
          "within - between | off-diagonal range |")
    print("|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        for metric, m in entry["metrics"].items():
            lo, hi = m["off_diagonal_range"]
            print(f"| {name} | {metric} | {m['nn_same_family']:.2f} | {m['nn_p']:.4f} | "
                  f"{m['within']:.3f} | {m['between']:.3f} | {m['within'] - m['between']:+.3f} | "
                  f"{lo:.3f} .. {hi:.3f} |")
    print("\n| protocol | tasks | median s/task | min | max |\n|---|---|---|---|---|")
    for name, entry in results.items():
        if not entry["seconds"]:
            continue
        s = np.array(list(entry["seconds"].values()))
        print(f"| {name} | {len(s)} | {np.median(s):.1f} | {s.min():.1f} | {s.max():.1f} |")
    figure(results)


def figure(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, metric) for name, entry in results.items()
              for metric in entry["metrics"] if metric in FIGURE_METRICS.get(name, ())]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.5))
    for ax, (name, metric) in zip(np.atleast_1d(axes), panels, strict=True):
        entry = results[name]
        order = np.argsort(entry["families"], kind="stable")
        tasks = [entry["tasks"][i] for i in order]
        matrix = np.array(entry["metrics"][metric]["matrix"])[np.ix_(order, order)]
        off = matrix[~np.eye(len(tasks), dtype=bool)]
        image = ax.imshow(matrix, cmap="viridis", vmin=off.min(), vmax=off.max())
        labels = [f"{t.removeprefix('bigbench_')[:18]} ({entry['families'][i][:5]})"
                  for t, i in zip(tasks, order, strict=True)]
        ax.set_xticks(range(len(tasks)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tasks)), labels, fontsize=7)
        ax.set_title(f"{name}, {metric}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    (HERE / "figures").mkdir(exist_ok=True)
    fig.savefig(HERE / "figures" / "similarity.png", dpi=110)


if __name__ == "__main__":
    main()
