"""The unknown score: calibration out of fold, far images flagged, the ONNX output equal to numpy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.base import clone

from scipy.linalg import eigh
from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage as sklearn_shrinkage
from threadpoolctl import threadpool_limits

from classify.ood import MahalanobisScorer, ledoit_wolf_shrinkage, top_eigenpairs
from classify.ood_graph import OOD_OUTPUT, add_ood_output
from classify.onnx_head import dense_softmax_graph


@pytest.fixture(autouse=True)
def one_blas_thread():
    """The tests' own products on one thread: two OpenBLAS threads on a busy 2-core box spin for seconds."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


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


@pytest.mark.parametrize("opset, components", [(17, 1024), (18, 1024), (17, 6)])
def test_onnx_output_matches_numpy(opset, components):
    rng = np.random.default_rng(3)
    X, y, *_ = _clusters(rng, per_class=40)
    scorer = MahalanobisScorer(components=components).fit(X, y)
    head = dense_softmax_graph([(rng.normal(size=(X.shape[1], 3)), np.zeros(3))], opset=opset)
    add_ood_output(head, scorer)
    session = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = np.vstack([X[:20], rng.normal(0, 6, (10, X.shape[1]))]).astype(np.float32)
    probabilities, scores = session.run(None, {"features": probe})
    assert [o.name for o in session.get_outputs()] == ["probabilities", OOD_OUTPUT]
    assert probabilities.shape == (30, 3) and scores.shape == (30,)
    np.testing.assert_allclose(scores, scorer.score_samples(probe), rtol=1e-4, atol=1e-3)


def _full_ledoit_wolf_distance(X, y, probe):
    """The definition the reduced form must equal: min over classes of (x - m)^T inv(LW covariance) (x - m)."""
    means = np.stack([X[y == k].mean(axis=0) for k in np.unique(y)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(X - means[y]).covariance_)
    diff = probe[:, None, :] - means[None]
    return np.einsum("ncd,de,nce->nc", diff, precision, diff).min(axis=1)


@pytest.mark.parametrize("per_class, dim", [(15, 60), (60, 20)])  # fewer images than features, and more
def test_equals_the_full_ledoit_wolf_distance_while_the_basis_spans_the_residuals(per_class, dim):
    rng = np.random.default_rng(4)
    X, y, *_ = _clusters(rng, per_class=per_class, dim=dim)
    probe = np.vstack([X[:10], rng.normal(0, 5, (10, dim))])
    scorer = MahalanobisScorer().fit(X, y)
    assert scorer.geometry_.basis.shape == (dim, min(dim, len(X) - 3))
    np.testing.assert_allclose(scorer.score_samples(probe), _full_ledoit_wolf_distance(X, y, probe), rtol=1e-8)


@pytest.mark.parametrize("rows, dim", [(30, 80), (200, 40)])  # Gram matrix, then scatter
def test_the_shrinkage_is_scikit_learns(rows, dim):
    R = np.random.default_rng(5).normal(size=(rows, dim)) @ np.random.default_rng(6).normal(size=(dim, dim))
    moments = (R @ R.T if rows <= dim else R.T @ R) / rows
    shrinkage, average = ledoit_wolf_shrinkage(moments, (R**2).sum(axis=1), rows, dim)
    assert shrinkage == pytest.approx(sklearn_shrinkage(R, assume_centered=True), rel=1e-10)
    assert average == pytest.approx((R**2).sum() / rows / dim)


def test_subspace_iteration_finds_the_top_eigenpairs():
    rng = np.random.default_rng(7)
    vectors, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    spectrum = 100.0 * 0.9 ** np.arange(200)  # falling like a backbone's
    moments = (vectors * spectrum) @ vectors.T
    values, found = top_eigenpairs(moments, 10, seed=0)  # 200 > 2 * (10 + oversampling): iterated
    exact_values, exact = eigh(moments, subset_by_index=[190, 199])
    np.testing.assert_allclose(values, exact_values[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(found * exact[:, ::-1], axis=0)), 1, atol=1e-6)


def test_the_graph_carries_a_features_by_k_basis_and_a_residual():
    rng = np.random.default_rng(8)
    X, y, *_ = _clusters(rng, per_class=100, dim=300)  # 300 features, 297 residual directions
    scorer = MahalanobisScorer(components=16).fit(X, y)
    head = dense_softmax_graph([(rng.normal(size=(300, 3)), np.zeros(3))], opset=17)
    add_ood_output(head, scorer)
    shapes = {t.name: tuple(t.dims) for t in head.graph.initializer if t.name.startswith("ood/")}
    assert shapes["ood/basis"] == (300, 16) and max(np.prod(s) for s in shapes.values()) == 300 * 16
    # a point off a class mean only along a basis direction, or only outside the basis, scores the
    # squared step times that direction's scale: the residual's scale for every direction outside
    geometry = scorer.geometry_
    along = geometry.basis[:, 0]
    across = np.linalg.qr(np.c_[geometry.basis, rng.normal(size=300)])[0][:, -1]
    assert geometry.residual_scale > 0
    for direction, scale in ((along, geometry.scales[0]), (across, geometry.residual_scale)):
        step = scorer.class_means_[0] + 2 * direction
        assert scorer.score_samples(step[None])[0] == pytest.approx(4 * scale**2, rel=1e-6)


def test_the_exported_score_and_model_id_do_not_depend_on_blas_threads():
    """The unknown score's matrices are part of the graph, and the graph's digest is the model id: the
    same features must give the same bits whatever the BLAS thread count (two OpenBLAS threads sum
    eigenvector products in another order; this size did give another model id before the fit
    pinned one thread)."""
    from export.metadata import graph_model_id

    rng = np.random.default_rng(9)
    X, y, *_ = _clusters(rng, per_class=50, dim=300)
    weights = rng.normal(size=(300, 3))
    ids = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            head = dense_softmax_graph([(weights, np.zeros(3))], opset=17)
            add_ood_output(head, MahalanobisScorer().fit(X, y))
            ids.append(graph_model_id(head, "backbone", "head"))
    assert ids[0] == ids[1]
