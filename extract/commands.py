"""Click commands for extraction and the store: thin wrappers over extract.job / extract.store."""

from __future__ import annotations

import json
import sys

import click

from edge.imageio import printable, strict_json
from extract.backbones import DEFAULT_BACKBONE, list_backbones, offline_backbones
from extract.defaults import DEFAULT_BATCH_SIZE, DEFAULT_TOLERANCE
from extract.identify_command import identify_command
from extract.int8 import INT8_ENGINE
from extract.record import TTA_CHOICES
from extract.options import backbone_option, dtype_option, engines_option, json_option, weights_option
from extract.splits import GROUP_BY_CHOICES, SplitSettings
from extract.streams import MAX_STREAMS

SPLIT_DEFAULTS = SplitSettings()
BACKBONE_HELP = (f"Works offline (weights install with the tool): {', '.join(offline_backbones())}. The others "
                 f"need their Keras ImageNet weights file in ~/.keras/models, downloaded once "
                 f"(`backbones` lists which are there).")


@click.command("extract")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--store", required=True, type=click.Path(dir_okay=False), help="HDF5 feature store to create or update.")
@backbone_option(default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
@weights_option(default="imagenet")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(min=1))
@click.option("--validation-split", type=click.FloatRange(0, 1, max_open=True), default=None,
              help=f"Share of images for validation when folders do not give splits "
                   f"[default: {SPLIT_DEFAULTS.validation_split:g}, or the store's].")
@click.option("--test-split", type=click.FloatRange(0, 1, max_open=True), default=None,
              help=f"Share of images for test [default: {SPLIT_DEFAULTS.test_split:g}, or the store's].")
@click.option("--seed", type=int, default=None, help=f"Split seed [default: {SPLIT_DEFAULTS.seed}, or the store's].")
@click.option("--split-group", default=None, metavar="REGEX",
              help="Images whose paths are equal once REGEX matches are removed share a split, e.g. "
                   "'_aug\\d+' keeps img1.jpg and img1_aug3.jpg together [default: none, or the store's].")
@click.option("--split-group-by", type=click.Choice(GROUP_BY_CHOICES), default=None,
              help="near-duplicates: the groups of copies `audit` reports (identical files, nearly identical "
                   "features, rotated, zoomed or mirrored copies) share a split, found once the features are "
                   "computed [default: none, or the store's].")
@dtype_option
@engines_option(extra=(INT8_ENGINE,),
                help="auto: onnxruntime (converted once and cached, checked against Keras), Keras if that fails; "
                     "on a store holding only int8 rows of the backbone, int8. onnx-int8: the backbone quantized "
                     "once (calibrated on the folder's train images, cached), features under BACKBONE@int8; "
                     "refused (fp32 used, and said why) if a linear head loses more than --tolerance points.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=DEFAULT_TOLERANCE, show_default=True,
              help="Accuracy points int8 features may lose against fp32 (onnx-int8 only).")
@click.option("--input-size", type=int, default=None, help="Square input size [default: the backbone's native size].")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None,
              help="flip: store each image's features averaged with its mirror image's, under BACKBONE@flip "
                   "(twice the backbone's work; about a point more accuracy for EfficientNet-Lite heads). "
                   "export-onnx puts the same averaging in the model.")
@click.option("--shard", default=None, metavar="I/N", help="Extract only shard I of N (each shard to its own --store; merge with `store merge`).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads [default: all cores].")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help="Batches computed at once, the inference threads shared among them: more streams waste "
                   "less time in onnxruntime's per-layer joins (docs/bench/int8.md) [default: one per "
                   f"thread, at most {MAX_STREAMS}].")
@click.option("--checkpoint-seconds", type=float, default=60.0, show_default=True,
              help="How often computed batches are checkpointed into the store while the job runs.")
@click.option("--runner", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: compute on a Ray cluster (pip install -e '.[ray]'); see docs/scale.md.")
@click.option("--ray-address", default=None, metavar="auto|ADDR",
              help="Ray cluster to use with --runner ray [default: start a local Ray instance on this machine].")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Ray tasks to split the work into [default: 4 per task slot of the cluster].")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs per Ray task; also its onnxruntime and decode threads.")
