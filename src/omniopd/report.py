"""``omniopd report OUTPUT_DIR``: plots of a run and a self-contained HTML audit viewer.

Input, all inside the run directory (``OUTPUT_DIR``):

- ``metrics.jsonl`` (required): one JSON object per optimizer step (``step``, ``loss/*``, ``audit/*``,
  ``rollout/*``, ``teacher/*``, ``optim/*``, ``time/*``) and possibly eval-only rows
  (``eval/<benchmark>/accuracy``). Keys may be missing from any row; a malformed line is skipped and
  counted, never fatal. ``teacher/tokens`` and ``teacher/cost_usd`` are per-step amounts and are
  plotted cumulatively.
- ``audits.jsonl`` (optional): one human-readable audit record per recorded trajectory (see
  :mod:`omniopd.audit`): the prompt, the student's response and, per audited chunk, the student's
  text, the N teacher continuations, their phi scores, k_sem, the prior mean p_bar and the target pi_hat.
- ``config.yaml`` (optional): the resolved config, shown verbatim.

Output, written to ``OUTPUT_DIR/report/`` (re-running overwrites it):

- one PNG per plot, against the optimizer step (matplotlib, Agg, no pyplot state): ``loss.png``,
  ``k_sem.png`` (p10-p90 band, p50 and mean, interior/zero fractions), ``target.png`` (mean with a
  min/max band, prior mean), ``kl_anchor.png``, ``rollout_length.png`` (mean length, truncation
  rate), ``teacher.png`` (cumulative tokens and cost), ``eval_accuracy.png``, ``entropy.png``,
  ``optim.png``; a plot whose data is absent is not drawn and the page says so;
- ``index.html``: one static page that needs no server and no network (a Content-Security-Policy
  forbids any fetch): the plots as base64 ``data:`` images, the config, and the audit viewer. The
  audit data is embedded as JSON in ``<script type="application/json" id="audit-data">`` (``<``,
  ``>`` and ``&`` are ``\\u``-escaped, so model text cannot close the tag) and rendered by vanilla JS
  with ``textContent`` only, never ``innerHTML``, so model text cannot inject markup.

The chunk positions in a record (``char_start``/``char_end``) are best-effort: they are resolved
here, in Python, on code points (a JS string index would count UTF-16 units): clamped to the
response, checked against ``student_text``, else the occurrence of ``student_text`` nearest to
``char_start`` is used, else the chunk is listed as "not located" (still viewable from the table).
The response is then shipped as a list of segments ``[text, chunk index or -1]``. A long run's
audits are subsampled by whole steps, evenly spaced (more than ``MAX_AUDIT_RECORDS`` records or
``MAX_AUDIT_BYTES`` of JSON), and the page says so.

In the viewer, each teacher continuation is diffed against the student's chunk (LCS on characters,
or on words when the character table would be too large, bounded so it stays instant): inserted
text (the teacher wrote it, the student did not) is green, deleted text (the student wrote it, the
teacher did not) is red and struck through.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from omniopd.errors import OmniOPDError

MAX_AUDIT_RECORDS = 1000  # above this many records, or MAX_AUDIT_BYTES of audit JSON, whole steps are
MAX_AUDIT_BYTES = 12_000_000  # subsampled evenly (first and last kept) and the page says so
_CONTEXT_CHARS = 160  # response text shown before a chunk in the panel (what the teacher's prefix ends with)

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


# --------------------------------------------------------------------------------------------- reading


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows that are JSON objects, and the number of non-blank lines that were not."""
    rows: list[dict] = []
    bad = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _with_steps(rows: list[dict]) -> list[tuple[int, dict]]:
    """(step, row); a row without a usable step takes the last step seen (an eval row after a step)."""
    out: list[tuple[int, dict]] = []
    last = 0
    for row in rows:
        s = _finite(row.get("step"))
        if s is not None:
            last = int(s)
        out.append((last, row))
    return out


def _series(rows: list[tuple[int, dict]], key: str) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for step, row in rows:
        v = _finite(row.get(key))
        if v is not None:
            xs.append(step)
            ys.append(v)
    return xs, ys


