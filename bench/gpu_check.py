"""Pack vs block reconstruction of EfficientNet-Lite0 at W4A4 on a CUDA GPU (issue 24, item 4).

    python bench/gpu_check.py --model efficientnet_lite0.onnx [--minutes 8] [--samples 1024] [--out DIR]

Data: 1024 calibration and 256 evaluation crops of the photos that scikit-image, scikit-learn and
matplotlib ship (bench/photos.py; disjoint photos), built on the machine itself, since a GPU
machine may reach no network. The model comes from `bench/models.py --out DIR` (or carry it there).
Each method first runs --probe-iters (10) iterations per unit to measure its cost per iteration, then as many
iterations per unit as fit in its half of --minutes, and prints top-1 agreement with the float
model on the evaluation crops, seconds per iteration and peak GPU memory. --device cpu runs the
same on the CPU (a smoke test with small --samples).
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run(model, calib, evalp, out, method, iters, samples, device):
    import torch

    from packptq_onnx import reconstruct
    from packptq_onnx.pipeline import Options, quantize

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bs = min(32, samples)
    o = Options(wbits=4, abits=4, method=method, device=device, calib_samples=samples, batch_size=bs,
                recon=reconstruct.ReconOptions(iters=iters, batch_size=bs))
    t0 = time.time()
    rep = quantize(model, calib, os.path.join(out, f"{method}_{iters}.onnx"), o, evalp, log=lambda *_: None).to_dict()
    units = rep["reconstruction"]["units"]
    recon_s = sum(u["seconds"] for u in units)
    v = rep["validation"][0]
    return {"method": method, "iters_per_unit": iters, "units": len(units), "seconds": round(time.time() - t0, 1),
            "recon_seconds": round(recon_s, 1), "seconds_per_iteration": round(recon_s / max(iters * len(units), 1), 4),
            "agreement": v.get("top1_agreement"), "cosine": v.get("cosine"),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--probe-iters", type=int, default=10, help="iterations per unit of the sizing run")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check")
    a = ap.parse_args()
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU (install a CUDA build of torch)")
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("PACKPTQ_QUIET", "1")
    import photos
    paths = photos.make_effnet(os.path.join(a.out, "data"), n_calib=a.samples, n_eval=256)
    budget = a.minutes * 60 / 2
    rows = []
    for method in ("block", "pack"):
        k = a.probe_iters
        probe = run(a.model, paths["calib"], paths["eval"], a.out, method, k, a.samples, a.device)
        fixed = probe["seconds"] - probe["recon_seconds"]  # calibration, export, validation
        per_unit_iter = probe["recon_seconds"] / (k * probe["units"])  # with the caching passes: an upper bound
        iters = max(k, int((budget - fixed) / max(per_unit_iter * probe["units"], 1e-9)))
        probe["run"] = "sizing"
        rows += [probe, dict(run(a.model, paths["calib"], paths["eval"], a.out, method, iters, a.samples, a.device),
                             run="main")]
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"\nEfficientNet-Lite0 W4A4, {a.samples} calibration samples, {name}")
    print("| method | run | iterations per unit | units | top-1 agreement | cosine | s / iteration | peak GPU MB "
          "| total s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['run']} | {r['iters_per_unit']} | {r['units']} | {r['agreement']:.3f} | "
              f"{r['cosine']:.4f} | {r['seconds_per_iteration']} | {r['peak_gpu_mb'] or '-'} | {r['seconds']} |")
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
