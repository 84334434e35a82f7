"""The recipe for more accuracy that ``fit-head --kind all`` recommends, and the commands that follow it.

EfficientNet-Lite0, -Lite1 and -Lite2 features concatenated, under the head ``--kind all`` keeps
(cross-validation): the most accurate combination ``bench/accuracy.py`` measured on TrashNet and the
fruits set taken together (mean of the two cross-validated accuracies), at the cost of running three
backbones per image. Averaging each backbone's features with the mirror image's (``extract --tta flip``)
doubles that cost and measured no better once the three are concatenated (``docs/bench/accuracy.md``
has the figures, their trade-off table, the CPU time per image and the command that made them).

    >>> line = recipe_hint("features.h5", "efficientnet_lite0")
    >>> print(line)  # "more accuracy: python cli.py extract photos/ --store features.h5 ..." (None if followed)
"""

from __future__ import annotations

import shlex
from pathlib import Path

RECIPE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RECIPE_FEATURES = "+".join(RECIPE_BACKBONES)


def recipe_commands(store: str | Path, images: str | Path, out: str | Path = "head") -> list[str]:
    """The commands that add the recipe's features to ``store`` (extracted from ``images``) and fit its head."""
    store_arg, images_arg, out_arg = (shlex.quote(str(v)) for v in (store, images, out))
    extract = [f"python cli.py extract {images_arg} --store {store_arg} --backbone {name}" for name in RECIPE_BACKBONES]
    return [*extract, f"python cli.py fit-head --store {store_arg} --kind all --backbone {RECIPE_FEATURES} "
                      f"--out {out_arg}"]


def recipe_hint(store: str | Path, features: str, out: str | Path = "head") -> str | None:
    """``more accuracy: <commands>`` for a head fitted on ``features`` of ``store`` (the image folder the
    store was extracted from goes in the commands); None when those are the recipe's features already."""
    from extract.store import FeatureStore

    if features == RECIPE_FEATURES:
        return None
    images = FeatureStore(store).root.attrs.get("images_root") or "IMAGES_DIR"
    commands = " && ".join(recipe_commands(store, images, out))
    return (f"more accuracy: EfficientNet-Lite0+Lite1+Lite2 features concatenated (three backbones per image: "
            f"see docs/bench/accuracy.md): {commands}")
