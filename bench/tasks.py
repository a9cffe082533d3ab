"""Benchmark tasks: one per model, how to build it and its data and how to score its outputs."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import numpy as np

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")


@dataclass
class Task:
    """One model: how to build it and its data, how to score outputs, which rows apply.

    build(work_dir, models_dir, cfg) -> dict with 'model', 'calib', 'eval' (paths to .onnx / .npz)
    and optionally 'labels' (path to a labels file; otherwise 'labels' inside eval.npz) and any
    JSON-able extras. score(outputs, float_outputs, labels, info) -> {metric: value}.
    module: the bench module it needs (None: none); a task whose module is missing is 'not built yet'.
    """
    name: str
    title: str
    build: callable
    score: callable
    metrics: tuple              # metrics plotted against weight bytes (first score key if none present)
    calib_samples: tuple        # (full, quick)
    iters_total: tuple          # (full, quick): total reconstruction iterations per model
    eval_samples: tuple = (None, None)  # (full, quick): evaluate on the first N samples (None: all)
    module: str | None = None
    needs: tuple = ()           # functions the module must define
    rows: tuple | None = None   # row names that apply (None: all)
    batch_size: int = 32        # quantize / reconstruction batch size
    needs_models: tuple = ()    # functions bench/models.py must define
    argmax: bool = True         # outputs are scores: report argmax agreement with float
    ort_op_types: tuple | None = None  # op_types_to_quantize for onnxruntime (None: its default, all)
    notes: str = ""

    def missing(self) -> str | None:
        if self.module is None:
            return None
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            return f"bench/{self.module}.py is not available yet ({exc})"
        absent = [f"bench/{self.module}.py: {f}" for f in self.needs if not hasattr(mod, f)]
        if self.needs_models:
            import models
            absent += [f"bench/models.py: {f}" for f in self.needs_models if not hasattr(models, f)]
        return f"missing {', '.join(absent)}" if absent else None


def softmax(x, axis=-1):
    x = x.astype(np.float64)
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def classifier_scores(logits, float_logits, labels) -> dict:
    p, q = softmax(float_logits), softmax(logits)
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), -1)))
    out = {}
    if labels is not None:
        out["accuracy"] = float((logits.argmax(-1) == np.asarray(labels)).mean())
    out["top1_agreement"] = float((logits.argmax(-1) == float_logits.argmax(-1)).mean())
    out["kl"] = kl
    return out


# sample ------------------------------------------------------------------------------------------
def build_sample(work, models_dir, cfg) -> dict:
    return {"model": os.path.join(SAMPLES, "digits_resnet.onnx"), "calib": os.path.join(SAMPLES, "calib.npz"),
            "eval": os.path.join(SAMPLES, "eval.npz")}


def score_sample(outputs, float_outputs, labels, info) -> dict:
    return classifier_scores(outputs[0], float_outputs[0], labels)


# text lines (bench/text_lines.py) ------------------------------------------------------------------
def build_cls(work, models_dir, cfg) -> dict:
    import models
    import text_lines
    models.build_ocr(models_dir)
    d = dict(text_lines.make_cls(work, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"], seed=cfg["seed"]))
    d.setdefault("model", os.path.join(models_dir, models.OCR_MODELS[0]))
    return d


def score_cls(outputs, float_outputs, labels, info) -> dict:
    import text_lines
    out = dict(text_lines.cls_metrics(outputs[0], labels))
    out.update({k: v for k, v in classifier_scores(outputs[0], float_outputs[0], None).items() if k not in out})
    return out


def build_rec(work, models_dir, cfg) -> dict:
    import models
    import text_lines
    models.build_ocr(models_dir)
    d = dict(text_lines.make_rec(work, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"], seed=cfg["seed"]))
    d.setdefault("model", os.path.join(models_dir, models.OCR_MODELS[1]))
    d["keys"] = os.path.join(models_dir, models.REC_KEYS)
    return d


def score_rec(outputs, float_outputs, labels, info) -> dict:
    import text_lines
    out = dict(text_lines.rec_metrics(outputs[0], labels, info["keys"]))
    q, f = text_lines.ctc_greedy(outputs[0], info["keys"]), text_lines.ctc_greedy(float_outputs[0], info["keys"])
    out["line_agree"] = float(np.mean([a == b for a, b in zip(q, f)]))  # decoded line equals the float one
    return out


# EfficientNet-Lite0 (bench/photos.py) -------------------------------------------------------------
def build_effnet(work, models_dir, cfg) -> dict:
    import models
    import photos
    models.build_efficientnet_lite0(models_dir)
    d = dict(photos.make_effnet(work, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"], seed=cfg["seed"]))
    d.setdefault("model", os.path.join(models_dir, models.EFFNET))
    return d


def score_effnet(outputs, float_outputs, labels, info) -> dict:
    import photos
    photo = photos.photo_index(info["n_eval"])[:len(outputs[0])]
    return dict(photos.effnet_metrics(outputs[0], float_outputs[0], photo))


# MiniLM (bench/minilm.py) -------------------------------------------------------------------------
def build_minilm(work, models_dir, cfg) -> dict:
    import minilm
    import models
    model = models.build_minilm(models_dir)
    d = minilm.make_data(work, n_calib=cfg["n_calib"])
    pairs = os.path.join(work, "pairs.npz")
    np.savez(pairs, **{f"{k}_{i}": a for k, v in d["pairs"].items() for i, a in enumerate(v)})
    return {"model": model, "calib": d["calib"], "eval": d["eval"], "pairs": pairs,
            "benchmarks": sorted(d["pairs"])}


def score_minilm(outputs, float_outputs, labels, info) -> dict:
    import minilm
    with np.load(info["pairs"]) as z:
        pairs = {k: tuple(z[f"{k}_{i}"] for i in range(3)) for k in info["benchmarks"]}
    res = minilm.score(outputs[0], pairs, reference=float_outputs[0])
    return {k: v for k, v in res.items() if v is not None and k != "cosine_to_float"}  # = the harness's cosine


# ViT on scikit-learn digits (bench/vit_digits.py) -----------------------------------------------------
def build_vit(work, models_dir, cfg) -> dict:
    import vit_digits
    d = vit_digits.build(work, seed=cfg["seed"], log=lambda *_: None)
    return {"model": d["model"], "calib": d["calib"], "eval": d["eval"], "float_accuracy": d["accuracy"]}


def score_vit(outputs, float_outputs, labels, info) -> dict:
    return classifier_scores(outputs[0], float_outputs[0], labels)


TASKS = {t.name: t for t in [
    Task("sample", "digits ResNet (samples/digits_resnet.onnx, 540 held-out scikit-learn digits)",
         build_sample, score_sample, ("accuracy",), (512, 128), (4000, 800)),
    Task("cls", "rapidocr direction classifier (rendered text lines, every other one rotated 180°)",
         build_cls, score_cls, ("acc",), (256, 128), (8000, 1000), module="text_lines",
         needs=("make_cls", "cls_metrics")),
    Task("rec", "rapidocr PP-OCRv4 recognizer (rendered text lines; exact line match, CER)", build_rec, score_rec,
         ("line_acc", "cer"), (256, 128), (8000, 1000), module="text_lines",
         needs=("make_rec", "rec_metrics", "ctc_greedy"), batch_size=16),
    Task("effnet", "EfficientNet-Lite0 (random crops of bundled photos; agreement with float)", build_effnet,
         score_effnet, ("top1_agree", "top1_agree_confident"), (256, 128), (8000, 1000), module="photos",
         needs=("make_effnet", "effnet_metrics"), batch_size=16),
    Task("minilm", "all-MiniLM-L6-v2 sentence embedder (SimLex-999 / WordSim-353 Spearman)", build_minilm,
         score_minilm, ("simlex", "wordsim"), (512, 128), (8000, 1000), module="minilm",
         needs=("make_data", "score"), needs_models=("build_minilm",), argmax=False, batch_size=16,
         ort_op_types=("MatMul", "Gemm"),
         notes="onnxruntime rows quantize MatMul/Gemm only: with every op type quantize_static also quantizes "
               "the attention-mask Add (-3.4e38 on padding) and the model collapses (bench/minilm.py)."),
    Task("vit", "ViT trained on scikit-learn digits (bench/vit_digits.py; 540 held-out digits)", build_vit,
         score_vit, ("accuracy",), (512, 128), (4000, 800), module="vit_digits", needs=("build",)),
]}
DATA_SIZES = {"sample": None, "cls": (1024, 500), "rec": (256, 500), "effnet": (1024, 500), "minilm": (512, None),
              "vit": None}
