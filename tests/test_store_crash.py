"""SIGKILL inside a checkpoint and inside compaction: the store always opens with complete rows only,
and the next run finishes it (kills land before and after the writer's file renames: batches,
segments, compaction, the root)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.store_synthetic import features_of
from extract.store import FeatureStore, parts_dir

ROOT = Path(__file__).resolve().parents[1]
ROWS, DIM = 120, 8
CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import extract.store_writer as sw
from bench.store_synthetic import build, image_table

store, phase, step, when = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
real_replace, real_compact, calls, inside = os.replace, sw._compact, [0], [False]

def replace(src, dst):  # every file the writer puts in place goes through one rename
    counted = phase == "any" or (phase == "compact" and inside[0]) or (phase == "root" and Path(dst) == store)
    calls[0] += counted
    if counted and calls[0] == step and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if counted and calls[0] == step and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

def compact(*args):
    inside[0] = True
    try:
        real_compact(*args)
    finally:
        inside[0] = False

os.replace, sw._compact = replace, compact
build(store, image_table({rows}), list(range({rows})), batch=5, batches_per_checkpoint=2, max_segments=2)
"""


def _run(script: Path, store: Path, phase: str, step: int, when: str) -> int:
    done = subprocess.run([sys.executable, str(script), str(store), phase, str(step), when], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def _assert_complete_rows(store: Path) -> int:
    if not store.exists():
        return 0
    fs = FeatureStore(store)
    assert not [x for x in fs.leftovers() if x.startswith("missing")]
    rows = fs.read()
    assert len(set(rows.paths)) == len(rows.paths)
    np.testing.assert_array_equal(rows.features, features_of(rows.paths, DIM).astype(np.float32))
    return len(rows.paths)


def test_sigkill_inside_checkpoints_and_compaction(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), rows=ROWS))
    store = tmp_path / "f.h5"
    kills = {"any": 0, "compact": 0, "root": 0}
    plan = [("any", 3, "before"), ("root", 1, "after"), ("any", 4, "after"), ("compact", 1, "before"),
            ("compact", 1, "after"), ("root", 2, "after"), ("any", 6, "after"), ("compact", 2, "after"),
            ("compact", 1, "after"), ("any", 2, "before"), ("root", 1, "before"), ("compact", 1, "before")]
    seen = []
    for phase, step, when in plan:
        killed = _run(script, store, phase, step, when) == -signal.SIGKILL
        kills[phase] += killed
        seen.append((phase, step, when, killed, _assert_complete_rows(store)))
    assert kills["any"] >= 3 and kills["compact"] >= 3 and kills["root"] >= 2, (kills, seen)
    assert seen[-1][-1] < ROWS, "every run finished before its kill: the plan no longer interrupts anything"
    assert _run(script, store, "any", 0, "never") == 0
    assert _assert_complete_rows(store) == ROWS
    info = FeatureStore(store).info()
    assert info["leftovers"] == [] and info["pending_rows"] == 0 and not parts_dir(store).exists()
    assert info["backbones"]["synthetic"]["segments"] <= 2
