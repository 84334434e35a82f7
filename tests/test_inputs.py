"""Image arguments of predict and identify: folders, globs, odd files; identify's per-file errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image

from extract.inputs import NoImagesMatched, collect_images

REPO = Path(__file__).resolve().parents[1]


def test_folders_are_searched_like_extract_and_globs_expanded(tmp_path):
    write_image(tmp_path / "in" / "a" / "x.jpg", (200, 0, 0))
    write_image(tmp_path / "in" / "b" / "deep" / "y.png", (0, 200, 0))
    (tmp_path / "in" / "notes.txt").write_text("no")
    write_image(tmp_path / "in" / ".hidden" / "z.jpg", (0, 0, 200))
    (tmp_path / "empty").mkdir()
    files, failed = collect_images([str(tmp_path / "in"), str(tmp_path / "in" / "*" / "*.jpg"), str(tmp_path / "empty"),
                                    str(tmp_path / "missing.jpg")])
    assert files == [str(tmp_path / "in" / "a" / "x.jpg"), str(tmp_path / "in" / "b" / "deep" / "y.png"),
                     str(tmp_path / "in" / "a" / "x.jpg"), str(tmp_path / "missing.jpg")]
    assert failed == [(str(tmp_path / "empty"), "folder has no image files")]
    with pytest.raises(NoImagesMatched, match="no file matches"):
        collect_images([str(tmp_path / "in" / "*.gif")])


def test_identify_reports_each_bad_input_and_prints_valid_utf8_json(tmp_path):
    write_image(tmp_path / "in" / "ok.png", (200, 0, 0), size=40)
    os.mkfifo(tmp_path / "in" / "fifo.jpg")
    latin1 = os.fsencode(tmp_path / "in") + b"/caf\xe9.jpg"
    with open(latin1, "wb") as fh:
        fh.write((tmp_path / "in" / "ok.png").read_bytes())
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    result = subprocess.run([sys.executable, "cli.py", "identify", str(tmp_path / "in"), "--backbone", "mobilenet_v2",
                             "--weights", "none", "--top", "1", "--json"],
                            cwd=REPO, capture_output=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert result.stderr.decode().strip().splitlines()[-1] == "Error: 2 of 4 images could not be classified"
    rows = {os.fsencode(row["path"]): row for row in json.loads(result.stdout.decode("utf-8"))}  # strict UTF-8
    inbox = os.fsencode(tmp_path / "in")
    assert rows[inbox + b"/fifo.jpg"]["error"] == "not a regular file (a FIFO)"
    assert rows[inbox + b"/broken.jpg"]["error"].startswith("cannot decode image")
    assert len(rows[latin1]["top"]) == 1 and len(rows[inbox + b"/ok.png"]["top"]) == 1
