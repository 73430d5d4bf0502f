"""``omniopd report OUTPUT_DIR``: plots of a run and a self-contained HTML audit viewer.

Input, all inside the run directory (``OUTPUT_DIR``):

- ``metrics.jsonl`` (required): one JSON object per optimizer step (``step``, ``loss/*``, ``audit/*``,
  ``rollout/*``, ``teacher/*``, ``optim/*``, ``time/*``) and possibly eval-only rows
  (``eval/<benchmark>/accuracy``). Keys may be missing from any row; a malformed line is skipped and
  counted, never fatal. ``teacher/tokens`` and ``teacher/cost_usd`` are per-step amounts and are
  plotted cumulatively.
- ``audits.jsonl`` (optional): one human-readable audit record per recorded trajectory (see
  :mod:`omniopd.methods.omniopd.audit`): the prompt, the student's response and, per audited chunk, the student's
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

from pathlib import Path

from omniopd.errors import OmniOPDError
from omniopd.report.audits import MAX_AUDIT_BYTES, MAX_AUDIT_RECORDS, _load_audits, _prepare_record  # noqa: F401
from omniopd.report.metrics import _read_jsonl, _with_steps
from omniopd.report.page import _render_html
from omniopd.report.plots import PLOT_FILES, _make_plots  # noqa: F401


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
