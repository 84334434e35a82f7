"""Export benchmark: Keras vs ONNX float vs ONNX int8, and a head alone vs the fine-tuned model.

On one image folder (or a store + head already made from it):
1. ``extract`` into a store and ``fit-head --kind all`` (the best head on validation is kept);
2. ``export-onnx --quantize int8`` of backbone + head (the int8 file is kept whatever its accuracy,
   to be measured; the table says whether the default 1-point tolerance would have accepted it);
3. on the test split: top-1 accuracy, batch-1 latency and batch-32 throughput (decoding excluded) of
   the Keras model (backbone + the head as Dense layers), the ONNX float and the ONNX int8 models,
   with ``--threads`` threads each;
4. ``fine-tune`` from the head for ``--epochs`` epochs (top ``--unfreeze`` layers), and its test
   accuracy next to the head's.

Runtime on 2 cores with efficientnet_lite0 on the fruits set (1,391 images): about 8 min, most of
it fine-tuning (about 1 min per epoch). Example:
    python bench/export_bench.py --data ../shared/datasets/fruits --backbone efficientnet_lite0 --out docs/bench/export.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT, fmt, header, spread, write_results  # noqa: E402

THROUGHPUT_BATCH = 32


def measure(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, repeats: int,
            latency_images: int) -> dict:
    """Accuracy over all ``images``; throughput over their full batches of 32; median single-image latency."""
    probs = np.concatenate([predict(images[i:i + THROUGHPUT_BATCH]) for i in range(0, len(images), THROUGHPUT_BATCH)])
    timed = images[:max(THROUGHPUT_BATCH, len(images) // THROUGHPUT_BATCH * THROUGHPUT_BATCH)]
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(timed), THROUGHPUT_BATCH):
            predict(timed[i:i + THROUGHPUT_BATCH])
        rates.append(len(timed) / (time.perf_counter() - started))
    predict(images[:1])  # warm-up for the batch-1 shape
    latencies = []
    for _ in range(repeats):
        single = []
        for i in range(min(latency_images, len(images))):
            started = time.perf_counter()
            predict(images[i:i + 1])
            single.append(1000 * (time.perf_counter() - started))
        latencies.append(statistics.median(single))
    from classify.scoring import scores

    return {**scores(labels, probs.argmax(axis=1)), "batch32_images_per_s": spread(rates),
            "batch1_latency_ms": spread(latencies)}


def _keras_threads(threads: int) -> int:
    """Limit TensorFlow to ``threads`` (possible only before it starts); returns the setting in force (0: all)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised by an earlier section of bench/run.py
        pass
    return tf.config.threading.get_intra_op_parallelism_threads()


def run_export_benchmark(
    data: str,
    backbone: str = "efficientnet_lite0",
    weights: str = "imagenet",
    image_size: int | None = None,
    store: str | None = None,
    head: str | None = None,
    workdir: str | None = None,
    epochs: int = 5,
    unfreeze: str = "20",
    threads: int = 2,
    repeats: int = 3,
    latency_images: int = 20,
    seed: int = 0,
) -> dict:
    """Run the benchmark; ``store`` and ``head`` (made from ``data``) skip extraction and head fitting."""
    keras_threads = _keras_threads(threads)
    from export.finetune import DEFAULT_LEARNING_RATE, fine_tune
    from export.quantize import DEFAULT_TOLERANCE

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="export-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        if store is None or head is None:
            store, head = _store_and_head(data, work, backbone, weights, image_size, seed)
        trained, export, labels, models = _compare_models(data, store, head, work, threads, repeats, latency_images)
        tune_started = time.perf_counter()
        tuned = fine_tune(data, None, work / "fine-tuned.keras", head=head, store=store, epochs=epochs,
                          unfreeze=unfreeze, seed=seed, cache_front=False)  # end to end: what this bench measured
        tune_seconds = time.perf_counter() - tune_started
    drop = 100 * (models["ONNX float32"]["accuracy"] - models["ONNX int8 (QDQ)"]["accuracy"])
    return {
        "data": str(data), "backbone": backbone, "weights": trained.backbone.weights.id,
        "input_size": trained.backbone.input_size, "classes": trained.class_names, "head_kind": trained.kind,
        "test_images": int(len(labels)), "threads": threads, "keras_intra_op_threads": keras_threads,
        "repeats": repeats, "latency_images": latency_images,
        "parity": export.parity.to_dict(), "model_id": export.metadata["model_id"],
        "calibration_images": export.quantization.calibration_images,
        "int8_drop_points": drop, "int8_accepted_at_default_tolerance": drop <= DEFAULT_TOLERANCE,
        "default_tolerance": DEFAULT_TOLERANCE, "models": models,
        "head_only": {k: models["Keras (TensorFlow)"][k] for k in ("accuracy", "macro_f1")},
        "fine_tuned": {**tuned.test, "epochs": epochs, "epochs_run": tuned.epochs_run, "best_epoch": tuned.best_epoch,
                       "unfreeze": unfreeze, "trainable_layers": tuned.trainable_layers,
                       "learning_rate": DEFAULT_LEARNING_RATE, "seconds": tune_seconds},
        "total_seconds": time.perf_counter() - started,
    }


