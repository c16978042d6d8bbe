"""What the driver does when an actor dies in the middle of a step.

Two kinds of loss:

- A verifier or rollout actor. Neither holds state a step depends on beyond a rollout engine's
  weights, which the policy still has. Ray restarts the actor (`trainer.actor_max_restarts`); the
  driver waits until it answers again, gives a rollout engine the policy's current weights, and
  sends the restarted actor the same share of the work (the same items, the same sampling seed),
  so the step's result is the one it would have had. Each restart counts in the step's
  `faults/<role>_restarts`.
- A training rank (policy, PRM, reference), a whole node, or a verifier/rollout actor past its
  restarts: state is lost. `JobLost` carries the cause to the driver, which rebuilds the actor
  groups and resumes from the last checkpoint (`launch/train.py`, `trainer.max_restarts`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, ObjectLostError, RayActorError

from workers.group import ActorGroup

log = logging.getLogger("prime")

# Errors that mean a process of the job (or its node) is gone, as opposed to an error raised by the
# code it ran (RayTaskError), which is a bug or bad input and ends the run.
LOST_ERRORS = (RayActorError, NodeDiedError, ObjectLostError)


class JobLost(Exception):
    """An actor whose state cannot be rebuilt in place is gone; the message says which and why."""


def lost_cause(error: BaseException) -> str:
    """One line naming what died, from a Ray error."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:400]


class Recovery:
    """Sends dealt work to a group's actors and re-sends the share of an actor that died.

    `resync[role]` runs after an actor of `role` is back (rollout: push the policy's weights to
    the restarted engine). `wait_s` bounds how long a restart may take before the loss is treated
    as permanent.
    """

    def __init__(self, max_restarts: int, resync: dict[str, Callable[[], None]] | None = None,
                 wait_s: float = 600.0) -> None:
        self.max_restarts, self.wait_s = max_restarts, wait_s
        self.resync = dict(resync or {})
        self.counts: dict[str, float] = {}

    def take_metrics(self) -> dict[str, float]:
        """`faults/*` counted since the last call (the step's)."""
        out, self.counts = self.counts, {}
        return out

    def gather(self, group: ActorGroup, calls: list[tuple[int, Callable[[Any], Any]]],
               submitted: list | None = None) -> list:
        """Results of `calls` in order; call `(i, submit)` runs `submit(group.actors[i])` (an ObjectRef).

        `submitted`: the calls' first tries, already sent (one ObjectRef per call); `submit` then
        only sends a retry. A call whose actor died is sent again to the restarted actor; an actor
        that cannot come back (restarts used up, or not back within `wait_s`) raises JobLost.
        """
        pending = dict(enumerate(submitted)) if submitted is not None else \
            {k: submit(group.actors[i]) for k, (i, submit) in enumerate(calls)}
        tries = [0] * len(calls)
        results: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1)
            k = next(key for key, ref in pending.items() if ref == ready[0])
            try:
                results[k] = ray.get(pending.pop(k))
            except LOST_ERRORS as e:
                i, submit = calls[k]
                tries[k] += 1
                if tries[k] > self.max_restarts:
                    raise JobLost(f"{group.name} actor {i} died {tries[k]} times in one call: {lost_cause(e)}") from e
                self.revive(group, i, e)
                pending[k] = submit(group.actors[i])
        return [results[k] for k in range(len(calls))]

    def revive(self, group: ActorGroup, index: int, error: BaseException) -> None:
        """Wait until Ray has restarted actor `index` of `group`, then let its role catch up."""
        log.warning("%s actor %d died (%s); waiting for its restart to send its share again",
                    group.name, index, lost_cause(error))
        t0 = time.monotonic()
        while True:
            try:
                ray.get(group.actors[index].__ray_ready__.remote(), timeout=max(1.0, self.wait_s))
                break
            except (ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() - t0 > self.wait_s:
                    raise JobLost(f"{group.name} actor {index} did not come back within {self.wait_s:.0f} s "
                                  f"after: {lost_cause(error)}") from error
                time.sleep(0.5)
            except ActorDiedError as e:
                raise JobLost(f"{group.name} actor {index} is gone for good "
                              f"(trainer.actor_max_restarts used up): {lost_cause(error)}") from e
        key = f"faults/{group.name}_restarts"
        self.counts[key] = self.counts.get(key, 0.0) + 1.0
        if group.name in self.resync:
            self.resync[group.name]()
        log.warning("%s actor %d is back after %.1f s; its share is sent again", group.name, index,
                    time.monotonic() - t0)


def dead_members(groups: dict[str, ActorGroup]) -> list[str]:
    """`"<role> <rank>"` of every actor that Ray reports dead or restarting."""
    from ray._private import state

    out = []
    for name, group in groups.items():
        for i, actor in enumerate(group.actors):
            try:
                info = state.actors(actor_id=actor._actor_id.hex())
            except Exception:  # the actor table is a debugging interface; no answer is no evidence
                continue
            if info and info.get("State") in ("DEAD", "RESTARTING"):
                out.append(f"{name} {i}")
    return out


def loss_cause(error: BaseException, groups: dict[str, ActorGroup]) -> str | None:
    """Why the job lost an actor, when `error` comes from such a loss; None for any other error.

    An error raised by an actor's own code counts when another actor of the job is dead: a rank
    whose collective lost its peer fails with a connection error, not with the peer's death.
    """
    if isinstance(error, JobLost):
        return str(error)
    if isinstance(error, LOST_ERRORS):
        dead = dead_members(groups)
        return f"{', '.join(dead) or 'an actor'} died ({lost_cause(error)})"
    if isinstance(error, ray.exceptions.RayTaskError):
        dead = dead_members(groups)
        if dead:
            return f"{', '.join(dead)} died (seen as: {lost_cause(error)})"
    return None


def gather_dealt(group: ActorGroup, calls: list[tuple[int, Callable[[Any], Any]]],
                 recovery: Recovery | None, submitted: list | None = None) -> list:
    """`recovery.gather`, or (no recovery) every call once, failing with the first lost actor."""
    if recovery is not None:
        return recovery.gather(group, calls, submitted)
    return ray.get(submitted if submitted is not None else [submit(group.actors[i]) for i, submit in calls])
