import os
import sys
import warnings

import pytest
from hypothesis import settings

# CI runs the property and fuzz tests on a fixed seed so a landing never fails by chance;
# HYPOTHESIS_PROFILE=fuzz draws fresh random examples for a local hunt.
settings.register_profile("ci", derandomize=True)
settings.register_profile("fuzz", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
