"""Deployment targets: the 8-bit weight range the target's integer kernels compute exactly.

onnxruntime's u8 x s8 kernels on x86 CPUs with AVX2 but without VNNI multiply with VPMADDUBSW,
which adds two u8*s8 products into a signed 16-bit lane: 2 * 255 * 127 = 64,770 overflows it
and saturates, 2 * 255 * 64 = 32,640 does not. 8-bit weights in [-64, 63] are therefore exact on
every CPU, and that is the default (`any`). VNNI (VPDPBUSD adds into 32 bits), ARM64 (SDOT/UDOT,
or widening multiplies) and GPUs (int8 into int32) compute the full [-128, 127] range exactly, so
naming such a target gives 8-bit weights their full range: on EfficientNet-Lite0 (bench/RESULTS.md)
top-1 agreement with float goes 0.960 -> 0.968 at W8A8. docs/METHOD.md, "Quantizers".
"""
from __future__ import annotations

import platform

from .errors import UsageError

# target -> 8-bit weights in the reduced range [-64, 63]
TARGETS = {"any": True, "x86-avx2": True, "x86-vnni": False, "arm64": False, "gpu": False}


def this_machine() -> str:
    """The target this machine is: x86-vnni, x86-avx2 or arm64 (from the CPU's own flags)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "any"
    return "x86-vnni" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "x86-avx2"


def reduce_range(target: str) -> bool:
    """Whether 8-bit weights use [-64, 63] on this target ('this': the machine running us)."""
    name = this_machine() if target == "this" else target
    if name not in TARGETS:
        raise UsageError(f"unknown --target {target!r} (available: {', '.join([*TARGETS, 'this'])})")
    return TARGETS[name]


def describe(reduced: bool, target: str) -> str:
    if reduced:
        return (f"reduced for target {target}: 8-bit weights use [-64, 63] (exact on AVX2 CPUs without VNNI), "
                "depthwise convs [-128, 127]")
    return f"full for target {target}: 8-bit weights use [-128, 127]"
