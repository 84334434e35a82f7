"""Extraction speed: `extract` end to end vs the backbone alone vs the tutorials' way.

1. ``python cli.py extract`` in a fresh process on an empty store, wall time from the command to the
   finished store, and the rate of its decode+inference+write loop;
2. the same engine alone on pre-decoded uint8 tensors (the compute limit);
3. the tutorials' way: ``keras.utils.image_dataset_from_directory`` + ``model.predict`` (with the
   backbone's correct ``preprocess_input``), in a fresh process, wall time and predict rate.

Example:
    python bench/extract_bench.py --data ../shared/datasets/trashnet --backbone resnet50 --weights none
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, data_parser, fmt, header, parse_data_args, spread, write_results  # noqa: E402
from bench.cputime import run_tree  # noqa: E402

TUTORIAL_SCRIPT = r"""
import os, sys, time, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
start = time.perf_counter()
import keras, numpy as np
data, constructor, module, size, batch, weights, root = sys.argv[1:8]
ds = keras.utils.image_dataset_from_directory(data, image_size=(int(size), int(size)), batch_size=int(batch),
                                              shuffle=False, label_mode="int")
if constructor == "registry":  # not in keras.applications: the tool's Keras model (uint8 in, preprocessing inside)
    import tensorflow as tf
    sys.path.insert(0, root)
    from extract.models import build_backbone
    model = build_backbone(module, weights=weights).model
    ds = ds.map(lambda x, y: tf.cast(x, tf.uint8)).prefetch(2)
else:
    preprocess = getattr(keras.applications, module).preprocess_input
    ds = ds.map(lambda x, y: preprocess(x)).prefetch(2)
    model = getattr(keras.applications, constructor)(weights=None if weights == "none" else weights,
                                                     include_top=False, pooling="avg",
                                                     input_shape=(int(size), int(size), 3))
t = time.perf_counter()
features = model.predict(ds, verbose=0)
predict_seconds = time.perf_counter() - t
print(json.dumps({"images": int(features.shape[0]), "predict_seconds": predict_seconds,
                  "wall_seconds": time.perf_counter() - start}))
"""

KERAS_MODULES = {  # registry name -> (constructor, keras.applications module holding preprocess_input)
    "resnet50": ("ResNet50", "resnet50"), "resnet50v2": ("ResNet50V2", "resnet_v2"),
    "xception": ("Xception", "xception"), "inception_v3": ("InceptionV3", "inception_v3"),
    "inception_resnet_v2": ("InceptionResNetV2", "inception_resnet_v2"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"), "efficientnet_b0": ("EfficientNetB0", "efficientnet"),
    "vgg16": ("VGG16", "vgg16"),
}


def run_cli_extract(data: str, store: Path, backbone: str, weights: str, batch: int, engine: str,
                    shard: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    """``python cli.py extract`` in a fresh process: wall and CPU seconds, loop rate, images, engine,
    the name its features are stored under and its notes (stderr lines)."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", data, "--store", str(store), "--backbone", backbone,
           "--weights", weights, "--batch-size", str(batch), "--engine", engine, "--json", "--quiet", *extra]
    cmd += ["--shard", shard] if shard else []
    run = run_tree(cmd, cwd=ROOT, check=True)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    return {"wall_seconds": run.wall_seconds, "cpu_seconds": run.cpu_seconds, "loop_rate": summary["images_per_second"],
            "images": summary["images"], "engine": summary["engine"], "backbone": summary["backbone"],
            "notes": summary.get("notes", [])}


def decoded_tensors(data: str, size: int, limit: int | None = None, shard: str | None = None):
    """The folder's images (or one shard's, or the first ``limit``) decoded to one uint8 array."""
    import numpy as np

    from edge.imageio import ImageDecodeError, load_image
    from extract.dataset import discover
    from extract.job import parse_shard, select_entries
    from extract.splits import SplitSettings

    images = []
    for entry in select_entries(discover(data, SplitSettings(0, 0)), parse_shard(shard))[:limit]:
        try:
            images.append(load_image(Path(data) / entry.relpath, (size, size)))
        except ImageDecodeError:
            continue
    return np.stack(images)


