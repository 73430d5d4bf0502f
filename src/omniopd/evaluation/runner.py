"""The evaluation runner: generate answers, grade them, summarise with intervals.

Benchmarks: the math sets (``gsm8k-dev``, ``math500``, ``amc23``, ``aime24`` or any jsonl with field
mappings), graded by final-answer extraction + math-verify; and the code sets (``humaneval``,
``mbppplus``), graded by running the code in the sandbox of :mod:`omniopd.evaluation.sandbox`.

Generation comes from a :class:`Generator`: a Hugging Face model (batched ``generate`` with a progress
bar, greedy at temperature 0, else sampled with top_k=0) or an API model through the teacher
backends (the teacher "continues" an empty answer, so the same wire protocols are used as in
training). ``n`` samples per problem give pass@k with the unbiased estimator for every k <= n;
greedy decoding allows only n = 1.

Every number in the summary carries a 95% interval: a Wilson interval for proportions over problems
(accuracy, pass@1 with one sample, format rates), and a normal interval over problems for means
(pass@k with several samples, lengths).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tqdm.auto import tqdm

from omniopd.data import CODE_BENCHMARKS, CodeTests, Example, is_code_dataset, load_examples
from omniopd.engine.prompts import CODE_INSTRUCTION, student_messages
from omniopd.engine.rollout import chat_prompts, generate_texts
from omniopd.errors import ConfigError
from omniopd.evaluation.mathgrade import EXTRACTION_RULES, answers_match, extract_answer, wilson_interval
from omniopd.evaluation.sample import Sample
from omniopd.evaluation.stats import mean_ci

if TYPE_CHECKING:
    from omniopd.evaluation.code import CodeTask


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # what the model is asked (before the instruction)
    instruction: str | None  # None: the math answer format
    gold: str | None = None  # math: the final answer
    task: CodeTask | None = None  # a code benchmark's task (HumanEval, MBPP+)
    tests: CodeTests | None = None  # an MBPP prompt's own unit tests (``mbpp:validation``): all must pass
    reference: str | None = None  # its reference solution (names the function the tests call)


class Generator(Protocol):
    name: str

    def generate(
        self,
        problems: list[Problem],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        batch_size: int,
        desc: str,
        show_progress: bool,
    ) -> list[list[Sample]]: ...


class HFGenerator:
    """A local Hugging Face model (HF id, directory, .gguf, packaged name, a run's final/ or checkpoint)."""

    def __init__(self, model, tokenizer, name: str = "model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name

    def generate(self, problems, *, n, max_new_tokens, temperature, batch_size, desc, show_progress):
        prompts = chat_prompts(self.tokenizer, [student_messages(p.question, p.instruction) for p in problems])
        with tqdm(total=len(prompts), desc=desc, unit="problem", disable=not show_progress, leave=False) as bar:
            responses, finished = generate_texts(
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                n=n,
                batch_size=batch_size,
                progress=bar,
            )
        samples = [
            Sample(self.tokenizer.decode(r, skip_special_tokens=True), len(r), f)
            for r, f in zip(responses, finished, strict=True)
        ]
        return [samples[i * n : (i + 1) * n] for i in range(len(problems))]


class TeacherGenerator:
    """An API (or any) teacher backend answering from an empty prefix."""

    def __init__(self, teacher):
        self.teacher, self.name = teacher, teacher.name

    def generate(self, problems, *, n, max_new_tokens, temperature, batch_size, desc, show_progress):
        from omniopd.teachers.base import ContinuationRequest, SamplingSpec

        reqs = [
            ContinuationRequest(question=p.question, prefix="", trajectory=i, instruction=p.instruction)
            for i, p in enumerate(problems)
        ]
        results = self.teacher.continue_prefixes(
            reqs, SamplingSpec(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
        )
        out = []
        for res in results:
            texts = res.texts if res.ok else []
            texts = texts + [""] * (n - len(texts))  # a failed request is a wrong answer, counted, not dropped
            out.append([Sample(t, 0, True) for t in texts[:n]])
        return out


def load_problems(
    benchmark: str, limit: int | None = None, question_field: str | None = None, answer_field: str | None = None
) -> list[Problem]:
    if benchmark.lower() in CODE_BENCHMARKS:
        from omniopd.evaluation.code import load_code_tasks

        tasks = load_code_tasks(benchmark.lower(), limit=limit)
        return [Problem(t.task_id, f"{t.prompt.strip()}", CODE_INSTRUCTION, task=t) for t in tasks]
    examples: list[Example] = load_examples(
        benchmark, limit=limit, question_field=question_field, answer_field=answer_field
    )
    return [
        Problem(ex.id, ex.question, ex.instruction, tests=ex.tests, reference=ex.reference)
        if ex.tests is not None
        else Problem(ex.id, ex.question, None, gold=ex.answer)
        for ex in examples
    ]


def _rate(count: int, n: int) -> dict:
    lo, hi = wilson_interval(count, n)
    return {"value": count / n if n else 0.0, "ci95": [lo, hi]}


def evaluate(
    generator: Generator,
    benchmark: str,
    *,
    limit: int | None = None,
    n: int = 1,
    ks: tuple[int, ...] = (1,),
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    extraction: tuple[str, ...] = EXTRACTION_RULES,
    question_field: str | None = None,
    answer_field: str | None = None,
    records_path: str | Path | None = None,
    show_progress: bool = True,
    grade_workers: int | None = None,
    insecure_no_isolation: bool = False,
) -> dict:
    """Generate ``n`` answers per problem, grade, and return the summary (records go to ``records_path``)."""
    if n < 1 or any(k < 1 or k > n for k in ks):
        raise ConfigError(f"pass@k needs 1 <= k <= n (got n={n}, k={list(ks)})")
    if temperature == 0 and n > 1:
        raise ConfigError("greedy decoding (temperature 0) gives n identical samples: use a temperature > 0 for n > 1")
    unknown = [r for r in extraction if r not in EXTRACTION_RULES]
    if unknown:
        raise ConfigError(f"unknown extraction rule {unknown[0]!r}: use {', '.join(EXTRACTION_RULES)}")
    is_code = is_code_dataset(benchmark)
    if is_code:  # before generating anything: grading refuses to run without the isolated sandbox
        from omniopd.evaluation.code import check_isolation

        check_isolation(insecure_no_isolation)
    t0 = time.perf_counter()
    problems = load_problems(benchmark, limit, question_field, answer_field)
    samples = generator.generate(
        problems,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        desc=f"eval {benchmark}",
        show_progress=show_progress,
    )
    t_gen = time.perf_counter() - t0
    records: list[dict] = []
    if is_code and benchmark.lower() not in CODE_BENCHMARKS:
        records = _grade_own_tests(problems, samples, grade_workers, insecure_no_isolation)
    elif is_code:
        from omniopd.evaluation.code import grade_many

        pairs: list[tuple[CodeTask | str, str]] = []
        for p, ss in zip(problems, samples, strict=True):
            assert p.task is not None  # load_problems gives every code problem its task
            pairs += [(p.task, s.text) for s in ss]
        grades = iter(
            grade_many(benchmark.lower(), pairs, max_workers=grade_workers, insecure_no_isolation=insecure_no_isolation)
        )
        for p, ss in zip(problems, samples, strict=True):
            for j, s in enumerate(ss):
                g = next(grades)
                records.append(
                    {
                        "id": p.id,
                        "sample": j,
                        "question": p.question,
                        "output": s.text,
                        "code": g.code,
                        "correct": g.passed,
                        "status": g.status,
                        "detail": g.detail[:500],
                        "base_passed": g.base_passed,
                        "tokens": s.tokens,
                        "finished": s.finished,
                        "grade_s": g.seconds,
                    }
                )
    else:
        for p, ss in zip(problems, samples, strict=True):
            for j, s in enumerate(ss):
                ext = extract_answer(s.text, extraction)
                records.append(
                    {
                        "id": p.id,
                        "sample": j,
                        "question": p.question,
                        "output": s.text,
                        "gold": p.gold,
                        "extracted": ext.answer,
                        "rule": ext.rule,
                        "correct": answers_match(p.gold or "", ext.answer),
                        "tokens": s.tokens,
                        "finished": s.finished,
                    }
                )
    summary = summarise(records, len(problems), n, ks, is_code)
    summary.update(
        {
            "benchmark": benchmark,
            "model": generator.name,
            "decoding": "greedy" if temperature == 0 else f"sampled(temperature={temperature}, top_p=1, top_k=0)",
            "max_new_tokens": max_new_tokens,
            "samples_per_problem": n,
            "extraction": None if is_code else list(extraction),
            "generate_s": t_gen,
            "seconds": time.perf_counter() - t0,
        }
    )
    if records_path is not None:
        path = Path(records_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    return summary


def _grade_own_tests(problems: list[Problem], samples: list[list[Sample]], workers, insecure: bool) -> list[dict]:
    """MBPP prompts: an answer is correct when its extracted code passes every one of the prompt's unit tests
    (the same grader as GRPO's code reward, in the isolated judge)."""
    from omniopd.evaluation.code import grade_tests
    from omniopd.evaluation.parallel import parallel_map

    pairs = [(p, j, s) for p, ss in zip(problems, samples, strict=True) for j, s in enumerate(ss)]

    def grade(item):
        p, _, s = item
        assert p.tests is not None  # load_problems gives every MBPP problem its tests
        t = p.tests
        return grade_tests(
            s.text, t.asserts, setup=[*t.imports, t.setup_code], reference=p.reference, insecure_no_isolation=insecure
        )

    grades = parallel_map(grade, pairs, workers)
    return [
        {
            "id": p.id,
            "sample": j,
            "question": p.question,
            "output": s.text,
            "correct": g.passed,
            "tests_passed": g.tests_passed,
            "tests_total": g.tests_total,
            "status": g.status,
            "detail": g.detail[:500],
            "base_passed": None,
            "tokens": s.tokens,
            "finished": s.finished,
            "grade_s": g.seconds,
        }
        for (p, j, s), g in zip(pairs, grades, strict=True)
    ]


def summarise(records: list[dict], num_problems: int, n: int, ks: tuple[int, ...], is_code: bool) -> dict:
    from omniopd.evaluation.code import pass_at_k

    by_problem: dict[str, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["id"], []).append(r)
    correct_counts = [sum(r["correct"] for r in rs) for rs in by_problem.values()]
    first_correct = sum(rs[0]["correct"] for rs in by_problem.values())
    P = len(by_problem)
    summary: dict = {"n": P}
    lo, hi = wilson_interval(first_correct, P) if n == 1 else (0.0, 0.0)
    for k in ks:
        per = [pass_at_k(n, c, k) for c in correct_counts]
        value = statistics.fmean(per) if per else 0.0
        ci = [lo, hi] if n == 1 else mean_ci(per)
        summary[f"pass@{k}"] = value
        summary[f"pass@{k}_ci95"] = ci
    summary["accuracy"] = summary["pass@1"] if 1 in ks else statistics.fmean(c / n for c in correct_counts)
    summary["ci95"] = summary.get("pass@1_ci95", mean_ci([c / n for c in correct_counts]))
    summary["correct"] = sum(correct_counts)
    total = len(records)
    summary["truncated"] = _rate(sum(not r["finished"] for r in records), total)
    summary["truncated_frac"] = summary["truncated"]["value"]
    lengths = [float(r["tokens"]) for r in records]
    summary["mean_tokens"] = statistics.fmean(lengths) if lengths else 0.0
    summary["mean_tokens_ci95"] = mean_ci(lengths)
    if is_code:
        base = [r for r in records if r.get("base_passed") is not None]
        if base:
            summary["base_pass@1"] = _rate(sum(r["base_passed"] for r in base), len(base))
        summary["status_counts"] = {
            s: sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})
        }
    else:
        unparsed = sum(r["extracted"] is None for r in records)
        summary["answers_unparsed"] = unparsed / total if total else 0.0
        summary["answers_unparsed_ci95"] = list(wilson_interval(unparsed, total))
        summary["extraction_rule_counts"] = {
            str(k): sum(r["rule"] == k for r in records) for k in (*EXTRACTION_RULES, None)
        }
        summary["answers_with_hash"] = summary["extraction_rule_counts"]["hash"] / total if total else 0.0
    return summary


def evaluate_model(
    model,
    tokenizer,
    benchmark: str = "gsm8k-dev",
    *,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    records_path: str | Path | None = None,
    show_progress: bool = True,
    insecure_no_isolation: bool = False,
    engine: str = "hf",
    gguf_template: str | None = None,
    gguf_dtype: str = "f32",
) -> dict:
    """Single-sample evaluation of a local model on any benchmark (what the trainer uses). ``engine="llamacpp"``
    decodes through llama.cpp from the model's weights written as a GGUF file with ``gguf_template``'s metadata
    (a packaged name or .gguf path: the GGUF the student came from)."""
    generator: Generator = HFGenerator(model, tokenizer)
    if engine == "llamacpp":
        from omniopd.engine.models import gguf_file
        from omniopd.evaluation.llamacpp_generator import LlamaCppGenerator

        if gguf_template is None:
            raise ValueError("engine='llamacpp' needs gguf_template: the GGUF file the model came from")
        generator = LlamaCppGenerator.from_model(model, tokenizer, gguf_file(gguf_template), dtype=gguf_dtype)
    return evaluate(
        generator,
        benchmark,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        records_path=records_path,
        show_progress=show_progress,
        insecure_no_isolation=insecure_no_isolation,
    )
