"""Start-up cost of the CLI: commands that do little (help, an unchanged extract) must not pay for
TensorFlow or scikit-learn imports (seconds and hundreds of MB on a small box)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "sklearn", "scipy", "tf2onnx", "ray")


def test_loading_every_command_imports_no_heavy_library():
    probe = ("import sys; sys.argv = ['cli.py', '--help']; import cli; "
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at start-up: {done.stdout.strip()}"
