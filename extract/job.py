"""The extraction job: image folder -> features in the store, incrementally and crash-safely.

Only images whose content hash has no row yet for the backbone are computed; on an unchanged
folder the backbone is not even built. Decoding runs in a thread pool one batch ahead of
inference, so the backbone is never waiting on JPEG decoding.
"""

from __future__ import annotations

import inspect
import os
import platform
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial, wraps
from pathlib import Path

import numpy as np

from edge.imageio import ImageDecodeError, decode_image, read_image_file, stat_regular_file
from extract.backbones import DEFAULT_BACKBONE, get_backbone
from extract.dataset import Dataset, ImageEntry, discover, shard_of
from extract.defaults import DEFAULT_BATCH_SIZE, DEFAULT_TOLERANCE
from extract.engine import ENGINES
from extract.errors import DatasetError, StoreError, TransferKitError
from extract.int8 import INT8_ENGINE, Int8Refused, features_name, int8_engine_for_store
from extract.leak_free import ANCHORS_ATTR, group_store_splits
from extract.segments import BackgroundSegments
from extract.steps import step
from extract.store import DEFAULT_SPLITS, ImageTable, StoreState, StoreWriter, empty_state
from extract.version import __version__
from extract.weights import backbone_record, resolve_weights

DTYPES = ("float32", "float16")


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
    notes: list[str] = field(default_factory=list)  # the int8 gate's verdict, when int8 was asked for
    split_groups: int = 0  # near-duplicate groups kept in one split (--split-group-by near-duplicates)
    split_moved: int = 0  # images this run moved to their group's split

    def to_dict(self) -> dict:
        return asdict(self)


