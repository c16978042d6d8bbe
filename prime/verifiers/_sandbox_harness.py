"""In-sandbox test runner, executed as ``python -I -S _sandbox_harness.py`` by sandbox.py.

Standard library only (no site-packages under -S; the job names the directories of the allowed
third-party packages). Reads one JSON job from stdin, runs every test case in a forked child and
writes one JSON line per case to stdout. The parent compares outputs; expected outputs never enter
the sandbox, so a program cannot learn or forge them.

Process layout (namespace mode, the default as root):

    parent (grader)  --  bwrap (new mount, PID, network, IPC, UTS namespaces; read-only mount
    view)  --  harness (pid 1 of the new PID namespace, root with a few capabilities)  --  one
    forked child per test case (drops to an unprivileged uid, applies rlimits, runs the
    untrusted code)

The harness stays root, so the untrusted code (another uid) can neither signal nor ptrace it.
As pid 1 it reaps every orphan, and ``kill(-1, SIGKILL)`` between cases removes every process the
previous case left, however it daemonised. When pid 1 exits, the kernel kills the whole namespace.
Per case it mounts fresh size-capped tmpfs over /tmp and /dev/shm (the only writable places of the
view; /var/tmp and /run/lock too where they exist), so nothing a program writes survives it.

Without namespaces (not root, no usable ``bwrap``) the same harness runs directly: per-case process
groups are killed, and as root every process of the per-run sandbox uid is killed as well.
"""

import ctypes
import errno
import io
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

# Modules commonly imported by competitive-programming solutions, imported once here so each forked
# case starts instantly. In process mode as root they are also the only modules the sandbox uid can
# use when the interpreter lives where it cannot read (e.g. under /root); the mount view makes the
# whole standard library readable.
PRELOAD = (
    "abc array bisect builtins calendar cmath collections collections.abc contextlib copy "
    "dataclasses datetime decimal encodings.idna enum fractions functools hashlib heapq io "
    "itertools json math numbers operator queue random re socket statistics string struct "
    "subprocess sys textwrap threading time types typing unicodedata"
).split()

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
STDERR_CAP = 8192
RESULT_CAP = 8 << 20


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()


def _preload(names):
    for name in names:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a missing optional module is fine
            pass


def _drop_bounding_set():
    """Empty the capability bounding set, so no later exec can regain a capability whatever the
    file (defence in depth beside NO_NEW_PRIVS and the uid switch, which clears the others)."""
    if LIBC is None:
        raise OSError("no libc: cannot drop capabilities")
    for cap in range(64):
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                return  # past the last capability this kernel knows
            raise OSError(err, "PR_CAPBSET_DROP %d failed" % cap)


def _fresh_tmpfs(size_bytes):
    """Mount fresh tmpfs over the world-writable dirs (private mount namespace). True on success."""
    if LIBC is None:
        return False
    ok = True
    for d in TMPFS_DIRS:
        if not os.path.isdir(d):
            continue
        LIBC.umount2(d.encode(), MNT_DETACH)  # drop the previous case's tmpfs (fails harmlessly)
        opts = "size=%d,nr_inodes=4096,mode=1777" % size_bytes
        rc = LIBC.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode())
        if rc != 0 and d == "/tmp":
            ok = False
    return ok


def _read_into(fd, buf, cap):
    """Read what is available from fd into buf (a bytearray). Returns (eof, over_cap)."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return False, False
    except OSError:
        return True, False
    if not chunk:
        return True, False
    room = cap - len(buf)
    buf += chunk[: max(room, 0)]
    return False, len(chunk) > room


def _kill_leftovers(job, pgid, is_init):
    """Kill every process the case left behind."""
    if is_init:
        # pid 1 of a private PID namespace: -1 reaches exactly the namespace, never the host.
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        uid = job.get("uid")
        if uid is not None and os.getuid() == 0:
            # A process running as the sandbox uid sends SIGKILL to all processes of that uid,
            # which catches programs that left the process group with setsid().
            killer = os.fork()
            if killer == 0:
                try:
                    os.setgid(job["gid"])
                    os.setuid(uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(killer, 0)


def _reap_all(deadline):
    """Wait for every child (as pid 1: every process in the namespace) to be gone."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.002)


