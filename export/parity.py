"""Keras vs onnxruntime parity on real images: every export is checked before it is kept.

An export passes when the largest absolute difference between the two models' probabilities is at
most ``PROBABILITY_ATOL`` (1e-4) and both pick the same top-1 class on every image (100% agreement).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from extract.engine import onnx_session
from extract.errors import TransferKitError

PROBABILITY_ATOL = 1e-4


class ParityError(TransferKitError):
    """The ONNX model does not compute what the Keras model computes."""


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    top1_agreement: float  # fraction of images with the same top-1 class
    atol: float
    ok: bool

    def summary(self) -> str:
        return (f"parity on {self.images} images: max |p_keras - p_onnx| = {self.max_abs_diff:.2e} "
                f"(tolerance {self.atol:.0e}), top-1 agreement {100 * self.top1_agreement:.1f}% (required 100%)")

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: np.ndarray, candidate: np.ndarray, atol: float = PROBABILITY_ATOL) -> ParityReport:
    """Compare two ``[N, C]`` probability arrays."""
    if reference.shape != candidate.shape:
        raise ParityError(f"the ONNX model outputs shape {list(candidate.shape)}, Keras {list(reference.shape)}")
    diff = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    agreement = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))) if len(reference) else 1.0
    ok = bool(np.isfinite(diff) and diff <= atol and agreement == 1.0)
    return ParityReport(images=len(reference), max_abs_diff=diff, top1_agreement=agreement, atol=atol, ok=ok)


def check_parity(
    reference: Callable[[np.ndarray], np.ndarray],
    onnx_path: str | Path,
    images: np.ndarray,
    atol: float = PROBABILITY_ATOL,
    threads: int | None = None,
    batch_size: int = 16,
) -> ParityReport:
    """Run ``reference`` (uint8 batch -> probabilities) and the ONNX file on ``images``; raise when they differ."""
    if not len(images):
        raise ParityError("no image could be decoded for the parity check; pass --images DIR with readable images")
    session = onnx_session(onnx_path, threads)
    name = session.get_inputs()[0].name
    expected, got = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        expected.append(np.asarray(reference(batch), dtype=np.float32))
        got.append(np.asarray(session.run(None, {name: batch})[0], dtype=np.float32))
    report = compare(np.concatenate(expected), np.concatenate(got), atol)
    if not report.ok:
        raise ParityError(f"export refused, the ONNX model differs from Keras: {report.summary()}")
    return report
