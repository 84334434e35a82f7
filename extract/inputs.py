"""Image arguments on a command line: files, folders (searched like ``extract`` does) and glob patterns.

Used by ``predict`` and ``identify``, so both accept the same things.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from extract.dataset import walk_image_files
from extract.errors import TransferKitError

GLOB_CHARACTERS = frozenset("*?[")


class NoImagesMatched(TransferKitError):
    """A glob pattern matched no file."""


def collect_images(arguments: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files named by ``arguments``, and ``(argument, reason)`` for each
    argument that names nothing usable.

    A folder gives its image files (recursively, hidden ones skipped); a pattern with ``* ? [`` that
    is not an existing path is expanded (recursive ``**`` allowed) and must match at least one file.
    """
    files: list[str] = []
    failed: list[tuple[str, str]] = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = [os.path.join(argument, rel) for rel in walk_image_files(Path(argument))]
            if not found:
                failed.append((argument, "folder has no image files"))
            files += found
        elif not os.path.lexists(argument) and GLOB_CHARACTERS & set(argument):
            matched = sorted(p for p in glob.glob(argument, recursive=True) if not os.path.isdir(p))
            if not matched:
                raise NoImagesMatched(f"no file matches {argument!r}")
            files += matched
        else:
            files.append(argument)
    return files, failed
