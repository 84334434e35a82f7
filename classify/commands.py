"""Click commands for heads: thin wrappers over classify.train / classify.report / classify.predict."""

from __future__ import annotations

import click

from classify.kinds import KIND_CHOICES
from edge.imageio import printable, strict_json
from classify.selection import DEFAULT_FOLDS
from extract.options import engine_option, json_option, split_option, weights_option


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command("fit-head")
@click.option("--store", required=True, type=click.Path(exists=True, dir_okay=False), help="HDF5 feature store.")
@click.option("--kind", required=True, type=click.Choice(KIND_CHOICES),
              help="svm, softmax, mlp, rbf, or all (fit every kind, keep the best cross-validation accuracy).")
@click.option("--backbone", default=None,  # a name in the store (BACKBONE@int8, BACKBONE@flip), not only the registry's
              help="Features to train on, as `store info` lists them [default: the store's only ones]; several "
                   "joined with '+' (efficientnet_lite0+efficientnet_lite1) train on their concatenation, over the "
                   "images every one of them has.")
@click.option("--out", required=True, type=click.Path(), help="Head folder to write (head.json + weights.npz).")
@click.option("--folds", default=DEFAULT_FOLDS, show_default=True, type=click.IntRange(min=2),
              help="Cross-validation folds (fewer when a class has fewer labelled images).")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same store: same head.")
@json_option("Print one JSON object per head, one per line.")
@click.option("--quiet", is_flag=True, help="No progress bar (on stderr).")
def fit_head_command(store, kind, backbone, out, folds, seed, as_json, quiet):
    """Train a classifier head on the features of a store and save it.

    Heads are fitted on the train and validation images together; hyper-parameters (C, gamma)
    and, for --kind all, the kind are chosen by stratified k-fold cross-validation on them. The
    test split is read only after the choice, to report it. --kind all ends with the commands of
    the most accurate recipe measured ("more accuracy: ...") unless the head follows it already.

    \b
    Example:
      python cli.py fit-head --store features.h5 --kind all --out head
      python cli.py fit-head --store features.h5 --kind rbf --backbone resnet50 --out head-rbf --json
      python cli.py fit-head --store features.h5 --kind all --backbone efficientnet_lite0+efficientnet_lite1 --out head
    """
    from extract.startup import import_library

    recipe, train = import_library("classify.recipe", "classify.train")
    rows = train.fit_heads(store, kind=kind, backbone=backbone, out=out, seed=seed, folds=folds, progress=not quiet)
    if as_json:
        for row in rows:
            click.echo(strict_json(row))
        return
    click.echo(f"{'kind':<9}{'CV acc':>15}{'test acc':>10}{'test F1':>9}{'fit s':>8}")
    for row in rows:
        cv = f"{row['cv_accuracy']:.3f} ± {row['cv_std']:.3f}"
        click.echo(f"{row['kind']:<9}{cv:>15}{_number(row['test_accuracy']):>10}"
                   f"{_number(row['test_macro_f1']):>9}{row['fit_seconds']:>8.2f}{'  saved' if row['saved'] else ''}")
    best = next(row for row in rows if row["saved"])
    click.echo(f"{best['kind']} head ({best['n_train'] + best['n_val']} training images, {best['cv_folds']}-fold CV) "
               f"saved to {best['head']}")
    hint = recipe.recipe_hint(store, best["backbone"], out) if kind == "all" else None
    if hint:
        click.echo(hint)


@click.command("evaluate")
@click.option("--store", type=click.Path(exists=True, dir_okay=False), default=None,
              help="HDF5 feature store: its split (and, for --model, the images behind its rows).")
@click.option("--head", type=click.Path(exists=True), default=None, help="Head folder written by fit-head.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Instead of --head: a fine-tuned MODEL.keras or an exported MODEL.onnx, run on the images.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help="Where the images are now, if they moved since extraction; with --model and no --store, "
                   "the image folder to evaluate on.")
@split_option(default="test")
@click.option("--report-dir", required=True, type=click.Path(file_okay=False), help="Folder for the report files.")
@click.option("--ood", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR",
              help="Images of none of the classes: report how well the unknown score tells them from the split's.")
