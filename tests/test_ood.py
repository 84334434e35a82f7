"""The unknown score: calibration out of fold, far images flagged, the ONNX output equal to numpy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.base import clone

from classify.ood import MahalanobisScorer
from classify.ood_graph import OOD_OUTPUT, add_ood_output
from classify.onnx_head import dense_softmax_graph


def _clusters(rng, per_class: int, dim: int = 24, classes: int = 3):
    centres = rng.normal(0, 4, (classes, dim))
    mixing = rng.normal(0, 1, (dim, dim)) / np.sqrt(dim)  # correlated features, like a backbone's
    y = np.repeat(np.arange(classes), per_class)
    X = centres[y] + rng.normal(0, 1, (len(y), dim)) @ mixing
    return X, y, centres, mixing


def test_threshold_flags_the_intended_share_of_new_in_class_images():
    rng = np.random.default_rng(0)
    X, y, centres, mixing = _clusters(rng, per_class=120)
    scorer = MahalanobisScorer(quantile=0.95).fit(X, y)
    fresh_y = np.repeat(np.arange(3), 3000)
    fresh = centres[fresh_y] + rng.normal(0, 1, (len(fresh_y), X.shape[1])) @ mixing
    flagged = np.mean(scorer.score_samples(fresh) > scorer.threshold_)
    # Out-of-fold calibration: close to the intended 5 %. An in-sample threshold (the features scored
    # by the means and covariance they shaped) sits lower and flags clearly more.
    assert 0.03 <= flagged <= 0.075, flagged
    in_sample = np.quantile(scorer.score_samples(X), 0.95)
    assert in_sample < scorer.threshold_
    assert np.mean(scorer.score_samples(fresh) > in_sample) > flagged + 0.02
    assert scorer.calibration_["calibrated_on"].startswith("5-fold out-of-fold")
    assert scorer.calibration_["threshold"] == scorer.threshold_


def test_images_of_no_class_score_far_above_the_threshold():
    rng = np.random.default_rng(1)
    X, y, centres, mixing = _clusters(rng, per_class=80)
    scorer = MahalanobisScorer().fit(X, y)
    between = (centres[0] + centres[1]) / 2 + rng.normal(0, 1, (200, X.shape[1])) @ mixing
    elsewhere = rng.normal(0, 4, (200, X.shape[1]))
    assert np.mean(scorer.score_samples(between) > scorer.threshold_) > 0.9
    assert np.mean(scorer.score_samples(elsewhere) > scorer.threshold_) > 0.95


def test_is_a_scikit_learn_estimator_with_validated_parameters():
    X, y, *_ = _clusters(np.random.default_rng(2), per_class=30)
    copy = clone(MahalanobisScorer(quantile=0.9))
    assert copy.get_params()["quantile"] == 0.9 and copy.fit(X, y) is copy and copy.n_features_in_ == X.shape[1]
    with pytest.raises(ValueError, match="quantile"):
        MahalanobisScorer(quantile=1.5).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        copy.score_samples(X[:, :5])


@pytest.mark.parametrize("opset", [17, 18])
def test_onnx_output_matches_numpy(opset):
    rng = np.random.default_rng(3)
    X, y, *_ = _clusters(rng, per_class=40)
    scorer = MahalanobisScorer().fit(X, y)
    head = dense_softmax_graph([(rng.normal(size=(X.shape[1], 3)), np.zeros(3))], opset=opset)
    add_ood_output(head, scorer)
    session = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = np.vstack([X[:20], rng.normal(0, 6, (10, X.shape[1]))]).astype(np.float32)
    probabilities, scores = session.run(None, {"features": probe})
    assert [o.name for o in session.get_outputs()] == ["probabilities", OOD_OUTPUT]
    assert probabilities.shape == (30, 3) and scores.shape == (30,)
    np.testing.assert_allclose(scores, scorer.score_samples(probe), rtol=1e-4, atol=1e-3)
