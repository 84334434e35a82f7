"""The proof: this tool against the tutorials' way, on real data, in one command.

For every --data folder (default: ../shared/datasets/trashnet and fruits, when present):

1. the tutorials' way (``bench/tutorial_way.py`` in a fresh process): ``image_dataset_from_directory``
   with a seeded split, the frozen backbone + Dropout/Dense softmax trained end to end for --epochs,
   scikit-learn's classification report on the test split;
2. this tool: ``python cli.py extract`` into an empty store, then ``python cli.py fit-head --kind all
   --json`` (fresh processes), with the same train/validation/test sizes;
   both --repeats times, interleaved: wall time to a trained classifier, backbone images/s, test
   accuracy and macro-F1 of every head and of the tutorials' model;
3. extraction vs the backbone alone (``bench/extract_bench.py``) for --backbone and --throughput-backbone;
4. Keras vs ONNX float vs ONNX int8 inference (``bench/export_bench.py``, when the checkout has it);
5. the edge runner (``bench/edge_bench.py``) on the ONNX model exported from the tool's head.

Writes --out (markdown: the command, the machine, the date, then the tables) and the raw results
as JSON beside it. No figure is typed by hand. A section that fails is reported in the file and
the others still run; the exit status is then 1.

Runtime on 2 cores (AMD EPYC, measured with other jobs on the machine, so a rough guide): --quick
(1 repeat, 2 epochs, at most 20 images per class) about 4 to 5 min per folder, plus about 30 s the
first time a backbone is converted to ONNX. The full default run on trashnet + fruits (3,918 images): about
4 to 4.5 h: the --throughput-backbone extraction runs (resnet50 at about 10 images/s) about 1.5 to 2 h
(``--throughput-backbone none`` skips them), the tutorials' training (5 epochs x 3 repeats) about 1.2 h,
this tool's runs about 25 min, extraction speed for --backbone about 20 min, the export section
(with fine-tuning) about 25 min, the edge runner about 10 min. ``--repeats 1`` divides most of it by 3.

Examples:
    python bench/run.py --quick --data ../shared/datasets/trashnet
    python bench/run.py                      # trashnet and fruits, efficientnet_lite0 + resnet50
    python bench/run.py --data photos/ --backbone mobilenet_v2 --repeats 5 --epochs 10 --out my-bench.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, command_line, default_data, fmt, machine, run_script, shown_path, spread  # noqa: E402
from edge.runner import RunnerConfig  # noqa: E402
from extract.backbones import list_backbones  # noqa: E402
from extract.dataset import discover  # noqa: E402
from extract.engine import ENGINES  # noqa: E402
from extract.splits import SplitSettings  # noqa: E402

STARTED = time.perf_counter()
QUICK = {"repeats": 1, "epochs": 2, "fine_tune_epochs": 1, "limit_per_class": 20}
DEFAULTS = {"repeats": 3, "epochs": 5, "fine_tune_epochs": 3, "limit_per_class": None}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.0f} s] {message}", file=sys.stderr, flush=True)


def subsample(data: Path, limit: int, seed: int, dest: Path) -> Path:
    """Copy at most ``limit`` randomly chosen images per class (per split folder too) to ``dest``."""
    groups: dict[tuple[str, str], list[str]] = {}
    dataset = discover(data)
    for entry in dataset.entries:
        split = entry.split if dataset.layout == "split-folders" else ""
        groups.setdefault((split, entry.class_name), []).append(entry.relpath)
    rng = random.Random(seed)
    for relpaths in groups.values():
        for relpath in rng.sample(relpaths, min(limit, len(relpaths))):
            (dest / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / relpath, dest / relpath)
    return dest


def run_tool(data: Path, workdir: Path, cfg: argparse.Namespace) -> dict:
    """``cli.py extract`` into an empty store, then ``cli.py fit-head --kind all``; wall time of both."""
    store, head = workdir / "features.h5", workdir / "head"
    extract = ["extract", str(data), "--store", str(store), "--backbone", cfg.backbone, "--weights", cfg.weights,
               "--batch-size", str(cfg.batch_size), "--engine", cfg.engine, "--seed", str(cfg.seed),
               "--validation-split", str(cfg.validation_split), "--test-split", str(cfg.test_split),
               "--json", "--quiet"]
    if cfg.input_size:
        extract += ["--input-size", str(cfg.input_size)]
    extract_seconds, lines = run_script([str(ROOT / "cli.py"), *extract])
    summary = json.loads(lines[-1])
    fit_seconds, lines = run_script([str(ROOT / "cli.py"), "fit-head", "--store", str(store), "--kind", "all",
                                     "--out", str(head), "--seed", str(cfg.seed), "--json"])
    return {
        "store": str(store), "head": str(head), "wall_seconds": extract_seconds + fit_seconds,
        "extract_seconds": extract_seconds, "fit_head_seconds": fit_seconds, "images": summary["images"],
        "failed": summary["failed"], "engine": summary["engine"],
        "extract_images_per_second": summary["images_per_second"],
        "heads": [json.loads(line) for line in lines],
    }


def run_tutorial(data: Path, cfg: argparse.Namespace, validation_share: float, test_share: float) -> dict:
    """``bench/tutorial_way.py`` in a fresh process; wall time from its launch to the end of ``fit``."""
    args = [str(ROOT / "bench" / "tutorial_way.py"), str(data), "--backbone", cfg.backbone, "--weights", cfg.weights,
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed),
            "--validation-split", repr(validation_share), "--test-split", repr(test_share)]
    if cfg.input_size:
        args += ["--input-size", str(cfg.input_size)]
    launched = time.time()  # wall clock: the child stamps the end of fit with time.time() too
    seconds, lines = run_script(args)
    result = json.loads(lines[-1])
    # Each epoch runs the backbone over the train and the validation images again.
    passes = result["epochs"] * (result["n_train"] + result["n_val"])
    return {**result, "wall_seconds": result["trained_at"] - launched, "process_seconds": seconds,
            "backbone_images_per_second": passes / result["fit_seconds"]}


def compare_pipelines(data: Path, workdir: Path, cfg: argparse.Namespace) -> dict:
    """Both pipelines ``cfg.repeats`` times, interleaved so that a drift in machine load hits both alike."""
    counts = discover(data, SplitSettings(cfg.validation_split, cfg.test_split, cfg.seed)).split_counts()
    total = sum(counts.values())
    tool, tutorial = [], []
    for i in range(cfg.repeats):
        log(f"{data.name}: this tool, run {i + 1}/{cfg.repeats}")
        tool.append(run_tool(data, workdir / f"tool-{i}", cfg))
        log(f"{data.name}: the tutorials' way, run {i + 1}/{cfg.repeats}")
        tutorial.append(run_tutorial(data, cfg, counts["validation"] / total, counts["test"] / total))
    heads = {}
    for row in tool[0]["heads"]:
        kind = row["kind"]
        rows = [next(r for r in run["heads"] if r["kind"] == kind) for run in tool]
        heads[kind] = {"saved": row["saved"], "n_train": row["n_train"], "n_val": row["n_val"],
                       "n_test": row["n_test"], **_metrics(rows)}
    return {
        "split_counts": counts,
        "tool": {"wall_seconds": spread([r["wall_seconds"] for r in tool]),
                 "extract_images_per_second": spread([r["extract_images_per_second"] for r in tool]),
                 "engine": tool[0]["engine"], "images": tool[0]["images"], "failed": tool[0]["failed"],
                 "heads": heads, "store": tool[0]["store"], "head": tool[0]["head"], "runs": tool},
        "tutorial": {"wall_seconds": spread([r["wall_seconds"] for r in tutorial]),
                     "backbone_images_per_second": spread([r["backbone_images_per_second"] for r in tutorial]),
                     "epochs": cfg.epochs, "n_train": tutorial[0]["n_train"], "n_val": tutorial[0]["n_val"],
                     "n_test": tutorial[0]["n_test"], **_metrics(tutorial), "runs": tutorial},
    }


def _metrics(rows: list[dict]) -> dict:
    """Spread of test accuracy and macro-F1 over runs (None without a test split)."""
    return {key: spread([r[key] for r in rows]) if rows[0][key] is not None else None
            for key in ("test_accuracy", "test_macro_f1")}


def run_bench_script(name: str, args: list[str], workdir: Path, shown: dict[str, str]) -> dict:
    """``python bench/NAME.py ARGS`` in a fresh process; the JSON it writes beside its --out, and its command.

    A fresh process each: the edge runner's peak RSS is read with wait4, and Linux counts the parent's
    memory at fork in a child's peak, so a parent holding TensorFlow would inflate it; and
    export_bench can set TensorFlow's threads only before TensorFlow starts. ``shown`` replaces
    temporary paths in the command written to the report.
    """
    out = workdir / f"{name}.md"
    run_script([str(ROOT / "bench" / f"{name}.py"), *args, "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    command = ["python", f"bench/{name}.py", *(shown.get(a, a) for a in args)]
    return {"command": shlex.join(command), "result": result}


def guarded(results: dict, key: str, func: Callable[[], dict | list]) -> None:
    """``results[key] = func()``, or ``{"error": ...}``: one failing section must not lose an hours-long run."""
    try:
        results[key] = func()
    except Exception as exc:  # noqa: BLE001 - reported in the file and in the exit status
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{key} failed: {results[key]['error'][-500:]}")


def extraction_section(data: Path, workdir: Path, cfg: argparse.Namespace) -> list[dict]:
    """The extraction benchmark for the main backbone and, on a sample, the throughput backbone."""
    from bench.extract_bench import run_extract_benchmark

    runs = [(cfg.backbone, cfg.weights)]
    if cfg.throughput_backbone != "none":
        runs.append((cfg.throughput_backbone, cfg.throughput_weights))
    out = []
    for backbone, weights in runs:
        folder = data
        if backbone != cfg.backbone and cfg.throughput_limit_per_class:
            log(f"{data.name}: sampling at most {cfg.throughput_limit_per_class} images per class for {backbone}")
            folder = subsample(data, cfg.throughput_limit_per_class, cfg.seed,
                               workdir / "throughput-sample" / data.name)
        log(f"{data.name}: extraction benchmark, {backbone} (weights {weights})")
        run = run_extract_benchmark(str(folder), backbone=backbone, weights=weights,
                                    batch=cfg.batch_size, repeats=cfg.repeats, engine=cfg.engine)
        out.append({**run, "sampled_per_class": cfg.throughput_limit_per_class if folder != data else None})
    return out


def bench_folder(data: Path, shown_data: str, workdir: Path, cfg: argparse.Namespace) -> dict:
    """Every section on one folder; ``shown_data`` is how the folder appears in the commands written."""
    dataset = discover(data, SplitSettings(cfg.validation_split, cfg.test_split, cfg.seed))
    result: dict = {"path": str(data), "name": data.name, "images": len(dataset.entries),
                    "classes": dataset.class_names, "layout": dataset.layout}
    if cfg.skip_extract:
        result["extraction"] = {"skipped": "--skip-extract"}
    else:
        guarded(result, "extraction", lambda: extraction_section(data, workdir, cfg))
    guarded(result, "pipelines", lambda: compare_pipelines(data, workdir, cfg))
    pipelines = result["pipelines"]
    shown = {str(data): shown_data}
    if "error" not in pipelines:
        shown.update({pipelines["tool"]["store"]: "STORE", pipelines["tool"]["head"]: "HEAD",
                      str(workdir / "model.onnx"): "MODEL.onnx"})

    def export_section() -> dict:
        log(f"{data.name}: export benchmark")
        args = ["--data", str(data), "--backbone", cfg.backbone, "--weights", cfg.weights,
                "--store", pipelines["tool"]["store"], "--head", pipelines["tool"]["head"],
                "--epochs", str(cfg.fine_tune_epochs), "--repeats", str(cfg.repeats), "--seed", str(cfg.seed)]
        if cfg.input_size:
            args += ["--image-size", str(cfg.input_size)]
        return run_bench_script("export_bench", args, workdir, shown)

    def edge_section() -> dict:
        log(f"{data.name}: export-onnx of the tool's head, then the edge benchmark")
        model = workdir / "model.onnx"
        seconds, _ = run_script([str(ROOT / "cli.py"), "export-onnx", "--store", pipelines["tool"]["store"],
                                 "--head", pipelines["tool"]["head"], "--out", str(model)])
        args = ["--model", str(model), "--images", str(data), "--batch-size", str(cfg.edge_batch_size),
                "--repeats", str(cfg.repeats)]
        return {**run_bench_script("edge_bench", args, workdir, shown), "export_onnx_seconds": seconds}

    for key, flag, section in (("export_bench", "--skip-export", export_section),
                               ("edge_bench", "--skip-edge", edge_section)):
        if getattr(cfg, flag[2:].replace("-", "_")):
            result[key] = {"skipped": flag}
        elif not (ROOT / "bench" / f"{key}.py").is_file():
            result[key] = {"skipped": f"bench/{key}.py is not in this checkout"}
        elif "error" in pipelines:
            result[key] = {"skipped": "it needs this tool's trained head, and the pipeline comparison failed"}
        else:
            guarded(result, key, section)
    return result


# ---------------------------------------------------------------------------------------------- markdown


def _cell(stat: dict | None, digits: int) -> str:
    return "-" if stat is None else fmt(stat, digits)


def _demote(text: str) -> str:
    """Sections written by the other bench scripts start at ``##``; here they sit one level lower."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"