@json_option("Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract_command(images_dir, store, backbone, weights, batch_size, validation_split, test_split, seed, split_group,
                    split_group_by, dtype, engine, tolerance, input_size, tta, shard, threads, streams,
                    checkpoint_seconds, runner, ray_address, shards, cpus_per_task, as_json, quiet):
    """Run a frozen ImageNet backbone over IMAGES_DIR and keep the features in an HDF5 store.

    IMAGES_DIR is DIR/<class>/<image> or DIR/{train,validation,test}/<class>/<image>. Re-running
    computes only new or changed images; a killed run resumes where it stopped.

    \b
    Example:
      python cli.py extract photos/ --store features.h5 --backbone efficientnet_lite0
      python cli.py extract photos/ --store features.h5 --backbone resnet50 --weights ~/resnet50_notop.h5
      python cli.py extract photos/ --store shard0.h5 --shard 0/2 --weights none
      python cli.py extract photos/ --store leak-free.h5 --split-group-by near-duplicates
      python cli.py extract photos/ --store features.h5 --backbone resnet50 --engine onnx-int8
      python cli.py extract photos/ --store features.h5 --backbone efficientnet_lite1 --tta flip
      python cli.py extract photos/ --store features.h5 --runner ray --ray-address auto
    """
    from extract.job import ExtractionInterrupted, run_extraction

    ray_options = _ray_options(runner, ray_address, shards, cpus_per_task)
    try:
        summary = run_extraction(
            images_dir, store, backbone=backbone, weights=weights, batch_size=batch_size,
            validation_split=validation_split, test_split=test_split, seed=seed, split_group=split_group,
            split_group_by=split_group_by, dtype=dtype, engine=engine, tolerance=tolerance, input_size=input_size,
            shard=shard, threads=threads, streams=streams, checkpoint_seconds=checkpoint_seconds, progress=not quiet,
            ray_options=ray_options, tta=tta,
        )
    except ExtractionInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)  # the shell's status for Ctrl-C
    for note in summary.notes:
        click.echo(note, err=True)
    if as_json:
        click.echo(strict_json(summary.to_dict()))
        return
    click.echo(
        f"{summary.backbone}: {summary.images} images in {summary.store} "
        f"({summary.extracted} extracted, {summary.reused} unchanged, {summary.failed} failed, "
        f"{summary.removed} removed, {summary.ignored} non-image files ignored) "
        f"in {summary.seconds:.1f} s"
        + (f", {summary.images_per_second:.1f} images/s with {summary.engine}" if summary.extracted else "")
    )
    if summary.split_groups:
        click.echo(f"  {summary.split_groups} near-duplicate groups kept in one split "
                   f"({summary.split_moved} images moved to their group's split)")
    for path, reason in summary.failures[:10]:
        click.echo(f"  failed: {printable(path)}: {printable(reason)}")
    if len(summary.failures) > 10:
        click.echo(f"  ... and {len(summary.failures) - 10} more (see `python cli.py store info {store}`)")
    _warn_copies(summary.copies_across_splits)


def _ray_options(runner: str, address: str | None, shards: int | None, cpus_per_task: int):
    """RayOptions for --runner ray (imports no Ray); Ray options without it are a usage error."""
    if runner == "local":
        given = [name for name, value in (("--ray-address", address), ("--shards", shards),
                                          ("--cpus-per-task", cpus_per_task != 1)) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} needs --runner ray")
        return None
    from extract.ray_runner import RayOptions

    return RayOptions(address=address, shards=shards, cpus_per_task=cpus_per_task)


@click.group("store")
def store_group():
    """Inspect, merge and upgrade feature stores."""


