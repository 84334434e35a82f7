"""What `audit` finds: in the real sets as they are, in copies with planted faults, and its cost at 100k rows.

For each data set: extract it (EfficientNet-Lite0) and audit it (as it runs by default, and with
``--thorough`` in a table of its own), and set what it finds beside the
facts issue #18 states about these sets (``KNOWN``: quoted from the issue, the only source of
those counts; the three conflicting TrashNet files are named there and checked by name); then
copy it, move 20 images into another class folder (label swaps) and add 15 transformed copies of
training images (resized, re-encoded at JPEG quality 40, cropped to 92 %, mirrored, rotated by
30 degrees with black corners, cropped to 80 %, turned by 90 degrees, in turn) under names that
land in the test split, extract and audit the copy, and count the swaps among the top 40 suspects
and the copies grouped with their original. Last, the blockwise similarity search on synthetic
features (100,000 rows x 1280 by default): seconds and peak memory (tracemalloc) of the search alone.

Example:
    python bench/audit_bench.py --synthetic-rows 0      # the shared sets -> docs/bench/audit.md
    python bench/audit_bench.py --data --out docs/bench/audit-scale   # 100,000 synthetic rows only
    python bench/audit_bench.py --data --synthetic-blocks 20 --out docs/bench/audit-scale  # its first 20 blocks
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, default_data, header, run_script, write_section  # noqa: E402
from bench.cputime import run_tree  # noqa: E402
from classify.audit_keypoints import KEYPOINT_INLIERS, MAX_PARTNERS  # noqa: E402
from classify.duplicates import FEATURE_THRESHOLD  # noqa: E402
from classify.label_checks import leak_effect_sentence  # noqa: E402
from extract.neighbours import block_rows_for, normalise  # noqa: E402
from extract.splits import SplitSettings  # noqa: E402
from extract.dataset import assign_split, discover  # noqa: E402

SWAPS, COPIES, TOP = 20, 15, 40


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _crop(img: Image.Image, keep: float = 0.92) -> Image.Image:
    dx, dy = int(img.width * (1 - keep) / 2), int(img.height * (1 - keep) / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


TRANSFORMS = {"resized": lambda im: im.resize((im.width // 2, im.height // 2)), "jpeg40": lambda im: _jpeg(im, 40),
              "cropped": _crop, "mirrored": ImageOps.mirror, "rotated30": lambda im: _crop(im.rotate(30), 0.9),
              "cropped80": lambda im: _crop(im, 0.8), "turned90": lambda im: im.rotate(90)}
MEASURED = {**TRANSFORMS, "rotated10": lambda im: im.rotate(10)}

# What issue #18 states about the shared sets (the counts come from the issue, not from this audit).
KNOWN = {
    "fruits": {"pairs": 220, "groups": 133, "test_images": 141, "test_with_train_copy": 32,
               "accuracy_copies": 0.989, "accuracy_rest": 0.974},
    "trashnet": {"conflicts": [("glass/glass115.jpg", "metal/metal91.jpg"), ("glass/glass176.jpg", "plastic/plastic152.jpg"),
                               ("glass/glass389.jpg", "plastic/plastic332.jpg")], "same_object_pairs": 118},
}


def copy_similarities(store: Path, images: Path, sample: int = 40, seed: int = 0) -> dict:
    """How copies score against their original: centred feature cosine, pixel-signature cosine
    (best of the 8 dihedral variants), alignment score (classify/audit_alignment.py) and agreeing
    keypoint matches (classify/audit_keypoints.py), median and 10th percentile over ``sample``
    images per transform; and the nearest other image's feature cosine in the set (what an
    unrelated photo scores)."""
    from classify.audit_alignment import AlignedImages
    from classify.audit_images import _one
    from classify.audit_keypoints import ImageKeypoints
    from extract.neighbours import nearest_other
    from extract.engine import OnnxEngine, onnx_engine_path
    from extract.store import FeatureStore

    features = FeatureStore(store).read()
    record = features.backbone
    engine = OnnxEngine(None, path=onnx_engine_path(record))
    mean = features.features.mean(axis=0)
    size = record.input_size

    def unit(vector):
        vector = vector - mean
        return vector / np.linalg.norm(vector)

    rows = np.random.default_rng(seed).choice(len(features.paths), min(sample, len(features.paths)), replace=False)
    scores: dict[str, dict[str, list[float]]] = {k: {"features": [], "pixels": [], "aligned": [], "keypoints": []}
                                                 for k in MEASURED}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            with Image.open(images / features.paths[row]) as img:
                img = img.convert("RGB")
            original = unit(features.features[row])
            _, signature, _ = _one(images / features.paths[row])
            img.save(Path(tmp) / "original.jpg", quality=95)
            for kind, transform in MEASURED.items():
                copy = transform(img).convert("RGB")
                copy.save(Path(tmp) / "copy.jpg", quality=90)
                batch = np.asarray(copy.resize((size, size), Image.BILINEAR))[None]
                scores[kind]["features"].append(float(unit(engine(batch)[0]) @ original))
                _, copy_signature, copy_variants = _one(Path(tmp) / "copy.jpg")
                scores[kind]["pixels"].append(float(max(signature @ v for v in [copy_signature, *copy_variants])))
                scores[kind]["aligned"].append(AlignedImages(tmp, ["original.jpg", "copy.jpg"]).score(0, 1))
                scores[kind]["keypoints"].append(ImageKeypoints(tmp, ["original.jpg", "copy.jpg"]).inliers(0, 1))
    _, nearest = nearest_other(normalise(features.features))
    quantiles = lambda values: {"median": float(np.median(values)), "p10": float(np.quantile(values, 0.1))}
    return {"sample": len(rows), "copies": {k: {m: quantiles(v) for m, v in d.items()} for k, d in scores.items()},
            "nearest_other_features": {q: float(np.quantile(nearest, q)) for q in (0.5, 0.9, 0.99)}}


def _test_name(folder: str, stem: str) -> str:
    """A copy name in ``folder`` that the default split settings put in the test split."""
    k = 0
    while assign_split(f"{folder}/{stem}_copy{k}.jpg", SplitSettings()) != "test":
        k += 1
    return f"{folder}/{stem}_copy{k}.jpg"


def plant(source: Path, target: Path, seed: int = 0) -> dict:
    """Copy ``source`` to ``target`` with label swaps and test-split copies; returns what was planted."""
    shutil.copytree(source, target)
    rng = random.Random(seed)
    dataset = discover(target)
    entries = list(dataset.entries)
    rng.shuffle(entries)
    swaps = {}
    for entry in entries[:SWAPS]:
        other = rng.choice([c for c in dataset.class_names if c != entry.class_name])
        moved = f"{other}/swapped_{Path(entry.relpath).name}"
        shutil.move(target / entry.relpath, target / moved)
        swaps[moved] = entry.class_name
    copies = {}
    originals = [e for e in entries[SWAPS:] if e.split == "train"][:COPIES]
    for k, entry in enumerate(originals):
        kind = list(TRANSFORMS)[k % len(TRANSFORMS)]
        with Image.open(target / entry.relpath) as img:
            copy = _test_name(entry.class_name, Path(entry.relpath).stem)
            TRANSFORMS[kind](img.convert("RGB")).convert("RGB").save(target / copy, quality=90)
        copies[copy] = {"original": entry.relpath, "transform": kind}
    return {"swaps": swaps, "copies": copies}


def extract_and_audit(images: Path, work: Path, name: str) -> tuple[dict, dict]:
    """The audit of ``images`` (extracted with EfficientNet-Lite0) as it runs by default and with ``--thorough``."""
    store = work / f"{name}.h5"
    run_script(["cli.py", "extract", str(images), "--store", str(store), "--backbone", "efficientnet_lite0",
                "--quiet", "--json"])
    reports = []
    for extra in ([], ["--thorough"]):
        run = run_tree([sys.executable, "cli.py", "audit", "--store", str(store), "--report-dir",
                        str(work / f"{name}-audit{''.join(extra)}"), "--quiet", "--json", *extra], cwd=ROOT, check=True)
        report = json.loads(run.stdout.strip().splitlines()[-1])
        report["command_seconds"], report["command_cpu_seconds"] = run.wall_seconds, run.cpu_seconds
        reports.append(report)
    return reports[0], reports[1]


def score_planted(report: dict, planted: dict) -> dict:
    top = [row["path"] for row in report["mislabel_suspects"][:TOP]]
    group_of = {i["path"]: k for k, g in enumerate(report["duplicate_groups"]) for i in g["images"]}
    found = {copy: copy in group_of and group_of[copy] == group_of.get(spec["original"])
             for copy, spec in planted["copies"].items()}
    by_kind: dict[str, list[int]] = {}
    for copy, spec in planted["copies"].items():
        by_kind.setdefault(spec["transform"], []).append(int(found[copy]))
    return {"swaps_in_top": sum(path in top for path in planted["swaps"]),
            "copies_found": sum(found.values()), "copies_found_by_transform": {k: f"{sum(v)}/{len(v)}" for k, v in
                                                                               by_kind.items()}}


class _Enough(Exception):
    """Raised from the progress callback to stop the search after the blocks asked for."""


def _synthetic_features(rows: int, dim: int, duplicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered rows (50 per cluster on average), the last ``duplicates`` near-copies of others."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, rows // 50), dim)).astype(np.float32)
    features = centres[rng.integers(0, len(centres), rows)] + rng.normal(size=(rows, dim)).astype(np.float32)
    originals = rng.choice(rows - duplicates, duplicates, replace=False)
    features[rows - duplicates:] = features[originals] + 0.1 * rng.normal(size=(duplicates, dim)).astype(np.float32)
    return features, originals


def synthetic_search(rows: int, dim: int = 1280, duplicates: int = 500, seed: int = 0, blocks: int = 0) -> dict:
    """Time, CPU time and peak memory of the audit's features rules (``find_pairs`` without the image
    files: the features and mutual-neighbour rules in one blockwise pass) on ``rows`` clustered rows
    with planted near-copies. ``blocks``: stop after that many blocks and extrapolate the time to
    every row (each block costs the same: its rows against all rows); no pairs are counted then."""
    from classify.duplicates import find_pairs

    features, originals = _synthetic_features(rows, dim, duplicates, seed)
    done = [0, 0]  # blocks, rows

    def count(block_rows: int) -> None:
        done[0], done[1] = done[0] + 1, done[1] + block_rows
        if blocks and done[0] >= blocks:
            raise _Enough

    tracemalloc.start()
    started, cpu = time.perf_counter(), time.process_time()
    try:
        found_pairs = find_pairs(features, None, progress=count)
    except _Enough:
        found_pairs = None
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    share = done[1] / rows
    result = {"rows": rows, "dim": dim, "rows_searched": done[1], "seconds": seconds / share,
              "cpu_seconds": cpu / share, "extrapolated": found_pairs is None, "peak_mib": peak / 2**20,
              "features_mib": features.nbytes / 2**20, "full_matrix_gib": rows * rows * 4 / 2**30,
              "block_rows": block_rows_for(rows), "planted": duplicates}
    if found_pairs is not None:
        planted = {(int(a), rows - duplicates + k) for k, a in enumerate(originals)}
        found = {(int(min(i, j)), int(max(i, j))) for i, j, _ in found_pairs["features"]}
        result.update(pairs=len(found_pairs["features"]), mutual_pairs=len(found_pairs["mutual"]),
                      planted_found=len(planted & found))
    return result


def _group_line(group: dict) -> str:
    images = ", ".join(f"{i['path']} ({i['split']})" for i in group["images"][:4])
    more = f" +{len(group['images']) - 4}" if len(group["images"]) > 4 else ""
    flags = "".join([" **leak**" if group["leak"] else "", " **label conflict**" if group["label_conflict"] else ""])
    evidence = ", ".join(f"{kind} {value}" for kind, value in group["similarity_by_evidence"].items())
    return f"- {images}{more}: {evidence}{flags}"


def similarity_markdown(result: dict) -> list[str]:
    lines = ["", f"How copies score against their original ({result['sample']} sampled images; median / 10th "
             "percentile; features: centred cosine, pixels: 16x16 signature, best of its 8 dihedral variants; "
             "aligned: classify/audit_alignment.py score, a copy from 0.5; keypoints: agreeing matches, "
             f"classify/audit_keypoints.py, a copy from {KEYPOINT_INLIERS} when one picture shows black fill or "
             f"neither matches more than {MAX_PARTNERS} candidates so):", "",
             "| copy | features | pixels | aligned | keypoints |", "|---|---|---|---|---|"]
    for kind, d in result["copies"].items():
        lines.append("| " + " | ".join([kind] + [f"{d[m]['median']:.3f} / {d[m]['p10']:.3f}"
                                                 for m in ("features", "pixels", "aligned")]
                            + [f"{d['keypoints']['median']:.0f} / {d['keypoints']['p10']:.0f}"]) + " |")
    near = result["nearest_other_features"]
    lines.append(f"| nearest other image in the set (median / 90th / 99th percentile) | {near[0.5]:.3f} / "
                 f"{near[0.9]:.3f} / {near[0.99]:.3f} | | | |")
    return lines


def known_facts(name: str, report: dict) -> list[dict]:
    """Issue #18's facts about ``name`` beside what the audit found: ``{"fact", "issue", "audit"}`` rows."""
    known, s, effect = KNOWN.get(name), report["summary"], report["leak_effect"] or {}
    if known is None:
        return []
    if name == "trashnet":
        group_of = {i["path"]: k for k, g in enumerate(report["duplicate_groups"]) for i in g["images"]}
        conflicts = report["duplicate_groups"]
        found = [a in group_of and group_of[a] == group_of.get(b) and conflicts[group_of[a]]["label_conflict"]
                 for a, b in known["conflicts"]]
        return [{"fact": "identical files with conflicting labels (named in the issue)",
                 "issue": len(known["conflicts"]), "audit": sum(found)},
                {"fact": "pairs of the same object (pairs linked, identical files left out)",
                 "issue": known["same_object_pairs"], "audit": s["distinct_pairs"] - s["pairs"].get("exact", 0)}]
    return [{"fact": "pairs of copies (distinct pairs linked)", "issue": known["pairs"], "audit": s["distinct_pairs"]},
            {"fact": "groups of copies", "issue": known["groups"], "audit": s["duplicate_groups"]},
            {"fact": f"test images with a copy in train (of {known['test_images']}; here of "
                     f"{effect.get('test_images')})", "issue": known["test_with_train_copy"],
             "audit": s["test_images_with_train_copy"]},
            {"fact": "test accuracy on those copies / on the rest", "issue":
             f"{known['accuracy_copies']:.3f} / {known['accuracy_rest']:.3f}", "audit":
             f"{effect.get('accuracy_leaked_only') or 0:.3f} / {effect.get('accuracy_without_leaked') or 0:.3f}"}]


