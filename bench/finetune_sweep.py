"""Learning rate, schedule and epochs of cached fine-tuning: several settings trained on ONE front cache.

Extracts a store and keeps the best head (`fit-head --kind all`) as bench/finetune_bench.py does, then
does what `fine-tune --head` does up to the training (the fit / stop / decide rows of export.holdout,
the cut, the front cache, the head to beat) once, and trains the last blocks once per setting from the
same start (the back's weights restored, the same seed). For each setting: the best epoch and its score
on the stop rows (they picked it: optimistic), the decide score (the validation split, which decides
keep-or-not), and the test score (front outputs of the test images cached after every decision; a
report only). The setting to make the default is the one with the best decide score, not test.

`--summarize A.json B.json ...` (sweeps of several data sets) writes which setting has the best mean
decide score over the data sets that measured it on all of them (a tie keeps the tool's default), beside
the tool's default.

Example:
    python bench/finetune_sweep.py --data ../shared/datasets/fruits --out docs/bench/finetune-sweep-fruits.md
    python bench/finetune_sweep.py --summarize docs/bench/finetune-sweep-*.json --out docs/bench/finetune-sweep.md
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench.common import data_parser, default_data, header, parse_data_args, shown_path, write_results  # noqa: E402
from bench.finetune_bench import prepare  # noqa: E402

DEFAULT_SETTINGS = "3e-5:cosine:6,1e-4:cosine:6,3e-4:cosine:6,1e-4:constant:6,3e-4:constant:6,1e-4:cosine:10"


def parse_settings(text: str) -> list[dict]:
    """``LR:SCHEDULE:EPOCHS,...`` -> [{"learning_rate", "schedule", "epochs"}, ...]."""
    from export.finetune import SCHEDULES

    settings = []
    for item in text.split(","):
        rate, schedule, epochs = item.split(":")
        if schedule not in SCHEDULES:  # an unknown name would have run the cosine schedule under its name
            raise ValueError(f"schedule {schedule!r} in {item!r}: one of {', '.join(SCHEDULES)}")
        settings.append({"learning_rate": float(rate), "schedule": schedule, "epochs": int(epochs)})
    return settings


def sweep(begin, roles, base, settings: list[dict], work: Path) -> tuple[dict, list[dict]]:
    """The head to beat and one row per setting, all from one front cache."""
    import keras
    import numpy as np
    from dataclasses import replace

    from export.finetune_cached import accuracy_on, compare, inference, prepare as prepare_rows, train_back
    from export.front_cache import cache_front

    skipped: dict[str, str] = {}
    started = time.perf_counter()
    prepared = prepare_rows(begin, roles, base, skipped)
    cached_seconds = time.perf_counter() - started
    back, initial = prepared.halves.back, prepared.halves.back.get_weights()
    baseline = prepared.baseline
    test_images = begin.images.subset("test")
    rows = []
    for setting in settings:
        back.set_weights(initial)
        keras.utils.set_random_seed(base.seed)
        trained_at = time.perf_counter()
        _, trainer, run = train_back(begin, prepared, replace(base, **setting), work / "sweep.best.keras")
        comparison = compare(trainer, prepared, base.batch_size)
        rows.append({**setting, "best_epoch": run.best_epoch, "epochs_run": run.epochs_run,
                     "train_loss": run.history["loss"][-1],
                     "stop": comparison.stop_accuracy, "decide": comparison.fine_tuned, "kept": comparison.kept,
                     "train_seconds": time.perf_counter() - trained_at,
                     "trained": (trainer, trainer.get_weights())})
    # the test split, read only now: every decision above is made
    back.set_weights(initial)
    test = cache_front(prepared.halves.front, test_images, begin.built.input_size, base.batch_size, False, skipped)
    head_test = float(np.mean(baseline.head.predict(inference(back, test.tensors)) == test.labels))
    for row in rows:  # the back is shared: each trainer gets its own trained weights back to be scored
        trainer, weights = row.pop("trained")
        trainer.set_weights(weights)
        row["test"] = accuracy_on(trainer, test, base.batch_size)
    head = {"kind": baseline.kind, "decide": baseline.accuracy, "test": head_test, "images": baseline.head_images,
            "cache_and_head_seconds": cached_seconds, "rows": {**roles.counts(), "test": len(test.labels)}}
    return head, rows


def run(data: str, backbone: str, weights: str, blocks: int, settings: list[dict], seed: int = 0,
        workdir: str | None = None) -> dict:
    from export.finetune import TrainingSettings, head_test_score, starting_point
    from export.holdout import row_roles

    with tempfile.TemporaryDirectory(prefix="finetune-sweep-", dir=workdir) as tmp:
        work = Path(tmp)
        prepared = prepare(data, work, backbone, weights, seed)
        begin = starting_point(data, None, prepared["head"], prepared["store"], None, None, seed)
        roles = row_roles(begin.images.subset("train"), begin.images.subset("validation"), begin.split_settings,
                          begin.split_anchors)
        base = TrainingSettings.for_mode(True, None, None, seed=seed, blocks=blocks)
        head, rows = sweep(begin, roles, base, settings, work)
        head["fit_head_test"] = (head_test_score(prepared["head"], begin.store) or {}).get("accuracy")
    prepared = {k: v for k, v in prepared.items() if k not in ("store", "head")}
    best = max(rows, key=lambda r: (r["decide"], r["stop"]))
    return {"data": shown_path(data), "backbone": backbone, "weights": weights, "blocks": blocks,
            "defaults": {"learning_rate": base.learning_rate, "schedule": base.schedule, "epochs": base.epochs,
                         "patience": base.patience, "batch_size": base.batch_size},
            **prepared, "head": head, "settings": rows, "best_on_decide": {k: best[k] for k in settings[0]},
            "load_average_1min_at_end": os.getloadavg()[0]}


def to_markdown(r: dict) -> str:
    head, d = r["head"], r["defaults"]
    n = head["rows"]
    lines = [
        header(f"Fine-tuning settings on one front cache, {r['backbone']} on {Path(r['data']).name}"),
        f"Data `{r['data']}`; backbone `{r['backbone']}` ({r['weights']}); last {r['blocks']} blocks trained. "
        f"Rows: {n['fit']} fit (train), {n['stop']} stop (carved from train: pick the epoch), "
        f"{n['decide']} decide ({n['decide_source']}), {n['test']} test (report only). "
        f"Head to beat: `{head['kind']}` (the kind `fit-head --kind all` kept, CV {r['head_cv_accuracy']:.3f}), "
        f"fitted on the {head['images']} fit + stop rows. Defaults of this run: {d}.\n",
        "| learning rate | schedule | epochs (run, best) | stop rows (picked the epoch) | decide (validation) "
        "| test (report only) | kept | train s |",
        "|--:|---|---|--:|--:|--:|---|--:|",
        f"| `{head['kind']}` head (fit + stop rows) | – | – | – | {head['decide']:.3f} | {head['test']:.3f} | – "
        "| – |",
    ]
    if head.get("fit_head_test") is not None:
        lines.append(f"| `{head['kind']}` head of `fit-head` (train + validation: what is kept otherwise) | – | – "
                     f"| – | (in-sample) | {head['fit_head_test']:.3f} | – | – |")
    for row in r["settings"]:
        lines.append(f"| {row['learning_rate']:g} | {row['schedule']} | {row['epochs']} ({row['epochs_run']}, "
                     f"{row['best_epoch']}) | {row['stop']:.3f} | {row['decide']:.3f} | {row['test']:.3f} | "
                     f"{row['kept']} | {row['train_seconds']:.0f} |")
    best = r["best_on_decide"]
    lines += ["", f"Best decide score (ties: stop score): learning rate {best['learning_rate']:g}, "
              f"{best['schedule']}, {best['epochs']} epochs. Seconds: extract {r['extract_seconds']:.0f}, fit-head "
              f"{r['fit_head_seconds']:.0f}, cache + head to beat {head['cache_and_head_seconds']:.0f}. The machine "
              f"was shared (1-minute load average {r['load_average_1min_at_end']:.1f} at the end on "
              f"{len(os.sched_getaffinity(0))} cores): the seconds are upper bounds.\n"]
    return "\n".join(lines)


def setting_key(row: dict) -> tuple:
    return row["learning_rate"], row["schedule"], row["epochs"]


def summarize(paths: list[str]) -> dict:
    """Mean decide score of each setting over the data sets (settings measured on every one of them)."""
    from export.finetune import TrainingSettings

    runs = [json.loads(Path(p).read_text()) for p in paths]
    by_data: dict[str, dict[tuple, dict]] = {}
    for run in runs:
        by_data.setdefault(run["data"], {}).update({setting_key(row): row for row in run["settings"]})
    common = set.intersection(*(set(rows) for rows in by_data.values()))
    rows = [{"learning_rate": k[0], "schedule": k[1], "epochs": k[2],
             **{data: {m: by_data[data][k][m] for m in ("stop", "decide", "test", "kept")} for data in by_data},
             "mean_decide": sum(by_data[d][k]["decide"] for d in by_data) / len(by_data)} for k in sorted(common)]
    default = TrainingSettings.for_mode(True, None, None)
    default = (default.learning_rate, default.schedule, default.epochs)
    # a tie keeps the default: no change without evidence
    best = max(rows, key=lambda r: (round(r["mean_decide"], 9), setting_key(r) == default))
    return {"sources": [str(p) for p in paths], "data": sorted(by_data), "settings": rows,
            "best": setting_key(best), "default": default}


def summary_markdown(r: dict) -> str:
    data = r["data"]
    lines = [header("Fine-tuning settings over the data sets: mean validation (decide) score"),
             f"From {', '.join(f'`{s}`' for s in r['sources'])} (settings measured on every data set).\n",
             "| learning rate | schedule | epochs | " + " | ".join(f"{Path(d).name} decide (test)" for d in data)
             + " | mean decide |", "|--:|---|--:|" + "--:|" * (len(data) + 1)]
    for row in r["settings"]:
        cells = " | ".join(f"{row[d]['decide']:.3f} ({row[d]['test']:.3f})" for d in data)
        lines.append(f"| {row['learning_rate']:g} | {row['schedule']} | {row['epochs']} | {cells} | "
                     f"{row['mean_decide']:.3f} |")
    best, default = r["best"], r["default"]
    same = tuple(best) == tuple(default)
    lines += ["", f"Best mean decide score: learning rate {best[0]:g}, {best[1]}, {best[2]} epochs; the tool's "
              f"default is {default[0]:g}, {default[1]}, {default[2]} epochs: "
              f"{'the same' if same else 'DIFFERENT'}. Chosen on validation, never on test; a tie keeps the "
              "default.\n"]
    return "\n".join(lines)


def main() -> None:
    parser = data_parser(__doc__, "finetune-sweep.md")
    parser.set_defaults(data=default_data("fruits"))
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="LR:SCHEDULE:EPOCHS,... (schedule: cosine or "
                        f"constant; default {DEFAULT_SETTINGS})")
    parser.add_argument("--workdir", default=None, help="where the temporary store goes (default: the system's)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="sweeps' JSON files: write the settings' mean decide score over their data sets")
    if "--summarize" in sys.argv:
        args = parser.parse_args()
        result = summarize(args.summarize)
        write_results(args.out, summary_markdown(result), result)
        return
    args = parse_data_args(parser)
    try:
        settings = parse_settings(args.settings)
    except ValueError as error:
        parser.error(f"--settings: {error}")
    if "--data" in sys.argv:  # the command line the output names, runnable from the main checkout
        sys.argv[sys.argv.index("--data") + 1] = shown_path(args.data)
    result = run(args.data, args.backbone, args.weights, args.blocks, settings, workdir=args.workdir)
    write_results(args.out, to_markdown(result), result)


if __name__ == "__main__":
    main()
