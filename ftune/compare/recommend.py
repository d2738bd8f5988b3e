"""A short recommendation drawn from a measured comparison table, and only from it: the best final score, the best
within a peak-memory limit (`--memory-limit`), and the cheapest method (fewest trainable parameters) within one point
of the best. A point is 0.01 for a metric that lies in [0, 1] (accuracy, F1, ROUGE: one percentage point), else 1 %
of the best value (a loss, a perplexity).
"""

from __future__ import annotations

from typing import Any


def point(values: list[float], best: float) -> float:
    return 0.01 if all(0.0 <= v <= 1.0 for v in values) else 0.01 * abs(best)


def recommend(
    rows: list[dict[str, Any]], metric: str, mode: str, memory_limit: int | None, ctx: dict[str, Any]
) -> list[str]:
    """Markdown lines; rows whose run has no final score are left out."""
    key = f"final_{metric}"
    scored = [r for r in rows if r.get(key) is not None]
    if not scored:
        return [f"No recommendation: no run has a final {metric}."]
    better = max if mode == "max" else min
    best = better(sorted(scored, key=lambda r: r["trainable_params"]), key=lambda r: r[key])  # ties: the cheaper
    source = (
        f"from this comparison only ({len(scored)} methods, {ctx['budget']} each, on {ctx['recipe']}, "
        f"{ctx['machine']}, {ctx['date']}); another budget, model or data may rank them differently"
    )
    lines = [f"Recommendation, {source}:", f"- best final {metric}: **{best['method']}** ({best[key]:.4f})"]
    if memory_limit is not None:
        fits = [r for r in scored if r.get("peak_memory_bytes") is not None and r["peak_memory_bytes"] <= memory_limit]
        if fits:
            choice = better(sorted(fits, key=lambda r: r["trainable_params"]), key=lambda r: r[key])
            lines.append(
                f"- best within {memory_limit / 2**30:.2f} GiB peak memory: **{choice['method']}** "
                f"({choice[key]:.4f}, {choice['peak_memory_bytes'] / 2**30:.2f} GiB)"
            )
        else:
            least = min(
                (r for r in scored if r.get("peak_memory_bytes") is not None),
                key=lambda r: r["peak_memory_bytes"],
                default=None,
            )
            hint = f" (least: {least['method']}, {least['peak_memory_bytes'] / 2**30:.2f} GiB)" if least else ""
            lines.append(f"- no method stayed within {memory_limit / 2**30:.2f} GiB peak memory{hint}")
    margin = point([r[key] for r in scored], best[key])
    close = [r for r in scored if abs(r[key] - best[key]) <= margin + 1e-12]
    cheapest = min(close, key=lambda r: (r["trainable_params"], r.get("peak_memory_bytes") or 0))
    lines.append(
        f"- cheapest within one point ({margin:.3g}) of the best: **{cheapest['method']}** "
        f"({cheapest[key]:.4f}, {cheapest['trainable_params']:,} trainable parameters, "
        f"{cheapest['trainable_pct']:.3g} % of the model)"
    )
    return lines
