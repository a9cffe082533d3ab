import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PACKPTQ_QUIET", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import nets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(arch, opset, fold=True) -> path of an ONNX file, cached for the session."""
    cache = {}
    base = tmp_path_factory.mktemp("models")

    def get(arch, opset=17, fold=True, dynamo=False):
        key = (arch, opset, fold, dynamo)
        if key not in cache:
            net = nets.build(arch)
            cache[key] = nets.export(net, base / f"{arch}_{opset}_{fold}_{dynamo}.onnx", opset, dynamo, fold)
        return cache[key]

    return get
