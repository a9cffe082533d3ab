"""--device cuda: calibration, sensitivity and reconstruction on a CUDA GPU. The model goes back to the CPU
for export and the parity proof, so the exported integers must match the simulation exactly as on the CPU,
and the result must be as good as the CPU run's. Skipped where torch sees no CUDA GPU (CI has none)."""
import os

import pytest
import torch
from conftest import SAMPLES

from packptq_onnx import reconstruct
from packptq_onnx.mixed import MixedOptions
from packptq_onnx.pipeline import Options, quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

MODEL = os.path.join(SAMPLES, "digits_resnet.onnx")
CALIB = os.path.join(SAMPLES, "calib.npz")
EVAL = os.path.join(SAMPLES, "eval.npz")


def _quantize(tmp_path, device, **kw):
    o = Options(wbits=3, abits=3, method="pack", device=device, recon=reconstruct.ReconOptions(iters=150), **kw)
    return quantize(MODEL, CALIB, str(tmp_path / f"{device}.onnx"), o, EVAL, log=lambda *_: None).to_dict()


def test_pack_on_cuda_exports_what_it_simulated_and_matches_cpu(tmp_path):
    gpu, cpu = _quantize(tmp_path, "cuda"), _quantize(tmp_path, "cpu")
    assert gpu["parity_layers"]["exact"]  # every layer within one code of onnxruntime
    for u in gpu["reconstruction"]["units"]:
        assert u["loss_after"] <= u["loss_before"] * (1 + 1e-6)
    g, c = gpu["validation"][0], cpu["validation"][0]
    assert g["acc_quant"] >= c["acc_quant"] - 0.02 and g["cosine"] >= c["cosine"] - 0.01
    rtn = quantize(MODEL, CALIB, str(tmp_path / "rtn.onnx"), Options(wbits=3, abits=3, method="rtn", device="cuda"),
                   EVAL, log=lambda *_: None).to_dict()
    assert g["cosine"] > rtn["validation"][0]["cosine"]


def test_mixed_precision_on_cuda(tmp_path):
    rep = _quantize(tmp_path, "cuda", mixed=MixedOptions(avg_wbits=4.5, abits=(4,)))
    mp = rep["mixed_precision"]
    assert mp["predicted_bytes"] <= mp["budget_bytes"]
    assert mp["counted_bytes"] == pytest.approx(mp["predicted_bytes"])
    assert rep["parity_layers"]["exact"]
