"""What one Ray task of ``extract --runner ray`` does on a worker (the driver is extract/ray_runner.py).

A task is a pure function of its ``ShardTask``: the (path, sha256) pairs of one hash shard, decided by
the driver, and the ONNX engine named by its sha256. It runs the tool's own extraction loop
(``extract.job.extract_segments``: the same decoding, batching and segment writes as the local runner)
and writes its rows as segments beside the store, which the driver folds in. So that a worker never
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

from extract.errors import TransferKitError
from extract.paths import cache_dir
from extract.record import BackboneRecord
from extract.files import atomic_write, file_sha256

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


def run_shard_task(task: ShardTask) -> dict:
    """Compute one shard into segments; returns what the driver counts and records."""
    from extract.engine import OnnxEngine
    from extract.int8 import stored_name
    from extract.job import extract_segments
    from extract.segments import BackgroundSegments
    from extract.store import StoreWriter

    started = time.monotonic()
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    versions = worker_versions()
    check_versions(versions, task.expected_versions, where)
    engine = OnnxEngine(None, task.threads, path=local_engine(task.engine_sha256, task.engine_path, task.engine_ref))
    writer = StoreWriter(task.store)  # segments only: the driver holds the store's lock and folds them
    computed = failed = 0
    with BackgroundSegments(writer, stored_name(task.record), task.record.to_dict()) as segments:
        for done, bad in extract_segments(engine, segments, task.record, Path(task.root), list(task.items),
                                          task.batch_size, task.threads):
            computed += done
            failed += bad
    return {
        "computed": computed, "failed": failed, "seconds": time.monotonic() - started, "worker": where,
        "versions": versions, "intra_op_threads": engine.session.get_session_options().intra_op_num_threads,
        "decode_workers": task.threads, "tensorflow_imported": "tensorflow" in sys.modules,
    }
