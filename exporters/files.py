"""Atomic file output: write beside the target, then rename; large models with external data."""
from __future__ import annotations

import json
import os
import tempfile

import onnx

EXTERNAL_DATA_BYTES = 1_800_000_000


def temp_beside(path: str, suffix: str) -> str:
    """A temporary file in the target's folder with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(prefix=".packptq-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def save_model(model: onnx.ModelProto, path: str) -> None:
    tmp = temp_beside(path, ".onnx")
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


def _plain(x):
    """numpy scalars and arrays as Python values; anything else as its text."""
    return x.tolist() if hasattr(x, "tolist") else str(x)


def save_json(obj, path: str) -> None:
    tmp = temp_beside(path, ".json")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_plain)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_text(text: str, path: str) -> None:
    tmp = temp_beside(path, ".txt")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
