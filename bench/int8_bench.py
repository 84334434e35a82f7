"""fp32 vs int8 extraction: engine alone, `extract` end to end, the int8 gate and head accuracy.

Per backbone (default: ResNet50 with random weights, EfficientNet-Lite0 with its ImageNet weights):
1. one ``extract --engine onnx-int8`` run on ``--gate-shard`` quantizes and gates the engine (once; its
   verdict, cosine and time are recorded), then fp32 (``--engine auto``) and int8 ``extract`` runs
   alternate, each a fresh process on an empty store over ``--shard`` of the folder (``all``: the whole
   folder): whole-process wall and CPU time, the decode+inference+write loop's rate, and the fixed
   costs (start-up, scan, hashing, final commit: the whole process less the loop);
2. after each fp32 + int8 pair of runs (so that changing load hits all alike), the two engines alone on
   up to ``--alone-images`` of the shard's pre-decoded tensors, three ways:
   as ``extract`` runs them (``extract.streams``: several batches at once), one batch at a time on
   every core (onnxruntime's usual way), and on one thread (images per CPU-second: the cost that
   load from other processes changes least);
3. head accuracy from the fp32 and int8 stores of the last speed run: the tool's softmax head fitted
   on the train + validation rows, its 5-fold cross-validation accuracy there (``cv_accuracy_``) and
   its accuracy on the test split; with ``--test-heads`` the same for every ``--accuracy-data`` folder,
   extracted whole (backbones with real weights only: random weights make accuracy say little);
4. for backbones with real weights, the int8 gate on every data set: k-fold accuracy of a
   logistic-regression head on fp32 vs int8 features of up to 600 of its images.
fp32 and int8 measurements alternate so that load from other processes hits both alike.

Example:
    python bench/int8_bench.py --data ../shared/datasets/trashnet --shard all --repeats 2 --test-heads
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

from bench.common import ROOT, default_data, fmt, header, spread, write_results  # noqa: E402
from bench.extract_bench import decoded_tensors, run_cli_extract  # noqa: E402
from extract.defaults import DEFAULT_BATCH_SIZE, DEFAULT_TOLERANCE  # noqa: E402

BACKBONES = (("resnet50", "none"), ("efficientnet_lite0", "imagenet"))
PRECISIONS = {"fp32": "auto", "int8": "onnx-int8"}
# every int8 run of the benchmark measures int8, even where the gate would refuse it (its verdict at the
# default tolerance is reported beside): a refused engine would silently give fp32 numbers
FORCED = ("--tolerance", "100")


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


ARRANGEMENTS = ("streams", "one batch", "one thread")  # how the engines alone are run (see the docstring)


def _arrangement(name: str) -> tuple[int, int]:
    """(batches at once, intra-op threads each) of an engines-alone arrangement."""
    from extract.engine import default_threads
    from extract.streams import stream_plan

    return {"streams": stream_plan(), "one batch": (1, default_threads()), "one thread": (1, 1)}[name]


def _pass_rates(engine, tensors, batch: int, streams: int) -> tuple[float, float]:
    """Images per second of wall time and of this process's CPU time of one pass over ``tensors``."""
    from extract.streams import run_in_streams

    batches = (tensors[i:i + batch] for i in range(0, len(tensors), batch))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in run_in_streams(engine, batches, streams):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(tensors) / max(wall, 1e-9), len(tensors) / max(cpu, 1e-9)


class EnginesAlone:
    """Both engines on the same pre-decoded tensors, every arrangement; ``measure`` adds one repeat (a pass
    of each engine in turn) to ``rates``: ``{arrangement: {precision: {"rate": [...], "cpu_rate": [...]}}}``."""

    def __init__(self, files: dict[str, Path], tensors, batch: int):
        from extract.engine import OnnxEngine

        self.tensors, self.batch, self.engines = tensors, batch, {}
        for name in ARRANGEMENTS:
            threads = _arrangement(name)[1]
            for precision in ("fp32", "int8"):
                if (precision, threads) not in self.engines:
                    self.engines[(precision, threads)] = engine = OnnxEngine(None, threads, path=files[precision])
                    engine(tensors[:batch])  # warm-up
        self.rates = {name: {p: {"rate": [], "cpu_rate": []} for p in ("fp32", "int8")} for name in ARRANGEMENTS}

    def measure(self) -> None:
        for name in ARRANGEMENTS:
            streams, threads = _arrangement(name)
            for precision in ("fp32", "int8"):
                rate, cpu_rate = _pass_rates(self.engines[(precision, threads)], self.tensors, self.batch, streams)
                self.rates[name][precision]["rate"].append(rate)
                self.rates[name][precision]["cpu_rate"].append(cpu_rate)