def _error(section: dict) -> str | None:
    if "error" in section:
        return f"**Failed**:\n\n```text\n{section['error'][-1500:]}\n```\n"
    if "skipped" in section:
        return f"Skipped: {section['skipped']}.\n"
    return None


def pipelines_markdown(r: dict, cfg: dict) -> str:
    p = r["pipelines"]
    title = f"### {r['name']}: {r['images']} images, {len(r['classes'])} classes\n"
    problem = _error(p)
    if problem:
        return f"{title}\n{problem}"
    tool, tut = p["tool"], p["tutorial"]
    kept = next(kind for kind, h in tool["heads"].items() if h["saved"])
    h = tool["heads"][kept]
    if r["layout"] == "split-folders":
        how_tool, how_tutorial = "the train/validation/test folders", "the same folders"
    else:
        how_tool = f"a hash of each image's path, seed {cfg['seed']}"
        how_tutorial = "Keras' seeded shuffle: the same sizes, not the same images"
    lines = [
        title,
        f"Splits: this tool {h['n_train']} train / {h['n_val']} validation / {h['n_test']} test ({how_tool}); "
        f"the tutorials' way {tut['n_train']} / {tut['n_val']} / {tut['n_test']} ({how_tutorial})."
        + (f" One test image is {100 / h['n_test']:.2f} accuracy points." if h["n_test"] else ""),
        "",
        "| classifier | wall time to a trained classifier (s) | backbone images/s | test accuracy | test macro-F1 |",
        "|---|---|---|---|---|",
        f"| tutorials' way: frozen {cfg['backbone']} + dense head trained end to end, {tut['epochs']} epochs "
        f"| {fmt(tut['wall_seconds'])} | {fmt(tut['backbone_images_per_second'])} "
        f"| {_cell(tut['test_accuracy'], 3)} | {_cell(tut['test_macro_f1'], 3)} |",
    ]
    for kind, head in tool["heads"].items():
        note = ", kept (best cross-validation accuracy)" if head["saved"] else ""
        lines.append(f"| this tool: `extract` + `fit-head --kind all`, {kind} head{note} | {fmt(tool['wall_seconds'])} "
                     f"| {fmt(tool['extract_images_per_second'])} | {_cell(head['test_accuracy'], 3)} "
                     f"| {_cell(head['test_macro_f1'], 3)} |")
    speedup = tut["wall_seconds"]["median"] / tool["wall_seconds"]["median"]
    lines += [
        "",
        f"- This tool reaches a trained classifier **{speedup:.1f}x** as fast as the tutorials' way (median wall "
        f"times; its one run trains all {len(tool['heads'])} heads, hence the same time on each row).",
        f"- Backbone images/s: for this tool, `extract`'s decode+infer+write loop (engine `{tool['engine']}`), each "
        f"image once; for the tutorials' way, (train + validation images) x epochs / time in `fit`, every image "
        f"again at each epoch, with the augmentation and the head's training.",
        f"- Wall time: from launching the first process to the trained classifier (the saved head; the end of "
        f"`fit`), Python and TensorFlow start-up included.",
    ]
    if tool["failed"]:
        lines.append(f"- {tool['failed']} images could not be decoded by `extract` and were left out.")
    return "\n".join(lines) + "\n"


