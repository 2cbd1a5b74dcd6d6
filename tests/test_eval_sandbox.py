"""The sandbox that runs generated programs: adversarial programs fail, are contained, and the harness goes on.

Each hostile program is run where the platform's namespaces are used
(`run_program`) and, where it matters, also without them (`_execute(...,
namespaces=False)`, what a platform that forbids user namespaces gets), so
that the Python-level guards are tested on their own too.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import pytest

from fastcodegen.eval import sandbox
from fastcodegen.eval.sandbox import ExecutionResult, SandboxLimits, isolation_report, run_program, run_programs

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5)
WORKERS = 2


@pytest.fixture(scope="module")
def isolation() -> dict:
    return isolation_report()


def run_both(program: str, limits: SandboxLimits = FAST) -> list[ExecutionResult]:
    """The program's result with this platform's namespaces, then without any."""
    return [run_program(program, limits), sandbox._execute(program, limits, namespaces=False)[0]]


def live_processes_named(name: str) -> list[int]:
    """Processes (zombies excluded: they are dead, waiting for init to reap them) whose comm is `name`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
        if comm == name and state not in "ZX":
            found.append(int(pid))
    return found


# --- positive controls -------------------------------------------------------


def test_a_passing_program_passes_and_its_stdout_is_captured():
    r = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('hello', add(1, 1))\n")
    assert r.passed and r.reason == "passed"
    assert r.stdout == "hello 2\n"
    assert r.duration_s > 0


def test_a_failing_assert_fails_with_assertion_error_in_its_reason():
    r = run_program("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not r.passed
    assert r.reason.startswith("exit status 1") and "AssertionError: arithmetic" in r.reason


def test_stdout_is_capped():
    r = run_program("import sys\nsys.stdout.write('x' * (1 << 20))\n")
    assert r.passed and len(r.stdout) == sandbox.STDOUT_CAP_BYTES


def test_a_program_may_write_files_in_its_own_directory():
    program = (
        "import os, tempfile\n"
        "with open('notes.txt', 'w') as f:\n    f.write('kept')\n"
        "os.mkdir('sub')\nos.rename('notes.txt', 'sub/notes.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as t:\n    t.write('scratch')\n"
        "print(open('sub/notes.txt').read())\nos.unlink('sub/notes.txt')\n"
    )
    for r in run_both(program):
        assert r.passed, r.reason
        assert r.stdout == "kept\n"


def test_each_program_gets_a_fresh_directory_that_is_removed_afterwards():
    first, second = run_programs(["import os\nprint(os.getcwd())\nopen('mine', 'w').close()"] * 2, workers=WORKERS)
    assert first.passed and second.passed
    assert first.stdout != second.stdout
    for r in (first, second):
        assert not os.path.exists(r.stdout.strip())


# --- resources ---------------------------------------------------------------


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert not r.passed and r.reason == "timed out"
    assert 1.0 <= r.duration_s < 4.0 and time.monotonic() - start < 5.0


def test_a_sleeping_program_times_out_on_the_wall_clock():
    r = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.0))
    assert not r.passed and r.reason == "timed out"


def test_cpu_time_is_limited():
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert not r.passed and r.reason == "cpu time limit"
    assert r.duration_s < 5.0


def test_a_memory_bomb_hits_the_memory_limit():
    limits = SandboxLimits(memory_bytes=256 << 20)
    for program in ("hog = []\nwhile True:\n    hog.append(bytearray(16 << 20))\n", "x = bytearray(1 << 30)\n"):
        r = run_program(program, limits)
        assert not r.passed and r.reason == "memory limit", r.reason


def test_file_size_is_limited():
    r = run_program(
        "with open('big', 'wb') as f:\n    f.write(b'x' * (2 << 20))\n", SandboxLimits(file_size_bytes=1 << 20)
    )
    assert not r.passed and "File too large" in r.reason


@pytest.mark.parametrize(
    "program",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import multiprocessing\ndef f():\n    pass\nwhile True:\n    multiprocessing.Process(target=f).start()\n",
        "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n",
        "import os\nos.system(':(){ :|:& };:')\n",
        "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', ':(){ :|:& };:'], {})\n",
        "import os\nos.execv('/bin/sh', ['sh', '-c', ':(){ :|:& };:'])\n",
    ],
    ids=["os.fork", "multiprocessing", "subprocess", "os.system", "posix_spawn", "execv"],
)
def test_a_fork_bomb_is_refused(program):
    r = run_program(program, SandboxLimits(timeout_s=2.0))
    assert not r.passed
    assert "disabled in the sandbox" in r.reason


@pytest.fixture
def fork_tag():
    """A process name for a test's forked processes; whatever still bears it afterwards is killed."""
    tag = "fcg" + secrets.token_hex(6)
    yield tag
    for pid in live_processes_named(tag):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def forking_program(tag: str, leave_group: bool, ending: str) -> str:
    """Forks 8 sleeping children through ctypes (past the disabled os.fork), then `ending`."""
    return (
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None)\n"
        f"libc.prctl(15, {tag.encode()!r}, 0, 0, 0)\n"  # PR_SET_NAME: the children inherit the name
        "for _ in range(8):\n"
        "    if libc.fork() == 0:\n"
        + ("        libc.setsid()\n" if leave_group else "")
        + "        time.sleep(600)\n"
        + ending
    )