def facts_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return ["", "Against the facts issue #18 states about this set:", "", "| fact | issue #18 | audit |", "|---|---|---|",
            *(f"| {r['fact']} | {r['issue']} | {r['audit']} |" for r in rows)]


def data_markdown(name: str, clean: dict, planted_report: dict, score: dict) -> str:
    s, effect = clean["summary"], clean["leak_effect"]
    lines = [f"### {name}", "", "| | as it is | with planted faults |", "|---|---|---|"]
    p = planted_report["summary"]
    for label, key in (("duplicate groups", "duplicate_groups"), ("images in groups", "images_in_groups"),
                       ("groups across splits (leaks)", "leak_groups"),
                       ("groups with conflicting labels", "label_conflict_groups"),
                       ("test images with a copy in train", "test_images_with_train_copy"), ("outliers", "outliers")):
        lines.append(f"| {label} | {s[key]} | {p[key]} |")
    lines.append(f"| out-of-fold accuracy | {s['out_of_fold_accuracy']:.3f} | {p['out_of_fold_accuracy']:.3f} |")
    lines.append(f"| audit seconds (in the command / whole command) | {s['seconds']} / {clean['command_seconds']:.1f} "
                 f"| {p['seconds']} / {planted_report['command_seconds']:.1f} |")
    lines.append(f"| whole command CPU seconds (all processes) | {clean['command_cpu_seconds']:.1f} "
                 f"| {planted_report['command_cpu_seconds']:.1f} |")
    lines += ["", f"Evidence (pairs): {', '.join(f'{k} {v}' for k, v in s['pairs'].items())}."]
    lines += facts_markdown(known_facts(name, clean))
    lines += ["", f"Planted: {score['swaps_in_top']} of {SWAPS} label swaps in the top {TOP} suspects; "
              f"{score['copies_found']} of {COPIES} test-split copies grouped with their original "
              f"(by transform: {', '.join(f'{k} {v}' for k, v in score['copies_found_by_transform'].items())})."]
    if effect:
        lines.append(f"{leak_effect_sentence(effect)} ({effect['head']}).")
    lines += similarity_markdown(clean["copy_similarities"])
    lines += ["", "Groups in the unmodified set (first 12, conflicts and leaks first):", ""]
    lines += [_group_line(g) for g in clean["duplicate_groups"][:12]]
    return "\n".join(lines) + "\n"


