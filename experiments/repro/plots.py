"""The figures: training loss against step per experiment, and table1's step times."""

from __future__ import annotations

from pathlib import Path

from .store import seed_curves

__all__ = ["plot_curves", "plot_table1"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the [examples] and [test] extras
        raise SystemExit(f"matplotlib is needed for the plots: pip install 'l2l-optim[examples]' ({e})")
    return plt


def _smooth(values: list[float], w: int) -> list[float]:
    """Running mean over ``w`` steps (the values themselves when there are fewer)."""
    if w <= 1 or len(values) < w:
        return list(values)
    out, acc = [], sum(values[:w])
    out.append(acc / w)
    for i in range(w, len(values)):
        acc += values[i] - values[i - w]
        out.append(acc / w)
    return out


def plot_curves(name: str, out: Path, summary: dict) -> Path:
    """``<out>/<name>.png``: training loss against step, log-y; per optimizer the mean over
    seeds and a min-max band."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    longest = max(e["steps"] for e in summary["optimizers"].values())
    w = max(1, min(100, longest // 100))
    for key, e in summary["optimizers"].items():
        curves = [_smooth(c, w) for c in seed_curves(out, key, e["seeds"]).values()]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = max(len(c) for c in curves)
        arr = np.full((len(curves), n), np.nan)
        for i, c in enumerate(curves):
            arr[i, : len(c)] = c
        steps = np.arange(n) + w - 1
        with np.errstate(all="ignore"):
            mean = np.nanmean(arr, axis=0)
        label = f"{e['label']} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        if e.get("weights", {}).get("random"):
            label += " [untrained weights]"
        line, = ax.plot(steps, mean, label=label, lw=1.2)
        if len(curves) > 1:
            ax.fill_between(steps, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=line.get_color(),
                            alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {w})" if w > 1 else "training loss")
    ax.set_title(f"{name}: {summary['task']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / f"{name}.png")


def plot_table1(out: Path, rows: list[dict]) -> Path:
    """``<out>/table1.png``: our median step time per optimizer (bars) and the paper's (dots)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    labels = [r["label"] for r in rows]
    ax.bar(labels, [r["step_ms_median"] for r in rows], color="tab:blue", label="ours (opt.step)")
    paper = [r["paper_step_ms"] or 0 for r in rows]
    ax.scatter(labels, paper, color="tab:red", zorder=3, label="paper")
    ax.set_yscale("log")
    ax.set_ylabel("ms per optimizer step")
    ax.set_title("table1: optimizer step time on the base MLP", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out / "table1.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path
