"""bench/run.py end to end on a tiny generated folder: both pipelines and the edge runner run, the
report is complete.

Only the shape of the report is checked (rows present, numbers that parse, equal split sizes); no
timing is asserted. The extraction and export sections are skipped: they have tests of their own
and would take this one past a minute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import make_image_folder

from classify.heads import HEAD_KINDS

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^(\d+(?:\.\d+)?) \((\d+(?:\.\d+)?)–(\d+(?:\.\d+)?), 1 runs\)$")


def _median(cell: str) -> float:
    match = NUMBER.match(cell.strip())
    assert match, f"not a 'median (min–max, runs)' figure: {cell!r}"
    return float(match.group(1))


def test_run_compares_both_pipelines_on_any_folder(tmp_path):  # about 30 s on 2 cores
    data = make_image_folder(tmp_path / "photos", per_class=10)
    out = tmp_path / "docs" / "bench.md"
    args = ["--data", str(data), "--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32",
            "--engine", "keras", "--repeats", "1", "--epochs", "1", "--limit-per-class", "8",
            "--skip-extract", "--skip-export", "--out", str(out)]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    text = out.read_text()
    assert "python bench/run.py --data" in text and " UTC on " in text and " cores, " in text
    assert "- photos: " in text and "24 images, 3 classes (blue, green, red)" in text  # 8 of 10 per class
    assert f"- photos: `{os.path.relpath(data, ROOT)}`" in text  # relative to the repository, not absolute
    assert "at most 8 images per class" in text

    rows = [line for line in text.splitlines() if line.startswith(("| tutorials' way", "| this tool"))]
    assert [re.search(r"(\w+) head", row).group(1) for row in rows[1:]] == list(HEAD_KINDS)
    for row in rows:
        wall, rate, accuracy, f1 = (_median(cell) for cell in row.strip("|").split("|")[1:])
        assert wall > 0 and rate > 0 and 0 <= accuracy <= 1 and 0 <= f1 <= 1
    assert sum("kept (best cross-validation accuracy)" in row for row in rows) == 1
    assert re.search(r"\*\*\d+\.\d+x\*\* as fast as the tutorials' way", text)

    sizes = re.search(r"this tool (\d+) train / (\d+) validation / (\d+) test .*the tutorials' way "
                      r"(\d+) / (\d+) / (\d+) ", text)
    assert sizes and sizes.groups()[:3] == sizes.groups()[3:] and sum(map(int, sizes.groups()[:3])) == 24
    for flag in ("--skip-extract", "--skip-export"):
        assert f"Skipped: {flag}." in text

    edge = text[text.index("## Edge runner"):]
    assert "Stand-alone: `python bench/edge_bench.py --model MODEL.onnx --images SAMPLE" in edge
    peak_rss = next(line for line in edge.splitlines() if line.startswith("| runner: peak RSS"))
    assert _median(peak_rss.strip("|").split("|")[1]) > 0

    raw = json.loads(out.with_suffix(".json").read_text())
    pipelines = raw["datasets"][0]["pipelines"]
    assert set(pipelines["tool"]["heads"]) == set(HEAD_KINDS)
    assert pipelines["tutorial"]["runs"][0]["epochs"] == 1
    assert raw["config"]["limit_per_class"] == 8 and raw["total_seconds"] > 0
    assert raw["datasets"][0]["edge_bench"]["result"]["images"] == 24

    # --assemble measures nothing: the same report from the JSON, plus the other scripts' sections.
    out.write_text("stale")
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--assemble", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    assembled = out.read_text()
    assert assembled == text
    for section in sorted((ROOT / "docs" / "bench").glob("*.md")):
        assert section.read_text().splitlines()[0].replace("## ", "### ", 1) in assembled


def test_docs_name_shared_data_as_dot_dot_shared_and_other_paths_relative_to_the_repository():
    from bench.common import ROOT, shown_path

    shared = ROOT.parent / "shared" / "datasets" / "fruits"
    assert shown_path(shared) == "../shared/datasets/fruits"
    assert shown_path(ROOT / "docs" / "bench") == "docs/bench"
    assert shown_path("/nonexistent-scratch/store.h5") == os.path.relpath("/nonexistent-scratch/store.h5", ROOT)
