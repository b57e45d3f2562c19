"""`cli.py plot`: one PNG with the curves a practitioner reads, for one run or several overlaid.

matplotlib is an optional extra (``pip install 'mlx-grpo[plot]'``); training never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError
from .rundir import METRICS, atomic_write, check_output_file
from .runs import RunRecords, read_run

# (title, metrics key) of the single-curve panels, after the reward and accuracy panels.
PANELS: List[Tuple[str, str]] = [
    ("KL to reference", "kl"),
    ("completion length (tokens)", "completion_length"),
    ("clip fraction", "clip_fraction"),
    ("entropy (nats/token)", "entropy"),
    ("learning rate", "learning_rate"),
]
FIGSIZE = (16.0, 8.0)
DPI = 100  # so the PNG is 1600 x 800 pixels


class PlotError(UserError, RuntimeError):
    """Plotting is not possible (matplotlib missing); the message says how to fix it."""


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _series(records: Sequence[Dict], key: str) -> Tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = np.array(pts, dtype=float).T
    return x, y


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, smooth_window: Optional[int] = None) -> Path:
    """Draw the runs' curves into ``out`` (PNG, FIGSIZE at DPI); returns the path written.

    ``out`` is checked before anything is read: it may not be a run's metrics (or any file a run owns)."""
    inputs = [(f"the metrics file of {d}, an input", Path(d) / METRICS) for d in run_dirs]
    check_output_file(out, "--out", inputs)  # before drawing: say so now, not after the work
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'mlx-grpo[plot]' (or pip install matplotlib)") from None

    runs: List[RunRecords] = [read_run(d, config=False) for d in run_dirs]  # curves need only the metrics
    fig, axes = plt.subplots(2, 4, figsize=FIGSIZE, dpi=DPI)
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rec in enumerate(runs):
        color = colors[i % len(colors)]
        label = rec.path.name if len(runs) > 1 else None
        n = len(rec.train)
        w = smooth_window if smooth_window is not None else max(1, n // 30)

        def line(ax, key, **kw):
            x, y = _series(rec.train, key)
            if x.size:
                if w > 1:
                    ax.plot(x, y, color=kw.get("color", color), alpha=0.2, linewidth=0.8)
                ax.plot(x, smooth(y, w), **{"color": color, **kw})
            return x, y

        x, mean = line(axes[0], "reward_mean", label=label)
        _, std = _series(rec.train, "reward_std")
        if x.size and std.size == x.size:
            axes[0].fill_between(x, smooth(mean - std, w), smooth(mean + std, w), color=color, alpha=0.15)
        comps = sorted({k for r in rec.train for k in r if k.startswith("rewards/")})
        for j, key in enumerate(comps):
            style = ["-", "--", ":", "-."][j % 4]
            line(axes[1], key, linestyle=style, label=f"{label + ': ' if label else ''}{key[8:]}")
        for key, style in (("accuracy", "-"), ("lenient_accuracy", "--")):
            ex, ey = _series(rec.evals, key)
            if ex.size:
                axes[2].plot(ex, ey, style, marker="o", markersize=3, color=color,
                             label=f"{label + ': ' if label else ''}{key.replace('_', ' ')}")
        for ax, (_, key) in zip(axes[3:], PANELS):
            line(ax, key)
    titles = ["reward (mean, ±1 std)", "reward components", "held-out accuracy"] + [t for t, _ in PANELS]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: fig.savefig(p, dpi=DPI, format="png"))  # a FIFO or link: written through
    plt.close(fig)
    return out