def _aligned(rows: list[tuple[int, dict]], keys: list[str]) -> tuple[list[int], list[list[float]]]:
    """Steps at which every key is present, and the values of each key there."""
    xs: list[int] = []
    cols: list[list[float]] = [[] for _ in keys]
    for step, row in rows:
        vals = [_finite(row.get(k)) for k in keys]
        if all(v is not None for v in vals):
            xs.append(step)
            for col, v in zip(cols, vals):
                col.append(v)  # type: ignore[arg-type]
    return xs, cols


def _cumulative(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    total = 0.0
    cx, cy = [], []
    for i in order:
        total += ys[i]
        cx.append(xs[i])
        cy.append(total)
    return cx, cy


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
    panels = [p for p in [(lx, lr, "learning rate"), (gx, gn, "grad norm (before clipping)"), (sx, st, "step time (s)")] if p[0]]
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


# --------------------------------------------------------------------------------------------- audits


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (JSON.parse rejects NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _int_or(value: Any, default: int) -> int:
    f = _finite(value)
    return int(f) if f is not None else default


def _locate(response: str, chunk: dict) -> tuple[int, int] | None:
    """Code-point span of a chunk inside the response, or None when it cannot be found."""
    n = len(response)
    text = _text(chunk.get("student_text"))
    cs = min(max(_int_or(chunk.get("char_start"), 0), 0), n)
    ce = min(max(_int_or(chunk.get("char_end"), cs + len(text)), cs), n)
    if text and response[cs:ce] == text:
        return cs, ce
    for needle in (text, text.strip()):
        if not needle:
            continue
        best = None
        pos = response.find(needle)
        while pos != -1:
            if best is None or abs(pos - cs) < abs(best - cs):
                best = pos
            pos = response.find(needle, pos + 1)
        if best is not None:
            return best, best + len(needle)
    if not text and ce > cs:
        return cs, ce
    return None


def _segments(response: str, spans: list[tuple[int, int, int]]) -> tuple[list[list], set[int]]:
    """Split the response into [text, chunk index | -1]; overlapping spans are trimmed, empty ones dropped."""
    segs: list[list] = []
    placed: set[int] = set()
    cursor = 0
    for start, end, idx in sorted(spans):
        start = max(start, cursor)
        if start >= end:
            continue
        if start > cursor:
            segs.append([response[cursor:start], -1])
        segs.append([response[start:end], idx])
        placed.add(idx)
        cursor = end
    if cursor < len(response) or not segs:
        segs.append([response[cursor:], -1])
    return segs, placed


def _prepare_record(rec: dict) -> dict:
    response = _text(rec.get("response"))
    raw_chunks = rec.get("chunks") if isinstance(rec.get("chunks"), list) else []
    chunks: list[dict] = []
    spans: list[tuple[int, int, int]] = []
    for i, ch in enumerate(c for c in raw_chunks if isinstance(c, dict)):
        conts = ch.get("continuations") if isinstance(ch.get("continuations"), list) else []
        phis = ch.get("phi_scores") if isinstance(ch.get("phi_scores"), list) else []
        span = _locate(response, ch)
        if span is not None:
            spans.append((span[0], span[1], i))
        chunks.append({
            "start": _finite(ch.get("start")),
            "end": _finite(ch.get("end")),
            "entropy": _finite(ch.get("entropy")),
            "k_sem": _finite(ch.get("k_sem")),
            "prior_mean": _finite(ch.get("prior_mean")),
            "target": _finite(ch.get("target")),
            "student_text": _text(ch.get("student_text")),
            "continuations": [_text(c) for c in conts],
            "phi_scores": [_finite(p) for p in phis],
            "context": response[max(0, span[0] - _CONTEXT_CHARS) : span[0]] if span else "",
        })
    segs, placed = _segments(response, spans)
    for i, ch in enumerate(chunks):
        ch["placed"] = i in placed
    return {
        "step": _int_or(rec.get("step"), 0),
        "trajectory": _int_or(rec.get("trajectory"), 0),
        "example_id": _text(rec.get("example_id")),
        "prompt": _text(rec.get("prompt")),
        "response_tokens": _finite(rec.get("response_tokens")),
        "selector": _text(rec.get("selector")),
        "phi": _text(rec.get("phi")),
        "teacher": _text(rec.get("teacher")),
        "segments": segs,
        "chunks": chunks,
    }


def _subsample(records: list[dict], max_records: int, max_bytes: int) -> tuple[list[dict], str | None]:
    """Keep whole steps, evenly spaced (first and last kept), so the page stays light enough to open."""
    sizes = [len(json.dumps(_clean(r), ensure_ascii=False)) for r in records]
    total = sum(sizes)
    if len(records) <= max_records and total <= max_bytes:
        return records, None
    steps = sorted({r["step"] for r in records})
    per_step_n = len(records) / len(steps)
    per_step_b = total / len(steps)
    keep_n = int(min(max_records / per_step_n, max_bytes / per_step_b))
    keep_n = max(1, min(len(steps), keep_n))
    if keep_n == 1:
        kept = {steps[-1]}
    else:
        kept = {steps[round(i * (len(steps) - 1) / (keep_n - 1))] for i in range(keep_n)}
    out = [r for r in records if r["step"] in kept]
    note = (f"{len(records)} audit records from {len(steps)} steps ({total / 1e6:.1f} MB): showing the "
            f"{len(out)} records of {len(kept)} evenly spaced steps, to keep this page light")
    return out, note


def _load_audits(run_dir: Path, limit: int, max_bytes: int = MAX_AUDIT_BYTES) -> tuple[list[dict], list[str]]:
    path = run_dir / "audits.jsonl"
    if not path.is_file():
        return [], ["No audits recorded: audits.jsonl was not found in the run directory."]
    raw, bad = _read_jsonl(path)
    notes = []
    if bad:
        notes.append(f"audits.jsonl: {bad} malformed line(s) skipped.")
    records = [_prepare_record(r) for r in raw]
    records.sort(key=lambda r: (r["step"], r["trajectory"]))
    if not records:
        notes.append("audits.jsonl has no audit records.")
    records, note = _subsample(records, limit, max_bytes) if records else (records, None)
    if note:
        notes.append(note)
    return records, notes


# --------------------------------------------------------------------------------------------- html


def _json_for_script(obj: Any) -> str:
    text = json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # nothing inside can close the <script> tag or open a comment; JSON.parse undoes these escapes
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _config_summary(cfg_text: str) -> list[tuple[str, str]]:
    try:
        import yaml

        cfg = yaml.safe_load(cfg_text)
    except Exception:  # noqa: BLE001 - a summary is a courtesy; the raw text is shown regardless
        return []
    if not isinstance(cfg, dict):
        return []

    def get(*path):
        node: Any = cfg
        for p in path:
            if not isinstance(node, dict):
                return None
            node = node.get(p)
        return node

    teacher = get("teacher", "type")
    tmodel = get("teacher", "model")
    items = [
        ("student", get("student", "name")),
        ("teacher", f"{teacher}:{tmodel or '(student base)'}" if teacher else None),
        ("audit", ", ".join(f"{k}={get('audit', k)}" for k in ("chunk_tokens", "num_chunks", "teacher_samples", "phi", "anchors") if get("audit", k) is not None) or None),
        ("train data", get("data", "train")),
        ("max steps", get("max_steps")),
        ("seed", get("seed")),
    ]
    return [(k, str(v)) for k, v in items if v is not None]


def _summary(rows: list[tuple[int, dict]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    steps = sorted({s for s, r in rows if any(k.startswith(("loss/", "audit/")) for k in r)})
    out.append(("optimizer steps logged", f"{len(steps)}" + (f" (last step {steps[-1]})" if steps else "")))
    lx, ly = _series(rows, "loss/total")
    if lx:
        out.append(("loss/total", f"{ly[0]:.4g} → {ly[-1]:.4g}"))
    tx, tk = _series(rows, "teacher/tokens")
    if tx:
        out.append(("teacher tokens (total)", f"{int(sum(tk)):,}"))
    cx, cost = _series(rows, "teacher/cost_usd")
    if cx:
        out.append(("teacher cost (total)", f"${sum(cost):.4f}"))
    for key in _eval_keys(rows):
        xs, ys = _series(rows, key)
        bench = _EVAL_KEY.match(key).group(1)  # type: ignore[union-attr]
        pairs = sorted(zip(xs, ys), key=lambda p: p[0])
        first, last = pairs[0], pairs[-1]
        text = f"{last[1]:.3f} at step {last[0]}" if len(pairs) == 1 else f"{first[1]:.3f} (step {first[0]}) → {last[1]:.3f} (step {last[0]})"
        out.append((f"eval {bench} accuracy", text))
    return out


def _dl(items: list[tuple[str, str]]) -> str:
    return "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)


def _render_html(run_dir: Path, rows, plots, missing_plots, metric_notes, records, audit_notes, cfg_text, cfg_note) -> str:
    e = html.escape
    plot_html = "".join(
        f'<figure id="plot-{e(name[:-4])}"><figcaption>{e(title)}</figcaption>'
        f'<img alt="{e(title)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"></figure>'
        for name, title, data in plots
    )
    if not plots:
        plot_html = '<p class="note">No plots could be drawn.</p>'
    missing_html = "".join(f"<li>{e(m)}</li>" for m in missing_plots)
    notes_html = "".join(f'<p class="note">{e(n)}</p>' for n in metric_notes)
    audit_notes_html = "".join(f'<p class="note">{e(n)}</p>' for n in audit_notes)
    cfg_items = _config_summary(cfg_text) if cfg_text else []
    cfg_html = (
        (f"<dl class='kv'>{_dl(cfg_items)}</dl>" if cfg_items else "")
        + (f"<details open><summary>config.yaml</summary><pre id='config-text'>{e(cfg_text)}</pre></details>" if cfg_text else "")
        + (f'<p class="note">{e(cfg_note)}</p>' if cfg_note else "")
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = {
        "TITLE": e(f"omniopd report: {run_dir.name}"),
        "RUN": e(str(run_dir)),
        "GENERATED": e(generated),
        "SUMMARY": _dl(_summary(rows)),
        "METRIC_NOTES": notes_html,
        "PLOTS": plot_html,
        "MISSING": f"<details class='missing'><summary>not plotted ({len(missing_plots)})</summary><ul>{missing_html}</ul></details>" if missing_plots else "",
        "AUDIT_NOTES": audit_notes_html,
        "CONFIG": cfg_html,
        "CSS": _asset("viewer.css"),
        "JS": _asset("viewer.js"),
        "DATA": _json_for_script({"records": records}),
    }
    # one pass, so a placeholder-like string inside the config or the data is never substituted
    return re.sub(r"@@([A-Z_]+)@@", lambda m: parts[m.group(1)], _asset("viewer.html"))


def _asset(name: str) -> str:
    """The page's template, stylesheet and script: files in ``omniopd/report_assets/`` (package data)."""
    return resources.files("omniopd").joinpath("report_assets", name).read_text(encoding="utf-8")


def write_report(run_dir: Path | str, *, max_audit_records: int = MAX_AUDIT_RECORDS) -> Path:
    """Write ``run_dir/report/`` (PNG plots and ``index.html``); return the path of ``index.html``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OmniOPDError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise OmniOPDError(f"{run_dir}: no metrics.jsonl (is this a run's output directory?)")
    raw_rows, bad = _read_jsonl(metrics_path)
    rows = _with_steps(raw_rows)
    metric_notes = []
    if bad:
        metric_notes.append(f"metrics.jsonl: {bad} malformed line(s) skipped.")
    if not rows:
        metric_notes.append("metrics.jsonl has no rows yet: nothing to plot.")

    out_dir = run_dir / "report"
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as err:
        raise OmniOPDError(f"cannot create {out_dir}: {err.strerror or err}") from None
    plots, missing = _make_plots(rows, out_dir)
    records, audit_notes = _load_audits(run_dir, max_audit_records)

    cfg_path = run_dir / "config.yaml"
    cfg_text, cfg_note = "", None
    if cfg_path.is_file():
        cfg_text = cfg_path.read_text(encoding="utf-8", errors="replace")
    else:
        cfg_note = "config.yaml was not found in the run directory."

    page = _render_html(run_dir, rows, plots, missing, metric_notes, records, audit_notes, cfg_text, cfg_note)
    index = out_dir / "index.html"
    tmp = out_dir / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index
