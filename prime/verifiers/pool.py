"""Grade a batch of responses concurrently in worker processes, with a hard per-item time limit.

Why a hand-rolled pool and not ``concurrent.futures.ProcessPoolExecutor``: sympy (through
math-verify) can hang inside one C call that no signal interrupts, and an executor cannot kill one
worker; a hung item would block the training step. Here every worker is a process with its own
pipe; an item that overruns ``timeout_s`` gets its worker SIGKILLed and replaced, and scores 0.
Items go out in chunks (see :func:`chunk_size`; one item per message cost about 0.15 ms per item
in round trips) and come back one answer per item, so the limit is still per item: it restarts at
each answer, and the items queued behind a killed worker's current one go to the other workers.
A code item's sandbox dies with its worker (``setpriv --pdeathsig``, see sandbox.py).

Workers come from a ``forkserver`` that has math-verify/sympy imported once, so starting or
replacing a worker costs a fork, not a fresh interpreter with a one-second sympy import.

Budgets: math comparisons get ``min(math_timeout_s, 0.8 * timeout_s)`` of soft time limit; code
items run each test case for ``code_case_timeout_s`` and all cases within ``timeout_s - 1`` so they
finish on their own (untried cases fail) before the pool would kill them.

Metrics (returned by :meth:`VerifierPool.score`, logged by the driver):
``verify/items``, ``verify/mean_score``, ``verify/timeouts`` (items stopped by a time limit),
``verify/errors`` (items the grader could not grade: malformed ground truth, crashed worker),
``verify/seconds`` (wall time of the batch).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Mapping, Sequence

from prime.verifiers.math import DEFAULT_TIMEOUT_S as MATH_TIMEOUT_S

__all__ = ["VerifierPool", "grade_item"]

MAX_CHUNK = 64
_PRELOAD = ["math_verify", "prime.verifiers.math", "prime.verifiers.code", "prime.verifiers.registry",
            "prime.verifiers.warm"]  # warm: builds math grading's lazy parsers once (see that module)


def grade_item(item: Mapping[str, Any], settings: Mapping[str, float]) -> tuple[float, str]:
    """Grade one item in the current process: ``(score, status)`` with status ok|timeout|error."""
    from prime.verifiers import code as code_grader
    from prime.verifiers import math as math_grader
    from prime.verifiers.registry import ground_truth_of, resolve_kind
    from prime.verifiers.sandbox import SandboxLimits

    kind = resolve_kind(item)
    truth = item["ground_truth"] if "ground_truth" in item else ground_truth_of(item)
    if kind == "math":
        return math_grader.score_with_status(item.get("response"), truth, settings["math_timeout_s"])
    limits = SandboxLimits(
        timeout_s=settings["code_case_timeout_s"], total_timeout_s=settings["code_total_timeout_s"]
    )
    try:
        return code_grader.score(item.get("response"), truth, limits=limits), "ok"
    except ValueError:
        return 0.0, "error"


def _worker_main(conn, grade_fn: Callable, settings: Mapping[str, float]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for index, item in msg:  # a chunk: one answer per item, in order, as each is graded
            try:
                score, status = grade_fn(item, settings)
                score = float(score)
            except BaseException:  # noqa: BLE001 - any grader failure scores 0 and is counted
                score, status = 0.0, "error"
            try:
                conn.send((index, score, status))
            except (OSError, ValueError):
                return


class _Worker:
    def __init__(self, ctx, grade_fn: Callable, settings: Mapping[str, float]) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, grade_fn, dict(settings)), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        self.queue: deque[int] = deque()  # indices sent and not answered yet; the first is being graded
        self.deadline = 0.0  # when the first of `queue` overruns

    def kill(self) -> None:
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass
        self.process.join(5)
        self.conn.close()


def chunk_size(pending: int, num_workers: int) -> int:
    """How many items an idle worker gets at once: a shrinking share of what is left (half of an
    even split), so a batch of cheap items costs few round trips and the last chunks stay small
    enough to balance the workers. At most MAX_CHUNK."""
    return max(1, min(MAX_CHUNK, pending, -(-pending // (2 * num_workers))))


class VerifierPool:
    """A fixed set of grading processes; :meth:`score` grades a batch and never raises for grader failures.

    Args:
        num_workers: grading processes (CPU-bound math and sandbox supervision; about one per core).
        timeout_s: hard wall-clock limit per item; an overrunning worker is killed and replaced.
        math_timeout_s: soft limit of one math comparison (capped at 0.8 * timeout_s).
        code_case_timeout_s: wall-clock limit per test case of a code item.
        grade_fn: ``(item, settings) -> (score, status)``, a module-level function (it is sent to
            the workers); the default grades math and code through :func:`grade_item`.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        *,
        code_case_timeout_s: float,
        math_timeout_s: float = MATH_TIMEOUT_S,
        grade_fn: Callable = grade_item,
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._settings = {
            "math_timeout_s": min(float(math_timeout_s), 0.8 * self.timeout_s),
            "code_case_timeout_s": min(float(code_case_timeout_s), self.timeout_s),
            "code_total_timeout_s": max(0.5, self.timeout_s - 1.0),
        }
        self._grade_fn = grade_fn
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._workers = [self._new_worker() for _ in range(num_workers)]
        self.replaced_workers = 0

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self._grade_fn, self._settings)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._new_worker()
        self.replaced_workers += 1

    def _drop(self, worker: _Worker, pending: deque) -> None:
        """Replace a worker whose current item hung or killed it; that item scores 0, and the items
        queued behind it go back to the front of `pending` for another worker."""
        worker.queue.popleft()
        pending.extendleft(reversed(worker.queue))
        worker.queue.clear()
        self._replace(worker)

    def score(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, float]]:
        """Scores (same order as ``items``) and ``verify/*`` metrics.

        Each item is a dict with ``response`` and ``ground_truth`` plus the task type in ``kind``,
        ``ability`` or ``data_source`` (a verl row with ``reward_model.ground_truth`` works too).
        Raises ValueError, before grading anything, for an item that is not such a dict or whose
        task type is unknown.
        """
        from prime.verifiers.registry import resolve_kind

        if self._workers is None:
            raise RuntimeError("VerifierPool is closed")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "response" not in item:
                raise ValueError(f"item {i} must be a dict with 'response' and 'ground_truth', got {item!r:.200}")
            try:
                resolve_kind(item)
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None

        start = time.monotonic()
        scores = [0.0] * len(items)
        timeouts = errors = 0
        pending = deque(range(len(items)))
        while True:
            for worker in list(self._workers):
                if not worker.queue and pending:
                    chunk = [pending.popleft() for _ in range(chunk_size(len(pending), len(self._workers)))]
                    try:
                        worker.conn.send([(i, items[i]) for i in chunk])
                        worker.queue.extend(chunk)
                        worker.deadline = time.monotonic() + self.timeout_s
                    except (OSError, ValueError):
                        # A worker that died while idle: replace it and retry the items.
                        pending.extendleft(reversed(chunk))
                        self._replace(worker)
            busy = [w for w in self._workers if w.queue]
            if not busy:
                break
            now = time.monotonic()
            nearest = min(w.deadline for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, nearest - now))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        while worker.queue and worker.conn.poll():
                            index, score, status = worker.conn.recv()
                            worker.queue.popleft()  # answers come in the order the items were sent
                            worker.deadline = time.monotonic() + self.timeout_s  # the next item's own limit
                            scores[index] = score
                            timeouts += status == "timeout"
                            errors += status == "error"
                    except (EOFError, OSError):
                        errors += 1  # the worker died mid-item (e.g. killed by the OOM killer)
                        self._drop(worker, pending)
                elif time.monotonic() >= worker.deadline:
                    timeouts += 1  # hung past the hard limit: score stays 0
                    self._drop(worker, pending)
        n = len(items)
        metrics = {
            "verify/items": float(n),
            "verify/mean_score": sum(scores) / n if n else 0.0,
            "verify/timeouts": float(timeouts),
            "verify/errors": float(errors),
            "verify/seconds": time.monotonic() - start,
        }
        return scores, metrics

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._workers is None:
            return
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(2)
            if worker.process.is_alive():
                worker.kill()
            else:
                worker.conn.close()
        self._workers = None

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
