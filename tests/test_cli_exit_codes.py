"""The exit statuses and program names the README documents, checked on the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def run(*args: str, argv0: str | None = None) -> subprocess.CompletedProcess:
    """``python cli.py ARGS``, or the console script's way of calling main() with ``argv0``."""
    if argv0 is None:
        command = [sys.executable, "cli.py", *args]
    else:
        command = [sys.executable, "-c", f"import sys; sys.argv[0] = {argv0!r}; from cli import main; main()", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)


def test_usage_errors_exit_2_library_errors_exit_1_with_one_error_line(tmp_path):
    usage = run("store", "info")
    assert usage.returncode == 2 and usage.stderr.startswith("Usage: python cli.py store info [OPTIONS] STORE")
    assert usage.stderr.strip().splitlines()[-1] == "Error: Missing argument 'STORE'."
    not_a_store = tmp_path / "x.h5"
    not_a_store.write_text("not hdf5")
    failed = run("store", "info", str(not_a_store))
    assert failed.returncode == 1 and failed.stdout == ""
    assert len(failed.stderr.strip().splitlines()) == 1 and failed.stderr.startswith("Error: "), failed.stderr


def test_edge_errors_say_edge_error_and_exit_2_under_the_name_typed():
    typed = run("edge", "--watch", "nowhere")
    assert typed.returncode == 2
    assert typed.stderr.strip() == ("edge: error: the following arguments are required: --model, --results "
                                    "(see python cli.py edge --help)")
    assert run("edge", "--help").stdout.startswith("usage: python cli.py edge ")


def test_console_script_shows_its_own_name():
    result = run("--help", argv0="/somewhere/bin/transferkit")
    assert result.returncode == 0 and result.stdout.startswith("Usage: transferkit [OPTIONS] COMMAND")
    assert run("--help").stdout.startswith("Usage: python cli.py [OPTIONS] COMMAND")


def test_tensorflow_commands_print_no_start_up_chatter(tmp_path):
    from conftest import make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=2)
    env = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI must not rely on the caller
    result = subprocess.run([sys.executable, "cli.py", "extract", str(images), "--store", str(tmp_path / "s.h5"),
                             "--backbone", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--engine",
                             "keras", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no absl/oneDNN/CUDA lines
    assert result.stdout.startswith("mobilenet_v2: 6 images in ")


def test_warnings_and_weight_loading_errors_are_one_line():
    from extract.models import first_sentence
    from extract.quiet import one_line_warning

    layers = "Layer count mismatch when loading weights from file. Model expected 106 layers, found 116 saved layers."
    assert first_sentence(ValueError(layers + "\n\nReceived: " + "layer, " * 2000)) == layers
    assert len(first_sentence(ValueError("x" * 5000))) == 200
    line = one_line_warning(UserWarning("`input_shape` is undefined\nsecond line"), UserWarning, "keras.py", 7)
    assert line == "warning: `input_shape` is undefined\n"
