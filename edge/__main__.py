"""Command line of the edge runner: ``python -m edge`` (``python cli.py edge`` forwards here)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .files import FolderLocked, lock_watch_folder, no_space_reason
from .imageio import printable
from .metrics import Metrics
from .model import ModelError, load_model
from .results import ResultLog, ResultsLocked
from .runner import Runner, RunnerConfig
from .swap import ModelSwapper

DESCRIPTION = """\
Watch a folder and classify every image that lands in it (subfolders included) with an ONNX
model exported by transferkit. CPU only; needs onnxruntime, numpy and Pillow, nothing else.
"""

EPILOG = """\
Example:
  python -m edge --model model.onnx --watch inbox/ --results results.jsonl \\
      --done processed/ --quarantine rejected/ --threads 2
  python -m edge --model model.onnx --watch photos/ --results results.jsonl --once
  python -m edge --model model.onnx --watch inbox/ --results results.jsonl \\
      --review review/ --review-below 0.6
  python -m edge --model model.onnx --watch inbox/ --results results.jsonl \\
      --metrics /var/lib/node_exporter/textfile/edge.prom

Writers: create files under a temporary name (.part, .tmp, .crdownload, ~ suffix or dot-file)
and rename them when complete, or never pause longer than --poll-seconds while writing; a file
is picked up once its size and mtime have not changed for --poll-seconds.

Output: one JSON line per file in --results: path (relative to --watch), sha256, label,
probability, top, model, latency_ms, time (UTC) and moved_to (relative to --done); for a file
that is not a readable image: path, sha256, error (and moved_to, relative to --quarantine).
With a model exported with an unknown score (ood_score output and ood metadata, as export-onnx
writes from a store and head) every line also has ood_score and unknown (true when ood_score is
above the calibrated threshold, which the log shows at start-up); an unknown image's label is
"unknown" and its best class stays first in top. --unknown off ignores the score. With --review,
unknown images and those whose top probability is below --review-below are also hard-linked
(copied across filesystems) into REVIEW/<label or unknown>/<path>, and the line says where
(review_copy, relative to --review); sort them into class folders that extract reads.
Without --done, files stay where they are and <results>.journal remembers them (every poll then
walks the whole tree: for folders of tens of thousands of files prefer --done). Lines are
fsynced per batch; after a crash, power loss or kill, run the same command again: every file
still gets exactly one line.

Model hot-swap: replace --model by renaming a complete file over it (cp new.onnx model.onnx.tmp;
mv model.onnx.tmp model.onnx). Once the new file has been unchanged for --poll-seconds, the runner
loads and checks it between batches (the batch in flight finishes with the old model) and goes on
with it; every line's "model" names the model that classified it. A file that cannot be used
(not ONNX, metadata or input breaking the contract) is refused with one log line and the old model
keeps running; that file is not tried again until it changes. Exactly-once holds across a swap.

Metrics: --metrics FILE is rewritten atomically every --metrics-interval seconds and at exit, in
the Prometheus text format: images, errors and unknowns, counts per label, a latency histogram,
the queue, the model id, swaps and refusals, and, for a model whose metadata has drift_reference,
the class mix and mean top probability of the last --drift-window images against the reference
split's (edge_drift_class_distance: total-variation distance, 0..1; edge_drift_confidence_change).

Log (stderr, one line per event, control characters in names escaped): start and stop, a stats
line every --stats-seconds, each skipped entry once (symlinks, FIFOs, devices: never followed or
read), files left for the next pass because they changed after being read, lines of --results
ignored because they point outside the runner's folders, model swaps and refused model files.

