"""Extraction defaults shared by the library and the CLI; importing this module imports nothing
else, so ``cli.py --help`` stays fast. Each value says where it was measured."""

# Images per inference batch: batch 8 ran 3-4 % faster than 32 for ResNet50 and EfficientNet-Lite0
# (docs/bench/engine-limits-*.md, idle machine); the store groups small batches into one segment.
DEFAULT_BATCH_SIZE = 8

# Accuracy points int8 features may lose against fp32 before the int8 engine is refused (extract.int8).
DEFAULT_TOLERANCE = 0.5
