"""Start-up of a command that imports the numeric libraries: without the garbage collector's rescans.

Importing scikit-learn (and through it SciPy) creates some 10^5 long-lived objects and no
garbage, yet the cyclic garbage collector walks them again and again while they are created, and
twice more when the interpreter exits. On this project's 2-core machine that was 0.14 s of the
1 s ``fit-head`` spends importing, and 0.15 s of exit. ``library_imports`` runs the imports with
the collector off and then freezes everything alive (``gc.freeze``): later collections, and the
one at exit, skip those objects. Objects made afterwards are collected as usual.

    >>> with library_imports():
    ...     from classify.train import fit_heads
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def library_imports() -> Iterator[None]:
    """The imports inside run with the garbage collector off; what is alive afterwards is frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
