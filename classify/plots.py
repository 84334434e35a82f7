"""The figures of an evaluation report, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from edge.imageio import ImageDecodeError, load_image, printable

TSNE_MAX_POINTS = 2000
GRID_MAX = 25
TILE = 128


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")  # keeps titles and labels inside
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png")


def _wrapped(title: str, width_inches: float) -> str:
    return "\n".join(textwrap.wrap(title, max(30, int(width_inches * 9))))


def _class_colours(n_classes: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"]
    return cmap(np.arange(n_classes) % cmap.N if n_classes <= 20 else np.linspace(0, 1, n_classes))


def _matrix_panel(ax, matrix: np.ndarray, class_names: list[str], values_format: str, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(ax=ax, cmap="Blues", colorbar=False, values_format=values_format, xticks_rotation=45,
                 text_kw={"fontsize": 8 if len(class_names) > 12 else 10})
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")
    ax.set_title(title, fontsize=10)


def confusion_matrix_png(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Counts beside the row-normalised matrix (share of each true class), so a small class's errors
    are as visible as a large one's; class names on both axes."""
    side = max(4.5, 1.5 + 0.5 * len(class_names))
    figure = _figure(2 * side + 0.5, side + 0.6)
    counts, shares = figure.subplots(1, 2)
    _matrix_panel(counts, matrix, class_names, "d", "counts")
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    _matrix_panel(shares, normalised, class_names, ".2f", "share of each true class (rows sum to 1)")
    shares.set_ylabel("")
    figure.suptitle(_wrapped(title, 2 * side + 0.5))
    _save(figure, path)


def _perplexity(n: int) -> float:
    """sklearn's default 30, lowered for small n (t-SNE needs perplexity < n)."""
    return float(min(30.0, max(2.0, (n - 1) / 3)))


def tsne_png(features: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, title: str,
             seed: int = 0) -> None:
    """2-D t-SNE (after PCA to 50 dims) of at most ``TSNE_MAX_POINTS`` rows, coloured by class."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    figure = _figure(8, 7)
    ax = figure.add_subplot()
    n = len(features)
    if n > TSNE_MAX_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(n, TSNE_MAX_POINTS, replace=False))
        features, labels, n = features[keep], labels[keep], TSNE_MAX_POINTS
    if n < 4:
        ax.text(0.5, 0.5, f"t-SNE needs at least 4 images; this split has {n}", ha="center", va="center")
        ax.set_axis_off()
    else:
        x = np.asarray(features, np.float64)
        if x.shape[1] > 50 and n > 50:
            x = PCA(50, random_state=seed).fit_transform(x)
        # one thread: on a busy 2-core machine spinning OpenMP threads made t-SNE 2-10x slower
        with threadpool_limits(limits=1):
            points = TSNE(2, perplexity=_perplexity(n), init="pca", random_state=seed).fit_transform(x)
        colours = _class_colours(len(class_names))
        for index, name in enumerate(class_names):
            mask = labels == index
            if mask.any():
                marker = "o" if len(class_names) <= 20 else "os^Dv"[index % 5]  # neighbours on turbo look alike
                ax.scatter(points[mask, 0], points[mask, 1], s=10, color=colours[index], label=name, alpha=0.8,
                           marker=marker)
        if len(class_names) <= 20:
            ax.legend(fontsize=8, markerscale=2, loc="best", frameon=True)
        else:  # beside the plot, in as many columns as it takes to fit the figure's height
            columns = -(-len(class_names) // 30)
            ax.legend(fontsize=7, markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      ncols=columns)
            figure.set_size_inches(8 + 2.2 * columns, 7)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(_wrapped(title, 8))
    _save(figure, path)


def _tile(image_path: Path | None) -> tuple[np.ndarray, bool]:
    """The image as a thumbnail, or a grey placeholder when it cannot be read (False)."""
    if image_path is not None:
        try:
            return load_image(image_path, (TILE, TILE)), True
        except ImageDecodeError:
            pass
    return np.full((TILE, TILE, 3), 220, np.uint8), False


def _short(name: str, width: int = 26) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def misclassified_png(errors: list[dict], images_root: str | None, path: Path, title: str) -> None:
    """A grid of the most confident wrong predictions, each tile named by its file; the title says
    when the grid is capped. ``errors`` items have path, true, predicted, probability."""
    shown = errors[:GRID_MAX]
    if len(errors) > len(shown):
        title += f"; the {len(shown)} most confident shown (metrics.json lists all)"
    columns = max(1, min(5, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure = _figure(2.6 * columns, 3.1 * rows + 0.6)
    if not shown:
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
    for i, item in enumerate(shown):
        ax = figure.add_subplot(rows, columns, i + 1)
        image, found = _tile(Path(images_root) / item["path"] if images_root else None)
        ax.imshow(image)
        if not found:
            ax.text(TILE / 2, TILE / 2, "(image not found)", ha="center", va="center", fontsize=7)
        ax.set_title(f"{_short(printable(item['path']))}\ntrue: {printable(item['true'])}\n"
                     f"pred: {printable(item['predicted'])} "
                     f"({item['probability']:.2f})", fontsize=7)
        ax.set_axis_off()
    figure.suptitle(_wrapped(title, 2.6 * columns))
    _save(figure, path)
