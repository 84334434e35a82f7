"""Bad input never hangs, aborts or lies in the edge runner (issue 14): the generated corpus, forged
results files, symlinks out of its folders, files replaced while read, a model that outputs NaN,
forged log lines, two runners on one folder, a full disk, and the cross-filesystem move."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from bad_corpus import image_bytes, make_corpus
from onnx import TensorProto, helper
from test_edge import METADATA, REPO, build_model, files_under, run_edge, start_edge, wait_for

from edge import runner as runner_module
from edge.files import move_file
from edge.model import load_model
from edge.results import ResultLog
from edge.runner import Runner, RunnerConfig

GREYISH = {"blue/float01.tif", "blue/sixteen.png", "blue/grey.png"}  # no dominant colour for the tiny model
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ edge: ")


def strict_lines(path: Path) -> list[dict]:
    """Lines parsed as a strict parser would: valid UTF-8, no NaN/Infinity."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    text = path.read_bytes().decode("utf-8")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def test_edge_runner_over_the_bad_corpus(model, tmp_path):
    corpus = make_corpus(tmp_path / "watch")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.png").write_bytes(image_bytes("red"))
    (outside / "sub" / "inner.png").write_bytes(image_bytes("green"))
    (corpus.root / "red" / "link-out.png").symlink_to(outside / "secret.png")
    (corpus.root / "linked-dir").symlink_to(outside / "sub", target_is_directory=True)
    before = snapshot(outside)
    symlinked = {rel for rel in corpus.good if (corpus.root / rel).is_symlink()} | {"red/link-out.png"}
    good = {rel: colour for rel, colour in corpus.good.items() if rel not in symlinked}
    not_image_names = {"red/notes.txt": "not an image file name", "green/Thumbs.db": "not an image file name",
                       "blue/data.h5": "not an image file name"}  # extract ignores them; the runner reports them
    bad = {**corpus.bad, **not_image_names}
    results, done, quarantine = tmp_path / "results.jsonl", tmp_path / "done", tmp_path / "quarantine"

    proc = run_edge("--model", model, "--watch", corpus.root, "--results", results, "--done", done,
                    "--quarantine", quarantine, "--once", "--poll-seconds", "0.05", timeout=120)
    assert proc.returncode == 0, proc.stderr

    lines = strict_lines(results)
    by_path = {line["path"]: line for line in lines}
    assert len(by_path) == len(lines) == len(good) + len(bad)
    for rel, colour in good.items():
        line = by_path[rel]
        assert "error" not in line, (rel, line)
        assert line["moved_to"] == rel and (done / rel).is_file()
        assert line["sha256"] == hashlib.sha256((done / rel).read_bytes()).hexdigest()
        if rel not in GREYISH:
            assert line["label"] == colour, rel
    for rel, fragment in bad.items():
        assert fragment in by_path[rel]["error"], (rel, by_path[rel])
        assert (quarantine / rel).is_file()
    assert os.fsencode(by_path[next(r for r in good if "caf" in r)]["path"]) == b"red/caf\xe9.jpg"
    skipped = [line for line in proc.stderr.splitlines() if " skipped " in line]
    for rel in [*corpus.special, *symlinked, "linked-dir"]:
        matches = [line for line in skipped if f" skipped {rel}: " in line]
        assert len(matches) == 1, (rel, matches)  # logged once, though the folder was polled many times
    for rel, fragment in corpus.special.items():
        assert fragment in next(line for line in skipped if f" skipped {rel}: " in line)
    assert all(LOG_LINE.match(line) for line in proc.stderr.splitlines()), proc.stderr  # no forged lines
    assert "red/new\\x0aline.png" in results.read_text(encoding="utf-8") or "new\\nline" in results.read_text()
    assert snapshot(outside) == before and (corpus.root / "red" / "link-out.png").is_symlink()
    assert not any(p.is_symlink() for p in done.rglob("*")) and not any(p.is_symlink() for p in quarantine.rglob("*"))


