"""Shared fixtures: tiny random Llama models built from a config (no download), and the data folder."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def tiny_llama(vocab_size: int = 96, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def char_tokenizer(extra_chars: str = ""):
    """A real ``PreTrainedTokenizerFast`` (word-level over characters) with a ChatML template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(" \n\t.,:;!?'\"#()+-*/=$%<>_|{}[]0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + extra_chars))
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def tiny_run_files(tmp_path: Path, rows: int = 8) -> tuple[Path, Path]:
    """A tiny random Llama + character tokenizer saved under ``tmp_path/tiny``, and a small addition
    dataset ``tmp_path/train.jsonl``: what a training run on the tiny model needs."""
    import json

    tok = char_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    lines = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(1, rows + 1)]
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return model_dir, data


def tiny_run_config(model_dir: Path, data: Path, out: Path, *, lr: float = 5e-2, **sections) -> dict:
    """A 2-step OmniOPD run of the tiny model on ``data`` (privileged teacher, C=4, M=2, N=3, 2 prompts x
    2 samples, no evaluation) as a config dict; each keyword merges into its section (or sets a scalar)."""
    cfg = {
        "output_dir": str(out), "max_steps": 2, "seed": 0, "student": {"name": str(model_dir)},
        "teacher": {"type": "privileged", "batch_size": 16},
        "audit": {"chunk_tokens": 4, "num_chunks": 2, "teacher_samples": 3},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 20, "batch_size": 8},
        "optim": {"lr": lr, "prompts_per_step": 2, "micro_batch_size": 2},
        "data": {"train": str(data)},
        "eval": {"data": str(data), "limit": 2, "max_new_tokens": 8, "before": False, "after": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from omniopd.data import shared_data_dir

    return shared_data_dir()


@pytest.fixture()
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + character tokenizer saved as a HF directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@contextlib.contextmanager
def loopback_server(reply: bytes = b""):
    """A TCP server on 127.0.0.1 that records each connection (and sends ``reply``): yields (port, hits)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    hits: list[str] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            hits.append("connected")
            if reply:
                conn.sendall(reply)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], hits
    finally:
        stop.set()
        thread.join(2)
        server.close()


@pytest.fixture()
def gsm8k_like(tmp_path):
    """A small GSM8K-style training file (question, worked answer ending in ``#### n``)."""
    import json

    path = tmp_path / "train.jsonl"
    rows = [
        {"question": f"Tom has {i} apples and buys {i + 1} more. How many now?", "answer": f"{i}+{i + 1}={2 * i + 1}\n#### {2 * i + 1}"}
        for i in range(1, 9)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, log_path: Path, name: str, timeout_s: float = 120.0, env=None):
    """Start ``cmd`` (its output to ``log_path``), wait until ``ready_url`` answers 200, yield the seconds it took to
    come up, and stop it (terminate, then kill). A server that exits or is not up in ``timeout_s`` fails the test
    with the end of its log."""
    import subprocess
    import time
    import urllib.request

    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > timeout_s:
                pytest.fail(f"{name} not up after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield time.perf_counter() - started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
