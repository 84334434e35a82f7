"""The metadata contract of exported ONNX models (read by ``edge/model.py``).

Every exported model carries these ``metadata_props`` (JSON values are strings):

  class_names          JSON list, in output order
  input_size           JSON [H, W]
  layout               "NHWC"
  input_dtype          "uint8"
  preprocessing        JSON {"mode": ..., "color": "RGB", "resize": "bilinear", "in_graph": true}: the
                       record's preprocessing, marked as inside the graph
  backbone             JSON backbone record, exactly as in the feature store and the head file (its
                       shape is documented in ``extract/record.py``); the edge runner reads it as JSON;
                       for a model over several backbones, the first
  backbones            JSON list (models over several backbones only): every backbone's record, in the
                       order their features are concatenated; input_size is then the largest of theirs
  source               JSON {"kind": "head" | "fine-tuned", paths and fingerprints of what it was made from}
  model_id             "<backbone>-<kind>-<12 hex of graph_digest>": the same for the same computation
  transferkit_version  the version that exported it
  created              UTC time of the export
  quantization         JSON (int8 models only): method, calibration and the accuracy it was accepted at
  ood                  JSON (models with the second output ``ood_score``): the unknown score's method and
                       calibrated threshold (``classify/ood.py``); an image is unknown when its score is above it
  drift_reference      JSON (store + head exports): {"class_share": {class: share of images predicted so},
                       "mean_confidence": mean top probability, "split": ..., "rows": n} on the store's
                       test split (the validation rows trained the head, so their confidence is optimistic;
                       validation when a store has no test rows); the edge's --metrics drift gauges compare
                       the last images with it
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from edge.imageio import strict_json
from extract.clock import utc_now
from extract.errors import TransferKitError
from extract.files import file_sha256
from extract.record import BackboneRecord
from extract.version import __version__

TRANSFERKIT_VERSION = __version__
REQUIRED_KEYS = ("class_names", "input_size", "layout", "input_dtype", "preprocessing", "backbone", "source",
                 "model_id", "transferkit_version", "created")
JSON_KEYS = ("class_names", "input_size", "preprocessing", "backbone", "backbones", "source", "quantization", "ood",
             "drift_reference")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def drift_reference(probabilities: np.ndarray, class_names: list[str], split: str) -> dict:
    """The ``drift_reference`` of a model whose probabilities on the images of ``split`` are
    ``probabilities`` (rows): the share of images per predicted class and the mean top probability."""
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=len(class_names))
    rows = len(probabilities)
    return {"class_share": {name: round(int(n) / rows, 6) for name, n in zip(class_names, predicted)},
            "mean_confidence": round(float(probabilities.max(axis=1).mean()), 6), "split": split, "rows": rows}


def path_fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of the names and contents of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(os.fsencode(item.relative_to(path).as_posix()) + b"\0" + file_sha256(item).encode())
    return digest.hexdigest()


def build_metadata(class_names: list[str], backbone: BackboneRecord, source: dict,
                   joined: list[BackboneRecord] | None = None) -> dict:
    """The metadata of a float model, as Python values (``model_id`` is added when the graph is final);
    ``joined``: every backbone's record, for a model over several."""
    size = max(record.input_size for record in joined or [backbone])
    return {
        "class_names": list(class_names),
        "input_size": [size, size],
        "layout": "NHWC",
        "input_dtype": "uint8",
        "preprocessing": {**asdict(backbone.preprocessing), "in_graph": True},
        "backbone": backbone.to_dict(),
        **({"backbones": [record.to_dict() for record in joined]} if joined else {}),
        "source": source,
        "transferkit_version": TRANSFERKIT_VERSION,
        "created": utc_now(),
    }


def graph_digest(model: onnx.ModelProto) -> str:
    """sha256 of what the graph computes: operators, attributes, wiring and weights, not the names
    and not the order of the nodes.

    tf2onnx numbers tensor and node names with process-wide counters, so converting the same model
    twice gives other names, and its topological sort can then list independent branches in
    another order. Each tensor's digest is therefore made from what produces it (a Merkle hash
    over the graph): a weight by its content, a graph input by its position, a node's output by
    the node's operator, attributes and input digests and the output's position.
    """
    digests = {tensor.name: _tensor_content(tensor) for tensor in model.graph.initializer}
    digests.update({value.name: f"input{k}" for k, value in enumerate(model.graph.input) if value.name not in digests})
    digests[""] = "absent"  # an optional input left out
    for node in model.graph.node:  # ONNX lists nodes in a topological order: inputs are known
        attributes = [f"{a.name}={_tensor_content(a.t)}" if a.HasField("t") else
                      a.SerializeToString(deterministic=True).hex() for a in node.attribute]
        computed = _sha256(f"{node.domain}:{node.op_type}({','.join(digests[name] for name in node.input)})"
                           f"[{';'.join(attributes)}]")
        digests.update({name: _sha256(f"{computed}:{k}") for k, name in enumerate(node.output)})
    return _sha256(",".join(digests[value.name] for value in model.graph.output))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_content(tensor: onnx.TensorProto) -> str:
    anonymous = onnx.TensorProto()
    anonymous.CopyFrom(tensor)
    anonymous.name = ""
    return hashlib.sha256(anonymous.SerializeToString(deterministic=True)).hexdigest()


def graph_model_id(model: onnx.ModelProto, backbone: str, kind: str) -> str:
    return f"{backbone}-{kind}-{graph_digest(model)[:12]}"


def set_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    """Replace ``metadata_props`` with ``metadata`` (JSON-encoding the structured values)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        text = strict_json(value, sort_keys=True) if key in JSON_KEYS else str(value)
        model.metadata_props.add(key=key, value=text)


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported model, JSON values decoded; refuses a file without our keys."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise TransferKitError(f"{path} lacks the metadata {', '.join(missing)}; export it with `cli.py export-onnx`")
    return {k: json.loads(v) if k in JSON_KEYS else v for k, v in props.items()}
