"""The extraction job: image folder -> features in the store, incrementally and crash-safely.

Only images whose content hash has no row yet for the backbone are computed; on an unchanged
folder the backbone is not even built. Decoding runs in a thread pool one batch ahead of
inference, so the backbone is never waiting on JPEG decoding.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial, wraps
from operator import itemgetter
from pathlib import Path

import numpy as np

from edge.imageio import ImageDecodeError, decode_image, read_image_file, stat_regular_file
from extract.backbones import DEFAULT_BACKBONE, BackboneSpec, get_backbone
from extract.dataset import Dataset, ImageEntry, discover, shard_of
from extract.defaults import DEFAULT_BATCH_SIZE, DEFAULT_TOLERANCE
from extract.engine import ENGINES, default_threads
from extract.errors import DatasetError, StoreError, TransferKitError
from extract.int8 import INT8_ENGINE, Int8Refused, features_name, int8_engine_for_store
from extract.leak_free import ANCHORS_ATTR, group_store_splits
from extract.read_once import READ_BUDGET_BYTES, HeldBytes
from extract.record import FEATURE_DTYPES, BackboneRecord
from extract.segments import BackgroundSegments
from extract.splits import VALIDATION_FROM_TRAIN, SplitSettings
from extract.steps import step
from extract.streams import run_in_streams, stream_plan
from extract.store import BackboneMeta, ImageTable, StoreState, StoreWriter, empty_state
from extract.tta import mirror_averaged
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


def refuse_hash_options(root: Path, requested: dict, validation_from_train: bool = False) -> None:
    """Split folders give every image's split: options that draw splits by hash would be ignored. Without
    a validation folder, validation is carved out of train/ by hash: then only --test-split is refused."""
    given = [f"--{key.replace('_', '-')}" for key, value in requested.items()
             if value is not None and (key == "test_split" or not validation_from_train)]
    if given and validation_from_train:
        raise DatasetError(f"--test-split does not apply: {root} has split folders train/ and test/, and test/ is "
                           f"the test split; validation is carved out of train/ by hash (--validation-split, "
                           f"--seed and --split-group set how)")
    if given:
        raise DatasetError(
            f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {root} has split folders "
            f"(train/, validation/ or val/, test/), which give every image's split; drop "
            f"{'it' if len(given) == 1 else 'them'}, or move the images into DIR/<class>/ to split by hash")


def _fingerprint(path: Path, known: tuple[str, int, int] | None,
                 keep=lambda file: None) -> tuple[str, int, int, str | None]:
    """``(sha256, size, mtime_ns, None)`` of one file, reusing the stored hash when size and mtime are
    unchanged (the file is not read); ``("", -1, -1, reason)`` for an entry that is not a readable
    regular file (FIFO, device, dangling link, link loop, permission denied, changed while read).
    A file that is read is handed to ``keep`` (``HeldBytes.keep``), so its decode need not read it again."""
    try:
        st = stat_regular_file(path)
        if known and known[0] and (known[1], known[2]) == (st.st_size, st.st_mtime_ns):
            return known[0], st.st_size, st.st_mtime_ns, None
        file = read_image_file(path)
        keep(file)
        return file.sha256, file.size, file.mtime_ns, None
    except ImageDecodeError as exc:
        return "", -1, -1, str(exc)


def _hash_entries(root: Path, entries: list[ImageEntry], previous: ImageTable, workers: int,
                  held: HeldBytes | None = None) -> tuple[ImageTable, dict[str, tuple[str, str]]]:
    """Content hashes, and ``path -> ("", reason)`` for the entries that cannot be read; the bytes of
    the files read go to ``held``."""
    known = {p: (s, size, m) for p, s, size, m in
             zip(previous.path, previous.sha256, previous.size, previous.mtime_ns)}
    held = HeldBytes(0) if held is None else held

    def fingerprint(entry: ImageEntry):
        return _fingerprint(root / entry.relpath, known.get(entry.relpath), partial(held.keep, entry.relpath))

    with ThreadPoolExecutor(workers) as pool:
        hashed = list(pool.map(fingerprint, entries))
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


def _decode(root: Path, relpath: str, sha256: str, size: int, held: HeldBytes | None = None) -> np.ndarray | str:
    """Decode the bytes the hash pass read (``held``), or else read the file once and decode those bytes
    only if they are the content the row is keyed by (a file replaced after hashing is a failure now
    and gets extracted by the next run)."""
    try:
        file = held.take(relpath, sha256) if held is not None else None
        if file is None:
            file = read_image_file(root / relpath)
            if file.sha256 != sha256:
                return "file changed since it was hashed; run extract again to extract its new content"
        return decode_image(file.data, (size, size))
    except ImageDecodeError as exc:
        return str(exc)


def decoded_batches(root: Path, todo: list[tuple[str, str]], size: int, batch_size: int, workers: int,
                    held: HeldBytes | None = None, ahead: int = 2):
    """Yield ``(paths, shas, uint8 batch, failures)``, decoding up to ``ahead`` batches ahead (from the
    bytes in ``held`` where the hash pass kept them)."""
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for chunk in chunks[:ahead]:
            pending.append((chunk, [pool.submit(_decode, root, p, s, size, held) for p, s in chunk]))
        next_chunk = ahead
        while pending:
            chunk, futures = pending.popleft()
            if next_chunk < len(chunks):
                c = chunks[next_chunk]
                pending.append((c, [pool.submit(_decode, root, p, s, size, held) for p, s in c]))
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


def extract_segments(run_engine, segments: BackgroundSegments, record: BackboneRecord, root: Path,
                     todo: list[tuple[str, str]], batch_size: int, workers: int, held: HeldBytes | None = None):
    """The extraction loop: decode, infer (``run_engine.streams`` batches at once, ``extract.streams``),
    hand the rows to ``segments`` in the batches' order (written off this thread); yields (computed,
    failed) per batch.

    The local runner and every Ray task (extract/ray_task.py) run this same loop, so both write the same rows.
    """
    compute = partial(mirror_averaged, run_engine) if record.tta else run_engine
    streams = run_engine.streams
    batches = decoded_batches(root, todo, record.input_size, batch_size, workers, held, ahead=streams + 1)
    features_of = partial(_features_of, compute, record.feature_dim)
    for (paths, shas, _, failures), features in run_in_streams(features_of, batches, streams, take=itemgetter(2)):
        segments.add(paths, shas, features.astype(record.dtype), failures)
        yield len(paths), len(failures)


def _features_of(compute, feature_dim: int, batch: np.ndarray) -> np.ndarray:
    """``compute(batch)``; a batch whose every image failed to decode has no features (and no engine call)."""
    return compute(batch) if len(batch) else np.zeros((0, feature_dim), np.float32)


def select_entries(dataset: Dataset, shard: tuple[int, int] | None) -> list[ImageEntry]:
    if shard is None:
        return dataset.entries
    index, count = shard
    return [e for e in dataset.entries if shard_of(e.relpath, count) == index]


def decode_workers() -> int:
    """Decoding and hashing threads by default: one per core this process may use (not ``os.cpu_count()``,
    which counts the host's cores in a container limited to two), at least 2 (hashing waits on reads),
    at most 8."""
    return max(2, min(8, default_threads()))


@dataclass(frozen=True)
class ComputeOptions:
    """How the features of the images to do are computed and written."""

    engine: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 4  # decoding and hashing threads
    threads: int | None = None  # inference threads in all (None: all cores)
    streams: int | None = None  # batches run at once on those threads (None: extract.streams.stream_plan's)
    checkpoint_seconds: float = 60.0
    progress: bool = True

    def check(self, dtype: str) -> None:
        if dtype not in FEATURE_DTYPES:
            raise TransferKitError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}")
        if self.batch_size < 1:
            raise TransferKitError("--batch-size must be at least 1")
        stream_plan(self.threads, self.streams)  # refuses impossible --threads / --streams
        if self.engine not in (*ENGINES, INT8_ENGINE):
            raise TransferKitError(f"unknown engine {self.engine!r}; choose one of {', '.join((*ENGINES, INT8_ENGINE))}")



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
    streams: int | None = None,
    ray_options=None,
    tta: str | None = None,
) -> ExtractionSummary:
    """Compute ``backbone`` features for the images of ``images_dir`` (or of one ``shard``) that
    ``store`` lacks, and fold them into it; see the module docstring.

    Split settings left as None are the store's (defaults for a new store); others are refused.
    ``weights`` none initialises randomly from the split seed. ``ray_options`` (``RayOptions``) spreads
    the compute over Ray tasks, planned here first, so an unchanged folder never starts Ray. ``engine``
    onnx-int8 computes int8 features under ``BACKBONE@int8`` when they pass the accuracy gate
    (``tolerance`` points, ``extract.int8``), else fp32 with the reason in the notes. ``tta`` flip stores
    features averaged with the mirror image's under ``BACKBONE@flip`` (``extract.tta``). ``threads``
    inference threads in all are shared by ``streams`` batches computed at once (``extract.streams``).
    """
    started, root, store = time.perf_counter(), Path(images_dir), Path(store)
    spec, shard_spec = get_backbone(backbone), parse_shard(shard)
    options = ComputeOptions(engine, batch_size, workers or decode_workers(), threads,
                             streams, checkpoint_seconds, progress)
    options.check(dtype)
    _check_ray_run(ray_options, engine, shard)
    hash_options = {"validation_split": validation_split, "test_split": test_split, "seed": seed,
                    "split_group": split_group}
    with StoreWriter(store) as writer:
        state, settings, dataset = _settings_and_images(writer, root, shard, split_group_by, hash_options)
        name, int8 = _features_name(spec.name, engine, state, int8_allowed, on_ray=ray_options is not None, tta=tta)
        previous = state.backbones.get(name)
        record = _record_for_run(spec, weights, settings.seed, input_size, dtype, previous, store, tta)
        held = _scan(state, root, dataset, select_entries(dataset, shard_spec), options.workers, not ray_options)
        removed = writer.commit(state).get(name, 0)  # folds what a killed run left, drops deleted/changed files
        todo, reused = _todo(writer, state, name, held)
        notes: list[str] = []
        int8_gate = (dataset, previous, tolerance, notes) if int8 else None
        compute = _ray_compute(ray_options) if ray_options else partial(_compute, int8_gate=int8_gate, held=held)
        extracted, engine_name, loop_seconds = compute(writer, state, root, todo, record, weights, options)
        split_groups, split_moved = _group_splits(writer, state, name, settings)
        run = dict(engine=engine_name, extracted=extracted, reused=reused, removed=removed, notes=notes,
                   split_groups=split_groups, split_moved=split_moved)
        return _summary(store, name, state, dataset, run, time.perf_counter() - started, loop_seconds)


def _check_ray_run(ray_options, engine: str, shard: str | None) -> None:
    """Refuse a Ray run that cannot start (Ray missing, an engine or --shard it cannot take) before any work."""
    if ray_options is not None:
        from extract.ray_runner import check_ray_run  # imports no Ray: only checks that it is installed

        check_ray_run(engine, shard)


def _settings_and_images(writer: StoreWriter, root: Path, shard: str | None, split_group_by: str | None,
                         hash_options: dict) -> tuple[StoreState, SplitSettings, Dataset]:
    """The store's state, the run's split settings (the store's where not given) and the folder's images;
    the settings and layout are put in the state's attributes."""
    state = writer.state or empty_state()
    if writer.state and writer.state.attrs.get("layout") == "split-folders":  # before the clash check,
        refuse_hash_options(root, hash_options,  # whose advice would not apply
                            writer.state.attrs.get("validation_source") == VALIDATION_FROM_TRAIN)
    settings = SplitSettings.resolve(writer.state.attrs if writer.state else None,
                                     split_group_by=split_group_by, **hash_options)
    dataset = _discover(root, settings, state.attrs.get(ANCHORS_ATTR, ""), hash_options)
    state.attrs.update(settings.to_attrs(), layout=dataset.layout, validation_source=dataset.validation_source,
                       images_root=str(root.resolve()), shard=shard or "")
    return state, settings, dataset


def _summary(store: Path, name: str, state: StoreState, dataset: Dataset, run: dict, seconds: float,
             loop_seconds: float) -> ExtractionSummary:
    """The run's summary: ``run`` holds what this run did, the rest is read from the store's state."""
    rows = state.backbones.get(name)
    return ExtractionSummary(
        store=str(store), backbone=name, images=rows.rows if rows else 0, failed=len(state.failed),
        ignored=len(dataset.ignored), seconds=seconds,
        images_per_second=run["extracted"] / loop_seconds if run["extracted"] else 0.0,
        failures=sorted((p, r) for p, (_, r) in state.failed.items()),
        copies_across_splits=state.images.copies_across_splits(), **run)


def _ray_compute(ray_options):
    """``_compute``'s stand-in that runs the work on Ray (extract/ray_runner.py)."""
    from extract.ray_runner import compute_on_ray

    return partial(compute_on_ray, ray_options=ray_options)


def _features_name(backbone: str, engine: str, state: StoreState | None, int8_allowed: bool,
                   on_ray: bool = False, tta: str | None = None) -> tuple[str, bool]:
    """Where this run's features go, and whether they are int8: ``onnx-int8`` asks for int8, and
    ``auto`` keeps int8 on a store that holds only int8 rows of the backbone (never with Ray)."""
    held = state.backbones if state else {}
    int8 = int8_allowed and (engine == INT8_ENGINE or (
        engine == "auto" and features_name(backbone, True, tta) in held and features_name(backbone, False, tta)
        not in held))
    if int8 and on_ray:
        raise TransferKitError("int8 features are computed by --runner local only (the Ray tasks run the "
                               "fp32 engine); use --runner local, or --engine auto for fp32 features")
    return features_name(backbone, int8, tta), int8


def _discover(root: Path, settings: SplitSettings, anchors: str, hash_options: dict) -> Dataset:
    """The folder's images with their splits (near-duplicate ``anchors`` from the store applied)."""
    dataset = discover(root, settings, split_anchors=anchors)
    if dataset.layout == "split-folders":
        refuse_hash_options(root, hash_options, dataset.validation_source == VALIDATION_FROM_TRAIN)
    if settings.split_group_by != "none" and dataset.layout == "split-folders":
        raise DatasetError(f"{root} has split folders, which fix every image's split; --split-group-by needs "
                           f"DIR/<class>/ (`python cli.py audit` lists copies across your split folders)")
    return dataset


def _record_for_run(spec: BackboneSpec, weights: str, seed: int, input_size: int | None, dtype: str,
                    previous: BackboneMeta | None, store: Path, tta: str | None = None) -> BackboneRecord:
    """The record of the features this run computes; refuses one that cannot join the store's rows."""
    resolved = resolve_weights(spec, weights, seed=seed)
    stored = BackboneRecord.from_dict(previous.record) if previous else None
    size = int(input_size or (stored.input_size if stored else spec.input_size))
    record = BackboneRecord.create(spec, resolved.record(), size, dtype=dtype, tta=tta)
    if stored is None:
        return record
    if not stored.same_features(record):
        raise StoreError(f"{store} holds {stored.describe()}; this run uses {record.describe()}. "
                         f"Use another --store, or the same --weights/--input-size")
    if previous.dtype != dtype:
        raise StoreError(f"{store} holds {spec.name} features as {previous.dtype}; pass --dtype {previous.dtype}")
    return record


def _scan(state: StoreState, root: Path, dataset: Dataset, entries: list[ImageEntry], workers: int,
          keep_bytes: bool = True) -> HeldBytes:
    """Put the folder's images (hashed; unreadable ones as failures) and classes into ``state``; returns
    the bytes of the files read (up to ``READ_BUDGET_BYTES``; none unless ``keep_bytes``) for their decode."""
    held = HeldBytes(READ_BUDGET_BYTES if keep_bytes else 0)
    state.images, unreadable = _hash_entries(root, entries, state.images, workers, held)
    state.failed.update(unreadable)
    state.classes = dataset.class_names
    return held


def _todo(writer: StoreWriter, state: StoreState, backbone: str,
          held: HeldBytes | None = None) -> tuple[list[tuple[str, str]], int]:
    """(path, sha256) of the images without a row or an earlier failure, and how many rows are kept;
    ``held`` keeps only the bytes of those images."""
    paths, shas = writer.keys(backbone)
    have = set(zip(paths, shas))
    failed_before = {(p, s) for p, (s, _) in state.failed.items()}
    todo = [(p, s) for p, s in zip(state.images.path, state.images.sha256)
            if (p, s) not in have and (p, s) not in failed_before]
    if held is not None:
        held.retain(p for p, _ in todo)
    return todo, len(paths)


def _group_splits(writer: StoreWriter, state: StoreState, backbone: str, settings: SplitSettings) -> tuple[int, int]:
    """--split-group-by near-duplicates: find copies among ``backbone``'s rows (all of them in memory,
    as the search needs) and move images to their group's split; a checkpoint stores both."""
    if settings.split_group_by != "near-duplicates":
        return 0, 0
    rows = writer.rows(backbone)
    view = StoreState(state.attrs, state.classes, state.images, state.failed, {backbone: rows} if rows else {})
    groups, moved = group_store_splits(view, backbone, settings)  # updates state.attrs and state.images
    writer.commit(state)
    return groups, moved


def announce_conversion(record: BackboneRecord, engine: str, progress: bool) -> None:
    """Say on stderr when this run first converts the backbone to ONNX (the wait is otherwise unexplained)."""
    from extract.engine import onnx_engine_path

    if engine != "keras" and not onnx_engine_path(record).exists():
        step(f"extract: converting {record.name} to an onnxruntime engine (once per backbone, weights and size; "
             f"cached for later runs, 10-60 s)", progress)


def _open_engine(record: BackboneRecord, weights: str, options: ComputeOptions, int8_gate):
    """The run's engine and its quantization facts (None for fp32); ``int8_gate`` as in ``_compute``.
    The inference threads are split into streams (``extract.streams``)."""
    from extract.engine import open_engine

    streams, threads = stream_plan(options.threads, options.streams)
    if not int8_gate:
        announce_conversion(record, options.engine, options.progress)
        return open_engine(record, weights, options.engine, threads, streams=streams), None
    dataset, previous, tolerance, notes = int8_gate
    choice = int8_engine_for_store(
        dataset, record.name, record.weights.id, record.input_size, previous.record if previous else None,
        lambda: open_engine(record, weights, "onnx", options.threads).path, tolerance, options.threads,
        options.workers, streams)
    notes.append(choice.report.describe(tolerance) + (" (cached)" if choice.cached else ""))
    return choice.engine, choice.record


def _compute(writer: StoreWriter, state: StoreState, root: Path, todo: list[tuple[str, str]],
             record: BackboneRecord, weights: str, options: ComputeOptions, int8_gate=None,
             held: HeldBytes | None = None) -> tuple[int, str, float]:
    """Decode, run and write ``todo`` in batches, folding into the store every checkpoint.

    ``int8_gate``: (dataset, the store's int8 rows, tolerance, notes) for an int8 run, else None.
    ``held``: the bytes the hash pass read (``extract.read_once``).
    Returns (images extracted, engine name, seconds in the loop). Ctrl-C keeps what was computed.
    """
    if not todo:  # nothing to compute: the backbone is not even built
        return 0, "none (nothing to compute)", 0.0
    from tqdm import tqdm

    run_engine, quantization = _open_engine(record, weights, options, int8_gate)
    record = replace(record.with_engine(run_engine.name), quantization=quantization)
    name = features_name(record.name, bool(int8_gate), record.tta)
    extracted = 0
    loop_started = last_checkpoint = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc=f"extract {record.name}", disable=not options.progress,
               smoothing=0.1)
    try:
        with BackgroundSegments(writer, name, record.to_dict()) as segments:
            for computed, failed in extract_segments(run_engine, segments, record, root, todo, options.batch_size,
                                                     options.workers, held):
                extracted += computed
                bar.update(computed + failed)
                if time.monotonic() - last_checkpoint > options.checkpoint_seconds:
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
