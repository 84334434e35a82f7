"""What one Ray task of ``extract --runner ray`` does on a worker (the driver is extract/ray_runner.py).

A task is a pure function of its ``ShardTask``: the (path, sha256) pairs of one hash shard, decided by
the driver, and the ONNX engine named by its sha256. It runs the tool's own extraction loop
(``extract.job.extract_segments``: the same decoding, batching and segment writes as the local runner)
and writes its rows as segments beside the store, which the driver folds in. The segments carry the
task's key in their names, so a retried attempt (its worker was killed) computes only the rows its
predecessor had not written yet. So that a worker never
imports TensorFlow, this module imports only onnxruntime, numpy, Pillow and h5py (through extract.job,
extract.engine and extract.store), and it imports Ray only to fetch the engine bytes when its node does
not have them yet.

Threads come from the task's CPU allotment, never from the node's core count: a Ray task given one
CPU still sees every core, and onnxruntime ignores ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from extract.errors import StoreError, TransferKitError
from extract.paths import cache_dir
from extract.files import atomic_write, file_sha256
from extract.record import BackboneRecord
from extract.store_files import open_segment, parts_dir, read_failed, strings, write_segment_file

# What every worker must share with the driver for its features to be the driver's features.
CHECKED_PACKAGES = ("onnxruntime", "numpy")


class WorkerMismatch(TransferKitError):
    """A worker's libraries differ from the driver's: its features could differ, so it is refused."""


@dataclass(frozen=True)
class ShardTask:
    store: str  # the store path, as the workers see it (a shared filesystem)
    root: str  # the images folder, as the workers see it
    items: tuple[tuple[str, str], ...]  # (relative path, sha256) to compute, in path order
    record: BackboneRecord  # the backbone record every segment carries (with its Ray ``runner`` block)
    batch_size: int
    threads: int  # onnxruntime intra-op threads and decode threads: the task's CPU allotment
    engine_sha256: str
    engine_path: str  # where the driver has the engine: used when this node sees the same file
    engine_ref: list  # [ObjectRef of the engine bytes]: nested, so Ray fetches them only when asked
    expected_versions: dict  # the driver's worker_versions()
    key: str = "shard"  # names this task's batch files, so that a retried attempt finds its predecessor's


def worker_versions() -> dict[str, str]:
    from extract.record import library_versions

    return library_versions(CHECKED_PACKAGES)


def check_versions(found: dict, expected: dict, where: str) -> None:
    """Refuse a worker whose transferkit, onnxruntime or numpy differs from the driver's."""
    differ = [f"{k} {found.get(k)} (driver: {v})" for k, v in sorted(expected.items())
              if k != "python" and found.get(k) != v]
    if differ:
        raise WorkerMismatch(f"worker {where} has {', '.join(differ)}; install the same versions on every node")


def local_engine(sha256: str, driver_path: str, engine_ref: list) -> Path:
    """The engine file with ``sha256`` on this node: the driver's own file when this node sees it (same
    machine, shared filesystem), else a copy fetched from the object store once per node."""
    path = cache_dir("engines") / f"shipped-{sha256}.onnx"
    for candidate in (Path(driver_path), path):
        if candidate.is_file() and file_sha256(candidate) == sha256:
            return candidate
    path.parent.mkdir(parents=True, exist_ok=True)
    import ray

    data = ray.get(engine_ref[0])
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
        if file_sha256(tmp) != sha256:
            raise TransferKitError(f"the engine received on {socket.gethostname()} does not match sha256 {sha256}")
    return path


class ShardParts:
    """A task's batch files beside the store, written as ``StoreWriter.write_segment`` writes them (the
    driver folds them in the same way) but named with the task's key: a retried attempt of the task
    reads what its killed predecessor wrote and computes only the rest."""

    def __init__(self, store: str, key: str):
        self.folder, self.key, self._seq = parts_dir(Path(store)), key, 0

    def write_segment(self, backbone: str, record: dict, paths: list[str], shas: list[str], features,
                      failed: dict) -> None:
        self.folder.mkdir(exist_ok=True)
        self._seq += 1
        name = f"{time.time_ns()}-{os.getpid()}-{self._seq:06d}-{self.key}.h5"
        write_segment_file(self.folder / name, backbone, record, paths, shas, features, failed)

    def written(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """(path, sha256) of the rows and of the failures in this key's batch files (an earlier attempt's).

        A file a checkpoint folded meanwhile is gone: its rows are computed again and folded in once.
        """
        rows: set[tuple[str, str]] = set()
        failures: set[tuple[str, str]] = set()
        for part in self.folder.glob(f"*-{self.key}.h5") if self.folder.is_dir() else []:
            try:
                with open_segment(part) as f:
                    rows.update(zip(strings(f["path"]), strings(f["sha256"])))
                    failures.update((path, sha) for path, (sha, _) in read_failed(f["failed"]).items())
            except (StoreError, OSError, KeyError):
                continue
        return rows, failures


def run_shard_task(task: ShardTask) -> dict:
    """Compute one shard into segments (less what an earlier, killed attempt wrote); returns what the
    driver counts and records."""
    from extract.engine import OnnxEngine
    from extract.int8 import stored_name
    from extract.job import extract_segments
    from extract.segments import BackgroundSegments

    started = time.monotonic()
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    versions = worker_versions()
    check_versions(versions, task.expected_versions, where)
    engine = OnnxEngine(None, task.threads, path=local_engine(task.engine_sha256, task.engine_path, task.engine_ref))
    parts = ShardParts(task.store, task.key)  # the driver holds the store's lock and folds them
    rows, failures = parts.written()
    todo = [item for item in task.items if item not in rows and item not in failures]
    computed = sum(item in rows for item in task.items)
    failed = sum(item in failures and item not in rows for item in task.items)
    resumed = computed + failed
    with BackgroundSegments(parts, stored_name(task.record), task.record.to_dict()) as segments:
        for done, bad in extract_segments(engine, segments, task.record, Path(task.root), todo,
                                          task.batch_size, task.threads):
            computed += done
            failed += bad
    return {
        "computed": computed, "failed": failed, "resumed": resumed, "seconds": time.monotonic() - started,
        "worker": where, "versions": versions,
        "intra_op_threads": engine.session.get_session_options().intra_op_num_threads,
        "decode_workers": task.threads, "tensorflow_imported": "tensorflow" in sys.modules,
    }
