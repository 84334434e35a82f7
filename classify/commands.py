"""Click commands for heads: thin wrappers over classify.train / classify.report / classify.predict."""

from __future__ import annotations

import json

import click

from classify.heads import KIND_CHOICES
from extract.options import backbone_option, engine_option, json_option, split_option, weights_option


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command("fit-head")
@click.option("--store", required=True, type=click.Path(exists=True, dir_okay=False), help="HDF5 feature store.")
@click.option("--kind", required=True, type=click.Choice(KIND_CHOICES),
              help="svm, softmax, mlp, or all (fit every kind, keep the best on validation accuracy).")
@backbone_option(help="Backbone whose features to use [default: the store's only one].")
@click.option("--out", required=True, type=click.Path(), help="Head folder to write (head.json + weights.npz).")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same store: same head.")
@json_option("Print one JSON object per head, one per line.")
def fit_head_command(store, kind, backbone, out, seed, as_json):
    """Train a classifier head on the features of a store and save it.

    The features are standardised on the train split; C (svm) and early stopping (softmax, mlp)
    use the validation split; the test split is only reported.

    \b
    Example:
      python cli.py fit-head --store features.h5 --kind all --out head
      python cli.py fit-head --store features.h5 --kind svm --backbone resnet50 --out head-svm --json
    """
    from classify.train import fit_heads

    rows = fit_heads(store, kind=kind, backbone=backbone, out=out, seed=seed)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    click.echo(f"{'kind':<9}{'val acc':>9}{'test acc':>10}{'test F1':>9}{'fit s':>8}")
    for row in rows:
        click.echo(f"{row['kind']:<9}{_number(row['val_accuracy']):>9}{_number(row['test_accuracy']):>10}"
                   f"{_number(row['test_macro_f1']):>9}{row['fit_seconds']:>8.2f}{'  saved' if row['saved'] else ''}")
    best = next(row for row in rows if row["saved"])
    click.echo(f"{best['kind']} head ({best['n_train']} training images) saved to {best['head']}")


@click.command("evaluate")
@click.option("--store", required=True, type=click.Path(exists=True, dir_okay=False), help="HDF5 feature store.")
@click.option("--head", required=True, type=click.Path(exists=True), help="Head folder written by fit-head.")
@split_option(default="test")
@click.option("--report-dir", required=True, type=click.Path(file_okay=False), help="Folder for the report files.")
@json_option("Print metrics.json to stdout.")
def evaluate_command(store, head, split, report_dir, as_json):
    """Evaluate a head on one split of a store and write a report.

    Writes classification_report.txt, confusion_matrix.png, per_class.csv, tsne.png,
    misclassified.png and metrics.json into --report-dir.

    \b
    Example:
      python cli.py evaluate --store features.h5 --head head --report-dir report
      python cli.py evaluate --store other.h5 --head head --split validation --report-dir report-val
    """
    from classify.report import evaluate

    metrics = evaluate(store, head, split=split, report_dir=report_dir)
    if as_json:
        click.echo(json.dumps(metrics, ensure_ascii=False))
        return
    click.echo(f"{metrics['kind']} head on {metrics['n']} {split} images: accuracy {metrics['accuracy']:.3f}, "
               f"macro-F1 {metrics['macro_f1']:.3f}, {len(metrics['misclassified'])} misclassified; "
               f"report in {report_dir}")


@click.command("predict")
@click.option("--head", required=True, type=click.Path(exists=True), help="Head folder written by fit-head.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@weights_option(help="imagenet, none or a weights file PATH [default: the kind the head was trained with].")
@engine_option
@json_option("Print one JSON object per image, one per line.")
def predict_command(head, images, weights, engine, as_json):
    """Classify image files with the backbone and head: label and probability per image.

    Preprocessing, input size and class order come from the head. An image that cannot be
    decoded gets an error line; the others are still classified.

    \b
    Example:
      python cli.py predict --head head photo1.jpg photo2.png
      python cli.py predict --head head --weights ~/resnet50_notop.h5 --json inbox/*.jpg
    """
    from classify.predict import predict_images

    for row in predict_images(head, list(images), weights=weights, engine=engine):
        if as_json:
            click.echo(json.dumps(row, ensure_ascii=False))
        elif "error" in row:
            click.echo(f"{row['image']}: error: {row['error']}")
        else:
            click.echo(f"{row['image']}: {row['label']} ({row['probability']:.3f})")


COMMANDS = [fit_head_command, evaluate_command, predict_command]
