"""Code outcome grader: run the response's last Python block against test cases, sandboxed.

``score(response, tests)`` is the fraction of test cases passed (1.0 only when all pass). Tests
follow the APPS / TACO convention, as a dict or its JSON string:

- stdin/stdout: ``{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}`` (an entry may also be a
  list of lines);
- call-based: ``{"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}``, where each input
  is the argument list and each output the expected return value, possibly wrapped in a
  one-element list as TACO does (``[3]``); both forms are accepted. The function is a top-level
  ``def`` or a method of ``class Solution``.

A stdin/stdout case passes when the program exits with status 0 within the time limit and its
stdout equals the expected output token by token (whitespace and line breaks are not
significant; two numbers with a decimal point or exponent match within 1e-6 absolute or relative;
integers and words must match exactly). A call-based case passes when the returned value equals
the expected one (tuples as lists, floats within 1e-6). Comparison happens in the grading process,
outside the sandbox; expected outputs never enter it.

All cases of one response run in one sandbox (see :mod:`prime.verifiers.sandbox`), each case in a
fresh forked child, so a crash or timeout fails only its own case. Programs may import the standard
library and the packages in ``sandbox.ALLOWED_PACKAGES`` (numpy); they see no file of the host
beyond those and the system's shared libraries.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from prime.config import VerifierConfig
from prime.verifiers.sandbox import CaseRun, SandboxLimits, run_program

__all__ = [
    "score",
    "score_cases",
    "extract_code",
    "parse_tests",
    "outputs_match",
    "values_match",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = VerifierConfig.code_test_timeout_s  # the config's default, the one source of it
FLOAT_TOL = 1e-6
# A case may print up to twice its expected output plus this before it is cut off.
_OUTPUT_SLACK_BYTES = 64 * 1024

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"", "python", "py", "python3", "py3"}
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def extract_code(response: Any) -> str | None:
    """The last fenced code block tagged python/py/python3 or untagged, or None."""
    if not isinstance(response, str):
        return None
    last = None
    for match in _FENCE_RE.finditer(response):
        if match.group(1).lower() in _PY_TAGS:
            last = match.group(2)
    if last is None or not last.strip():
        return None
    return last


def parse_tests(tests: Any) -> tuple[list[Any], list[Any], str | None]:
    """``(inputs, outputs, fn_name)`` from an APPS/TACO test spec (dict or JSON string)."""
    if isinstance(tests, (str, bytes)):
        try:
            tests = json.loads(tests)
        except ValueError as e:
            raise ValueError(f"tests is not valid JSON ({e}); expected {{'inputs': [...], 'outputs': [...]}}") from e
    if not isinstance(tests, Mapping):
        raise ValueError(
            f"tests must be a dict (or its JSON) with 'inputs' and 'outputs' lists, got {type(tests).__name__}"
        )
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError(
            f"tests needs 'inputs' and 'outputs' lists, got keys {sorted(tests)} "
            f"(inputs: {type(inputs).__name__}, outputs: {type(outputs).__name__})"
        )
    if len(inputs) != len(outputs):
        raise ValueError(f"tests has {len(inputs)} inputs but {len(outputs)} outputs")
    fn_name = tests.get("fn_name") or None
    if fn_name is not None and not isinstance(fn_name, str):
        raise ValueError(f"tests['fn_name'] must be a string, got {fn_name!r}")
    return inputs, outputs, fn_name


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return "" if value is None else str(value)


def _norm_int(token: str) -> str:
    digits = token.lstrip("+-").lstrip("0") or "0"
    return ("-" if token.startswith("-") and digits != "0" else "") + digits


def _tokens_match(got: str, expected: str) -> bool:
    if got == expected:
        return True
    if _INT_RE.fullmatch(got) and _INT_RE.fullmatch(expected):
        return _norm_int(got) == _norm_int(expected)  # exact, however long: no float rounding
    if _FLOAT_RE.fullmatch(got) and _FLOAT_RE.fullmatch(expected):
        a, b = float(got), float(expected)
        return math.isclose(a, b, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
    return False


def outputs_match(got: str, expected: str) -> bool:
    """Token-wise equality of program output and expected output (see module docstring)."""
    got_tokens, expected_tokens = got.split(), expected.split()
    if len(got_tokens) != len(expected_tokens):
        return False
    return all(_tokens_match(g, e) for g, e in zip(got_tokens, expected_tokens))


def values_match(got: Any, expected: Any) -> bool:
    """Equality of JSON-like values: tuples as lists, floats within 1e-6, bools only to bools."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return isinstance(expected, bool) and isinstance(got, bool) and got == expected
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expected, int) and isinstance(got, int):
            return got == expected
        if math.isnan(expected) or math.isnan(got):
            return math.isnan(expected) and math.isnan(got)
        return math.isclose(got, expected, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(values_match(g, e) for g, e in zip(got, expected))
    if isinstance(expected, dict) and isinstance(got, dict):
        return set(got) == set(map(str, expected)) and all(
            values_match(got[str(k)], v) for k, v in expected.items()
        )
    if isinstance(expected, str) and isinstance(got, str):
        return got == expected
    return False


def _call_case_passed(run: CaseRun, expected: Any) -> bool:
    if not (run.ok and run.has_result):
        return False
    if values_match(run.result, expected):
        return True
    # TACO wraps expected return values in a one-element list.
    return isinstance(expected, list) and len(expected) == 1 and values_match(run.result, expected[0])


def score_cases(
    response: Any,
    tests: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    limits: SandboxLimits | None = None,
) -> tuple[list[bool], list[CaseRun]]:
    """Per-case pass/fail and the raw sandbox outcomes. No code block: every case fails, nothing runs.

    Raises ValueError only for a malformed ``tests`` spec (a dataset problem, not a response one).
    """
    inputs, outputs, fn_name = parse_tests(tests)
    code = extract_code(response)
    if code is None or not inputs:
        return [False] * len(inputs), []
    if limits is None:
        limits = SandboxLimits(timeout_s=timeout_s)
    if fn_name is not None:
        runs = run_program(code, inputs, mode="call", fn_name=fn_name, limits=limits)
        return [_call_case_passed(r, e) for r, e in zip(runs, outputs)], runs
    stdin_texts = [_as_text(i) for i in inputs]
    expected = [_as_text(o) for o in outputs]
    caps = [max(limits.max_output_bytes, 2 * len(e.encode()) + _OUTPUT_SLACK_BYTES) for e in expected]
    runs = run_program(code, stdin_texts, mode="stdio", limits=limits, output_caps=caps)
    return [r.ok and outputs_match(r.stdout, e) for r, e in zip(runs, expected)], runs


def score(
    response: Any,
    tests: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    limits: SandboxLimits | None = None,
) -> float:
    """Fraction of test cases the response's last Python block passes (0.0 .. 1.0).

    ``timeout_s`` is the wall-clock limit per case; ``limits`` (optional) sets all sandbox limits
    and then takes precedence. A spec with no cases scores 0.0.
    """
    passed, _ = score_cases(response, tests, timeout_s=timeout_s, limits=limits)
    return sum(passed) / len(passed) if passed else 0.0