def _store_and_head(data: str, work: Path, backbone: str, weights: str, image_size: int | None,
                    seed: int) -> tuple[str, str]:
    """Extract ``data`` into a store in ``work`` and keep the best head on it."""
    from classify.train import fit_heads
    from extract.job import run_extraction

    store, head = str(work / "features.h5"), str(work / "head")
    run_extraction(data, store, backbone=backbone, weights=weights, input_size=image_size, seed=seed, progress=False)
    fit_heads(store, kind="all", backbone=backbone, out=head, seed=seed)
    return store, head


def _compare_models(data: str, store: str, head: str, work: Path, threads: int, repeats: int, latency_images: int):
    """Export float and int8 ONNX models, then measure them and the Keras model on the test split.

    Returns the head, the export result, the test labels and the measurements per model.
    """
    from classify.data import features_for_head
    from classify.persist import load_head
    from export.data import from_feature_set, load_batch
    from export.keras_models import classifier_model
    from export.onnx_export import export_onnx
    from extract.engine import onnx_session

    trained = load_head(head)
    onnx_path = work / "model.onnx"
    export = export_onnx(onnx_path, store=store, head=head, images=data, quantize="int8", tolerance=100.0,
                         threads=threads)
    test = from_feature_set(features_for_head(trained, store), data).subset("test")
    batch, kept = load_batch(test.paths, trained.backbone.input_size)
    labels = test.labels[kept]
    keras_model = classifier_model(trained.build_backbone(), len(trained.class_names), trained.head.network())
    models: dict[str, dict] = {"Keras (TensorFlow)": measure(
        lambda x: np.asarray(keras_model.predict_on_batch(x)), batch, labels, repeats, latency_images)}
    for name, path in (("ONNX float32", onnx_path), ("ONNX int8 (QDQ)", Path(export.quantization.path))):
        session = onnx_session(path, threads)
        models[name] = {**measure(lambda x, s=session: s.run(None, {"image": x})[0], batch, labels, repeats,
                                  latency_images), "file_mb": path.stat().st_size / 2**20}
    return trained, export, labels, models


def to_markdown(r: dict) -> str:
    lines = [
        header(f"Export: Keras vs ONNX float vs ONNX int8, {r['backbone']} on {Path(r['data']).name}"),
        f"Backbone `{r['backbone']}` ({r['weights']}, {r['input_size']} px) with the best head on validation "
        f"(`{r['head_kind']}`), {len(r['classes'])} classes; measured on the {r['test_images']} test images, "
        f"decoding excluded; {r['threads']} threads for onnxruntime, TensorFlow intra-op threads "
        f"{r['keras_intra_op_threads'] or 'all cores'}; medians (min–max) of {r['repeats']} runs; latency is the "
        f"median over {r['latency_images']} single images. Total {r['total_seconds'] / 60:.1f} min.\n",
        "| model | test accuracy | batch-1 latency (ms) | batch-32 images/s | file (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        size = f"{m['file_mb']:.1f}" if "file_mb" in m else "-"
        lines.append(f"| {name} | {100 * m['accuracy']:.2f}% | {fmt(m['batch1_latency_ms'], 2)} "
                     f"| {fmt(m['batch32_images_per_s'])} | {size} |")
    p = r["parity"]
    verdict = "accepted" if r["int8_accepted_at_default_tolerance"] else "refused"
    ft = r["fine_tuned"]
    lines += [
        "",
        f"- Parity of the float export on {p['images']} images: max |p_keras - p_onnx| = {p['max_abs_diff']:.2e} "
        f"(tolerance {p['atol']:.0e}), top-1 agreement {100 * p['top1_agreement']:.1f}%.",
        f"- int8: static QDQ, per-channel int8 weights (7-bit range), int8 activations calibrated on "
        f"{r['calibration_images']} train images; it "
        f"loses {r['int8_drop_points']:.2f} accuracy points, so `export-onnx --quantize int8` would have "
        f"**{verdict}** it at the default tolerance of {r['default_tolerance']:g} point.",
        "",
        "| classifier | test accuracy | test macro-F1 |",
        "|---|---|---|",
        f"| head only (`{r['head_kind']}` on frozen features) | {100 * r['head_only']['accuracy']:.2f}% "
        f"| {r['head_only']['macro_f1']:.3f} |",
        f"| fine-tuned from that head, {ft['epochs_run']} of {ft['epochs']} epochs | {100 * ft['accuracy']:.2f}% "
        f"| {ft['macro_f1']:.3f} |",
        "",
        f"- Fine-tuning: top {ft['unfreeze']} backbone layers ({ft['trainable_layers']} with weights, BatchNorm "
        f"frozen), Adam at {ft['learning_rate']:g}, batch 32, augmentation (flip, rotation, zoom), best epoch "
        f"{ft['best_epoch']} kept on validation loss; {ft['seconds'] / 60:.1f} min. Few epochs to fit a CPU "
        f"budget: a longer run may do better.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder, DIR/<class>/<image>")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none or a weights file")
    parser.add_argument("--image-size", type=int, default=None, help="square input size [default: the backbone's]")
    parser.add_argument("--store", default=None, help="an existing store of --data (with --head: skips extract and fit-head)")
    parser.add_argument("--head", default=None)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--unfreeze", default="20", help="backbone layers to fine-tune (N or all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "export.md"))
    args = parser.parse_args()
    result = run_export_benchmark(args.data, backbone=args.backbone, weights=args.weights,
                                  image_size=args.image_size, store=args.store,
                                  head=args.head, epochs=args.epochs, unfreeze=args.unfreeze, threads=args.threads,
                                  repeats=args.repeats, seed=args.seed)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
