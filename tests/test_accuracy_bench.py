"""bench/accuracy.py on a generated store: the same folds for every variant, joined variants, the table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import fake_record, make_feature_store

from bench.accuracy import evaluate_variant, to_markdown, trade_off_section, trade_offs
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


def _result(name: str, variants: dict[str, tuple[float, float]]) -> dict:
    """A data set's result with only what the trade-off reads: per variant (backbone ms, `all` accuracy)."""
    return {"data": f"../shared/datasets/{name}", "variants": [
        {"variant": v, "rows": {"all": {"backbone_cpu_ms_per_image": ms, "accuracy_mean": acc}}}
        for v, (ms, acc) in variants.items()]}


def test_trade_off_front_keeps_rows_no_cheaper_row_matches_on_every_set():
    results = [_result("a", {"cheap": (10, 0.80), "dear": (50, 0.90), "wasteful": (60, 0.85), "mixed": (30, 0.95),
                             "recipe": (90, 0.95)}),
               _result("b", {"cheap": (12, 0.90), "dear": (52, 0.95), "wasteful": (58, 0.96), "mixed": (32, 0.85),
                             "recipe": (92, 0.96), "one_set_only": (1, 1.0)})]
    rows = {row["variant"]: row for row in trade_offs(results)}
    assert list(rows) == ["cheap", "mixed", "dear", "wasteful", "recipe"]  # cheapest first, both sets only
    assert rows["dear"]["backbone_cpu_ms_per_image"] == 51 and rows["dear"]["accuracy"] == [0.90, 0.95]
    assert {v for v, row in rows.items() if row["on_front"]} == {"cheap", "mixed", "dear", "wasteful", "recipe"}
    results[1]["variants"][2]["rows"]["all"]["accuracy_mean"] = 0.95  # wasteful now no better than dear anywhere
    assert not {row["variant"]: row for row in trade_offs(results)}["wasteful"]["on_front"]
    text = "\n".join(trade_off_section(results))
    assert "| dear | 51.0 | 0.900 | 0.950 | 0.925 | yes |" in text and "| wasteful | 59.0 | 0.850 | 0.950 | 0.900 |  |" in text


def test_trade_off_names_the_recipe_verdict():
    from classify.recipe import RECIPE_FEATURES

    results = [_result("a", {"efficientnet_lite0": (10, 0.90), RECIPE_FEATURES: (100, 0.89)})]
    text = "\n".join(trade_off_section(results))
    assert "Most accurate on average: efficientnet_lite0." in text
    assert f"The recipe ({RECIPE_FEATURES}): not on the front, not the most accurate on average." in text
