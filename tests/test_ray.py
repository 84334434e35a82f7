"""extract --runner ray on a local 2-CPU Ray instance, started once for this module.

Every process a test kills is one this test module started (found among its own descendants by PID).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder, write_image

from bench.common import descendants, process_title

from extract.errors import TransferKitError
from extract.job import run_extraction
from extract.record import BackboneRecord
from extract.store import FeatureStore, parts_dir
from extract.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(backbone="mobilenet_v2", weights="none", input_size=32, engine="onnx", batch_size=4, progress=False)
CLI_ARGS = ["--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine", "onnx"]
TASK_TITLE = "ray::run_shard_task"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray instance (2 CPUs) and the engine cache its workers and these tests share."""
    pytest.importorskip("ray")
    import ray

    from extract.ray_runner import start_ray

    cache = tmp_path_factory.mktemp("ray-engine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_CACHE", str(cache))  # the workers inherit it from the raylet
        start_ray(num_cpus=2)
    yield {"address": ray.get_runtime_context().gcs_address, "cache": cache}
    ray.shutdown()


@pytest.fixture
def on_ray(ray_cluster, monkeypatch):
    """The driver (this process) uses the same engine cache as the workers."""
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(ray_cluster["cache"]))
    return ray_cluster


KILL_ARGS = {**ARGS, "batch_size": 1, "input_size": 64}  # batch 1: tasks long enough to kill
KILL_IMAGES = 120


