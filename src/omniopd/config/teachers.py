"""The ``teacher:`` section of the config: one class per ``teacher.type``, chosen by that field.

Each class holds only the settings its backend reads, so a key the chosen type does not use is refused with
one line (``teacher.base_url is not used by teacher.type=local``) instead of being ignored::

    _TeacherBase                    type, model, temperature, top_p, max_new_tokens (what the audit asks for)
    |-- _InProcessTeacher           batch_size, reuse_prefix, share_prefixes, dtype (teachers.local)
    |   |-- LocalTeacherConfig           local
    |   `-- PrivilegedTeacherConfig      privileged (the default): the model is also shown the reference
    |-- LlamaCppTeacherConfig       llamacpp: a GGUF file in-process (teachers.llamacpp), privileged or not
    `-- APITeacherConfig            RuntimeOptions (concurrency, retries, top-ups, dispatch, budget, prompt cache),
        |                           privileged, base_url, api_key_env, max_tokens_factor, cache, cache_path
        |-- _OpenAITeacher               max_n_per_request, send_seed, extra_body
        |   |-- OpenAICompletionsTeacherConfig   openai-completions: tokenizer, strip_bos, stop
        |   `-- OpenAIChatTeacherConfig          openai-chat: max_tokens_field, send_sampling_params, reasoning_effort
        |-- AnthropicTeacherConfig       anthropic: send_sampling_params, extra_body
        `-- GeminiTeacherConfig          gemini: api_version, max_n_per_request, send_seed, send_sampling_params,
                                         thinking_budget

A backend is built from its config's fields by name (``backend_options``): a field added to a class reaches
that backend's keyword arguments with no other change, and a field added to :class:`RuntimeOptions` reaches
every API backend (``teachers.runtime`` reads its options through that class, the only place their defaults
and ranges are written).

Switching ``teacher.type`` by an override (``teacher.type=
privileged`` on a recipe whose teacher is ``local``, or a ``compare`` arm) keeps every field the new type also
has; a field the old type had and the new one lacks is dropped with a warning naming it (:func:`switch_type`),
because an override cannot delete a key. A key written beside the type it does not fit (in the same recipe
section, or by an override after the switch) is refused.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from omniopd.config.base import Section

log = logging.getLogger(__name__)

DEFAULT_TEACHER_TYPE = "privileged"


class RuntimeOptions(Section):
    """What every API backend shares (``teachers.runtime``); pass them as keyword arguments to any backend."""

    max_concurrency: int = Field(
        16, ge=1, description="HTTP requests in flight at once, across all trajectories (the ceiling)"
    )
    adaptive_concurrency: bool = Field(
        True, description="shrink the requests in flight on timeouts/429s/slow answers, grow them back"
    )
    min_concurrency: int = Field(1, ge=1, description="the adaptive limit's floor (and where it starts)")
    timeout_s: float = Field(120.0, gt=0.0, description="per request; a timeout is retried")
    max_retries: int = Field(
        5, ge=0, description="retries after the first attempt; then the request fails with ``error``"
    )
    backoff_base_s: float = Field(1.0, ge=0.0, description="first backoff; doubles each retry, jittered to [d/2, d]")
    backoff_max_s: float = Field(60.0, ge=0.0, description="backoff ceiling")
    max_retry_after_s: float = Field(300.0, ge=0.0, description="ceiling on a server's Retry-After")
    max_topup_rounds: int = Field(
        2, ge=0, description="rounds of one-sample top-ups when a server returns fewer than n"
    )
    dispatch: Literal["warm_first", "sequential", "parallel"] = Field(
        "warm_first", description="order of one trajectory's requests"
    )
    # USD per million tokens, for teacher/cost_usd and max_cost_usd; None: the price table (teachers.prices) for a
    # known model, else 0 (input/output) or the input price times the provider's cache multiplier (cached/write)
    price_input_per_mtok: float | None = Field(None, ge=0.0, description="prompt tokens billed in full")
    price_output_per_mtok: float | None = Field(None, ge=0.0, description="generated tokens")
    price_cached_input_per_mtok: float | None = Field(
        None, ge=0.0, description="prompt tokens read from the provider's cache"
    )
    price_cache_write_per_mtok: float | None = Field(
        None, ge=0.0, description="prompt tokens written to it (Anthropic: 1.25x)"
    )
    prompt_cache: bool = Field(
        True, description="shape requests for the provider's prompt cache (teachers.prompt_cache)"
    )
    prompt_cache_min_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "the shortest prefix the provider caches (where Anthropic breakpoints go; what `omniopd estimate`"
            " assumes); None: the model's documented one (teachers.prices)"
        ),
    )
    max_cost_usd: float | None = Field(
        None, gt=0.0, description="stop the run cleanly once the estimated cost reaches this"
    )
    max_total_tokens: int | None = Field(None, gt=0, description="stop once input+output teacher tokens reach this")
    cache_path: str | None = Field(None, description="the SQLite response cache file; None: no cache")

    @model_validator(mode="after")
    def _concurrency_range(self) -> RuntimeOptions:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(
                f"teacher.min_concurrency: must be <= teacher.max_concurrency ({self.max_concurrency}), "
                f"got {self.min_concurrency}"
            )
        return self


class _TeacherBase(Section):
    """A text-continuation oracle: "continue this prefix, n samples, about this many tokens"."""

    # fields the run reads itself (the audit's sampling spec); every other field is a backend keyword argument
    run_fields: ClassVar[frozenset[str]] = frozenset({"type", "temperature", "top_p", "max_new_tokens"})

    type: str
    model: str | None = Field(
        None, description="local: None = the student's own base model; API: the served model name"
    )
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, gt=0, description="None: audit.chunk_tokens teacher tokens")

    def backend_options(self) -> dict[str, Any]:
        """The backend's keyword arguments: every field but ``run_fields``, by name."""
        return self.model_dump(exclude=set(self.run_fields))