def store_accuracy(store: Path, name: str) -> dict:
    """The tool's softmax head on the ``name`` features of ``store``: fitted on the train + validation
    rows, its 5-fold cross-validation accuracy there (at the C it chose) and its test-split accuracy."""
    from classify.heads import make_head
    from extract.store import FeatureStore

    features = FeatureStore(store).read(name)
    labelled = features.splits != "test"
    head = make_head("softmax", seed=0).fit(features.features[labelled], features.labels[labelled])
    X_test, y_test = features.subset("test")
    return {"backbone_name": name, "labelled_images": int(labelled.sum()), "test_images": int(len(y_test)),
            "cv_accuracy": float(head.cv_accuracy_[f"C={head.C_:g}"]),
            "test_accuracy": float((head.predict(X_test) == y_test).mean()) if len(y_test) else float("nan")}


def _speed_runs(data: str, backbone: str, weights: str, batch: int, repeats: int, shard: str | None,
                gate_shard: str, forced: tuple[str, ...], alone_images: int) -> tuple[dict, dict, dict, dict]:
    """The warm-up (quantizing) run; then per repeat an fp32 and an int8 `extract` and the engines alone
    (so that changing load hits all alike); and the head accuracy of the last run's stores (real weights
    only). Returns (warm-up run, runs by precision, engines-alone rates, accuracy by precision)."""
    with tempfile.TemporaryDirectory() as tmp:
        warm = run_cli_extract(data, Path(tmp) / "warm.h5", backbone, weights, batch, "onnx-int8", gate_shard,
                               forced)
        alone = EnginesAlone(engine_files(data, backbone, weights),
                             decoded_tensors(data, 224, limit=alone_images, shard=shard), batch)
        runs = {"fp32": [], "int8": []}
        for i in range(repeats):
            for precision, engine in PRECISIONS.items():
                store = Path(tmp) / f"{precision}{i}.h5"
                runs[precision].append({**run_cli_extract(data, store, backbone, weights, batch, engine, shard,
                                                          forced), "store": store})
            alone.measure()
        # random weights: lbfgs crawls on their features and the accuracy says little (the gate covers them)
        accuracy = {} if weights == "none" else {p: store_accuracy(rs[-1]["store"], rs[-1]["backbone"])
                                                 for p, rs in runs.items()}
    return warm, runs, alone.rates, accuracy