@pytest.fixture(scope="module")
def kill_folder(ray_cluster, tmp_path_factory):
    """A folder for the kill tests and its store from the local runner, built once."""
    root = tmp_path_factory.mktemp("kill")
    folder = make_image_folder(root / "images", per_class=KILL_IMAGES // 3, size=24)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_CACHE", str(ray_cluster["cache"]))
        run_extraction(folder, root / "local.h5", **{**KILL_ARGS, "batch_size": 32})
    return folder, root / "local.h5"


def ray_options(**kwargs):
    from extract.ray_runner import RayOptions

    return RayOptions(**kwargs)


def add_bad_files(folder: Path) -> None:
    (folder / "red" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "green" / "empty.png").write_bytes(b"")
    (folder / "blue" / "notes.txt").write_text("not an image")


def record(store: Path) -> BackboneRecord:
    return FeatureStore(store).read("mobilenet_v2").backbone


def store_summary(store: Path) -> dict:
    """What `store info` says, less what depends on when and how the rows were written (times, files)."""
    info = FeatureStore(store).info()
    keys = ("images", "failed", "classes", "split_counts", "failures", "copies_across_splits", "layout")
    backbones = {name: {k: v for k, v in b.items() if k != "segments"} for name, b in info["backbones"].items()}
    return {**{k: info[k] for k in keys}, "backbones": backbones}


def assert_same_store(got: Path, want: Path, exact: bool = True) -> None:
    """Same images, failures and splits, the same rows (each image once), equal features, labels, splits.

    Rows are read in the store's canonical order whichever runner wrote them, so the two reads must
    list the same paths in the same order (fit-head then gives the same numbers). ``exact``: tolerance 0 (same batch size as the
    reference); otherwise 1e-6 (the kill tests compare batch-1 rows with a batch-32 reference;
    onnxruntime gave 0.0 difference here too).
    """
    assert store_summary(got) == store_summary(want)
    a, b = FeatureStore(got).read(), FeatureStore(want).read()  # what fit-head trains on
    assert len(set(a.paths)) == len(a.paths) and a.paths == b.paths  # canonical order, not write order
    row = {p: i for i, p in enumerate(a.paths)}
    order = [row[p] for p in b.paths]
    assert a.class_names == b.class_names
    np.testing.assert_array_equal(a.labels[order], b.labels)
    np.testing.assert_array_equal(a.splits[order], b.splits)
    if exact:
        np.testing.assert_array_equal(a.features[order], b.features)
    else:
        np.testing.assert_allclose(a.features[order], b.features, rtol=1e-6, atol=1e-6)


def own_task_workers() -> list[int]:
    """PIDs of this module's Ray worker processes that are running an extraction task right now."""
    return [pid for pid in descendants(os.getpid()) if process_title(pid) == TASK_TITLE]


def capture_results(monkeypatch) -> list[dict]:
    """Collect each finished task's summary as the driver receives it."""
    import extract.ray_runner as runner

    results, original = [], runner._result
    monkeypatch.setattr(runner, "_result", lambda ref, pending: results.append(original(ref, pending))
                        or results[-1])
    return results


def test_cold_engine_cache_is_converted_once_on_the_driver(ray_cluster, tmp_path, monkeypatch):
    import extract.engine as engine

    cold = ray_cluster["cache"]  # the module's cache while nothing converted into it yet (saves a conversion)
    if list((cold / "engines").glob("*.onnx")):
        cold = tmp_path / "cold-cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(cold))
    conversions = []
    original = engine.keras_to_onnx
    monkeypatch.setattr(engine, "keras_to_onnx", lambda *a, **k: conversions.append(a) or original(*a, **k))
    results = capture_results(monkeypatch)
    folder = make_image_folder(tmp_path / "images", per_class=6, size=24)
    summary = run_extraction(folder, tmp_path / "f.h5", **ARGS, ray_options=ray_options(shards=3))
    assert summary.extracted == 18 and len(conversions) == 1
    assert len(list((cold / "engines").glob("mobilenet_v2-*.onnx"))) == 1  # the driver's converted engine
    assert len(results) == 3 and not any(r["tensorflow_imported"] for r in results)


def test_a_node_without_the_engine_file_gets_it_by_hash(on_ray, tmp_path):
    import ray

    from extract.ray_task import local_engine

    engine_file = tmp_path / "engine.onnx"
    engine_file.write_bytes(os.urandom(4096))  # any bytes: shipping goes by content hash
    sha = file_sha256(engine_file)
    ref = ray.put(engine_file.read_bytes())
    fetch = ray.remote(local_engine)
    shipped = Path(ray.get(fetch.remote(sha, str(tmp_path / "not-on-this-node.onnx"), [ref])))
    assert shipped.name == f"shipped-{sha}.onnx" and file_sha256(shipped) == sha
    assert ray.get(fetch.remote(sha, str(engine_file), [ref])) == engine_file  # visible: used in place
    with pytest.raises(ray.exceptions.RayTaskError, match="does not match sha256"):
        ray.get(fetch.remote("0" * 64, str(tmp_path / "absent.onnx"), [ref]))


def test_same_store_as_the_local_runner_with_bad_files(on_ray, tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=12, size=40)
    add_bad_files(folder)
    run_extraction(folder, tmp_path / "local.h5", **ARGS)
    results = capture_results(monkeypatch)
    summary = run_extraction(folder, tmp_path / "ray.h5", **ARGS, ray_options=ray_options(shards=3))

    assert (summary.extracted, summary.failed, summary.ignored) == (36, 2, 1)
    assert_same_store(tmp_path / "ray.h5", tmp_path / "local.h5")
    failed = {f["path"]: f["reason"] for f in FeatureStore(tmp_path / "ray.h5").info()["failures"]}
    assert failed["green/empty.png"] == "empty file (0 bytes)"
    assert failed["red/truncated.jpg"].startswith("cannot decode image")
    assert len(results) == 3 and sum(r["computed"] for r in results) == 36
    assert not any(r["tensorflow_imported"] for r in results)
    assert {(r["intra_op_threads"], r["decode_workers"]) for r in results} == {(1, 1)}

    import ray

    from extract.engine import onnx_engine_path
    from extract.ray_task import worker_versions

    runner = record(tmp_path / "ray.h5").runner
    engine_file = onnx_engine_path(record(tmp_path / "ray.h5"))
    assert runner["name"] == "ray" and runner["ray_version"] == ray.__version__
    assert runner["engine_sha256"] == file_sha256(engine_file)
    assert runner["worker_versions"] == worker_versions() == results[0]["versions"]
    assert (runner["cpus_per_task"], runner["intra_op_threads"], runner["decode_workers"]) == (1, 1, 1)
    assert not parts_dir(tmp_path / "ray.h5").exists()


def test_twenty_changed_and_a_hundred_touched_compute_twenty(on_ray, tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=45, size=24)
    store = tmp_path / "f.h5"
    results = capture_results(monkeypatch)
    first = run_extraction(folder, store, **ARGS, ray_options=ray_options(cpus_per_task=2))
    assert first.extracted == 135
    assert {r["intra_op_threads"] for r in results} == {2}
    assert record(store).runner["intra_op_threads"] == 2

    files = sorted(folder.rglob("*.jpg")) + sorted(folder.rglob("*.png"))
    for i, path in enumerate(files[:20]):
        write_image(path, (90, 90, 90), size=24, seed=10_000 + i, fmt="PNG" if path.suffix == ".png" else "JPEG")
    for path in files[20:120]:
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = run_extraction(folder, store, **ARGS, ray_options=ray_options())
    assert (second.extracted, second.reused, second.removed) == (20, 115, 20)

    reference = tmp_path / "local.h5"
    run_extraction(folder, reference, **ARGS)
    assert_same_store(store, reference)


def test_unchanged_folder_starts_no_ray_and_local_runner_never_imports_it(on_ray, tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=4, size=24)
    store = tmp_path / "f.h5"
    script = (
        "import json, sys\n"
        "from extract.job import run_extraction\n"
        "from extract.ray_runner import RayOptions\n"
        f"args = dict(backbone='mobilenet_v2', weights='none', input_size=32, engine='onnx', progress=False)\n"
        f"local = run_extraction({str(folder)!r}, {str(store)!r}, **args)\n"
        "after_local = 'ray' in sys.modules\n"
        f"again = run_extraction({str(folder)!r}, {str(store)!r}, **args,"
        " ray_options=RayOptions(address='127.0.0.1:1'))\n"  # nothing listens there: starting Ray would fail
        "print(json.dumps([local.extracted, after_local, again.extracted, again.reused, 'ray' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [12, False, 0, 12, False]


def test_worker_killed_twice_is_retried_and_the_store_is_complete(on_ray, kill_folder, tmp_path):
    folder, reference = kill_folder
    killed: list[int] = []

    def kill_two_workers():
        deadline = time.monotonic() + 90
        while len(killed) < 2 and time.monotonic() < deadline:
            busy = [pid for pid in own_task_workers() if pid not in killed]
            if busy:
                # At once: rows are grouped into batch files of 64 (extract/segments.py), so a task of 60
                # small images writes only at its end and can finish within a few tenths of a second.
                try:
                    os.kill(busy[0], signal.SIGKILL)
                    killed.append(busy[0])
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_two_workers)
    killer.start()
    summary = run_extraction(folder, tmp_path / "ray.h5", **KILL_ARGS, ray_options=ray_options(shards=2))
    killer.join()
    assert len(killed) == 2, "the tasks ended before two workers could be killed"
    assert summary.extracted == KILL_IMAGES and summary.images == KILL_IMAGES
    assert_same_store(tmp_path / "ray.h5", reference, exact=False)  # complete, no duplicate rows


def _rows_written(store: Path) -> int:
    """Rows in the store plus batch files waiting to be folded (while a run is going on)."""
    folded = 0
    if store.exists():
        folded = FeatureStore(store).info()["backbones"].get("mobilenet_v2", {}).get("rows", 0)
    folder = parts_dir(store)
    return folded + (len(list(folder.glob("*.h5"))) if folder.is_dir() else 0)


def test_driver_killed_then_rerun_computes_only_what_is_missing(on_ray, kill_folder, tmp_path):
    folder, reference = kill_folder
    store = tmp_path / "f.h5"
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", str(folder), "--store", str(store), *CLI_ARGS,
           "--batch-size", "1", "--input-size", "64", "--runner", "ray", "--ray-address", on_ray["address"],
           "--shards", "6", "--checkpoint-seconds", "0.2", "--quiet"]
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while driver.poll() is None and time.monotonic() < deadline and _rows_written(store) < 20:
        time.sleep(0.1)
    assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    while own_task_workers() and time.monotonic() < deadline:  # Ray stops the dead driver's tasks
        time.sleep(0.1)

    summary = run_extraction(folder, store, **KILL_ARGS, ray_options=ray_options(shards=6))
    assert summary.reused >= 20  # what the killed run wrote is kept...
    assert summary.extracted == KILL_IMAGES - summary.reused  # ...and only the rest is computed
    assert_same_store(store, reference, exact=False)


