"""The trusted bootstrap of a sandboxed Python process.

The parent (:mod:`omniopd.evaluation.sandbox`) starts
``unshare --net --pid --mount --ipc --uts --fork --kill-child -- PYTHON -I -S -B -c STUB`` (or, when the
user opted out of isolation, ``PYTHON -I -S -B -c STUB``) and writes one JSON object to its stdin: this
file's text, the run's settings and the program. ``STUB`` (:data:`STUB`) runs this text with the
settings as ``_CONFIG``, so nothing about the run sits in a file the program could read. Before any untrusted code runs it:

1. builds a new root file system (isolated mode): a small tmpfs holding read-only bind mounts of the
   Python runtime only (the interpreter, its shared library, its standard library with
   ``site-packages`` hidden, and the system library directories), ``/dev/{null,zero,random,urandom}``,
   a ``/proc`` of the new PID namespace and a tmpfs working directory ``/sandbox``; then
   ``pivot_root`` into it and detaches the old root, so the datasets, the project, run directories
   and home directories are not in the process's view at all; the new root is then made read-only;
2. sets the resource limits (CPU, address space, file size, open files, processes, no core files);
3. drops every capability (bounding, permitted, effective, inheritable, ambient) and becomes a
   dedicated unprivileged uid with ``no_new_privs``, and checks in ``/proc/self/status`` that all
   capability sets are empty;
4. installs the Python-level guards (refusals of writes outside the working directory, of process
   creation, and of ``ctypes``; a second layer, not the one relied on);
5. stays PID 1 of the namespace (its end kills everything left) and forks the worker that runs the
   program as ``__main__``.

It reports to the parent in lines ``<token> key=value`` on stderr; a program that ran to its end
prints ``<token> ok`` on stdout. When isolation was required and any step failed it exits with status
97 before running the program. The settings may name helper modules (installed in ``sys.modules``
from source) and a payload and channel (two file descriptors) for the program, found in the module
``omniopd_sandbox``.
"""

import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
SETUP_ERROR_EXIT = 97
WORKDIR = "/sandbox"
STUB = (
    "import json,sys;_c=json.loads(sys.stdin.buffer.read().decode('utf-8'));"
    "exec(compile(_c.pop('boot'),'<sandbox-boot>','exec'),{'__name__':'__main__','_CONFIG':_c})"
)


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))

    return libc, check


