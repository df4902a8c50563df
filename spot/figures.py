"""Transferability figures from a study folder (matplotlib Agg canvas, no pyplot state, no JAX).

`write_figures(study_dir, out_dir)` writes, per the `spot.analysis` conventions:
    similarity_mean.png, similarity_token.png     clustered task-embedding cosine heatmaps
    transfer_rer.png                              source x target RER heatmap (mean over seeds)
    scatter_mean.png, scatter_token.png           similarity vs RER per target, Pearson r and p
    retrieval_curve.png                           gain kept by best-of-top-k, both metrics
Each `*_figure` function returns a `matplotlib.figure.Figure` for interactive use.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from spot import analysis

_SYNTHETIC = "SYNTHETIC example data, not a result"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _label(study: analysis.Study, figure: Figure, title: str) -> None:
    if study.synthetic:
        title = f"{title}\n[{_SYNTHETIC}]"
    figure.suptitle(title, color="firebrick" if study.synthetic else "black")


def cluster_linkage(matrix: np.ndarray) -> np.ndarray | None:
    """Average-linkage tree (optimal leaf order) on 1 - symmetrised similarity; None if n < 3."""
    n = matrix.shape[0]
    if n < 3:
        return None
    distance = np.clip(1.0 - (matrix + matrix.T) / 2.0, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    return hierarchy.optimal_leaf_ordering(hierarchy.linkage(condensed, "average"), condensed)


def cluster_order(matrix: np.ndarray) -> list[int]:
    """Row/column order that puts similar tasks next to each other."""
    tree = cluster_linkage(matrix)
    return list(range(matrix.shape[0])) if tree is None else list(hierarchy.leaves_list(tree))


def _annotate(ax, values: np.ndarray, fmt: str, norm) -> None:
    if values.size > 400:
        return
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        shade = norm(value)
        ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                color="white" if shade < 0.2 or shade > 0.8 else "black")


def similarity_norm(matrix: np.ndarray) -> TwoSlopeNorm:
    """Colours centred on 0 and scaled to the largest |similarity| between different tasks (the
    diagonal's self-similarity of 1 saturates), so a 0.00-0.10 matrix is not left blank."""
    between = matrix[~np.eye(len(matrix), dtype=bool) & np.isfinite(matrix)]
    bound = float(np.abs(between).max()) if between.size else 1.0
    bound = min(max(bound, 1e-6), 1.0)
    return TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)


def similarity_figure(study: analysis.Study, metric: str) -> Figure:
    """Clustered heatmap of `metric` similarity over all tasks, dendrogram on top."""
    tasks, matrix = analysis.similarity_matrix(study, metric)
    tree = cluster_linkage(matrix)
    order = cluster_order(matrix)
    tasks, matrix = [tasks[i] for i in order], matrix[np.ix_(order, order)]
    n = len(tasks)
    size = max(4.5, 0.55 * n + 2.5)
    figure = _new_figure(size + 1.0, size + 1.2)
    grid = figure.add_gridspec(2, 2, height_ratios=[1, 5], width_ratios=[20, 1])
    if tree is not None:
        top = figure.add_subplot(grid[0, 0])
        hierarchy.dendrogram(tree, ax=top, no_labels=True, color_threshold=0,
                             above_threshold_color="0.3")
        top.set_xlim(0, 10 * n)
        top.axis("off")
    ax = figure.add_subplot(grid[1, 0])
    norm = similarity_norm(matrix)
    image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    labels = [f"{t} ({study.family(t)})" if study.family(t) else t for t in tasks]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    _annotate(ax, matrix, ".2f", norm)
    figure.colorbar(image, cax=figure.add_subplot(grid[1, 1]), label=f"cosine ({metric})",
                    extend="both")
    _label(study, figure, f"Task-embedding similarity ({metric}), clustered")
    return figure


def transfer_figure(study: analysis.Study) -> Figure:
    """Source x target heatmap of relative error reduction, mean over seeds (self: boxed)."""
    sources, targets, mean, _std = analysis.rer_matrix(study)
    figure = _new_figure(max(4.5, 1.1 * len(targets) + 3.0), max(3.5, 0.5 * len(sources) + 2.0))
    ax = figure.add_subplot()
    finite = mean[np.isfinite(mean)]
    bound = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)
    norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="RdBu_r", norm=norm, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    _annotate(ax, mean, "+.2f", norm)
    for i, source in enumerate(sources):
        if source in targets:
            j = targets.index(source)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    seeds = len(study.seeds)
    figure.colorbar(image, ax=ax, label=f"relative error reduction (mean of {seeds} seed(s))")
    _label(study, figure, "Transfer: relative error reduction vs the target's baseline")
    return figure