def test_cpus_per_task_larger_than_the_cluster_fails_with_a_reason(on_ray, tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=2, size=24)
    with pytest.raises(TransferKitError, match="--cpus-per-task 3 is more than any node .* 2 CPUs"):
        run_extraction(folder, tmp_path / "f.h5", **ARGS, ray_options=ray_options(cpus_per_task=3))


def test_workers_with_other_library_versions_are_refused(on_ray, tmp_path, monkeypatch):
    import extract.ray_task as task

    real = task.worker_versions()
    monkeypatch.setattr(task, "worker_versions", lambda: {**real, "numpy": "0.0.1"})  # what the driver expects
    folder = make_image_folder(tmp_path / "images", per_class=2, size=24)
    with pytest.raises(TransferKitError, match=rf"has numpy {real['numpy']} \(driver: 0.0.1\).*same versions"):
        run_extraction(folder, tmp_path / "f.h5", **ARGS, ray_options=ray_options(shards=1))


def test_without_ray_the_command_says_how_to_install_it(tmp_path, monkeypatch):
    import extract.ray_runner as runner
    from cli import cli

    monkeypatch.setattr(runner, "find_spec", lambda name: None)
    folder = make_image_folder(tmp_path / "images", per_class=2, size=24)
    result = CliRunner().invoke(cli, ["extract", str(folder), "--store", str(tmp_path / "f.h5"), *CLI_ARGS,
                                      "--runner", "ray"])
    assert result.exit_code == 1
    assert "pip install -e '.[ray]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "f.h5").exists()


