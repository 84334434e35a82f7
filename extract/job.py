"""The extraction job: image folder -> features in the store, incrementally and crash-safely.

Only images whose content hash has no row yet for the backbone are computed; on an unchanged
folder the backbone is not even built. Decoding runs in a thread pool one batch ahead of
inference, so the backbone is never waiting on JPEG decoding.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.imageio import ImageDecodeError, load_image
from extract.backbones import DEFAULT_BACKBONE, BackboneSpec, get_backbone
from extract.dataset import Dataset, ImageEntry, discover, shard_of
from extract.errors import StoreError, TransferKitError
from extract.files import file_sha256
from extract.record import FEATURE_DTYPES, BackboneRecord
from extract.splits import SplitSettings
from extract.store import BackboneRows, ImageTable, StoreState, StoreWriter, empty_state
from extract.weights import resolve_weights


@dataclass
class ExtractionSummary:
    store: str
    backbone: str
    engine: str
    images: int  # images in the folder (or shard) with features for the backbone
    extracted: int  # computed in this run
    reused: int  # already in the store, unchanged
    failed: int  # could not be decoded (this run and earlier, unchanged files)
    removed: int  # rows dropped because their file was deleted or changed
    ignored: int  # files without an image extension
    seconds: float  # the whole run: scan, hashing, model build, compute, store writes
    images_per_second: float  # extracted / seconds spent in the decode+inference+write loop
    failures: list[tuple[str, str]] = field(default_factory=list)
    copies_across_splits: list[list[str]] = field(default_factory=list)  # identical files in 2+ splits

    def to_dict(self) -> dict:
        return asdict(self)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    if not text:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise TransferKitError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise TransferKitError(f"--shard {text}: I must be between 0 and N-1")
    return index, count


def _hash_entries(root: Path, entries: list[ImageEntry], previous: ImageTable, workers: int) -> ImageTable:
    """Content hashes, reusing the stored one when size and mtime are unchanged."""
    known = {p: (s, size, m) for p, s, size, m in
             zip(previous.path, previous.sha256, previous.size, previous.mtime_ns)}

    def one(entry: ImageEntry) -> tuple[str, int, int]:
        st = os.stat(root / entry.relpath)
        old = known.get(entry.relpath)
        if old and old[1] == st.st_size and old[2] == st.st_mtime_ns:
            return old[0], st.st_size, st.st_mtime_ns
        return file_sha256(root / entry.relpath), st.st_size, st.st_mtime_ns

    with ThreadPoolExecutor(workers) as pool:
        hashed = list(pool.map(one, entries))
    return ImageTable(
        path=[e.relpath for e in entries],
        sha256=[h[0] for h in hashed],
        class_name=[e.class_name for e in entries],
        split=[e.split for e in entries],
        size=[h[1] for h in hashed],
        mtime_ns=[h[2] for h in hashed],
    )


def _decode(root: Path, relpath: str, size: int) -> np.ndarray | str:
    try:
        return load_image(root / relpath, (size, size))
    except ImageDecodeError as exc:
        return str(exc)


def decoded_batches(root: Path, todo: list[tuple[str, str]], size: int, batch_size: int, workers: int):
    """Yield ``(paths, shas, uint8 batch, failures)``, decoding up to two batches ahead."""
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for chunk in chunks[:2]:
            pending.append((chunk, [pool.submit(_decode, root, p, size) for p, _ in chunk]))
        next_chunk = 2
        while pending:
            chunk, futures = pending.popleft()
            if next_chunk < len(chunks):
                c = chunks[next_chunk]
                pending.append((c, [pool.submit(_decode, root, p, size) for p, _ in c]))
                next_chunk += 1
            paths, shas, arrays, failures = [], [], [], {}
            for (path, sha), future in zip(chunk, futures):
                result = future.result()
                if isinstance(result, str):
                    failures[path] = (sha, result)
                else:
                    paths.append(path)
                    shas.append(sha)
                    arrays.append(result)
            batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
            yield paths, shas, batch, failures


def select_entries(dataset: Dataset, shard: tuple[int, int] | None) -> list[ImageEntry]:
    if shard is None:
        return dataset.entries
    index, count = shard
    return [e for e in dataset.entries if shard_of(e.relpath, count) == index]


@dataclass(frozen=True)
class ComputeOptions:
    """How the features of the images to do are computed and written."""

    engine: str = "auto"
    batch_size: int = 32
    workers: int = 4  # decoding and hashing threads
    threads: int | None = None  # inference threads (None: all cores)
    checkpoint_seconds: float = 60.0
    progress: bool = True

    def check(self, dtype: str) -> None:
        if dtype not in FEATURE_DTYPES:
            raise TransferKitError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}")
        if self.batch_size < 1:
            raise TransferKitError("--batch-size must be at least 1")


def run_extraction(
    images_dir: str | Path,
    store: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    batch_size: int = 32,
    validation_split: float | None = None,
    test_split: float | None = None,
    seed: int | None = None,
    split_group: str | None = None,
    dtype: str = "float32",
    engine: str = "auto",
    input_size: int | None = None,
    shard: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
) -> ExtractionSummary:
    """Compute ``backbone`` features for the images of ``images_dir`` (or of one ``shard``) that
    ``store`` lacks, and fold them into it; see the module docstring.

    Split settings left as None are the store's (the defaults for a new store); other values than
    the store's are refused. ``weights`` none initialises randomly from the split seed.
    """
    started = time.perf_counter()
    root, store = Path(images_dir), Path(store)
    spec, shard_spec = get_backbone(backbone), parse_shard(shard)
    options = ComputeOptions(engine, batch_size, workers or max(2, min(8, (os.cpu_count() or 2))), threads,
                             checkpoint_seconds, progress)
    options.check(dtype)
    with StoreWriter(store) as writer:
        settings = SplitSettings.resolve(writer.state.attrs if writer.state else None, seed=seed,
                                         validation_split=validation_split, test_split=test_split,
                                         split_group=split_group)
        dataset = discover(root, settings)
        state = writer.state or empty_state()
        state.attrs.update(settings.to_attrs(), layout=dataset.layout, images_root=str(root.resolve()),
                           shard=shard or "")
        record = _record_for_run(spec, weights, settings.seed, input_size, dtype, state.backbones.get(spec.name),
                                 store)
        state.images = _hash_entries(root, select_entries(dataset, shard_spec), state.images, options.workers)
        state.classes = dataset.class_names
        removed = writer.commit(state).get(spec.name, 0)  # folds what a killed run left, drops deleted/changed files
        todo, reused = _todo(state, spec.name)
        extracted, engine_name, loop_seconds = 0, "none (nothing to compute)", 0.0
        if todo:
            extracted, engine_name, loop_seconds = _compute(writer, state, root, todo, record, weights, options)
        rows = state.backbones.get(spec.name)
        return ExtractionSummary(
            store=str(store), backbone=spec.name, engine=engine_name,
            images=len(rows.path) if rows else 0, extracted=extracted, reused=reused,
            failed=len(state.failed), removed=removed, ignored=len(dataset.ignored),
            seconds=time.perf_counter() - started,
            images_per_second=extracted / loop_seconds if extracted else 0.0,
            failures=sorted((p, r) for p, (_, r) in state.failed.items()),
            copies_across_splits=state.images.copies_across_splits(),
        )


def _record_for_run(spec: BackboneSpec, weights: str, seed: int, input_size: int | None, dtype: str,
                    previous: BackboneRows | None, store: Path) -> BackboneRecord:
    """The record of the features this run computes; refuses one that cannot join the store's rows."""
    resolved = resolve_weights(spec, weights, seed=seed)
    size = int(input_size or (previous.record.input_size if previous else spec.input_size))
    record = BackboneRecord.create(spec, resolved.record(), size, dtype=dtype)
    if previous is None:
        return record
    if not previous.record.same_features(record):
        raise StoreError(f"{store} holds {previous.record.describe()}; this run uses {record.describe()}. "
                         f"Use another --store, or the same --weights/--input-size")
    if str(previous.features.dtype) != dtype:
        raise StoreError(f"{store} holds {spec.name} features as {previous.features.dtype}; "
                         f"pass --dtype {previous.features.dtype}")
    return record