def thorough_markdown(thorough: dict) -> str:
    """The same set audited with ``--thorough`` (candidates from visual words too)."""
    clean, planted, score = thorough["as_is"], thorough["planted"], thorough["score"]
    s, p = clean["summary"], planted["summary"]
    lines = ["", "With `audit --thorough` (pairs that share SIFT visual words checked by keypoints too):", "",
             "| | as it is | with planted faults |", "|---|---|---|"]
    for label, key in (("duplicate groups", "duplicate_groups"), ("distinct pairs linked", "distinct_pairs"),
                       ("test images with a copy in train", "test_images_with_train_copy")):
        lines.append(f"| {label} | {s[key]} | {p[key]} |")
    lines.append(f"| keypoint pairs | {s['pairs']['keypoints']} | {p['pairs']['keypoints']} |")
    lines.append(f"| planted copies grouped with their original | | {score['copies_found']} of {COPIES} "
                 f"({', '.join(f'{k} {v}' for k, v in score['copies_found_by_transform'].items())}) |")
    lines.append(f"| whole command seconds / CPU seconds | {clean['command_seconds']:.1f} / "
                 f"{clean['command_cpu_seconds']:.1f} | {planted['command_seconds']:.1f} / "
                 f"{planted['command_cpu_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def synthetic_markdown(result: dict) -> str:
    head = (f"### Blockwise similarity at {result['rows']:,} rows\n\n"
            f"{result['rows']:,} synthetic rows x {result['dim']} (float32, {result['features_mib']:.0f} MiB), "
            f"the audit's features and mutual-neighbour rules (`find_pairs` without the image files, one "
            f"blockwise pass): ")
    if result["extrapolated"]:
        timing = (f"{result['seconds']:.0f} s ({result['cpu_seconds']:.0f} CPU-s) extrapolated from the first "
                  f"{result['rows_searched']:,} rows searched against all (every block costs the same), ")
    else:
        timing = f"{result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU-s), "
    tail = ("" if result["extrapolated"] else
            f"; {result['planted_found']} of {result['planted']} planted near-copies found, {result['pairs']} pairs "
            f"above {FEATURE_THRESHOLD}, {result['mutual_pairs']} mutual-neighbour pairs")
    return (head + timing + f"peak {result['peak_mib']:.0f} MiB traced (blocks of {result['block_rows']} rows; "
            f"the full matrix would be {result['full_matrix_gib']:.1f} GiB){tail}.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="*", default=[d for d in (default_data("fruits"), default_data("trashnet")) if d],
                        help="image folders [default: ../shared/datasets/fruits and trashnet when present]")
    parser.add_argument("--synthetic-rows", type=int, default=100_000)
    parser.add_argument("--synthetic-blocks", type=int, default=0,
                        help="stop the synthetic search after this many blocks and extrapolate its time "
                             "[default: 0, the whole search]")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "audit"), help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    results: dict = {"data": {}}
    text = header("Data set audit (`python cli.py audit`)") + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        for folder in args.data:
            name, work = Path(folder).name, Path(tmp)
            clean, clean_thorough = extract_and_audit(Path(folder), work, name)
            clean["copy_similarities"] = copy_similarities(work / f"{name}.h5", Path(folder))
            planted = plant(Path(folder), work / f"{name}-planted")
            planted_report, planted_thorough = extract_and_audit(work / f"{name}-planted", work, f"{name}-planted")
            score = score_planted(planted_report, planted)
            thorough = {"as_is": clean_thorough, "planted": planted_thorough,
                        "score": score_planted(planted_thorough, planted)}
            results["data"][name] = {"folder": f"../shared/datasets/{name}", "as_is": clean["summary"],
                                     "command_seconds": {
                                         k: {"wall": r["command_seconds"], "cpu": r["command_cpu_seconds"]}
                                         for k, r in (("as_is", clean), ("planted", planted_report))},
                                     "known_facts": known_facts(name, clean), "settings": clean["settings"],
                                     "leak_effect": clean["leak_effect"],
                                     "copy_similarities": clean["copy_similarities"], "planted": planted, "score": score,
                                     "planted_summary": planted_report["summary"],
                                     "groups": clean["duplicate_groups"],
                                     "suspects_planted_run": planted_report["mislabel_suspects"],
                                     "thorough": {"as_is": clean_thorough["summary"],
                                                  "planted": planted_thorough["summary"],
                                                  "score": thorough["score"],
                                                  "command_seconds": {k: {"wall": thorough[k]["command_seconds"],
                                                                          "cpu": thorough[k]["command_cpu_seconds"]}
                                                                      for k in ("as_is", "planted")}}}
            text += data_markdown(name, clean, planted_report, score) + thorough_markdown(thorough) + "\n"
    if args.synthetic_rows:
        results["synthetic"] = synthetic_search(args.synthetic_rows, blocks=args.synthetic_blocks)
        text += synthetic_markdown(results["synthetic"])
    write_section(f"{args.out}.md", text)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
