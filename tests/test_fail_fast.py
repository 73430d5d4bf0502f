"""A teacher that cannot be reached, or refuses every request, ends `omniopd train` in seconds with exit 2 and one
line naming the URL or model and the cause; such errors are never retried."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config, tiny_run_files

pytest.importorskip("openai")

from omniopd.teachers.base import ContinuationRequest, SamplingSpec  # noqa: E402
from omniopd.teachers.openai_backend import OpenAIChatTeacher, OpenAICompletionsTeacher  # noqa: E402
from omniopd.teachers.retry import classify_exception  # noqa: E402
from omniopd.testing.fake_providers import FakeProviderServer, Fault  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_KEY_ENV = "OMNIOPD_TEST_UNSET_KEY"
REQUEST = [ContinuationRequest(question="What is 2 + 3?", prefix="We add ", trajectory=0)]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake():
    with FakeProviderServer() as server:
        yield server


def train_cli(tmp_path: Path, base_url: str) -> tuple[subprocess.CompletedProcess, float]:
    """`omniopd train` on the tiny model with an openai-completions teacher at ``base_url``; (process, seconds)."""
    model_dir, data = tiny_run_files(tmp_path)
    cfg = tiny_run_config(model_dir, data, tmp_path / "run")
    cfg["teacher"] = {"type": "openai-completions", "model": "fake-teacher", "base_url": base_url,
                      "api_key_env": NO_KEY_ENV, "cache": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop(NO_KEY_ENV, None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(recipe), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc, time.perf_counter() - started


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("omniopd: error:")]
    return line


def test_an_unreachable_url_ends_the_run_in_seconds(tmp_path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    proc, seconds = train_cli(tmp_path, url)
    line = one_error_line(proc)
    assert url in line and "cannot be reached: connection refused" in line and "teacher.base_url" in line
    assert seconds < 15, f"{seconds:.1f} s"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no training step was taken


@pytest.mark.parametrize(("status", "needles"), [
    (401, ("HTTP 401", f"${NO_KEY_ENV}")),
    (404, ("HTTP 404", "fake-teacher", "check teacher.model and teacher.base_url")),
    (400, ("rejected the request: HTTP 400", "extra_body")),
])
def test_a_key_model_or_request_the_server_refuses_ends_the_run_in_seconds(tmp_path, fake, status, needles) -> None:
    fake.clear()
    fake.inject(*[Fault.server_error(status, route="openai.completions")] * 50)
    proc, seconds = train_cli(tmp_path, fake.url + "/v1")
    line = one_error_line(proc)
    assert fake.url in line and all(n in line for n in needles), line
    assert seconds < 15, f"{seconds:.1f} s"
    assert fake.count("openai.completions") <= 2  # the check's 2 prefixes, at most one request each: none retried
    fake.clear()


def test_a_refused_connection_is_not_retried_and_names_the_url(monkeypatch) -> None:
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with OpenAICompletionsTeacher("m", base_url=url, api_key_env=NO_KEY_ENV) as teacher:
        [result] = teacher.continue_prefixes(REQUEST, SamplingSpec(n=2, max_new_tokens=4))
        metrics = teacher.metrics()
        reason = teacher.unusable_reason()
    assert result.error == "connection refused (after 1 attempt)"
    assert metrics["teacher/requests"] == 1 and metrics["teacher/retries"] == 0
    assert reason == (f"teacher openai-completions:m at {url} cannot be reached: connection refused "
                      "(is the server running? check teacher.base_url)")


def test_a_teacher_that_has_answered_is_not_called_unusable(fake, monkeypatch) -> None:
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    fake.clear()
    with OpenAIChatTeacher("m", base_url=fake.url + "/v1", api_key_env=NO_KEY_ENV) as teacher:
        assert teacher.continue_prefixes(REQUEST, SamplingSpec(n=1, max_new_tokens=4))[0].ok
        fake.inject(Fault.server_error(400, route="openai.chat"))
        [result] = teacher.continue_prefixes(REQUEST, SamplingSpec(n=1, max_new_tokens=4, seed=1))
        assert result.error is not None and "HTTP 400" in result.error
        assert teacher.unusable_reason() is None  # one rejected request of a working teacher drops one chunk
    fake.clear()


class _Status(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status_code = status


@pytest.mark.parametrize(("status", "retryable", "fatal", "overload", "permanent"), [
    (400, False, False, False, True),
    (401, False, True, False, True),
    (403, False, True, False, True),
    (404, False, True, False, True),
    (422, False, False, False, True),
    (429, True, False, True, False),
    (500, True, False, False, False),
    (503, True, False, True, False),
    (529, True, False, True, False),
])
def test_http_statuses_are_classified(status, retryable, fatal, overload, permanent) -> None:
    f = classify_exception(_Status(status), ())
    assert (f.retryable, f.fatal, f.overload, f.permanent) == (retryable, fatal, overload, permanent)


def test_a_reset_is_retried_as_overload_but_a_refusal_is_not() -> None:
    class Transient(Exception):
        pass

    reset = Transient("Connection error.")
    reset.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    refused = Transient("Connection error.")
    refused.__cause__ = OSError("All connection attempts failed")
    refused.__cause__.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    f = classify_exception(reset, (Transient,))
    assert f.retryable and f.overload and not f.permanent
    f = classify_exception(refused, (Transient,))
    assert not f.retryable and f.permanent and f.message == "connection refused"
    assert classify_exception(TimeoutError(), ()).overload