def speed(data: str, backbone: str, weights: str, batch: int, repeats: int, shard: str | None,
          gate_shard: str = "0/64", alone_images: int = 256) -> dict:
    """fp32 vs int8 `extract` runs, engines alone and head accuracy (``_speed_runs``), summarised."""
    warm, runs, alone, accuracy = _speed_runs(data, backbone, weights, batch, repeats, shard, gate_shard, FORCED,
                                              alone_images)
    files = engine_files(data, backbone, weights)
    result = {"images": runs["fp32"][0]["images"], "first_int8_wall": warm["wall_seconds"],
              "warm_notes": warm["notes"], "engines": {}, "accuracy": accuracy,
              "alone_images": min(alone_images, runs["fp32"][0]["images"]), "gate_shard": gate_shard,
              "gate": json.loads(files["report"].read_text())}
    for precision, rs in runs.items():
        loop = spread([r["loop_rate"] for r in rs])
        engine_alone = spread(alone["streams"][precision]["rate"])
        result["engines"][precision] = {
            "engine": rs[0]["engine"], "backbone_name": rs[0]["backbone"],
            "extract_wall": spread([r["wall_seconds"] for r in rs]),
            "extract_rate": spread([r["images"] / r["wall_seconds"] for r in rs]),
            "extract_cpu_rate": spread([r["images"] / r["cpu_seconds"] for r in rs]),
            "fixed_seconds": spread([r["wall_seconds"] - r["images"] / r["loop_rate"] for r in rs]),
            "loop_rate": loop, "engine_alone_rate": engine_alone,
            "engine_alone_cpu_rate": spread(alone["streams"][precision]["cpu_rate"]),
            "one_batch_rate": spread(alone["one batch"][precision]["rate"]),
            "one_thread_cpu_rate": spread(alone["one thread"][precision]["cpu_rate"]),
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
    """``store_accuracy`` of fp32 and of int8 features of the whole folder (extracted here)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, engine in PRECISIONS.items():
            run = run_cli_extract(data, Path(tmp) / f"{precision}.h5", backbone, weights, batch, engine,
                                  extra=FORCED)
            out[precision] = store_accuracy(Path(tmp) / f"{precision}.h5", run["backbone"])
    return out


def _verdict(gate: dict) -> str:
    return "accepted" if gate["drop_points"] <= DEFAULT_TOLERANCE else "refused"


LOADED_FROM = 0.5  # load average per core before the run above which the machine counts as shared


def _load_note(r: dict) -> str:
    load = f"load average {r['load_before']:.1f} before, {r['load_after']:.1f} after on {r['cores']} cores"
    if r["load_before"] <= LOADED_FROM * r["cores"]:
        return f"The machine was otherwise idle ({load}; the benchmark's own threads make the load after)."
    return (f"**The machine was shared with other jobs while this ran** ({load}): wall-clock rates are "
            f"depressed and noisy, and under such load they are bound by thread scheduling more than by "
            f"arithmetic; CPU time (all threads) is inflated too, by onnxruntime threads spinning while they "
            f"wait for descheduled peers. The engines on one thread (no peers to wait for) give the "
            f"load-independent cost: images per CPU-second.")


def _row(label: str, f: dict, q: dict, key: str, unit: str = "x") -> str:
    ratio = q[key]["median"] / f[key]["median"]
    return f"| {label} | {fmt(f[key])} | {fmt(q[key])} | {ratio:.2f}{unit} |"


def _speed_table(s: dict) -> list[str]:
    f, q = s["engines"]["fp32"], s["engines"]["int8"]
    return [
        "| | fp32 | int8 | int8 / fp32 |", "|---|---|---|---|",
        _row("`extract` whole process (images/s)", f, q, "extract_rate"),
        _row("`extract` loop: decode + infer + write (images/s)", f, q, "loop_rate"),
        _row(f"engine alone as `extract` runs it, {s['alone_images']} pre-decoded images (images/s)", f, q,
             "engine_alone_rate"),
        _row("engine alone, one batch at a time on every core (images/s)", f, q, "one_batch_rate"),
        _row("`extract` whole process (images per CPU-second)", f, q, "extract_cpu_rate"),
        _row("engine alone as `extract` runs it (images per CPU-second)", f, q, "engine_alone_cpu_rate"),
        _row("engine alone on 1 thread (images per CPU-second)", f, q, "one_thread_cpu_rate"),
        f"| `extract` fixed costs: start-up, scan, hashing, commit (s) | {fmt(f['fixed_seconds'], 2)} | "
        f"{fmt(q['fixed_seconds'], 2)} | |",
        f"| loop / engine alone as `extract` runs it | {f['loop_over_alone']:.0%} | {q['loop_over_alone']:.0%} | |",
        f"| loop / engine alone, one batch on every core | "
        f"{f['loop_rate']['median'] / f['one_batch_rate']['median']:.0%} | "
        f"{q['loop_rate']['median'] / q['one_batch_rate']['median']:.0%} | |",
        f"| features stored as, engine | `{f['backbone_name']}`, {f['engine']} | "
        f"`{q['backbone_name']}`, {q['engine']} | |",
        "",
    ]


def _accuracy_line(data: str, acc: dict) -> str:
    fa, qa = acc["fp32"], acc["int8"]
    return (f"- softmax head on {data} ({fa['labelled_images']} train + validation images, {fa['test_images']} "
            f"test images): 5-fold CV accuracy {100 * fa['cv_accuracy']:.2f}% from fp32 features vs "
            f"{100 * qa['cv_accuracy']:.2f}% from `{qa['backbone_name']}` "
            f"({100 * (fa['cv_accuracy'] - qa['cv_accuracy']):+.2f} points lost); test accuracy "
            f"{100 * fa['test_accuracy']:.2f}% vs {100 * qa['test_accuracy']:.2f}% "
            f"({100 * (fa['test_accuracy'] - qa['test_accuracy']):+.2f} points lost)")


def _gate_lines(b: dict) -> list[str]:
    s, g = b["speed"], b["speed"]["gate"]
    lines = [f"- gate ({g['folds']}-fold logistic regression on {g['gate_images']} images of the whole folder, "
             f"{g['calibration_images']} of them calibrating): accuracy {100 * g['accuracy_fp32']:.1f}% fp32 vs "
             f"{100 * g['accuracy_int8']:.1f}% int8 ({g['drop_points']:+.1f} points lost); feature cosine to fp32 "
             f"{g['cosine_mean']:.3f} (min {g['cosine_min']:.3f}); quantizing took {g['quantize_seconds']:.0f} s "
             f"when the engine was made; this run's first int8 `extract` (shard {s.get('gate_shard', '?')}) took "
             f"{s['first_int8_wall']:.0f} s, "
             + ("the engine cached before it." if any(n.endswith("(cached)") for n in s["warm_notes"])
                else "quantizing and gating included.")]
    lines.append("- the int8 runs pass `--tolerance 100`, so that int8 is measured even where the gate would "
                 "refuse it" + (" (with random weights the gate judges noise)" if b["weights"] == "none" else "")
                 + "; at the default 0.5 the verdict is: " + _verdict(g))
    for data, g in b.get("gates", {}).items():
        lines.append(f"- gate on {data}: {g['folds']}-fold logistic-regression accuracy on {g['gate_images']} "
                     f"images, {100 * g['accuracy_fp32']:.1f}% from fp32 features vs "
                     f"{100 * g['accuracy_int8']:.1f}% from int8 ({g['drop_points']:+.1f} points lost); "
                     f"cosine {g['cosine_mean']:.3f} (min {g['cosine_min']:.3f}); at the default 0.5: {_verdict(g)}")
    return lines


def to_markdown(r: dict) -> str:
    where = "the whole folder" if r["shard"] == "all" else f"shard {r['shard']}"
    lines = [header("int8 vs fp32 extraction"),
             f"Batch {r['batch']}; speed on {where} of {Path(r['data']).name}; medians (min–max) of "
             f"{r['repeats']} alternating runs. {_load_note(r)}\n"]
    for name, b in r["backbones"].items():
        s = b["speed"]
        lines += [f"### {name} (weights {b['weights']}), {s['images']} images", "", *_speed_table(s),
                  *_gate_lines(b)]
        accuracy = {f"{Path(r['data']).name} ({where})": s["accuracy"]} if s["accuracy"] else {}
        for data, acc in {**accuracy, **b.get("accuracy", {})}.items():
            lines.append(_accuracy_line(data, acc))
        if b["weights"] == "none":
            lines.append("- random weights: the softmax head is not fitted on them (its solver crawls on random "
                         "features, and their accuracy says little); the gate above compares fp32 and int8 on "
                         "them, the backbones with real weights give the accuracy that matters.")
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
    parser.add_argument("--shard", default="0/4", help="part of --data the speed runs extract: I/N, or all")
    parser.add_argument("--alone-images", type=int, default=256, help="pre-decoded images the engines alone run on")
    parser.add_argument("--gate-shard", default="0/64", help="part of each folder extracted by the run that "
                        "quantizes and gates its engine (the gate itself uses images of the whole folder)")
    parser.add_argument("--test-heads", action="store_true", help="also extract every other accuracy folder whole, "
                        "fp32 and int8, and score the softmax head on it (backbones with real weights)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "int8.md"))
    args = parser.parse_args()
    if not args.data:
        parser.error("--data is required when ../shared/datasets is absent")
    batch = args.batch_size or DEFAULT_BATCH_SIZE
    shard = None if args.shard == "all" else args.shard
    others = args.accuracy_data or [d for d in [default_data("fruits")] if d]
    result = {"data": args.data, "batch": batch, "repeats": args.repeats, "shard": args.shard,
              "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0], "backbones": {}}
    for item in args.backbones.split(","):
        backbone, weights = item.split(":")
        entry = {"weights": weights, "speed": speed(args.data, backbone, weights, batch, args.repeats, shard,
                                                    args.gate_shard, args.alone_images)}
        if weights != "none":
            entry["gates"] = {Path(d).name: gate_on(d, backbone, weights, batch, args.gate_shard)
                              for d in [args.data, *others]}
        if weights != "none" and args.test_heads:
            entry["accuracy"] = {Path(d).name: head_accuracy(d, backbone, weights, batch) for d in others}
        result["backbones"][backbone] = entry
        result["load_after"] = os.getloadavg()[0]
        write_results(args.out, to_markdown(result), result)  # after each backbone: a cut-short run still reports


if __name__ == "__main__":
    main()
