"""bench/memory.py: the peak-RSS measurement it relies on, and its markdown."""

from __future__ import annotations

from pathlib import Path

from bench.memory import peak_rss_mib, to_markdown


def test_peak_rss_is_read_from_time_v(tmp_path):
    small, _ = peak_rss_mib(["-c", "pass"], tmp_path)
    big, seconds = peak_rss_mib(["-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"], tmp_path)
    assert 150 < big - small < 260 and seconds >= 0


def test_markdown_names_every_step_and_the_demo_peak():
    result = {"images": "../shared/datasets/fruits", "image_count": 3, "demo_peak_rss_mib": 700.0,
              "steps": [{"step": "extract (efficientnet_lite0)", "peak_rss_mib": 700.0, "wall_seconds": 4.0},
                        {"step": "fine-tune (1 epoch, --unfreeze 20)", "peak_rss_mib": 2500.4, "wall_seconds": 9.0}]}
    text = to_markdown(result)
    assert "peaks at 700 MiB" in text and "| `fine-tune (1 epoch, --unfreeze 20)` | 2500 | 9.0 |" in text
    assert Path("../shared/datasets/fruits").as_posix() in text
