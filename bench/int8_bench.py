"""fp32 vs int8 extraction: engine alone, `extract` end to end, the int8 gate and head accuracy.

Per backbone (default: ResNet50 with random weights, EfficientNet-Lite0 with its ImageNet weights):
1. one ``extract --engine onnx-int8`` run quantizes and gates the engine (once; its verdict, cosine
   and time are recorded), then fp32 (``--engine auto``) and int8 ``extract`` runs alternate, each a
   fresh process on an empty store over one shard of the folder (whole-process wall time and the
   decode+inference+write loop's rate);
2. the two engines alone on the shard's pre-decoded tensors, batch by batch in turn;
3. for backbones with real weights (random weights make accuracy meaningless), the int8 gate on
   every data set: k-fold accuracy of a logistic-regression head on fp32 vs int8 features of up to
   600 of its images (calibration + validation split); with ``--test-heads`` also the tool's softmax
   head fitted on fp32 and on int8 features of the whole folder (train + validation) and scored on
   its test split.
fp32 and int8 measurements alternate so that load from other processes hits both alike.

Example:
    python bench/int8_bench.py --data ../shared/datasets/trashnet --accuracy-data ../shared/datasets/fruits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, default_data, fmt, header, spread, write_section  # noqa: E402
from bench.extract_bench import decoded_tensors, run_cli_extract  # noqa: E402
from extract.defaults import DEFAULT_BATCH_SIZE, DEFAULT_TOLERANCE  # noqa: E402

BACKBONES = (("resnet50", "none"), ("efficientnet_lite0", "imagenet"))
PRECISIONS = {"fp32": "auto", "int8": "onnx-int8"}


def engine_files(data: str, backbone: str, weights: str) -> dict[str, Path]:
    """The cached fp32 and int8 engine files of ``backbone`` for ``data`` (after the warm-up run)."""
    from extract.backbones import get_backbone
    from extract.dataset import discover
    from extract.engine import onnx_engine_path
    from extract.int8 import plan_gate
    from extract.record import BackboneRecord
    from extract.weights import resolve_weights

    spec = get_backbone(backbone)
    resolved = resolve_weights(spec, weights)
    plan = plan_gate(discover(data), spec.name, resolved.weights_id, spec.input_size)
    fp32 = onnx_engine_path(BackboneRecord.create(spec, resolved.record(), spec.input_size))
    return {"fp32": fp32, "int8": plan.engine_path,
            "report": plan.report_path}


def engines_alone(files: dict[str, Path], tensors, batch: int, threads: int | None = None):
    """Images per second of wall time and of CPU time of both engines on the same tensors, in turn."""
    from extract.engine import OnnxEngine
    from extract.int8 import _run_both

    fp32, int8 = (OnnxEngine(None, threads, path=files[k]) for k in ("fp32", "int8"))
    _run_both(fp32, int8, tensors[:batch], batch)  # warm-up
    return _run_both(fp32, int8, tensors, batch)[2:]


def speed(data: str, backbone: str, weights: str, batch: int, repeats: int, shard: str) -> dict:
    """``tolerance`` is lifted for random weights: their gate measures noise, and speed is the question."""
    forced = ("--tolerance", "100") if weights == "none" else ()
    with tempfile.TemporaryDirectory() as tmp:
        warm = run_cli_extract(data, Path(tmp) / "warm.h5", backbone, weights, batch, "onnx-int8", shard, forced)
        runs = {"fp32": [], "int8": []}
        for i in range(repeats):
            for precision, engine in PRECISIONS.items():
                runs[precision].append(run_cli_extract(data, Path(tmp) / f"{precision}{i}.h5", backbone, weights,
                                                       batch, engine, shard, forced))
    files = engine_files(data, backbone, weights)
    tensors = decoded_tensors(data, 224, shard=shard)
    alone = [engines_alone(files, tensors, batch) for _ in range(repeats)]
    # one thread: no waiting on descheduled peers, so CPU time is the arithmetic, even on a busy machine
    single = [engines_alone(files, tensors, batch, threads=1)[1] for _ in range(repeats)]
    result = {"images": warm["images"], "first_int8_wall": warm["wall_seconds"], "warm_notes": warm["notes"],
              "forced": bool(forced), "engines": {}, "gate": json.loads(files["report"].read_text())}
    for precision, rs in runs.items():
        loop = spread([r["loop_rate"] for r in rs])
        engine_alone = spread([a[0][precision] for a in alone])
        result["engines"][precision] = {
            "engine": rs[0]["engine"], "backbone_name": rs[0]["backbone"],
            "extract_wall": spread([r["wall_seconds"] for r in rs]),
            "extract_rate": spread([r["images"] / r["wall_seconds"] for r in rs]),
            "extract_cpu_rate": spread([r["images"] / r["cpu_seconds"] for r in rs]),
            "loop_rate": loop, "engine_alone_rate": engine_alone,
            "engine_alone_cpu_rate": spread([a[1][precision] for a in alone]),
            "one_thread_cpu_rate": spread([one[precision] for one in single]),
            "loop_over_alone": loop["median"] / engine_alone["median"],
        }
    return result


def gate_on(data: str, backbone: str, weights: str, batch: int, shard: str) -> dict:
    """The gate report for ``data`` (quantizing and gating its engine if not cached): k-fold accuracy
    of a logistic-regression head on fp32 and int8 features of up to 600 of its images."""
    with tempfile.TemporaryDirectory() as tmp:
        run_cli_extract(data, Path(tmp) / "gate.h5", backbone, weights, batch, "onnx-int8", shard=shard)
    return json.loads(engine_files(data, backbone, weights)["report"].read_text())


def head_accuracy(data: str, backbone: str, weights: str, batch: int) -> dict:
    """Test accuracy of the softmax head on fp32 and on int8 features of the whole folder."""
    from classify.heads import make_head
    from extract.store import FeatureStore

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, engine in PRECISIONS.items():
            store = Path(tmp) / f"{precision}.h5"
            run = run_cli_extract(data, store, backbone, weights, batch, engine)
            features = FeatureStore(store).read(run["backbone"])
            labelled = features.splits != "test"
            head = make_head("softmax", seed=0).fit(features.features[labelled], features.labels[labelled])
            X_test, y_test = features.subset("test")
            out[precision] = {"backbone_name": run["backbone"], "test_images": int(len(y_test)),
                              "test_accuracy": float((head.predict(X_test) == y_test).mean())}
    return out


def _verdict(gate: dict) -> str:
    return "accepted" if gate["drop_points"] <= DEFAULT_TOLERANCE else "refused"


def to_markdown(r: dict) -> str:
    lines = [header("int8 vs fp32 extraction"),
             f"Batch {r['batch']}; speed on shard {r['shard']} of {Path(r['data']).name}; medians (min–max) of "
             f"{r['repeats']} alternating runs. **The machine was shared with other jobs while this ran** "
             f"(load average {r['load_before']:.1f} before, {r['load_after']:.1f} after on "
             f"{r['cores']} cores): wall-clock rates are depressed and noisy, and under such load they are "
             f"bound by thread scheduling more than by arithmetic; CPU time (all threads) is inflated too, by "
             f"onnxruntime threads spinning while they wait for descheduled peers. The engines on one thread "
             f"(no peers to wait for) give the load-independent cost: images per CPU-second.\n"]
    for name, b in r["backbones"].items():
        s = b["speed"]
        f, q = s["engines"]["fp32"], s["engines"]["int8"]
        g = s["gate"]
        lines += [
            f"### {name} (weights {b['weights']}), {s['images']} images", "",
            "| | fp32 | int8 | int8 / fp32 |", "|---|---|---|---|",
            f"| engine alone (images/s) | {fmt(f['engine_alone_rate'])} | {fmt(q['engine_alone_rate'])} | "
            f"{q['engine_alone_rate']['median'] / f['engine_alone_rate']['median']:.2f}x |",
            f"| `extract` whole process (images/s) | {fmt(f['extract_rate'])} | {fmt(q['extract_rate'])} | "
            f"{q['extract_rate']['median'] / f['extract_rate']['median']:.2f}x |",
            f"| `extract` loop (images/s) | {fmt(f['loop_rate'])} | {fmt(q['loop_rate'])} | "
            f"{q['loop_rate']['median'] / f['loop_rate']['median']:.2f}x |",
            f"| engine alone (images per CPU-second) | {fmt(f['engine_alone_cpu_rate'])} | "
            f"{fmt(q['engine_alone_cpu_rate'])} | "
            f"{q['engine_alone_cpu_rate']['median'] / f['engine_alone_cpu_rate']['median']:.2f}x |",
            f"| engine alone on 1 thread (images per CPU-second) | {fmt(f['one_thread_cpu_rate'])} | "
            f"{fmt(q['one_thread_cpu_rate'])} | "
            f"{q['one_thread_cpu_rate']['median'] / f['one_thread_cpu_rate']['median']:.2f}x |",
            f"| `extract` whole process (images per CPU-second) | {fmt(f['extract_cpu_rate'])} | "
            f"{fmt(q['extract_cpu_rate'])} | "
            f"{q['extract_cpu_rate']['median'] / f['extract_cpu_rate']['median']:.2f}x |",
            f"| loop / engine alone | {f['loop_over_alone']:.0%} | {q['loop_over_alone']:.0%} | |",
            f"| features stored as, engine | `{f['backbone_name']}`, {f['engine']} | "
            f"`{q['backbone_name']}`, {q['engine']} | |",
            "",
            f"- gate ({g['folds']}-fold logistic regression on {g['gate_images']} images of the whole folder, "
            f"{g['calibration_images']} of them calibrating): accuracy {100 * g['accuracy_fp32']:.1f}% fp32 vs "
            f"{100 * g['accuracy_int8']:.1f}% int8 ({g['drop_points']:+.1f} points lost); feature cosine to fp32 "
            f"{g['cosine_mean']:.3f} (min {g['cosine_min']:.3f}); quantizing took {g['quantize_seconds']:.0f} s, "
            f"the first int8 `extract` (quantize + gate + shard) {s['first_int8_wall']:.0f} s.",
        ]
        if s["forced"]:
            lines.append("- random weights: the gate judges noise, so the int8 runs pass `--tolerance 100`; "
                         "at the default 0.5 the verdict is: " + _verdict(g))
        for data, g in b.get("gates", {}).items():
            lines.append(f"- gate on {data}: {g['folds']}-fold logistic-regression accuracy on {g['gate_images']} "
                         f"images, {100 * g['accuracy_fp32']:.1f}% from fp32 features vs "
                         f"{100 * g['accuracy_int8']:.1f}% from int8 ({g['drop_points']:+.1f} points lost); "
                         f"cosine {g['cosine_mean']:.3f} (min {g['cosine_min']:.3f})")
        for data, acc in b.get("accuracy", {}).items():
            fa, qa = acc["fp32"], acc["int8"]
            lines.append(f"- softmax head test accuracy on {data} ({fa['test_images']} test images): "
                         f"{100 * fa['test_accuracy']:.2f}% from fp32 features vs {100 * qa['test_accuracy']:.2f}% "
                         f"from `{qa['backbone_name']}` features "
                         f"({100 * (fa['test_accuracy'] - qa['test_accuracy']):+.2f} points lost)")
        if b["weights"] == "none":
            lines.append("- random weights: head accuracy says nothing here; it is measured on the backbones "
                         "with real weights.")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data("trashnet"), help="speed folder (default: ../shared trashnet)")
    parser.add_argument("--accuracy-data", action="append", default=None,
                        help="extra folders for head accuracy (repeatable; default: ../shared fruits)")
    parser.add_argument("--backbones", default=",".join(f"{b}:{w}" for b, w in BACKBONES),
                        help="comma-separated BACKBONE:WEIGHTS")
    parser.add_argument("--batch-size", type=int, default=None, help="[default: extract's default]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard", default="0/4", help="part of --data the speed runs extract")
    parser.add_argument("--gate-shard", default="0/64", help="part of each accuracy folder extracted by the run "
                        "that quantizes and gates its engine (the gate itself uses images of the whole folder)")
    parser.add_argument("--test-heads", action="store_true", help="also extract every accuracy folder whole, "
                        "fp32 and int8, and score the softmax head on its test split (slow)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "int8.md"))
    args = parser.parse_args()
    if not args.data:
        parser.error("--data is required when ../shared/datasets is absent")
    batch = args.batch_size or DEFAULT_BATCH_SIZE
    accuracy_data = [args.data] + (args.accuracy_data or [d for d in [default_data("fruits")] if d])
    result = {"data": args.data, "batch": batch, "repeats": args.repeats, "shard": args.shard,
              "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0], "backbones": {}}
    for item in args.backbones.split(","):
        backbone, weights = item.split(":")
        entry = {"weights": weights, "speed": speed(args.data, backbone, weights, batch, args.repeats, args.shard)}
        if weights != "none":
            entry["gates"] = {Path(d).name: gate_on(d, backbone, weights, batch, args.gate_shard)
                              for d in accuracy_data}
        if weights != "none" and args.test_heads:
            entry["accuracy"] = {Path(d).name: head_accuracy(d, backbone, weights, batch) for d in accuracy_data}
        result["backbones"][backbone] = entry
        result["load_after"] = os.getloadavg()[0]
        write_section(args.out, to_markdown(result))  # after each backbone: a cut-short run still reports
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
