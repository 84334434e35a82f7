"""Edge runner: end-to-end runs in subprocesses against temporary folders, with a tiny ONNX model.

The model averages each colour channel and picks the strongest, so the label of a solid-colour
image is known: red -> "red", and so on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bench.edge_bench import run_edge_benchmark, to_markdown
from edge.__main__ import main as edge_main
from edge.model import ModelError, load_model, session_options
from edge.watch import Watcher, is_temporary_name

REPO = Path(__file__).resolve().parents[1]

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (230, 20, 10), "green": (15, 220, 30), "blue": (20, 10, 240)}
METADATA = {
    "class_names": json.dumps(CLASSES),
    "input_size": "[16, 16]",
    "layout": "NHWC",
    "input_dtype": "uint8",
    "preprocessing": json.dumps({"mode": "lite", "in_graph": True, "color": "RGB", "resize": "bilinear"}),
    "backbone": json.dumps({"name": "tiny-test"}),
    "source": json.dumps({"test": True}),
    "model_id": "tiny-rgb-1",
}


def build_model(path: Path, metadata: dict[str, str] | None = None, batch: int | str = "N",
                layout: str = "NHWC", dtype: str = "uint8") -> Path:
    """Cast -> mean over H, W -> MatMul(3x3) -> Softmax, in the layout and dtype asked for."""
    shape = [batch, 16, 16, 3] if layout == "NHWC" else [batch, 3, 16, 16]
    elem = TensorProto.UINT8 if dtype == "uint8" else TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2] if layout == "NHWC" else [2, 3], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    weights = numpy_helper.from_array((np.eye(3) * 0.05).astype(np.float32), "weights")
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", elem, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 3])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    meta = dict(METADATA if metadata is None else metadata)
    if "layout" in meta:
        meta["layout"] = layout
    if "input_dtype" in meta:
        meta["input_dtype"] = dtype
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def solid(path: Path, label: str, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[label]).save(path)
    return path


def png_bytes(label: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), COLOURS[label]).save(buf, "PNG")
    return buf.getvalue()


def edge_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "edge", *map(str, args)]


def run_edge(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(edge_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_edge(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(edge_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "results must end with a complete line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for(predicate, timeout: float = 20.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    d = {name: tmp_path / name for name in ("watch", "done", "quarantine")}
    d["watch"].mkdir()
    d["results"] = tmp_path / "results.jsonl"
    return d


# --- normal flow ------------------------------------------------------------------------------


def test_labels_subfolders_unicode_temp_names_and_bad_files(model, dirs):
    watch = dirs["watch"]
    images = {
        "red.png": "red",
        "green.jpg": "green",
        "blue.bmp": "blue",
        "sub/deeper/rouge été.png": "red",
        "日本/青い.png": "blue",
        "🙂 smile.webp": "green",
    }
    for rel, label in images.items():
        solid(watch / rel, label)
    latin1 = os.fsdecode(b"caf\xe9.png")  # not valid UTF-8: comes back with a lone surrogate
    with open(os.path.join(os.fsencode(watch), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes("green"))
    images[latin1] = "green"
    temporary = ["x.png.part", "y.tmp", "z.png~", "w.jpg.crdownload", ".hidden.png", ".cache/inside.png"]
    for rel in temporary:
        (watch / rel).parent.mkdir(parents=True, exist_ok=True)
        (watch / rel).write_bytes(png_bytes("red"))
    bad = {"broken.png": png_bytes("red")[:40], "notes.txt": b"not an image", "empty.jpg": b""}
    for rel, data in bad.items():
        (watch / rel).write_bytes(data)
    shas = {rel: hashlib.sha256((watch / rel).read_bytes()).hexdigest() for rel in [*images, *bad]}

    proc = run_edge("--model", model, "--watch", watch, "--results", dirs["results"], "--done", dirs["done"],
                    "--quarantine", dirs["quarantine"], "--once", "--poll-seconds", "0.1", "--top", "2")
    assert proc.returncode == 0, proc.stderr

    lines = read_results(dirs["results"])
    by_path = {line["path"]: line for line in lines}
    assert len(lines) == len(by_path) == len(images) + len(bad)
    for rel, label in images.items():
        line = by_path[rel]
        assert line["label"] == label and line["probability"] > 0.99
        assert [t["label"] for t in line["top"]][0] == label and len(line["top"]) == 2
        assert line["sha256"] == shas[rel] and line["model"] == "tiny-rgb-1"
        assert line["latency_ms"] >= 0 and line["moved_to"] == rel
        assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    for rel in bad:
        assert by_path[rel]["sha256"] == shas[rel] and by_path[rel]["error"]
        assert "label" not in by_path[rel]
    assert "empty" in by_path["empty.jpg"]["error"]
    assert files_under(dirs["done"]) == set(images)
    assert files_under(dirs["quarantine"]) == set(bad)
    assert files_under(watch) == set(temporary)  # temporary names are never touched
    assert "日本/青い.png" in dirs["results"].read_text(encoding="utf-8")  # ensure_ascii=False


def test_name_collision_in_done_does_not_overwrite(model, dirs):
    args = ("--model", model, "--watch", dirs["watch"], "--results", dirs["results"],
            "--done", dirs["done"], "--once", "--poll-seconds", "0.05")
    solid(dirs["watch"] / "a/photo.png", "red")
    assert run_edge(*args).returncode == 0
    solid(dirs["watch"] / "a/photo.png", "blue")
    assert run_edge(*args).returncode == 0
    first, second = read_results(dirs["results"])
    assert (first["label"], first["moved_to"]) == ("red", "a/photo.png")
    assert (second["label"], second["moved_to"]) == ("blue", "a/photo (1).png")
    assert files_under(dirs["done"]) == {"a/photo.png", "a/photo (1).png"}
    assert np.asarray(Image.open(dirs["done"] / "a/photo (1).png"))[0, 0, 2] == COLOURS["blue"][2]


def test_journal_mode_reports_each_file_once(model, dirs):
    args = ("--model", model, "--watch", dirs["watch"], "--results", dirs["results"],
            "--once", "--poll-seconds", "0.05")
    for i, label in enumerate(CLASSES * 3):
        solid(dirs["watch"] / f"{i}.png", label)
    assert run_edge(*args).returncode == 0
    assert run_edge(*args).returncode == 0
    assert len(read_results(dirs["results"])) == 9
    assert len(files_under(dirs["watch"])) == 9  # left in place
    solid(dirs["watch"] / "4.png", "red", size=(30, 30))  # a new version of a file is a new file
    assert run_edge(*args).returncode == 0
    lines = read_results(dirs["results"])
    assert len(lines) == 10 and lines[-1]["path"] == "4.png" and lines[-1]["label"] == "red"


# --- complete files only -----------------------------------------------------------------------


def test_slow_writer_and_renamed_part_file_are_picked_only_when_complete(model, dirs):
    watch, results = dirs["watch"], dirs["results"]
    proc = start_edge("--model", model, "--watch", watch, "--results", results, "--done", dirs["done"],
                      "--quarantine", dirs["quarantine"], "--poll-seconds", "1", "--stats-seconds", "0.5")
    try:
        data = png_bytes("green")
        with open(watch / "slow.png", "wb") as f:  # two parts, a pause shorter than --poll-seconds
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.3)
            f.write(data[len(data) // 2 :])
        (watch / "big.png.part").write_bytes(png_bytes("blue"))
        wait_for(lambda: count_lines(results) >= 1)  # >= 1 s after big.png.part was complete
        time.sleep(0.3)
        assert [line["path"] for line in read_results(results)] == ["slow.png"]
        assert read_results(results)[0]["label"] == "green"
        assert (watch / "big.png.part").exists()
        os.rename(watch / "big.png.part", watch / "big.png")
        wait_for(lambda: count_lines(results) >= 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    lines = read_results(results)
    assert [(line["path"], line["label"]) for line in lines] == [("slow.png", "green"), ("big.png", "blue")]
    stats = [line for line in stderr.splitlines() if "stats:" in line]
    assert stats and all("images/s" in line and "p95" in line and "queue" in line for line in stats)
    assert not files_under(dirs["quarantine"])


def test_watcher_bounds_memory_and_skips_temporary_names(tmp_path):
    for i in range(300):
        (tmp_path / f"{i:03}.png").write_bytes(b"x")
    (tmp_path / "inbox.part").write_bytes(b"x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "old.png").write_bytes(b"x")
    watcher = Watcher(str(tmp_path), frozenset({str(tmp_path / "done")}), settle_seconds=0.0,
                      skip=lambda state: False, max_pending=50)
    assert watcher.poll(limit=20) == []  # first sight: remembered, not yet known to be stable
    assert len(watcher._pending) == 50 and watcher.queue_length == 300 and not watcher.idle
    ready = watcher.poll(limit=20)
    assert len(ready) == 20 and len(watcher._pending) == 50 and not watcher.queue_complete
    handed = set()
    while not watcher.idle:
        for state in watcher.poll(limit=20):
            handed.add(state.rel)
            watcher.forget(state.rel)
            os.unlink(tmp_path / state.rel)
        assert len(watcher._pending) <= 50
    assert handed == {f"{i:03}.png" for i in range(300)}
    assert all(is_temporary_name(n) for n in (".x.png", "a.tmp", "a.png~", "a.crdownload", "a.PART"))
    assert not is_temporary_name("photo.png")


# --- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, layout, dtype",
    [(1, "NHWC", "uint8"), (4, "NHWC", "uint8"), ("N", "NCHW", "float32"), (1, "NCHW", "uint8")],
)
def test_fixed_batch_and_nchw_float_models(tmp_path, batch, layout, dtype):
    model = load_model(build_model(tmp_path / "m.onnx", batch=batch, layout=layout, dtype=dtype), threads=1)
    assert model.fixed_batch == (batch if isinstance(batch, int) else None)
    labels = ["red", "green", "blue", "blue", "red", "green"]
    images = np.stack([np.full((16, 16, 3), COLOURS[label], np.uint8) for label in labels])
    probs = model.predict(images)
    assert probs.shape == (6, 3)
    assert [CLASSES[i] for i in probs.argmax(1)] == labels


def test_session_threads_are_explicit_and_do_not_spin():
    options = session_options(3)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_names": None}, "class_names"),
        ({"layout": None, "input_size": None}, "input_size, layout"),
        ({"preprocessing": json.dumps({"mode": "lite", "in_graph": False})}, "not inside the graph"),
        ({"class_names": json.dumps(["a", "b"])}, "expected [1, 2]"),
        ({"input_size": "[32, 32]"}, "does not match"),
        ({"input_dtype": "float32"}, "input_dtype"),
    ],
)
def test_models_breaking_the_contract_are_refused(tmp_path, change, message):
    meta = {k: v for k, v in {**METADATA, **change}.items() if v is not None}
    path = build_model(tmp_path / "m.onnx", metadata=meta)
    onnx_model = onnx.load(str(path))
    if "input_dtype" in change:  # build_model keeps metadata consistent; break it afterwards
        helper.set_model_props(onnx_model, meta)
        onnx.save(onnx_model, str(path))
    with pytest.raises(ModelError, match=message.replace("[", r"\[")):
        load_model(path, threads=1)


def test_bad_input_gives_one_line_and_exit_2(tmp_path, dirs, capsys):
    bare = build_model(tmp_path / "bare.onnx", metadata={})
    proc = run_edge("--model", bare, "--watch", dirs["watch"], "--results", dirs["results"], "--once")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "class_names" in proc.stderr

    good = build_model(tmp_path / "good.onnx")
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello")
    cases = [
        (["--model", tmp_path / "missing.onnx", "--watch", dirs["watch"]], "model file not found"),
        (["--model", not_onnx, "--watch", dirs["watch"]], "cannot load ONNX model"),
        (["--model", good, "--watch", tmp_path / "nowhere"], "watch folder not found"),
        (["--model", good, "--watch", dirs["watch"], "--done", dirs["watch"]], "another folder"),
        (["--model", good, "--watch", dirs["watch"], "--batch-size", "0"], "must be > 0"),
    ]
    for args, message in cases:
        code = edge_main([*map(str, args), "--results", str(dirs["results"]), "--once"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not dirs["results"].exists()


def test_help_has_example_and_tensorflow_is_never_imported(model, dirs, tmp_path):
    help_text = run_edge("--help").stdout
    assert "Example:" in help_text and "--poll-seconds" in help_text
    via_cli = subprocess.run([sys.executable, "cli.py", "edge", "--help"], cwd=REPO, capture_output=True, text=True)
    assert via_cli.returncode == 0 and via_cli.stdout.startswith("usage: python cli.py edge ")  # the name typed
    assert via_cli.stdout.split("\n\n", 1)[1] == help_text.split("\n\n", 1)[1]

    solid(dirs["watch"] / "a.png", "red")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "edge", "--model", str(model), "--watch", str(dirs["watch"]),
         "--results", str(dirs["results"]), "--once", "--poll-seconds", "0.05"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and read_results(dirs["results"])[0]["label"] == "red"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "onnxruntime" in imported and not imported & {"tensorflow", "keras", "tf2onnx", "torch"}

    # edge/ copied alone works (no imports from the rest of the repository)
    shutil.copytree(REPO / "edge", tmp_path / "alone" / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import sys, edge.runner, edge.__main__; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'extract')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "alone", env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# --- crash safety ------------------------------------------------------------------------------


def drop_images(watch: Path, start: int, count: int) -> dict[str, str]:
    expected = {}
    for i in range(start, start + count):
        label = CLASSES[i % 3]
        rel = f"d{i % 4}/img {i:04d}.png"
        (watch / rel).parent.mkdir(parents=True, exist_ok=True)
        (watch / rel).write_bytes(png_bytes(label))
        expected[rel] = label
    return expected


@pytest.mark.parametrize("mode", ["done", "journal"])
def test_sigkill_at_random_moments_then_restart_gives_exactly_one_line_per_image(model, dirs, mode):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    watch, results = dirs["watch"], dirs["results"]
    extra = ["--done", dirs["done"], "--quarantine", dirs["quarantine"]] if mode == "done" else []
    args = ("--model", model, "--watch", watch, "--results", results, *extra,
            "--batch-size", "3", "--poll-seconds", "0.05", "--threads", "1")
    expected = drop_images(watch, 0, 300)
    (watch / "d0/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    interrupted = 0
    # At least 4 kills, more (up to 8) until one of them lands mid-work: on an idle machine the tiny
    # model can finish a round before a late random kill, which would test nothing.
    for round_ in range(8):
        if round_ >= 4 and interrupted:
            break
        before = count_lines(results)
        proc = start_edge(*args)
        if round_ == 0:
            time.sleep(rng.uniform(0.0, 0.4))  # possibly during start-up or reconciliation
        else:
            wait_for(lambda: count_lines(results) > before or proc.poll() is not None)
            time.sleep(rng.uniform(0.0, 0.05) if round_ < 4 else 0.0)
        proc.kill()
        proc.communicate(timeout=20)
        interrupted += count_lines(results) < len(expected) + 1
        expected.update(drop_images(watch, 300 + 60 * round_, 60))  # more arrive between runs
    assert interrupted, f"no kill interrupted the work (seed {seed})"
    final = run_edge(*args, "--once")
    assert final.returncode == 0, final.stderr

    lines = read_results(results)
    counts = Counter(line["path"] for line in lines)
    assert set(counts) == set(expected) | {"d0/corrupt.png"}, f"seed {seed}"
    assert max(counts.values()) == 1, f"duplicated: {[p for p, n in counts.items() if n > 1]} (seed {seed})"
    assert all(line["label"] == expected[line["path"]] for line in lines if "error" not in line)
    if mode == "done":
        assert files_under(dirs["done"]) == set(expected), f"seed {seed}"
        assert files_under(dirs["quarantine"]) == {"d0/corrupt.png"}
        assert files_under(watch) == set()
    else:
        assert files_under(watch) == set(expected) | {"d0/corrupt.png"}
        assert run_edge(*args, "--once").returncode == 0
        assert count_lines(results) == len(lines)


def test_restart_settles_a_committed_batch_without_new_lines(model, dirs):
    """The window between 'lines fsynced' and 'files moved', reproduced deterministically."""
    watch, results, done = dirs["watch"], dirs["results"], dirs["done"]
    args = ("--model", model, "--watch", watch, "--results", results, "--done", done,
            "--once", "--poll-seconds", "0.05")
    for label in CLASSES:
        solid(watch / f"{label}.png", label)
    assert run_edge(*args).returncode == 0
    os.rename(done / "green.png", watch / "green.png")  # as if the kill came before the move...
    Path(f"{results}.journal").write_text('{"settled": 0}\n')  # ...and before the checkpoint
    with open(results, "ab") as f:
        f.write(b'{"path": "torn line from a kill')  # and a torn last line
    solid(watch / "late.png", "blue")
    assert run_edge(*args).returncode == 0
    lines = read_results(results)
    assert [line["path"] for line in lines].count("green.png") == 1 and len(lines) == 4
    assert files_under(done) == {"red.png", "green.png", "blue.png", "late.png"}
    assert files_under(watch) == set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_sigint_finish_the_batch_and_exit_0(model, dirs, sig):
    watch, results, done = dirs["watch"], dirs["results"], dirs["done"]
    drop_images(watch, 0, 400)
    proc = start_edge("--model", model, "--watch", watch, "--results", results, "--done", done,
                      "--batch-size", "2", "--poll-seconds", "0.05", "--threads", "1")
    wait_for(lambda: count_lines(results) >= 4)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert sig.name in stderr and "Traceback" not in stderr
    lines = read_results(results)
    assert 4 <= len(lines) < 400
    assert files_under(done) == {line["path"] for line in lines}  # the batch was settled, not cut
    journal = Path(f"{results}.journal").read_text().splitlines()
    assert json.loads(journal[-1]) == {"settled": results.stat().st_size}


# --- benchmark ---------------------------------------------------------------------------------


def test_benchmark_runs_on_any_image_folder(model, image_folder):
    count = len(files_under(image_folder))
    result = run_edge_benchmark(model, image_folder, threads=1, batch_size=4, poll_seconds=0.1, repeats=1)
    assert result["images"] == count and result["errors"] == 0
    assert result["time_to_first_result_s"]["median"] > 0 and result["peak_rss_mb"]["median"] > 10
    assert result["runner_images_per_s"]["median"] > 0 and result["bare_images_per_s"]["median"] > 0
    assert len(files_under(image_folder)) == count  # the benchmark works on a copy
    text = to_markdown(result)
    assert "| runner: peak RSS (MiB) |" in text and "Command:" in text