def sections_markdown(results: list[dict], key: str, render: Callable[[dict, dict], str]) -> str:
    """One section per folder: ``render(section, folder)``, or a line saying why there is none."""
    parts = []
    for r in results:
        problem = _error(r[key])
        parts.append(f"### {r['name']}\n\n{problem}" if problem else render(r[key], r))
    return "\n".join(parts)


def extraction_markdown(runs: list[dict], folder: dict, cfg: dict) -> str:
    from bench.extract_bench import to_markdown as extract_markdown

    parts = []
    for run in runs:
        sampled = run.get("sampled_per_class")
        data_shown = "THROUGHPUT_SAMPLE" if sampled else folder["data_shown"]
        command = shlex.join(["python", "bench/extract_bench.py", "--data", data_shown, "--backbone",
                              run["backbone"], "--weights", run["weights"], "--batch-size", str(cfg["batch_size"]),
                              "--repeats", str(cfg["repeats"]), "--engine", cfg["engine"]])
        note = (f"\nTHROUGHPUT_SAMPLE: at most {sampled} images per class of {folder['name']} (seed "
                f"{cfg['seed']}), copied to a temporary folder: a rate needs no more images.\n" if sampled else "")
        parts.append(_demote(extract_markdown(run)) + note + f"\nStand-alone: `{command}`\n")
    return "\n".join(parts)


