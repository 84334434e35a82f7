"""SIGKILL at random moments never corrupts the store, and the next run finishes the job."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from conftest import make_image_folder

from extract.store import FeatureStore, parts_dir

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine", "keras",
        "--batch-size", "4", "--quiet", "--checkpoint-seconds", "0.2"]


def _extract(folder, store) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", str(folder), "--store", str(store),
                             *ARGS], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finished(proc: subprocess.Popen) -> None:
    """The job exited 0; otherwise fail showing its stderr."""
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]


def _assert_consistent(store: Path, folder: Path) -> int:
    """The store opens and every row is complete and matches its file."""
    fs = FeatureStore(store)
    if "mobilenet_v2" not in fs.backbones:
        return 0
    assert not [x for x in fs.leftovers() if x.startswith("missing")]
    rows = fs.read("mobilenet_v2")
    assert rows.features.shape == (len(rows.paths), 1280)
    assert np.isfinite(rows.features).all() and (np.abs(rows.features).sum(axis=1) > 0).all()
    assert len(set(rows.paths)) == len(rows.paths)
    with h5py.File(store, "r") as f:
        wanted = dict(zip(f["images/path"].asstr()[()], f["images/sha256"].asstr()[()]))
        stored = dict(zip(f["backbones/mobilenet_v2/path"].asstr()[()], f["backbones/mobilenet_v2/sha256"].asstr()[()]))
    for p in rows.paths:
        assert wanted[p] == stored[p] and (folder / p).exists()
    return len(rows.paths)


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=40, size=32)
    reference = tmp_path / "reference.h5"
    _finished(_extract(folder, reference))

    store = tmp_path / "killed.h5"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(4):
        proc = _extract(folder, store)
        deadline = time.monotonic() + 120
        # wait until the job is writing (segments appear), then kill at a random moment
        while time.monotonic() < deadline and proc.poll() is None:
            if parts_dir(store).is_dir() and any(parts_dir(store).iterdir()):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if store.exists():
            _assert_consistent(store, folder)
    assert kills >= 2, "the job finished before it could be killed; make the folder larger"

    _finished(_extract(folder, store))
    assert _assert_consistent(store, folder) == 120
    assert not parts_dir(store).exists() or not any(parts_dir(store).glob("*.h5"))
    got, ref = FeatureStore(store).read(), FeatureStore(reference).read()
    order = {p: i for i, p in enumerate(got.paths)}
    assert sorted(got.paths) == sorted(ref.paths)
    idx = [order[p] for p in ref.paths]
    np.testing.assert_allclose(got.features[idx], ref.features, rtol=1e-4, atol=1e-12)
    np.testing.assert_array_equal(got.labels[idx], ref.labels)
    np.testing.assert_array_equal(got.splits[idx], ref.splits)


def test_two_writer_processes(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=40, size=32)
    store = tmp_path / "f.h5"
    first = _extract(folder, store)
    lock = store.with_name(store.name + ".lock")
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", str(folder), "--store", str(store),
                             *ARGS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first writer finished too early for this test"
    _finished(first)
    assert second.returncode == 1
    assert "is being written by pid" in second.stderr
    assert "Traceback" not in second.stderr
    _assert_consistent(store, folder)
