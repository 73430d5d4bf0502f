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
        "CSS": _CSS,
        "JS": _JS,
        "DATA": _json_for_script({"records": records}),
    }
    # one pass, so a placeholder-like string inside the config or the data is never substituted
    return re.sub(r"@@([A-Z_]+)@@", lambda m: parts[m.group(1)], _TEMPLATE)


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


# --------------------------------------------------------------------------------------------- page

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>@@CSS@@</style>
</head>
<body>
<header>
  <h1>@@TITLE@@</h1>
  <p class="meta">run directory <code>@@RUN@@</code> · generated @@GENERATED@@</p>
  <nav><a href="#plots">plots</a> · <a href="#audits">audit viewer</a> · <a href="#config">config</a></nav>
</header>
<section id="summary"><dl class="kv">@@SUMMARY@@</dl>@@METRIC_NOTES@@</section>
<section id="plots"><h2>Training curves</h2><div class="plots">@@PLOTS@@</div>@@MISSING@@</section>
<section id="audits">
  <h2>Audit viewer</h2>
  @@AUDIT_NOTES@@
  <div id="viewer" hidden>
    <div class="controls">
      <label>step <select id="step"></select></label>
      <label>trajectory <select id="trajectory"></select></label>
      <label>diff <select id="diff-mode">
        <option value="char" selected>characters</option>
        <option value="word">words</option>
        <option value="off">off (plain text)</option>
      </select></label>
      <span class="legend">π̂ <span class="scale"></span> <span>0</span>–<span>1</span></span>
    </div>
    <p id="record-meta" class="meta"></p>
    <h3>Prompt</h3>
    <div id="prompt" class="textbox"></div>
    <h3>Response <span class="hint">(audited chunks highlighted by π̂; click one)</span></h3>
    <div id="response" class="textbox"></div>
    <table id="chunk-table"><thead><tr><th>#</th><th>tokens</th><th>entropy</th><th>k_sem</th><th>p̄</th><th>π̂</th><th>mean φ</th><th></th></tr></thead><tbody></tbody></table>
    <div id="chunk-panel" hidden></div>
  </div>
