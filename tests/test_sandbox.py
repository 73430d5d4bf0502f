"""Containment tests of omniopd.evaluation.sandbox.

Each hostile program must come back as a failure result for that program (never an exception, never
harm to this process or the machine), and the next program in the batch must still grade. Tests
marked ``needs_isolation`` check the kernel layers alone (``python_guards=False``) and are skipped where
isolated mode is unavailable (not root, no ``unshare``); the others run in both modes (isolated, the
default and required one, and the unisolated mode a caller has to ask for).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from conftest import loopback_server
from omniopd.evaluation import sandbox
from omniopd.evaluation.sandbox import (
    SANDBOX_UID_BASE,
    SANDBOX_UID_COUNT,
    STATUSES,
    SandboxLimits,
    SandboxResult,
    isolation_available,
    run_many,
    run_python,
)

ISOLATED, WHY_NOT = isolation_available()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"isolated mode unavailable: {WHY_NOT}")
MODES = [pytest.param(True, id="isolated", marks=needs_isolation), pytest.param(False, id="unisolated")]

OK = "print('still grading')"
FAST = {"timeout": 5.0, "memory_mb": 512}


def check_carries_on(results: list[SandboxResult]) -> None:
    """The benign program after a hostile one still passes."""
    last = results[-1]
    assert last.passed and last.status == "passed", last
    assert last.stdout == "still grading"
    for r in results:
        assert r.status in STATUSES


def sandbox_processes() -> list[int]:
    """Pids of live (not zombie) processes running as a sandbox uid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_COUNT and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(entry))
    return found


# ---------------------------------------------------------------------------------------------------
# Basics.


@pytest.mark.parametrize("isolate", MODES)
def test_pass_fail_and_exit_codes(isolate):
    limits = SandboxLimits(isolate=isolate, **FAST)
    results = run_many(
        [
            "x = 2 + 2\nprint(x)",
            "assert 1 == 2, 'arithmetic is broken'",
            "import sys\nsys.exit(0)\n",  # an early exit is not a pass
            "import os\nos._exit(0)\n",
            "def f(:\n  pass",
            OK,
        ],
        limits,
    )
    ok, assertion, early_exit, hard_exit, syntax, _ = results
    assert ok.passed and ok.stdout == "4" and ok.detail == ""
    assert assertion.status == "failed" and "AssertionError: arithmetic is broken" in assertion.detail
    assert early_exit.status == "failed" and "exited before it finished" in early_exit.detail
    assert hard_exit.status == "failed" and not hard_exit.passed
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail
    check_carries_on(results)
    if isolate:
        assert {"netns", "pidns", "mountns", "minimal-root", "read-only-fs", "uid", "no-capabilities",
                "python-guards"} <= set(ok.isolation)
    if isolate is False:
        assert ok.isolation == ("python-guards",)


def test_detail_is_truncated():
    limits = SandboxLimits(output_chars=500, **FAST)
    r = run_python("import sys\nsys.stderr.write('x' * 100000)\nraise ValueError('boom')", limits)
    assert r.status == "failed" and len(r.detail) <= 500 and r.detail.endswith("ValueError: boom")


def test_isolation_required_but_unavailable(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_result", (False, "switched off by the test"))
    r = run_python(OK, SandboxLimits(isolate=True))
    assert r.status == "error" and "switched off by the test" in r.detail


# ---------------------------------------------------------------------------------------------------
# Time.


@pytest.mark.parametrize("isolate", MODES)
def test_infinite_loop_times_out_and_next_program_grades(isolate):
    start = time.monotonic()
    results = run_many(["while True:\n    pass\n", OK], SandboxLimits(timeout=1.5, isolate=isolate), max_workers=1)
    loop = results[0]
    assert loop.status == "timeout" and not loop.passed
    assert "wall-clock limit" in loop.detail
    assert 1.4 < loop.seconds < 5
    assert time.monotonic() - start < 10
    check_carries_on(results)


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout=20, cpu_seconds=1))
    assert r.status == "timeout" and "CPU time" in r.detail
    assert r.seconds < 10


def test_sleeping_program_hits_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", SandboxLimits(timeout=1.0))
    assert r.status == "timeout" and r.seconds < 5


# ---------------------------------------------------------------------------------------------------
# Memory.


