"""Click command ``retrain``: a thin wrapper over ``export.retrain.retrain``."""

from __future__ import annotations

import click

from edge.imageio import printable
from extract.options import weights_option


@click.command("retrain")
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The model to improve: a MODEL.onnx written by export-onnx --store --head.")
@click.option("--review", required=True, type=click.Path(exists=True, file_okay=False),
              help="Sorted review folder: REVIEW/<class>/<image>, classes the model knows (no unknown/).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="New model file to write (NEW.onnx).")
@click.option("--head-out", type=click.Path(file_okay=False), default=None,
              help="Folder for the new head [default: NEW-head beside --out].")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help="The model's image folder, if it moved since extraction.")
@weights_option(help="Backbone weights file, when the head was trained on features from --weights PATH.")
@click.option("--allow-worse", is_flag=True, help="Write the new model even if it is less accurate on the test split.")
@click.option("--overwrite", is_flag=True, help="Replace --out (even the --model file) and --head-out if they exist.")
@click.option("--quiet", is_flag=True, help="No progress (on stderr).")
def retrain_command(model, review, out, head_out, images, weights, allow_worse, overwrite, quiet):
    """Retrain MODEL with the images sorted into a review folder and write a new model file.

    Reads what MODEL was made from (store, head, image folder, export options), links the review
    images into the image folder (each gets its split by the store's rule), extracts features of
    the new images only, fits a head of the same kind with the same seed and folds, and exports it
    with the same opset (and int8 if MODEL had an int8 file), parity-checked. Old and new heads are
    scored on the old test split (the store's test images that are not review images); a less
    accurate new model is refused unless --allow-worse (the review images stay in the image
    folder and the store either way).

    \b
    Example:
      python cli.py edge --model model.onnx --watch inbox/ --results results.jsonl --review review/
      # sort review/unknown/ and wrong guesses into review/<class>/, then:
      python cli.py retrain --model model.onnx --review review/ --out model-v2.onnx
    """
    from export.retrain import retrain

    result = retrain(model, review, out, images=images, head_out=head_out, weights=weights,
                     allow_worse=allow_worse, overwrite=overwrite, progress=not quiet)
    added = ", ".join(f"{printable(name)} {count}" for name, count in sorted(result.added.items())) or "none"
    click.echo(f"added {sum(result.added.values())} review images to {printable(result.images)} ({added}); "
               f"{result.already_there} were already there")
    summary = result.extraction
    click.echo(f"extract: {summary.extracted} images computed, {summary.reused} unchanged, {summary.failed} failed")
    for rows, comparison in (("the old test split ({} images, no review image)", result.test),
                             ("all {} test images of the store now, review images included", result.all_test)):
        click.echo(f"test accuracy on {rows.format(comparison.images)}: {100 * comparison.old_accuracy:.2f}% old, "
                   f"{100 * comparison.new_accuracy:.2f}% new ({comparison.verdict})")
    export = result.export
    click.echo(f"{result.kind} head saved to {printable(result.head)}")
    click.echo(f"{printable(export.path)}: model_id {export.metadata['model_id']}; {export.parity.summary()}")
    report = export.quantization
    if report is not None:
        click.echo(f"int8: {'accepted, ' + printable(report.path) if report.accepted else 'refused'} "
                   f"({100 * report.int8_score.accuracy:.2f}% vs {100 * report.float_score.accuracy:.2f}% float)")


COMMANDS = [retrain_command]
