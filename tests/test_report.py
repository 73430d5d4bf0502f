"""`omniopd report`: plots, the self-contained index.html, and the audit viewer in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from omniopd.errors import OmniOPDError
from omniopd.report import PLOT_FILES, _prepare_record, write_report

EVIL = '</script><script>alert("pwned")</script><img src=x onerror=alert(1)>'

# step -> trajectory -> (prompt, [response pieces]); a piece is plain text or ("chunk", text)
RESPONSES = {
    1: {
        0: ("What is 2 + 3?", ["Let me add. ", ("chunk", "2 + 3 = 5, so"), " the answer is ", ("chunk", "5. Done!"), ""]),
        1: ("Tom has 4 apples " + EVIL, ["He eats one: ", ("chunk", "4 - 1 = 3 " + EVIL), " left. ", ("chunk", "Answer: 3"), "."]),
    },
    2: {
        0: ("How many legs do 2 cats have? \U0001F431", ["\U0001F431 Each cat has 4 legs. ", ("chunk", "2 * 4 = 8 legs"), " in all; ", ("chunk", "#### 8"), ""]),
        1: ("Ünïcödé question: 10 / 2?", ["Dividing ", ("chunk", "10 / 2 = 5"), " gives ", ("chunk", "the answer 5"), " ok"]),
    },
}


def _continuations(text: str) -> list[str]:
    return [text, text.replace("5", "five").replace("8", "eight") + " extra", "something else entirely <b>bold</b>"]


def _audit_record(step: int, traj: int) -> dict:
    prompt, pieces = RESPONSES[step][traj]
    response, chunks, tok = "", [], 0
    for piece in pieces:
        if isinstance(piece, tuple):
            text = piece[1]
            k = 1.0 + len(chunks)
            chunks.append({
                "start": tok, "end": tok + 8, "char_start": len(response), "char_end": len(response) + len(text),
                "entropy": 1.25 + 0.5 * len(chunks), "student_text": text, "continuations": _continuations(text),
                "phi_scores": [1.0, 0.55, 0.05], "k_sem": k, "prior_mean": 0.4, "target": (k + 0.4) / 4.0,
            })
            response += text
            tok += 8
        else:
            response += piece
            tok += 3
    if step == 2 and traj == 1:  # stale offsets: the viewer must fall back to searching the text
        chunks[0]["char_start"], chunks[0]["char_end"] = 10_000, 10_005
    return {
        "step": step, "trajectory": traj, "example_id": f"ex-{step}-{traj}", "prompt": prompt, "response": response,
        "response_tokens": tok, "selector": "peak_entropy", "phi": "ned", "teacher": "privileged:smollm2-135m-instruct",
        "chunks": chunks,
    }


def _metrics_row(step: int) -> dict:
    return {
        "step": step, "loss/total": 1.0 / step, "loss/chunk": 0.8 / step, "loss/kl_anchor": 0.2 / step,
        "audit/k_sem_mean": 1.5 + 0.1 * step, "audit/k_sem_p10": 0.0, "audit/k_sem_p50": 1.0 + 0.1 * step,
        "audit/k_sem_p90": 3.0, "audit/k_sem_interior_frac": 0.5, "audit/k_sem_zero_frac": 0.1,
        "audit/target_mean": 0.5, "audit/target_min": 0.1, "audit/target_max": 0.9, "audit/prior_mean": 0.4,
        "audit/chunks_per_traj": 2.0, "audit/entropy_anchor_mean": 2.0, "audit/entropy_other_mean": 0.7,
        "rollout/mean_length": 100.0 + step, "rollout/truncated_frac": 0.25, "teacher/tokens": 1200.0,
        "teacher/requests": 4.0, "teacher/failed_chunks": 0.0, "teacher/cost_usd": 0.002, "optim/lr": 1e-5,
        "optim/grad_norm": 0.9, "time/step_s": 3.2,
    }


def make_run(root: Path, *, audits: bool = True, config: bool = True) -> Path:
    run = root / "run"
    run.mkdir()
    rows = [{"step": 0, "eval/gsm8k-dev/accuracy": 0.20}]
    rows += [_metrics_row(s) for s in (1, 2, 3)]
    rows[2].pop("teacher/cost_usd")  # keys may be missing in some rows
    rows.append({"step": 3, "eval/gsm8k-dev/accuracy": 0.25})
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")  # a torn line must not break the report
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if audits:
        recs = [_audit_record(s, t) for s in (1, 2) for t in (0, 1)]
        (run / "audits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if config:
        (run / "config.yaml").write_text("student:\n  name: smollm2-135m-instruct\nteacher:\n  type: privileged\naudit:\n  teacher_samples: 3\nmax_steps: 3\n")
    return run


def _embedded_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="audit-data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


def test_report_files_and_self_contained(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path)
    index = write_report(run)
    assert index == run / "report" / "index.html"
    for name in PLOT_FILES:
        png = run / "report" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = index.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page), "the page must not reference anything on the network"
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page), "only data: images and in-page links"
    assert page.count("data:image/png;base64,") == len(PLOT_FILES)
    # model text never reaches the markup unescaped
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold</b>" not in page
    assert page.count("<script") == 2  # the JSON data block and the viewer code
    data = _embedded_data(page)
    assert len(data["records"]) == 4
    rec = data["records"][1]
    assert any(EVIL in seg[0] for seg in rec["segments"])  # ...but survives intact as data
    assert "smollm2-135m-instruct" in page and "teacher_samples: 3" in page


def test_report_missing_inputs(tmp_path):
    with pytest.raises(OmniOPDError, match="not found"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmniOPDError, match="metrics.jsonl"):
        write_report(tmp_path / "empty")
    run = make_run(tmp_path, audits=False, config=False)
    page = write_report(run).read_text(encoding="utf-8")
    assert "No audits recorded" in page and "config.yaml was not found" in page
    assert "1 malformed line(s) skipped" in page
    (run / "metrics.jsonl").write_text("")
    page = write_report(run).read_text(encoding="utf-8")
    assert "no rows yet" in page
    assert not (run / "report" / "loss.png").exists()  # stale plots are removed


def test_long_runs_are_subsampled_by_step(tmp_path):
    run = make_run(tmp_path)
    data = _embedded_data(write_report(run, max_audit_records=2).read_text(encoding="utf-8"))
    assert sorted({(r["step"], r["trajectory"]) for r in data["records"]}) == [(2, 0), (2, 1)]  # whole steps, last kept
    assert "showing the 2 records of 1 evenly spaced steps" in (run / "report" / "index.html").read_text(encoding="utf-8")


def test_chunk_location_is_best_effort():
    rec = _audit_record(2, 1)
    out = _prepare_record(rec)
    assert all(c["placed"] for c in out["chunks"])
    assert "".join(seg[0] for seg in out["segments"]) == rec["response"]
    texts = {seg[1]: seg[0] for seg in out["segments"] if seg[1] >= 0}
    assert texts == {0: "10 / 2 = 5", 1: "the answer 5"}
    # code points, not UTF-16 units: a chunk after an emoji is sliced exactly
    out = _prepare_record(_audit_record(2, 0))
    assert {seg[1]: seg[0] for seg in out["segments"] if seg[1] >= 0} == {0: "2 * 4 = 8 legs", 1: "#### 8"}
    # text that is nowhere in the response, garbage fields, overlapping spans
    bad = {"response": "abcdef", "chunks": [
        {"student_text": "zzz", "char_start": "x", "continuations": "nope"},
        {"student_text": "bcd", "char_start": 1, "char_end": 4, "target": float("nan")},
        {"student_text": "cde", "char_start": 2, "char_end": 5},
        "not a chunk",
    ]}
    out = _prepare_record(bad)
    assert [c["placed"] for c in out["chunks"]] == [False, True, True]
    assert out["segments"] == [["a", -1], ["bcd", 1], ["e", 2], ["f", -1]]
    assert out["chunks"][1]["target"] is None and out["chunks"][0]["continuations"] == []


# ------------------------------------------------------------------------------------------ browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def _chromium() -> str | None:
    env = os.environ.get("OMNIOPD_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def browser_page():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium executable found (apt-get install chromium, or set OMNIOPD_CHROMIUM)")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        except Exception as err:  # noqa: BLE001 - an unusable browser is an environment problem, not a bug
            pytest.skip(f"chromium at {exe} could not be launched: {str(err).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            yield page
        finally:
            browser.close()


def _save_artifact(src: Path, name: str) -> None:
    folder = os.environ.get("OMNIOPD_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, Path(folder) / name)


VISIBLE_CONT = "Array.from(e.childNodes).filter(n => n.nodeName !== 'DEL').map(n => n.textContent).join('')"
STUDENT_SIDE = "Array.from(e.childNodes).filter(n => n.nodeName !== 'INS').map(n => n.textContent).join('')"


def test_audit_viewer_in_browser(tmp_path, browser_page):
    page = browser_page
    run = make_run(tmp_path)
    index = write_report(run)
    errors, dialogs, requests = [], [], []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda req: requests.append(req.url) if not req.url.startswith(("file:", "data:")) else None)
    page.goto(index.as_uri())
    page.wait_for_selector("#viewer:not([hidden])")

    # step 1, trajectory 1 carries the injection attempt: it must show up as text, and run nothing
    page.select_option("#step", "1")
    page.select_option("#trajectory", index=1)
    assert "ex-1-1" in page.inner_text("#record-meta")
    assert EVIL in page.text_content("#prompt")
    assert EVIL in page.text_content("#response")
    assert page.locator("#response img, #response script, #chunk-panel b").count() == 0

    # step 2, trajectory 1: chunk 0 has stale offsets and was located by its text
    page.select_option("#step", "2")
    assert page.locator("#trajectory option").count() == 2
    page.select_option("#trajectory", index=1)
    rec = _audit_record(2, 1)
    chunk = page.locator('#response span.chunk[data-chunk="0"]')
    assert chunk.text_content() == rec["chunks"][0]["student_text"]
    assert page.locator("#response span.chunk").count() == 2
    colours = [page.locator(f'#response span.chunk[data-chunk="{i}"]').evaluate("e => e.style.backgroundColor") for i in (0, 1)]
    assert all(c.startswith("rgb(") for c in colours) and colours[0] != colours[1]  # colour follows pi_hat
    page.click('#response span.chunk[data-chunk="1"]')
    panel = page.locator("#chunk-panel")
    assert panel.is_visible()
    expected = rec["chunks"][1]
    assert panel.locator(".student-text .chunk-text").text_content() == expected["student_text"]
    cards = panel.locator(".card.continuation .cont-text")
    assert cards.count() == 3
    for k, cont in enumerate(expected["continuations"]):
        box = cards.nth(k)
        assert box.evaluate(f"e => {VISIBLE_CONT}") == cont  # what the teacher wrote, diff marks aside
        assert box.evaluate(f"e => {STUDENT_SIDE}") == expected["student_text"]
    assert cards.nth(0).locator("ins, del").count() == 0  # identical continuation: nothing marked
    assert cards.nth(1).locator("ins").count() > 0 and cards.nth(1).locator("del").count() > 0
    panel_text = panel.inner_text()
    for label in ("φ = 1", "φ = 0.550", "φ = 0.050", "k_sem", "π̂", "p̄", "entropy"):
        assert label in panel_text, label
    assert "0.600" in panel_text  # π̂ of chunk 1 = (2 + 0.4) / 4

    page.select_option("#diff-mode", "off")
    assert [cards.nth(k).text_content() for k in range(3)] == expected["continuations"]
    page.select_option("#diff-mode", "char")

    # the diff reconstructs both sides on arbitrary strings, and stays bounded on long ones
    checks = page.evaluate("""() => {
        const rnd = (n, abc) => Array.from({length: n}, () => abc[Math.floor(Math.random() * abc.length)]).join('');
        const out = [];
        for (let i = 0; i < 200; i++) {
            const a = rnd(Math.floor(Math.random() * 40), 'ab c\\u00e9\\ud83d\\ude00'), b = rnd(Math.floor(Math.random() * 40), 'abc \\u00e9\\ud83d\\ude00');
            for (const mode of ['char', 'word']) {
                const r = window.omniopdDiff(a, b, mode);
                const left = r.ops.filter(o => o.type !== 'ins').map(o => o.text).join('');
                const right = r.ops.filter(o => o.type !== 'del').map(o => o.text).join('');
                out.push(left === a && right === b);
            }
        }
        const big = window.omniopdDiff('x'.repeat(5000) + 'y', 'y' + 'x'.repeat(5000), 'char');
        return {ok: out.every(Boolean), bigMode: big.mode};
    }""")
    assert checks["ok"] and checks["bigMode"] in ("word", "off")

    shot = tmp_path / "audit_viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    _save_artifact(shot, "audit_viewer.png")
    assert errors == [] and dialogs == [] and requests == []
