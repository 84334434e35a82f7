"""``identify``: print the ImageNet classes a backbone sees in some photos."""

from __future__ import annotations

import click

from extract.options import backbone_option, json_option, weights_option


@click.command("identify")
@click.argument("images", nargs=-1, required=True)
@backbone_option(default="efficientnet_lite0")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 1000), help="Classes to show per image.")
@weights_option(default="imagenet", help="imagenet (Keras cache, or the installed package for efficientnet_lite0) "
                                         "or a weights file PATH that includes the 1000-class top.")
@json_option("Print a JSON list with one object per image.")
def identify_command(images, backbone, top, weights, as_json):
    """Name what is in each IMAGE with a backbone's ImageNet classifier.

    A quick check that a backbone's weights and preprocessing are right before extracting features
    with it. IMAGES are files, folders (searched recursively) or quoted glob patterns. Images are
    centre-cropped (ImageNet evaluation view). A file that cannot be read or decoded is reported
    and the others are still classified; the exit status is then 1.

    \b
    Example:
      python cli.py identify photo.jpg
      python cli.py identify *.jpg --backbone resnet50 --top 3 --json
    """
    from edge.imageio import printable, strict_json
    from extract.identify import identify
    from extract.inputs import collect_images

    files, failed = collect_images(list(images))
    results = [{"path": arg, "error": reason} for arg, reason in failed]
    results += identify(files, backbone=backbone, top=top, weights=weights) if files else []
    if as_json:
        click.echo(strict_json(results))
    else:
        for result in results:
            click.echo(printable(result["path"]))
            if "error" in result:
                click.echo(f"  error: {printable(result['error'])}")
            for guess in result.get("top", []):
                click.echo(f"  {guess['probability']:.3f} {guess['class_id']:>4d} {guess['name']}")
    errors = sum("error" in result for result in results)
    if errors:
        raise click.ClickException(f"{errors} of {len(results)} images could not be classified")
