"""Run untrusted Python (model-written code) in a separate, resource-limited, file-blind process.

:func:`run_python` runs one program to its end and returns a :class:`SandboxResult`; :func:`run_many`
and :func:`parallel_map` run many with a bounded number of workers; :class:`SandboxProcess` starts one
sandboxed program with a message channel to the parent (the grader's judge and candidate processes,
:mod:`omniopd.evaluation.verdict`). A program run by :func:`run_python` *passes* when it runs to its
end without an uncaught exception; ``sys.exit()``, ``os._exit()``, a crash, a signal or a limit all
count as failures, and grading carries on with the next program.

**Isolated mode** (the default, and required: Linux, running as root, util-linux ``unshare`` works;
probed once per process). The child is ``unshare --net --pid --mount --ipc --uts --fork --kill-child
PYTHON -I -S -B``, with PYTHON the base interpreter (never a virtual environment's), and the trusted
bootstrap :mod:`omniopd.evaluation.sandbox_boot` sets it up before any untrusted code runs (its
docstring lists the steps). Guaranteed there, by the kernel:

* **reads**: the process sees a new root holding only the Python runtime (interpreter, its shared
  library, the standard library with ``site-packages`` hidden, the system library directories),
  four ``/dev`` nodes, its own ``/proc`` and an empty ``/sandbox`` working directory. Datasets, the
  project, run directories, home directories and every other file of the machine are not in its view;
  and with no capability left it could not read root-only files even if they were;
* **no capabilities** in any set, a dedicated unprivileged uid (one per concurrent run, from a pool of
  ``SANDBOX_UID_COUNT`` uids from ``SANDBOX_UID_BASE``, skipping any with a passwd entry) and
  ``no_new_privs``, checked inside the child before the program runs;
* **writes** only in ``/sandbox`` (a tmpfs of ``max_file_mb``, no exec): everything else is read-only;
* **no network** at all (a new network namespace with only a loopback that is down);
* at most ``max_processes`` processes and threads, CPU time and address space per process as set,
  ``max_file_mb`` per file and of captured output; no signals to processes outside (a new PID
  namespace); nothing survives the run (PID 1 of the namespace ends with it); a fixed minimal
  environment, nothing inherited from the parent.

When isolated mode is unavailable a run that requires it (the default) gets ``status='error'`` with
the reason, and the code graders refuse to grade (:class:`IsolationUnavailable`).

**Without isolation** (only when asked for: ``SandboxLimits(isolate=False)``, which the graders expose
as ``insecure_no_isolation``): ``python -I -S -B`` in a new session with the same rlimits but
``RLIMIT_NPROC``. Then only the minimal environment, the wall-clock limit, CPU time and address space
per process, the size of each file and the killing of the process group afterwards are guaranteed;
the program can read every file the calling user can, and everything else rests on the Python-level
guards, which stop honest mistakes, not an adversary.

**Python-level guards** (both modes; ``python_guards=False`` turns them off to test the kernel layers
alone): writes, renames and removals outside the working directory, process creation and signals
raise PermissionError, ``ctypes`` cannot be imported, and without isolation ``socket`` cannot either.

Not guaranteed: exact CPU accounting of the wall-clock limit on an overloaded machine. The verdict of
a test is not decided here: :mod:`omniopd.evaluation.verdict` decides it outside the process that ran
the candidate.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from omniopd.errors import OmniOPDError
from omniopd.evaluation.parallel import parallel_map
from omniopd.evaluation.sandbox_boot import STUB

__all__ = [
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_COUNT",
    "STATUSES",
    "IsolationUnavailable",
    "SandboxLimits",
    "SandboxProcess",
    "SandboxResult",
    "isolation_available",
    "require_isolation",
    "run_many",
    "run_python",
    "runtime_view",
]

STATUSES = ("passed", "failed", "timeout", "error", "killed")

# Uids handed to isolated runs, one per concurrent run (uids with a passwd entry are skipped).
SANDBOX_UID_BASE = 62000
SANDBOX_UID_COUNT = 256

_SETUP_ERROR_EXIT = 97
_NAMESPACE_FLAGS = ("--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. ``cpu_seconds`` defaults to ``timeout``."""

    timeout: float = 10.0  # wall-clock seconds for the whole run
    cpu_seconds: float | None = None  # RLIMIT_CPU of each process (SIGXCPU, then SIGKILL a second later)
    memory_mb: int = 1024  # RLIMIT_AS of each process
    max_processes: int = 32  # RLIMIT_NPROC (isolated mode): processes and threads, PID 1 included
    max_file_mb: int = 16  # RLIMIT_FSIZE of each file, and the size of the working-directory tmpfs
    max_open_files: int = 256  # RLIMIT_NOFILE
    output_chars: int = 4000  # how much of the output tails is kept in the result
    isolate: bool = True  # True: kernel isolation required (else status 'error'); False: without it (unsafe)
    python_guards: bool = True  # the in-interpreter guards (see the module docstring)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.cpu_seconds is not None and not self.cpu_seconds > 0:
            raise ValueError(f"cpu_seconds must be > 0, got {self.cpu_seconds}")
        for name in ("memory_mb", "max_processes", "max_file_mb", "max_open_files", "output_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run.

    ``status``: ``passed`` (ran to its end), ``failed`` (uncaught exception, or exited early),
    ``timeout`` (wall-clock or CPU limit), ``killed`` (a signal: crash, file-size limit, out of
    memory), ``error`` (the sandbox itself could not run the program).
    """

    passed: bool
    status: str
    detail: str  # why it did not pass (a traceback tail, the limit hit), '' when it passed
    seconds: float  # wall-clock time of the run
    stdout: str = ""  # the tail of what the program printed
    isolation: tuple[str, ...] = ()  # the layers in force, e.g. ('netns', 'pidns', ..., 'uid')
    returncode: int | None = None


# --------------------------------------------------------------------------------------------------
# Parent side.


class IsolationUnavailable(OmniOPDError):
    """Kernel isolation is required but cannot be set up on this machine."""


class _UidPool:
    """Hands out distinct uids to concurrent isolated runs; a released uid goes to the back."""

    def __init__(self, base: int, count: int) -> None:
        self._cond = threading.Condition()
        self._free: collections.deque[int] | None = None
        self._base, self._count = base, count

    def _fill(self) -> collections.deque[int]:
        import pwd

        free: collections.deque[int] = collections.deque()
        for uid in range(self._base, self._base + self._count):
            try:
                pwd.getpwuid(uid)
            except KeyError:
                free.append(uid)
        if not free:
            raise RuntimeError(f"no free sandbox uid in {self._base}..{self._base + self._count - 1}")
        return free

    def acquire(self) -> int:
        with self._cond:
            if self._free is None:
                self._free = self._fill()
            while not self._free:
                self._cond.wait()
            return self._free.popleft()

    def release(self, uid: int) -> None:
        with self._cond:
            assert self._free is not None
            self._free.append(uid)
            self._cond.notify()


_UIDS = _UidPool(SANDBOX_UID_BASE, SANDBOX_UID_COUNT)
_probe_lock = threading.Lock()
_probe_result: tuple[bool, str] | None = None
_SYSTEM_LIB_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")
_WORKDIR_INSIDE = "/sandbox"


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@functools.lru_cache(maxsize=1)
def _interpreter() -> str:
    """The base interpreter (a virtual environment's ``python`` resolved to the one it was made from)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def runtime_view() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a sandboxed process sees: the paths bind-mounted read-only (parents first; symlinks such
    as ``/lib -> usr/lib`` are recreated, not mounted) and the directories hidden under them."""
    paths = [_interpreter()]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and os.path.isfile(os.path.join(libdir, soname)):
            paths.append(os.path.realpath(os.path.join(libdir, soname)))
    stdlib = {os.path.realpath(os.path.dirname(os.__file__))}  # the base's, also from a virtual environment
    dynload = {os.path.realpath(os.path.join(d, "lib-dynload")) for d in stdlib}
    paths += sorted(stdlib | {d for d in dynload if os.path.isdir(d)})
    paths += [d for d in _SYSTEM_LIB_DIRS if os.path.lexists(d)]
    hide: set[str] = set()
    for base in list(stdlib) + [d for d in _SYSTEM_LIB_DIRS if os.path.isdir(d) and not os.path.islink(d)]:
        for pattern in (
            "site-packages",
            "dist-packages",
            "python3*/site-packages",
            "python3*/dist-packages",
            "python3/dist-packages",
        ):
            hide.update(os.path.realpath(p) for p in glob.glob(os.path.join(base, pattern)) if os.path.isdir(p))
    unique = sorted(dict.fromkeys(paths), key=lambda p: (p.count("/"), p))
    return tuple(unique), tuple(sorted(hide))


def isolation_available() -> tuple[bool, str]:
    """Whether isolated mode can be used here, and why not (probed once per process by starting a
    real isolated run)."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _probe()
        return _probe_result


def _unshare() -> str | None:
    return shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)


