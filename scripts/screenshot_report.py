#!/usr/bin/env python
"""Screenshot a run's audit viewer: ``python scripts/screenshot_report.py RUN_DIR OUT.png [--full-page]``.

Opens ``RUN_DIR/report/index.html`` (written first with :func:`omniopd.report.write_report` when it is
missing or ``--regenerate`` is given) from disk in headless Chromium, keeps the first step and
trajectory, clicks the first audited chunk and saves a PNG of the audit viewer (or of the whole page
with ``--full-page``). Needs ``pip install playwright`` and a system Chromium (``apt-get install
chromium``; another binary via ``--chromium`` or ``$OMNIOPD_CHROMIUM``); no browser download.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def find_chromium(explicit: str | None) -> str:
    for cand in (explicit, os.environ.get("OMNIOPD_CHROMIUM")):
        if cand:
            return cand
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no chromium found: apt-get install chromium, or pass --chromium PATH")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--full-page", action="store_true", help="the whole page, not only the audit viewer")
    ap.add_argument("--regenerate", action="store_true", help="rewrite the report first")
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--chromium", default=None, help="path of the chromium binary")
    args = ap.parse_args(argv)

    index = args.run_dir / "report" / "index.html"
    if args.regenerate or not index.is_file():
        try:
            from omniopd.report import write_report
        except ImportError:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
            from omniopd.report import write_report
        from omniopd.errors import OmniOPDError

        try:
            index = write_report(args.run_dir)
        except OmniOPDError as err:
            sys.exit(f"error: {err}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("playwright is not installed: pip install playwright")

    exe = find_chromium(args.chromium)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(index.resolve().as_uri())
            if page.locator("#viewer:not([hidden])").count():
                first = page.locator("#response span.chunk").first
                if first.count():
                    first.click()
                elif page.locator("#chunk-table tbody tr[data-chunk]").count():
                    page.locator("#chunk-table tbody tr[data-chunk]").first.click()
            else:
                print("note: the report has no audit records; shooting the page as it is", file=sys.stderr)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            if args.full_page:
                page.screenshot(path=str(args.out), full_page=True)
            else:
                page.locator("#audits").screenshot(path=str(args.out))
            if errors:
                print("page errors: " + "; ".join(errors), file=sys.stderr)
                return 1
        finally:
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