@pytest.mark.parametrize("isolate", MODES)
def test_memory_bomb_is_contained(isolate):
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))\n"
    limits = SandboxLimits(timeout=20, memory_mb=256, isolate=isolate)
    results = run_many([bomb, "x = bytearray(10 ** 12)", OK], limits, max_workers=1)
    for r in results[:2]:
        assert r.status in ("failed", "killed") and not r.passed, r
        assert r.seconds < 15  # stopped by the memory limit, not by the clock
    assert "MemoryError" in results[0].detail
    check_carries_on(results)


# ---------------------------------------------------------------------------------------------------
# Processes.


@pytest.mark.parametrize("isolate", MODES)
def test_fork_bomb_is_contained(isolate):
    bomb = "import os\nwhile True:\n    os.fork()\n"
    spawn = "import subprocess\nsubprocess.run(['sh', '-c', 'echo escaped'])\n"
    system = "import os\nos.system('echo escaped')\n"
    results = run_many([bomb, spawn, system, OK], SandboxLimits(isolate=isolate, **FAST), max_workers=1)
    for r in results[:3]:
        assert r.status == "failed" and "PermissionError" in r.detail and "disabled" in r.detail, r
        assert "escaped" not in r.stdout
    check_carries_on(results)


@needs_isolation
def test_fork_bomb_without_python_guards_is_capped_by_the_kernel():
    # os.fork works here, so only RLIMIT_NPROC (the sandbox's own uid) and the PID namespace hold it.
    program = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print(n, exc.errno)\n"
    )
    limits = SandboxLimits(timeout=10, max_processes=12, python_guards=False, isolate=True)
    results = run_many([program, OK], limits, max_workers=1)
    forks, errno = map(int, results[0].stdout.split())
    assert results[0].passed
    assert forks <= 10 and errno == 11  # EAGAIN: PID 1 + worker + forks <= 12
    check_carries_on(results)
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []  # the sleeping children died with the namespace


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_process_group_is_killed_afterwards_in_fallback_mode():
    program = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid)\n"
    )
    r = run_python(program, SandboxLimits(python_guards=False, isolate=False, **FAST))
    assert r.passed
    child = int(r.stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except OSError:
            break  # gone
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child} of the sandbox outlived the run")


@needs_isolation
def test_cannot_signal_processes_outside():
    program = f"import os\nos.kill({os.getpid()}, 9)\n"
    r = run_python(program, SandboxLimits(python_guards=False, isolate=True, **FAST))
    assert r.status == "failed" and "ProcessLookupError" in r.detail  # not even visible
    assert os.getpid()  # and we are alive


# ---------------------------------------------------------------------------------------------------
# Network.


@pytest.fixture()
def listener():
    """A TCP server on 127.0.0.1 that records whether anyone connected."""
    with loopback_server() as server:
        yield server


def _connect_program(port: int) -> str:
    return f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"


@pytest.mark.parametrize("isolate", MODES)
def test_network_is_unreachable(isolate, listener):
    port, hits = listener
    # sanity: the listener works from here
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    time.sleep(0.3)
    assert hits == ["connected"]
    hits.clear()
    resolve = "import socket\nprint(socket.getaddrinfo('example.com', 80))\n"
    results = run_many([_connect_program(port), resolve, OK], SandboxLimits(isolate=isolate, **FAST), max_workers=1)
    for r in results[:2]:
        assert r.status == "failed" and "connected" not in r.stdout, r
    time.sleep(0.3)
    assert hits == []
    check_carries_on(results)


@needs_isolation
def test_network_namespace_without_python_guards(listener):
    port, hits = listener
    limits = SandboxLimits(python_guards=False, isolate=True, **FAST)
    r = run_python(_connect_program(port), limits)
    assert r.status == "failed" and "Network is unreachable" in r.detail
    interfaces = run_python("print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))", limits)
    assert interfaces.stdout == "['lo']"
    time.sleep(0.3)
    assert hits == []


def test_socket_module_is_blocked_in_fallback_mode():
    r = run_python("import socket", SandboxLimits(isolate=False, **FAST))
    assert r.status == "failed" and "socket" in r.detail


# ---------------------------------------------------------------------------------------------------
# Environment.


