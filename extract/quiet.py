"""Keep TensorFlow's start-up chatter off the terminal of the command line.

``TF_CPP_MIN_LOG_LEVEL=3`` does not silence the lines TensorFlow's C++ side writes while it loads
(absl's "All log messages before absl::InitializeLog() ...", oneDNN and CUDA notices): they are
written to file descriptor 2 before any setting is read. ``install()`` hooks the first
``import tensorflow`` (whoever triggers it: Keras, tf2onnx, our models) and runs it with
descriptor 2 captured; afterwards every captured line that is not one of those known notices is
written back, so real errors still show. Nothing is imported until a command needs TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations|cudart_stub|"
    r"Could not find cuda drivers|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer|"
    r"TF-TRT Warning|This TensorFlow binary is optimized|failed call to cuInit|"
    r"Attempting to register factory for plugin|cuda_executor|rebuild TensorFlow with the appropriate compiler"
)


class _Existing(importlib.abc.Loader):
    """Hands the import system a module that was already imported (with stderr captured)."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self.busy:
            return None
        self.busy = True
        try:
            module = _import_quietly(name)
        finally:
            self.busy = False
        original = module.__spec__
        spec = importlib.machinery.ModuleSpec(name, _Existing(module), origin=original.origin, is_package=True)
        spec.submodule_search_locations = original.submodule_search_locations
        return spec


def _import_quietly(name: str):
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            module = importlib.import_module(name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not NOISE.search(line)]
            sys.stderr.write("".join(kept))
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # Keras/TF python-side absl warnings
    except ImportError:
        pass
    return module


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    """``warning: <first line>`` instead of Python's two lines with the source file and line."""
    first = (str(message).strip().splitlines() or [category.__name__])[0]
    return f"warning: {first}\n"


def install() -> None:
    """Hook the first ``import tensorflow`` (idempotent), set ``TF_CPP_MIN_LOG_LEVEL=3`` and print
    warnings (Keras' UserWarnings) as one line each."""
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.formatwarning = one_line_warning
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())
