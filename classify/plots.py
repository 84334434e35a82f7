"""The figures of an evaluation report, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from edge.imageio import ImageDecodeError, load_image

TSNE_MAX_POINTS = 2000
GRID_MAX = 25
TILE = 128


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png")


def _class_colours(n_classes: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"]
    return cmap(np.arange(n_classes) % cmap.N if n_classes <= 20 else np.linspace(0, 1, n_classes))


def confusion_matrix_png(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Counts, class names on both axes, x labels rotated so long names stay readable."""
    from sklearn.metrics import ConfusionMatrixDisplay

    side = max(5.0, 1.5 + 0.55 * len(class_names))
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot()
    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(ax=ax, cmap="Blues", colorbar=True, values_format="d", xticks_rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")
    ax.set_title(title)
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
                ax.scatter(points[mask, 0], points[mask, 1], s=10, color=colours[index], label=name, alpha=0.8)
        ax.legend(fontsize=8, markerscale=2, loc="best", frameon=True)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    _save(figure, path)


def _tile(image_path: Path | None) -> tuple[np.ndarray, bool]:
    """The image as a thumbnail, or a grey placeholder when it cannot be read (False)."""
    if image_path is not None:
        try:
            return load_image(image_path, (TILE, TILE)), True
        except ImageDecodeError:
            pass
    return np.full((TILE, TILE, 3), 220, np.uint8), False


def misclassified_png(errors: list[dict], images_root: str | None, path: Path, title: str) -> None:
    """A grid of the most confident wrong predictions: ``errors`` items have path, true, predicted, probability."""
    shown = errors[:GRID_MAX]
    columns = max(1, min(5, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure = _figure(2.6 * columns, 2.9 * rows + 0.5)
    if not shown:
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
    for i, item in enumerate(shown):
        ax = figure.add_subplot(rows, columns, i + 1)
        image, found = _tile(Path(images_root) / item["path"] if images_root else None)
        ax.imshow(image)
        if not found:
            name = "\n".join(textwrap.wrap(Path(item["path"]).name, 18)) + "\n(image not found)"
            ax.text(TILE / 2, TILE / 2, name, ha="center", va="center", fontsize=7)
        ax.set_title(f"true: {item['true']}\npred: {item['predicted']} ({item['probability']:.2f})", fontsize=8)
        ax.set_axis_off()
    figure.suptitle(title)
    _save(figure, path)
