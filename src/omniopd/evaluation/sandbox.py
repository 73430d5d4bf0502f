"""Run untrusted Python (model-written code) in a separate, resource-limited process.

:func:`run_python` runs one program and returns a :class:`SandboxResult`; :func:`run_many` and
:func:`parallel_map` run many with a bounded number of workers. A program *passes* when it runs to
its end without an uncaught exception; ``sys.exit()``, ``os._exit()``, a crash, a signal or a limit
all count as failures, and grading carries on with the next program.

Two modes; the result's ``isolation`` field says which layers were in force for that run.

**Isolated mode** (Linux, running as root, util-linux ``unshare`` works: probed once per process).
The child is started as ``unshare --net --pid --mount --ipc --uts --fork --kill-child python -I -B``.
Before any untrusted code runs, a trusted bootstrap in the child:

* mounts a private tmpfs of ``max_file_mb`` on the working directory, and remounts every other mount
  read-only inside the child's own mount namespace (the host's mounts are untouched);
* sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC and RLIMIT_CORE=0;
* drops to a dedicated unprivileged uid (one per concurrent run of this process, from a pool of
  ``SANDBOX_UID_COUNT`` uids from ``SANDBOX_UID_BASE`` on, skipping any that has a passwd entry), keeping only
  CAP_DAC_READ_SEARCH (so the interpreter and its standard library stay readable wherever they are
  installed), with an empty capability bounding set and ``no_new_privs``;
* stays as PID 1 of the new PID namespace and forks the worker that runs the program. When PID 1
  ends (the worker finished, or the parent killed the process group), the kernel kills every
  process left in the namespace.

Guaranteed there, by the kernel: no network at all (a new network namespace has only a loopback
that is down: connecting anywhere, 127.0.0.1 included, fails); no writes anywhere but the working
directory (the rest is read-only, and the uid owns nothing); at most ``max_file_mb`` of files
(tmpfs size) and of captured output (RLIMIT_FSIZE); at most ``max_processes`` processes and threads
(RLIMIT_NPROC counts the sandbox's own uid); no signals to processes outside the sandbox (they are
not visible in its PID namespace); CPU time and address space per process as set; nothing survives
the run. The parent's environment is not inherited (the child gets a fixed minimal one).

**Fallback mode** (not root, not Linux, or ``unshare`` unavailable): ``python -I -B`` in a new
session with the same rlimits (RLIMIT_NPROC is left alone there: it counts every process of the
calling user). What is then guaranteed: the minimal environment, the wall-clock limit, CPU time and
address space per process, the size of each file written, and that the process group is killed
afterwards. Everything else rests on the Python-level guards below, which stop honest mistakes and
casual misuse, not a determined adversary.

**Python-level guards** (both modes, before the program runs; ``python_guards=False`` turns them
off to test the kernel layers alone): ``open``/``os.open`` for writing, and the ``os`` functions that
create, remove, rename or change files, are refused outside the working directory (paths resolved
with symlinks); ``os.fork``, ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``,
``subprocess`` and ``os.kill``/``killpg``/``setsid`` raise PermissionError; ``ctypes`` cannot be
imported; in fallback mode ``socket`` cannot be imported either. Code that goes through
``_io.FileIO``, retrieves the originals from the guards' closures, or uses a C extension can get past
them: only the kernel layers of isolated mode hold against that.

Not guaranteed in either mode: reads (the program may read any file the interpreter can read);
integrity of the verdict against a program written to subvert its own harness (the harness shares
its interpreter, so such a program can forge a pass: this sandbox contains code, it does not make a
benchmark tamper-proof); exact CPU accounting of the wall-clock limit when the machine is
overloaded.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_COUNT",
    "STATUSES",
    "SandboxLimits",
    "SandboxResult",
    "default_workers",
    "isolation_available",
    "parallel_map",
    "run_many",
    "run_python",
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
    isolate: bool | None = None  # None: namespaces when available; True: required (else 'error'); False: never
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
# The trusted bootstrap, run as ``python -I -B -c _BOOTSTRAP`` in the child. It reads its settings
# and the program from stdin (so nothing about the run sits in a file the program could read), sets
# up the isolation, installs the guards and runs the program as ``__main__``. On success it writes
# "<token> ok" to stdout; messages to the parent are lines "<token> key=value" on stderr.
_BOOTSTRAP = r'''
import json, os, sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_KEEP = (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC), ("noatime", MS_NOATIME),
         ("nodiratime", MS_NODIRATIME), ("relatime", MS_RELATIME), ("strictatime", MS_STRICTATIME))


def _unescape(path):
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1:i + 4].isdigit():
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ctypes, libc, check


def _setup_filesystem(workdir, uid, size):
    ctypes, libc, check = _libc()
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    opts = ("size=%d,mode=0700,uid=%d,gid=%d" % (size, uid, uid)).encode()
    check(libc.mount(b"tmpfs", os.fsencode(workdir), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "tmpfs on workdir")
    failed = []
    with open("/proc/self/mountinfo") as fh:
        mounts = [line.split() for line in fh]
    for fields in mounts:
        point, options = _unescape(fields[4]), fields[5].split(",")
        if point == workdir or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name, bit in _KEEP:
            if name in options:
                flags |= bit
        if libc.mount(None, os.fsencode(point), None, flags, None) != 0:
            failed.append("%s (%s)" % (point, os.strerror(ctypes.get_errno())))
    os.chdir(workdir)
    return failed


def _drop_privileges(uid):
    ctypes, libc, check = _libc()
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last_cap = int(fh.read())
    check(libc.prctl(8, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
    for cap in range(last_cap + 1):
        if cap != 2:  # keep CAP_DAC_READ_SEARCH only
            check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    data[0].effective = data[0].permitted = 1 << 2
    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    check(libc.prctl(8, 0, 0, 0, 0), "PR_SET_KEEPCAPS")
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("uid not dropped")


def _set_limits(cfg, note):
    import resource

    def setlim(res, soft, hard):
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError) as err:
            note("limit-problem=%s %s" % (res, err))

    cpu = max(1, int(-(-cfg["cpu_seconds"] // 1)))
    setlim(resource.RLIMIT_CPU, cpu, cpu + 1)
    setlim(resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"])
    setlim(resource.RLIMIT_FSIZE, cfg["file_bytes"], cfg["file_bytes"])
    setlim(resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"])
    setlim(resource.RLIMIT_CORE, 0, 0)
    if cfg["nproc"] is not None:
        setlim(resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])


def _supervise(note, deadline):
    """Stay PID 1 of the namespace; return in the forked worker only. PID 1 enforces its own
    deadline, so the sandbox ends even if the parent died without killing it."""
    import signal
    pid = os.fork()
    if pid == 0:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)

    def expire(signum, frame):
        note("supervisor-deadline=%d" % deadline)
        os._exit(124)

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(deadline)
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(98)
        if done == pid:
            if os.WIFSIGNALED(status):
                note("worker-signal=%d" % os.WTERMSIG(status))
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _install_guards(root, block_socket):
    import builtins, io, _io, posix, subprocess, _posixsubprocess
    realpath, join, isabs, getcwd, readlink = os.path.realpath, os.path.join, os.path.isabs, os.getcwd, os.readlink
    fspath, fsdecode, sep = os.fspath, os.fsdecode, os.sep
    root = realpath(root)
    extra = {os.devnull}

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return readlink("/proc/self/fd/%d" % path)
        p = fspath(path)
        if isinstance(p, bytes):
            p = fsdecode(p)
        if not isabs(p):
            p = join(readlink("/proc/self/fd/%d" % dir_fd) if dir_fd is not None else getcwd(), p)
        return realpath(p)

    def allowed(path, dir_fd=None):
        try:
            full = resolve(path, dir_fd)
        except Exception:
            return False
        return full == root or full.startswith(root + sep) or full in extra

    def deny(what, path):
        raise PermissionError(13, "sandbox: %s outside the working directory is not allowed" % what, str(path))

    real_open = _io.open

    def open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in str(mode) for c in "wax+") and not allowed(file):
            deny("writing", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = open

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = posix.open

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writes and not allowed(path, dir_fd):
            deny("writing", path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    patches = {"open": os_open}

    def one_path(name, real):
        def guarded(path, *args, **kwargs):
            if not allowed(path, kwargs.get("dir_fd")):
                deny(name, path)
            return real(path, *args, **kwargs)
        guarded.__name__ = name
        return guarded

    def two_paths(name, real, check_src=True):
        def guarded(src, dst, *args, **kwargs):
            if check_src and not allowed(src, kwargs.get("src_dir_fd")):
                deny(name, src)
            if not allowed(dst, kwargs.get("dst_dir_fd", kwargs.get("dir_fd"))):
                deny(name, dst)
            return real(src, dst, *args, **kwargs)
        guarded.__name__ = name
        return guarded

    def refused(name):
        def guarded(*args, **kwargs):
            raise PermissionError(13, "sandbox: %s is disabled" % name)
        guarded.__name__ = name
        return guarded

    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "lchmod", "chown", "lchown",
                 "fchmod", "fchown", "utime", "mkfifo", "mknod", "setxattr", "removexattr", "chflags",
                 "lchflags"):
        if hasattr(posix, name):
            patches[name] = one_path(name, getattr(posix, name))
    for name in ("rename", "replace", "link"):
        patches[name] = two_paths(name, getattr(posix, name))
    patches["symlink"] = two_paths("symlink", posix.symlink, check_src=False)
    for name in ("fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp", "kill",
                 "killpg", "setsid", "setpgid", "setpgrp", "chroot", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "pidfd_open"):
        if hasattr(os, name) or hasattr(posix, name):
            patches[name] = refused("os." + name)
    for name, fn in patches.items():
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, fn)
    subprocess.Popen = refused("subprocess.Popen")
    _posixsubprocess.fork_exec = refused("subprocess")
    blocked = ["ctypes", "_ctypes"]
    if block_socket:
        blocked += ["socket", "_socket", "ssl", "_ssl"]
    for name in blocked:
        sys.modules[name] = None


def _run(cfg, token):
    import builtins, linecache, traceback
    write, exit_now, err = os.write, os._exit, sys.stderr
    source = cfg["source"]
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    if cfg["guards"]:
        _install_guards(cfg["workdir"], cfg["block_socket"])
    sys.argv = ["<program>"]
    env = {"__name__": "__main__", "__builtins__": builtins, "__doc__": None}
    try:
        exec(compile(source, "<program>", "exec"), env)
    except SystemExit as stop:
        code = stop.code
        try:
            err.write("SystemExit: %r (the program exited before it finished)\n" % (code,))
            err.flush()
        except BaseException:
            pass
        exit_now(code if isinstance(code, int) and 0 <= code < 256 else 1)
    except BaseException as exc:
        try:
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            traceback.print_exception(type(exc), exc, tb, file=err)
            err.flush()
        except BaseException:
            write(2, b"uncaught exception (no traceback: out of memory?)\n")
        exit_now(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(1, ("\n%s ok\n" % token).encode())
    exit_now(0)


def _main():
    cfg = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token = cfg["token"]

    def note(text):
        try:
            os.write(2, ("\n%s %s\n" % (token, text)).encode("utf-8", "replace"))
        except OSError:
            pass

    layers, problems = [], []
    if cfg["namespaces"]:
        layers += ["netns", "pidns", "mountns", "ipcns", "utsns"]
        try:
            failed = _setup_filesystem(cfg["workdir"], cfg["uid"], cfg["file_bytes"])
            layers.append("tmpfs-workdir")
            if failed:
                problems.append("not read-only: " + ", ".join(failed))
            else:
                layers.append("read-only-fs")
        except OSError as exc:
            problems.append("filesystem: %s" % exc)
    _set_limits(cfg, note)
    if cfg["namespaces"]:
        try:
            _drop_privileges(cfg["uid"])
            layers.append("uid")
        except OSError as exc:
            problems.append("privileges: %s" % exc)
    if cfg["guards"]:
        layers.append("python-guards")
    note("isolation=" + ",".join(layers))
    if problems:
        note("problems=" + "; ".join(problems).replace("\n", " "))
        if cfg["require"]:
            note("setup-error=isolation incomplete")
            os._exit(97)
    for name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)
    if cfg["namespaces"]:
        _supervise(note, cfg["deadline"])
    _run(cfg, token)


_main()
'''


# --------------------------------------------------------------------------------------------------
# Parent side.


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


def _python_argv() -> list[str]:
    return [sys.executable, "-I", "-B", "-c", _BOOTSTRAP]


def isolation_available() -> tuple[bool, str]:
    """Whether isolated mode can be used here, and why not (probed once per process)."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _probe()
        return _probe_result


