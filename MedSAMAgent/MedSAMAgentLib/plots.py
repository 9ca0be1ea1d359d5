"""Small plots for reports (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def per_turn_plot(curves: dict, path: Path, xlabel: str, ylabel: str, title: str) -> Path | None:
    """One line per curve (``{label: [value after step 1, 2, ...]}``), values in 0..1; None if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(1, max(len(v) for v in curves.values()) + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    from .durable import atomic_output

    try:
        with atomic_output(path, "the plot") as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return Path(path)