def test_ray_options_need_the_ray_runner(tmp_path):
    from cli import cli

    folder = make_image_folder(tmp_path / "images", per_class=2, size=24)
    result = CliRunner().invoke(cli, ["extract", str(folder), "--store", str(tmp_path / "f.h5"), "--shards", "4"])
    assert result.exit_code == 2 and "--shards needs --runner ray" in result.output


def test_a_retried_task_computes_only_what_its_killed_attempt_did_not_write(on_ray, tmp_path):
    """A retry reads the batch files of its shard's killed attempt: those rows and failures are not
    computed again, and the fold keeps them (each image once)."""
    import extract.ray_runner as runner
    from extract.ray_task import ShardParts, run_shard_task

    folder = make_image_folder(tmp_path / "images", per_class=4, size=24)
    add_bad_files(folder)
    run_extraction(folder, tmp_path / "local.h5", **ARGS)
    planned: list = []
    store = tmp_path / "ray.h5"
    with pytest.MonkeyPatch.context() as mp:  # the driver plans the shard; this test runs its attempts
        mp.setattr(runner, "_run_tasks", lambda tasks, *args: planned.extend(tasks) or 0)
        run_extraction(folder, store, **ARGS, ray_options=ray_options(shards=1))
    (task,) = planned
    bad = [item for item in task.items if item[0].endswith(("truncated.jpg", "empty.png"))]
    earlier = [item for item in task.items if item not in bad][:5]
    killed = ShardParts(task.store, task.key)  # what an attempt killed mid-shard left
    killed.write_segment(task.record.name, task.record.to_dict(), [p for p, _ in earlier], [s for _, s in earlier],
                         np.full((5, task.record.feature_dim), 7.0, task.record.dtype),
                         {bad[0][0]: (bad[0][1], "earlier attempt")})
    before = set(parts_dir(store).glob("*.h5"))

    result = run_shard_task(task)  # the retry, in this process

    assert (result["computed"], result["failed"], result["resumed"]) == (12, 2, 6)
    new_rows, new_failures = set(), set()
    for part in set(parts_dir(store).glob("*.h5")) - before:
        with h5py.File(part) as f:
            new_rows |= {p.decode() for p in f["path"][()]}
            new_failures |= {p.decode() for p in f["failed/path"][()]}
    assert new_rows == {p for p, _ in task.items} - {p for p, _ in earlier} - {p for p, _ in bad}
    assert new_failures == {bad[1][0]}
    assert run_extraction(folder, store, **ARGS, ray_options=ray_options(shards=1)).extracted == 0  # folds
    got, want = FeatureStore(store).read(), FeatureStore(tmp_path / "local.h5").read()
    assert got.paths == want.paths  # each image once
    kept = np.isin(got.paths, [p for p, _ in earlier])
    assert (got.features[kept] == 7.0).all()  # the earlier attempt's rows, not recomputed ones
    np.testing.assert_array_equal(got.features[~kept], want.features[~kept])
    assert FeatureStore(store).state.failed[bad[0][0]][1] == "earlier attempt"
