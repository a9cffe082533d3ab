"""What the research probes share: the command line and the calibrated round-to-nearest model they
start from (the product's own pipeline.prepare, so a probe sees what quantize sees)."""
import argparse

from packptq_onnx.pipeline import Options, prepare

CALIB_SAMPLES = 32


def parser(doc: str, samples: int, top: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--top", type=int, default=top)
    return ap


def prepare_rtn(a, **opts):
    """The model quantized to nearest at a.bits (weights and activations); opts override Options."""
    return prepare(a.model, a.calib, Options(wbits=a.bits, abits=a.bits, method="rtn",
                                             calib_samples=CALIB_SAMPLES, **opts))
