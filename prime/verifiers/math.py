"""Math outcome grader: final-answer extraction + symbolic equivalence through math-verify.

``score(response, ground_truth)`` is 1.0 when the response's final answer equals the ground truth
and 0.0 otherwise (also for empty, odd or unparsable input; it never raises).

Final answer, in order of preference:
1. the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` whose braces balance;
2. the text after the last "final answer is" / "the answer is" / "answer:" (up to the end of that
   line; the first ``$...$`` in it when there is one);
3. the last number in the response (``-12``, ``1,000``, ``3.5``, ``3/4``).

Both sides are normalised (surrounding ``$``, LaTeX spacing ``\\,`` ``\\!`` ``\\;`` ``\\:``,
``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, thousands separators ``1,000`` and ``1{,}000``)
and then compared with ``math_verify.verify`` (numbers to 6 decimal places, fractions, radicals,
sets in any order, intervals with their open/closed ends, ``x=3`` against ``3``, ``\\text{}``
units dropped). Percentages follow math-verify: ``50\\%`` matches both ``50`` and ``0.5``,
because datasets state percentage answers both ways.

Time: parsing and comparison run under :func:`prime.verifiers.deadline.time_limit` (works in
any thread), with math-verify's own signal-based timeouts disabled. A single long C-level sympy
call can still overrun; :class:`prime.verifiers.pool.VerifierPool` is the hard bound.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from prime.verifiers.deadline import GradingTimeout, time_limit

__all__ = ["score", "score_with_status", "extract_answer", "normalize_answer", "last_boxed"]

# Answers longer than this are not math answers; refusing them keeps sympy away from huge input.
MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 5.0

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is\s*:?|:)\s*", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_MATH_ENV_RE = re.compile(r"\$\$?(.+?)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACING_RE = re.compile(r"\\[,!;:> ]|\\q?quad(?![A-Za-z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\[bB]igg?[lr]?(?![A-Za-z])")
# A plain integer literal (ASCII digits only): two of them compare as integers, as math-verify would.
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its own timeout is off; here that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_mv = None


def _math_verify():
    """Import math-verify (and sympy) on first use: importing prime.verifiers stays cheap."""
    global _mv
    if _mv is None:
        import math_verify

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _mv = math_verify
    return _mv


# ---------------------------------------------------------------------------------------------
# Extraction


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``, or None when it never closes.

    ``\\{`` and ``\\}`` are literal braces in LaTeX and do not count.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}`` with balanced braces (or ``\\boxed 5``)."""
    matches = list(_BOXED_RE.finditer(text))
    for match in reversed(matches):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _balanced_group(text, i)
            if content is not None:
                return content
        elif i > match.end():  # "\boxed 5": the argument is the next token
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def _answer_is(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :]
    line = rest.split("\n", 1)[0].strip()
    env = _MATH_ENV_RE.search(line)
    if env:
        line = next(g for g in env.groups() if g is not None)
    line = line.strip().rstrip(".").strip()
    return line or None


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return last.group(0) if last else None


def extract_answer(response: str) -> str | None:
    """The final answer of a model response (boxed > "answer is" > last number), or None."""
    if not isinstance(response, str) or not response.strip():
        return None
    for extractor in (last_boxed, _answer_is, _last_number):
        answer = extractor(response)
        if answer is not None and answer.strip():
            return answer.strip()
    return None


# ---------------------------------------------------------------------------------------------
# Normalisation and comparison


def normalize_answer(answer: str) -> str:
    """Cosmetic LaTeX clean-up before parsing (spacing, delimiters, thousands separators)."""
    s = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = _SPACING_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def _parse(answer: str) -> list:
    mv = _math_verify()
    config = [
        mv.LatexExtractionConfig(boxed_match_priority=0),
        mv.ExprExtractionConfig(),
    ]
    return mv.parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)


def _gold_answers(ground_truth: Any) -> list[str]:
    if ground_truth is None:
        return []
    if isinstance(ground_truth, (list, tuple)):
        out = []
        for g in ground_truth:
            out.extend(_gold_answers(g))
        return out
    if isinstance(ground_truth, bool):
        return []
    text = str(ground_truth).strip()
    if not text:
        return []
    boxed = last_boxed(text)
    return [boxed if boxed is not None else text]


def _equivalent(gold: str, pred: str) -> bool:
    gold_n, pred_n = normalize_answer(gold), normalize_answer(pred)
    if not gold_n or not pred_n:
        return False
    if gold_n == pred_n:
        return True
    if _INTEGER_RE.fullmatch(gold_n) and _INTEGER_RE.fullmatch(pred_n):
        # Same verdict as math-verify (tests/verifiers/test_math.py checks it) at about 1/50 of its
        # cost; most answers of arithmetic tasks are integers, and most of them are wrong early on.
        return int(gold_n) == int(pred_n)
    gold_parsed, pred_parsed = _parse(gold_n), _parse(pred_n)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None))


def score_with_status(
    response: Any, ground_truth: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> tuple[float, str]:
    """Like :func:`score`, also saying how grading ended: ``"ok"``, ``"timeout"`` or ``"error"``.

    ``"error"`` means the grader itself failed (a bug or a math-verify crash), not a wrong answer.
    """
    try:
        pred = extract_answer(response)
        golds = _gold_answers(ground_truth)
        if pred is None or not golds or len(pred) > MAX_ANSWER_CHARS:
            return 0.0, "ok"
        with time_limit(timeout_s):
            hit = any(_equivalent(g, pred) for g in golds if len(g) <= MAX_ANSWER_CHARS)
        return (1.0 if hit else 0.0), "ok"
    except GradingTimeout:
        return 0.0, "timeout"
    except Exception:  # noqa: BLE001 - a grader must never take the training step down
        logging.getLogger(__name__).debug("math grading failed", exc_info=True)
        return 0.0, "error"


def score(response: Any, ground_truth: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the final answer of ``response`` equals ``ground_truth``, else 0.0. Never raises.

    ``ground_truth`` may be a string (plain, LaTeX, or containing ``\\boxed{}``), a number, or a
    list of acceptable answers. ``timeout_s`` bounds parsing + comparison (None: unbounded).
    """
    return score_with_status(response, ground_truth, timeout_s)[0]
