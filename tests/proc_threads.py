"""Threads of the calling process, read from /proc (Linux): test scripts that run in a child process
import this to count the threads a library started."""

from __future__ import annotations

import os


def threads_named(comm: str) -> int:
    """How many of this process's threads are named `comm` (/proc/self/task/*/comm, e.g. gloo's
    event-loop threads, "gloo_tcp_loop")."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            count += f.read().strip() == comm
    return count
