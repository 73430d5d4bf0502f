"""The self-contained HTML page: summary, plots, audit viewer (template, CSS and JS in assets/), config."""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from omniopd.report.audits import _clean
from omniopd.report.metrics import _series
from omniopd.report.plots import _EVAL_KEY, _eval_keys

# --------------------------------------------------------------------------------------------- html


def _json_for_script(obj: Any) -> str:
    text = json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # nothing inside can close the <script> tag or open a comment; JSON.parse undoes these escapes
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


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
        (
            "audit",
            ", ".join(
                f"{k}={get('audit', k)}"
                for k in ("chunk_tokens", "num_chunks", "teacher_samples", "phi", "anchors")
                if get("audit", k) is not None
            )
            or None,
        ),
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
        text = (
            f"{last[1]:.3f} at step {last[0]}"
            if len(pairs) == 1
            else f"{first[1]:.3f} (step {first[0]}) → {last[1]:.3f} (step {last[0]})"
        )
        out.append((f"eval {bench} accuracy", text))
    return out


def _dl(items: list[tuple[str, str]]) -> str:
    return "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)


def _render_html(
    run_dir: Path, rows, plots, missing_plots, metric_notes, records, audit_notes, cfg_text, cfg_note
) -> str:
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
        + (
            f"<details open><summary>config.yaml</summary><pre id='config-text'>{e(cfg_text)}</pre></details>"
            if cfg_text
            else ""
        )
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
        "MISSING": f"<details class='missing'><summary>not plotted ({len(missing_plots)})</summary><ul>{missing_html}</ul></details>"
        if missing_plots
        else "",
        "AUDIT_NOTES": audit_notes_html,
        "CONFIG": cfg_html,
        "CSS": _asset("viewer.css"),
        "JS": _asset("viewer.js"),
        "DATA": _json_for_script({"records": records}),
    }
    # one pass, so a placeholder-like string inside the config or the data is never substituted
    return re.sub(r"@@([A-Z_]+)@@", lambda m: parts[m.group(1)], _asset("viewer.html"))


def _asset(name: str) -> str:
    """The page's template, stylesheet and script: files in ``omniopd/report/assets/`` (package data)."""
    return resources.files("omniopd.report").joinpath("assets", name).read_text(encoding="utf-8")
