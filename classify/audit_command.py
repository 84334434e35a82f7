"""The ``audit`` command: a thin wrapper over ``classify.audit.run_audit``."""

from __future__ import annotations

import click

from edge.imageio import strict_json
from extract.neighbours import NEAR_DUPLICATE_COSINE as FEATURE_THRESHOLD  # light: classify.duplicates needs scipy
from extract.options import json_option


@click.command("audit")
@click.option("--store", required=True, type=click.Path(exists=True, dir_okay=False), help="HDF5 feature store.")
@click.option("--backbone", default=None, help="Backbone whose features to use [default: the store's only one].")
@click.option("--report-dir", required=True, type=click.Path(file_okay=False), help="Folder for audit.html and audit.json.")
@click.option("--images", default=None, type=click.Path(exists=True, file_okay=False),
              help="The image folder, if it moved since extraction [default: the one the store was made from].")
@click.option("--threshold", default=FEATURE_THRESHOLD, show_default=True, type=click.FloatRange(0, 1),
              help="Cosine similarity of (centred) features above which two images are near-duplicates.")
@click.option("--top", default=40, show_default=True, type=click.IntRange(min=1), help="Mislabel suspects and outliers listed.")
@click.option("--thorough", is_flag=True,
              help="Also look for copies among pictures that share SIFT visual words, not only among pictures "
                   "whose features are close: finds copies rotated, cropped or recoloured beyond what the features "
                   "see (about 3x slower).")
@json_option("Print audit.json to stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def audit_command(store, backbone, report_dir, images, threshold, top, thorough, as_json, quiet):
    """Audit a data set from its stored features: near-duplicates and leaks across splits, label
    conflicts, likely mislabels, outliers and class balance, in audit.html and audit.json.

    \b
    Example:
      python cli.py audit --store features.h5 --report-dir audit
      python cli.py audit --store features.h5 --backbone resnet50 --report-dir audit --json
      python cli.py audit --store features.h5 --report-dir audit --thorough
    """
    from classify.audit import run_audit
    from classify.label_checks import leak_effect_sentence  # imports scikit-learn: not at CLI start-up

    report = run_audit(store, backbone=backbone, report_dir=report_dir, images=images, feature_threshold=threshold,
                       top=top, progress=not quiet, thorough=thorough)
    if as_json:
        click.echo(strict_json(report))
        return
    s, effect = report["summary"], report["leak_effect"]
    click.echo(f"{report['images']} images: {s['duplicate_groups']} duplicate groups ({s['images_in_groups']} images), "
               f"{s['leak_groups']} across splits, {s['label_conflict_groups']} with conflicting labels; "
               f"{s['test_images_with_train_copy']} test images have a copy in train")
    if effect and effect["leaked_test_images"]:
        click.echo(leak_effect_sentence(effect))
    click.echo(f"{len(report['mislabel_suspects'])} mislabel suspects, {s['outliers']} outliers; "
               f"report in {report['files'][1]} ({s['seconds']} s)")
    if not report["image_files_read"]:
        click.echo("  note: image files not found (pass --images DIR): no pixel checks, aligned pictures, keypoints"
                   + (", visual words (--thorough)" if thorough else "") + " or thumbnails; identical files from "
                   "the stored hashes", err=True)


COMMANDS = [audit_command]
