"""Leak-free splits: copies of one photo found in the features share a split.

``extract --split-group-by near-duplicates`` groups copies exactly as ``audit`` does
(``classify.duplicates.copy_groups``: identical files, nearly identical features, mutual nearest
neighbours and, when the image folder is still there, thumbnails, aligned pictures and keypoints,
which find copies rotated with black corners, zoomed or mirrored); each group gets one *anchor*,
its first path in sorted order, and every member takes the split the anchor's path would get.
The anchors are stored with the store (attribute ``split_anchors``, JSON ``{path: anchor}``, only
for images in a group), so ``discover`` gives every later reader -- the next extract run,
``fine-tune``, ``store merge`` -- the same assignment.

    >>> anchors = near_duplicate_anchors(paths, sha256, features, images_root)
    >>> dataset = discover(root, settings, split_anchors=anchors)

Adding images keeps existing splits except where a new image links two groups (the merged group
takes the split of its smallest path): the extract summary says how many images moved.
"""

from __future__ import annotations

import json

import numpy as np

from edge.imageio import strict_json
from extract.dataset import assign_split, compile_group, split_key
from extract.splits import SplitSettings

ANCHORS_ATTR = "split_anchors"
ANCHORS_BACKBONE_ATTR = "split_anchors_backbone"  # the backbone whose features found the groups


def near_duplicate_anchors(paths: list[str], sha256: list[str], features: np.ndarray,
                           images_root: str | None = None) -> dict[str, str]:
    """``{path: anchor}`` for every image in a group of copies (anchor: the group's smallest path)."""
    from classify.duplicates import copy_groups  # scipy, Pillow: only for this option

    anchors = {}
    for rows in copy_groups(features, list(paths), list(sha256), images_root):
        anchor = min(paths[r] for r in rows)
        anchors.update({paths[r]: anchor for r in rows})
    return anchors


def anchors_from_attrs(attrs: dict | None) -> dict[str, str]:
    text = (attrs or {}).get(ANCHORS_ATTR) or "{}"
    return json.loads(text)


def anchors_to_attr(anchors: dict[str, str]) -> str:
    return strict_json(anchors, sort_keys=True)


def regroup(splits: list[str], paths: list[str], anchors: dict[str, str], settings: SplitSettings) -> int:
    """Give every image (class-folder layout) the split of its anchor, or of its own path when it
    has none, in place; returns how many images changed split."""
    group = compile_group(settings.split_group)
    moved = 0
    for i, path in enumerate(paths):
        split = assign_split(split_key(anchors.get(path, path), group), settings)
        moved += split != splits[i]
        splits[i] = split
    return moved


def group_store_splits(state, backbone: str, settings: SplitSettings) -> tuple[int, int]:
    """Find the groups in ``backbone``'s rows (unless another backbone already did), store their
    anchors and move the images of ``state`` to their anchor's split. Returns (groups, moved)."""
    attrs = state.attrs
    if attrs.get(ANCHORS_BACKBONE_ATTR, backbone) == backbone and backbone in state.backbones:
        rows = state.backbones[backbone]
        anchors = near_duplicate_anchors(rows.path, rows.sha256, rows.features, attrs.get("images_root"))
        attrs[ANCHORS_ATTR], attrs[ANCHORS_BACKBONE_ATTR] = anchors_to_attr(anchors), backbone
    anchors = anchors_from_attrs(attrs)
    moved = regroup(state.images.split, state.images.path, anchors, settings)
    return len(set(anchors.values())), moved