def scatter_figure(study: analysis.Study, metric: str) -> Figure:
    """Per target: `metric` similarity (x) vs RER (y), one point per source, r and p in titles."""
    pairs = [p for p in analysis.aggregate(study) if p.source != p.target]
    found = {c.target: c for c in analysis.correlations(study, metric)}
    targets = [t for t in study.targets if any(p.target == t for p in pairs)]
    columns = min(3, max(1, len(targets)))
    rows = math.ceil(len(targets) / columns)
    figure = _new_figure(max(4.2 * columns, 6.5), 3.6 * rows + 1.0)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, target in zip(axes.flat, targets, strict=False):
        mine = [p for p in pairs if p.target == target]
        x = np.array([p.sim(metric) for p in mine])
        y = np.array([p.rer for p in mine])
        err = np.array([0.0 if math.isnan(p.rer_std) else p.rer_std for p in mine])
        ax.errorbar(x, y, yerr=err, fmt="o", ms=5, capsize=2, color="tab:blue", ecolor="0.6")
        for p, xi, yi in zip(mine, x, y, strict=True):
            ax.annotate(p.source, (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.axhline(0.0, color="0.7", lw=0.8, zorder=0)
        c = found[target]
        stat = f"r = {c.r:.2f}, p = {c.p:.2g}" if not math.isnan(c.r) else c.note
        ax.set_title(f"{target}\n{stat} (n = {c.n})", fontsize=9)
        ax.set_xlabel(f"similarity ({metric})")
        ax.set_ylabel("relative error reduction (+-std over seeds)", fontsize=8)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    pooled = found[analysis.ALL_TARGETS]
    overall = (f"all targets: r = {pooled.r:.2f}, p = {pooled.p:.2g} (n = {pooled.n})"
               if not math.isnan(pooled.r) else f"all targets: {pooled.note}")
    _label(study, figure, f"Similarity ({metric}) vs transfer\n{overall}")
    return figure


def retrieval_figure(study: analysis.Study) -> Figure:
    """Gain kept by best-of-top-k for both metrics, with the random-choice expectation."""
    figure = _new_figure(6.0, 4.2)
    ax = figure.add_subplot()
    styles = {"mean": ("tab:blue", "o", "-", 8), "token": ("tab:orange", "s", "-.", 5)}
    curve = None
    for metric in analysis.STUDY_METRICS:
        curve = analysis.retrieval_curve(study, metric)
        color, marker, line, size = styles[metric]
        ax.plot(curve.ks, curve.mean, marker=marker, ls=line, ms=size, color=color,
                label=f"ranked by {metric}")
        if len(curve.per_target) > 1:
            ax.fill_between(curve.ks, curve.mean - curve.std, curve.mean + curve.std, color=color,
                            alpha=0.12, lw=0)
    assert curve is not None
    ax.plot(curve.ks, curve.random, ls="--", color="0.4", label="k random sources (expected)")
    ax.axhline(1.0, color="0.7", lw=0.8, zorder=0)
    ax.set_xticks(curve.ks)
    ax.set_xlabel("k (sources tried, most similar first)")
    ax.set_ylabel("gain kept = (best of top-k - baseline) / (oracle - baseline)")
    ax.yaxis.label.set_fontsize(8)
    ax.legend(fontsize=8)
    _label(study, figure, f"Retrieval: best-of-top-k, mean over {len(curve.per_target)} targets "
                          "(band: +-1 std)")
    return figure


def write_figures(study_dir: str | Path, out_dir: str | Path, *, dpi: int = 150) -> list[Path]:
    """Load the study folder and write every figure as PNG into `out_dir`; returns the paths."""
    study = analysis.load_study(study_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {f"similarity_{m}": similarity_figure(study, m) for m in analysis.STUDY_METRICS}
    figures["transfer_rer"] = transfer_figure(study)
    figures |= {f"scatter_{m}": scatter_figure(study, m) for m in analysis.STUDY_METRICS}
    figures["retrieval_curve"] = retrieval_figure(study)
    paths = []
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


__all__ = ["cluster_order", "retrieval_figure", "scatter_figure", "similarity_figure",
           "similarity_norm", "transfer_figure", "write_figures"]
