"""report.png: per-layer density and router recall; perplexity rise versus KV density."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = meta["layers"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = [e["layer"] for e in layers]
    ax1.bar(xs, [e["density"] for e in layers], color="#8fb3d9", label="KV density kept")
    ax1.plot(xs, [e["router_recall"] for e in layers], "o-", color="#c0392b", ms=3,
             label="router recall (validation)")
    ax1.set_xlabel("layer")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"{meta['model']['name']}: per-layer plan ({meta['plan']['mode']})")
    ax1.legend(loc="lower right", fontsize=8)

    curve = meta["quality"].get("curve", [])
    if curve:
        pts = sorted([(1.0, 0.0)] + [(p["kv_density"], p["increase_pct"]) for p in curve])
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s--",
                 color="#7f8c8d", label="uniform plans (routers)")
    chosen = meta["quality"]["tune"]
    ax2.plot([chosen["kv_density"]], [chosen["increase_pct"]], "*", ms=14, color="#c0392b",
             label="this plan")
    ax2.set_xlabel("KV bytes read / dense")
    ax2.set_ylabel("perplexity rise on tuning text (%)")
    ax2.set_yscale("symlog", linthresh=1.0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("quality versus density")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
