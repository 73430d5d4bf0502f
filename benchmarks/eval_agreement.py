"""Do two evaluations of the same model agree, problem by problem? (e.g. ``--engine hf`` against ``--engine llamacpp``)

    python benchmarks/eval_agreement.py --output agreement.json A_records.jsonl B_records.jsonl [A2 B2 ...]

Each pair is two prediction files of one benchmark (``omniopd eval``'s ``*_records.jsonl``, or a comparison's
``eval/*_predictions.jsonl``), one row per problem. Reports the share of problems whose verdict agrees, the share
whose answer text is identical, and every disagreement with its reason: where the two answers part (the first
differing character, with a few characters of context), each side's length, whether it ended by itself, and each
side's grading status and detail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if r.get("sample", 0) == 0}


def _parting(a: str, b: str) -> dict:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"at_char": i, "a": a[max(0, i - 20) : i + 30], "b": b[max(0, i - 20) : i + 30]}


def compare(a_path: Path, b_path: Path) -> dict:
    a, b = _rows(a_path), _rows(b_path)
    if set(a) != set(b):
        raise SystemExit(f"{a_path} and {b_path} hold different problems ({len(set(a) ^ set(b))} not in both)")
    same_text = sum(a[k]["output"] == b[k]["output"] for k in a)
    disagree = []
    for k in a:
        ra, rb = a[k], b[k]
        if bool(ra["correct"]) != bool(rb["correct"]):
            disagree.append({
                "id": k,
                "a_correct": ra["correct"], "b_correct": rb["correct"],
                "same_text": ra["output"] == rb["output"],
                "parting": _parting(ra["output"], rb["output"]),
                "a_tokens": ra.get("tokens"), "b_tokens": rb.get("tokens"),
                "a_finished": ra.get("finished"), "b_finished": rb.get("finished"),
                "a_status": ra.get("status"), "b_status": rb.get("status"),
                "a_detail": (ra.get("detail") or "")[:200], "b_detail": (rb.get("detail") or "")[:200],
            })
    n = len(a)
    return {
        "a": str(a_path), "b": str(b_path), "problems": n,
        "verdicts_agree": (n - len(disagree)) / n, "same_text": same_text / n,
        "a_correct": sum(bool(r["correct"]) for r in a.values()), "b_correct": sum(bool(r["correct"]) for r in b.values()),
        "disagreements": disagree,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    if len(args.files) % 2:
        raise SystemExit("give the prediction files in pairs: A B [A2 B2 ...]")
    pairs = [compare(Path(args.files[i]), Path(args.files[i + 1])) for i in range(0, len(args.files), 2)]
    n = sum(p["problems"] for p in pairs)
    report = {
        "pairs": pairs,
        "problems": n,
        "verdicts_agree": sum(p["verdicts_agree"] * p["problems"] for p in pairs) / n,
        "same_text": sum(p["same_text"] * p["problems"] for p in pairs) / n,
        "disagreements": sum(len(p["disagreements"]) for p in pairs),
    }
    Path(args.output).write_text(json.dumps(report, indent=2))
    for p in pairs:
        print(f"{Path(p['a']).name} vs {Path(p['b']).name}: {p['problems']} problems, verdicts agree "
              f"{100 * p['verdicts_agree']:.1f}%, same text {100 * p['same_text']:.1f}%, correct {p['a_correct']} vs {p['b_correct']}")
        for d in p["disagreements"]:
            print(f"  {d['id']}: {d['a_correct']} vs {d['b_correct']}; text parts at char {d['parting']['at_char']} "
                  f"({d['parting']['a']!r} | {d['parting']['b']!r}); {d['a_status']} vs {d['b_status']}")
    print(f"all: {n} problems, verdicts agree {100 * report['verdicts_agree']:.1f}%, {report['disagreements']} disagreements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