def _to_plain(value, depth=0):
    """A JSON-able copy of a return value using only exact builtin types."""
    if depth > 100:
        raise ValueError("result nested too deeply")
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_to_plain(v, depth + 1) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, dict):
        return {str(k): _to_plain(v, depth + 1) for k, v in dict.items(value)}
    raise TypeError("unsupported result type %s" % type(value).__name__)


def _child(job, case_input, fds, workdir):
    """Runs in the forked child: confine, then execute the untrusted program. Never returns."""
    stdin_fd, out_w, err_w, res_w = fds
    try:
        os.setsid()
        limits = job["limits"]
        cpu = int(limits["cpu_s"])
        for res, val in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
            (resource.RLIMIT_FSIZE, (limits["fsize_bytes"],) * 2),
            (resource.RLIMIT_NOFILE, (limits["nofile"],) * 2),
            (resource.RLIMIT_NPROC, (limits["nproc"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(res, val)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        if res_w is None:
            os.closerange(3, 65536)
        else:
            os.closerange(3, res_w)
            os.closerange(res_w + 1, 65536)
        if job.get("uid") is not None:
            _drop_bounding_set()
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        # After the uid switch: the harness may not search a directory of another uid (mode 700).
        os.chdir(workdir)
        if LIBC is not None:
            LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.environ.clear()
        os.environ.update(job["env"])
        os.environ["HOME"] = workdir
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), "utf-8", "replace")
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), "utf-8", "replace")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), "utf-8", "replace", line_buffering=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        sys.argv = ["solution.py"]
        # -S skips site, which is what defines exit()/quit(); solutions use them.
        import builtins

        builtins.exit = builtins.quit = sys.exit
        sys.setrecursionlimit(10000)
    except BaseException:  # noqa: BLE001 - the confinement failed: never run the code
        os._exit(120)

    # Keep what is needed to report a result before the untrusted code can patch anything.
    write, dumps, plain, exit_now = os.write, json.dumps, _to_plain, os._exit
    namespace = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "solution.py"}
    status = 0
    try:
        exec(compile(job["code"], "solution.py", "exec"), namespace)
    except SystemExit as e:
        if job["mode"] == "call":
            exit_now(121)  # left before the function could be called: the case fails
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        status = 1
    if job["mode"] == "call" and status == 0:
        try:
            fn_name = job["fn_name"]
            fn = namespace.get(fn_name)
            if not callable(fn):
                fn = getattr(namespace["Solution"](), fn_name)
            args = case_input if isinstance(case_input, list) else [case_input]
            result = fn(*args)
            payload = dumps({"result": plain(result)}).encode()
        except SystemExit:
            exit_now(121)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            status = 1
        else:
            view = memoryview(payload)
            while view:
                view = view[write(res_w, view):]
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        status = status or 1
    exit_now(status if 0 <= status < 256 else 1)


