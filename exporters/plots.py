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
    _save(plt, fig, path)


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
    _save(plt, fig, path)


def plot_front(path: str, points: list, target, chosen) -> None:
    """The accuracy target's checked allocations (uniform references as squares): metric vs weight kB
    and vs GBOPs, the Pareto front joined, the threshold dashed, the chosen point circled."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label, scale in ((axes[0], "weight_bytes", "weight kB", 1e3), (axes[1], "bops", "GBOPs", 1e9)):
        for uni, mark, name in ((False, "o", "checked (mixed)"), (True, "s", "checked (uniform)")):
            pts = [p_ for p_ in points if getattr(p_, "uniform", False) == uni]
            if pts:
                ax.plot([p_.__dict__[key] / scale for p_ in pts], [p_.metric for p_ in pts], mark, color="gray",
                        label=name)
        front = sorted((p_ for p_ in points if p_.front), key=lambda p_: p_.__dict__[key])
        ax.plot([p_.__dict__[key] / scale for p_ in front], [p_.metric for p_ in front], "b-", label="front")
        ax.axhline(target.value, color="r", ls="--", lw=1, label=target.text())
        if chosen is not None:
            ax.plot([chosen.__dict__[key] / scale], [chosen.metric], "o", ms=12, mfc="none", mec="g", label="chosen")
        ax.set_xlabel(label)
        ax.set_ylabel(target.metric)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)


def plot_sensitivity(path: str, rep, top: int = 15) -> None:
    """Omega per pack at each option (log scale), and the costliest layers at the cheapest option."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"W{w}A{a}" for w, a in rep.options]
    for it in rep.packs:
        axes[0].plot(range(len(labels)), [max(v, 1e-12) for v in it.omega], "o-", label=it.name)
    axes[0].set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Ω (pack alone)")
    axes[0].legend(fontsize=7)
    k = rep.cheapest
    ranked = rep.ranked()[:top]
    axes[1].barh(range(len(ranked))[::-1], [max(it.omega[k], 1e-12) for it in ranked])
    axes[1].set_yticks(range(len(ranked))[::-1], [it.name[:28] for it in ranked], fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel(f"Ω at {labels[k]} (layer alone)")
    fig.tight_layout()
    _save(plt, fig, path)


def _save(plt, fig, path: str) -> None:
    tmp = temp_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