def test_a_forged_results_file_and_symlinks_never_lead_outside(model, tmp_path):
    watch, done, outside = tmp_path / "watch", tmp_path / "done", tmp_path / "outside"
    for folder in (watch, done, outside / "sub", outside / "into"):
        folder.mkdir(parents=True, exist_ok=True)
    (watch / "in.png").write_bytes(image_bytes("red"))
    (outside / "sub" / "x.png").write_bytes(image_bytes("green"))
    (outside / "victim.png").write_bytes(image_bytes("blue"))
    (watch / "sub").symlink_to(outside / "sub", target_is_directory=True)  # a symlinked subfolder
    (watch / "blue").mkdir()
    (watch / "blue" / "b.png").write_bytes(image_bytes("blue"))
    (done / "blue").symlink_to(outside / "into", target_is_directory=True)  # a symlink inside --done
    sha = {p: hashlib.sha256(b).hexdigest() for p, b in [("in", (watch / "in.png").read_bytes()),
                                                         ("x", (outside / "sub" / "x.png").read_bytes()),
                                                         ("v", (outside / "victim.png").read_bytes())]}
    results = tmp_path / "results.jsonl"
    forged = [
        {"path": "in.png", "sha256": sha["in"], "label": "red", "moved_to": "../../escaped_in.png"},
        {"path": "sub/x.png", "sha256": sha["x"], "label": "green", "moved_to": "x.png"},
        {"path": "../outside/victim.png", "sha256": sha["v"], "label": "blue", "moved_to": "victim.png"},
        {"path": "/" + str(outside / "victim.png").lstrip("/"), "sha256": sha["v"], "label": "b", "moved_to": "v.png"},
    ]
    results.write_text("".join(json.dumps(line) + "\n" for line in forged))
    before = snapshot(outside)

    proc = run_edge("--model", model, "--watch", watch, "--results", results, "--done", done, "--once",
                    "--poll-seconds", "0.05")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(outside) == before  # nothing read from, moved out of, or written into outside/
    assert not (tmp_path / "escaped_in.png").exists() and not (tmp_path.parent / "escaped_in.png").exists()
    assert proc.stderr.count("points outside the runner's folders") == len(forged)
    lines = strict_lines(results)[len(forged):]  # the runner's own lines
    assert {line["path"] for line in lines} == {"in.png", "blue/b.png"}
    assert (done / "in.png").is_file() and not (watch / "in.png").exists()
    assert (watch / "blue" / "b.png").is_file()  # its destination leads through a symlink: left in place
    assert "cannot move blue/b.png" in proc.stderr


def _runner(model: Path, tmp_path: Path, **config) -> tuple[Runner, ResultLog]:
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    cfg = RunnerConfig(watch=str(watch.resolve()), results=tmp_path / "results.jsonl", poll_seconds=0.01,
                       once=True, stats_seconds=0, **config)
    log = ResultLog(cfg.results, cfg.watch)
    return Runner(load_model(str(model), 1), cfg, log), log


