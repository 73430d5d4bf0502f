"""``omniopd`` command line: parse arguments, then call library functions.

Heavy imports (torch, transformers) happen after parsing, so ``--help`` is instant. Any
:class:`~omniopd.errors.OmniOPDError` becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from omniopd.data import dataset_names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omniopd", description="Logit-free on-policy distillation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student from a YAML recipe")
    t.add_argument("recipe", nargs="?", help="path to a recipe YAML (optional with --resume)")
    t.add_argument("overrides", nargs="*", help="key=value overrides with dotted paths, e.g. audit.chunk_tokens=24")
    t.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        default=None,
        help="continue the run in OUTPUT_DIR from its last checkpoint (its config.yaml is the recipe)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a model on a math or code benchmark")
    e.add_argument(
        "--model",
        required=True,
        help="HF id, local directory, .gguf file, packaged name, a run's final/ or checkpoint; with --api, the API model name",
    )
    e.add_argument(
        "--data",
        default="gsm8k-dev",
        help=f"{', '.join(dataset_names())}, or a .jsonl path",
    )
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    e.add_argument("--output", required=True, help="summary JSON path (per-problem records go next to it)")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    e.add_argument("--n", type=int, default=1, help="samples per problem (needs --temperature > 0 when > 1)")
    e.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values to report (default: 1 and n)")
    e.add_argument("--extraction", default="hash,boxed,last_number", help="math answer extraction rules, in order")
    e.add_argument("--question-field", default=None)
    e.add_argument("--answer-field", default=None)
    e.add_argument(
        "--api",
        default=None,
        metavar="TEACHER_TYPE",
        help="evaluate an API model through a teacher backend: openai-completions, openai-chat, anthropic, gemini",
    )
    e.add_argument(
        "--engine",
        choices=["hf", "llamacpp"],
        default="hf",
        help="what decodes a local model's answers: transformers (hf) or llama.cpp, from the weights written as a "
        "GGUF file with --gguf-template's metadata",
    )
    e.add_argument(
        "--gguf-template",
        default=None,
        help="with --engine llamacpp: the GGUF the model came from (packaged name or .gguf); default: --model "
        "itself when it is one, else the student of the run whose final/ or checkpoint --model is",
    )
    e.add_argument(
        "--gguf-dtype",
        choices=["f32", "bf16"],
        default="f32",
        help="with --engine llamacpp: f32 keeps the weights exactly; bf16 rounds them (faster on a CPU with AVX512-BF16)",
    )
    e.add_argument("--base-url", default=None)
    e.add_argument("--api-key-env", default=None)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument(
        "--insecure-no-isolation",
        action="store_true",
        help="grade code without the isolated sandbox when it is unavailable (not root, no namespaces): "
        "model-written code can then read your files, the answer keys included",
    )

    c = sub.add_parser(
        "check-teacher", help="send a few real prefixes to the configured teacher and check what comes back"
    )
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--prefixes", type=int, default=3)
    c.add_argument("--output", default=None, help="also write the report as JSON")

    r = sub.add_parser("report", help="plots and an HTML audit viewer for a run directory")
    r.add_argument("run_dir")

    m = sub.add_parser(
        "compare", help="train the recipe's compare.variants on the same budget and compare them on the same dev slice"
    )
    m.add_argument("recipe", help="a recipe YAML with a compare: section")
    m.add_argument("overrides", nargs="*", help="key=value overrides applied to every arm")
    m.add_argument(
        "--rerun",
        action="store_true",
        help="train every arm again even if a finished run with the same config exists (unchanged models keep their measurements)",
    )
    m.add_argument("--no-progress", action="store_true")
    m.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=None,
        help="train only these variants (and measure the base model); finished arms are reused, the others are listed as not run",
    )

    x = sub.add_parser(
        "estimate", help="what the recipe's API teacher will bill: requests, tokens and dollars per step and epoch"
    )
    x.add_argument("recipe")
    x.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. teacher.type=anthropic teacher.model=claude-haiku-4-5"
    )
    x.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="prompts of real rollouts to measure the prefixes on (default: one step's optim.prompts_per_step)",
    )
    x.add_argument(
        "--paper",
        action="store_true",
        help="the paper's setting instead of rollouts: 17K prompts x 8 samples, M=10, N=10, C=50 (synthetic prefixes)",
    )
    x.add_argument("--output", default=None, help="also write the report as JSON")

    s = sub.add_parser(
        "check-signal", help="k_sem of the teacher vs shuffled and no-privilege controls on real rollouts"
    )
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--steps", type=int, default=2, help="batches of student rollouts to audit (default 2)")
    s.add_argument("--phi", action="append", default=None, help="phi to score with (repeatable; default: audit.phi)")
    s.add_argument("--output", default=None, help="also write the report as JSON")
    return p


def _check_models(cfg) -> None:
    """Refuse an unknown ``student.name`` or in-process ``teacher.model`` in one line, before loading anything."""
    from omniopd.config.teachers import IN_PROCESS_TEACHER_TYPES
    from omniopd.engine.models import check_model_name

    check_model_name(cfg.student.name)
    if cfg.teacher.type in IN_PROCESS_TEACHER_TYPES and cfg.teacher.model:
        check_model_name(cfg.teacher.model)


def _cmd_check_teacher(args) -> int:
    from omniopd.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    _check_models(cfg)
    from omniopd.data import load_train_examples
    from omniopd.diagnostics.preflight import check_teacher, format_check
    from omniopd.engine.models import load_tokenizer
    from omniopd.teachers import build_teacher

    examples = load_train_examples(
        cfg.data.train, allow_eval_overlap=cfg.data.allow_eval_overlap, limit=max(args.prefixes, 1)
    )
    tokenizer = load_tokenizer(cfg.student.name)
    teacher = build_teacher(cfg)
    try:
        report = check_teacher(cfg, teacher, tokenizer, examples, num_prefixes=args.prefixes)
        report["backend"] = teacher.metrics()
    finally:
        teacher.close()
    print(format_check(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_report(args) -> int:
    from omniopd.report import write_report

    index = write_report(Path(args.run_dir))
    print(f"report written: {index}")
    return 0


def _cmd_train(args) -> int:
    from omniopd.config import load_config
    from omniopd.errors import ConfigError

    overrides = list(args.overrides)
    recipe = args.recipe
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)  # `train --resume DIR key=value`: no recipe given
        recipe = None
    if args.resume:
        run_dir = Path(args.resume)
        recipe = recipe or run_dir / "config.yaml"
        if not Path(recipe).is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a run directory?)")
        overrides += [f"output_dir={run_dir}", "resume=true"]
    if recipe is None:
        raise ConfigError("train needs a recipe YAML (or --resume OUTPUT_DIR)")
    cfg = load_config(recipe, overrides)
    _check_models(cfg)
    from omniopd.training.trainer import format_summary, train

    summary = train(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    if summary:  # empty on the non-main processes of a multi-process run
        print(format_summary(summary))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # closing the group keeps gloo's threads from outliving the interpreter (otherwise a process can abort at
        # exit, "terminate called without an active exception"); the barrier first, so that no rank closes its
        # connections while the main process is still writing the summary (a 2-process test run under load aborted so)
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _cmd_eval(args) -> int:
    from omniopd.errors import ConfigError

    for name in ("limit", "max_new_tokens", "batch_size", "n"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be > 0 (got {v})")
    if args.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0 (got {args.temperature})")
    ks = tuple(sorted(set(args.k or [1, args.n])))
    from omniopd.data import is_code_dataset
    from omniopd.evaluation.runner import Generator, HFGenerator, TeacherGenerator, evaluate, load_problems

    load_problems(
        args.data, limit=args.limit, question_field=args.question_field, answer_field=args.answer_field
    )  # fail fast
    if is_code_dataset(args.data):
        from omniopd.evaluation.code import check_isolation

        check_isolation(args.insecure_no_isolation)  # before loading a model and generating
    if not args.api:
        from omniopd.engine.models import check_model_name

        check_model_name(args.model)  # before any model is loaded
    teacher = None
    generator: Generator
    if args.api:
        from omniopd.config import build_config
        from omniopd.teachers import build_teacher

        fields = {
            "type": args.api,
            "model": args.model,
            "base_url": args.base_url,
            "api_key_env": args.api_key_env,
            "temperature": args.temperature,
        }
        cfg = build_config(
            {"teacher": {k: v for k, v in fields.items() if v is not None}, "audit": {"teacher_samples": args.n}}
        )
        teacher = build_teacher(cfg)
        generator = TeacherGenerator(teacher)
    else:
        from omniopd.engine.models import load_model

        model, tok = load_model(args.model)
        generator = HFGenerator(model, tok, args.model)
        if args.engine == "llamacpp":
            from omniopd.engine.models import gguf_file
            from omniopd.evaluation.llamacpp_generator import LlamaCppGenerator

            template = gguf_file(args.gguf_template or _gguf_template(args.model))
            generator = LlamaCppGenerator.from_model(model, tok, template, args.model, dtype=args.gguf_dtype)
    out = Path(args.output)
    try:
        summary = evaluate(
            generator,
            args.data,
            limit=args.limit,
            n=args.n,
            ks=ks,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            extraction=tuple(r.strip() for r in args.extraction.split(",") if r.strip()),
            question_field=args.question_field,
            answer_field=args.answer_field,
            records_path=out.with_name(out.stem + "_records.jsonl"),
            show_progress=not args.no_progress,
            insecure_no_isolation=args.insecure_no_isolation,
        )
    finally:
        if teacher is not None:
            summary_backend = teacher.metrics()
            teacher.close()
    if teacher is not None:
        summary["backend"] = summary_backend
    summary.update({"model": args.model, "data": args.data})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    lo, hi = summary["ci95"]
    extra = "".join(f", pass@{k} {100 * summary[f'pass@{k}']:.1f}%" for k in ks if k != 1)
    print(
        f"{args.data}: accuracy {100 * summary['accuracy']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}, n={summary['n']}){extra} -> {out}"
    )
    return 0


def _gguf_template(model: str) -> str:
    """The GGUF a model came from: itself when it is one, else the student of the run it was saved by (the
    ``config.yaml`` of the run directory above ``final/``, ``best/`` or a checkpoint)."""
    import yaml

    from omniopd.engine.models import PACKAGED_MODELS
    from omniopd.errors import ConfigError

    if model in PACKAGED_MODELS or model.endswith(".gguf"):
        return model
    for parent in list(Path(model).resolve().parents)[:3]:
        cfg = parent / "config.yaml"
        if cfg.is_file():
            return str((yaml.safe_load(cfg.read_text()) or {}).get("student", {}).get("name", ""))
    raise ConfigError(f"--engine llamacpp: say which GGUF {model} came from with --gguf-template")


def _cmd_compare(args) -> int:
    from omniopd.compare import format_compare, run_compare

    result = run_compare(args.recipe, args.overrides, rerun=args.rerun, progress=not args.no_progress, only=args.only)
    print(format_compare(result))
    return 0


def _cmd_estimate(args) -> int:
    from omniopd.config import load_config
    from omniopd.errors import ConfigError

    if args.prompts is not None and args.prompts < 1:
        raise ConfigError(f"--prompts: must be >= 1 (got {args.prompts})")
    cfg = load_config(args.recipe, args.overrides)
    _check_models(cfg)
    from omniopd.diagnostics.estimate import estimate, format_estimate

    report = estimate(cfg, prompts=args.prompts, paper=args.paper)
    print(format_estimate(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_check_signal(args) -> int:
    from omniopd.config import load_config
    from omniopd.errors import ConfigError

    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1 (got {args.steps})")
    cfg = load_config(args.recipe, args.overrides)
    _check_models(cfg)
    known = ("ned", "rouge1", "embedding")
    for name in args.phi or []:
        if name not in known:
            raise ConfigError(f"--phi: unknown phi '{name}' (known: {', '.join(known)})")
    from omniopd.diagnostics.signal_check import check_signal, format_signal

    report = check_signal(cfg, steps=args.steps, phis=args.phi)
    print(format_signal(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "check-teacher": _cmd_check_teacher,
    "report": _cmd_report,
    "compare": _cmd_compare,
    "check-signal": _cmd_check_signal,
    "estimate": _cmd_estimate,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("OMNIOPD_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local; never stall on an unreachable hub
    from omniopd.errors import OmniOPDError

    try:
        return COMMANDS[args.command](args)
    except OmniOPDError as err:
        print(f"omniopd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omniopd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
