"""Interrupted runs: Ctrl-C in extract keeps the rows and says how to resume; fit-head on the partial store
says the rows are missing because extraction did not finish."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import make_image_folder

import extract.job
from cli import cli
from extract.store import FeatureStore

EXTRACT = ["--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine", "keras",
           "--batch-size", "4", "--quiet"]


def test_ctrl_c_in_extract_keeps_rows_and_fit_head_says_why_rows_are_missing(tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "images", per_class=6)
    store = tmp_path / "features.h5"
    real_batches = extract.job.decoded_batches

    def ctrl_c_after_one_batch(*args, **kwargs):
        for index, batch in enumerate(real_batches(*args, **kwargs)):
            if index == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(extract.job, "decoded_batches", ctrl_c_after_one_batch)
    result = CliRunner().invoke(cli, ["extract", str(images), "--store", str(store), *EXTRACT])
    assert result.exit_code == 130, result.output
    assert result.stderr == (f"interrupted: the 4 images extracted in this run are kept in {store} (14 of this "
                             f"run's 18 still to compute); run the same command again to resume\n")
    assert FeatureStore(store).info()["backbones"]["mobilenet_v2"]["rows"] == 4  # folded into the store

    result = CliRunner().invoke(cli, ["fit-head", "--store", str(store), "--kind", "svm", "--out", str(tmp_path / "h")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {store} has mobilenet_v2 features for only 4 of its 18 images because "
                                    f"an extraction did not finish (interrupted?); run the same extract command "
                                    f"again to resume (class ")

    monkeypatch.setattr(extract.job, "decoded_batches", real_batches)
    result = CliRunner().invoke(cli, ["extract", str(images), "--store", str(store), *EXTRACT])
    assert result.exit_code == 0 and "(14 extracted, 4 unchanged," in result.output, result.output


def test_split_folders_refuse_hash_split_options_and_advise_what_works(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images / "train", per_class=3)
    make_image_folder(images / "test", per_class=1, classes={"red": (220, 30, 30), "green": (30, 200, 40)})
    make_image_folder(images / "val", per_class=1, start=5)  # with a validation folder no option applies
    store = tmp_path / "f.h5"  # (without one, see test_dataset.py: validation is carved out of train/)
    new = CliRunner().invoke(cli, ["extract", str(images), "--store", str(store), *EXTRACT, "--test-split", "0.2"])
    assert new.exit_code == 1 and not store.exists()
    assert new.output == (f"Error: --test-split does not apply: {images} has split folders (train/, validation/ or "
                          f"val/, test/), which give every image's split; drop it, or move the images into "
                          f"DIR/<class>/ to split by hash\n")
    assert CliRunner().invoke(cli, ["extract", str(images), "--store", str(store), *EXTRACT]).exit_code == 0
    again = CliRunner().invoke(cli, ["extract", str(images), "--store", str(store), *EXTRACT,
                                     "--validation-split", "0.1", "--seed", "1"])
    assert again.exit_code == 1 and again.output.startswith("Error: --validation-split and --seed do not apply: ")
