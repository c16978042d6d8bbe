"""Hostile programs against the code grader's sandbox.

Every test checks three things: the score (a hostile program never fakes a pass), that the host is
intact (a world-writable canary file and a root-only secret in a test-owned directory, no process
of a sandbox uid left, no sandbox directory left in the temp dir) and that wall time stayed bounded.

Most programs print "blocked" when their attack failed and something else when it worked; the
expected output is "blocked", so a score of 1.0 proves the attack was contained while the program
itself kept running normally.
"""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import time

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
        deadline = time.monotonic() + 2.0
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


def grade(program: str, tests=SUM_TESTS, timeout_s: float = 1.0, max_wall: float | None = None) -> float:
    start = time.monotonic()
    result = code.score(_wrap(program), tests, timeout_s=timeout_s)
    wall = time.monotonic() - start
    n = len(tests["inputs"])
    bound = max_wall if max_wall is not None else timeout_s * n + 3.0
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