def _run_case(job, index, case_input, is_init, use_tmpfs):
    limits = job["limits"]
    timeout_s = float(job["timeout_s"])
    if use_tmpfs:
        _fresh_tmpfs(limits["tmpfs_bytes"])
        workdir = "/tmp/work"
    else:
        workdir = os.path.join(job["workdir"], "case%d" % index)
    os.makedirs(workdir, exist_ok=True)
    if job.get("uid") is not None:
        os.chown(workdir, job["uid"], job["gid"])
    os.chmod(workdir, 0o700)

    stdin_fd = os.memfd_create("stdin", 0)
    data = (case_input if isinstance(case_input, str) else "").encode("utf-8", "replace")
    view = memoryview(data)
    while view:
        view = view[os.write(stdin_fd, view):]
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe() if job["mode"] == "call" else (None, None)

    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, case_input, (stdin_fd, out_w, err_w, res_w), workdir)
    for fd in (stdin_fd, out_w, err_w, res_w):
        if fd is not None:
            os.close(fd)

    caps = {out_r: job["output_caps"][index], err_r: STDERR_CAP}
    bufs = {out_r: bytearray(), err_r: bytearray()}
    if res_r is not None:
        caps[res_r] = RESULT_CAP
        bufs[res_r] = bytearray()
    open_fds = set(bufs)
    for fd in open_fds:
        os.set_blocking(fd, False)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None

    status, exit_code, term_signal = "done", None, None
    deadline = start + timeout_s
    while True:
        if exit_code is None and term_signal is None:
            done_pid, wstatus = os.waitpid(pid, os.WNOHANG)
            if done_pid == pid:
                if os.WIFEXITED(wstatus):
                    exit_code = os.WEXITSTATUS(wstatus)
                else:
                    term_signal = os.WTERMSIG(wstatus)
                break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        watch = list(open_fds) + ([pidfd] if pidfd is not None else [])
        ready, _, _ = select.select(watch, [], [], min(remaining, 0.005 if pidfd is None else remaining))
        over = False
        for fd in ready:
            if fd == pidfd:
                continue
            eof, over_cap = _read_into(fd, bufs[fd], caps[fd])
            if eof:
                open_fds.discard(fd)
            if over_cap and fd != err_r:
                over = True
        if over:
            status = "output_limit"
            break
    wall = time.monotonic() - start

    _kill_leftovers(job, pid, is_init)
    if status != "done" or is_init:
        _reap_all(time.monotonic() + 2.0)
    else:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    # Drain what the case wrote before it ended; writers are dead, so this reaches EOF quickly.
    drain_deadline = time.monotonic() + 0.5
    while open_fds and time.monotonic() < drain_deadline and status == "done":
        ready, _, _ = select.select(list(open_fds), [], [], 0.05)
        for fd in ready:
            eof, over_cap = _read_into(fd, bufs[fd], caps[fd])
            if eof:
                open_fds.discard(fd)
            if over_cap and fd != err_r:
                status = "output_limit"
    for fd in list(bufs) + ([pidfd] if pidfd is not None else []):
        try:
            os.close(fd)
        except OSError:
            pass

    record = {
        "i": index,
        "status": status,
        "exit": exit_code,
        "signal": term_signal,
        "wall_s": round(wall, 4),
        "stdout": bufs[out_r].decode("utf-8", "replace"),
        "stderr": bufs[err_r].decode("utf-8", "replace")[-2000:],
    }
    if res_r is not None:
        record["result_json"] = bufs[res_r].decode("utf-8", "replace")
    return record


def main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    out = sys.stdout
    sys.dont_write_bytecode = True  # the view is read-only; never write caches elsewhere either
    sys.path.extend(job["sys_path"])
    is_init = os.getpid() == 1 and bool(job.get("expect_pid_namespace"))
    use_tmpfs = is_init and os.getuid() == 0 and _fresh_tmpfs(job["limits"]["tmpfs_bytes"])
    # Packages the program mentions load once here, with their thread pools pinned to one thread
    # by the environment, so forking after the import is safe.
    _preload(PRELOAD + list(job["preload"]))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    total_deadline = time.monotonic() + float(job["total_timeout_s"])
    for index, case_input in enumerate(job["inputs"]):
        if not use_tmpfs and job["workdir"] is None:
            record = {"i": index, "status": "sandbox_error"}  # no private tmpfs: run nothing
        elif time.monotonic() + 0.05 >= total_deadline:
            record = {"i": index, "status": "skipped"}
        else:
            saved = job["timeout_s"]
            job["timeout_s"] = min(float(saved), total_deadline - time.monotonic())
            record = _run_case(job, index, case_input, is_init, use_tmpfs)
            job["timeout_s"] = saved
        out.write(json.dumps(record) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
