"""Peak memory (RSS) of each command of the workflow, measured with ``/usr/bin/time -v``.

Runs the demo's workflow on its generated images (or on ``--images DIR``), in a temporary folder,
plus the steps the demo skips (int8 export, fine-tuning, predict), each in a fresh process, and
writes ``docs/bench/memory.md`` and ``docs/bench/memory.json``: what a machine needs to run them.

    python bench/memory.py                       # the demo's 120 generated images
    python bench/memory.py --images ../shared/datasets/fruits
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, header, shown_path, write_section  # noqa: E402

TIME = "/usr/bin/time"


def timed_command(args: list[str], cwd: Path) -> dict:
    """``python ARGS`` in a fresh process under ``/usr/bin/time -v``: its peak RSS (MiB), wall and CPU
    (user + system) seconds, and its stdout; a failure raises RuntimeError with the end of its stderr."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as usage:
        done = subprocess.run([TIME, "-v", "-o", usage.name, sys.executable, *args], cwd=cwd, capture_output=True,
                              text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        report = usage.read()
    if done.returncode:
        raise RuntimeError(f"`python {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-2000:]}")

    def figure(label: str) -> str:
        return re.search(rf"{re.escape(label)}: ([\d:.]+)", report).group(1)

    clock = figure("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    return {"peak_rss_mib": int(figure("Maximum resident set size (kbytes)")) / 1024,
            "wall_seconds": sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":")))),
            "cpu_seconds": float(figure("User time (seconds)")) + float(figure("System time (seconds)")),
            "stdout": done.stdout}


def peak_rss_mib(args: list[str], cwd: Path) -> tuple[float, float]:
    """Peak RSS in MiB and wall seconds of ``python ARGS`` (``/usr/bin/time -v``'s figures)."""
    usage = timed_command(args, cwd)
    return usage["peak_rss_mib"], usage["wall_seconds"]


def steps(images: Path, work: Path) -> list[tuple[str, list[str]]]:
    cli, w = str(ROOT / "cli.py"), str(work)
    return [
        ("extract (efficientnet_lite0)", [cli, "extract", str(images), "--store", f"{w}/f.h5",
                                          "--backbone", "efficientnet_lite0", "--quiet"]),
        ("fit-head --kind all", [cli, "fit-head", "--store", f"{w}/f.h5", "--kind", "all", "--out", f"{w}/head",
                                 "--quiet"]),
        ("evaluate", [cli, "evaluate", "--store", f"{w}/f.h5", "--head", f"{w}/head", "--report-dir", f"{w}/r"]),
        ("export-onnx", [cli, "export-onnx", "--store", f"{w}/f.h5", "--head", f"{w}/head", "--out",
                         f"{w}/model.onnx", "--quiet"]),
        ("edge --once", ["-m", "edge", "--model", f"{w}/model.onnx", "--watch", str(images), "--results",
                         f"{w}/results.jsonl", "--once"]),
        ("export-onnx --quantize int8 --tolerance 100",  # memory is measured here, not the accuracy kept
         [cli, "export-onnx", "--store", f"{w}/f.h5", "--head", f"{w}/head", "--out", f"{w}/q.onnx",
          "--quantize", "int8", "--tolerance", "100", "--quiet"]),
        ("fine-tune (1 epoch, --unfreeze 20)", [cli, "fine-tune", str(images), "--head", f"{w}/head", "--store",
                                               f"{w}/f.h5", "--out", f"{w}/ft.keras", "--epochs", "1", "--quiet",
                                               "--no-cache-front"]),  # the end-to-end mode this row names
        ("predict (cached engine, 1 image)", [cli, "predict", "--head", f"{w}/head", "--quiet",
                                             str(next(p for p in sorted(images.rglob("*")) if p.is_file()))]),
    ]


DEMO_STEPS = ("extract (efficientnet_lite0)", "fit-head --kind all", "evaluate", "export-onnx", "edge --once")


def measure(images: Path) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tk-memory-") as tmp:
        for name, args in steps(images, Path(tmp)):
            mib, seconds = peak_rss_mib(args, ROOT)
            rows.append({"step": name, "peak_rss_mib": round(mib, 1), "wall_seconds": round(seconds, 1)})
            print(f"{name}: {mib:.0f} MiB, {seconds:.1f} s", file=sys.stderr)
    demo = max(r["peak_rss_mib"] for r in rows if r["step"] in DEMO_STEPS)
    return {"images": shown_path(images), "image_count": sum(1 for p in images.rglob("*") if p.is_file()),
            "steps": rows, "demo_peak_rss_mib": demo}


def to_markdown(result: dict) -> str:
    lines = [header("Peak memory per command"),
             f"Images: `{result['images']}` ({result['image_count']} files). Peak resident memory of each "
             f"command in a fresh process (`/usr/bin/time -v`, maximum resident set size); the demo "
             f"(`scripts/demo.sh`: extract, fit-head, evaluate, export-onnx, edge) peaks at "
             f"{result['demo_peak_rss_mib']:.0f} MiB.", "",
             "| command | peak RSS (MiB) | wall s |", "|---|---:|---:|"]
    lines += [f"| `{r['step']}` | {r['peak_rss_mib']:.0f} | {r['wall_seconds']:.1f} |" for r in result["steps"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None,
                        help="class-folder image set [default: the demo's 120 generated images]")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "memory.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tk-demo-images-") as tmp:
        images = args.images
        if images is None:
            images = Path(tmp) / "images"
            subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_images.py"), str(images), "--per-class",
                            "40"], check=True, cwd=ROOT)
        result = measure(images)
    if args.images is None:
        result["images"] = "scripts/demo_images.py --per-class 40 (generated, 120 images)"
    write_section(args.out, to_markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
