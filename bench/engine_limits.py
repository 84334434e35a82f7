"""Where extraction speed comes from: the ONNX engine's rate by batch and thread spinning, and the
CPU cost of decoding one image of a folder.

Two figures that bound ``extract``: the engine rate on pre-decoded tensors (does any onnxruntime
setting make the backbone faster?) and decode+resize CPU milliseconds per image (on 2 cores the
decoding threads take that CPU from the engine, so the extraction loop can reach at most
``inference core-ms / (inference core-ms + decode ms)`` of the engine-alone rate).

Example:
    python bench/engine_limits.py --data ../shared/datasets/trashnet --backbone resnet50 --weights none
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import data_parser, header, spread, write_section  # noqa: E402
from edge.imageio import ImageDecodeError, load_image  # noqa: E402
from extract.defaults import DEFAULT_BATCH_SIZE  # noqa: E402
from extract.backbones import get_backbone  # noqa: E402
from extract.dataset import discover  # noqa: E402
from extract.engine import default_threads, onnx_session, open_engine  # noqa: E402
from extract.record import BackboneRecord  # noqa: E402
from extract.splits import SplitSettings  # noqa: E402
from extract.weights import resolve_weights  # noqa: E402


def engine_rate(path: Path, batch: int, spinning: bool, seconds: float, threads: int) -> float:
    """Images/s of one onnxruntime session (as ``extract`` opens it) on random uint8 tensors."""
    session = onnx_session(path, threads, spinning=spinning)
    name, size = session.get_inputs()[0].name, session.get_inputs()[0].shape[1]
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    session.run(None, {name: x})  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: x})
        done += batch
    return done / (time.perf_counter() - start)


def decode_ms(data: str, size: int, limit: int) -> float:
    """CPU milliseconds per image of ``load_image`` (decode, EXIF, RGB, resize) on one thread."""
    root = Path(data)
    entries = discover(root, SplitSettings(0, 0)).entries[:limit]
    start = time.process_time()
    for entry in entries:
        try:
            load_image(root / entry.relpath, (size, size))
        except ImageDecodeError:
            continue
    return (time.process_time() - start) / len(entries) * 1000


def run(data: str, backbone: str, weights: str, batches: list[int], seconds: float, repeats: int,
        decode_images: int, extract_batch: int = DEFAULT_BATCH_SIZE) -> dict:
    """``extract_batch``: the batch ``extract`` runs at (its default), which the loop bound is for."""
    spec = get_backbone(backbone)
    record = BackboneRecord.create(spec, resolve_weights(spec, weights).record(), spec.input_size)
    engine = open_engine(record, weights, engine="onnx")
    threads = default_threads()
    rates = {f"batch {b}, spinning {'on' if spin else 'off'}": spread(
        [engine_rate(engine.path, b, spin, seconds, threads) for _ in range(repeats)])
        for b in batches for spin in (True, False)}
    ms = spread([decode_ms(data, spec.input_size, decode_images) for _ in range(repeats)])
    inference_core_ms = threads * 1000 / rates[f"batch {extract_batch}, spinning on"]["median"]
    return {"data": data, "backbone": backbone, "weights": weights, "threads": threads, "rates": rates,
            "decode_ms": ms, "decode_images": decode_images, "inference_core_ms": inference_core_ms,
            "extract_batch": extract_batch,
            "loop_bound": inference_core_ms / (inference_core_ms + ms["median"])}


def to_markdown(r: dict) -> str:
    lines = [
        header(f"Engine limits: {r['backbone']} (weights {r['weights']}), {Path(r['data']).name}"),
        f"onnxruntime, {r['threads']} intra-op threads, all graph optimisations; medians (min–max).\n",
        "| engine setting | images/s |", "|---|---|",
        *(f"| {name} | {stat['median']:.1f} ({stat['min']:.1f}–{stat['max']:.1f}) |"
          for name, stat in r["rates"].items()),
        "",
        f"- decode + resize to {get_backbone(r['backbone']).input_size} px: {r['decode_ms']['median']:.2f} CPU ms "
        f"per image ({r['decode_images']} images, one thread); inference: {r['inference_core_ms']:.2f} core-ms "
        f"per image at batch {r['extract_batch']} (extract's default, onnxruntime's default spinning).",
        f"- so on {r['threads']} cores the extraction loop at that batch can reach at most "
        f"**{r['loop_bound']:.0%}** of the engine-alone rate.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = data_parser(__doc__, "engine-limits.md", backbone="resnet50", weights="none")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-images", type=int, default=600)
    parser.add_argument("--extract-batch", type=int, default=DEFAULT_BATCH_SIZE,
                        help="batch the loop bound is computed for (one of --batches) [default: extract's default]")
    args = parser.parse_args()
    if not args.data or not os.path.isdir(args.data):
        parser.error("--data DIR is required (../shared/datasets/trashnet is absent)")
    result = run(args.data, args.backbone, args.weights, [int(b) for b in args.batches.split(",")],
                 args.seconds, args.repeats, args.decode_images, args.extract_batch)
    write_section(args.out, to_markdown(result))


if __name__ == "__main__":
    main()
