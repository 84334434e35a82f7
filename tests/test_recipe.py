"""The recipe for more accuracy: what fit-head --kind all recommends, the README's copy of it, and that
its commands run (on generated images, with random weights at 32 px so that it takes seconds)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from conftest import fake_record, make_feature_store, make_image_folder

from classify.recipe import RECIPE_BACKBONES, RECIPE_FEATURES, recipe_commands
from cli import cli
from extract.store import BackboneRows, FeatureStore, read_state, write_state

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_shows_the_recipe_fit_head_prints():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### More accuracy"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert block[:4] == recipe_commands("features.h5", "photos/", "head")
    assert block[4] == "python cli.py export-onnx --store features.h5 --head head --out model.onnx"


def test_fit_head_all_recommends_the_recipe_unless_followed(tmp_path):
    store = make_feature_store(tmp_path / "plain.h5", backbone="efficientnet_lite0", images_root=str(tmp_path / "pics"))
    result = CliRunner().invoke(cli, ["fit-head", "--store", str(store), "--kind", "all", "--out",
                                      str(tmp_path / "head"), "--folds", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    (hint,) = [line for line in result.output.splitlines() if line.startswith("more accuracy:")]
    assert " && ".join(recipe_commands(store, tmp_path / "pics", tmp_path / "head")) in hint
    single = CliRunner().invoke(cli, ["fit-head", "--store", str(store), "--kind", "softmax", "--out",
                                      str(tmp_path / "head1"), "--folds", "2", "--quiet"])
    assert "more accuracy" not in single.output  # only --kind all recommends

    state = read_state(store)  # the same rows as the recipe's three backbones
    rows = state.backbones.pop("efficientnet_lite0")
    for name in RECIPE_BACKBONES:
        state.backbones[name] = BackboneRows(fake_record(name, rows.features.shape[1]), rows.path, rows.sha256,
                                             rows.features)
    write_state(tmp_path / "recipe.h5", state)
    followed = CliRunner().invoke(cli, ["fit-head", "--store", str(tmp_path / "recipe.h5"), "--kind", "all",
                                        "--backbone", RECIPE_FEATURES, "--out", str(tmp_path / "head2"),
                                        "--folds", "2", "--quiet"])
    assert followed.exit_code == 0, followed.output
    assert "more accuracy" not in followed.output and f"{RECIPE_FEATURES}" in (tmp_path / "head2" / "head.json").read_text()


def test_the_recipe_commands_run(tmp_path, monkeypatch):
    """Each command as fit-head prints it, with random weights at 32 px and the Keras engine added to
    the extract lines (the real weights at 224-260 px take minutes, not seconds)."""
    images = make_image_folder(tmp_path / "photos", per_class=4)
    monkeypatch.chdir(tmp_path)
    commands = recipe_commands("features.h5", "photos/", "head")
    for command in commands:
        args = shlex.split(command)[2:]  # drop "python cli.py"
        if args[0] == "extract":
            args += ["--weights", "none", "--input-size", "32", "--engine", "keras", "--quiet"]
        result = CliRunner().invoke(cli, [*args, "--quiet"] if args[0] == "fit-head" else args)
        assert result.exit_code == 0, (command, result.output)
    reader = FeatureStore(tmp_path / "features.h5")
    assert set(reader.backbones) == set(RECIPE_BACKBONES)
    assert all(reader.read(name).backbone.tta is None for name in reader.backbones)  # plain features, no mirror
    assert images.is_dir() and (tmp_path / "head" / "head.json").is_file()
    assert "more accuracy" not in result.output  # the head follows the recipe
    assert np.isfinite(reader.read(RECIPE_BACKBONES[0]).features).all()
