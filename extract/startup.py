"""Start-up of a command that imports the numeric libraries, without two costs of CPython 3.11.

Importing scikit-learn (and through it SciPy) runs for about a second on this project's 2-core
machine, and two things in the interpreter made it longer than it needs to be:

- the cyclic garbage collector walks the ~10^5 long-lived objects the imports create again and
  again while they are created, and twice more when the interpreter exits (0.14 s of the imports,
  0.15 s of exit). ``import_library`` runs the imports with the collector off and then freezes
  everything alive (``gc.freeze``): later collections, and the one at exit, skip those objects;
  objects made afterwards are collected as usual.
- CPython 3.11 keeps its frames in 16 KB chunks, allocated (mmap) and freed (munmap) as the call
  stack crosses a chunk's end: how often depends on the depth the imports start at. From inside
  click's command dispatch it was 30,000 times, 0.25 s, against 10,000 from the bottom of a fresh
  thread's stack, which ``import_library`` therefore imports in.

    >>> train, recipe = import_library("classify.train", "classify.recipe")
"""

from __future__ import annotations

import gc
import importlib
import threading
from types import ModuleType


def import_library(*names: str) -> list[ModuleType]:
    """The modules ``names``, imported in a fresh thread with the garbage collector off, and
    everything alive afterwards frozen. An import error is raised here, as by ``import``."""
    modules: list[ModuleType] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            modules.extend(importlib.import_module(name) for name in names)
        except BaseException as exc:  # raised again in the caller's thread
            failed.append(exc)

    enabled = gc.isenabled()
    gc.disable()
    try:
        importer = threading.Thread(target=run, name="import", daemon=True)  # Ctrl-C does not wait for it
        importer.start()
        importer.join()
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    if failed:
        raise failed[0]
    return modules
