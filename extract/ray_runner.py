"""``extract --runner ray``: the same extraction, its compute spread over Ray tasks.

Everything that decides *what* to compute stays on the driver and is the local runner's own code
(``run_extraction``): listing and hashing the folder with the tool's rules, folding what a killed run
left, keeping only new or changed images. Only then, and only when there is something to compute,
is Ray imported and started, so an unchanged folder costs no Ray at all. Then the driver

1. converts the backbone to ONNX once (the engine cache: TensorFlow runs here only) and puts the engine
   file into Ray's object store once; a task fetches it, by sha256, only if its node does not have it;
2. splits the images to compute into fixed hash shards (``shard_of``) and submits one task per
   non-empty shard with its own list of (path, sha256): no task walks the folder, and decoded pixels
   never travel through Ray (each task reads its files from the shared filesystem);
3. folds the segments the tasks write (extract/ray_task.py) into the store at checkpoints and at the
   end, exactly as the local runner folds its own: the result is the local runner's store.

Faults: Ray retries a task whose worker dies (``max_retries``); the retry computes only what the killed
attempt's batch files do not hold (rows a checkpoint had folded already are computed again and kept
once: the store keeps one row per path). If the driver dies, the next run folds the segments and
computes only what is missing. A file that does not decode is a failed row, never a failed task.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from extract.dataset import shard_of
from extract.errors import TransferKitError
from extract.files import file_sha256

INSTALL_HINT = "--runner ray needs Ray: pip install -e '.[ray]' (or pip install 'ray==2.60.0')"
SHARDS_PER_SLOT = 4  # more shards than task slots: a retry redoes little, and fast nodes take more shards
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a local instance holds the engine file and small results only


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance on this machine
    shards: int | None = None  # None: SHARDS_PER_SLOT per task slot of the cluster
    cpus_per_task: int = 1
    max_retries: int = 3  # retries of a task whose worker process or node died


def check_ray_run(engine: str, shard: str | None) -> None:
    """Fail before any work when Ray is missing or the options cannot run on Ray (imports no Ray)."""
    if find_spec("ray") is None:
        raise TransferKitError(INSTALL_HINT)
    if engine == "keras":
        raise TransferKitError("--runner ray runs the ONNX engine (workers never import TensorFlow); "
                               "use --engine auto or onnx, or --runner local for --engine keras")
    if shard:
        raise TransferKitError("--shard I/N is for running shards by hand; --runner ray shards by itself")


def _source_root() -> Path | None:
    """The checkout transferkit runs from, when it is not an installed package (workers import it too)."""
    root = Path(__file__).resolve().parents[1]
    return None if "site-packages" in root.parts else root


def runtime_env() -> dict:
    """Worker environment: on this machine, workers import transferkit from the driver's checkout."""
    root = _source_root()
    if root is None:
        return {}
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address``, or start a local instance with ``num_cpus`` CPUs."""
    import logging

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  runtime_env=runtime_env())
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=num_cpus or len(os.sched_getaffinity(0)),
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise TransferKitError(f"cannot start or reach {where}: {exc}") from None


@contextlib.contextmanager
def ray_session(options: RayOptions):
    """Ray for the duration of one run; a session already open in this process is reused and left open."""
    import ray

    if ray.is_initialized():
        yield
        return
    start_ray(options.address)
    try:
        yield
    finally:
        ray.shutdown()


def task_slots(cpus_per_task: int) -> int:
    """How many tasks the cluster runs at once; refuses a task size no node can hold (it would wait forever)."""
    import ray

    cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not cpus or max(cpus) < cpus_per_task:
        largest = f"{max(cpus):g}" if cpus else "0"
        raise TransferKitError(f"--cpus-per-task {cpus_per_task} is more than any node of the Ray cluster has "
                               f"(largest node: {largest} CPUs); lower --cpus-per-task")
    return sum(int(c // cpus_per_task) for c in cpus)


def plan_shards(todo: list[tuple[str, str]], count: int) -> list[tuple[tuple[str, str], ...]]:
    """The non-empty hash shards of ``todo`` (an image's shard depends only on its path and ``count``)."""
    shards: list[list[tuple[str, str]]] = [[] for _ in range(count)]
    for path, sha in todo:
        shards[shard_of(path, count)].append((path, sha))
    return [tuple(items) for items in shards if items]


def prepare_engine(record, weights) -> Path:
    """The ONNX engine file, converted here (once, cached) if the cache does not have it yet."""
    from extract.engine import onnx_engine_path, open_engine

    path = onnx_engine_path(record)
    if not path.exists():
        open_engine(record, weights, "onnx", threads=1)
    return path


def runner_record(engine_sha256: str, options: RayOptions, shards: int, versions: dict) -> dict:
    """How Ray computed the rows, for the backbone record (every worker is checked against ``versions``)."""
    import ray

    return {"name": "ray", "ray_version": ray.__version__, "engine_sha256": engine_sha256, "shards": shards,
            "cpus_per_task": options.cpus_per_task, "intra_op_threads": options.cpus_per_task,
            "decode_workers": options.cpus_per_task, "worker_versions": versions}


def compute_on_ray(writer, state, root, todo, record, weights, options, *,
                   ray_options: RayOptions) -> tuple[int, str, float]:
    """Compute ``todo`` on Ray into segments of ``writer``'s store; same contract as ``job._compute``
    (``options`` a ``job.ComputeOptions``); the record's ``runner`` block says how the rows were computed."""
    from dataclasses import replace

    from extract.job import announce_conversion
    from extract.ray_task import ShardTask, worker_versions

    if not todo:  # nothing to compute: Ray is not even started
        return 0, "none (nothing to compute)", 0.0
    announce_conversion(record, options.engine, options.progress)
    engine_path = prepare_engine(record, weights)
    engine_sha = file_sha256(engine_path)
    with ray_session(ray_options):
        import ray

        slots = task_slots(ray_options.cpus_per_task)
        shards = plan_shards(todo, min(ray_options.shards or SHARDS_PER_SLOT * slots, len(todo)))
        versions = worker_versions()
        record = replace(record.with_engine("onnx"),
                         runner=runner_record(engine_sha, ray_options, len(shards), versions))
        engine_ref = ray.put(engine_path.read_bytes())
        run_key = uuid.uuid4().hex[:12]  # one per run: a retry's batch files are found by its shard's key
        tasks = [ShardTask(str(writer.path.resolve()), str(Path(root).resolve()), items, record,
                           options.batch_size, ray_options.cpus_per_task, engine_sha, str(engine_path.resolve()),
                           [engine_ref], versions, key=f"{run_key}-s{index}") for index, items in enumerate(shards)]
        loop_started = time.monotonic()
        extracted = _run_tasks(tasks, ray_options, writer, state, options.checkpoint_seconds, options.progress)
    writer.commit(state)
    return extracted, "onnx", time.monotonic() - loop_started


def _run_tasks(tasks: list, options: RayOptions, writer, state, checkpoint_seconds: float, progress: bool) -> int:
    """Submit every shard, fold segments at checkpoints, count what finished; a task error stops the run."""
    import ray
    from tqdm import tqdm

    from extract.ray_task import run_shard_task

    remote = ray.remote(run_shard_task).options(num_cpus=options.cpus_per_task, max_retries=options.max_retries,
                                                retry_exceptions=False)
    pending = {remote.remote(task): task for task in tasks}
    total = sum(len(t.items) for t in tasks)
    extracted, last_checkpoint = 0, time.monotonic()
    bar = tqdm(total=total, unit="img", desc=f"extract on ray ({len(tasks)} shards)", disable=not progress,
               smoothing=0.1)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.5, checkpoint_seconds))
            for ref in done:
                pending.pop(ref)
                result = _result(ref, pending)
                extracted += result["computed"]
                bar.update(result["computed"] + result["failed"])
                bar.set_postfix_str(f"shards {len(tasks) - len(pending)}/{len(tasks)}")
            if time.monotonic() - last_checkpoint > checkpoint_seconds:
                writer.commit(state)
                last_checkpoint = time.monotonic()
    except KeyboardInterrupt:  # like the local runner: keep what was computed, say how to resume
        from extract.job import ExtractionInterrupted

        _cancel(pending)
        writer.commit(state)
        raise ExtractionInterrupted(writer.path, extracted, total) from None
    finally:
        bar.close()
    return extracted


def _cancel(pending) -> None:
    import ray

    for ref in pending:
        ray.cancel(ref, force=True)


def _result(ref, pending: dict) -> dict:
    """A finished task's summary; on a failed task, cancel the others and say why in one line."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        _cancel(pending)
        cause = getattr(exc, "cause", None)
        reason = str(cause) if isinstance(cause, TransferKitError) else str(exc).strip().splitlines()[-1]
        raise TransferKitError(f"a Ray task failed, the run stops (rows computed so far are kept): "
                               f"{reason}") from None