def script_markdown(section: dict, name: str) -> str:
    """A section run by ``run_bench_script``: the script's own markdown and its stand-alone command."""
    text = importlib.import_module(f"bench.{name}").to_markdown(section["result"])
    # The script's own "Measured <now>" / "Command: <argv>" lines would describe this process, not the run:
    # the report's header gives the date and command, the line below the stand-alone command.
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("Measured ", "Command: `")))
    extra = (f" (on the model from `python cli.py export-onnx --store STORE --head HEAD --out MODEL.onnx`, "
             f"{section['export_onnx_seconds']:.0f} s)" if "export_onnx_seconds" in section else "")
    return _demote(text) + f"\nStand-alone: `{section['command']}`{extra}\n"


def to_markdown(report: dict) -> str:
    cfg = report["config"]
    data_lines = [f"- {r['name']}: `{shown_path(r['source'])}`, {r['images']} images, {len(r['classes'])} classes "
                  f"({', '.join(r['classes'])})" for r in report["datasets"]]
    lines = [
        "# Benchmarks: this tool vs the tutorials' way",
        "",
        f"Generated {report['date']} on {report['machine']} ({report['versions']}) by",
        "",
        f"    {report['command']}",
        "",
        f"in {report['total_seconds'] / 60:.1f} min. Every figure below is computed by that command (raw results: "
        f"`{Path(report['json']).name}` beside this file). Timings are medians of {cfg['repeats']} run(s), "
        f"with (min–max). STORE, HEAD and MODEL.onnx in the stand-alone commands were temporary files of that run.",
        "",
        f"Backbone `{cfg['backbone']}` (weights {cfg['weights']}), batch {cfg['batch_size']}, engine "
        f"{cfg['engine']}, split seed {cfg['seed']}, {cfg['validation_split']:g} validation / "
        f"{cfg['test_split']:g} test. Data:",
        "",
        *data_lines,
    ]
    if cfg["limit_per_class"]:
        lines += ["", f"**Each folder was subsampled to at most {cfg['limit_per_class']} images per class "
                      f"(seed {cfg['seed']}) into a temporary SAMPLE folder: a quick check, not representative "
                      f"figures.**"]
    lines += [
        "", "## The tutorials' way vs this tool", "",
        "The tutorials' way is `bench/tutorial_way.py`: `keras.utils.image_dataset_from_directory` with a seeded "
        "split, random flip and rotation, the same frozen backbone (same weights and preprocessing as this tool), "
        "GlobalAveragePooling + Dropout(0.2) + Dense softmax trained with Adam, then scikit-learn's "
        "classification report on the test split. This tool: `python cli.py extract DIR --store STORE` then "
        "`python cli.py fit-head --store STORE --kind all --json`, each in a fresh process, on an empty store.",
        "",
        "\n".join(pipelines_markdown(r, cfg) for r in report["datasets"]),
        "## Extraction speed: `extract` vs the backbone alone",
        "",
        sections_markdown(report["datasets"], "extraction", lambda s, r: extraction_markdown(s, r, cfg)),
        "## Keras vs ONNX float vs ONNX int8 inference",
        "",
        sections_markdown(report["datasets"], "export_bench", lambda s, r: script_markdown(s, "export_bench")),
        "## Edge runner",
        "",
        sections_markdown(report["datasets"], "edge_bench", lambda s, r: script_markdown(s, "edge_bench")),
        other_sections_markdown(ROOT / "docs" / "bench"),
    ]
    return "\n".join(lines).rstrip() + "\n"