def _probe() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"Linux namespaces are needed (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "namespaces, a new root and a dedicated uid need root"
    if _unshare() is None:
        return False, "util-linux 'unshare' not found"
    proc = SandboxProcess("pass", SandboxLimits(timeout=30.0), _use_namespaces=True)
    result = proc.run_to_end()
    if result.status != "passed":
        return (
            False,
            f"the isolated sandbox did not start: {result.detail.splitlines()[0] if result.detail else result.status}",
        )
    return True, ""


def require_isolation() -> None:
    """Raise :class:`IsolationUnavailable` with the reason when isolated mode cannot be used."""
    ok, why = isolation_available()
    if not ok:
        raise IsolationUnavailable(why)


def _wait_for_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the child exits, without reaping it (so its pid and group id cannot be reused
    before the group is killed). True when it exited in time."""
    deadline = time.monotonic() + timeout
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if poller.poll(max(1, int(left * 1000))):
                    return True
        finally:
            os.close(pidfd)
    delay = 0.002
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)


def _tail(path: str, limit_bytes: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - limit_bytes))
        data = fh.read()
    return data.decode("utf-8", errors="replace")


def _truncate(text: str, limit: int) -> str:
    text = text.strip("\n")
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3) :]


def _remove_tree(path: str) -> None:
    """rmtree that also copes with directories the program made unreadable (non-isolated mode)."""

    def fix(func, failed, _exc):
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def program_text(name: str) -> str:
    """The source of one of this package's program files (read once per process: every grade sends
    the bootstrap and two programs)."""
    return resources.files("omniopd.evaluation").joinpath(name).read_text(encoding="utf-8")


class SandboxProcess:
    """One sandboxed Python program. ``channel=True`` gives it a message channel (two pipes) to the
    parent: inside, ``omniopd_sandbox.channel`` holds the (read, write) descriptors and
    ``omniopd_sandbox.payload`` the ``payload``; ``modules`` maps module names to source installed
    before the program runs. Use :meth:`run_to_end`, or :meth:`start` and then :meth:`finish`."""

    def __init__(
        self,
        source: str,
        limits: SandboxLimits,
        *,
        payload=None,
        channel: bool = False,
        modules: dict[str, str] | None = None,
        _use_namespaces: bool | None = None,
    ) -> None:
        self.source, self.limits, self.payload, self.modules = source, limits, payload, modules or {}
        self.want_channel = channel
        self._forced_ns = _use_namespaces
        self.proc: subprocess.Popen | None = None
        self.read_fd: int | None = None  # parent reads the child's messages here
        self.write_fd: int | None = None  # parent writes messages to the child here
        self.start_error: str | None = None
        self._result: SandboxResult | None = None
        self._uid: int | None = None
        self._run_root: str | None = None
        self._start = 0.0

    def start(self) -> bool:
        """Start the program; False (with ``start_error``) when it could not be started."""
        limits = self.limits
        if self._forced_ns is not None:
            use_ns, why = self._forced_ns, ""
        elif limits.isolate is False:
            use_ns, why = False, ""
        else:
            use_ns, why = isolation_available()
            if not use_ns:
                self.start_error = f"isolation required but unavailable: {why}"
                return False
        self.use_ns = use_ns
        self._uid = _UIDS.acquire() if use_ns else None
        self._run_root = tempfile.mkdtemp(prefix="omniopd-sandbox-")
        host_work = os.path.realpath(os.path.join(self._run_root, "work"))
        os.mkdir(host_work, 0o700)
        new_root = os.path.join(self._run_root, "root")
        os.mkdir(new_root, 0o700)
        self.out_path, self.err_path = os.path.join(self._run_root, "stdout"), os.path.join(self._run_root, "stderr")
        self.token = "omniopd-" + secrets.token_hex(16)
        workdir = _WORKDIR_INSIDE if use_ns else host_work
        ro_paths, hide_paths = runtime_view()
        child_fds: list[int] = []
        if self.want_channel:
            to_child_r, to_child_w = os.pipe()
            from_child_r, from_child_w = os.pipe()
            child_fds = [to_child_r, from_child_w]
            self.read_fd, self.write_fd = from_child_r, to_child_w
        cfg = {
            "token": self.token,
            "source": self.source,
            "workdir": workdir,
            "new_root": new_root,
            "ro_paths": list(ro_paths),
            "hide_paths": list(hide_paths),
            "namespaces": use_ns,
            "uid": self._uid,
            "require": limits.isolate is not False,
            "guards": limits.python_guards,
            "block_socket": not use_ns,
            "cpu_seconds": limits.cpu_seconds if limits.cpu_seconds is not None else limits.timeout,
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "file_bytes": limits.max_file_mb * 1024 * 1024,
            "open_files": limits.max_open_files,
            "nproc": limits.max_processes if use_ns else None,
            "deadline": int(limits.timeout) + 5,  # PID 1's own wall-clock limit, a backstop to ours
            "modules": self.modules,
            "payload": self.payload,
            "channel": child_fds or None,
        }
        cfg["boot"] = program_text("sandbox_boot.py")
        argv = [_interpreter(), "-I", "-S", "-B", "-c", STUB]
        if use_ns:
            unshare = _unshare()
            assert unshare is not None  # isolation_available() found it
            argv = [unshare, *_NAMESPACE_FLAGS, "--", *argv]
        self._start = time.monotonic()
        try:
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=host_work,
                    env=_child_env(workdir),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=child_fds,
                )
        except OSError as exc:
            self.start_error = f"could not start the sandbox: {exc}"
            self._release()
            return False
        finally:
            for fd in child_fds:
                os.close(fd)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cfg).encode("utf-8"))
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child died before reading: classified from its exit status
        return True

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def kill(self) -> None:
        """Kill everything left in the process group (the leader is not reaped yet) and reap it."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _release(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = None
        if self._run_root is not None:
            _remove_tree(self._run_root)
            self._run_root = None
        if self._uid is not None:
            _UIDS.release(self._uid)
            self._uid = None

    def finish(self, exited: bool) -> SandboxResult:
        """Kill what is left, classify the run (``exited``: it ended within its wall-clock limit) and
        clean up. The result's ``passed`` means the program ran to its end."""
        if self._result is None:
            try:
                self._result = self._classify(exited)
            finally:
                self._release()
        return self._result

    def run_to_end(self) -> SandboxResult:
        if not self.start():
            self._release()
            return SandboxResult(False, "error", self.start_error or "the sandbox did not start", 0.0)
        exited = False
        try:
            assert self.proc is not None
            exited = _wait_for_exit(self.proc, self.limits.timeout)
        finally:
            self.kill()
        return self.finish(exited)

    def _classify(self, exited: bool) -> SandboxResult:
        self.kill()
        limits, token = self.limits, self.token
        assert self.proc is not None
        seconds = time.monotonic() - self._start
        rc = self.proc.returncode
        tail_bytes = max(4 * limits.output_chars, 16384)
        stdout, stderr = _tail(self.out_path, tail_bytes), _tail(self.err_path, tail_bytes)
        passed_marker = f"{token} ok"
        ran_to_end = passed_marker in stdout
        notes: dict[str, str] = {}
        with open(self.err_path, "rb") as fh:  # the bootstrap's notes come first, before the program's output
            head = fh.read(4096).decode("utf-8", errors="replace")
        for line in head.splitlines() + stderr.splitlines():
            if line.startswith(token + " "):
                key, _, value = line[len(token) + 1 :].partition("=")
                notes[key] = value
        kept = [line for line in stderr.splitlines() if not line.startswith(token + " ")]
        stdout = "\n".join(line for line in stdout.splitlines() if line != passed_marker)
        isolation = tuple(x for x in notes.get("isolation", "").split(",") if x)
        out_tail = _truncate(stdout, limits.output_chars)
        err_tail = _truncate("\n".join(kept), limits.output_chars)

        def result(status: str, reason: str) -> SandboxResult:
            detail = "" if status == "passed" else "\n".join(x for x in (reason, err_tail) if x)
            return SandboxResult(
                status == "passed", status, _truncate(detail, limits.output_chars), seconds, out_tail, isolation, rc
            )

        signum: int | None = None
        if "worker-signal" in notes:
            signum = int(notes["worker-signal"])
        elif rc is not None and rc < 0:
            signum = -rc
        if not exited:
            return result("timeout", f"wall-clock limit of {limits.timeout:g}s exceeded")
        if ran_to_end and rc == 0:
            return result("passed", "")
        if "setup-error" in notes or (rc == _SETUP_ERROR_EXIT and "isolation" not in notes):
            problem = notes.get("problems") or notes.get("setup-error") or "the sandbox did not start"
            return result("error", f"sandbox setup failed: {problem}")
        if "isolation" not in notes:
            return result("error", f"the sandbox did not start (exit status {rc})")
        if signum is not None:
            name = _signal_name(signum)
            if signum == signal.SIGXCPU:
                return result("timeout", "CPU time limit exceeded (SIGXCPU)")
            if signum == signal.SIGKILL:
                return result("killed", "killed by SIGKILL (CPU hard limit or out of memory)")
            if signum == signal.SIGXFSZ:
                return result("killed", f"file size limit of {limits.max_file_mb} MB exceeded (SIGXFSZ)")
            return result("killed", f"killed by {name}")
        if rc == 0:
            return result("failed", "" if err_tail else "program exited before it finished")
        return result("failed", f"exit status {rc}")


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a fresh sandbox; never raises for anything the program does."""
    return SandboxProcess(source, limits or SandboxLimits()).run_to_end()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------------------------------
# Many programs at once (``evaluation.parallel``).


def run_many(
    sources: Sequence[str], limits: SandboxLimits | None = None, max_workers: int | None = None
) -> list[SandboxResult]:
    """Run many programs, at most ``max_workers`` at a time; results in input order."""
    return parallel_map(lambda src: run_python(src, limits), sources, max_workers)
