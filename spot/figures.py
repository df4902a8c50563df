"""Transferability figures from a study folder (matplotlib Agg canvas, no pyplot state, no JAX).

`write_figures(study, out_dir)` writes, per the `spot.analysis` conventions (a similarity
name "gradient/token" becomes "gradient_token" in file names):
    similarity_<name>.png     clustered task-embedding cosine heatmap, per name in similarity.jsonl
    transfer_rer.png          source x target RER heatmap (mean over the seeds run)
    scatter_<name>.png        similarity vs RER per complete target, Pearson r and Spearman rho
    retrieval_curve.png       gain kept by best-of-top-k per similarity name (+-1 std band)
    retrieval_quality.png     gain kept per name vs random (permutation p), mean Spearman rho
Figures that need complete (target, seed) groups say so instead when there are none.
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

from spot import analysis, retrieval_quality

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
    distance = np.clip(1.0 - np.nan_to_num((matrix + matrix.T) / 2.0), 0.0, None)
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
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu_r", norm=norm, aspect="auto",
                      interpolation="nearest")
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
    figure.colorbar(image, ax=ax, label=f"relative error reduction (mean over the seeds run, "
                                        f"{seeds} in all)")
    _label(study, figure, "Transfer: relative error reduction vs the target's baseline")
    return figure


def _placeholder(study: analysis.Study, title: str, why: str = analysis.NO_GROUP) -> Figure:
    """A figure saying why it is empty."""
    figure = _new_figure(6.0, 3.0)
    ax = figure.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=10, wrap=True)
    _label(study, figure, title)
    return figure


def _retrieval_placeholder(study: analysis.Study, title: str) -> Figure | None:
    """The placeholder of a retrieval figure with nothing to measure, else None."""
    why = analysis.no_retrieval(analysis.target_grids(study))
    return _placeholder(study, title, why) if why else None


def _style(names: list[str], name: str) -> dict:
    """Colour per name; line style per recipe ("gradient/...", "trained/..."), marker per metric."""
    recipes = list(dict.fromkeys(n.rpartition("/")[0] for n in names))
    metrics = list(dict.fromkeys(n.rpartition("/")[2] for n in names))
    recipe, _, metric = name.rpartition("/")
    return {"color": f"C{names.index(name) % 10}",
            "ls": ("-", "-.", ":")[recipes.index(recipe) % 3],
            "marker": "osD^v<>ph*"[metrics.index(metric) % 10], "ms": 5}


def scatter_figure(study: analysis.Study, metric: str) -> Figure:
    """Per complete target: `metric` similarity (x) vs RER (y), one point per source (mean over
    the complete seeds), r, rho and their p in titles."""
    study.check_name(metric)
    title = f"Similarity ({metric}) vs transfer"
    pairs = [p for p in analysis.aggregate(study, complete_only=True) if p.source != p.target]
    targets = study.complete_targets
    if not targets:
        return _placeholder(study, title)
    found = {c.target: c for c in analysis.correlations(study, metric)}
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
        stat = (f"r = {c.r:.2f} (p {c.p:.2g}), rho = {c.rho:.2f} (p {c.rho_p:.2g})"
                if not math.isnan(c.r) else c.note)
        ax.set_title(f"{target}\n{stat} (n = {c.n})", fontsize=9)
        ax.set_xlabel(f"similarity ({metric})")
        ax.set_ylabel("relative error reduction (+-std over seeds)", fontsize=8)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    pooled = found[analysis.ALL_TARGETS]
    overall = (f"all targets pooled: r = {pooled.r:.2f}, p = {pooled.p:.2g} (n = {pooled.n})"
               if not math.isnan(pooled.r) else f"all targets pooled: {pooled.note}")
    _label(study, figure, f"{title}\n{overall}")
    return figure


def retrieval_figure(study: analysis.Study) -> Figure:
    """Gain kept by best-of-top-k for every similarity name, with the random-choice expectation
    (+-1 std band across targets when there are at most 3 names)."""
    title = "Retrieval: best-of-top-k"
    if empty := _retrieval_placeholder(study, title):
        return empty
    names = study.similarity_names
    figure = _new_figure(6.5, 4.5)
    ax = figure.add_subplot()
    for name in names:
        curve = analysis.retrieval_curve(study, name)
        style = _style(names, name)
        ax.plot(curve.ks, curve.mean, label=f"ranked by {name}", **style)
        if len(curve.per_target) > 1 and len(names) <= 3:
            ax.fill_between(curve.ks, curve.mean - curve.std, curve.mean + curve.std,
                            color=style["color"], alpha=0.12, lw=0)
    ax.plot(curve.ks, curve.random, ls="--", color="0.3", label="k random sources (expected)")
    ax.axhline(1.0, color="0.7", lw=0.8, zorder=0)
    ax.set_xticks(curve.ks)
    ax.set_xlabel("k (sources tried, most similar first)")
    ax.set_ylabel("gain kept = (best of top-k - baseline) / (oracle - baseline)")
    ax.yaxis.label.set_fontsize(8)
    ax.legend(fontsize=7)
    band = " (band: +-1 std)" if len(names) <= 3 and len(curve.per_target) > 1 else ""
    _label(study, figure, f"{title}, mean over {len(curve.per_target)} targets{band}")
    return figure


def retrieval_quality_figure(study: analysis.Study, ks: tuple[int, ...] = (1, 3)) -> Figure:
    """Left: gain kept at k = 1..K per similarity name vs k random sources, legend with the
    permutation p at `ks`. Right: Spearman rho of similarity vs RER, per target (dots) and mean."""
    title = "Retrieval quality: which similarity beats random?"
    if empty := _retrieval_placeholder(study, title):
        return empty
    names = study.similarity_names
    quality = {q.name: q for q in retrieval_quality.retrieval_quality(study, ks)}
    figure = _new_figure(11.0, max(4.5, 0.35 * len(names) + 2.5))
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    for name in names:
        curve = analysis.retrieval_curve(study, name)
        p = ", ".join(f"p@{k} {quality[name].p_value[k]:.2g}" for k in ks)
        left.plot(curve.ks, curve.mean, label=f"{name} ({p})", **_style(names, name))
    left.plot(curve.ks, curve.random, ls="--", lw=2, color="black", label="k random (expected)")
    left.axhline(1.0, color="0.7", lw=0.8, zorder=0)
    left.set_xticks(curve.ks)
    left.set_xlabel("k (sources tried, most similar first)")
    left.set_ylabel("gain kept, mean over targets", fontsize=8)
    left.legend(fontsize=7)
    for i, name in enumerate(names):
        rho = [c.rho for c in analysis.correlations(study, name)[:-1]]
        right.scatter(rho, np.full(len(rho), i), s=14, color="0.5", zorder=2)
        right.barh(i, quality[name].correlation.rho, color=_style(names, name)["color"], alpha=0.6)
    right.axvline(0.0, color="0.3", lw=0.8)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlim(-1.05, 1.05)
    right.set_xlabel("Spearman rho, similarity vs RER (bar: mean, dots: targets)", fontsize=8)
    _label(study, figure, f"{title} ({len(study.complete_targets)} targets)")
    return figure


def _slug(name: str) -> str:
    return name.replace("/", "_")


def write_figures(study: analysis.Study, out_dir: str | Path, *, dpi: int = 150) -> list[Path]:
    """Write every figure of `study` as PNG into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {f"similarity_{_slug(m)}": similarity_figure(study, m) for m in study.similarity}
    figures["transfer_rer"] = transfer_figure(study)
    figures |= {f"scatter_{_slug(m)}": scatter_figure(study, m) for m in study.similarity_names}
    figures["retrieval_curve"] = retrieval_figure(study)
    figures["retrieval_quality"] = retrieval_quality_figure(study)
    paths = []
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


__all__ = ["cluster_order", "retrieval_figure", "retrieval_quality_figure", "scatter_figure",
           "similarity_figure", "similarity_norm", "transfer_figure", "write_figures"]
