"""Pick the grader for a dataset row: math (math-verify) or code (sandboxed execution).

A row says what it is through ``kind``, ``ability`` or ``data_source`` (the verl / Eurus-2 RL
schema: ``ability`` is "math" or "code", ``data_source`` names the origin, e.g. "numina_olympiads",
"codecontests", "taco"). Names are matched word by word, case-insensitively, so "numina_cn_k12"
is math and "likaixin/TACO-verified" is code. Two graders exist, so this is an if/elif.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["KINDS", "resolve_kind", "ground_truth_of", "grade", "grade_with_status"]

KINDS = ("math", "code")
MATH_NAMES = frozenset(
    "math mathematics gsm8k aime amc olympiad olympiads numina deepscaler dapo competition_math "
    "hendrycks minerva omni".split()
)
CODE_NAMES = frozenset(
    "code coding apps taco codecontests code_contests codeforces leetcode livecodebench "
    "primeintellect humaneval mbpp".split()
)
_WORD_RE = re.compile(r"[a-z0-9]+")


def _classify(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return None
    lowered = name.strip().lower()
    words = set(_WORD_RE.findall(lowered)) | {lowered}
    if words & CODE_NAMES:
        return "code"
    if words & MATH_NAMES:
        return "math"
    return None


def resolve_kind(row_or_kind: Any) -> str:
    """``"math"`` or ``"code"`` for a kind name or a dataset row (``kind``/``ability``/``data_source``)."""
    if isinstance(row_or_kind, Mapping):
        names = [row_or_kind.get(k) for k in ("kind", "ability", "data_source")]
    else:
        names = [row_or_kind]
    for name in names:
        kind = _classify(name)
        if kind is not None:
            return kind
    shown = {k: row_or_kind.get(k) for k in ("kind", "ability", "data_source")} if isinstance(
        row_or_kind, Mapping
    ) else row_or_kind
    raise ValueError(
        f"unknown task type {shown!r}: valid kinds are {list(KINDS)}; math names: "
        f"{sorted(MATH_NAMES)}; code names: {sorted(CODE_NAMES)}"
    )


def ground_truth_of(row: Mapping) -> Any:
    """The ground truth of a row: ``reward_model.ground_truth`` (verl schema) or ``ground_truth``."""
    reward_model = row.get("reward_model")
    if isinstance(reward_model, Mapping) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    for key in ("ground_truth", "tests", "answer"):
        if key in row:
            return row[key]
    raise ValueError(
        f"row has no ground truth: expected reward_model.ground_truth, ground_truth, tests or "
        f"answer; keys are {sorted(row)}"
    )


def grade_with_status(
    row_or_kind: Any, response: Any, ground_truth: Any = None, *, timeout_s: float | None = None
) -> tuple[float, str]:
    """``(score, status)``; status is "ok", "timeout" (the grader ran out of time) or "error".

    A wrong or crashing *program* is status "ok" with a low score; "error" means the grader could
    not grade (e.g. malformed tests). Raises ValueError only for an unknown task type.
    """
    kind = resolve_kind(row_or_kind)
    if ground_truth is None and isinstance(row_or_kind, Mapping):
        ground_truth = ground_truth_of(row_or_kind)
    if kind == "math":
        from prime.verifiers import math as math_grader

        t = math_grader.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        return math_grader.score_with_status(response, ground_truth, timeout_s=t)
    from prime.verifiers import code as code_grader

    t = code_grader.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return code_grader.score(response, ground_truth, timeout_s=t), "ok"
    except Exception:  # noqa: BLE001 - malformed tests or a sandbox failure: counted, never raised
        return 0.0, "error"


def grade(row_or_kind: Any, response: Any, ground_truth: Any = None, *, timeout_s: float | None = None) -> float:
    """Score ``response`` with the grader for ``row_or_kind`` (a row dict or "math"/"code"/...).

    ``ground_truth`` defaults to the row's own (``reward_model.ground_truth``). ``timeout_s`` is the
    math comparison limit or the per-test-case limit of code; None uses each grader's default.
    """
    return grade_with_status(row_or_kind, response, ground_truth, timeout_s=timeout_s)[0]
