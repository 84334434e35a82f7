"""A fine-tuned model's export carries the unknown score too: Mahalanobis on its own penultimate
features over its train and validation images, as a second output with its ``ood`` metadata.

Uses the session ``fine_tuned`` fixture (random-init MobileNetV2 at 32 px, fine-tuned 2 epochs).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edge.model import load_model
from export.data import load_batch
from export.finetune_ood import penultimate_scorer, with_features_output
from export.keras_models import load_fine_tuned, read_sidecar
from export.metadata import read_metadata
from export.onnx_export import export_onnx, fine_tuned_images


def test_fine_tuned_export_has_the_score_of_its_own_features(fine_tuned, tmp_path):
    model_path, _ = fine_tuned
    out = tmp_path / "fine.onnx"
    export_onnx(out, model=model_path, parity_images=8, threads=1)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["probabilities", "ood_score"]
    ood = read_metadata(out)["ood"]
    assert ood["features"] == "penultimate layer of the fine-tuned model"

    model, info = load_fine_tuned(model_path)
    images = fine_tuned_images(read_sidecar(model_path), None)
    two = with_features_output(model)
    scorer = penultimate_scorer(two, images, 32)  # what the export computed, computed again
    labelled = int(np.sum(images.split != "test"))
    assert ood["threshold"] == pytest.approx(scorer.threshold_, rel=1e-9)
    assert f"of {labelled} in-class images" in ood["calibrated_on"]  # train + validation, never test

    batch, _ = load_batch(images.paths[:12], 32)
    edge = load_model(out, 1)
    assert edge.ood is not None and edge.ood_threshold == pytest.approx(scorer.threshold_)
    probabilities, scores = edge.predict_scores(batch)
    expected = scorer.score_samples(np.asarray(two(batch, training=False)[1], np.float64))
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * float(np.median(expected)))
    np.testing.assert_allclose(probabilities, np.asarray(model(batch, training=False)), atol=1e-4)