class _InProcessTeacher(_TeacherBase):
    """A Hugging Face model run in-process (``teachers.local``); its log-probabilities can be read (method=opd)."""

    run_fields: ClassVar[frozenset[str]] = _TeacherBase.run_fields | {"model"}  # the factory resolves the model

    batch_size: int = Field(32, gt=0, description="sequences per teacher generate call")
    reuse_prefix: bool = Field(True, description="one prefill shared by the N samples of a chunk")
    share_prefixes: bool = Field(
        False, description="also share prefill across the nested prompts of a generate call (with reuse_prefix)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class LocalTeacherConfig(_InProcessTeacher):
    type: Literal["local"] = "local"


class PrivilegedTeacherConfig(_InProcessTeacher):
    """The model also reads the dataset's reference solution (self-distillation with privileged information)."""

    type: Literal["privileged"] = "privileged"


class LlamaCppTeacherConfig(_TeacherBase):
    """A GGUF model run in-process by llama.cpp (``teachers.llamacpp``): raw sampling at temperature and top_p."""

    run_fields: ClassVar[frozenset[str]] = _TeacherBase.run_fields | {"model", "cache"}  # resolved by the factory

    type: Literal["llamacpp"] = "llamacpp"
    privileged: bool = Field(
        False, description="also show the dataset's reference solution (the default recipe's teacher)"
    )
    n_ctx: int = Field(
        16384, ge=64, description="cache cells shared by the sequences decoded together (a call is split in waves)"
    )
    n_parallel: int = Field(64, ge=1, le=256, description="most sequences decoded together")
    n_batch: int = Field(1024, ge=8, description="most tokens in one llama_decode call")
    n_threads: int | None = Field(None, ge=1, description="None: every core this process may use")
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to the GPU (-1: all) with a CUDA or Metal build")
    flash_attn: bool = False
    share_prefixes: bool = Field(
        True, description="a request takes the longest prompt prefix already prefilled for another"
    )
    cache: bool = Field(
        True, description="the persistent response cache: reruns and resumes read the same continuations"
    )
    cache_path: str | None = Field(None, description="with cache: the file; None = $OMNIOPD_CACHE/teacher-cache.sqlite")
    max_total_tokens: int | None = Field(
        None, gt=0, description="stop once prompt + generated teacher tokens reach this"
    )


class APITeacherConfig(RuntimeOptions, _TeacherBase):
    """An HTTP teacher (``teachers.runtime`` and one ``*_backend`` module per type).

    API keys are read from the environment variable named by ``api_key_env`` and are never written anywhere.
    """

    run_fields: ClassVar[frozenset[str]] = _TeacherBase.run_fields | {"cache"}  # cache -> cache_path: the factory

    privileged: bool = Field(False, description="also show the dataset's reference solution")
    base_url: str | None = Field(None, description="None: the provider's own endpoint")
    api_key_env: str | None = Field(
        None, description="the environment variable holding the key (each type names its default)"
    )
    max_tokens_factor: float = Field(1.0, gt=0.0, description="output allowance per request = ceil(C * factor)")
    cache: bool = Field(True, description="persistent SQLite cache of responses: reruns and resumes do not pay twice")
    cache_path: str | None = Field(None, description="with cache: the file; None = $OMNIOPD_CACHE/teacher-cache.sqlite")

    @model_validator(mode="after")
    def _needs_model(self) -> APITeacherConfig:
        if not self.model:
            raise ValueError(f"teacher.model: required for teacher.type={self.type} (the model name the API serves)")
        if not self.prompt_cache and self.type != "anthropic":  # only the Anthropic backend shapes its requests
            raise ValueError(
                f"teacher.prompt_cache: teacher.type={self.type} caches prompts on the provider's side by "
                "itself, which a client cannot switch off; only teacher.type=anthropic reads this key"
            )
        return self


class _OpenAITeacher(APITeacherConfig):
    api_key_env: str = "OPENAI_API_KEY"
    max_n_per_request: int | None = Field(
        None, ge=1, description="most samples asked in one request (n); None: all N at once"
    )
    send_seed: bool = Field(True, description="a per-request seed (servers treat it as best effort)")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="extra JSON fields sent verbatim (e.g. {top_k: -1})"
    )