Exit status: 0 finished (also after SIGTERM/SIGINT, which finish the current batch first);
1 failure while running, one "Error: ..." line (e.g. "Error: no space left on device while
writing results.jsonl"; nothing is lost: run the same command again); 2 bad arguments, unusable
model, or another runner on the same watch folder or results file ("edge: error: ...").
"""


class UsageError(Exception):
    """An argument that parses but cannot be used (missing folder...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"edge: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def default_threads() -> int:
    """min(4, usable CPUs): more intra-op threads than that rarely help small CNN batches."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def build_parser(prog: str = "python -m edge") -> argparse.ArgumentParser:
    """``prog``: the command as the user typed it (``python cli.py edge`` when forwarded)."""
    parser = _Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="MODEL.onnx", help="exported ONNX model (with metadata)")
    parser.add_argument("--watch", required=True, metavar="DIR", help="folder to watch, recursively")
    parser.add_argument("--results", required=True, metavar="FILE", help="JSON-lines results file (appended)")
    parser.add_argument("--done", metavar="DIR", help="move classified files here, keeping subfolders")
    parser.add_argument("--quarantine", metavar="DIR", help="move files that are not readable images here")
    parser.add_argument(
        "--threads", type=_positive(int), default=default_threads(), metavar="N",
        help="onnxruntime intra-op threads (default: min(4, CPUs) = %(default)s)",
    )
    parser.add_argument("--batch-size", type=_positive(int), default=RunnerConfig.batch_size, metavar="B",
                        help="images per inference (default: %(default)s: on 2 cores as fast as larger batches, "
                             "with less memory)")
    parser.add_argument(
        "--poll-seconds", type=_positive(float), default=1.0, metavar="S",
        help="poll interval, and how long a file must stay unchanged to count as complete (default: 1)",
    )
    parser.add_argument("--once", action="store_true", help="process what is in the folder, then exit")
    parser.add_argument("--top", type=_positive(int), default=3, metavar="K", help="classes listed in 'top' (default: 3)")
    parser.add_argument(
        "--stats-seconds", type=_non_negative_float, default=60.0, metavar="S",
        help="print a stats line on stderr this often; 0: never (default: 60)",
    )
    parser.add_argument(
        "--unknown", choices=("on", "off"), default="on",
        help="label images far from every class 'unknown', when the model has an unknown score (default: on)",
    )
    parser.add_argument("--review", metavar="DIR",
                        help="also hard-link (or copy) unknown and low-confidence images into DIR/<label>/")
    parser.add_argument(
        "--review-below", type=_probability, default=0.0, metavar="P",
        help="with --review: also images whose top probability is below P (0..1; default: 0, unknowns only)",
    )
    parser.add_argument("--metrics", metavar="FILE",
                        help="write Prometheus text-format metrics to FILE (atomically, every --metrics-interval)")
    parser.add_argument("--metrics-interval", type=_positive(float), default=5.0, metavar="S",
                        help="with --metrics: seconds between rewrites (default: %(default)s)")
    parser.add_argument("--drift-window", type=_positive(int), default=500, metavar="N",
                        help="with --metrics: drift gauges over the last N images (default: %(default)s)")
    return parser


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _folder(path: str | None, name: str, watch: str) -> str | None:
    if path is None:
        return None
    folder = os.path.realpath(path)
    if folder == watch:
        raise UsageError(f"{name} must be another folder than --watch")
    os.makedirs(folder, exist_ok=True)
    return folder


def _output_file(path: str, name: str) -> Path:
    """``path`` resolved, refused when it is a folder or its folder does not exist."""
    resolved = Path(os.path.realpath(path))
    if resolved.is_dir():
        raise UsageError(f"{name} must be a file, not a folder: {path}")
    if not resolved.parent.is_dir():
        raise UsageError(f"folder of {name} does not exist: {resolved.parent}")
    return resolved


def _metrics(args: argparse.Namespace) -> Metrics | None:
    if args.metrics is None:
        return None
    path = _output_file(args.metrics, "--metrics")
    if path == Path(os.path.realpath(args.results)):
        raise UsageError("--metrics must be another file than --results")
    return Metrics(str(path), args.metrics_interval, args.drift_window)


def _config(args: argparse.Namespace) -> RunnerConfig:
    if not os.path.isdir(args.watch):
        raise UsageError(f"watch folder not found: {args.watch}")
    watch = os.path.realpath(args.watch)
    results = _output_file(args.results, "--results")
    if args.review_below and args.review is None:
        raise UsageError("--review-below needs --review DIR (the folder the copies go to)")
    return RunnerConfig(
        watch=watch,
        results=results,
        done=_folder(args.done, "--done", watch),
        quarantine=_folder(args.quarantine, "--quarantine", watch),
        batch_size=args.batch_size,
        poll_seconds=args.poll_seconds,
        once=args.once,
        top=args.top,
        stats_seconds=args.stats_seconds,
        unknown=args.unknown == "on",
        review=_folder(args.review, "--review", watch),
        review_below=args.review_below,
    )


class _OneLineFormatter(logging.Formatter):
    """Escapes control characters in every message: a newline in a file name or a model id cannot
    forge log lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def _setup_logging() -> None:
    logger = logging.getLogger("edge")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        formatter = _OneLineFormatter("%(asctime)sZ edge: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None, prog: str = "python -m edge") -> int:
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging()
    try:
        config = _config(args)
        metrics = _metrics(args)
        model = load_model(args.model, args.threads)
        watch_lock = lock_watch_folder(config.watch)
        results = ResultLog(config.results, config.watch)
    except (UsageError, ModelError, ResultsLocked, FolderLocked, OSError) as exc:
        print(f"edge: error: {printable(no_space_reason(exc) or str(exc))}", file=sys.stderr)
        return 2
    swapper = ModelSwapper(args.model, args.threads, model, settle_seconds=config.poll_seconds)
    runner = Runner(model, config, results, swapper, metrics)

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("edge").info("%s: finishing the current batch", signal.Signals(signum).name)
        runner.request_stop()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once (still crash-safe)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner.run()
    except (ModelError, OSError) as exc:
        print(f"Error: {printable(no_space_reason(exc) or str(exc))}", file=sys.stderr)
        return 1
    finally:
        results.close()
        for fd in watch_lock:
            os.close(fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