</section>
<section id="config"><h2>Config</h2>@@CONFIG@@</section>
<footer class="meta">π̂: the chunk's target probability (posterior mean from k_sem agreeing teacher samples out of N and the student's prior p̄). φ: similarity of a teacher continuation to the student's chunk. Diff: <ins>green</ins> = written by the teacher only, <del>red</del> = written by the student only.</footer>
<script type="application/json" id="audit-data">@@DATA@@</script>
<script>@@JS@@</script>
</body>
</html>
"""

_CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #f7f7f9; }
body { max-width: 1400px; margin: 0 auto; padding: 0 1.2rem 3rem; }
h1 { font-size: 1.4rem; margin: 1rem 0 .2rem; } h2 { font-size: 1.15rem; border-bottom: 1px solid #ccd; padding-bottom: .2rem; margin-top: 2rem; }
h3 { font-size: .95rem; margin: 1rem 0 .3rem; } .hint { font-weight: normal; color: #667; font-size: .85rem; }
.meta { color: #556; font-size: .85rem; } nav a { color: #2a5db0; }
.note { background: #fff6d6; border: 1px solid #e8d48a; padding: .4rem .7rem; border-radius: 4px; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; font-size: .9rem; }
dl.kv dt { color: #556; } dl.kv dd { margin: 0; font-family: ui-monospace, monospace; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1rem; }
figure { margin: 0; background: #fff; border: 1px solid #dde; border-radius: 6px; padding: .5rem; }
figcaption { font-weight: 600; font-size: .9rem; margin-bottom: .3rem; } figure img { width: 100%; height: auto; }
#audits { padding-bottom: .4rem; }
.controls { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: .5rem 0; }
select { font: inherit; padding: .15rem .3rem; }
.scale { display: inline-block; width: 120px; height: .8rem; vertical-align: middle;
  background: linear-gradient(to right, hsl(0,75%,80%), hsl(60,75%,80%), hsl(120,75%,80%)); border: 1px solid #bbc; }
.textbox { background: #fff; border: 1px solid #dde; border-radius: 6px; padding: .6rem .8rem; white-space: pre-wrap;
  word-break: break-word; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; line-height: 1.5; max-height: 28rem; overflow: auto; }
.chunk { border-radius: 3px; cursor: pointer; border-left: 2px solid rgba(0,0,0,.35); box-shadow: inset 0 -2px 0 rgba(0,0,0,.25); }
.chunk:hover, .chunk:focus { outline: 2px solid #2a5db0; }
.chunk.selected { outline: 3px solid #1d2330; }
#chunk-table { border-collapse: collapse; margin-top: .6rem; font-size: .85rem; background: #fff; }
#chunk-table th, #chunk-table td { border: 1px solid #dde; padding: .15rem .5rem; text-align: right; }
#chunk-table tbody tr { cursor: pointer; } #chunk-table tbody tr:hover { background: #eef3ff; } #chunk-table tr.selected { background: #dfe8ff; }
.swatch { display: inline-block; width: .8rem; height: .8rem; border: 1px solid #889; vertical-align: middle; }
#chunk-panel { margin-top: 1rem; background: #fff; border: 2px solid #2a5db0; border-radius: 8px; padding: .7rem .9rem; }
#chunk-panel .stats { display: flex; flex-wrap: wrap; gap: .4rem 1.2rem; font-size: .9rem; margin-bottom: .6rem; }
#chunk-panel .stats b { font-family: ui-monospace, monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: .7rem; }
.card { border: 1px solid #dde; border-radius: 6px; padding: .4rem .6rem; background: #fbfbfd; }
.card.student { border-color: #1d2330; background: #f1f3f8; }
.card h4 { margin: 0 0 .3rem; font-size: .85rem; display: flex; justify-content: space-between; gap: .5rem; }
.card .text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .82rem; line-height: 1.45; }
.context { color: #889; }
ins { background: #c9f2c9; text-decoration: none; } del { background: #f8caca; color: #8a1f1f; }
.phibar { display: inline-block; height: .5rem; background: #2a5db0; vertical-align: middle; border-radius: 2px; }
.diffnote { color: #889; font-size: .75rem; }
pre { background: #fff; border: 1px solid #dde; padding: .6rem; overflow: auto; font-size: .8rem; }
details.missing { margin-top: .6rem; font-size: .85rem; color: #556; }
"""

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("audit-data").textContent);
  var records = data.records || [];
  var $ = function (id) { return document.getElementById(id); };
  var state = { rec: null, chunk: -1 };

  function el(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) return "–";
    return Number.isInteger(x) ? String(x) : x.toFixed(digits === undefined ? 3 : digits);
  }
  function colour(t) {
    if (typeof t !== "number" || !isFinite(t)) return "hsl(0,0%,85%)";
    var c = Math.max(0, Math.min(1, t));
    return "hsl(" + Math.round(120 * c) + ",75%,80%)";
  }

  // ---- diff: LCS over tokens (characters or words), bounded ----
  var MAX_CELLS = 250000;
  function tokens(s, mode) {
    if (mode === "word") return s.match(/\s+|[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu) || [];
    return Array.from(s);
  }
  function push(ops, type, text) {
    if (!text) return;
    var last = ops[ops.length - 1];
    if (last && last.type === type) last.text += text; else ops.push({ type: type, text: text });
  }
  // ops turning a into b: "eq" (in both), "del" (only in a), "ins" (only in b); null when too large
  function diffTokens(a, b) {
    var p = 0;
    while (p < a.length && p < b.length && a[p] === b[p]) p++;
    var s = 0;
    while (s < a.length - p && s < b.length - p && a[a.length - 1 - s] === b[b.length - 1 - s]) s++;
    var A = a.slice(p, a.length - s), B = b.slice(p, b.length - s);
    var n = A.length, m = B.length;
    if ((n + 1) * (m + 1) > MAX_CELLS) return null;
    var W = m + 1, L = new Uint32Array((n + 1) * W);
    for (var i = n - 1; i >= 0; i--) {
      for (var j = m - 1; j >= 0; j--) {
        L[i * W + j] = A[i] === B[j] ? L[(i + 1) * W + j + 1] + 1 : Math.max(L[(i + 1) * W + j], L[i * W + j + 1]);
      }
    }
    var ops = [];
    push(ops, "eq", a.slice(0, p).join(""));
    i = 0; j = 0;
    while (i < n && j < m) {
      if (A[i] === B[j]) { push(ops, "eq", A[i]); i++; j++; }
      else if (L[(i + 1) * W + j] >= L[i * W + j + 1]) { push(ops, "del", A[i]); i++; }
      else { push(ops, "ins", B[j]); j++; }
    }
    while (i < n) { push(ops, "del", A[i]); i++; }
    while (j < m) { push(ops, "ins", B[j]); j++; }
    push(ops, "eq", a.slice(a.length - s).join(""));
    return cleanup(ops);
  }
  // a run of changes broken by tiny equal bits ("e", " ") reads as noise: fold such bits into one
  // deletion + one insertion; both sides still reconstruct exactly
  function cleanup(ops) {
    var out = [], del = "", ins = "";
    function flush() { push(out, "del", del); push(out, "ins", ins); del = ""; ins = ""; }
    for (var k = 0; k < ops.length; k++) {
      var op = ops[k];
      if (op.type === "del") del += op.text;
      else if (op.type === "ins") ins += op.text;
      else if ((del || ins) && k + 1 < ops.length && Array.from(op.text).length <= 2) { del += op.text; ins += op.text; }
      else { flush(); push(out, "eq", op.text); }
    }
    flush();
    return out;
  }
  function diff(a, b, mode) {
    var ops = null, used = mode;
    if (mode === "char") { ops = diffTokens(tokens(a, "char"), tokens(b, "char")); if (!ops) used = "word"; }
    if (!ops) { ops = diffTokens(tokens(a, "word"), tokens(b, "word")); used = "word"; }
    return { ops: ops, mode: ops ? used : "off" };
  }
  window.omniopdDiff = diff;

  // ---- selection ----
  function stepList() {
    var seen = {}, out = [];
    records.forEach(function (r) { if (!seen[r.step]) { seen[r.step] = true; out.push(r.step); } });
    return out.sort(function (x, y) { return x - y; });
  }
  function fillSteps() {
    var sel = $("step");
    sel.textContent = "";
    stepList().forEach(function (s) {
      var n = records.filter(function (r) { return r.step === s; }).length;
      var o = el("option", null, s + "  (" + n + " trajectories)");
      o.value = String(s);
      sel.appendChild(o);
    });
  }
  function fillTrajectories() {
    var sel = $("trajectory"), step = Number($("step").value);
    sel.textContent = "";
    records.forEach(function (r, idx) {
      if (r.step !== step) return;
      var label = "#" + r.trajectory + (r.example_id ? "  ·  " + r.example_id : "") + "  (" + r.chunks.length + " chunks)";
      var o = el("option", null, label);
      o.value = String(idx);
      sel.appendChild(o);
    });
  }

  function showRecord() {
    var idx = Number($("trajectory").value);
    var r = records[idx];
    state.rec = r; state.chunk = -1;
    $("chunk-panel").hidden = true;
    $("chunk-panel").textContent = "";
    if (!r) return;
    var meta = [
      "example " + (r.example_id || "–"),
      "response tokens " + fmt(r.response_tokens),
      "selector " + (r.selector || "–"),
      "φ " + (r.phi || "–"),
      "teacher " + (r.teacher || "–"),
    ];
    $("record-meta").textContent = meta.join("  ·  ");
    $("prompt").textContent = r.prompt || "(no prompt recorded)";
    var resp = $("response");
    resp.textContent = "";
    r.segments.forEach(function (seg) {
      var text = seg[0], ci = seg[1];
      if (ci < 0) { resp.appendChild(document.createTextNode(text)); return; }
      var c = r.chunks[ci];
      var span = el("span", "chunk", text);
      span.style.backgroundColor = colour(c.target);
      span.dataset.chunk = String(ci);
      span.tabIndex = 0;
      span.setAttribute("role", "button");
      span.title = "chunk " + ci + ": π̂ = " + fmt(c.target) + ", k_sem = " + fmt(c.k_sem) + ", entropy = " + fmt(c.entropy);
      span.addEventListener("click", function () { selectChunk(ci); });
      span.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); selectChunk(ci); } });
      resp.appendChild(span);
    });
    if (!r.segments.length || (r.segments.length === 1 && !r.segments[0][0])) resp.textContent = "(empty response)";
    var body = $("chunk-table").querySelector("tbody");
    body.textContent = "";
    if (!r.chunks.length) {
      var tr0 = el("tr"); var td0 = el("td", null, "no chunks were audited in this trajectory");
      td0.colSpan = 8; tr0.appendChild(td0); body.appendChild(tr0);
    }
    r.chunks.forEach(function (c, ci) {
      var tr = el("tr");
      tr.dataset.chunk = String(ci);
      var sw = el("span", "swatch"); sw.style.backgroundColor = colour(c.target);
      var first = el("td"); first.appendChild(sw); first.appendChild(document.createTextNode(" " + ci));
      tr.appendChild(first);
      var phis = c.phi_scores.filter(function (x) { return typeof x === "number"; });
      var mean = phis.length ? phis.reduce(function (a, b) { return a + b; }, 0) / phis.length : null;
      [fmt(c.start, 0) + "–" + fmt(c.end, 0), fmt(c.entropy), fmt(c.k_sem), fmt(c.prior_mean), fmt(c.target), fmt(mean),
       c.placed ? "" : "not located in response"].forEach(function (t) { tr.appendChild(el("td", null, t)); });
      tr.addEventListener("click", function () { selectChunk(ci); });
      body.appendChild(tr);
    });
  }

  function selectChunk(ci) {
    var r = state.rec;
    if (!r || !r.chunks[ci]) return;
    state.chunk = ci;
    Array.prototype.forEach.call(document.querySelectorAll(".chunk.selected, #chunk-table tr.selected"), function (n) { n.classList.remove("selected"); });
    Array.prototype.forEach.call(document.querySelectorAll('[data-chunk="' + ci + '"]'), function (n) { n.classList.add("selected"); });
    renderPanel();
  }

  function renderPanel() {
    var r = state.rec, ci = state.chunk, panel = $("chunk-panel");
    panel.textContent = "";
    if (!r || ci < 0) { panel.hidden = true; return; }
    var c = r.chunks[ci], mode = $("diff-mode").value;
    panel.hidden = false;
    panel.appendChild(el("h3", null, "Chunk " + ci + " of step " + r.step + ", trajectory " + r.trajectory));
    var stats = el("div", "stats");
    [["tokens", fmt(c.start, 0) + "–" + fmt(c.end, 0)], ["entropy H", fmt(c.entropy)], ["k_sem", fmt(c.k_sem) + " / " + c.continuations.length],
     ["p̄ (prior)", fmt(c.prior_mean)], ["π̂ (target)", fmt(c.target)]].forEach(function (kv) {
      var s = el("span", null, kv[0] + " "); s.appendChild(el("b", null, kv[1])); stats.appendChild(s);
    });
    panel.appendChild(stats);
    var cards = el("div", "cards");
    var sc = el("div", "card student");
    var sh = el("h4"); sh.appendChild(el("span", null, "student chunk")); sc.appendChild(sh);
    var st = el("div", "text student-text");
    if (c.context) st.appendChild(el("span", "context", "…" + c.context));
    st.appendChild(el("span", "chunk-text", c.student_text));
    sc.appendChild(st);
    cards.appendChild(sc);
    if (!c.continuations.length) cards.appendChild(el("p", "note", "no teacher continuations recorded for this chunk"));
    c.continuations.forEach(function (t, k) {
      var card = el("div", "card continuation");
      card.dataset.index = String(k);
      var h = el("h4");
      h.appendChild(el("span", null, "teacher #" + (k + 1)));
      var phi = c.phi_scores[k];
      var ph = el("span", "phi", "φ = " + fmt(phi));
      if (typeof phi === "number") { var bar = el("span", "phibar"); bar.style.width = Math.round(40 * Math.max(0, Math.min(1, phi))) + "px"; ph.appendChild(document.createTextNode(" ")); ph.appendChild(bar); }
      h.appendChild(ph);
      card.appendChild(h);
      var box = el("div", "text cont-text");
      var res = mode === "off" ? { ops: null, mode: "off" } : diff(c.student_text, t, mode);
      if (res.ops) {
        res.ops.forEach(function (op) {
          if (op.type === "eq") box.appendChild(document.createTextNode(op.text));
          else box.appendChild(el(op.type, null, op.text));
        });
      } else {
        box.textContent = t;
      }
      card.appendChild(box);
      if (mode !== "off" && res.mode !== mode) card.appendChild(el("div", "diffnote", res.mode === "off" ? "too long to diff" : "diffed on words (too long for characters)"));
      cards.appendChild(card);
    });
    panel.appendChild(cards);
  }

  if (!records.length) return;
  $("viewer").hidden = false;
  fillSteps();
  fillTrajectories();
  showRecord();
  $("step").addEventListener("change", function () { fillTrajectories(); showRecord(); });
  $("trajectory").addEventListener("change", showRecord);
  $("diff-mode").addEventListener("change", renderPanel);
})();
"""
