"""What the unknown score costs at the edge: one exported model with and without its ``ood_score`` output.

``export-onnx --store S --head H`` adds ``ood_score`` (a Mahalanobis distance of the backbone features,
``classify/ood_graph.py``) as a second output. The baseline is the same ONNX file with that output,
the nodes only it uses and its ``ood`` metadata removed (``onnx.utils.Extractor``), so the two differ
by the score alone. Measured on the same images, the two variants interleaved in every repeat:

- inference alone: pre-decoded uint8 batches through ``EdgeModel.predict_scores`` in this process,
  images/s (wall) and CPU milliseconds per image (``time.process_time``: every thread of the process);
- the runner: ``python -m edge --once`` in a fresh process over a copy of the folder
  (``bench/edge_bench.run_runner``): steady images/s after the first batch, and CPU milliseconds per
  image from the child's rusage (start-up, hashing, decoding, fsync and moves included).

CPU time per image is the figure to trust on a loaded machine (other processes steal wall time, not
CPU time); the load average is recorded before and after. The issue's goal: at most 5 % fewer
images/s with the score.

Without ``--model``, the model is built from ``--data`` first (extract, fit-head --kind softmax,
export-onnx) in a temporary folder. Example:
    python bench/edge_ood_bench.py --data ../shared/datasets/fruits
    python bench/edge_ood_bench.py --model model.onnx --images ../shared/datasets/fruits --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx.utils  # noqa: E402

from bench.common import ROOT, default_data, fmt, header, run_script, shown_path, spread, write_results  # noqa: E402
from bench.edge_bench import _files, run_runner  # noqa: E402
from edge.imageio import ImageDecodeError, load_image  # noqa: E402
from edge.model import OOD_OUTPUT, load_model  # noqa: E402
from edge.runner import RunnerConfig  # noqa: E402


def without_ood(src: Path, dst: Path) -> Path:
    """``src`` minus the ``ood_score`` output, the nodes and weights only it needs, and its metadata."""
    model = onnx.load(str(src))
    outputs = [o.name for o in model.graph.output if o.name != OOD_OUTPUT]
    if len(outputs) == len(model.graph.output):
        raise ValueError(f"{src} has no {OOD_OUTPUT} output: export it from a store and head")
    pruned = onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input], outputs)
    pruned.ir_version, pruned.producer_name = model.ir_version, model.producer_name
    del pruned.opset_import[:]
    pruned.opset_import.extend(model.opset_import)
    meta = {p.key: p.value for p in model.metadata_props if p.key != "ood"}
    meta["model_id"] = meta.get("model_id", "model") + "-without-ood"
    onnx.helper.set_model_props(pruned, meta)
    onnx.checker.check_model(pruned)
    onnx.save(pruned, str(dst))
    return dst


def build_model(data: Path, work: Path, backbone: str) -> Path:
    """extract + fit-head (softmax) + export-onnx on ``data``: the model every store-and-head user gets."""
    store, head, model = work / "features.h5", work / "head", work / "model.onnx"
    run_script(["cli.py", "extract", str(data), "--store", str(store), "--backbone", backbone, "--quiet"])
    run_script(["cli.py", "fit-head", "--store", str(store), "--kind", "softmax", "--out", str(head), "--quiet"])
    run_script(["cli.py", "export-onnx", "--store", str(store), "--head", str(head), "--out", str(model)])
    return model


def decoded(files: list[str], size: tuple[int, int], limit: int) -> np.ndarray:
    images = []
    for path in files:
        try:
            images.append(load_image(path, size))
        except ImageDecodeError:
            continue
        if len(images) == limit:
            break
    return np.stack(images)


def inference_alone(model_path: Path, images: np.ndarray, threads: int, batch: int) -> dict:
    """Images/s and CPU ms per image of ``predict_scores`` over ``images`` in batches of ``batch``."""
    model = load_model(model_path, threads)
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(images), batch):
        model.predict_scores(images[start : start + batch])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": len(images) / wall, "cpu_ms_per_image": 1000 * cpu / len(images)}


def measure(variants: dict[str, Path], images_folder: Path, threads: int, batch: int, repeats: int,
            limit: int) -> tuple[dict, dict]:
    """Per variant, the list of inference-alone and runner measurements, ``repeats`` each."""
    pixels = decoded(_files(images_folder), load_model(variants["without"], threads).input_size, limit)
    alone: dict[str, list[dict]] = {name: [] for name in variants}
    runner: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved: a change in machine load hits both variants alike
        for name, path in variants.items():
            alone[name].append({**inference_alone(path, pixels, threads, batch), "images": len(pixels)})
            run = run_runner(path, images_folder, threads, batch, poll_seconds=0.2)
            runner[name].append({"images_per_s": run["steady"], "cpu_ms_per_image": 1000 * run["cpu_s"] / run["images"],
                                 "images": run["images"], "model_id": run["model_id"]})
    return alone, runner


def compare(model: Path, model_label: str, images_folder: Path, threads: int, batch: int, repeats: int,
            limit: int) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edge-ood-") as work:
        variants = {"with ood_score": model, "without": without_ood(model, Path(work) / "without-ood.onnx")}
        alone, runner = measure(variants, images_folder, threads, batch, repeats, limit)
    result = {
        "model": model_label,
        "images_folder": shown_path(images_folder), "threads": threads, "batch_size": batch,
        "repeats": repeats, "inference_images": alone["without"][0]["images"],
        "runner_images": runner["without"][0]["images"],
        "model_ids": {name: runs[0]["model_id"] for name, runs in runner.items()},
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "cores": len(os.sched_getaffinity(0)),
    }
    for label, table in (("inference", alone), ("runner", runner)):
        result[label] = {name: {key: spread([run[key] for run in runs if run[key] is not None])
                                for key in ("images_per_s", "cpu_ms_per_image")} for name, runs in table.items()}
        result[label]["cost"] = _cost(table)
    return result


def _cost(table: dict[str, list[dict]]) -> dict:
    """Median over repeats of the paired relative cost of the score (each repeat ran both variants)."""
    with_, without = table["with ood_score"], table["without"]
    rate = [1 - w["images_per_s"] / b["images_per_s"] for w, b in zip(with_, without)
            if w["images_per_s"] and b["images_per_s"]]
    cpu = [w["cpu_ms_per_image"] / b["cpu_ms_per_image"] - 1 for w, b in zip(with_, without)]
    return {"images_per_s_lower_by": statistics.median(rate) if rate else None,
            "cpu_per_image_higher_by": statistics.median(cpu)}


def to_markdown(r: dict) -> str:
    lines = [
        header("Edge cost of the unknown score (ood_score output)"),
        f"Model {r['model']} (`{r['model_ids']['with ood_score']}`) and the same file with `ood_score` pruned, "
        f"{r['threads']} threads, batch {r['batch_size']}, {r['repeats']} interleaved repeats; medians (min–max). "
        f"Inference alone on {r['inference_images']} decoded images of {r['images_folder']}; the runner "
        f"(`python -m edge --once`, fresh process) on all {r['runner_images']} files of it. "
        f"Load average (1 min) {r['load_average_1min']['before']:.1f} before, {r['load_average_1min']['after']:.1f} "
        f"after, on {r['cores']} cores: wall-clock rates are disturbed by other processes, CPU time per image "
        f"much less.\n",
        "| measurement | with ood_score | without | score's cost |", "|---|--:|--:|--:|",
    ]
    for label, title in (("inference", "inference alone"), ("runner", "runner, steady")):
        part, cost = r[label], r[label]["cost"]
        rate_cost = cost["images_per_s_lower_by"]
        lines.append(f"| {title}: images/s | {fmt(part['with ood_score']['images_per_s'])} | "
                     f"{fmt(part['without']['images_per_s'])} | "
                     f"{'n/a' if rate_cost is None else f'{rate_cost:+.1%} fewer'} |")
        lines.append(f"| {title}: CPU ms per image | {fmt(part['with ood_score']['cpu_ms_per_image'], 2)} | "
                     f"{fmt(part['without']['cpu_ms_per_image'], 2)} | {cost['cpu_per_image_higher_by']:+.1%} |")
    lines += ["", "Score's cost: median over repeats of the paired difference (each repeat ran both variants "
              "back to back). Goal (issue 17): at most 5 % fewer images/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data("fruits"),
                        help="image folder to build the model from and to classify (default: ../shared fruits)")
    parser.add_argument("--model", help="an exported model with ood_score (default: built from --data)")
    parser.add_argument("--images", help="folder to classify (default: --data)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=RunnerConfig.batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=512, help="images decoded for the inference-alone loop")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "edge-ood.md"))
    args = parser.parse_args()
    images = args.images or args.data
    if not images or not (args.model or args.data):
        parser.error("--data (or --model and --images) is required when ../shared/datasets is absent")
    with tempfile.TemporaryDirectory(prefix="edge-ood-model-") as tmp:
        model = Path(args.model) if args.model else build_model(Path(args.data), Path(tmp), args.backbone)
        label = (f"`{Path(args.model).name}`" if args.model else
                 f"built from {shown_path(args.data)} ({args.backbone}, softmax head, export-onnx)")
        result = compare(model.resolve(), label, Path(images).resolve(), args.threads, args.batch_size,
                         args.repeats, args.limit)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