def _build_root(cfg):
    """Steps 1: the new root (see the module docstring). Runs as root in a private mount namespace."""
    import platform

    libc, check = _libc()

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
        check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s" % dst)

    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    root = cfg["new_root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["ro_paths"]:  # parents before children
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "wb").close()
        mount(path, target, None, MS_BIND)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in cfg["hide_paths"]:  # empty read-only directories over site-packages and the like
        mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    os.makedirs(root + "/dev", exist_ok=True)
    for name in ("null", "zero", "random", "urandom"):
        open(root + "/dev/" + name, "wb").close()
        mount("/dev/" + name, root + "/dev/" + name, None, MS_BIND)
    os.makedirs(root + "/proc", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + WORKDIR, exist_ok=True)
    opts = "size=%d,mode=0700,uid=%d,gid=%d" % (cfg["file_bytes"], cfg["uid"], cfg["uid"])
    mount("tmpfs", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError("pivot_root: unknown syscall number on %s" % platform.machine())
    os.chdir(root)
    check(libc.syscall(number, b".", b"."), "pivot_root")  # the old root ends up stacked on top of the new
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir(WORKDIR)


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


def _drop_privileges(uid):
    """Step 3: no capability in any set, a dedicated uid, no_new_privs; verified afterwards."""
    import ctypes

    libc, check = _libc()
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last_cap = int(fh.read())
    for cap in range(last_cap + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    check(libc.prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # leaving uid 0 without KEEPCAPS clears permitted and effective

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset (clear inheritable)")
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    # changing uid made the process non-dumpable, which gives its /proc/self files to root; the only
    # processes of this uid are the sandbox's own, and RLIMIT_CORE is 0
    check(libc.prctl(4, 1, 0, 0, 0), "PR_SET_DUMPABLE")
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        raise OSError("uid not dropped")
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh if ":" in line)
    left = [name for name in CAP_SETS if int(status.get(name, "1").strip(), 16) != 0]
    if left:
        raise OSError("capabilities left in %s" % ", ".join(left))
    if status.get("NoNewPrivs", "0").strip() != "1":
        raise OSError("no_new_privs not set")


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
    """Step 4: refusals at the Python level (a second layer; C code and ``_io.FileIO`` get past them)."""
    import _io
    import _posixsubprocess
    import builtins
    import io
    import posix
    import subprocess

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

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in str(mode) for c in "wax+") and not allowed(file):
            deny("writing", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open

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

    for name in (
        "remove",
        "unlink",
        "rmdir",
        "mkdir",
        "truncate",
        "chmod",
        "lchmod",
        "chown",
        "lchown",
        "fchmod",
        "fchown",
        "utime",
        "mkfifo",
        "mknod",
        "setxattr",
        "removexattr",
        "chflags",
        "lchflags",
    ):
        if hasattr(posix, name):
            patches[name] = one_path(name, getattr(posix, name))
    for name in ("rename", "replace", "link"):
        patches[name] = two_paths(name, getattr(posix, name))
    patches["symlink"] = two_paths("symlink", posix.symlink, check_src=False)
    for name in (
        "fork",
        "forkpty",
        "vfork",
        "system",
        "popen",
        "posix_spawn",
        "posix_spawnp",
        "kill",
        "killpg",
        "setsid",
        "setpgid",
        "setpgrp",
        "chroot",
        "execv",
        "execve",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execvp",
        "execvpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnlpe",
        "pidfd_open",
    ):
        if hasattr(os, name) or hasattr(posix, name):
            patches[name] = refused("os." + name)
    for name, fn in patches.items():
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, fn)
    setattr(subprocess, "Popen", refused("subprocess.Popen"))
    _posixsubprocess.fork_exec = refused("subprocess")
    blocked = ["ctypes", "_ctypes"]
    if block_socket:
        blocked += ["socket", "_socket", "ssl", "_ssl"]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # None makes the import fail; typeshed omits it


def _install_modules(cfg):
    """The helper modules named in the settings (source text), and ``omniopd_sandbox``."""
    import types

    for name, source in cfg.get("modules", {}).items():
        module = types.ModuleType(name)
        module.__file__ = "<%s>" % name
        sys.modules[name] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    info = types.ModuleType("omniopd_sandbox")
    vars(info).update(
        payload=cfg.get("payload"),
        channel=tuple(cfg["channel"]) if cfg.get("channel") else None,
        workdir=cfg["workdir"],
    )
    sys.modules["omniopd_sandbox"] = info


def _run(cfg, token):
    import builtins
    import linecache
    import traceback

    write, exit_now, err = os.write, os._exit, sys.stderr
    source = cfg["source"]
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    _install_modules(cfg)
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


def main(cfg):
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
            _build_root(cfg)
            layers += ["minimal-root", "read-only-fs", "tmpfs-workdir"]
        except OSError as exc:
            problems.append("filesystem: %s" % exc)
    else:
        os.chdir(cfg["workdir"])
    _set_limits(cfg, note)
    if cfg["namespaces"]:
        try:
            _drop_privileges(cfg["uid"])
            layers += ["uid", "no-capabilities"]
        except OSError as exc:
            problems.append("privileges: %s" % exc)
    if cfg["guards"]:
        layers.append("python-guards")
    note("isolation=" + ",".join(layers))
    if problems:
        note("problems=" + "; ".join(problems).replace("\n", " "))
        if cfg["require"]:
            note("setup-error=isolation incomplete")
            os._exit(SETUP_ERROR_EXIT)
    for name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)
    if cfg["namespaces"]:
        _supervise(note, cfg["deadline"])
    _run(cfg, token)


if __name__ == "__main__" and "_CONFIG" in globals():
    main(globals()["_CONFIG"])