class OpenAICompletionsTeacherConfig(_OpenAITeacher):
    """``/v1/completions``, completion protocol: the raw prefix (vLLM, SGLang, llama.cpp, transformers serve)."""

    backend: ClassVar[tuple[str, str, str]] = (
        "omniopd.teachers.openai_backend",
        "OpenAICompletionsTeacher",
        "openai",
    )  # module, class, SDK extra

    type: Literal["openai-completions"] = "openai-completions"
    tokenizer: str | None = Field(
        None, description="the tokenizer whose chat template frames the prefix; None: a plain template"
    )
    strip_bos: bool = Field(True, description="drop the template's BOS (the server's tokenizer adds its own)")
    stop: list[str] | None = Field(
        None, description="stop sequences; None: none with a chat template, a plain-frame stop without"
    )


class OpenAIChatTeacherConfig(_OpenAITeacher):
    """``/v1/chat/completions``, instruct protocol (chat-only APIs)."""

    backend: ClassVar[tuple[str, str, str]] = (
        "omniopd.teachers.openai_backend",
        "OpenAIChatTeacher",
        "openai",
    )  # module, class, SDK extra

    type: Literal["openai-chat"] = "openai-chat"
    max_tokens_factor: float = Field(1.5, gt=0.0, description="room for a preamble that is stripped")
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = Field(
        "max_completion_tokens", description="older servers"
    )
    send_sampling_params: bool = Field(True, description="send temperature/top_p; False for models that reject them")
    reasoning_effort: str | None = Field(
        None, description="passed through when set (reasoning models spend output on thinking)"
    )


class AnthropicTeacherConfig(APITeacherConfig):
    """Messages API, prefill protocol (one sample per request)."""

    backend: ClassVar[tuple[str, str, str]] = (
        "omniopd.teachers.anthropic_backend",
        "AnthropicTeacher",
        "anthropic",
    )  # module, class, SDK extra

    type: Literal["anthropic"] = "anthropic"
    api_key_env: str = "ANTHROPIC_API_KEY"
    send_sampling_params: bool = Field(
        False, description="the current API rejects temperature/top_p; True for compatible servers"
    )
    extra_body: dict[str, Any] = Field(default_factory=dict)


class GeminiTeacherConfig(APITeacherConfig):
    """Google GenAI ``generateContent``, instruct protocol."""

    backend: ClassVar[tuple[str, str, str]] = (
        "omniopd.teachers.gemini_backend",
        "GeminiTeacher",
        "gemini",
    )  # module, class, SDK extra

    type: Literal["gemini"] = "gemini"
    api_key_env: str | None = Field(None, description="None: GEMINI_API_KEY, then GOOGLE_API_KEY")
    api_version: str | None = Field(None, description="e.g. v1beta; None: the SDK's default")
    max_n_per_request: int = Field(
        8, ge=1, description="candidate_count per request; 1 for models without several candidates"
    )
    send_seed: bool = True
    send_sampling_params: bool = True
    thinking_budget: int | None = Field(0, description="0: no thinking; None: the model's default")
    max_tokens_factor: float = Field(1.5, gt=0.0)


