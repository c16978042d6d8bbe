"""Verifier role: a CPU-only actor that grades rollouts with a pool of sandboxed grader processes.

The logic is :class:`prime.verifiers.pool.VerifierPool`; this class only gives it the role's verb
(`score`). `workers/group.py` makes it a Ray actor (``ActorGroup(VerifierWorker, n, num_cpus=...)``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prime.verifiers.pool import VerifierPool
from workers import failpoints
from workers.lane import LaneServer


def grading_items(prompts: Sequence[Mapping[str, Any]], completions: Sequence[Sequence[Any]]) -> list[dict]:
    """One item per response, prompt by prompt: its prompt's `{ability, data_source, ground_truth}`
    and the response's text."""
    return [dict(p, response=c.text) for p, comps in zip(prompts, completions) for c in comps]


class VerifierWorker(LaneServer):
    """Grades batches of `{kind|ability|data_source, response, ground_truth}` items."""

    def __init__(self, *, num_workers: int, timeout_s: float, code_case_timeout_s: float) -> None:
        self.pool = VerifierPool(num_workers, timeout_s, code_case_timeout_s=code_case_timeout_s)

    def score(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, float]]:
        """Scores in item order and `verify/*` metrics (see VerifierPool.score)."""
        failpoints.reach("verifier.score")
        return self.pool.score(items)

    def score_generated(self, generated: tuple[list[list[Any]], float, float],
                        prompts: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, float]]:
        """Grade one engine's share as it comes out of `RolloutWorker.generate`, without the driver
        in between: `generated` is that call's result (Ray passes it in place of its ObjectRef),
        `prompts` the share's `{ability, data_source, ground_truth}` in prompt order. Scores in
        response order (prompt by prompt), `verify/*` metrics, and `verify/started_at` (wall
        clock) so the driver can tell how much grading ran while other engines still generated."""
        started_at = time.time()
        scores, metrics = self.score(grading_items(prompts, generated[0]))
        return scores, metrics | {"verify/started_at": started_at}

    def shutdown(self) -> None:
        self.pool.close()
