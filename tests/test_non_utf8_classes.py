"""A class folder whose name is not valid UTF-8 (issue 14): store -> head -> ONNX metadata -> edge result
line keep the name losslessly (``\\udcXX`` in JSON, ``\\xNN`` in human-readable lines)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import COLOURS, make_image_folder

from classify.persist import load_head
from cli import cli
from export.metadata import read_metadata

REPO = Path(__file__).resolve().parents[1]
RAW = b"caf\xe9"  # Latin-1 "café": not valid UTF-8
CLASS = os.fsdecode(RAW)  # what Python makes of it: "caf\udce9"
FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine", "keras", "--quiet"]


def _folder(root: Path) -> Path:
    make_image_folder(root, per_class=8, classes={"blue": COLOURS["blue"], "red": COLOURS["red"]})
    os.rename(os.fsencode(root / "red"), os.fsencode(root) + b"/" + RAW)
    return root


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow  # one real tf2onnx conversion of the (tiny, random) backbone
def test_a_non_utf8_class_folder_goes_through_extract_fit_export_and_the_edge_runner(tmp_path):
    images, store, head, model = _folder(tmp_path / "images"), tmp_path / "f.h5", tmp_path / "head", tmp_path / "m.onnx"
    _ok(["extract", str(images), "--store", str(store), *FAST])
    assert "  classes: blue, caf\\xe9\n" in _ok(["store", "info", str(store)])
    _ok(["fit-head", "--store", str(store), "--out", str(head), "--kind", "softmax", "--quiet"])
    config_text = (head / "head.json").read_bytes().decode("utf-8")  # valid UTF-8, the name as a JSON escape
    assert '"caf\\udce9"' in config_text and load_head(head).class_names == ["blue", CLASS]
    _ok(["export-onnx", "--store", str(store), "--head", str(head), "--out", str(model), "--parity-images", "4",
         "--quiet"])
    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    assert '"caf\\udce9"' in props["class_names"]  # protobuf strings must be UTF-8: the escape keeps it so
    assert read_metadata(model)["class_names"] == ["blue", CLASS]

    watch = tmp_path / "watch"
    shutil.copytree(os.fsencode(images), os.fsencode(watch))
    proc = subprocess.run([sys.executable, "-m", "edge", "--model", str(model), "--watch", str(watch),
                           "--results", str(tmp_path / "r.jsonl"), "--once", "--unknown", "off",
                           "--metrics", str(tmp_path / "metrics.prom")],
                          cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_bytes().decode("utf-8").splitlines()]
    assert len(lines) == 16 and not any("error" in line for line in lines)
    from_raw = [line for line in lines if os.fsencode(line["path"]).startswith(RAW + b"/")]
    assert len(from_raw) == 8 and {line["label"] for line in from_raw} == {CLASS}  # colours this far apart
    assert {os.fsencode(t["label"]) for line in lines for t in line["top"]} == {b"blue", RAW}
    metrics = (tmp_path / "metrics.prom").read_bytes().decode("utf-8")  # valid UTF-8, the name escaped
    assert 'edge_class_total{label="caf\\\\udce9"} 8' in metrics

    report = tmp_path / "report"
    _ok(["evaluate", "--store", str(store), "--head", str(head), "--split", "train", "--report-dir", str(report)])
    assert "caf\\xe9," in (report / "per_class.csv").read_text(encoding="utf-8")  # escaped where people read
    assert json.loads((report / "metrics.json").read_bytes().decode("utf-8"))["class_names"] == ["blue", CLASS]
    predicted = _ok(["predict", "--head", str(head), os.fsdecode(os.fsencode(images) + b"/" + RAW + b"/img_0.jpg")])
    assert ": caf\\xe9 (" in predicted  # the readable, escaped form on a plain line