def test_a_symlink_swapped_into_done_after_the_check_is_not_followed(model, tmp_path, monkeypatch):
    """--done/blue passes every check, then is replaced by a symlink to outside/ at the last moment
    (just before the rename): the rename goes between folder descriptors opened with O_NOFOLLOW
    (renameat), not through the path, so the file is not moved outside; it stays where it was."""
    done, outside = tmp_path / "done", tmp_path / "outside"
    outside.mkdir()
    (done / "blue").mkdir(parents=True)
    runner, log = _runner(model, tmp_path, done=str(done))
    watch = Path(runner.config.watch)
    (watch / "blue").mkdir()
    (watch / "blue" / "b.png").write_bytes(image_bytes("blue"))
    (watch / "a.png").write_bytes(image_bytes("red"))
    real_rename = os.rename

    def swap_then_rename(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith("b.png") and not (done / "blue").is_symlink():
            (done / "blue").rmdir()
            (done / "blue").symlink_to(outside, target_is_directory=True)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", swap_then_rename)
    runner.run()
    log.close()
    monkeypatch.undo()
    assert (done / "blue").is_symlink() and snapshot(outside) == {}  # swapped, and nothing went through it
    assert (watch / "blue" / "b.png").read_bytes() == image_bytes("blue")  # left in place, remembered
    assert (done / "a.png").is_file()
    assert {line["path"] for line in strict_lines(tmp_path / "results.jsonl")} == {"a.png", "blue/b.png"}


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_read_through(model, tmp_path, monkeypatch):
    """watch/sub passes the path check, then becomes a symlink to outside/sub before the read: the read
    goes through folder descriptors opened with O_NOFOLLOW, so the outside file is never read."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    secret, mine = image_bytes("green", compress_level=0), image_bytes("red", compress_level=0)
    assert len(secret) == len(mine)  # same size and mtime: only the content tells them apart
    runner, log = _runner(model, tmp_path)
    watch = Path(runner.config.watch)
    (watch / "sub").mkdir()
    (watch / "sub" / "a.png").write_bytes(mine)
    (outside / "sub" / "a.png").write_bytes(secret)
    mtime = (watch / "sub" / "a.png").stat().st_mtime_ns
    os.utime(outside / "sub" / "a.png", ns=(mtime, mtime))
    real_owned_path = Runner._owned_path

    def owned_then_swapped(self, rel):
        checked = real_owned_path(self, rel)
        if rel == "sub/a.png" and checked is not None and not (watch / "sub").is_symlink():
            (watch / "sub").rename(tmp_path / "old-sub")
            (watch / "sub").symlink_to(outside / "sub", target_is_directory=True)
        return checked

    monkeypatch.setattr(Runner, "_owned_path", owned_then_swapped)
    runner.run()
    log.close()
    lines = strict_lines(tmp_path / "results.jsonl")
    assert hashlib.sha256(secret).hexdigest() not in {line.get("sha256") for line in lines}
    assert all("label" not in line for line in lines)  # nothing classified through the symlink
    assert (outside / "sub" / "a.png").read_bytes() == secret


@pytest.mark.parametrize("side", ["source", "destination"])
def test_move_file_never_follows_a_symlinked_folder(tmp_path, side):
    watch, done, outside = tmp_path / "watch", tmp_path / "done", tmp_path / "outside"
    for folder in (watch, done, outside / "sub"):
        folder.mkdir(parents=True)
    (outside / "sub" / "x.png").write_bytes(b"outside")
    if side == "source":  # watch/sub -> outside/sub: the file there is not the runner's to move
        (watch / "sub").symlink_to(outside / "sub", target_is_directory=True)
    else:  # done/sub -> outside/sub: nothing may be written there
        (watch / "sub").mkdir()
        (watch / "sub" / "y.png").write_bytes(b"inside")
        (done / "sub").symlink_to(outside / "sub", target_is_directory=True)
    before = snapshot(outside)
    name = "x.png" if side == "source" else "y.png"
    with pytest.raises(OSError) as refused:
        move_file(str(watch), f"sub/{name}", str(done), f"sub/{name}")
    assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert snapshot(outside) == before and snapshot(done) == {}


def test_a_file_replaced_while_read_is_classified_as_read_and_its_new_version_gets_its_own_line(
        model, tmp_path, monkeypatch):
    done = tmp_path / "done"
    done.mkdir()
    runner, log = _runner(model, tmp_path, done=str(done))
    watch = Path(runner.config.watch)
    (watch / "a.png").write_bytes(image_bytes("red"))
    (watch / "b.png").write_bytes(image_bytes("green"))
    real_decode = runner_module.decode_image
    replaced = []

    def decode_while_a_writer_replaces(data, size):
        if not replaced:  # the writer renames a new version over a.png after our read
            replacement = watch / ".a.png.tmp"
            replacement.write_bytes(image_bytes("blue", size=(30, 30)))
            os.replace(replacement, watch / "a.png")
            replaced.append(True)
        return real_decode(data, size)

    monkeypatch.setattr(runner_module, "decode_image", decode_while_a_writer_replaces)
    runner.run()
    log.close()
    lines = strict_lines(tmp_path / "results.jsonl")
    first = [line for line in lines if line["path"] == "a.png"]
    assert len(first) == 2  # the red version it read, then the blue version at the next pass
    assert first[0]["label"] == "red" and first[1]["label"] == "blue"
    assert first[0]["sha256"] == hashlib.sha256(image_bytes("red")).hexdigest()
    assert first[1]["sha256"] == hashlib.sha256(image_bytes("blue", size=(30, 30))).hexdigest()
    for line in lines:  # whatever is in --done is the content its line describes
        moved = done / line["moved_to"]
        if moved.exists():
            assert hashlib.sha256(moved.read_bytes()).hexdigest() == line["sha256"]
    assert first[0]["moved_to"] == "a.png" and not (done / "a.png").exists()  # the red version is gone
    assert (done / first[1]["moved_to"]).read_bytes() == image_bytes("blue", size=(30, 30))


def _nan_model(path: Path, model_id: str = "nan-model") -> Path:
    """Like the tiny model, but Sqrt(-mean) makes every output NaN."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Neg", ["mean"], ["negative"]),
        helper.make_node("Sqrt", ["negative"], ["probabilities"]),
    ]
    graph = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 16, 16, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    helper.set_model_props(model, {**METADATA, "model_id": model_id})
    onnx.save(model, str(path))
    return path


def test_non_finite_model_output_is_an_error_line_and_newlines_cannot_forge_log_lines(tmp_path):
    forged_id = "evil\n2030-01-01T00:00:00Z edge: stopped after 0 images (0 errors)"
    model = _nan_model(tmp_path / "nan.onnx", forged_id)
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "a.png").write_bytes(image_bytes("red"))
    (watch / "b\nfake.png").write_bytes(image_bytes("red")[:30])
    proc = run_edge("--model", model, "--watch", watch, "--results", tmp_path / "r.jsonl", "--once",
                    "--poll-seconds", "0.05")
    assert proc.returncode == 0, proc.stderr
    lines = {line["path"]: line for line in strict_lines(tmp_path / "r.jsonl")}
    assert lines["a.png"]["error"] == "model produced non-finite output" and "label" not in lines["a.png"]
    assert "cannot decode" in lines["b\nfake.png"]["error"]
    stderr = proc.stderr.splitlines()
    assert all(LOG_LINE.match(line) for line in stderr), proc.stderr
    assert sum(line.split(" edge: ", 1)[1].startswith("stopped after") for line in stderr) == 1
    assert any("evil\\x0a2030" in line for line in stderr)