def wait_until_gone(tag: str) -> list[int]:
    deadline = time.monotonic() + 5
    while live_processes_named(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return live_processes_named(tag)


@pytest.mark.parametrize("ending, expected", [("time.sleep(600)\n", "timed out"), ("print('done')\n", "passed")])
def test_forked_processes_in_the_group_die_with_the_program(fork_tag, ending, expected):
    r, _ = sandbox._execute(forking_program(fork_tag, False, ending), SandboxLimits(timeout_s=2.0), namespaces=False)
    assert r.reason == expected
    assert wait_until_gone(fork_tag) == []


@pytest.mark.parametrize("ending, expected", [("time.sleep(600)\n", "timed out"), ("print('done')\n", "passed")])
def test_a_pid_namespace_kills_even_what_left_the_group(isolation, fork_tag, ending, expected):
    if not isolation["pid_namespace"]:
        pytest.skip(f"no pid namespace on this platform: {isolation['reason']}")
    r = run_program(forking_program(fork_tag, True, ending), SandboxLimits(timeout_s=2.0))
    assert r.reason == expected
    assert wait_until_gone(fork_tag) == []


# --- the file system ---------------------------------------------------------


def test_writing_outside_its_directory_fails_and_writes_nothing(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = {
        "open": f"open({str(target)!r}, 'w').write('x')\n",
        "append": f"open({str(target)!r}, 'a').write('x')\n",
        "os.open": f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        "pathlib": f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        "mkdir": f"import os\nos.mkdir({str(tmp_path / 'escaped-dir')!r})\n",
        "symlink": f"import os\nos.symlink({str(tmp_path)!r}, 'out')\nopen('out/escaped.txt', 'w').write('x')\n",
        "relative": f"open({'../' * 40 + str(target).lstrip('/')!r}, 'w').write('x')\n",
    }
    for name, program in attempts.items():
        for r in run_both(program):
            assert not r.passed, name
            assert "PermissionError" in r.reason or "Read-only file system" in r.reason, (name, r.reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writes_from_c_code_outside_its_directory_fail_in_a_mount_namespace(tmp_path, isolation):
    if not isolation["mount_namespace"]:
        pytest.skip(f"no mount namespace on this platform: {isolation['reason']}")
    program = f"import sqlite3\nsqlite3.connect({str(tmp_path / 'escaped.db')!r}).execute('create table t (x)')\n"
    r = run_program(program)
    assert not r.passed and "sqlite3" in r.reason
    assert list(tmp_path.iterdir()) == []


def test_deleting_files_outside_its_directory_fails(tmp_path):
    victim = tmp_path / "sentinel.txt"
    victim.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.txt").write_text("precious")
    attempts = [
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.unlink({str(victim)!r})\n",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()\n",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n",
        f"import shutil\nshutil.rmtree({str(folder)!r})\n",
        f"import shutil\nshutil.move({str(victim)!r}, 'stolen.txt')\n",
        f"import os\nos.truncate({str(victim)!r}, 0)\n",
        f"open({str(victim)!r}, 'w').close()\n",
    ]
    for program in attempts:
        for r in run_both(program):
            assert not r.passed, program
    assert victim.read_text() == "precious"
    assert (folder / "inside.txt").read_text() == "precious"


# --- other processes, the environment, the network ---------------------------


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos.kill(os.getppid(), 9)\n",
        "import os\nos.killpg(os.getpgid(os.getppid()), 9)\n",
    ],
    ids=["kill", "killpg"],
)
def test_killing_its_parent_is_refused(program):
    for r in run_both(program):
        assert not r.passed
        assert "disabled in the sandbox" in r.reason
    # This process is still here, and the harness still works.
    assert run_program("print('still here')").stdout == "still here\n"


def test_a_pid_namespace_hides_the_harness_even_from_ctypes(isolation):
    if not isolation["pid_namespace"]:
        pytest.skip("no pid namespace here: a kill through ctypes would reach this test process")
    r = run_program("import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)\nprint(os.getppid())\n")
    assert r.passed and r.stdout == "1\n"  # its parent is the namespace's init, which ignores the signal


def test_the_harness_environment_is_not_visible(monkeypatch, isolation):
    secret = "fcg-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("FASTCODEGEN_TEST_SECRET", secret)
    own = "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ', 'rb').read())\n"
    # Another process's /proc entries are closed to a user namespace; without one, same-uid
    # processes can read each other's (the module docstring says so).
    others = (
        "for pid in (os.getppid(), os.getpgid(0)):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print('refused', e)\n"
    )
    runs = [sandbox._execute(own, FAST, namespaces=False)[0]]
    runs.append(run_program(own + others if isolation["user_namespace"] else own))
    for r in runs:
        assert r.passed, r.reason
        assert secret not in r.stdout and "FASTCODEGEN_TEST_SECRET" not in r.stdout
        assert "HOME" in r.stdout  # the program did print its environment


def test_no_network_in_a_network_namespace(isolation):
    if not isolation["network_namespace"]:
        pytest.skip(f"no network namespace on this platform: {isolation['reason']}")
    program = "import socket\nprint(sorted(name for _, name in socket.if_nameindex()))\n"
    r = run_program(program)
    assert r.passed and r.stdout == "['lo']\n"
    r = run_program("import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)\n")
    assert not r.passed and ("unreachable" in r.reason or "OSError" in r.reason)
    r = run_program(program, SandboxLimits(network=True))
    assert r.passed and r.stdout == f"{sorted(name for _, name in socket.if_nameindex())}\n"  # the harness's own


def test_isolation_report_says_what_the_platform_allowed(isolation):
    for key in ("user_namespace", "network_namespace", "mount_namespace", "pid_namespace"):
        assert isinstance(isolation[key], bool)
    assert isolation["works"] is True
    assert isinstance(isolation["reason"], str) and isinstance(isolation["process_limit"], str)
    fallback = sandbox._execute("", FAST, namespaces=False)[1]
    assert fallback["user_namespace"] is False and fallback["network_namespace"] is False


# --- running to the end -------------------------------------------------------


@pytest.mark.parametrize(
    "early_exit",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit\n",
        "raise SystemExit(0)\n",
        "import os\nos._exit(0)\n",
        "import atexit, os\natexit.register(os._exit, 0)\nraise AssertionError\n",
        "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\nraise AssertionError\n",
    ],
    ids=["sys.exit", "SystemExit", "SystemExit(0)", "os._exit", "atexit", "excepthook"],
)
def test_leaving_before_the_tests_is_not_a_pass(early_exit):
    program = "def f(x):\n    return x\n" + early_exit + "\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)\n"
    r = run_program(program)
    assert not r.passed
    assert r.reason == "did not run to its end"


