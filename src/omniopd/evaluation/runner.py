"""Math evaluation of a student: generate, extract the final answer, grade with math-verify.

Greedy by default (temperature 0); batched ``generate`` with a progress bar. Writes per-problem
records (prompt, output, extracted answer, extraction rule, verdict) and returns a summary with the
accuracy, its 95% Wilson interval and the share of answers that could not be parsed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from omniopd.data import Example
from omniopd.evaluation.mathgrade import answers_match, extract_answer, wilson_interval
from omniopd.prompts import student_messages
from omniopd.rollout import chat_prompts, generate_texts


def evaluate_math(
    model,
    tokenizer,
    examples: list[Example],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    records_path: str | Path | None = None,
    desc: str = "eval",
    show_progress: bool = True,
) -> dict:
    t0 = time.perf_counter()
    prompts = chat_prompts(tokenizer, [student_messages(ex.question) for ex in examples])
    with tqdm(total=len(prompts), desc=desc, unit="problem", disable=not show_progress, leave=False) as bar:
        responses, finished = generate_texts(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, progress=bar,
        )
    records, correct, unparsed = [], 0, 0
    for ex, resp, done in zip(examples, responses, finished, strict=True):
        text = tokenizer.decode(resp, skip_special_tokens=True)
        ext = extract_answer(text)
        ok = answers_match(ex.answer, ext.answer)
        correct += ok
        unparsed += ext.answer is None
        records.append({
            "id": ex.id, "question": ex.question, "output": text, "gold": ex.answer, "extracted": ext.answer,
            "rule": ext.rule, "correct": ok, "finished": done, "tokens": len(resp),
        })
    n = len(examples)
    lo, hi = wilson_interval(correct, n)
    summary = {
        "accuracy": correct / n if n else 0.0,
        "ci95": [lo, hi],
        "n": n,
        "correct": correct,
        "answers_unparsed": unparsed / n if n else 0.0,
        "answers_with_hash": sum(r["rule"] == "hash" for r in records) / n if n else 0.0,
        "truncated_frac": sum(not r["finished"] for r in records) / n if n else 0.0,
        "mean_tokens": sum(r["tokens"] for r in records) / n if n else 0.0,
        "decoding": "greedy" if temperature == 0 else f"sampled(temperature={temperature})",
        "max_new_tokens": max_new_tokens,
        "seconds": time.perf_counter() - t0,
    }
    if records_path is not None:
        path = Path(records_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    return summary