def _probe() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "namespaces and a dedicated uid need root"
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    if unshare is None:
        return False, "util-linux 'unshare' not found"
    try:
        done = subprocess.run(
            [unshare, *_NAMESPACE_FLAGS, "--", sys.executable, "-I", "-c", "pass"],
            check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
            env=_child_env("/"),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"unshare failed: {exc}"
    if done.returncode != 0:
        return False, f"unshare failed: {done.stderr.decode(errors='replace').strip()[:200]}"
    return True, unshare


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
        import select

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
    return "..." + text[-(limit - 3):]


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a fresh sandbox; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    if limits.isolate is False:
        use_ns, why = False, "isolation disabled"
    else:
        use_ns, why = isolation_available()
        if not use_ns and limits.isolate:
            return SandboxResult(False, "error", f"isolation required but unavailable: {why}", 0.0)
    uid = _UIDS.acquire() if use_ns else None
    run_root = tempfile.mkdtemp(prefix="omniopd-sandbox-")
    try:
        return _run_in(run_root, source, limits, use_ns, why, uid)
    finally:
        _remove_tree(run_root)
        if uid is not None:
            _UIDS.release(uid)


def _remove_tree(path: str) -> None:
    """rmtree that also copes with directories the program made unreadable (fallback mode)."""

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


def _run_in(run_root: str, source: str, limits: SandboxLimits, use_ns: bool, unshare: str,
            uid: int | None) -> SandboxResult:
    workdir = os.path.realpath(os.path.join(run_root, "work"))
    os.mkdir(workdir, 0o700)
    out_path, err_path = os.path.join(run_root, "stdout"), os.path.join(run_root, "stderr")
    token = "omniopd-" + secrets.token_hex(16)
    cfg = {
        "token": token,
        "source": source,
        "workdir": workdir,
        "namespaces": use_ns,
        "uid": uid,
        "require": bool(limits.isolate),
        "guards": limits.python_guards,
        "block_socket": not use_ns,
        "cpu_seconds": limits.cpu_seconds if limits.cpu_seconds is not None else limits.timeout,
        "memory_bytes": limits.memory_mb * 1024 * 1024,
        "file_bytes": limits.max_file_mb * 1024 * 1024,
        "open_files": limits.max_open_files,
        "nproc": limits.max_processes if use_ns else None,
        "deadline": int(limits.timeout) + 5,  # PID 1's own wall-clock limit, a backstop to ours
    }
    argv = ([unshare, *_NAMESPACE_FLAGS, "--"] if use_ns else []) + _python_argv()
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=_child_env(workdir),
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            return SandboxResult(False, "error", f"could not start the sandbox: {exc}", time.monotonic() - start)
    try:
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(cfg).encode("utf-8"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child died before reading: classified below from its exit status
        exited = _wait_for_exit(proc, limits.timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # everything left in the group; the leader is not reaped yet
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    seconds = time.monotonic() - start
    rc = proc.returncode

    tail_bytes = max(4 * limits.output_chars, 16384)
    stdout, stderr = _tail(out_path, tail_bytes), _tail(err_path, tail_bytes)
    passed_marker = f"{token} ok"
    ran_to_end = passed_marker in stdout
    notes: dict[str, str] = {}
    with open(err_path, "rb") as fh:  # the bootstrap's notes come first, before the program's output
        head = fh.read(4096).decode("utf-8", errors="replace")
    for line in head.splitlines() + stderr.splitlines():
        if line.startswith(token + " "):
            key, _, value = line[len(token) + 1:].partition("=")
            notes[key] = value
    kept = [line for line in stderr.splitlines() if not line.startswith(token + " ")]
    stderr = "\n".join(kept)
    stdout = "\n".join(line for line in stdout.splitlines() if line != passed_marker)
    isolation = tuple(x for x in notes.get("isolation", "").split(",") if x)
    out_tail = _truncate(stdout, limits.output_chars)
    err_tail = _truncate(stderr, limits.output_chars)

    def result(status: str, reason: str) -> SandboxResult:
        detail = "" if status == "passed" else "\n".join(x for x in (reason, err_tail) if x)
        return SandboxResult(status == "passed", status, _truncate(detail, limits.output_chars), seconds, out_tail,
                             isolation, rc)

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


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------------------------------
# Concurrency.

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per CPU core (programs are CPU-bound), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], max_workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on at most ``max_workers`` threads, results in input order.

    Threads suffice: each call spends its time waiting on a child process.
    """
    items = list(items)
    workers = max_workers if max_workers is not None else default_workers()
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {workers}")
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="omniopd-sandbox") as pool:
        return list(pool.map(fn, items))


def run_many(sources: Sequence[str], limits: SandboxLimits | None = None,
             max_workers: int | None = None) -> list[SandboxResult]:
    """Run many programs, at most ``max_workers`` at a time; results in input order."""
    return parallel_map(lambda src: run_python(src, limits), sources, max_workers)