@pytest.mark.parametrize("isolate", MODES)
def test_parent_environment_is_not_visible(isolate, monkeypatch):
    monkeypatch.setenv("OMNIOPD_SANDBOX_TEST_SECRET", "hunter2")
    program = (
        "import os\n"
        "print(os.environ.get('OMNIOPD_SANDBOX_TEST_SECRET'))\n"
        "print(open('/proc/self/environ', 'rb').read().count(b'hunter2'))\n"
        "print(os.environ['HOME'] == os.getcwd())\n"
    )
    r = run_python(program, SandboxLimits(isolate=isolate, **FAST))
    assert r.passed, r
    assert r.stdout.splitlines() == ["None", "0", "True"]
    assert "hunter2" not in r.stdout


# ---------------------------------------------------------------------------------------------------
# Files.


def _write_programs(target: Path) -> list[str]:
    return [
        f"open({str(target)!r}, 'w').write('escaped')\n",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'escaped')\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('escaped')\n",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('escaped')\n",
        f"import shutil\nopen('inside.txt', 'w').write('escaped')\nshutil.copy('inside.txt', {str(target)!r})\n",
    ]


@pytest.mark.parametrize("isolate", MODES)
def test_writes_outside_the_working_directory_are_refused(isolate, tmp_path):
    target = tmp_path / "escape.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    programs = _write_programs(target) + [
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.rename({str(victim)!r}, 'stolen')\n",
        f"import os\nos.chmod({str(victim)!r}, 0o777)\n",
        OK,
    ]
    results = run_many(programs, SandboxLimits(isolate=isolate, **FAST), max_workers=2)
    for r in results[:-1]:
        assert r.status == "failed" and not r.passed, r
        assert "PermissionError" in r.detail or "Read-only" in r.detail
    assert not target.exists()
    assert victim.read_text() == "keep me"
    assert oct(victim.stat().st_mode & 0o777) != oct(0o777)
    check_carries_on(results)


@needs_isolation
def test_read_only_filesystem_without_python_guards(tmp_path):
    target = tmp_path / "escape.txt"
    programs = _write_programs(target) + [
        "open('/tmp/omniopd-sandbox-escape-test', 'w').write('x')\n",
        "open('/dev/shm/omniopd-sandbox-escape-test', 'w').write('x')\n",
        OK,
    ]
    results = run_many(programs, SandboxLimits(python_guards=False, isolate=True, **FAST), max_workers=2)
    for r in results[:-1]:
        assert r.status == "failed", r
        # the paths are not in the sandbox's view at all (a new root), or read-only where they are
        assert any(e in r.detail for e in ("No such file or directory", "Read-only file system", "Permission denied"))
    assert not target.exists()
    assert not Path("/tmp/omniopd-sandbox-escape-test").exists()
    assert not Path("/dev/shm/omniopd-sandbox-escape-test").exists()
    check_carries_on(results)


@pytest.mark.parametrize("isolate", MODES)
def test_working_directory_is_writable_and_fresh(isolate):
    program = (
        "import os, tempfile\n"
        "print(os.listdir('.'))\n"
        "with open('data.txt', 'w') as fh:\n"
        "    fh.write('hello')\n"
        "os.mkdir('sub')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as fh:\n"
        "    fh.write('x')\n"
        "print(open('data.txt').read(), os.path.dirname(fh.name) == os.getcwd())\n"
    )
    limits = SandboxLimits(isolate=isolate, **FAST)
    first, second = run_many([program, program], limits, max_workers=1)
    assert first.passed and second.passed, (first, second)
    assert first.stdout.splitlines() == ["[]", "hello True"]
    assert second.stdout.splitlines()[0] == "[]"  # nothing left over from the first run


@needs_isolation
def test_file_size_is_capped():
    program = "with open('big', 'wb') as fh:\n    while True:\n        fh.write(b'x' * 2**20)\n"
    r = run_python(program, SandboxLimits(max_file_mb=4, python_guards=False, isolate=True, **FAST))
    assert r.status in ("killed", "failed") and not r.passed, r
    assert r.seconds < 5


# ---------------------------------------------------------------------------------------------------
# Concurrency.


def test_run_many_bounds_concurrency_and_keeps_order():
    program = "import time\nstart = time.time()\ntime.sleep(0.4)\nprint(start, time.time(), {i})\n"
    results = run_many([program.format(i=i) for i in range(6)], SandboxLimits(**FAST), max_workers=2)
    intervals = []
    for i, r in enumerate(results):
        assert r.passed, r
        start, end, index = r.stdout.split()
        assert int(index) == i
        intervals.append((float(start), float(end)))
    most = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert most <= 2


def test_limits_are_validated():
    with pytest.raises(ValueError):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError):
        SandboxLimits(memory_mb=0)
