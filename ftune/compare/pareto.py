"""The Pareto frontier of a comparison and its plot: the task metric against trainable parameters and against peak
memory. A method is on the frontier of a panel when no other method is at least as cheap and at least as good with
one of the two strictly better. matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def frontier(points: list[tuple[float, float]], larger_is_better: bool) -> list[int]:
    """Indices of the points (cost, score) that no other point dominates, in order of cost."""
    sign = 1 if larger_is_better else -1

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and sign * a[1] >= sign * b[1] and (a[0] < b[0] or sign * a[1] > sign * b[1])

    kept = [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(kept, key=lambda i: points[i])


def plot(rows: list[dict[str, Any]], metric: str, mode: str, path: Path) -> Path:
    """Two panels, metric against trainable parameters (log scale) and against peak memory, each with its frontier
    drawn and marked; saved as a PNG at `path`. Rows without the metric or the memory are left out of a panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    panels = (
        ("trainable_params", "trainable parameters (log scale)", True),
        ("peak_memory_bytes", "peak memory (GiB)", False),
    )
    for ax, (cost_key, label, log) in zip(axes, panels):
        shown = [r for r in rows if r.get(cost_key) is not None and r.get(f"final_{metric}") is not None]
        scale = 1 if log else 2**30
        points = [(r[cost_key] / scale, r[f"final_{metric}"]) for r in shown]
        best = frontier(points, mode == "max")
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", label="method")
        ax.plot(
            [points[i][0] for i in best], [points[i][1] for i in best], "o-", color="tab:red", label="Pareto frontier"
        )
        for r, (x, y) in zip(shown, points):
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"final {metric} ({'higher' if mode == 'max' else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    figure.suptitle(f"final {metric} against cost")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