@store_group.command("info")
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@json_option("Print one JSON object.")
def store_info_command(store, as_json):
    """Summarise a feature store: images, failures, classes, splits and backbones.

    \b
    Example:
      python cli.py store info features.h5 --json
    """
    from extract.store import FeatureStore

    info = FeatureStore(store).info()
    if as_json:
        click.echo(strict_json(info))
        return
    click.echo(f"{info['path']}: {info['images']} images, {info['failed']} failed, {len(info['classes'])} classes")
    click.echo("  splits: " + ", ".join(f"{k} {v}" for k, v in info["split_counts"].items()))
    if info["validation"]:
        click.echo(f"  validation: {info['validation']}")
    click.echo("  classes: " + ", ".join(map(printable, info["classes"])))
    for name, b in info["backbones"].items():
        click.echo(f"  {name}: {b['rows']} rows x {b['dim']} {b['dtype']}, {b['input_size']} px, "
                   f"preprocessing {b['preprocessing']}, weights {b['weights']}")
    for failure in info["failures"][:10]:
        click.echo(f"  failed: {printable(failure['path'])}: {printable(failure['reason'])}")
    if len(info["failures"]) > 10:
        click.echo(f"  ... and {len(info['failures']) - 10} more failures (--json lists them all)")
    if info["pending_rows"]:
        click.echo(f"  {info['pending_rows']} rows from an interrupted run wait in batch files; "
                   f"the next extract folds them in")
    for leftover in info["leftovers"]:
        click.echo(f"  leftover: {leftover}" + ("" if leftover.startswith("missing") else
                                                " (from an interrupted run; the next extract deletes it)"))
    _warn_copies(info["copies_across_splits"])


def _warn_copies(groups: list[list[str]], shown: int = 5) -> None:
    """Identical files in two splits make test scores lie: say so, with the files to remove."""
    if not groups:
        return
    files = sum(len(g) for g in groups)
    click.echo(f"  warning: {files} files are copies of {len(groups)} image(s) and sit in different splits "
               f"(the test score will be optimistic); keep one file of each group:", err=True)
    for group in groups[:shown]:
        click.echo("    " + " = ".join(map(printable, group)), err=True)
    if len(groups) > shown:
        click.echo(f"    ... and {len(groups) - shown} more (`store info --json` lists them all)", err=True)


@store_group.command("merge")
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--copy", is_flag=True, help="Copy the shards' segment files instead of hard-linking them.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Where the images are, when the shards were extracted from different folders.")
def store_merge_command(out, shards, force, copy, images_root):
    """Merge shard stores written by `extract --shard I/N` into one store, without copying features.

    OUT's segment files are hard links to the shards' (immutable) files, so OUT stays valid whatever
    later happens to the shards. Refuses an existing OUT (unless --force), a shard given twice, shards
    with rows still waiting in batch files, and shards with other classes, split settings or backbones.

    \b
    Example:
      python cli.py store merge features.h5 shard0.h5 shard1.h5
    """
    from extract.store import FeatureStore, merge_stores

    merge_stores(out, list(shards), force=force, images_root=images_root, copy=copy)
    info = FeatureStore(out).info()
    click.echo(f"{out}: {info['images']} images from {len(shards)} shards; "
               + ", ".join(f"{n} {b['rows']} rows" for n, b in info["backbones"].items()))


@store_group.command("upgrade")
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
def store_upgrade_command(store):
    """Convert a format-1 store (one file holding every feature) to the current, segmented format.

    \b
    Example:
      python cli.py store upgrade features.h5
    """
    from extract.store_upgrade import upgrade_store

    result = upgrade_store(store)
    click.echo(f"{store}: format {result['from']} -> {result['to']}; "
               + ", ".join(f"{n} {rows} rows" for n, rows in result["rows"].items()))


@click.command("backbones")
@json_option("Print a JSON list with one object per backbone.")
def backbones_command(as_json):
    """List the registered backbones, their feature size, input size and whether weights are here.

    \b
    Example:
      python cli.py backbones
    """
    from extract.weights import weights_availability

    rows = []
    for spec in list_backbones():
        weights = weights_availability(spec)
        rows.append({**spec.to_dict(), "weights_offline": weights.available, "weights_location": weights.location})
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'name':<22}{'dim':>6}{'input':>7}  {'preprocessing':<14}weights offline")
    for r in rows:
        mark = "yes" if r["weights_offline"] else "no "
        click.echo(f"{r['name']:<22}{r['feature_dim']:>6}{r['input_size']:>7}  {r['preprocessing']:<14}"
                   f"{mark} ({r['weights_location']})")


COMMANDS = [extract_command, store_group, backbones_command, identify_command]
