"""Preemption: SIGTERM makes the driver checkpoint and exit 0 within `trainer.preempt_grace_s`.

SLURM (`#SBATCH --signal=B:TERM@<seconds>`, forwarded to the driver by launch/cluster/slurm.sbatch)
and Kubernetes (a preStop hook within `terminationGracePeriodSeconds`, launch/cluster/
kuberay_rayjob.yaml) announce the end of a job with SIGTERM some time before they kill it. On
SIGTERM the driver:

1. lets the current step finish, then logs it, writes its checkpoint and exits 0; or
2. when the step would not leave time to save (the deadline is the grace period minus twice the
   last save's duration, or minus 30% of the grace before any save), abandons it, provided it is
   still generating, grading or computing log-probs: nothing in the actors has changed yet, so the
   driver puts back the prompt sampler and RNG state of the step's start and checkpoints the
   previous step. A step whose PRM or policy update has begun is finished instead (its state can
   only be saved whole).

The requeued job (SLURM `--requeue`, or the same command run again) resumes by itself through
`trainer.resume=auto`. SIGTERM before the first step, or a second one, changes nothing: the run
stops at the next point it can.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("prime")


class StepAbandoned(Exception):
    """Raised inside a step's early stages when the preemption deadline arrives."""


class Preemption:
    """The driver's SIGTERM (and deadline SIGALRM) handlers and the state they share with the loop."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested_at: float | None = None
        self.save_estimate_s: float | None = None
        """Seconds the last checkpoint took (set by the loop)."""
        self._abandonable = False
        self._deadline_passed = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def install(self) -> None:
        """Take SIGTERM and SIGALRM (again: `ray.init` puts in a SIGTERM handler of its own)."""
        for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGALRM, self._on_deadline)):
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, handler)

    def uninstall(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def abandon_after_s(self) -> float:
        """Seconds after SIGTERM at which a step still in its early stages is abandoned."""
        reserve = 2 * self.save_estimate_s if self.save_estimate_s is not None else 0.3 * self.grace_s
        return max(0.001, self.grace_s - reserve)

    def _on_term(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested_at = time.monotonic()
        log.warning("SIGTERM: finishing the current step, then a checkpoint and exit 0 (grace %.0f s)", self.grace_s)
        signal.setitimer(signal.ITIMER_REAL, self.abandon_after_s())

    def _on_deadline(self, signum, frame) -> None:
        self._deadline_passed = True
        if self._abandonable:
            self._abandonable = False
            raise StepAbandoned(f"preemption deadline ({self.abandon_after_s():.0f} s after SIGTERM) reached")

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """The stages of a step that change no actor's state: the deadline may interrupt them."""
        if self._deadline_passed:
            raise StepAbandoned("preemption deadline reached before the step began")
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False
