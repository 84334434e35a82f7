"""Evaluate a head, a fine-tuned model.keras or an exported model.onnx on one split, and write the report.

    >>> evaluate("features.h5", "head/", split="test", report_dir="report/")["accuracy"]
    >>> evaluate_model("model.onnx", store="features.h5", split="test", report_dir="report-onnx/")

A head is scored on the store's features; a model on the images behind the store's rows (or a
folder's images), so the two reports are comparable: same split, same files, same figures.
Writes ``REPORT_FILES`` into the report folder (``tsne.png`` only where features exist);
``metrics.json`` repeats the numbers for scripts.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from classify import plots
from classify.data import features_for_head, split_rows
from classify.fingerprints import changed_splits, same_whole_store
from classify.joined import read_features
from classify.persist import TrainedHead, head_dir, load_head
from classify.scoring import scores
from edge.imageio import printable, strict_json
from extract.errors import TransferKitError
from extract.splits import SplitSettings
from extract.store import FeatureSet

REPORT_FILES = ("classification_report.txt", "confusion_matrix.png", "per_class.csv", "tsne.png",
                "misclassified.png", "metrics.json")


@dataclass
class Predictions:
    """What a report is drawn from: one split's labels, probabilities and files."""

    split: str
    y: np.ndarray
    probabilities: np.ndarray
    class_names: list[str]
    paths: list[str]  # relative to images_root
    images_root: str | None
    title: str  # "<what> on <features/images>, <split> split (N images)"
    tsne_features: np.ndarray | None = None  # features of the same rows, when there are any
    tsne_title: str = ""


def _per_class_rows(y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> list[dict]:
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return [
        {"class": name, "support": int(support[i]), "precision": round(float(precision[i]), 4),
         "recall": round(float(recall[i]), 4), "f1": round(float(f1[i]), 4)}
        for i, name in enumerate(class_names)
    ]


def write_report(result: Predictions, report_dir: str | Path, seed: int = 0) -> dict:
    """The report files and the metrics every kind of model shares (class names escaped by ``printable``
    in the text, CSV and figures; exact in the metrics, whose JSON is ``strict_json``)."""
    y, probabilities, names = result.y, result.probabilities, result.class_names
    shown = [printable(name) for name in names]
    pred = probabilities.argmax(axis=1)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(range(len(names)))
    (out / "classification_report.txt").write_text(
        result.title + "\n\n" + classification_report(y, pred, labels=labels, target_names=shown, digits=3,
                                                       zero_division=0),
        encoding="utf-8",
    )
    per_class = _per_class_rows(y, pred, names)
    with open(out / "per_class.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(per_class[0]))
        writer.writeheader()
        writer.writerows({**row, "class": printable(row["class"])} for row in per_class)
    matrix = confusion_matrix(y, pred, labels=labels)
    plots.confusion_matrix_png(matrix, shown, out / "confusion_matrix.png", result.title)
    files = [name for name in REPORT_FILES if name != "tsne.png" or result.tsne_features is not None]
    if result.tsne_features is not None:
        plots.tsne_png(result.tsne_features, y, shown, out / "tsne.png", result.tsne_title, seed=seed)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probabilities[wrong, pred[wrong]], kind="stable")]
    errors = [{"path": result.paths[i], "true": names[y[i]], "predicted": names[pred[i]],
               "probability": float(probabilities[i, pred[i]])} for i in wrong]
    plots.misclassified_png(errors, result.images_root, out / "misclassified.png",
                            f"misclassified {result.split} images: {len(errors)} of {len(y)}")
    return {
        "split": result.split, "n": len(y), **scores(y, pred), "class_names": names, "per_class": per_class,
        "confusion_matrix": matrix.tolist(), "misclassified": errors, "images_root": result.images_root,
        "files": [str(out / name) for name in files],
    }


def _save_metrics(metrics: dict, report_dir: str | Path) -> dict:
    (Path(report_dir) / "metrics.json").write_text(strict_json(metrics, indent=2) + "\n",
                                                   encoding="utf-8")
    return metrics


def evaluate(store: str | Path, head: str | Path, split: str = "test", report_dir: str | Path = "report",
             seed: int = 0, images: str | Path | None = None, ood: str | Path | None = None,
             progress: bool = False) -> dict:
    """Predict ``split`` with the head on the store's features, write the report, return the metrics.

    ``images``: where the images are now, for the misclassified grid (default: where they were
    when the store was extracted). ``ood``: a folder of images of no class; adds ``metrics["ood"]``
    (``classify/ood_report.py``) for the unknown score the head's export would carry.

    Only ``split``'s features are read (with ``ood`` also the train and validation ones, which the
    unknown score is fitted on): peak memory grows with that split's rows, not the store's
    (docs/store-format.md, reading cost). The head is evaluated on any store with its backbone,
    weights and classes (others are refused); ``metrics["same_store_as_training"]`` says whether
    the store is the one it was fitted on, unchanged, and ``changed_since_training`` which splits
    differ: ``split`` by its rows and features, train and validation by their rows (paths, content
    sha256, labels; their features are not read: classify/fingerprints.py). A head saved before
    per-split fingerprints has ``changed_since_training`` None and is checked, as then, on every
    split's features.
    """
    trained = load_head(head)
    features, rows = _read_for_evaluation(trained, store, split, everything=ood is not None)
    X, y, paths = split_rows(features, split, store)
    recorded = trained.split_fingerprints
    changed = None if recorded is None else changed_splits(recorded, rows, features, split)
    name = trained.features_name
    result = Predictions(
        split=split, y=y, probabilities=trained.predict_proba(X), class_names=trained.class_names, paths=paths,
        images_root=str(images) if images else features.store_attrs.get("images_root"),
        title=f"{trained.kind} head on {name} features, {split} split ({len(y)} images)",
        tsne_features=X, tsne_title=f"t-SNE of {name} features, {split} split")
    metrics = write_report(result, report_dir, seed)
    if ood is not None:
        metrics["ood"] = _head_ood(head, features, X, ood, progress)
    return _save_metrics({
        **metrics, "model": str(head_dir(head)), "head": str(head_dir(head)), "kind": trained.kind,
        "engine": "numpy head on stored features", "store": str(store),
        "same_store_as_training": same_whole_store(trained.store, features) if changed is None else not changed,
        "changed_since_training": changed, "backbone": name}, report_dir)


