"""Atomic file output: write beside the target, then rename; large models with external data."""
from __future__ import annotations

import json
import os
import tempfile

import onnx

EXTERNAL_DATA_BYTES = 1_800_000_000


def save_model(model: onnx.ModelProto, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".packptq-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        if model.ByteSize() > EXTERNAL_DATA_BYTES:
            data = os.path.basename(path) + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(obj, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".packptq-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=float)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
