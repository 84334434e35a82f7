"""Edge runner: watch a folder and classify every image that lands in it with an exported ONNX model.

Runs on CPU-only machines with onnxruntime, numpy and Pillow only (never TensorFlow): copy this
folder and ``pip install -r edge/requirements.txt``, then ``python -m edge --help``.

Modules, one job each:
- ``model``: load the ONNX session and the metadata contract written by the export step.
- ``watch``: find complete files in the watch folder (size/mtime stable, temporary names ignored).
- ``files``: hashing, moving without overwriting, folder fsync.
- ``results``: the append-only results log, its journal, and the crash-safety protocol.
- ``stats``: the periodic throughput/latency line.
- ``runner``: the loop tying them together.
- ``__main__``: the command line.
"""
