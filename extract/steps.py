"""Say on stderr what a long step is doing, for the steps without a count to put in a progress bar."""

from __future__ import annotations

import sys


def step(message: str, enabled: bool = True) -> None:
    """``<message>...`` on stderr (``--quiet`` / ``progress=False``: nothing)."""
    if enabled:
        print(f"{message}...", file=sys.stderr, flush=True)
