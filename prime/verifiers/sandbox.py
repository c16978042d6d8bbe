"""Run untrusted Python programs against test inputs in a sandboxed subprocess.

One call of :func:`run_program` starts one sandbox for all test cases of one program; inside it a
root harness (``_sandbox_harness.py``) forks one fresh child per case, so cases are isolated from
each other while the sandbox starts only once. Measured here: starting a sandbox (``unshare``,
interpreter, module preload, tmpfs mounts) costs about 55 ms, a forked case about 3 ms, so a
sandbox per case would make a 4-case problem several times slower.

Confinement of every case (isolation mode ``"namespace"``, used when running as root with
``unshare`` available; this is the mode on our machines and CI):

- new network namespace: no interface but a down loopback, so no connection can be made;
- new PID namespace with the harness as pid 1: ``kill(-1)`` between cases and the end of pid 1
  remove every process a program started, including double-forked ``setsid`` daemons;
- new mount namespace: private ``/proc``, fresh size-capped tmpfs over ``/tmp``, ``/var/tmp``,
  ``/dev/shm`` and ``/run/lock`` per case (the working directory lives there), so files written
  never reach the host disk and vanish with the case;
- an unprivileged uid of its own per run (random, from a range no account uses): it cannot touch
  root-owned files, signal or trace the harness, and ``RLIMIT_NPROC`` applies (root ignores it);
  ``PR_SET_NO_NEW_PRIVS`` blocks set-uid binaries;
- rlimits: CPU seconds, address space, file size, open files, processes, no core dumps;
- wall-clock timeout per case and for the whole run; stdout capped (the case is killed when it
  writes more); a scrubbed environment; ``python -I -S`` (no site-packages, no user paths).

The parent kills the sandbox's process group with SIGKILL when the whole run overruns; with
``setpriv --pdeathsig`` the sandbox also dies if the grading process itself is killed.

Fallback (isolation mode ``"process"``: not root, or no usable ``unshare``): same harness, own
session per case killed as a group, rlimits, scrubbed environment, a host temporary directory that
is removed afterwards. As root the per-run uid is still used and all its processes are killed after
each case. Without root there is no network isolation and no uid separation: best effort only,
suitable for trusted code. :func:`isolation_mode` says which mode is active.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Any, Sequence

__all__ = ["SandboxLimits", "CaseRun", "run_program", "isolation_mode"]

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
# Per-run sandbox uids are drawn from this range; no account or subuid range uses it.
SANDBOX_UID_BASE = 2_100_000_000
SANDBOX_UID_COUNT = 100_000_000
_GRACE_S = 5.0
_MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 4.0
    """Wall-clock seconds per test case (CPU seconds are capped at ceil(timeout_s) + 1)."""
    total_timeout_s: float | None = None
    """Wall-clock seconds for all cases; cases not started in time are "skipped".
    None: timeout_s * number of cases + 2."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) per case, MiB."""
    max_output_bytes: int = 1 * _MiB
    """Stdout cap per case; exceeding it kills the case (status "output_limit")."""
    file_size_mb: int = 16
    """Largest file a case may write (RLIMIT_FSIZE), MiB."""
    tmpfs_mb: int = 64
    """Size of each private tmpfs (working dir and /tmp), MiB (namespace mode)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE per case."""
    max_processes: int = 32
    """RLIMIT_NPROC for the sandbox uid (processes + threads)."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_output_bytes", "file_size_mb", "tmpfs_mb",
                     "max_open_files", "max_processes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if self.total_timeout_s is not None and self.total_timeout_s <= 0:
            raise ValueError(
                f"SandboxLimits.total_timeout_s must be positive or None, got {self.total_timeout_s!r}"
            )


@dataclasses.dataclass
class CaseRun:
    """Outcome of one test case.

    status: "done" (the program ended by itself), "timeout", "output_limit", "skipped" (the run's
    total time was used up before this case) or "sandbox_error" (no record came back).
    For call-based runs, ``result`` holds the function's return value and ``has_result`` says
    whether the function returned at all.
    """

    status: str
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    has_result: bool = False
    result: Any = None

    @property
    def ok(self) -> bool:
        """The program ran to completion with exit status 0."""
        return self.status == "done" and self.exit_code == 0


@functools.lru_cache(maxsize=1)
def isolation_mode() -> str:
    """``"namespace"`` when PID/network/mount namespaces work here, else ``"process"``."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return "process"
    try:
        probe = subprocess.run(
            _namespace_prefix() + ["true"], capture_output=True, timeout=10, env=_env()
        )
    except (OSError, subprocess.SubprocessError):
        return "process"
    return "namespace" if probe.returncode == 0 else "process"


