"""bench/int8_bench.py: head accuracy from a store, and the report's ratios and load note."""

from __future__ import annotations

from conftest import make_feature_store

from bench.int8_bench import _pass_rates, store_accuracy, to_markdown


def test_store_accuracy_fits_the_tools_head_on_train_and_validation_and_scores_test(tmp_path):
    store = make_feature_store(tmp_path / "f.h5", spread=6.0)  # 3 classes x (24 train, 8 validation, 8 test)
    acc = store_accuracy(store, "mobilenet_v2")
    assert (acc["labelled_images"], acc["test_images"]) == (96, 24)
    assert acc["cv_accuracy"] == 1.0 and acc["test_accuracy"] == 1.0

    noise = make_feature_store(tmp_path / "n.h5", spread=0.0)  # one blob: chance level
    assert store_accuracy(noise, "mobilenet_v2")["cv_accuracy"] < 0.7


def test_pass_rates_count_every_image_once_in_streams():
    import numpy as np

    seen = []
    rate, cpu_rate = _pass_rates(lambda batch: seen.append(len(batch)), np.zeros((10, 2)), batch=4, streams=2)
    assert sorted(seen) == [2, 4, 4] and rate > 0 and cpu_rate > 0


def _stat(value: float) -> dict:
    return {"median": value, "min": value, "max": value, "runs": 1}


def _engine(loop: float, alone: float, name: str, engine: str) -> dict:
    return {"engine": engine, "backbone_name": name, "extract_wall": _stat(100 / loop + 2),
            "extract_rate": _stat(100 / (100 / loop + 2)), "extract_cpu_rate": _stat(loop / 2),
            "fixed_seconds": _stat(2.0), "loop_rate": _stat(loop), "engine_alone_rate": _stat(alone),
            "engine_alone_cpu_rate": _stat(alone / 2), "one_batch_rate": _stat(alone * 0.8),
            "one_thread_cpu_rate": _stat(alone / 1.5), "loop_over_alone": loop / alone}


def _result(load_before: float) -> dict:
    gate = {"folds": 5, "gate_images": 600, "calibration_images": 300, "accuracy_fp32": 0.9, "accuracy_int8": 0.895,
            "drop_points": 0.5, "cosine_mean": 0.99, "cosine_min": 0.9, "quantize_seconds": 30.0}
    accuracy = {p: {"backbone_name": n, "labelled_images": 90, "test_images": 10, "cv_accuracy": cv,
                    "test_accuracy": test} for p, n, cv, test in (("fp32", "resnet50", 0.8, 0.9),
                                                                  ("int8", "resnet50@int8", 0.79, 0.9))}
    speed = {"images": 100, "first_int8_wall": 50.0, "warm_notes": [], "alone_images": 64,
             "gate": gate, "accuracy": accuracy,  # (the bench fits no head on random weights: made up here)
             "engines": {"fp32": _engine(10.0, 10.5, "resnet50", "onnx"),
                         "int8": _engine(25.0, 26.0, "resnet50@int8", "onnx-int8")}}
    return {"data": "../shared/datasets/trashnet", "batch": 8, "repeats": 1, "shard": "all", "cores": 2,
            "load_before": load_before, "load_after": 2.0,
            "backbones": {"resnet50": {"weights": "none", "speed": speed}}}


def test_report_derives_every_ratio_and_says_whether_the_machine_was_shared():
    text = to_markdown(_result(load_before=0.3))
    assert "speed on the whole folder of trashnet" in text and "otherwise idle (load average 0.3 before" in text
    assert "| `extract` loop: decode + infer + write (images/s) | 10.0 (10.0–10.0, 1 runs) | 25.0" in text
    assert "| 2.50x |" in text  # int8 / fp32 loop
    assert "| loop / engine alone as `extract` runs it | 95% | 96% | |" in text
    assert "5-fold CV accuracy 80.00% from fp32 features vs 79.00% from `resnet50@int8` (+1.00 points lost)" in text
    assert "the int8 runs pass `--tolerance 100`" in text and "at the default 0.5 the verdict is: accepted" in text
    assert "shared with other jobs" in to_markdown(_result(load_before=8.0))