def test_two_runners_cannot_watch_one_folder_or_a_folder_inside_it(model, tmp_path):
    watch = tmp_path / "watch"
    (watch / "sub").mkdir(parents=True)
    first = start_edge("--model", model, "--watch", watch, "--results", tmp_path / "a.jsonl", "--poll-seconds", "0.05")
    try:
        wait_for(lambda: (tmp_path / "a.jsonl").exists(), timeout=60)
        for folder, results in ((watch, "b.jsonl"), (watch / "sub", "c.jsonl"), (tmp_path, "d.jsonl")):
            second = run_edge("--model", model, "--watch", folder, "--results", tmp_path / results, "--once")
            assert second.returncode == 2 and "another edge runner is watching" in second.stderr, second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        sibling = tmp_path / "sibling"
        sibling.mkdir()
        assert run_edge("--model", model, "--watch", sibling, "--results", tmp_path / "e.jsonl",
                        "--once").returncode == 0  # folders next to each other are independent
    finally:
        first.terminate()
        first.communicate(timeout=30)
    assert first.returncode == 0


FULL_DISK = """
import errno, sys
from edge import results
real = results.ResultLog.append
calls = []
class Full:  # part of a line reaches the file, then the disk is full
    def __init__(self, out):
        self.out = out
    def write(self, data):
        self.out.write(data[:15])
        self.out.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.out, name)
def append(self, records):
    calls.append(1)
    if len(calls) == 2:  # the second batch
        self._out = Full(self._out)
    return real(self, records)
results.ResultLog.append = append
from edge.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_is_one_error_line_and_nothing_is_lost(model, tmp_path):
    watch, done = tmp_path / "watch", tmp_path / "done"
    watch.mkdir()
    for i in range(6):
        (watch / f"{i}.png").write_bytes(image_bytes(("red", "green", "blue")[i % 3], size=(20 + i, 20)))
    results = tmp_path / "results.jsonl"
    args = ["--model", str(model), "--watch", str(watch), "--results", str(results), "--done", str(done), "--once",
            "--poll-seconds", "0.05", "--batch-size", "2"]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"Error: no space left on device while writing {results}"
    assert run_edge(*args).returncode == 0  # space is back: the same command finishes the job
    lines = strict_lines(results)
    assert sorted(line["path"] for line in lines) == [f"{i}.png" for i in range(6)]  # each exactly once
    assert files_under(done) == {f"{i}.png" for i in range(6)} and files_under(watch) == set()


def test_cross_filesystem_move_interrupted_after_the_copy_is_finished_without_a_second_copy(model, tmp_path):
    watch, done = tmp_path / "watch", tmp_path / "done"
    watch.mkdir()
    done.mkdir()
    data = image_bytes("red")
    (watch / "img4.png").write_bytes(data)
    (done / "img4.png").write_bytes(data)  # the copy landed, the kill came before unlinking the source
    results = tmp_path / "results.jsonl"
    line = {"path": "img4.png", "sha256": hashlib.sha256(data).hexdigest(), "label": "red", "moved_to": "img4.png"}
    results.write_text(json.dumps(line) + "\n")
    proc = run_edge("--model", model, "--watch", watch, "--results", results, "--done", done, "--once",
                    "--poll-seconds", "0.05")
    assert proc.returncode == 0, proc.stderr
    assert files_under(done) == {"img4.png"} and files_under(watch) == set()
    assert len(strict_lines(results)) == 1


def test_move_file_is_idempotent_but_never_overwrites_other_content(tmp_path):
    src, dst = tmp_path / "a.png", tmp_path / "d" / "a.png"
    dst.parent.mkdir()
    src.write_bytes(b"same")
    dst.write_bytes(b"same")
    move_file(str(tmp_path), "a.png", str(tmp_path), "d/a.png")
    assert not src.exists() and dst.read_bytes() == b"same"
    src.write_bytes(b"other")
    with pytest.raises(FileExistsError):
        move_file(str(tmp_path), "a.png", str(tmp_path), "d/a.png")
    assert src.read_bytes() == b"other" and dst.read_bytes() == b"same"
