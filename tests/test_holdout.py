"""Which rows train, pick the epoch and decide in cached fine-tuning: a stratified, deterministic hash carve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.data import LabelledImages
from export.holdout import carve, row_roles
from extract.errors import TransferKitError
from extract.splits import SplitSettings


def images(per_class: dict[str, int], split: str = "train", names=None) -> LabelledImages:
    relpaths, labels = [], []
    for label, (name, count) in enumerate(per_class.items()):
        relpaths += names(name, count) if names else [f"{name}/{split}_{i}.jpg" for i in range(count)]
        labels += [label] * count
    return LabelledImages(Path("."), relpaths, np.asarray(labels), np.asarray([split] * len(relpaths)),
                          list(per_class))


def test_the_carve_is_stratified_deterministic_and_disjoint():
    train = images({"a": 20, "b": 50, "c": 7, "d": 1})
    rest, carved = carve(train, 0.1, "job", SplitSettings())
    assert np.bincount(carved.labels, minlength=4).tolist() == [2, 5, 1, 0]  # a class of one is never carved
    assert sorted(rest.relpaths + carved.relpaths) == sorted(train.relpaths)
    assert not set(rest.relpaths) & set(carved.relpaths)
    assert carve(train, 0.1, "job", SplitSettings())[1].relpaths == carved.relpaths  # same images every run
    other = carve(train, 0.1, "another job", SplitSettings())[1].relpaths
    assert other != carved.relpaths  # the job salts the hash: two carves are not the same images
    assert carve(train, 0.1, "job", SplitSettings(seed=1))[1].relpaths != carved.relpaths


def test_copies_of_one_photo_stay_on_one_side():
    """With the store's --split-group, img_3.jpg and img_3_aug1.jpg share a key and so a side."""
    def names(cls, count):
        return [f"{cls}/img_{i // 2}{'_aug1' if i % 2 else ''}.jpg" for i in range(count)]

    train = images({"a": 40, "b": 40}, names=names)
    _, carved = carve(train, 0.2, "job", SplitSettings(split_group=r"_aug\d+"))
    carved_photos = {p.replace("_aug1", "") for p in carved.relpaths}
    assert len(carved.relpaths) == 2 * len(carved_photos)  # both copies of each carved photo
    _, ungrouped = carve(train, 0.2, "job", SplitSettings())
    assert len({p.replace("_aug1", "") for p in ungrouped.relpaths}) > len(ungrouped.relpaths) / 2


def test_roles_with_a_validation_split():
    train, validation = images({"a": 30, "b": 30}), images({"a": 5, "b": 5}, "validation")
    roles = row_roles(train, validation, SplitSettings())
    assert roles.decide.relpaths == validation.relpaths and roles.decide_source == "validation split"
    assert sorted(roles.fit.relpaths + roles.stop.relpaths) == sorted(train.relpaths)
    assert np.bincount(roles.stop.labels).tolist() == [3, 3] and not set(roles.fit.relpaths) & set(roles.stop.relpaths)


def test_roles_without_a_validation_split_carve_train_twice():
    train = images({"a": 30, "b": 30})
    roles = row_roles(train, images({"a": 0, "b": 0}, "validation"), SplitSettings())
    fit, stop, decide = (set(r.relpaths) for r in (roles.fit, roles.stop, roles.decide))
    assert roles.decide_source == "carved from train (no validation split)"
    assert fit | stop | decide == set(train.relpaths) and not (fit & stop or fit & decide or stop & decide)
    assert np.bincount(roles.decide.labels).tolist() == [3, 3] and np.bincount(roles.stop.labels).tolist() == [3, 3]


def test_too_few_train_images_are_refused():
    with pytest.raises(TransferKitError, match="fine-tuning needs more train images: 2 to train on, 0 to pick"):
        row_roles(images({"a": 1, "b": 1}), images({"a": 1, "b": 1}, "validation"), SplitSettings())
