"""What the user asks for (Options, and the choice lists argparse offers), and the checks made
before any long work: each failure is one line, exit 2, nothing written."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from .calibrate import SOFTMAX_QUANT
from .errors import UsageError
from .exporters.qdq import STORAGES
from .lowrank import FORMS
from .mixed import MixedOptions
from .onnx_import import ImportedModel
from .quant import ACT_BITS
from .reconstruct import ReconOptions
from .solvers.ilp import SOLVERS
from .tasks import TASKS, load_metric

__all__ = ["DEVICES", "FORMS", "KERNELS", "METHODS", "SOFTMAX_QUANT", "SOLVERS", "STORAGES", "TASKS", "MixedOptions",
           "Options", "ReconOptions", "check_bit_options", "check_eval", "check_job", "check_memory", "check_options",
           "check_output"]


@dataclass
class Options:
    wbits: int = 8
    abits: int = 8
    method: str = "pack"
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None  # None: DEFAULT_BATCH, or every calibration sample when there are fewer
    calib_samples: int = 1024
    reduce_range: bool = True   # 7-bit range for 8-bit weights: exact on AVX2 CPUs without VNNI
    target: str = "any"        # --target the range was chosen for (packptq_onnx.targets)
    image: dict = field(default_factory=dict)  # image_size, mean, std, layout for image folders
    recon: ReconOptions = field(default_factory=ReconOptions)
    max_pack_blocks: int | None = 4  # None: no cap, Pack-PTQ's own rule (docs/METHOD.md, step 2)
    resume: bool = False
    storage: str = "int8"      # "packed": INT4/INT2 weight initializers
    output_bits: int | None = 8  # output quantizer per layer so onnxruntime fuses it; None: off
    joins: bool = True         # residual Adds between quantized layers as QLinearAdd (layers.useful_joins)
    strict: bool = False       # an op with no torch converter is an error instead of staying float
    mixed: MixedOptions = field(default_factory=MixedOptions)
    input_shapes: dict = field(default_factory=dict)  # name -> dims (None = dynamic), --input-shape
    batch_axes: dict = field(default_factory=dict)    # name -> sample axis, --batch-axis (packptq_onnx.layout)
    bias_correction: bool = True  # subtract the mean output shift of quantized weights (qlayer)
    task: str | None = None    # task metric for --eval (packptq_onnx.tasks); None: guessed
    guard: float = 0.002       # 8-bit activation quantizers predicted to cost more output NSR stay float
    metric: str | None = None  # --metric module:function, called with float and quantized outputs
    softmax_quant: str = "uniform"  # "focus": post-Softmax ranges chosen for attention's output (calibrate)
    kernels: str = "auto"      # "auto": a conv runs float where onnxruntime's float kernel is faster (kernels.py)
    stem_head: tuple | None = None  # uniform precision: (wbits, abits) of the stem and head layers, as the
    # papers' 8-bit first and last layers (--fixed-bits); None: they take --wbits / --abits like the rest


METHODS = ("rtn", "adaround", "block", "pack")
DEFAULT_BATCH = 32
DEVICES = ("cpu", "cuda")
KERNELS = ("auto", "integer")


def check_options(o: Options) -> None:
    if not 2 <= o.wbits <= 8:
        raise UsageError(f"--wbits must be between 2 and 8, got {o.wbits}")
    if o.abits not in ACT_BITS:
        raise UsageError(f"--abits must be between 2 and 8, or 16, got {o.abits}")
    if o.method not in METHODS:
        raise UsageError(f"unknown --method {o.method!r} (available: {', '.join(METHODS)})")
    r = o.recon
    if r.iters < 0 or (r.iters_total is not None and r.iters_total < 0):
        raise UsageError("--iters and --iters-total must not be negative")
    if not 0.0 <= r.drop_prob <= 1.0:
        raise UsageError("--drop-prob must be between 0 and 1")
    if o.kernels not in KERNELS:
        raise UsageError(f"--kernels must be one of {', '.join(KERNELS)}, got {o.kernels!r}")
    if o.softmax_quant not in SOFTMAX_QUANT:
        raise UsageError(f"--softmax-quant must be one of {', '.join(SOFTMAX_QUANT)}, got {o.softmax_quant!r}")
    if r.lowrank is not None:
        if o.method == "rtn":
            raise UsageError("--lowrank is learned during reconstruction: use --method adaround, block or pack")
        if r.lowrank != "auto" and not (isinstance(r.lowrank, int) and r.lowrank >= 1):
            raise UsageError(f"--lowrank must be a positive rank or 'auto', got {r.lowrank!r}")
    if r.lowrank_form not in FORMS:
        raise UsageError(f"--lowrank-form must be one of {', '.join(FORMS)}, got {r.lowrank_form!r}")
    if o.stem_head is not None:
        check_bit_options(o.stem_head[:1], o.stem_head[1:])
    if o.max_pack_blocks is not None and o.max_pack_blocks < 1:
        raise UsageError("--max-pack-blocks must be at least 1")
    if o.storage not in STORAGES:
        raise UsageError(f"--storage must be one of {', '.join(STORAGES)}")
    if (o.batch_size is not None and o.batch_size < 1) or o.calib_samples < 1:
        raise UsageError("--batch-size and --calib-samples must be positive")
    if o.task is not None:
        if o.task not in TASKS:
            raise UsageError(f"unknown --task {o.task!r} (available: {', '.join(TASKS)})")
    if o.metric is not None:
        load_metric(o.metric)
    if o.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch)")


def check_bit_options(wbits=(), abits=()) -> None:
    """--wbits-options / --fixed-bits: 2..8; --abits-options / --fixed-abits: 2..8 or 16."""
    for b in wbits:
        if not 2 <= b <= 8:
            raise UsageError(f"weight bit options must be between 2 and 8, got {b}")
    for b in abits:
        if b not in ACT_BITS:
            raise UsageError(f"activation bit options must be between 2 and 8, or 16, got {b}")


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_memory(imp: ImportedModel, calib: dict, opts: Options) -> None:
    """Refuse before starting when the model, its copies and the calibration data cannot fit."""
    weights = sum(int(np.prod(i.dims)) * 4 for i in imp.model.graph.initializer)
    need = 6 * weights + sum(v.nbytes for v in calib.values())  # float + torch + quantizers + Adam state
    have = available_memory()
    if need > have:
        raise UsageError(f"not enough memory: about {need / 2**30:.1f} GiB needed (model {weights / 2**30:.1f} "
                         f"GiB), {have / 2**30:.1f} GiB available; use fewer --calib-samples or a larger machine")


def check_output(model_path: str, out_path: str) -> None:
    if os.path.abspath(out_path) == os.path.abspath(model_path):
        raise UsageError("the output path equals the input model; choose another -o")
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise UsageError(f"output directory does not exist: {directory}")
    try:  # really try: permission bits say nothing for root or on read-only mounts
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".packptq-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"output directory is not writable: {directory} ({exc.strerror})") from None


def check_job(o: Options, model_path: str, out_path: str, eval_path: str | None) -> None:
    """Everything about one quantize run that can be checked before reading the model."""
    check_options(o)
    if not os.path.isfile(model_path):
        raise UsageError(f"model file not found: {model_path}")
    check_output(model_path, out_path)
    check_eval(o, eval_path)


def check_eval(o: Options, eval_path: str | None) -> None:
    if o.mixed.target is not None and not eval_path:
        raise UsageError(f"--target {o.mixed.target.text()} is measured on held-out data: give --eval")