def engine_alone_rate(data: str, backbone: str, weights: str, batch: int, engine: str, limit: int) -> float:
    """Images/s of the engine on tensors decoded beforehand (no I/O in the timed loop)."""
    from extract.engine import make_engine
    from extract.models import build_backbone

    built = build_backbone(backbone, weights=weights)
    run = make_engine(built, engine)
    stack = decoded_tensors(data, built.input_size, limit)
    run(stack[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(stack), batch):
        run(stack[i:i + batch])
    return len(stack) / (time.perf_counter() - start)


def run_tutorial(data: str, backbone: str, weights: str, batch: int, size: int) -> dict:
    """``image_dataset_from_directory`` + ``model.predict`` in a fresh process: the keras.applications
    model with its ``preprocess_input`` or, for a backbone Keras does not ship (efficientnet_lite0),
    the tool's own Keras model."""
    constructor, module = KERAS_MODULES.get(backbone, ("registry", backbone))
    cmd = [sys.executable, "-c", TUTORIAL_SCRIPT, data, constructor, module, str(size), str(batch), weights, str(ROOT)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def run_extract_benchmark(data: str, backbone: str = "resnet50", weights: str = "none", batch: int = 32,
                          repeats: int = 3, engine: str = "auto", alone_limit: int = 1024) -> dict:
    """``alone_limit``: images decoded for the backbone-alone rates (a rate needs no more; Keras runs
    some backbones at 10 images/s here)."""
    from extract.backbones import get_backbone

    size = get_backbone(backbone).input_size
    with tempfile.TemporaryDirectory() as tmp:
        warm = run_cli_extract(data, Path(tmp) / "warm.h5", backbone, weights, batch, engine)  # converts + caches
        runs = [run_cli_extract(data, Path(tmp) / f"run{i}.h5", backbone, weights, batch, engine)
                for i in range(repeats)]
    alone = [engine_alone_rate(data, backbone, weights, batch, runs[0]["engine"], limit=alone_limit)
             for _ in range(repeats)]
    keras_alone = [engine_alone_rate(data, backbone, weights, batch, "keras", limit=alone_limit)
                   for _ in range(repeats)]
    tutorial = [run_tutorial(data, backbone, weights, batch, size) for _ in range(repeats)]
    images = runs[0]["images"]
    return {
        "data": data, "backbone": backbone, "weights": weights, "batch": batch, "images": images,
        "engine": runs[0]["engine"], "first_run_wall": warm["wall_seconds"],
        "extract_wall": spread([r["wall_seconds"] for r in runs]),
        "extract_loop_rate": spread([r["loop_rate"] for r in runs]),
        "extract_end_to_end_rate": spread([images / r["wall_seconds"] for r in runs]),
        "alone_images": min(images, alone_limit), "engine_alone_rate": spread(alone),
        "keras_alone_rate": spread(keras_alone),
        "tutorial_wall": spread([t["process_seconds"] for t in tutorial]),
        "tutorial_predict_rate": spread([t["images"] / t["predict_seconds"] for t in tutorial]),
    }


def to_markdown(r: dict) -> str:
    loop, alone = r["extract_loop_rate"]["median"], r["engine_alone_rate"]["median"]
    whole = r["extract_end_to_end_rate"]["median"]
    lines = [
        header(f"Extraction speed: {r['backbone']} (weights {r['weights']}), {Path(r['data']).name}"),
        f"{r['images']} images, batch {r['batch']}, engine `{r['engine']}`; medians (min–max) of repeated runs.\n",
        "| measurement | value |", "|---|---|",
        f"| `extract` whole process, command to finished store (s) | {fmt(r['extract_wall'])} |",
        f"| `extract` whole process (images/s) | {fmt(r['extract_end_to_end_rate'])} |",
        f"| `extract` decode+infer+write loop (images/s) | {fmt(r['extract_loop_rate'])} |",
        f"| {r['engine']} engine alone on {r['alone_images']} pre-decoded tensors (images/s) "
        f"| {fmt(r['engine_alone_rate'])} |",
        f"| Keras alone on {r['alone_images']} pre-decoded tensors (images/s) | {fmt(r['keras_alone_rate'])} |",
        f"| first `extract` incl. one-off ONNX conversion (s) | {r['first_run_wall']:.1f} |",
        f"| tutorials' way whole process (s) | {fmt(r['tutorial_wall'])} |",
        f"| tutorials' way `model.predict` (images/s) | {fmt(r['tutorial_predict_rate'])} |",
        "",
        f"- extraction loop / engine alone: **{loop / alone:.0%}**; whole process (start-up, hashing and "
        f"store included) / engine alone: **{whole / alone:.0%}** (goal: within 10%). On 2 cores the "
        f"decoding threads share the cores the engine alone has to itself.",
        f"- whole process speed-up over the tutorials' way: "
        f"**{r['tutorial_wall']['median'] / r['extract_wall']['median']:.2f}x** (goal: at least 2x)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = data_parser(__doc__, "extract.md", backbone="resnet50", weights="none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", default="auto")
    args = parse_data_args(parser)
    result = run_extract_benchmark(args.data, args.backbone, args.weights, args.batch_size, args.repeats, args.engine)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
