"""Verifier role: a CPU-only actor that grades rollouts with a pool of sandboxed grader processes.

The logic is :class:`prime.verifiers.pool.VerifierPool`; this class only gives it the role's verb
(`score`). `workers/group.py` makes it a Ray actor (``ActorGroup(VerifierWorker, n, num_cpus=...)``);
:func:`remote_verifier` does the same for a single actor. Ray is imported only inside that function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prime.verifiers.pool import VerifierPool


class VerifierWorker:
    """Grades batches of `{kind|ability|data_source, response, ground_truth}` items."""

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 30.0,
        math_timeout_s: float = 5.0,
        code_case_timeout_s: float = 4.0,
    ) -> None:
        self.pool = VerifierPool(
            num_workers,
            timeout_s,
            math_timeout_s=math_timeout_s,
            code_case_timeout_s=code_case_timeout_s,
        )

    def score(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, float]]:
        """Scores in item order and `verify/*` metrics (see VerifierPool.score)."""
        return self.pool.score(items)

    def shutdown(self) -> None:
        self.pool.close()


def remote_verifier(num_cpus: float = 2.0, **kwargs: Any):
    """One `VerifierWorker` Ray actor reserving `num_cpus` CPUs and no GPU (Ray must be initialised).

    `num_workers` defaults to the reserved CPU count (at least 1).
    """
    import ray

    kwargs.setdefault("num_workers", max(1, int(num_cpus)))
    return ray.remote(num_cpus=num_cpus, num_gpus=0)(VerifierWorker).remote(**kwargs)