def other_sections_markdown(folder: Path) -> str:
    """The sections other bench scripts wrote to ``docs/bench/*.md``, each with its own command."""
    parts = [_demote(path.read_text()) for path in sorted(folder.glob("*.md"))]
    if not parts:
        return ""
    intro = ("## Other benchmarks\n\nEach section below was written by its own script under `bench/` into "
             "`docs/bench/NAME.md` (its command and date are in the section); `python bench/run.py --assemble` "
             "copies them here without re-running anything.\n")
    return "\n".join([intro, *parts])


# ---------------------------------------------------------------------------------------------- main


def _versions() -> str:
    found = []
    for package in ("tensorflow", "keras", "onnxruntime", "scikit-learn"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    backbones = [spec.name for spec in list_backbones()]  # a wrong name fails now, not after an hour
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", metavar="DIR", type=Path, default=None,
                        help="image folder (repeatable) [default: ../shared/datasets/trashnet and fruits]")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=backbones, metavar="NAME",
                        help="backbone of both pipelines (see `python cli.py backbones`) [default: efficientnet_lite0]")
    parser.add_argument("--weights", metavar="W", default="imagenet", help="imagenet, none or a weights file")
    parser.add_argument("--throughput-backbone", default="resnet50", choices=[*backbones, "none"], metavar="NAME",
                        help="second backbone for the extraction-speed section only, or none [default: resnet50]")
    parser.add_argument("--throughput-weights", metavar="W", default="none",
                        help="weights of --throughput-backbone (speed does not depend on them) [default: none]")
    parser.add_argument("--throughput-limit-per-class", type=int, metavar="N", default=None,
                        help="run --throughput-backbone on at most N images per class (a rate needs no more; "
                             "resnet50 runs about 10 images/s here) [default: all]")
    parser.add_argument("--repeats", type=int, metavar="N", default=None, help="runs of each measurement [default: 3, --quick 1]")
    parser.add_argument("--epochs", type=int, metavar="N", default=None,
                        help="epochs of the tutorials' way [default: 5, where tutorial 001 stopped; --quick 2]")
    parser.add_argument("--fine-tune-epochs", type=int, metavar="N", default=None,
                        help="fine-tuning epochs in the export section [default: 3; --quick 1]")
    parser.add_argument("--limit-per-class", type=int, metavar="N", default=None,
                        help="subsample at most N images per class into a temporary folder [default: all; --quick 20]")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 2 epochs, 1 fine-tuning epoch, at most 20 images per class")
    parser.add_argument("--batch-size", type=int, metavar="N", default=32,
                        help="batch of extraction and training [default: 32]")
    parser.add_argument("--edge-batch-size", type=int, metavar="N", default=RunnerConfig.batch_size,
                        help="batch of the edge runner [default: %(default)s, the runner's default]")
    parser.add_argument("--input-size", type=int, metavar="PX", default=None, help="square input size [default: the backbone's]")
    parser.add_argument("--engine", choices=ENGINES, default=ENGINES[0], help="extraction engine")
    parser.add_argument("--validation-split", type=float, metavar="SHARE", default=SplitSettings().validation_split,
                        help="as for extract; the tutorials' way gets the same number of images")
    parser.add_argument("--test-split", type=float, metavar="SHARE", default=SplitSettings().test_split)
    parser.add_argument("--seed", type=int, default=0, help="split, sampling and training seed")
    parser.add_argument("--skip-extract", action="store_true", help="no extraction-speed section")
    parser.add_argument("--skip-export", action="store_true", help="no Keras/ONNX/int8 inference section")
    parser.add_argument("--skip-edge", action="store_true", help="no edge-runner section")
    parser.add_argument("--assemble", action="store_true",
                        help="measure nothing: rewrite FILE.md from FILE.json and the sections in docs/bench/")
    parser.add_argument("--out", type=Path, metavar="FILE.md", default=ROOT / "docs" / "benchmarks.md",
                        help="markdown report; the raw results go beside it as FILE.json [default: docs/benchmarks.md]")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.assemble:
        return args
    if args.data is None:
        args.data = [Path(d) for d in (default_data("trashnet"), default_data("fruits")) if d]
        if not args.data:
            parser.error("--data is required when ../shared/datasets is absent")
    for folder in args.data:
        if not folder.is_dir():
            parser.error(f"--data {folder}: not a folder")
    if min(args.repeats, args.epochs, args.fine_tune_epochs, args.limit_per_class or 1,
           args.throughput_limit_per_class or 1) < 1:
        parser.error("--repeats, --epochs, --fine-tune-epochs and the --...-per-class limits must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, out_json = args.out, args.out.with_suffix(".json")
    if args.assemble:
        out.write_text(to_markdown(json.loads(out_json.read_text())))
        log(f"wrote {out} from {out_json} and docs/bench/*.md")
        return 0
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("data", "out")}
    report = {"command": command_line(), "machine": machine(), "versions": _versions(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": config, "json": str(out_json),
              "datasets": []}
    with tempfile.TemporaryDirectory(prefix="transferkit-bench-") as tmp:
        for index, folder in enumerate(args.data):
            source = folder.resolve()
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            data = source
            if args.limit_per_class:
                log(f"{source.name}: sampling at most {args.limit_per_class} images per class")
                data = subsample(source, args.limit_per_class, args.seed, workdir / "sample" / source.name)
            shown = "SAMPLE" if args.limit_per_class else shown_path(folder)
            report["datasets"].append({**bench_folder(data, shown, workdir, args), "source": str(source),
                                       "data_shown": shown})
    report["total_seconds"] = time.perf_counter() - STARTED
    out.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    out.write_text(to_markdown(json.loads(out_json.read_text())))  # rendered from the JSON, as --assemble does
    log(f"wrote {out} and {out_json}")
    failed = [f"{r['name']}/{key}" for r in report["datasets"] for key, section in r.items()
              if isinstance(section, dict) and "error" in section]
    if failed:
        log(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
