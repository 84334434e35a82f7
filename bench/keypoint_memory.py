"""How many images' keypoints the audit's `keypoints` rule holds at once, as the data set grows.

The rule finds SIFT keypoints in every image of a candidate pair (each image's 5 most similar
images with a features cosine from 0.60 to 0.90) and visits the pairs in an order that keeps
neighbours together, dropping an image's keypoints after its last pair
(``classify.audit_keypoints.visiting_plan``). Its memory is the most images held at one time
(``held_at_once``), at most ``KEYPOINTS`` descriptors of 128 floats each (150 KiB an image). This
script builds the candidate pairs the audit would build (the same blockwise pass) and counts that
peak, without reading images: for clustered synthetic features of growing size (20 rows a
cluster, noise chosen so that a cluster's rows score 0.6-0.7 to each other, the band the rule
looks in), and for the stores given with ``--store``. The pairs counted are all the candidates;
the audit leaves out those that other rules linked already, so it holds at most this many.

Example:
    python bench/keypoint_memory.py                          # 10k and 100k synthetic rows
    python bench/keypoint_memory.py --rows 10000 --store /tmp/trashnet.h5 --store /tmp/fruits.h5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, header, write_results  # noqa: E402
from classify.audit_keypoints import KEYPOINTS, held_at_once  # noqa: E402
from classify.duplicates import candidate_search  # noqa: E402
from extract.neighbours import normalise, similar_and_nearest  # noqa: E402

IMAGE_KIB = KEYPOINTS * (128 + 2) * 4 / 1024  # descriptors and points of one image, at most


def clustered(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, rows // 20), dim)).astype(np.float32)
    return centres[rng.integers(0, len(centres), rows)] + 0.7 * rng.normal(size=(rows, dim)).astype(np.float32)


def measure(name: str, features: np.ndarray) -> dict:
    started = time.perf_counter()
    _, _, candidates = similar_and_nearest(normalise(features), np.inf, **candidate_search())
    pairs = candidates[:, :2].astype(np.int64)
    held = held_at_once(pairs, len(features))
    return {"name": name, "rows": len(features), "pairs": len(pairs), "images": int(len(np.unique(pairs))),
            "held": held, "held_mib": held * IMAGE_KIB / 1024, "seconds": time.perf_counter() - started}


def store_features(path: str, backbone: str) -> np.ndarray:
    from extract.store import FeatureStore

    return FeatureStore(path).read(backbone).features


def markdown(results: list[dict]) -> str:
    lines = ["", "| features | rows | candidate pairs | images in them | held at once | at most |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['rows']:,} | {r['pairs']:,} | {r['images']:,} | {r['held']:,} "
                     f"| {r['held_mib']:.0f} MiB |")
    lines += ["", f"Held at once: the most images whose keypoints are kept at one time; at most: that many "
              f"images with {KEYPOINTS} keypoints each ({IMAGE_KIB:.0f} KiB)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000], help="synthetic row counts")
    parser.add_argument("--dim", type=int, default=64, help="synthetic feature length [default: 64]")
    parser.add_argument("--store", action="append", default=[], help="a feature store to measure too")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "keypoint-memory.md"))
    args = parser.parse_args(argv)
    results = [measure(f"synthetic, {args.dim} dims", clustered(rows, args.dim)) for rows in args.rows]
    results += [measure(f"{Path(path).name}, {args.backbone} (a scratch store named in the command)",
                        store_features(path, args.backbone)) for path in args.store]
    text = header("Keypoints held at once by the audit") + markdown(results)
    write_results(args.out, text, {"results": results, "image_kib": IMAGE_KIB})
    return 0


if __name__ == "__main__":
    sys.exit(main())
