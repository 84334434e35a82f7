"""The loop from the edge back to a new model, on real photos: unknown images and retrain.

A copy of one data set (default the fruits) is made with every ``--holdout``-th photo of each class
moved out into a sorted review folder (as a person would sort the edge runner's ``--review``
folder); ``--unknown-images`` photos of another data set (default TrashNet) are the unknown images.
Then, all through the CLI: ``extract``, ``fit-head --kind softmax``, ``export-onnx --quantize int8``,
``evaluate --ood`` for the head, the float model and the int8 model (AUROC, unknowns flagged,
in-class test images flagged at each model's own threshold), and ``retrain`` with the review folder
(images computed, old vs new accuracy, seconds).

Example:
    python bench/loop_bench.py --data ../shared/datasets/fruits --unknown ../shared/datasets/trashnet
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, default_data, header, write_results  # noqa: E402
from extract.dataset import walk_image_files  # noqa: E402


def cli(work: Path, *args: str) -> tuple[float, str]:
    """Seconds and stdout of ``python cli.py ARGS`` run in ``work``; stops the benchmark on failure."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=work, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"python cli.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - started, done.stdout


def prepare(data: Path, unknown: Path, work: Path, holdout: int, unknown_images: int) -> int:
    """photos/ (the data set less every ``holdout``-th photo per class), review/ (those), unknown/; returns
    how many review photos."""
    held = 0
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        for index, rel in enumerate(walk_image_files(class_dir)):
            target = work / ("review" if index % holdout == holdout - 1 else "photos") / class_dir.name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(class_dir / rel, target)
            held += index % holdout == holdout - 1
    others = walk_image_files(unknown)
    step = max(1, len(others) // unknown_images)
    (work / "unknown").mkdir()
    for index, rel in enumerate(others[::step][:unknown_images]):
        shutil.copy(unknown / rel, work / "unknown" / f"{index:04d}{Path(rel).suffix}")
    return held


def run(args: argparse.Namespace, work: Path) -> dict:
    held = prepare(args.data, args.unknown, work, args.holdout, args.unknown_images)
    seconds = {}
    seconds["extract"], _ = cli(work, "extract", "photos", "--store", "features.h5", "--backbone", args.backbone,
                                "--quiet")
    seconds["fit-head"], _ = cli(work, "fit-head", "--store", "features.h5", "--kind", "softmax", "--out", "head",
                                 "--quiet")
    seconds["export-onnx --quantize int8"], _ = cli(work, "export-onnx", "--store", "features.h5", "--head", "head",
                                                    "--out", "model.onnx", "--quantize", "int8", "--tolerance", "5",
                                                    "--quiet")
    ood = {}
    for name, source in (("head", ["--head", "head"]), ("float model", ["--model", "model.onnx"]),
                         ("int8 model", ["--model", "model.int8.onnx"])):
        seconds[f"evaluate --ood ({name})"], out = cli(work, "evaluate", "--store", "features.h5", *source, "--ood",
                                                       "unknown", "--report-dir", f"report-{name[:4]}", "--json",
                                                       "--quiet")
        metrics = json.loads(out)
        ood[name] = {**{k: v for k, v in metrics["ood"].items() if k not in ("unreadable", "folder")},
                     "accuracy": metrics["accuracy"]}
    seconds["retrain"], out = cli(work, "retrain", "--model", "model.onnx", "--review", "review", "--out",
                                  "model-v2.onnx", "--quiet")
    return {"data": os.path.relpath(args.data, ROOT), "unknown": os.path.relpath(args.unknown, ROOT), "backbone": args.backbone,
            "review_images": held, "unknown_images": args.unknown_images, "ood": ood,
            "retrain_output": out.replace(f"{work.resolve()}/", "").splitlines()[:4], "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def to_markdown(result: dict) -> str:
    lines = [header(f"The loop: unknown images and retrain ({result['backbone']}, softmax head)"), "",
             f"Classes of {result['data']} (every photo but the review ones), {result['unknown_images']} photos "
             f"of {result['unknown']} as unknown images. Each model flags at its own threshold (the int8 model's "
             f"is recalibrated by export-onnx: `ood.int8_calibrated_on`).", "",
             "| model | test accuracy | AUROC | unknown images flagged | in-class test images flagged | threshold |",
             "|---|--:|--:|--:|--:|--:|"]
    lines += [f"| {name} | {r['accuracy']:.4f} | {r['auroc']:.4f} | {r['unknown_flagged']:.1%} | "
              f"{r['in_class_flagged']:.1%} | {r['threshold']:.4g} |" for name, r in result["ood"].items()]
    lines += ["", f"`retrain` with {result['review_images']} review photos (held out of the extracted folder):", "",
              "```text", *result["retrain_output"], "```", "", "| step | seconds |", "|---|--:|"]
    lines += [f"| {step} | {value} |" for step, value in result["seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data("fruits"), help="class folders [../shared fruits]")
    parser.add_argument("--unknown", type=Path, default=default_data("trashnet"),
                        help="photos of none of the classes [../shared trashnet]")
    parser.add_argument("--unknown-images", type=int, default=300)
    parser.add_argument("--holdout", type=int, default=8, help="every Nth photo of a class goes to the review folder")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "loop.md")
    args = parser.parse_args(argv)
    if not args.data or not args.unknown:
        parser.error("--data and --unknown are required when ../shared/datasets is absent")
    with tempfile.TemporaryDirectory(prefix="transferkit-loop-") as tmp:
        result = run(args, Path(tmp))
    write_results(args.out, to_markdown(result), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
