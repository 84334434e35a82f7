"""fit-head, evaluate and predict through the CLI (click's CliRunner), including one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CLASSES, make_feature_store, make_image_folder

from classify.heads import HEAD_KINDS
from classify.persist import CONFIG_NAME, load_head
from classify.report import REPORT_FILES
from cli import cli
from extract.job import run_extraction
from extract.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
CLASSES_OF_IMAGES = ("red", "green", "blue")
METRIC_KEYS = {"kind", "cv_accuracy", "cv_std", "test_accuracy", "test_macro_f1", "fit_seconds", "n_train"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def store(tmp_path) -> Path:
    return make_feature_store(tmp_path / "features.h5")


def test_fit_head_json_prints_one_object_per_head(store, tmp_path):
    result = invoke("fit-head", "--store", store, "--kind", "all", "--out", tmp_path / "head", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # the progress bar is on stderr
    assert [row["kind"] for row in rows] == list(HEAD_KINDS)
    assert all(f"fit-head {kind}: 100%" in result.stderr for kind in HEAD_KINDS)  # a bar per kind, on stderr
    assert all(METRIC_KEYS <= set(row) for row in rows)
    assert all(row["test_accuracy"] > 0.9 and row["n_train"] == 72 and row["n_val"] == 24 for row in rows)
    assert sum(row["saved"] for row in rows) == 1
    assert load_head(tmp_path / "head").class_names == list(CLASSES)


def test_fit_head_takes_any_backbone_the_store_holds(tmp_path):
    """--backbone names the store's features (int8 ones are BACKBONE@int8), not only registered backbones."""
    store = make_feature_store(tmp_path / "int8.h5", backbone="mobilenet_v2@int8")
    result = invoke("fit-head", "--store", store, "--kind", "softmax", "--backbone", "mobilenet_v2@int8",
                    "--out", tmp_path / "head", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("fit-head", "--store", store, "--kind", "softmax", "--backbone", "resnet50", "--out",
                    tmp_path / "head2", "--quiet")
    assert result.exit_code == 1 and "has no features for backbone 'resnet50'" in result.output


def test_fit_head_prints_a_leaderboard(store, tmp_path):
    result = invoke("fit-head", "--store", store, "--kind", "svm", "--out", tmp_path / "head", "--seed", 3, "--quiet")
    assert result.exit_code == 0 and result.stderr == "", result.output
    header, row, summary = result.output.splitlines()
    assert header.split()[:3] == ["kind", "CV", "acc"]
    assert row.startswith("svm") and row.endswith("saved")
    assert summary == f"svm head (96 training images, 5-fold CV) saved to {tmp_path / 'head'}"


def test_evaluate_writes_the_report(store, tmp_path):
    assert invoke("fit-head", "--store", store, "--kind", "softmax", "--out", tmp_path / "head").exit_code == 0
    result = invoke("evaluate", "--store", store, "--head", tmp_path / "head", "--split", "validation",
                    "--report-dir", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("softmax head on 24 validation images: accuracy 1.000")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES)
    result = invoke("evaluate", "--store", store, "--head", tmp_path / "head", "--report-dir", tmp_path / "r2",
                    "--json")
    assert json.loads(result.output)["split"] == "test"


def _head_and_store(tmp_path: Path) -> dict:
    store = make_feature_store(tmp_path / "features.h5")
    invoke("fit-head", "--store", store, "--kind", "svm", "--out", tmp_path / "head")
    return {"store": store, "head": tmp_path / "head", "tmp": tmp_path}


def _tamper(paths: dict) -> list:
    config = paths["head"] / CONFIG_NAME
    config.write_text(config.read_text().replace('"n_features": 16', '"n_features": 17'))
    return ["evaluate", "--store", paths["store"], "--head", paths["head"], "--report-dir", paths["tmp"] / "r"]


def _store_with(tmp_path: Path, **sizes) -> Path:
    return make_feature_store(tmp_path / "bad.h5", classes=tuple(sizes), sizes=sizes)


BAD_INPUT = {
    "backbone not in store": (
        lambda p: ["fit-head", "--store", p["store"], "--kind", "svm", "--backbone", "resnet50",
                   "--out", p["tmp"] / "h"],
        "has no features for backbone 'resnet50'"),
    "head on other classes": (
        lambda p: ["evaluate", "--store", make_feature_store(p["tmp"] / "o.h5", classes=("a", "b", "c")),
                   "--head", p["head"], "--report-dir", p["tmp"] / "r"],
        "the head knows classes [café, crème brûlée, thé vert]"),
    "head on other backbone": (
        lambda p: ["evaluate", "--store", make_feature_store(p["tmp"] / "o.h5", backbone="vgg16"),
                   "--head", p["head"], "--report-dir", p["tmp"] / "r"],
        "the head was trained on mobilenet_v2 features"),
    "tampered head": (_tamper, "has shape (3, 16), but head.json implies (3, 17)"),
    "empty split": (
        lambda p: ["evaluate", "--store", make_feature_store(p["tmp"] / "e.h5", sizes={
            c: {"train": 5, "validation": 2, "test": 0} for c in CLASSES}), "--head", p["head"],
                   "--report-dir", p["tmp"] / "r"],
        "has no test images (its splits: train 15, validation 6, test 0)"),
    "single training image": (
        lambda p: ["fit-head", "--store", _store_with(p["tmp"], a={"train": 1, "validation": 0, "test": 1},
                                                      b={"train": 4, "validation": 1, "test": 1}),
                   "--kind", "mlp", "--out", p["tmp"] / "h"],
        "class 'a' has 1 training image(s)"),
    "one class": (
        lambda p: ["fit-head", "--store", _store_with(p["tmp"], a={"train": 4, "validation": 1, "test": 1}),
                   "--kind", "all", "--out", p["tmp"] / "h"],
        "has 1 class (a); a head needs at least 2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_line(tmp_path, case):
    make_args, message = BAD_INPUT[case]
    result = invoke(*make_args(_head_and_store(tmp_path)))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled by click, not an uncaught exception
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    assert message in result.output


# ---------------------------------------------------------------- predict, end to end on real images


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> tuple[Path, Path]:
    """Generated colour images -> mobilenet_v2 (random weights, 32 px) features -> a softmax head."""
    tmp = tmp_path_factory.mktemp("predict")
    images = make_image_folder(tmp / "images", per_class=12)
    store = tmp / "features.h5"
    run_extraction(images, store, backbone="mobilenet_v2", weights="none", input_size=32, progress=False,
                   engine="keras", validation_split=0.25, test_split=0.25)
    result = invoke("fit-head", "--store", store, "--kind", "softmax", "--out", tmp / "head")
    assert result.exit_code == 0, result.output
    return images, store


def test_predict_labels_new_images_like_the_head_on_stored_features(image_store, tmp_path):
    images, store = image_store
    head = store.parent / "head"
    features = FeatureStore(store).read()
    chosen = features.paths[:2] + features.paths[-2:]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = invoke("predict", "--head", head, *[images / p for p in chosen], broken, "--engine", "keras", "--json",
                    "--quiet")
    assert result.exit_code == 1, result.output  # one file failed
    *lines, last = result.output.splitlines()
    assert last == "Error: 1 of 5 images could not be classified"
    rows = [json.loads(line) for line in lines]
    assert [row["image"] for row in rows] == [str(images / p) for p in chosen] + [str(broken)]
    assert "cannot decode" in rows[-1]["error"] and "label" not in rows[-1]
    trained = load_head(head)
    expected = trained.predict_proba(features.features[[features.paths.index(p) for p in chosen]])
    for row, probabilities in zip(rows, expected):
        assert row["label"] == trained.class_names[int(probabilities.argmax())]
        assert row["probability"] == pytest.approx(float(probabilities.max()), abs=1e-4)
        assert [t["label"] for t in row["top"]][0] == row["label"] and len(row["top"]) == 3

    result = invoke("predict", "--head", head, images / chosen[0], broken, "--engine", "keras", "--quiet")
    assert result.exit_code == 1, result.output
    first, error, _ = result.output.splitlines()
    assert first.startswith(f"{images / chosen[0]}: {rows[0]['label']} (")
    assert error.startswith(f"{broken}: error: cannot decode image")


def test_predict_refuses_other_weights(image_store, tmp_path):
    images, store = image_store
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"\x89HDF\r\n\x1a\n" + b"weights of another model")  # passes the format check
    result = invoke("predict", "--head", store.parent / "head", next(images.rglob("*.jpg")), "--weights", other)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "the head was trained on mobilenet_v2 features from weights random-init:seed=0" in result.output
    assert f"--weights {other} gives file:other.weights.h5:" in result.output



def test_predict_searches_folders_like_extract_and_reports_every_bad_file(image_store, tmp_path):
    images, store = image_store
    head = store.parent / "head"
    nested = tmp_path / "inbox" / "deep" / "er"
    nested.mkdir(parents=True)
    shutil.copy(next(images.rglob("*.png")), nested.parent / "one.png")
    shutil.copy(next(images.rglob("*.jpg")), nested / "two.jpg")
    (nested / "notes.txt").write_text("not an image")
    (tmp_path / "inbox" / ".hidden.jpg").write_bytes(b"skipped")
    os.mkfifo(tmp_path / "inbox" / "fifo.jpg")  # opening it would block forever
    weird = tmp_path / "line\nbreak.jpg"
    shutil.copy(next(images.rglob("*.jpg")), weird)
    result = invoke("predict", "--head", head, tmp_path / "inbox", weird, "--engine", "keras", "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 5 and lines[-1] == "Error: 1 of 4 images could not be classified"
    by_name = {line.split(": ")[0].rsplit("/", 1)[-1]: line for line in lines[:-1]}
    assert set(by_name) == {"fifo.jpg", "one.png", "two.jpg", "line\\x0abreak.jpg"}  # the newline is escaped
    assert by_name["fifo.jpg"].endswith("error: not a regular file (a FIFO)")
    assert all("error" not in line for name, line in by_name.items() if name != "fifo.jpg")


def test_predict_glob_matching_nothing_is_an_error(image_store, tmp_path):
    images, store = image_store
    result = invoke("predict", "--head", store.parent / "head", str(tmp_path / "*.jpg"))
    assert result.exit_code == 1 and result.output == f"Error: no file matches '{tmp_path / '*.jpg'}'\n"
    (tmp_path / "a.jpg").write_bytes(next(images.rglob("*.jpg")).read_bytes())
    result = invoke("predict", "--head", store.parent / "head", str(tmp_path / "*.jpg"), "--engine", "keras")
    assert result.exit_code == 0 and result.stdout.startswith(f"{tmp_path / 'a.jpg'}: "), result.output


def test_predict_json_is_valid_utf8_for_any_file_name(image_store, tmp_path):
    images, store = image_store
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(latin1, "wb") as fh:
        fh.write(next(images.rglob("*.jpg")).read_bytes())
    result = subprocess.run([sys.executable, "cli.py", "predict", "--head", str(store.parent / "head"),
                             os.fsdecode(latin1), "--engine", "keras", "--json", "--quiet"],
                            cwd=REPO, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    row = json.loads(result.stdout.decode("utf-8"))  # strict: raises on invalid UTF-8
    assert os.fsencode(row["image"]) == latin1 and row["label"] in CLASSES_OF_IMAGES  # name kept losslessly


def test_predict_with_a_cached_engine_never_imports_tensorflow_and_says_so(image_store):
    images, store = image_store
    image = next(images.rglob("*.jpg"))
    assert invoke("predict", "--head", store.parent / "head", image, "--engine", "onnx").exit_code == 0  # caches it
    probe = ("import atexit, runpy, sys; "
             "atexit.register(lambda: print('TF LOADED' if 'tensorflow' in sys.modules else 'no tf', file=sys.stderr)); "
             f"sys.argv = ['cli.py', 'predict', '--head', {str(store.parent / 'head')!r}, {str(image)!r}]; "
             "runpy.run_path('cli.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "no tf", result.stderr
    assert "engine onnxruntime (cached backbone engine) + numpy head" in result.stderr
    assert result.stdout.startswith(f"{image}: ")


def test_predict_with_an_exported_onnx_model(tmp_path):
    from test_edge import build_model, solid

    model = build_model(tmp_path / "model.onnx")
    solid(tmp_path / "in" / "r.png", "red")
    solid(tmp_path / "in" / "sub" / "b.png", "blue")
    result = invoke("predict", "--model", model, tmp_path / "in", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{tmp_path / 'in' / 'r.png'}: red (1.000)",
                                          f"{tmp_path / 'in' / 'sub' / 'b.png'}: blue (1.000)"]
    result = invoke("predict", "--model", model, "--head", tmp_path, tmp_path / "in")
    assert result.exit_code == 1 and "give either --head HEAD or --model" in result.output


def _store_with_images(tmp_path: Path) -> tuple[Path, Path]:
    """A store (classes red, green, blue) whose rows point at real solid-colour images; one test image
    of class red is blue, so a colour model misclassifies exactly that one."""
    from test_edge import solid

    classes = ("red", "green", "blue")
    sizes = {name: {"train": 4, "validation": 2, "test": 3} for name in classes}
    images = tmp_path / "moved-images"
    store = make_feature_store(tmp_path / "features.h5", classes=classes, sizes=sizes, backbone="tiny-test")
    for row_path, name in zip(FeatureStore(store).read().paths, FeatureStore(store).read().labels):
        solid(images / row_path, "blue" if row_path == "red/test_0.jpg" else classes[name])
    return store, images


def test_evaluate_an_onnx_model_writes_the_same_report_as_a_head(tmp_path):
    from test_edge import build_model

    store, images = _store_with_images(tmp_path)
    model = build_model(tmp_path / "model.onnx")
    result = invoke("evaluate", "--store", store, "--model", model, "--report-dir", tmp_path / "r")
    assert result.exit_code == 1 and "pass --images DIR" in result.output  # the images moved since extraction
    result = invoke("evaluate", "--store", store, "--model", model, "--images", images, "--report-dir",
                    tmp_path / "r", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert (metrics["n"], metrics["accuracy"], metrics["kind"]) == (9, pytest.approx(8 / 9), "onnx")
    assert [(m["path"], m["true"], m["predicted"]) for m in metrics["misclassified"]] == [
        ("red/test_0.jpg", "red", "blue")]
    assert metrics["confusion_matrix"] == [[2, 0, 1], [0, 3, 0], [0, 0, 3]]
    written = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert written == sorted(REPORT_FILES)  # t-SNE too: the store has features of the model's backbone (tiny-test)

    (tmp_path / "h").mkdir()
    head_report = invoke("evaluate", "--store", store, "--head", _head_and_store(tmp_path / "h")["head"],
                         "--report-dir", tmp_path / "rh")
    assert head_report.exit_code == 1 and "the head was trained on mobilenet_v2 features" in head_report.output
    both = invoke("evaluate", "--store", store, "--model", model, "--head", tmp_path, "--report-dir", tmp_path / "x")
    assert both.exit_code == 2 and "give either --head HEAD or --model" in both.output


def test_evaluate_on_a_folder_without_a_store(tmp_path):
    from test_edge import build_model, solid

    for name in ("red", "green", "blue"):
        for i in range(3):
            solid(tmp_path / "photos" / "test" / name / f"{i}.png", name)
            solid(tmp_path / "photos" / "train" / name / f"{i}.png", name)
    result = invoke("evaluate", "--model", build_model(tmp_path / "m.onnx"), "--images", tmp_path / "photos",
                    "--report-dir", tmp_path / "r", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("onnx model on 9 test images: accuracy 1.000")