def _todo(state: StoreState, backbone: str) -> tuple[list[tuple[str, str]], int]:
    """(path, sha256) of the images without a row or an earlier failure, and how many rows are kept."""
    rows = state.backbones.get(backbone)
    have = set(zip(rows.path, rows.sha256)) if rows else set()
    failed_before = {(p, s) for p, (s, _) in state.failed.items()}
    todo = [(p, s) for p, s in zip(state.images.path, state.images.sha256)
            if (p, s) not in have and (p, s) not in failed_before]
    return todo, len(rows.path) if rows else 0


def _compute(writer: StoreWriter, state: StoreState, root: Path, todo: list[tuple[str, str]],
             record: BackboneRecord, weights: str, options: ComputeOptions) -> tuple[int, str, float]:
    """Decode, run and write ``todo`` in batches, folding into the store every checkpoint.

    Returns (images extracted, engine name, seconds in the loop).
    """
    from tqdm import tqdm

    from extract.engine import open_engine

    run_engine = open_engine(record, weights, options.engine, options.threads)
    record = record.with_engine(run_engine.name)
    size, extracted = record.input_size, 0
    loop_started = last_checkpoint = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc=f"extract {record.name}", disable=not options.progress,
               smoothing=0.1)
    try:
        for paths, shas, batch, failures in decoded_batches(root, todo, size, options.batch_size, options.workers):
            features = run_engine(batch) if len(batch) else np.zeros((0, record.feature_dim), np.float32)
            writer.write_segment(record.name, record, paths, shas, features.astype(record.dtype), failures)
            extracted += len(paths)
            bar.update(len(paths) + len(failures))
            if time.monotonic() - last_checkpoint > options.checkpoint_seconds:
                writer.commit(state)
                last_checkpoint = time.monotonic()
    finally:
        bar.close()
    writer.commit(state)
    return extracted, run_engine.name, time.monotonic() - loop_started
