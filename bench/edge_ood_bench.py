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


def inference_alone(variants: dict[str, Path], images: np.ndarray, threads: int, batch: int) -> dict[str, dict]:
    """Images/s and CPU ms per image of ``predict_scores`` for each variant over ``images``, the
    variants alternating batch by batch (in turns of order), so a change in machine load hits both alike."""
    models = {name: load_model(path, threads) for name, path in variants.items()}
    wall = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    for turn, start in enumerate(range(0, len(images), batch)):
        chunk = images[start : start + batch]
        for name in (list(models) if turn % 2 == 0 else list(models)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()  # only this call runs (threads do not spin)
            models[name].predict_scores(chunk)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    return {name: {"images_per_s": len(images) / wall[name], "cpu_ms_per_image": 1000 * cpu[name] / len(images),
                   "images": len(images)} for name in models}


def measure(variants: dict[str, Path], images_folder: Path, threads: int, batch: int, repeats: int,
            limit: int) -> tuple[dict, dict]:
    """Per variant, the list of inference-alone and runner measurements, ``repeats`` each."""
    pixels = decoded(_files(images_folder), load_model(variants["without"], threads).input_size, limit)
    alone: dict[str, list[dict]] = {name: [] for name in variants}
    runner: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(repeats):  # interleaved: a change in machine load hits both variants alike
        for name, run in inference_alone(variants, pixels, threads, batch).items():
            alone[name].append(run)
        for name, path in (variants.items() if repeat % 2 == 0 else list(variants.items())[::-1]):
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
    """Median over repeats of the paired relative change with the score (each repeat ran both variants)."""
    with_, without = table["with ood_score"], table["without"]
    rate = [w["images_per_s"] / b["images_per_s"] - 1 for w, b in zip(with_, without)
            if w["images_per_s"] and b["images_per_s"]]
    cpu = [w["cpu_ms_per_image"] / b["cpu_ms_per_image"] - 1 for w, b in zip(with_, without)]
    return {"images_per_s_change": statistics.median(rate) if rate else None,
            "cpu_per_image_change": statistics.median(cpu)}


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
        "| measurement | with ood_score | without | change with the score |", "|---|--:|--:|--:|",
    ]
    for label, title in (("inference", "inference alone"), ("runner", "runner, steady")):
        part, cost = r[label], r[label]["cost"]
        rate = cost["images_per_s_change"]
        lines.append(f"| {title}: images/s | {fmt(part['with ood_score']['images_per_s'])} | "
                     f"{fmt(part['without']['images_per_s'])} | {'n/a' if rate is None else f'{rate:+.1%}'} |")
        lines.append(f"| {title}: CPU ms per image | {fmt(part['with ood_score']['cpu_ms_per_image'], 2)} | "
                     f"{fmt(part['without']['cpu_ms_per_image'], 2)} | {cost['cpu_per_image_change']:+.1%} |")
    lines += ["", "Change with the score: median over repeats of the paired relative difference (inference alone: "
              "the two models alternate batch by batch; the runner: back-to-back processes, in turns of order). "
              "Goal (issue 17): at most 5 % fewer images/s, i.e. a change of -5 % or better."]
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
        result = compare(model.resolve(), label, Path(images), args.threads, args.batch_size,
                         args.repeats, args.limit)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
