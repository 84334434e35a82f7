"""Click commands for fine-tuning and ONNX export: thin wrappers over export.finetune / export.onnx_export."""

from __future__ import annotations

import click

from extract.errors import TransferKitError
from extract.options import backbone_option, weights_option


_MODE_OPTIONS = {True: ("unfreeze", "warmup_epochs"), False: ("blocks",)}  # options the other mode alone reads


def _refuse_other_modes_options(cache_front: bool) -> None:
    """An option given on the command line that this mode never reads is a usage error, not ignored."""
    context = click.get_current_context()
    given = [name for name in _MODE_OPTIONS[cache_front]
             if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        mode, other = ("--cache-front (the default)", "--no-cache-front") if cache_front else \
            ("--no-cache-front", "--cache-front")
        raise click.UsageError(f"{flags} {'is' if len(given) == 1 else 'are'} not used with {mode}: "
                               f"give {other} to use {'it' if len(given) == 1 else 'them'}")


@click.command("fine-tune")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@backbone_option(help="Backbone to fine-tune [default: the --head's].")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (MODEL.keras, plus MODEL.keras.json).")
@click.option("--head", type=click.Path(exists=True), default=None,
              help="Trained head (from fit-head) to start the classifier from: linear probe, then fine-tune.")
@click.option("--store", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Feature store whose train/validation/test split to use "
                   "[default: the head's store, if it exists].")
@click.option("--cache-front/--no-cache-front", default=True, show_default=True,
              help="Train the last --blocks blocks on the frozen front's outputs, computed once per image, and "
                   "keep the model only if it beats the head on validation; --no-cache-front: train the top "
                   "--unfreeze layers end to end on augmented images.")
@click.option("--blocks", default=4, show_default=True, type=click.IntRange(min=0),
              help="With --cache-front: backbone blocks to train, counted from the top.")
@click.option("--unfreeze", default="20", show_default=True, metavar="N|all",
              help="With --no-cache-front: backbone layers to train, counted from the top "
                   "(BatchNorm layers always stay frozen).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Fine-tuning epochs (early stopping may end sooner) [default: 6 with --cache-front, else 10].")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="[default: 1e-4 decaying to 0 (cosine) with --cache-front, else 1e-5].")
@click.option("--image-size", type=int, default=None,
              help="Square input size [default: the head's, or the backbone's native size].")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@weights_option(help="imagenet, none (random, for tests) or a weights file PATH [default: the head's, or imagenet].")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed for initialisation, shuffling, augmentation (and the split, without a store).")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(min=1),
              help="Early-stopping patience in epochs.")
@click.option("--warmup-epochs", default=2, show_default=True, type=click.IntRange(min=0),
              help="With --no-cache-front: epochs training a new classifier on the frozen backbone first "
                   "(not used with --head).")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Where training_curves.png, test_report.txt and metrics.json go [default: MODEL-report/].")
@click.option("--quiet", is_flag=True, help="No progress bars and epoch lines (on stderr).")
def fine_tune_command(images_dir, backbone, out, head, store, cache_front, blocks, unfreeze, epochs, learning_rate,
                      image_size, batch_size, weights, seed, patience, warmup_epochs, report_dir, quiet):
    """Fine-tune a backbone and its classifier on IMAGES_DIR; keep it only if it beats the head.

    By default the frozen front of the backbone runs once per image (its outputs are cached in
    memory) and the last --blocks blocks and the classifier train on them, the epoch picked on a
    carved-off tenth of the train split; the model is written only when its validation accuracy beats
    a head of the --head's kind (softmax without --head) fitted on the same train images (without a
    validation split, on another tenth of train). The test split is read afterwards, for the report.

    \b
    Example:
      python cli.py fine-tune photos/ --head head --store features.h5 --out model.keras
      python cli.py fine-tune photos/ --backbone efficientnet_lite0 --no-cache-front --unfreeze all --out model.keras
    """
    from export.finetune import fine_tune

    _refuse_other_modes_options(cache_front)
    result = fine_tune(
        images_dir, backbone, out, head=head, unfreeze=unfreeze, epochs=epochs, learning_rate=learning_rate,
        image_size=image_size, batch_size=batch_size, seed=seed, store=store, weights=weights, patience=patience,
        report_dir=report_dir, warmup_epochs=warmup_epochs, progress=not quiet, cache_front=cache_front,
        blocks=blocks,
    )
    trained = (f"the last {len(result.cut['blocks'])} blocks ({result.trainable_layers} layers) trained on the "
               f"cached output of {result.cut['layer']}" if result.cut else
               f"{result.trainable_layers} backbone layers trained")
    click.echo(
        (f"{result.model_path}: " if result.written else "") + f"{trained} for {result.epochs_run} epochs (best {result.best_epoch}) after {result.warmup_epochs} warm-up "
        f"epochs in {result.seconds:.0f} s; {result.validation_before.get('on', 'validation')} accuracy "
        f"{100 * result.validation_before['accuracy']:.1f}% before fine-tuning"
    )
    _echo_comparisons(result)
    click.echo(f"report: {result.report_dir}")
    for path, reason in list(result.skipped.items())[:10]:
        click.echo(f"  skipped: {path}: {reason}")


