"""Extraction defaults shared by the library and the CLI; importing this module imports nothing
else, so ``cli.py --help`` stays fast. Each value says where it was measured."""

# Images per inference batch: see docs/bench/int8.md and docs/bench/engine-limits-*.md.
DEFAULT_BATCH_SIZE = 32

# Accuracy points int8 features may lose against fp32 before the int8 engine is refused (extract.int8).
DEFAULT_TOLERANCE = 0.5
