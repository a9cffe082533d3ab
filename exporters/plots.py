"""PNG plots (matplotlib, optional)."""
from __future__ import annotations

import os

from packptq_onnx.errors import UsageError
from packptq_onnx.exporters.files import temp_beside


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