def test_a_redefined_check_is_overridden_by_the_tests_that_follow():
    # prompt + completion + tests, as HumanEval builds them: the completion cannot keep its own check.
    completion = (
        "    return 0\n\n"
        "def check(candidate):\n    pass\n\n"
        "import builtins\nbuiltins.AssertionError = type('Harmless', (Exception,), {})\n"
        "builtins.check = check\n"
    )
    program = "def f(x):\n" + completion + "\n" + "def check(candidate):\n    assert candidate(1) == 2\n" + "\ncheck(f)"
    r = run_program(program)
    assert not r.passed and "AssertionError" in r.reason


def test_a_pass_forged_on_stdout_or_the_certificate_pipe_is_not_a_pass():
    forgeries = [
        "print('passed')\nimport os\nos._exit(0)\n",
        "print('certified ' + 'a' * 32)\nimport os\nos._exit(0)\n",
        # every descriptor, the certificate pipe among them, gets guesses at the marker
        "import os\n"
        "for fd in range(3, 64):\n"
        "    for guess in (b'passed\\n', b'certified 0123456789abcdef0123456789abcdef\\n', b'isolation {}\\n'):\n"
        "        try:\n"
        "            os.write(fd, guess)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n",
        "import sys\nsys.stdout.write('passed\\n')\nsys.stdout.flush()\nraise SystemExit(0)\n",
    ]
    for program in forgeries:
        r = run_program(program)
        assert not r.passed and r.reason == "did not run to its end", (program, r.reason)


def test_the_harness_finishes_a_batch_of_hostile_programs_in_order(tmp_path):
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("keep")
    programs = [
        "while True:\n    pass\n",
        "import os\nos.kill(os.getppid(), 9)\n",
        "hog = []\nwhile True:\n    hog.append(bytearray(16 << 20))\n",
        f"import os\nos.remove({str(sentinel)!r})\n",
        "import os\nos._exit(0)\n",
        "print('ok')\n",
        "raise ValueError('bad')\n",
    ]
    limits = SandboxLimits(timeout_s=1.5, memory_bytes=256 << 20)
    results = run_programs(programs, limits, workers=WORKERS)
    assert [r.passed for r in results] == [False, False, False, False, False, True, False]
    assert results[0].reason == "timed out"
    assert results[2].reason == "memory limit"
    assert results[4].reason == "did not run to its end"
    assert results[5].stdout == "ok\n"
    assert results[6].reason == "exit status 1: ValueError: bad"
    assert sentinel.read_text() == "keep"


# --- the API ------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("timeout_s", 0), ("timeout_s", -1.0), ("cpu_s", 0), ("memory_bytes", 1), ("open_files", 2), ("processes", 0)],
)
def test_bad_limits_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxLimits(**{field: value})


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="program"):
        run_program(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)
    assert run_programs([], workers=WORKERS) == []


def test_a_program_that_does_not_compile_fails_with_the_syntax_error():
    r = run_program("def f(:\n")
    assert not r.passed and "SyntaxError" in r.reason


def test_text_that_is_not_a_program_fails_without_raising():
    r = run_program("x = 1\0")  # a NUL byte
    assert not r.passed and "null bytes" in r.reason
    r = run_program("x = '\ud800'\n")  # a lone surrogate: not encodable as UTF-8
    assert not r.passed and "UnicodeDecodeError" in r.reason
