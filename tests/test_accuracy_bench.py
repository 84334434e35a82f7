"""bench/accuracy.py on a generated store: the same folds for every variant, joined variants, the table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import fake_record, make_feature_store

from bench.accuracy import evaluate_variant, to_markdown
from extract.store import BackboneRows, read_state, write_state


def test_variants_share_folds_and_sum_backbone_costs(tmp_path):
    store = make_feature_store(tmp_path / "s.h5", backbone="efficientnet_lite0", dim=6, spread=1.0)
    state = read_state(store)
    rows = state.backbones["efficientnet_lite0"]
    noise = np.random.default_rng(1).normal(0, 1, rows.features.shape).astype(np.float32)
    record = replace(fake_record("efficientnet_lite1", 6), tta="flip")
    state.backbones["efficientnet_lite1@flip"] = BackboneRows(record, rows.path, rows.sha256, noise)
    write_state(store, state)
    costs = {"efficientnet_lite0": 1.5, "efficientnet_lite1@flip": 4.0}
    single = evaluate_variant(store, "efficientnet_lite0", ["softmax"], 0, costs)
    joined = evaluate_variant(store, "efficientnet_lite0+efficientnet_lite1@flip", ["softmax"], 0, costs)
    assert joined["feature_dim"] == 12 and single["feature_dim"] == 6
    assert joined["rows"]["softmax"]["backbone_cpu_ms_per_image"] == 5.5
    assert len(single["rows"]["softmax"]["accuracy_by_fold"]) == 5
    assert single["rows"]["all"]["kept_by_fold"] == ["softmax"] * 5
    noise_only = evaluate_variant(store, "efficientnet_lite1@flip", ["softmax"], 0, costs)
    assert noise_only["rows"]["softmax"]["accuracy_mean"] < single["rows"]["softmax"]["accuracy_mean"]
    text = to_markdown([{"data": "../shared/datasets/x", "classes": ["a", "b", "c"], "variants": [single, joined],
                         "not_measured": ["efficientnet_lite2"], "backbone_cpu_ms_per_image": costs}])
    assert "| efficientnet_lite0+efficientnet_lite1@flip (12) | softmax |" in text
    assert "Not measured" in text and "efficientnet_lite2" in text and "not measured in this run" in text
