"""Run the README's sample sessions and write their real output back into README.md.

Every ```text block of README.md whose first line starts with ``$ `` is a sample session: each ``$ COMMAND``
line is run (in order, block after block, in one work folder) and the lines after it are replaced by what
the command printed (stdout and stderr, without the progress bars' lines). No sample output is typed by hand, and a
command that fails stops the script with its output, so the README cannot show a command that does not
run as written. A block right after a ``<!-- readme-samples: skip -->`` line is left alone (its text says
where its real output came from, e.g. a run on other data). The only edit made to an output: the work
folder's absolute path is shown relative ("inbox" for /tmp/.../inbox, "photos" for the data set it links
to), the home folder as "~", and blank lines (a progress bar's last clear) are dropped, so the README
names no path of the machine it ran on.

The work folder holds what the samples name: ``photos/`` (the fruits set), the sanity photos
(``banana.jpg``, ...), ``apple1.jpg``/``apple2.jpg`` and an ``inbox/`` of fruit photos for the edge runner.

    python scripts/readme_samples.py                      # ../shared/datasets, README.md rewritten
    python scripts/readme_samples.py --data DIR --check   # run only; exit 1 if a command fails
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```text\n(\$ .*?)^```$", re.M | re.S)
INBOX_IMAGES = 12
SKIP = "<!-- readme-samples: skip -->"
# tqdm's lines (a terminal overwrites them): with a total ("40%|####| 2/5 [") or before it is known ("0fit [00:00, ?fit/s]")
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*[\d.]+[kM]?/[\d.]+[kM]?\s*\[|\d+[a-z]* \[\d\d:\d\d, [?\d.]+[a-z]*/s\]")


def prepare(work: Path, data: Path) -> None:
    """The files the README's samples name, in ``work``."""
    fruits, sanity = data / "fruits", data / "sanity"
    (work / "photos").symlink_to(fruits.resolve())
    (work / "cli.py").symlink_to(REPO / "cli.py")
    for photo in sorted(sanity.glob("*.jpg")):
        shutil.copy(photo, work / photo.name)
    apples = sorted((fruits / "freshapples").iterdir())
    for i, photo in enumerate(apples[:2], 1):
        shutil.copy(photo, work / f"apple{i}{photo.suffix.lower()}")
    inbox = work / "inbox"
    for klass in sorted(p for p in fruits.iterdir() if p.is_dir()):
        (inbox / klass.name).mkdir(parents=True)
        for photo in sorted(klass.iterdir())[-INBOX_IMAGES // 6:]:
            shutil.copy(photo, inbox / klass.name / photo.name)


def run(command: str, work: Path) -> str:
    """``command`` as a user types it in ``work``; its output, or SystemExit when it fails."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO), "COLUMNS": "120",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, shell=True, cwd=work, env=env, text=True, capture_output=True,
                          errors="backslashreplace")
    lines = (done.stdout + done.stderr).splitlines()
    output = "\n".join(line for line in lines if line.strip() and not PROGRESS_BAR.search(line))
    output = output.replace(str((work / "photos").resolve()), "photos").replace(f"{work.resolve()}/", "").replace(str(work.resolve()), ".").replace(str(Path.home()), "~")
    print(f"$ {command}\n{output}\n", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"README sample failed (exit {done.returncode}): {command}")
    return output


def rerun_block(block: str, work: Path) -> str:
    """The block with every command's output replaced by a fresh run's."""
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    return "\n\n".join(f"$ {c}\n{run(c, work)}".rstrip("\n") for c in commands) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets",
                        help="folder holding fruits/ and sanity/ [default: ../shared/datasets]")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--check", action="store_true", help="run the samples without rewriting the README")
    args = parser.parse_args(argv)
    if not (args.data / "fruits").is_dir() or not (args.data / "sanity").is_dir():
        parser.error(f"{args.data} has no fruits/ and sanity/ folders (pass --data)")
    text = args.readme.read_text()
    with tempfile.TemporaryDirectory(prefix="readme-samples-") as tmp:
        work = Path(tmp)
        prepare(work, args.data)
        fresh = BLOCK.sub(lambda m: m.group(0) if text[:m.start()].rstrip().endswith(SKIP)
                          else f"```text\n{rerun_block(m.group(1), work)}```", text)
    if not args.check:
        args.readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
