"""Which labelled images do which job in a cached fine-tuning run, so that no image both chooses and judges.

Three disjoint sets of rows (``RowRoles``):

- **fit**: the images the gradient steps see;
- **stop**: the images whose loss picks the epoch (early stopping), carved from the train split;
- **decide**: the images on which the fine-tuned model and the head are compared (keep or not): the
  validation split, untouched by training and by the epoch pick; when the store has no validation
  split, a second carve of the train split.

The carve is stratified and deterministic: in each class, the images whose hash ranks lowest go, by
the store's own rule (``extract.dataset.unit_hash`` of the image's split key: its path with the
store's ``--split-group`` pattern removed, or its near-duplicate anchor), salted by the job, so the
same images are carved on every run and copies of one photo stay on one side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from export.data import LabelledImages
from extract.dataset import compile_group, split_key, unit_hash
from extract.errors import TransferKitError
from extract.splits import SplitSettings

STOP_SHARE = 0.1  # of each class's train images: they pick the epoch
DECIDE_SHARE = 0.1  # of each class's train images, only when the store has no validation split


@dataclass
class RowRoles:
    fit: LabelledImages
    stop: LabelledImages
    decide: LabelledImages
    decide_source: str  # "validation split", or "carved from train (no validation split)"

    def counts(self) -> dict:
        return {"fit": len(self.fit), "stop": len(self.stop), "decide": len(self.decide),
                "decide_source": self.decide_source}


def carve(images: LabelledImages, share: float, job: str, settings: SplitSettings,
          anchors: str = "") -> tuple[LabelledImages, LabelledImages]:
    """(rest, carved): in every class of two or more images, about ``share`` of them (at least one, never
    all), those whose salted hash is lowest; images with the same split key go together."""
    pattern, anchor_of = compile_group(settings.split_group), json.loads(anchors or "{}")
    keys = [split_key(anchor_of.get(p, p), pattern) for p in images.relpaths]
    u = np.array([unit_hash(f"{job}\x00{settings.seed}\x00{key}") for key in keys])
    carved = np.zeros(len(images), bool)
    for label in np.unique(images.labels):
        members = np.flatnonzero(images.labels == label)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, round(share * len(members))))
        cutoff = np.sort(u[members])[count - 1]
        carved[members[u[members] <= cutoff]] = True
    return images.take(np.flatnonzero(~carved)), images.take(np.flatnonzero(carved))


def row_roles(train: LabelledImages, validation: LabelledImages, settings: SplitSettings,
              anchors: str = "") -> RowRoles:
    """The fit, stop and decide rows of a run (module docstring)."""
    source = "validation split"
    if not len(validation):
        train, validation = carve(train, DECIDE_SHARE, "fine-tune decide", settings, anchors)
        source = "carved from train (no validation split)"
    fit, stop = carve(train, STOP_SHARE, "fine-tune stop", settings, anchors)
    if not len(fit) or not len(stop) or not len(validation):
        raise TransferKitError(f"fine-tuning needs more train images: {len(fit)} to train on, {len(stop)} to pick "
                               f"the epoch and {len(validation)} to decide (each class needs 2 train images, 3 without a "
                               f"validation split)")
    return RowRoles(fit, stop, validation, source)
