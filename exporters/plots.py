"""PNG plots (matplotlib, optional)."""
from __future__ import annotations

import os

from packptq_onnx.exporters.files import temp_beside

from packptq_onnx.errors import UsageError


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plots need matplotlib: pip install matplotlib") from None
    return plt


def plot_packs(path: str, names: list[str], scores: list[float], sens: list[float], packs: list) -> None:
    """S and Omega per block (log scale), pack boundaries as vertical lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    x = range(len(names))
    ax.plot(x, [max(v, 1e-12) for v in scores], "o-", label="score S (Hessian estimate)")
    ax.plot(x, [max(v, 1e-12) for v in sens], "s--", label="sensitivity Ω")
    ax.set_yscale("log")
    for p in packs[1:]:
        ax.axvline(p.blocks[0] - 0.5, color="gray", lw=1)
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(f"{len(names)} blocks in {len(packs)} packs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = temp_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_bits(path: str, packs: list[tuple[int, int, int, float]]) -> None:
    """Chosen weight/activation bits (bars) and sensitivity at those bits (line) per pack; packs:
    (id, wbits, abits, Omega) each."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(packs)), 3.6))
    x = list(range(len(packs)))
    ax.bar([i - 0.2 for i in x], [p[1] for p in packs], 0.4, label="weight bits")
    ax.bar([i + 0.2 for i in x], [p[2] for p in packs], 0.4, label="activation bits")
    ax.set_ylabel("bits")
    ax.set_xticks(x, [f"pack{p[0]}" for p in packs], fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, [max(p[3], 1e-12) for p in packs], "ko-", label="sensitivity Ω at chosen bits")
    ax2.set_yscale("log")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = temp_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
