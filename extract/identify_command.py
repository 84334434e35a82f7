"""``identify``: print the ImageNet classes a backbone sees in some photos."""

from __future__ import annotations

import json

import click

from extract.options import backbone_option, json_option, weights_option


@click.command("identify")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@backbone_option(default="efficientnet_lite0")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 1000), help="Classes to show per image.")
@weights_option(default="imagenet", help="imagenet (Keras cache, or the installed package for efficientnet_lite0) "
                                         "or a weights file PATH that includes the 1000-class top.")
@json_option("Print a JSON list with one object per image.")
def identify_command(images, backbone, top, weights, as_json):
    """Name what is in each IMAGE with a backbone's ImageNet classifier.

    A quick check that a backbone's weights and preprocessing are right before extracting features
    with it. Images are centre-cropped (ImageNet evaluation view). A file that cannot be decoded is
    reported and the others are still classified; the exit status is then 1.

    \b
    Example:
      python cli.py identify photo.jpg
      python cli.py identify *.jpg --backbone resnet50 --top 3 --json
    """
    from extract.identify import identify

    results = identify(images, backbone=backbone, top=top, weights=weights)
    if as_json:
        click.echo(json.dumps(results, ensure_ascii=False))
    else:
        for result in results:
            click.echo(result["path"])
            if "error" in result:
                click.echo(f"  error: {result['error']}")
            for guess in result.get("top", []):
                click.echo(f"  {guess['probability']:.3f} {guess['class_id']:>4d} {guess['name']}")
    if any("error" in result for result in results):
        click.get_current_context().exit(1)
