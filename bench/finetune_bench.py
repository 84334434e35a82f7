"""Fine-tuning on cached front outputs vs the best head, on a real image folder.

Extracts a store with the backbone (real ImageNet weights), keeps the best head (`fit-head --kind all`,
chosen by cross-validation), then runs `fine-tune --head` with its defaults: the last blocks train on
the cached front outputs (the epoch picked on a carve of the train split), and the model is kept only
when it beats a head of the same kind fitted on the same train images, on the validation images, which
chose nothing before. Test accuracy of both is reported, after the choice: does the decision agree?

Example:
    python bench/finetune_bench.py --data ../shared/datasets/fruits --out docs/bench/finetune.md
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench.common import data_parser, default_data, header, parse_data_args, shown_path, write_results  # noqa: E402


def prepare(data: str, work: Path, backbone: str, weights: str, seed: int) -> dict:
    """Extract ``data`` into a store in ``work`` and keep the best head by CV; their timings."""
    from classify.train import fit_heads
    from extract.job import run_extraction

    store, head = work / "features.h5", work / "head"
    started = time.perf_counter()
    run_extraction(data, store, backbone=backbone, weights=weights, seed=seed, progress=False)
    extracted = time.perf_counter()
    rows = fit_heads(str(store), kind="all", backbone=backbone, out=str(head), seed=seed)
    kept = next(r for r in rows if r["saved"])
    return {"store": store, "head": head, "extract_seconds": extracted - started,
            "fit_head_seconds": time.perf_counter() - extracted, "head_kind": kept["kind"],
            "head_cv_accuracy": kept["cv_accuracy"], "head_cv_std": kept["cv_std"]}


def run(data: str, backbone: str, weights: str, blocks: int, epochs: int | None, learning_rate: float | None,
        seed: int = 0, workdir: str | None = None) -> dict:
    from export.finetune import fine_tune

    with tempfile.TemporaryDirectory(prefix="finetune-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        prepared = prepare(data, work, backbone, weights, seed)
        result = fine_tune(data, None, work / "model.keras", head=prepared["head"], store=prepared["store"],
                           blocks=blocks, epochs=epochs, learning_rate=learning_rate, seed=seed)
    settings = {"blocks": blocks, "epochs": epochs or "default", "learning_rate": learning_rate or "default"}
    prepared = {k: v for k, v in prepared.items() if k not in ("store", "head")}
    return {"data": shown_path(data), "backbone": backbone, "weights": weights, "settings": settings, **prepared,
            "load_average_1min_at_end": os.getloadavg()[0], "fine_tune": result.to_dict()}


def to_markdown(r: dict) -> str:
    ft = r["fine_tune"]
    c, head_test, test = ft["comparison"], ft["head_test"] or {}, ft["test"]
    cut = ft["cut"]
    from export.finetune_cached import HeadComparison

    line = HeadComparison(**{k: v for k, v in c.items() if k != "kept"}).line("MODEL").replace("; wrote MODEL", "")
    agrees = (test["accuracy"] > head_test.get("accuracy", float("nan"))) == (c["kept"] == "fine-tuned")
    return "\n".join([
        header(f"Fine-tuning on cached front outputs vs the best head, {r['backbone']} on {Path(r['data']).name}"),
        f"Data `{r['data']}`; backbone `{r['backbone']}` ({r['weights']}). Best head by 5-fold CV "
        f"(`fit-head --kind all`): `{r['head_kind']}`, CV {r['head_cv_accuracy']:.3f} ± {r['head_cv_std']:.3f}. "
        f"`fine-tune --head` with {r['settings']}: cut after `{cut['layer']}`, blocks {', '.join(cut['blocks'])} "
        f"trained ({ft['trainable_layers']} layers), {ft['epochs_run']} epochs run (best {ft['best_epoch']}); "
        f"front cache {cut['cache_bytes_per_image']:,} bytes per image, {cut['cached_tensors']} tensors "
        f"(train twice: as is and mirrored).\n",
        "| model | stop rows (picked the epoch) | validation (decides) | test (report only) |",
        "|---|--:|--:|--:|",
        f"| `{c['head_kind']}` head fitted on the {c['head_images']} train images ({c['fit_images']} fit + "
        f"{c['stop_images']} stop) | – | {c['head']:.3f} | – |",
        f"| `{c['head_kind']}` head of `fit-head` (train + validation) | – | (in-sample) | "
        f"{head_test.get('accuracy', float('nan')):.3f} |",
        f"| fine-tuned (last {len(cut['blocks'])} blocks + classifier, trained on the {c['fit_images']} fit "
        f"rows) | {c['stop_accuracy']:.3f} | {c['fine_tuned']:.3f} | {test['accuracy']:.3f} |",
        "",
        f"Decision: **{line}**. On test the fine-tuned model is "
        f"{'better' if test['accuracy'] > head_test.get('accuracy', float('nan')) else 'not better'} than the "
        f"`fit-head` head: the decision {'agrees' if agrees else 'disagrees'} with test. Seconds: extract {r['extract_seconds']:.0f}, fit-head {r['fit_head_seconds']:.0f}, "
        f"fine-tune {ft['seconds']:.0f} (caching, head fit, training, test report). The machine was shared "
        f"(1-minute load average {r['load_average_1min_at_end']:.1f} at the end on "
        f"{len(os.sched_getaffinity(0))} cores): the seconds are upper bounds.\n",
    ])


def main() -> None:
    parser = data_parser(__doc__, "finetune.md")
    parser.set_defaults(data=default_data("fruits"))
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--workdir", default=None, help="where the temporary store goes (default: the system's)")
    args = parse_data_args(parser)
    if "--data" in sys.argv:  # the command line the output names, runnable from the main checkout
        sys.argv[sys.argv.index("--data") + 1] = shown_path(args.data)
    result = run(args.data, args.backbone, args.weights, args.blocks, args.epochs, args.learning_rate,
                 workdir=args.workdir)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