def _namespace_prefix() -> list[str]:
    prefix = ["unshare", "--net", "--pid", "--mount-proc", "--fork", "--kill-child"]
    if shutil.which("setpriv") is not None:
        # If the grading process dies (e.g. killed by the pool on overrun), the sandbox dies too.
        prefix = ["setpriv", "--pdeathsig", "KILL"] + prefix
    return prefix


def _env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _rmtree_hard(path: str) -> None:
    """Remove a directory tree even when the program made entries read-only."""

    def _on_error(func, p, exc_info):  # noqa: ARG001
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=_on_error)


def run_program(
    code: str,
    inputs: Sequence[Any],
    *,
    mode: str = "stdio",
    fn_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    output_caps: Sequence[int] | None = None,
) -> list[CaseRun]:
    """Run ``code`` once per input, sandboxed; return one :class:`CaseRun` per input, in order.

    mode "stdio": each input is a string fed to stdin; stdout is captured.
    mode "call": after running ``code``, the harness calls ``fn_name`` (a top-level function, or a
    method of class ``Solution``) with each input as the argument list; the return value comes
    back on a channel separate from stdout, as JSON. Expected outputs never enter the sandbox.
    ``output_caps`` overrides ``limits.max_output_bytes`` per case.
    """
    if mode not in ("stdio", "call"):
        raise ValueError(f"mode must be 'stdio' or 'call', got {mode!r}")
    if mode == "call" and not fn_name:
        raise ValueError("mode 'call' needs fn_name (the function to call), got none")
    if not inputs:
        return []
    n = len(inputs)
    caps = list(output_caps) if output_caps is not None else [limits.max_output_bytes] * n
    if len(caps) != n:
        raise ValueError(f"output_caps has {len(caps)} entries for {n} inputs")
    total = limits.total_timeout_s or (limits.timeout_s * n + 2.0)

    namespace = isolation_mode() == "namespace"
    root = os.geteuid() == 0
    uid = SANDBOX_UID_BASE + random.randrange(SANDBOX_UID_COUNT) if root else None
    workdir = tempfile.mkdtemp(prefix="prime-sandbox-")
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o711)
        job = {
            "code": code,
            "mode": mode,
            "fn_name": fn_name,
            "inputs": list(inputs),
            "timeout_s": float(limits.timeout_s),
            "total_timeout_s": float(total),
            "output_caps": [int(c) for c in caps],
            "uid": uid,
            "gid": uid,
            "workdir": workdir,
            "expect_pid_namespace": namespace,
            "limits": {
                "cpu_s": int(-(-limits.timeout_s // 1)) + 1,
                "memory_bytes": int(limits.memory_mb * _MiB),
                "fsize_bytes": int(limits.file_size_mb * _MiB),
                "tmpfs_bytes": int(limits.tmpfs_mb * _MiB),
                "nofile": int(limits.max_open_files),
                "nproc": int(limits.max_processes),
            },
        }
        prefix = _namespace_prefix() if namespace else []
        cmd = prefix + [sys.executable, "-I", "-S", HARNESS]
        raw = _run_harness(cmd, json.dumps(job).encode(), total + _GRACE_S)
    finally:
        _rmtree_hard(workdir)
    return _collect(raw, n, mode)


def _run_harness(cmd: list[str], job: bytes, timeout_s: float) -> bytes:
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd="/",
        start_new_session=True,
        close_fds=True,
    )
    try:
        out, _ = proc.communicate(job, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    return out or b""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _collect(raw: bytes, n: int, mode: str) -> list[CaseRun]:
    runs: list[CaseRun | None] = [None] * n
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
            i = int(rec["i"])
        except (ValueError, KeyError, TypeError):
            continue
        if not 0 <= i < n:
            continue
        run = CaseRun(
            status=str(rec.get("status", "sandbox_error")),
            exit_code=rec.get("exit"),
            signal=rec.get("signal"),
            stdout=rec.get("stdout", ""),
            stderr=rec.get("stderr", ""),
            wall_s=float(rec.get("wall_s", 0.0)),
        )
        if mode == "call" and rec.get("result_json"):
            try:
                run.result = json.loads(rec["result_json"])["result"]
                run.has_result = True
            except (ValueError, KeyError, TypeError):
                pass
        runs[i] = run
    return [r if r is not None else CaseRun(status="sandbox_error") for r in runs]
