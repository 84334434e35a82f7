"""``merge_stores``: one store over several shard stores, as a view (no feature is copied).

Shards written by ``extract --shard I/N`` (or by the tasks of ``extract --runner ray``) are
combined by this one call. OUT's root maps the shards' immutable segment files, which are
hard-linked into ``OUT.d/`` (copied when asked): OUT is then self-contained, unaffected by later
runs on the shards, and built in the time it takes to read the shards' roots.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from extract.errors import StoreError
from extract.leak_free import ANCHORS_BACKBONE_ATTR, group_store_splits
from extract.store_files import (data_dir, images_refs, load_rows, new_name, open_segment, parts_dir, read_images,
                                 read_root, strings, write_images_file, write_root)
from extract.splits import LAYOUT_ATTRS, SplitSettings
from extract.store_types import BackboneMeta, SegmentRef, StoreState
from extract.store_writer import StoreLock, empty_state, leftovers, split_counts

BACKBONE_KEYS = ("weights", "input_size", "dtype", "dim")


def merge_stores(out: str | Path, inputs: list[str | Path], force: bool = False, images_root: str | None = None,
                 copy: bool = False) -> StoreState:
    """Build OUT from shard stores; refuses anything that would lose or mix rows (see ``_refuse``)."""
    out, shards = Path(out), [Path(p) for p in inputs]
    if not shards:
        raise StoreError("nothing to merge: give at least one store")
    _refuse_paths(out, shards, force)
    states = [read_root(p) for p in shards]
    _refuse_pending(shards)
    root = _common_settings(shards, states, images_root)
    _refuse_overlap(shards, states)
    first = states[0]
    merged = empty_state(**{k: first.attrs[k] for k in (*SplitSettings.keys(), *LAYOUT_ATTRS) if k in first.attrs},
                         images_root=root, shard="")
    merged.classes = list(first.classes)
    lock = StoreLock(out)
    lock.acquire()
    try:
        folder = data_dir(out)
        folder.mkdir(exist_ok=True)
        images = []
        for i, (shard, state) in enumerate(zip(shards, states)):
            source = shard.parent / state.attrs["segments_folder"]
            images += [SegmentRef(_link(source / r.file, folder / f"s{i}-{r.file}", copy), r.rows)
                       for r in images_refs(state)]
            merged.failed.update(state.failed)
            for name, meta in state.backbones.items():
                target = merged.backbones.setdefault(name, BackboneMeta(meta.record, meta.dim, meta.dtype, []))
                target.segments += [SegmentRef(_link(source / s.file, folder / f"s{i}-{s.file}", copy), s.rows)
                                    for s in meta.segments]
        summary = _summary(states)
        if merged.attrs.get("split_group_by") == "near-duplicates" and merged.backbones:
            images = _regroup_near_duplicates(out, merged, first, images)
            summary.update(split_counts=split_counts(merged),
                           copies_across_splits=merged.images.copies_across_splits())
        merged.attrs.update(write_root(out, merged, images, summary))
        for stale in leftovers(out, merged):  # what a replaced OUT (--force) held
            stale.unlink(missing_ok=True)
    finally:
        lock.release()
    return merged


def _regroup_near_duplicates(out: Path, merged: StoreState, first: StoreState,
                             images: list[SegmentRef]) -> list[SegmentRef]:
    """Shards found their near-duplicate groups each on its own rows: find them again on all rows
    (in memory, as the search needs) and give OUT its own image table with the regrouped splits."""
    merged.attrs.update(segments_folder=data_dir(out).name, images_files=json.dumps([[r.file, r.rows] for r in images]))
    merged.images = read_images(out, merged)
    backbone = first.attrs.get(ANCHORS_BACKBONE_ATTR) or sorted(merged.backbones)[0]
    view = StoreState(merged.attrs, merged.classes, merged.images, merged.failed,
                      {backbone: load_rows(out, merged, backbone)})
    group_store_splits(view, backbone, SplitSettings.resolve(merged.attrs))
    name = new_name("images")
    write_images_file(data_dir(out) / name, merged.images)
    return [SegmentRef(name, len(merged.images))]


def _refuse_paths(out: Path, shards: list[Path], force: bool) -> None:
    for shard in shards:
        if not shard.is_file():
            raise StoreError(f"shard store {shard} does not exist")
    if out.exists() and any(out.samefile(s) for s in shards):
        raise StoreError(f"{out} is one of the shards; write the merged store to a new path")
    if out.exists() and not force:
        raise StoreError(f"{out} already exists; pass --force to replace it (its rows are not kept)")
    seen: dict[tuple[int, int], Path] = {}
    for shard in shards:
        st = shard.stat()
        if (st.st_dev, st.st_ino) in seen:
            raise StoreError(f"{shard} is given twice (also as {seen[st.st_dev, st.st_ino]}); "
                             f"each shard may be merged once")
        seen[st.st_dev, st.st_ino] = shard


def _refuse_pending(shards: list[Path]) -> None:
    for shard in shards:
        folder = parts_dir(shard)
        waiting = sorted(folder.glob("*.h5")) if folder.is_dir() else []
        if waiting:
            raise StoreError(f"{shard} has {len(waiting)} batch file(s) from an interrupted run that are not in the "
                             f"store yet; finish it first (run the same `python cli.py extract ... --store {shard}`)")


def _common_settings(shards: list[Path], states: list[StoreState], images_root: str | None) -> str:
    """Refuse shards that differ in classes, split settings, layout or backbones; the common image root."""
    first, name0 = states[0], shards[0]
    for shard, state in zip(shards[1:], states[1:]):
        if state.classes != first.classes:
            raise StoreError(f"{shard} has classes [{', '.join(state.classes)}], {name0} has "
                             f"[{', '.join(first.classes)}]; only shards of one image folder can be merged")
        diff = [k for k in (*SplitSettings.keys(), *LAYOUT_ATTRS) if state.attrs.get(k) != first.attrs.get(k)]
        if diff:
            raise StoreError(f"{shard} was extracted with other {', '.join(diff)} than {name0}; cannot merge")
        if sorted(state.backbones) != sorted(first.backbones):
            raise StoreError(f"{shard} holds backbones [{', '.join(sorted(state.backbones))}], {name0} holds "
                             f"[{', '.join(sorted(first.backbones))}]; extract the same backbones in every shard")
        for name, meta in state.backbones.items():
            mine, theirs = _backbone_key(meta), _backbone_key(first.backbones[name])
            if mine != theirs:
                raise StoreError(f"{shard} holds {name} features {mine}, {name0} holds {theirs}; cannot merge")
    roots = sorted({s.attrs.get("images_root", "") for s in states})
    if images_root is None and len(roots) > 1:
        raise StoreError(f"the shards were extracted from different image folders ({', '.join(roots)}); pass "
                         f"--images-root DIR to say where the merged store's images are")
    return str(Path(images_root).resolve()) if images_root else roots[0]


def _backbone_key(meta: BackboneMeta) -> str:
    values = {"weights": meta.weights_id, "input_size": meta.record.get("input_size"), "dtype": meta.dtype,
              "dim": meta.dim}
    return ", ".join(f"{k} {values[k]}" for k in BACKBONE_KEYS)


def _refuse_overlap(shards: list[Path], states: list[StoreState]) -> None:
    """Shards of one ``--shard I/N`` split are disjoint by construction; others are checked path by path."""
    marks = [s.attrs.get("shard", "") for s in states]
    counts = {m.split("/")[-1] for m in marks}
    if all(marks) and len(counts) == 1 and len(set(marks)) == len(marks):
        return
    owner: dict[str, Path] = {}
    for shard, state in zip(shards, states):
        folder = shard.parent / state.attrs["segments_folder"]
        for ref in images_refs(state):
            for path in _image_paths(folder / ref.file):
                if path in owner:
                    raise StoreError(f"{path} is in both {owner[path]} and {shard}; shards must hold different "
                                     f"images (extract them with --shard I/N)")
                owner[path] = shard


def _image_paths(file: Path) -> list[str]:
    with open_segment(file) as f:
        return strings(f["images/path"])


def _summary(states: list[StoreState]) -> dict:
    counts: dict[str, int] = {}
    copies = []
    for state in states:
        for split, n in json.loads(state.attrs.get("split_counts", "{}")).items():
            counts[split] = counts.get(split, 0) + n
        copies += json.loads(state.attrs.get("copies_across_splits", "[]"))
    return {"consumed_parts": [], "split_counts": counts, "copies_across_splits": copies,
            "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _link(source: Path, target: Path, copy: bool) -> str:
    """``target`` as a hard link to ``source`` (a copy with ``copy``); returns its name."""
    if target.exists():
        if not copy and target.samefile(source):
            return target.name
        target.unlink()
    if copy:
        shutil.copyfile(source, target)
        return target.name
    try:
        os.link(source, target)
    except OSError as exc:
        raise StoreError(f"cannot hard-link {source} into {target.parent} ({exc.strerror}); put the merged store "
                         f"on the same file system as the shards, or pass --copy") from None
    return target.name