def _read_for_evaluation(trained: TrainedHead, store: str | Path, split: str,
                         everything: bool) -> tuple[FeatureSet, FeatureSet]:
    """The head's features of ``split`` (of every split when ``everything``, or for a head without
    per-split fingerprints, whose check needs them all), and every split's rows without features
    (for the fingerprints of the rows the head learned from)."""
    if everything or trained.split_fingerprints is None:
        features = features_for_head(trained, store)
        return features, features
    features = features_for_head(trained, store, (split,))
    rows = read_features(store, trained.features_name, with_features=False)
    if not len(features.paths):
        split_rows(rows, split, store)  # refuses the empty split, quoting every split's count
    return features, rows


def _head_ood(head: str | Path, features, X: np.ndarray, folder: str | Path, progress: bool) -> dict:
    """``ood_metrics`` with the scorer export-onnx would add: stored features for the split, the
    backbone over ``folder``'s images."""
    from classify.classifiers import head_classifier
    from classify.ood import unknown_scorer
    from classify.ood_report import ood_metrics, with_scorer

    scorer = unknown_scorer(features)
    classifier = with_scorer(head_classifier(head), scorer)
    return ood_metrics(classifier, scorer.score_samples(X), folder, progress)


def _labelled_images(classifier, store, images, split: str):
    """The images of ``split``: the store's rows (read from ``images`` or where they were extracted),
    or the folder ``images`` with the model's split settings; plus store features for the t-SNE."""
    from export.data import LabelledImages, from_feature_set, from_folder
    from extract.store import FeatureStore

    features = None
    if store is not None:
        reader = FeatureStore(store)
        if not reader.backbones:
            raise TransferKitError(f"{store} has no features yet; run extract first")
        features = reader.read(classifier.backbone if classifier.backbone in reader.backbones
                               else reader.backbones[0])
        labelled = from_feature_set(features, images)
    elif images is not None:
        labelled = from_folder(images, classifier.split_settings or SplitSettings(), anchors=classifier.split_anchors)
    else:
        raise TransferKitError("give --store (its split and images) or --images DIR to evaluate a model on")
    unknown = sorted(set(labelled.class_names) - set(classifier.class_names))
    if unknown:
        raise TransferKitError(f"the model knows classes [{', '.join(classifier.class_names)}]; the images also "
                               f"have [{', '.join(unknown)}]")
    order = np.asarray([classifier.class_names.index(name) for name in labelled.class_names], dtype=np.int64)
    labelled = LabelledImages(labelled.root, labelled.relpaths, order[labelled.labels], labelled.split,
                              list(classifier.class_names))  # labels in the model's class order
    keep = np.flatnonzero(labelled.split == split)
    if not len(keep):
        raise TransferKitError(f"no {split} images in {store or images}")
    tsne = None
    if features is not None and features.backbone.name == classifier.backbone:
        tsne = features.features[keep]
    return labelled.take(keep), tsne


def evaluate_model(model: str | Path, split: str = "test", report_dir: str | Path = "report",
                   store: str | Path | None = None, images: str | Path | None = None, seed: int = 0,
                   progress: bool = False, ood: str | Path | None = None) -> dict:
    """Run a model.onnx / model.keras over the images of ``split`` and write the same report as a head's.

    ``ood``: a folder of images of no class; adds ``metrics["ood"]`` for the model's unknown score."""
    from classify.classifiers import open_classifier
    from classify.ood_report import ood_metrics
    from classify.predict import predict_images

    classifier = open_classifier(model=model)
    if ood is not None and classifier.ood is None:
        raise TransferKitError(f"{model} has no unknown score (ood_score output and ood metadata); "
                               f"export it again with `python cli.py export-onnx`")
    labelled, tsne = _labelled_images(classifier, store, images, split)
    rows = predict_images(classifier, labelled.paths, progress=progress, keep_probabilities=True)
    ok = [i for i, row in enumerate(rows) if "error" not in row]
    if not ok:
        raise TransferKitError(f"none of the {len(rows)} {split} images could be read: {rows[0]['error']}")
    result = Predictions(
        split=split, y=labelled.labels[ok], probabilities=np.stack([rows[i]["probabilities"] for i in ok]),
        class_names=classifier.class_names, paths=[labelled.relpaths[i] for i in ok],
        images_root=str(labelled.root),
        title=f"{classifier.kind} model {Path(model).name} on {split} images ({len(ok)} images)",
        tsne_features=tsne[ok] if tsne is not None else None,
        tsne_title=f"t-SNE of the store's {classifier.backbone} features, {split} split")
    metrics = write_report(result, report_dir, seed)
    if ood is not None:
        metrics["ood"] = ood_metrics(classifier, np.asarray([rows[i]["ood_score"] for i in ok]), ood, progress)
    return _save_metrics({
        **metrics, "model": str(model), "kind": classifier.kind, "engine": classifier.engine,
        "store": str(store) if store else None, "backbone": classifier.backbone,
        "unreadable": {rows[i]["image"]: rows[i]["error"] for i in range(len(rows)) if "error" in rows[i]}},
        report_dir)