class ExtractionInterrupted(TransferKitError):
    """Ctrl-C during extraction: the rows computed so far are kept; the same command resumes."""

    def __init__(self, store: Path, extracted: int, todo: int):
        self.extracted, self.todo = extracted, todo
        super().__init__(
            f"interrupted: the {extracted} images extracted in this run are kept in {store} "
            f"({todo - extracted} of this run's {todo} still to compute); run the same command again to resume")


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


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "transferkit": __version__}
    for package in ("tensorflow", "keras", "onnxruntime", "numpy", "h5py"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def refuse_hash_options(root: Path, requested: dict) -> None:
    """Split folders give every image's split: options that draw splits by hash would be ignored."""
    given = [f"--{key.replace('_', '-')}" for key, value in requested.items() if value is not None]
    if given:
        raise DatasetError(
            f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {root} has split folders "
            f"(train/, validation/ or val/, test/), which give every image's split; drop "
            f"{'it' if len(given) == 1 else 'them'}, or move the images into DIR/<class>/ to split by hash")


def _split_settings(state: StoreState | None, requested: dict) -> dict:
    """The store remembers its split settings; a run may not silently change them."""
    stored = {k: state.attrs[k] for k in DEFAULT_SPLITS if state and k in state.attrs}
    settings = {k: requested[k] if requested.get(k) is not None else stored.get(k, v)
                for k, v in DEFAULT_SPLITS.items()}
    clash = {k for k in stored if requested.get(k) is not None and requested[k] != stored[k]}
    if clash:
        given = ", ".join(f"--{k.replace('_', '-')} {stored[k] if stored[k] != '' else repr('')}"
                          for k in sorted(clash))
        raise StoreError(f"this store was built with {given}; pass the same values or use a new --store")
    return settings


def _fingerprint(path: Path, known: tuple[str, int, int] | None) -> tuple[str, int, int, str | None]:
    """``(sha256, size, mtime_ns, None)`` of one file, reusing the stored hash when size and mtime are
    unchanged; ``("", -1, -1, reason)`` for an entry that is not a readable regular file (FIFO,
    device, dangling link, link loop, permission denied, changed while read)."""
    try:
        st = stat_regular_file(path)
        if known and known[0] and (known[1], known[2]) == (st.st_size, st.st_mtime_ns):
            return known[0], st.st_size, st.st_mtime_ns, None
        file = read_image_file(path)
        return file.sha256, file.size, file.mtime_ns, None
    except ImageDecodeError as exc:
        return "", -1, -1, str(exc)


def _hash_entries(root: Path, entries: list[ImageEntry], previous: ImageTable,
                  workers: int) -> tuple[ImageTable, dict[str, tuple[str, str]]]:
    """Content hashes, and ``path -> ("", reason)`` for the entries that cannot be read."""
    known = {p: (s, size, m) for p, s, size, m in
             zip(previous.path, previous.sha256, previous.size, previous.mtime_ns)}
    with ThreadPoolExecutor(workers) as pool:
        hashed = list(pool.map(lambda e: _fingerprint(root / e.relpath, known.get(e.relpath)), entries))
    table = ImageTable(
        path=[e.relpath for e in entries],
        sha256=[h[0] for h in hashed],
        class_name=[e.class_name for e in entries],
        split=[e.split for e in entries],
        size=[h[1] for h in hashed],
        mtime_ns=[h[2] for h in hashed],
    )
    unreadable = {e.relpath: ("", h[3]) for e, h in zip(entries, hashed) if h[3] is not None}
    return table, unreadable


def _decode(root: Path, relpath: str, sha256: str, size: int) -> np.ndarray | str:
    """Read the file once and decode those bytes, only if they are the content the row is keyed by
    (a file replaced after hashing is a failure now and gets extracted by the next run)."""
    try:
        file = read_image_file(root / relpath)
        if file.sha256 != sha256:
            return "file changed since it was hashed; run extract again to extract its new content"
        return decode_image(file.data, (size, size))
    except ImageDecodeError as exc:
        return str(exc)


def decoded_batches(root: Path, todo: list[tuple[str, str]], size: int, batch_size: int, workers: int):
    """Yield ``(paths, shas, uint8 batch, failures)``, decoding up to two batches ahead."""
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for chunk in chunks[:2]:
            pending.append((chunk, [pool.submit(_decode, root, p, s, size) for p, s in chunk]))
        next_chunk = 2
        while pending:
            chunk, futures = pending.popleft()
            if next_chunk < len(chunks):
                c = chunks[next_chunk]
                pending.append((c, [pool.submit(_decode, root, p, s, size) for p, s in c]))
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


def extract_segments(run_engine, segments: BackgroundSegments, feature_dim: int, root: Path,
                     todo: list[tuple[str, str]], size: int, dtype: str, batch_size: int, workers: int):
    """The extraction loop: decode, infer, hand the rows to ``segments`` (written off this thread);
    yields (computed, failed) per batch.

    The local runner and every Ray task (extract/ray_task.py) run this same loop, so both write the same rows.
    """
    for paths, shas, batch, failures in decoded_batches(root, todo, size, batch_size, workers):
        features = run_engine(batch) if len(batch) else np.zeros((0, feature_dim), np.float32)
        segments.add(paths, shas, features.astype(dtype), failures)
        yield len(paths), len(failures)


def select_entries(dataset: Dataset, shard: tuple[int, int] | None) -> list[ImageEntry]:
    if shard is None:
        return dataset.entries
    index, count = shard
    return [e for e in dataset.entries if shard_of(e.relpath, count) == index]


def _fp32_when_int8_is_refused(extract):
    """Run ``extract`` again for fp32 features when its int8 engine is refused; the notes say why."""

    @wraps(extract)
    def run(*args, **kwargs) -> ExtractionSummary:
        try:
            return extract(*args, **kwargs)
        except Int8Refused as refusal:
            call = inspect.signature(extract).bind(*args, **kwargs)
            call.arguments.update(engine="auto", int8_allowed=False)
            summary = extract(*call.args, **call.kwargs)
            summary.notes.insert(0, f"{refusal}; computed fp32 features ({summary.backbone}) instead")
            return summary

    return run


@_fp32_when_int8_is_refused
def run_extraction(
    images_dir: str | Path,
    store: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    batch_size: int = DEFAULT_BATCH_SIZE,
    validation_split: float | None = None,
    test_split: float | None = None,
    seed: int | None = None,
    split_group: str | None = None,
    split_group_by: str | None = None,
    dtype: str = "float32",
    engine: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    input_size: int | None = None,
    shard: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
    int8_allowed: bool = True,
    ray_options=None,
) -> ExtractionSummary:
    """Extract features for the new or changed images of ``images_dir`` into ``store``.

    ``ray_options`` (an ``extract.ray_runner.RayOptions``) spreads the compute over Ray tasks; everything
    that decides what to compute runs here first, so an unchanged folder never starts Ray.
    ``engine`` onnx-int8 (or auto on a store that holds only int8 rows of the backbone) computes
    int8 features under ``BACKBONE@int8`` when the int8 engine passes its accuracy gate
    (``tolerance`` points, see ``extract.int8``); when it does not, fp32 features are computed and
    the summary's notes say why. ``int8_allowed`` False never computes int8 features.
    """
    started = time.perf_counter()
    root, store = Path(images_dir), Path(store)
    if dtype not in DTYPES:
        raise TransferKitError(f"--dtype must be one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise TransferKitError("--batch-size must be at least 1")
    if engine not in (*ENGINES, INT8_ENGINE):
        raise TransferKitError(f"unknown engine {engine!r}; choose one of {', '.join((*ENGINES, INT8_ENGINE))}")
    spec = get_backbone(backbone)
    shard_spec = parse_shard(shard)
    if ray_options is not None:
        from extract.ray_runner import check_ray_run  # imports no Ray: only checks that it is installed

        check_ray_run(engine, shard)
    workers = workers or max(2, min(8, (os.cpu_count() or 2)))
    hash_options = {"validation_split": validation_split, "test_split": test_split, "seed": seed,
                    "split_group": split_group}
    with StoreWriter(store) as writer:
        if writer.state and writer.state.attrs.get("layout") == "split-folders":
            refuse_hash_options(root, hash_options)  # before the clash check, whose advice would not apply
        settings = _split_settings(writer.state, {**hash_options, "split_group_by": split_group_by})
        stored_anchors = writer.state.attrs.get(ANCHORS_ATTR, "") if writer.state else ""
        dataset = discover(root, **settings, split_anchors=stored_anchors)
        if dataset.layout == "split-folders":
            refuse_hash_options(root, hash_options)
        if settings["split_group_by"] != "none" and dataset.layout == "split-folders":
            raise DatasetError(f"{root} has split folders, which fix every image's split; --split-group-by needs "
                               f"DIR/<class>/ (`python cli.py audit` lists copies across your split folders)")
        entries = select_entries(dataset, shard_spec)
        state = writer.state or empty_state()
        state.attrs.update(settings, layout=dataset.layout, images_root=str(root.resolve()),
                           shard=shard or "")
        name, int8 = _features_name(spec.name, engine, state, int8_allowed)
        if int8 and ray_options is not None:
            raise TransferKitError("int8 features are computed by --runner local only (the Ray tasks run the "
                                   "fp32 engine); use --runner local, or --engine auto for fp32 features")
        previous_rows = state.backbones.get(name)
        weights_resolved = resolve_weights(spec, weights, seed=settings["seed"])
        size = int(input_size or (previous_rows.record["input_size"] if previous_rows else spec.input_size))
        if previous_rows:
            stored_id = previous_rows.record.get("weights", {}).get("id")
            if stored_id != weights_resolved.weights_id or previous_rows.record["input_size"] != size:
                raise StoreError(
                    f"{store} holds {name} features from weights {stored_id} at "
                    f"{previous_rows.record['input_size']} px; this run uses {weights_resolved.weights_id} at "
                    f"{size} px. Use another --store, or the same --weights/--input-size"
                )
            if previous_rows.dtype != dtype:
                raise StoreError(f"{store} holds {name} features as {previous_rows.dtype}; "
                                 f"pass --dtype {previous_rows.dtype}")
        state.images, unreadable = _hash_entries(root, entries, state.images, workers)
        state.failed.update(unreadable)
        state.classes = dataset.class_names
        dropped = writer.commit(state)  # folds what a killed run left, drops deleted/changed files
        paths, shas = writer.keys(name)
        kept, have = len(paths), set(zip(paths, shas))
        failed_before = {(p, s) for p, (s, _) in state.failed.items()}
        todo = [(p, s) for p, s in zip(state.images.path, state.images.sha256)
                if (p, s) not in have and (p, s) not in failed_before]
        removed = dropped.get(name, 0)
        extracted, engine_name, loop_seconds = 0, "none (nothing to compute)", 0.0
        notes: list[str] = []
        if todo:
            int8_gate = (dataset, previous_rows, tolerance, notes) if int8 else None
            compute = partial(_compute, int8_gate=int8_gate)
            if ray_options is not None:
                from extract.ray_runner import compute_on_ray

                compute = partial(compute_on_ray, options=ray_options)
            extracted, engine_name, loop_seconds = compute(
                writer, state, root, todo, spec, weights, weights_resolved, size, settings["seed"], dtype, engine,
                batch_size, workers, threads, checkpoint_seconds, progress)
        split_groups = split_moved = 0
        if settings["split_group_by"] == "near-duplicates":
            split_groups, split_moved = _group_splits(writer, state, name, settings)
        rows = state.backbones.get(name)
        elapsed = time.perf_counter() - started
        return ExtractionSummary(
            store=str(store), backbone=name, engine=engine_name, notes=notes,
            images=rows.rows if rows else 0, extracted=extracted, reused=kept,
            failed=len(state.failed), removed=removed, ignored=len(dataset.ignored), seconds=elapsed,
            images_per_second=extracted / loop_seconds if extracted else 0.0,
            failures=sorted((p, r) for p, (_, r) in state.failed.items()),
            copies_across_splits=state.images.copies_across_splits(),
            split_groups=split_groups, split_moved=split_moved,
        )


def _features_name(backbone: str, engine: str, state: StoreState | None, int8_allowed: bool) -> tuple[str, bool]:
    """Where this run's features go, and whether they are int8: ``onnx-int8`` asks for int8, and
    ``auto`` keeps int8 on a store that holds only int8 rows of the backbone."""
    held = state.backbones if state else {}
    int8 = int8_allowed and (engine == INT8_ENGINE or (
        engine == "auto" and features_name(backbone, True) in held and backbone not in held))
    return features_name(backbone, int8), int8


def extraction_record(spec, resolved, size: int, dtype: str, engine_name: str) -> dict:
    """The backbone record that every row computed by this run carries (local runner and Ray tasks)."""
    return {
        **backbone_record(spec, resolved, size), "dtype": dtype, "engine": engine_name,
        "versions": _library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _group_splits(writer: StoreWriter, state: StoreState, backbone: str, settings: dict) -> tuple[int, int]:
    """--split-group-by near-duplicates: find copies among ``backbone``'s rows (all of them in memory,
    as the search needs) and move images to their group's split; a checkpoint stores both."""
    rows = writer.rows(backbone)
    view = StoreState(state.attrs, state.classes, state.images, state.failed, {backbone: rows} if rows else {})
    groups, moved = group_store_splits(view, backbone, settings)  # updates state.attrs and state.images
    writer.commit(state)
    return groups, moved


def announce_conversion(spec, resolved, size: int, engine: str, progress: bool) -> None:
    """Say on stderr when this run first converts the backbone to ONNX (the wait is otherwise unexplained)."""
    from extract.engine import onnx_engine_path

    if engine != "keras" and not onnx_engine_path(spec.name, resolved.weights_id, size).exists():
        step(f"extract: converting {spec.name} to an onnxruntime engine (once per backbone, weights and size; "
             f"cached for later runs, 10-60 s)", progress)


def _open_engine(spec, weights, resolved, size, seed, engine, threads, workers, progress, int8_gate):
    """The run's engine and the record fields it adds; ``int8_gate`` as in ``_compute``."""
    from extract.engine import open_engine

    if not int8_gate:
        announce_conversion(spec, resolved, size, engine, progress)
        return open_engine(spec, weights, resolved, size, seed, engine, threads), {}
    dataset, previous_rows, tolerance, notes = int8_gate
    choice = int8_engine_for_store(
        dataset, spec.name, resolved.weights_id, size, previous_rows.record if previous_rows else None,
        lambda: open_engine(spec, weights, resolved, size, seed, "onnx", threads).path, tolerance, threads, workers)
    notes.append(choice.report.describe(tolerance) + (" (cached)" if choice.cached else ""))
    return choice.engine, {"quantization": choice.record}


def _compute(writer, state, root, todo, spec, weights, resolved, size, seed, dtype, engine, batch_size, workers,
             threads, checkpoint_seconds, progress, int8_gate=None) -> tuple[int, str, float]:
    """``int8_gate``: (dataset, the store's int8 rows, tolerance, notes) for an int8 run, else None."""
    from tqdm import tqdm

    run_engine, quantization = _open_engine(spec, weights, resolved, size, seed, engine, threads, workers, progress,
                                            int8_gate)
    name = features_name(spec.name, bool(int8_gate))
    record = {**extraction_record(spec, resolved, size, dtype, run_engine.name), **quantization}
    extracted = 0
    loop_started = last_checkpoint = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc=f"extract {name}", disable=not progress, smoothing=0.1)
    try:
        with BackgroundSegments(writer, name, record) as segments:
            for computed, failed in extract_segments(run_engine, segments, spec.feature_dim, root, todo, size,
                                                     dtype, batch_size, workers):
                extracted += computed
                bar.update(computed + failed)
                if time.monotonic() - last_checkpoint > checkpoint_seconds:
                    segments.flush()
                    writer.commit(state)
                    last_checkpoint = time.monotonic()
    except KeyboardInterrupt:
        bar.close()
        writer.commit(state)  # fold in what was computed (a second Ctrl-C leaves it in segments: still kept)
        raise ExtractionInterrupted(writer.path, extracted, len(todo)) from None
    finally:
        bar.close()
    loop_seconds = time.monotonic() - loop_started  # the images/s reported: this loop's, not the final rewrite's
    writer.commit(state)
    return extracted, run_engine.name, loop_seconds