@json_option("Print metrics.json to stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar (--model or --ood runs over the images).")
def evaluate_command(store, head, model, images, split, report_dir, ood, as_json, quiet):
    """Evaluate a head, a fine-tuned model or an exported ONNX model on one split and write a report.

    Writes classification_report.txt, confusion_matrix.png (counts and row-normalised),
    per_class.csv, misclassified.png, metrics.json and tsne.png (where the store has features)
    into --report-dir. A head is scored on the store's features, a model on the images behind the
    store's rows: same split, same files, comparable reports.

    --ood DIR (images of none of the classes, searched recursively) adds the AUROC of the unknown
    score (the split's images against DIR's), the share of DIR's images flagged at the calibrated
    threshold and the share of the split's images flagged (metrics.json key "ood"). A head is
    scored with the unknown score its export-onnx model would carry.

    \b
    Example:
      python cli.py evaluate --store features.h5 --head head --report-dir report
      python cli.py evaluate --store features.h5 --head head --ood other-photos/ --report-dir report
      python cli.py evaluate --store features.h5 --model model.onnx --report-dir report-onnx
      python cli.py evaluate --model model.keras --images photos/ --report-dir report-ft
    """
    from classify.ood_report import ood_line
    from classify.report import evaluate, evaluate_model
    from edge.imageio import printable

    if (head is None) == (model is None):
        raise click.UsageError("give either --head HEAD or --model MODEL.onnx|MODEL.keras")
    if head is not None:
        if store is None:
            raise click.UsageError("--head needs --store (the head is scored on the store's features)")
        metrics = evaluate(store, head, split=split, report_dir=report_dir, images=images, ood=ood,
                           progress=not quiet)
    else:
        metrics = evaluate_model(model, split=split, report_dir=report_dir, store=store, images=images,
                                 progress=not quiet, ood=ood)
    if as_json:
        click.echo(strict_json(metrics))
        return
    click.echo(f"{metrics['kind']} {'head' if head else 'model'} on {metrics['n']} {split} images: "
               f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
               f"{len(metrics['misclassified'])} misclassified; report in {report_dir}")
    if "ood" in metrics:
        click.echo(printable(ood_line(metrics["ood"])))
    unreadable = {**metrics.get("unreadable", {}), **metrics.get("ood", {}).get("unreadable", {})}
    for path, reason in list(unreadable.items())[:5]:
        click.echo(f"  unreadable: {path}: {reason}", err=True)


@click.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--head", type=click.Path(exists=True), default=None, help="Head folder written by fit-head.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Instead of --head: a fine-tuned MODEL.keras or an exported MODEL.onnx.")
@weights_option(help="imagenet, none or a weights file PATH [default: the kind the head was trained with].")
@engine_option
@json_option("Print one JSON object per image, one per line.")
@click.option("--unknown", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Label images far from every class 'unknown' (models exported with an unknown score).")
@click.option("--quiet", is_flag=True, help="Do not say which engine runs (on stderr).")
def predict_command(images, head, model, weights, engine, as_json, unknown, quiet):
    """Classify IMAGES (files, folders searched recursively, or quoted glob patterns) with a head or a model.

    Preprocessing, input size and class order come from the head or model. A file that cannot be
    read or decoded gets an error line and the others are still classified; the exit status is
    then 1. A pattern or folder that matches no image is an error.

    A model.onnx written by export-onnx also scores how far each image is from every
    class: --json lines get ood_score and unknown, and an image above the calibrated threshold is
    labelled "unknown" (its best class stays first in top). --unknown off ignores the score.

    \b
    Example:
      python cli.py predict --head head photo1.jpg photo2.png
      python cli.py predict --head head inbox/ 'more/*.jpg' --json
      python cli.py predict --model model.onnx inbox/
    """
    from classify.classifiers import open_classifier
    from classify.predict import predict_images
    from extract.inputs import collect_images

    files, failed = collect_images(list(images))
    classifier = open_classifier(head=head, model=model, weights=weights, engine=engine)
    if not quiet:
        click.echo(f"predict: {len(files)} images with {classifier.kind} {printable(classifier.name)}, "
                   f"engine {classifier.engine}{_unknown_note(classifier, unknown == 'on')}", err=True)
    rows = [{"image": arg, "error": reason} for arg, reason in failed] + predict_images(
        classifier, files, unknown=unknown == "on")
    for row in rows:
        if as_json:
            click.echo(strict_json(row))
        elif "error" in row:
            click.echo(f"{printable(row['image'])}: error: {printable(row['error'])}")
        elif row.get("unknown"):
            best = row["top"][0]
            click.echo(f"{printable(row['image'])}: unknown (best {printable(best['label'])} "
                       f"{best['probability']:.3f}, ood_score {row['ood_score']:.4g})")
        else:
            click.echo(f"{printable(row['image'])}: {printable(row['label'])} ({row['probability']:.3f})")
    errors = sum("error" in row for row in rows)
    if errors:
        raise click.ClickException(f"{errors} of {len(rows)} images could not be classified")


def _unknown_note(classifier, on: bool) -> str:
    if classifier.ood is None:
        return ""
    if not on:
        return "; unknown detection off (--unknown off)"
    return f"; unknown when ood_score > {float(classifier.ood['threshold']):.4g}"


COMMANDS = [fit_head_command, evaluate_command, predict_command]