def _echo_comparisons(result) -> None:
    """The validation decision (cached front), then the test figures, which are a report only."""
    from export.finetune_cached import HeadComparison

    if result.comparison:
        decided = HeadComparison(**{k: v for k, v in result.comparison.items() if k != "kept"})
        click.echo(decided.line(result.model_path))
    test = result.test
    if test["images"]:
        click.echo(f"test: accuracy {100 * test['accuracy']:.2f}%, macro-F1 {test['macro_f1']:.3f} "
                   f"on {test['images']} images" + ("" if result.written else " (the fine-tuned model, not written)"))
    if test["images"] and result.head_test:
        before = result.head_test
        verdict = ("better than" if test["accuracy"] > before["accuracy"] else
                   "the same as" if test["accuracy"] == before["accuracy"] else "WORSE than")
        advice = "; keep the head (export-onnx --store ... --head ...)" if verdict == "WORSE than" else ""
        click.echo(f"compared with the head: {100 * test['accuracy']:.2f}% fine-tuned vs "
                   f"{100 * before['accuracy']:.2f}% head on the same test split ({before['images']} images "
                   f"in the store): {verdict} the head" + ("" if result.comparison else advice))


@click.command("export-onnx")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (MODEL.onnx).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None, help="A fine-tuned MODEL.keras.")
@click.option("--store", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Feature store the head was trained on.")
@click.option("--head", type=click.Path(exists=True), default=None, help="Trained head (from fit-head).")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help="Image folder for the checks [default: the folder the store or model was made from].")
@weights_option(help="Backbone weights file, when the head was trained on features from --weights PATH.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 18))
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write MODEL.int8.onnx (static QDQ, calibrated on train images) if it keeps its accuracy.")
@click.option("--tolerance", default=1.0, show_default=True, type=float,
              help="Test accuracy points the int8 model may lose before it is refused.")
@click.option("--parity-images", default=64, show_default=True, type=click.IntRange(min=1),
              help="Real images on which Keras and onnxruntime must agree.")
@click.option("--calibration-images", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: all cores].")
@click.option("--unknown", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Add the unknown score (output ood_score, threshold in the metadata); off: neither fitted "
                   "nor computed by the model.")
@click.option("--quiet", is_flag=True, help="Do not say what each step is doing (on stderr).")
def export_onnx_command(out, model, store, head, images, weights, opset, quantize, tolerance, parity_images,
                        calibration_images, threads, unknown, quiet):
    """Export a fine-tuned model, or a frozen backbone with a trained head, to one ONNX file.

    The model takes uint8 RGB images [N, H, W, 3] (named "image") and outputs "probabilities"
    and, unless --unknown off, "ood_score" (how far the image is from every class); preprocessing
    is inside the graph and the class names, input size and backbone are in its metadata. Every
    export is checked against Keras on real images before it is kept.

    \b
    Example:
      python cli.py export-onnx --store features.h5 --head head --out model.onnx
      python cli.py export-onnx --model model.keras --out model.onnx --quantize int8
      python cli.py export-onnx --store features.h5 --head head --out plain.onnx --unknown off
    """
    from export.onnx_export import export_onnx

    result = export_onnx(out, model=model, store=store, head=head, images=images, weights=weights, opset=opset,
                         quantize=quantize, tolerance=tolerance, parity_images=parity_images,
                         calibration_images=calibration_images, threads=threads, progress=not quiet,
                         unknown=unknown == "on")
    click.echo(f"{result.path}: model_id {result.metadata['model_id']}, "
               f"{len(result.metadata['class_names'])} classes, input uint8 {result.metadata['input_size']} NHWC")
    click.echo(result.parity.summary())
    if result.removed_stale_int8:
        click.echo(f"removed {result.removed_stale_int8}: it was quantized from an earlier model")
    report = result.quantization
    if report is None:
        return
    click.echo(report.table())
    if not report.accepted:
        raise TransferKitError(
            f"int8 refused: it loses {report.drop:.2f} accuracy points (tolerance {tolerance:g}); "
            f"kept the float model {result.path}, wrote no int8 file"
        )
    click.echo(f"{report.path}: int8 accepted, test accuracy {100 * report.int8_score.accuracy:.2f}% vs "
               f"{100 * report.float_score.accuracy:.2f}% float (tolerance {tolerance:g} points; "
               f"{report.calibration_images} calibration images)")


COMMANDS = [fine_tune_command, export_onnx_command]
