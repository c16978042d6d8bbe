"""Named points where a process can be made to die on purpose, to test that a job survives it.

Off unless the environment names them (the tests of fault tolerance do; a normal run never does):

    PRIME_FAILPOINTS="verifier.score@2,rollout.generate@3,policy.update@3"
    PRIME_FAILPOINT_DIR=/some/folder            # shared by every process of the job

`name@n`: the n-th time any process of the job reaches point `name` (counted across actors,
restarts and ranks in a file under PRIME_FAILPOINT_DIR), that process kills itself with SIGKILL,
exactly as the kernel's OOM killer or a lost node would end it: no exception, no clean-up, no
reply to the driver. Each point fires once.

Points: `verifier.score`, `rollout.generate`, `policy.update`, `prm.update` (the actors' verbs, at
their start).
"""

from __future__ import annotations

import fcntl
import os
import signal

ENV_POINTS = "PRIME_FAILPOINTS"
ENV_DIR = "PRIME_FAILPOINT_DIR"


def parse(spec: str) -> dict[str, int]:
    """`"a@2,b@1"` -> {"a": 2, "b": 1}."""
    points = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, count = part.partition("@")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV_POINTS}: {part!r} is not of the form name@n with n >= 1")
        points[name] = int(count)
    return points


def env_of_job() -> dict[str, str]:
    """The failpoint variables of this process's environment, to hand on to the job's actors."""
    return {k: os.environ[k] for k in (ENV_POINTS, ENV_DIR) if os.environ.get(k)}


def hits(name: str) -> int:
    """Times point `name` has been reached so far by the job (0 when failpoints are off)."""
    folder = os.environ.get(ENV_DIR)
    path = os.path.join(folder, name) if folder else None
    if not path or not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(f.read() or 0)


def _count(folder: str, name: str) -> int:
    """Add one to the job-wide counter of `name` (under an exclusive lock); the new value."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
        os.fsync(f.fileno())
    return n


def reach(name: str) -> None:
    """Point `name`: kill this process if the environment says this is its n-th hit."""
    spec = os.environ.get(ENV_POINTS)
    if not spec:
        return
    at = parse(spec).get(name)
    if at is None:
        return
    folder = os.environ.get(ENV_DIR)
    if not folder:
        raise ValueError(f"{ENV_POINTS} is set but {ENV_DIR} (the job-wide counter folder) is not")
    if _count(folder, name) == at:
        os.kill(os.getpid(), signal.SIGKILL)
