"""The PNG plots of a run against step (losses, k_sem bands, targets, KL, length, teacher, eval, optimizer)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from omniopd.report.metrics import _aligned, _cumulative, _finite, _series

PLOT_FILES = (
    "loss.png",
    "k_sem.png",
    "target.png",
    "kl_anchor.png",
    "rollout_length.png",
    "teacher.png",
    "eval_accuracy.png",
    "entropy.png",
    "optim.png",
)
_EVAL_KEY = re.compile(r"^eval/(.+)/accuracy$")


# --------------------------------------------------------------------------------------------- plots


def _new_figure(nrows: int = 1, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, height * nrows if nrows > 1 else height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("step")
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _line(ax, xs, ys, label, **kw) -> None:
    marker = "o" if len(xs) <= 30 else None
    ax.plot(xs, ys, label=label, marker=marker, markersize=3, **kw)


def _plot_loss(rows):
    keys = sorted({k for _, r in rows for k in r if k.startswith("loss/")}, key=lambda k: (k != "loss/total", k))
    series = [(k, *_series(rows, k)) for k in keys]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, (ax,) = _new_figure()
    for key, xs, ys in series:
        _line(ax, xs, ys, key)
    ax.set_title("loss terms")
    ax.legend(fontsize=8)
    return fig


def _plot_k_sem(rows):
    bx, (p10, p50, p90) = _aligned(rows, ["audit/k_sem_p10", "audit/k_sem_p50", "audit/k_sem_p90"])
    mx, mean = _series(rows, "audit/k_sem_mean")
    ix, interior = _series(rows, "audit/k_sem_interior_frac")
    zx, zero = _series(rows, "audit/k_sem_zero_frac")
    if not (bx or mx or ix or zx):
        return None
    fig, (ax, ax2) = _new_figure(2, 2.6)
    if bx:
        ax.fill_between(bx, p10, p90, alpha=0.25, label="p10–p90")
        _line(ax, bx, p50, "p50")
    if mx:
        _line(ax, mx, mean, "mean", linestyle="--")
    ax.set_title("k_sem (teacher agreement count per audited chunk)")
    ax.set_ylabel("k_sem")
    ax.legend(fontsize=8)
    if ix:
        _line(ax2, ix, interior, "interior fraction (0.05N < k < 0.95N)")
    if zx:
        _line(ax2, zx, zero, "zero fraction (k = 0)", linestyle="--")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("fraction of chunks")
    if ix or zx:
        ax2.legend(fontsize=8)
    return fig


def _plot_target(rows):
    tx, tmean = _series(rows, "audit/target_mean")
    bx, (tmin, tmax) = _aligned(rows, ["audit/target_min", "audit/target_max"])
    px, prior = _series(rows, "audit/prior_mean")
    if not (tx or bx):
        return None
    fig, (ax,) = _new_figure()
    if bx:
        ax.fill_between(bx, tmin, tmax, alpha=0.2, label="min–max")
    if tx:
        _line(ax, tx, tmean, "π̂ mean")
    if px:
        _line(ax, px, prior, "p̄ mean (student prior)", linestyle=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("chunk target π̂")
    ax.legend(fontsize=8)
    return fig


def _plot_kl(rows):
    xs, ys = _series(rows, "loss/kl_anchor")
    if not xs:
        return None
    fig, (ax,) = _new_figure()
    _line(ax, xs, ys, "loss/kl_anchor", color="tab:purple")
    ax.set_title("KL anchor term")
    return fig


def _plot_length(rows):
    lx, length = _series(rows, "rollout/mean_length")
    tx, trunc = _series(rows, "rollout/truncated_frac")
    if not (lx or tx):
        return None
    fig, (ax,) = _new_figure()
    handles = []
    if lx:
        handles += ax.plot(lx, length, label="mean length (tokens)", color="tab:blue")
        ax.set_ylabel("tokens")
    if tx:
        ax2 = ax.twinx() if lx else ax
        handles += ax2.plot(tx, trunc, label="truncated fraction", color="tab:red", linestyle="--")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("fraction")
    ax.set_title("student responses")
    ax.legend(handles=handles, fontsize=8, loc="best")
    return fig


def _plot_teacher(rows):
    tx, tokens = _series(rows, "teacher/tokens")
    cx, cost = _series(rows, "teacher/cost_usd")
    if not (tx or cx):
        return None
    fig, (ax,) = _new_figure()
    handles = []
    if tx:
        x, y = _cumulative(tx, tokens)
        handles += ax.plot(x, y, label="teacher tokens (cumulative)", color="tab:green")
        ax.set_ylabel("tokens")
    if cx:
        ax2 = ax.twinx() if tx else ax
        x, y = _cumulative(cx, cost)
        handles += ax2.plot(x, y, label="cost USD (cumulative)", color="tab:orange", linestyle="--")
        ax2.set_ylabel("USD")
    ax.set_title("teacher usage")
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    return fig


def _eval_keys(rows) -> list[str]:
    return sorted({k for _, r in rows for k in r if _EVAL_KEY.match(k) and _finite(r.get(k)) is not None})


def _plot_eval(rows):
    keys = _eval_keys(rows)
    if not keys:
        return None
    fig, (ax,) = _new_figure()
    for key in keys:
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="o", label=_EVAL_KEY.match(key).group(1))  # type: ignore[union-attr]
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("evaluation accuracy")
    ax.legend(fontsize=8)
    return fig


def _plot_entropy(rows):
    ax_, a = _series(rows, "audit/entropy_anchor_mean")
    ox, o = _series(rows, "audit/entropy_other_mean")
    if not (ax_ or ox):
        return None
    fig, (ax,) = _new_figure()
    if ax_:
        _line(ax, ax_, a, "at audited anchors")
    if ox:
        _line(ax, ox, o, "elsewhere", linestyle="--")
    ax.set_title("student entropy (nats)")
    ax.legend(fontsize=8)
    return fig


def _plot_optim(rows):
    lx, lr = _series(rows, "optim/lr")
    gx, gn = _series(rows, "optim/grad_norm")
    sx, st = _series(rows, "time/step_s")
    panels = [
        p
        for p in [(lx, lr, "learning rate"), (gx, gn, "grad norm (before clipping)"), (sx, st, "step time (s)")]
        if p[0]
    ]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), 2.0)
    for a, (xs, ys, title) in zip(axes, panels):
        _line(a, xs, ys, title)
        a.set_title(title, fontsize=9)
    return fig


# (file, title, builder, what is missing when the builder returns None)
_PLOTS = [
    ("loss.png", "Loss terms", _plot_loss, "no loss/* values"),
    ("k_sem.png", "k_sem distribution", _plot_k_sem, "no audit/k_sem_* values"),
    ("target.png", "Target π̂", _plot_target, "no audit/target_* values"),
    ("kl_anchor.png", "KL anchor", _plot_kl, "no loss/kl_anchor values"),
    ("rollout_length.png", "Response length", _plot_length, "no rollout/* values"),
    ("teacher.png", "Teacher usage", _plot_teacher, "no teacher/tokens or teacher/cost_usd values"),
    ("eval_accuracy.png", "Evaluation accuracy", _plot_eval, "no eval/<benchmark>/accuracy values"),
    ("entropy.png", "Student entropy", _plot_entropy, "no audit/entropy_* values"),
    ("optim.png", "Optimizer", _plot_optim, "no optim/* or time/step_s values"),
]


def _make_plots(rows, out_dir: Path) -> tuple[list[tuple[str, str, bytes]], list[str]]:
    """Write the PNGs; return (file, title, png bytes) for those drawn and notes for those not drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], ["plots need matplotlib, which is not installed (pip install matplotlib)"]
    drawn, missing = [], []
    for name, title, build, why in _PLOTS:
        fig = build(rows) if rows else None
        target = out_dir / name
        if fig is None:
            missing.append(f"{title}: {why}")
            target.unlink(missing_ok=True)  # do not leave a stale plot from an earlier report
            continue
        data = _png(fig)
        target.write_bytes(data)
        drawn.append((name, title, data))
    return drawn, missing
