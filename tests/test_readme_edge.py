"""The README's edge install recipe, run as written on a box that has only edge/requirements.txt.

The recipe is taken from the README (not copied here), `/opt` and `/srv` are moved under a
temporary folder, and a `sitecustomize` makes TensorFlow, Keras and every other package of this
repository unimportable (including the editable install of the development venv, which would
otherwise hide a recipe that copies the wrong thing).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_edge import build_model, read_results, solid

REPO = Path(__file__).resolve().parents[1]

BLOCKER = '''
import sys
BLOCKED = {"tensorflow", "keras", "tf2onnx", "torch", "extract", "classify", "export", "cli", "bench"}
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]

class _Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this edge box")
        return None

sys.meta_path.insert(0, _Block)
'''


def readme_edge_recipe() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Installing on the edge machine", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_readme_edge_recipe_works_as_written(tmp_path):
    recipe = readme_edge_recipe()
    assert "python -m edge" in recipe and "pip install -r edge/requirements.txt" in recipe
    script = recipe.replace("/opt/", f"{tmp_path}/opt/").replace("/srv/", f"{tmp_path}/srv/")
    assert "/opt/" not in script.replace(f"{tmp_path}/opt/", "") and "/srv/" not in script.replace(f"{tmp_path}/srv/", "")

    box = tmp_path / "download"  # what the user copied to the edge machine
    shutil.copytree(REPO / "edge", box / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    build_model(box / "model.onnx")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(shim), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed on this edge box" in probe.stderr  # the box is bare

    inbox = tmp_path / "srv" / "inbox"
    proc = subprocess.Popen(["bash", "-euc", script], cwd=box, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not inbox.is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        solid(inbox / "photo.png", "green")
        results = tmp_path / "srv" / "results.jsonl"
        while time.monotonic() < deadline and proc.poll() is None and not results.exists():
            time.sleep(0.2)
        while time.monotonic() < deadline and proc.poll() is None and not read_results(results):
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert (tmp_path / "opt" / "classifier" / "edge" / "__main__.py").is_file(), err
    rows = read_results(results)
    assert [(r["path"], r["label"]) for r in rows] == [("photo.png", "green")], err
    assert (tmp_path / "srv" / "done" / "photo.png").is_file()