TEACHER_CLASSES: dict[str, type[_TeacherBase]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        LocalTeacherConfig,
        PrivilegedTeacherConfig,
        LlamaCppTeacherConfig,
        OpenAICompletionsTeacherConfig,
        OpenAIChatTeacherConfig,
        AnthropicTeacherConfig,
        GeminiTeacherConfig,
    )
}
TEACHER_TYPES = tuple(TEACHER_CLASSES)
API_TEACHER_TYPES = tuple(t for t, c in TEACHER_CLASSES.items() if issubclass(c, APITeacherConfig))
WHITE_BOX_TEACHER_TYPES = tuple(t for t, c in TEACHER_CLASSES.items() if issubclass(c, _InProcessTeacher))
IN_PROCESS_TEACHER_TYPES = (*WHITE_BOX_TEACHER_TYPES, "llamacpp")  # teacher.model names a model file, not a served one
_ALL_FIELDS = frozenset(f for c in TEACHER_CLASSES.values() for f in c.model_fields)


def _type_of(data: dict[str, Any]) -> Any:
    return data.get("type", DEFAULT_TEACHER_TYPE)


def check_keys(data: Any) -> Any:
    """The ``teacher:`` mapping with its type filled in, or a one-line ``ValueError`` for a key that the chosen type
    does not use. Runs before the union is validated (a model instance passes as is)."""
    if not isinstance(data, dict):
        return data
    kind = _type_of(data)
    if kind not in TEACHER_TYPES:
        allowed = ", ".join(repr(t) for t in TEACHER_TYPES[:-1]) + f" or {TEACHER_TYPES[-1]!r}"
        raise ValueError(f"teacher.type: Input should be {allowed} (got {kind!r})")
    fields = TEACHER_CLASSES[kind].model_fields
    for key in data:
        if key in _ALL_FIELDS and key not in fields:
            raise ValueError(f"teacher.{key} is not used by teacher.type={kind}")
    return {**data, "type": kind}


TeacherConfig = Annotated[
    LocalTeacherConfig
    | PrivilegedTeacherConfig
    | LlamaCppTeacherConfig
    | OpenAICompletionsTeacherConfig
    | OpenAIChatTeacherConfig
    | AnthropicTeacherConfig
    | GeminiTeacherConfig,
    Field(discriminator="type"),
    BeforeValidator(check_keys),
]


def switch_type(before: Any, after: Any, written: set[str]) -> Any:
    """``after`` (the teacher mapping once an override was applied to ``before``) without the fields the old
    type had and the new type lacks, when the override changed ``teacher.type``; ``written`` are the keys the
    override itself set (never dropped: a key set with the new type is checked against it)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return after
    old, new = _type_of(before), _type_of(after)
    if old == new or old not in TEACHER_TYPES or new not in TEACHER_TYPES:
        return after
    old_fields, new_fields = TEACHER_CLASSES[old].model_fields, TEACHER_CLASSES[new].model_fields
    if old == "privileged" and "privileged" in new_fields and "privileged" not in written:
        log.warning("teacher.type=%s (was privileged): teacher.privileged=true keeps the reference in the prompt", new)
        after = {**after, "privileged": True}
    dropped = [k for k in after if k not in written and k in old_fields and k not in new_fields]
    if not dropped:
        return after
    log.warning(
        "teacher.type=%s (was %s): dropping %s, not used by teacher.type=%s",
        new,
        old,
        ", ".join(f"teacher.{k}" for k in dropped),
        new,
    )
    return {k: v for k, v in after.items() if k not in dropped}


def option_error(err: ValidationError) -> str:
    """One line for a bad backend keyword argument (``RuntimeOptions`` validated outside the config)."""
    e = err.errors()[0]
    name = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"unexpected keyword argument {name!r}"
    if not name:  # a check across fields (min_concurrency <= max_concurrency): its message names them
        return str(e.get("ctx", {}).get("error", e["msg"]))
    return f"{name}: {e['msg']} (got {e.get('input')!r})"
