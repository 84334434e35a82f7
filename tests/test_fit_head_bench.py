"""bench/fit_head_bench.py on a tiny store: one run of this checkout and of a baseline commit, rendered."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import make_feature_store

from bench.fit_head_bench import run, to_markdown
from classify.heads import HEAD_KINDS

ROOT = Path(__file__).resolve().parents[1]


def test_both_trees_are_measured_and_rendered(tmp_path):
    store = make_feature_store(tmp_path / "features.h5")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = run(store, repeats=1, baseline=head, work=tmp_path)
    assert list(result["results"]) == ["this checkout", f"commit {head}"]
    for res in result["results"].values():
        (one,) = res["runs"]
        assert one["cpu_seconds"] > 0 and one["wall_seconds"] > 0 and one["peak_rss_mib"] > 50
        assert [row["kind"] for row in res["leaderboard"]] == list(HEAD_KINDS)
        assert sum(row["saved"] for row in res["leaderboard"]) == 1
    text = to_markdown({**result, "source": "a test store"}, "test")
    assert text.count("| this checkout") == 2 and f"| commit {head}" in text and "1 runs" in text
