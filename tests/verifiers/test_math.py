"""Table-driven tests of the math grader: extraction, equivalences, near-misses, odd input."""

import threading
import time

import pytest

from prime.verifiers import math as math_grader

# (response, ground truth, expected score, why)
CASES = [
    # --- extraction ---
    (r"so the result is \boxed{5}.", "5", 1.0, "plain boxed"),
    (r"first \boxed{4}, on second thought \boxed{5}", "5", 1.0, "last boxed wins"),
    (r"first \boxed{5}, on second thought \boxed{4}", "5", 0.0, "earlier boxed ignored"),
    (r"\fbox{7}", "7", 1.0, "fbox"),
    (r"\boxed{\frac{1}{2}}", r"\frac12", 1.0, "nested braces inside boxed"),
    (r"\boxed 9", "9", 1.0, "boxed without braces"),
    (r"\boxed{3} and then \boxed{4", "3", 1.0, "unbalanced last boxed skipped"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", 1.0, "escaped braces do not unbalance"),
    ("The answer is 42.", "42", 1.0, "'answer is' without boxed"),
    (r"Therefore, the final answer is $\frac{3}{4}$. I hope", "0.75", 1.0, "'final answer is' + math env"),
    ("Answer: 17", "17", 1.0, "'Answer:'"),
    ("We add 2 and 3 to get 5", "5", 1.0, "last number fallback"),
    ("We add 2 and 3 to get 5 apples, 6 pears", "5", 0.0, "last number is 6"),
    ("It costs -3 dollars", "-3", 1.0, "negative last number"),
    # --- numeric / symbolic equivalence ---
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, "decimal vs fraction"),
    (r"\boxed{\frac12}", "0.5", 1.0, "short frac vs decimal"),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0, "slash fraction"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", 1.0, "dfrac vs frac"),
    (r"\boxed{\tfrac{3}{4}}", "3/4", 1.0, "tfrac"),
    (r"\boxed{0.33}", "1/3", 0.0, "0.33 is not 1/3 (6-decimal rounding)"),
    (r"\boxed{0.333333}", "1/3", 1.0, "1/3 to 6 decimals"),
    (r"\boxed{1,000}", "1000", 1.0, "thousands separator"),
    (r"\boxed{1{,}000{,}000}", "1000000", 1.0, "LaTeX thousands separator"),
    (r"\boxed{1\,000}", "1000", 1.0, "thin-space thousands separator"),
    (r"\boxed{3.0}", "3", 1.0, "trailing zero"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0, "radicals"),
    (r"\boxed{\sqrt{2}}", "1.414", 0.0, "radical vs rough decimal"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0, "polynomial identity"),
    (r"\boxed{x+2}", "x+1", 0.0, "different polynomial"),
    (r"\boxed{\pi}", "3.14159", 0.0, "pi vs decimal approximation"),
    (r"\boxed{2\pi}", r"2 \pi", 1.0, "spacing"),
    # --- equations, sets, intervals ---
    (r"\boxed{x=3}", "3", 1.0, "assignment vs value"),
    (r"\boxed{x = 3}", "4", 0.0, "assignment to the wrong value"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0, "sets are unordered"),
    (r"\boxed{\{1,2\}}", r"\{1,3\}", 0.0, "different sets"),
    (r"\boxed{[1,2)}", "(1,2]", 0.0, "interval ends differ"),
    (r"\boxed{[1,2)}", "[1,2)", 1.0, "same interval"),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1.0, "infinite interval"),
    (r"\boxed{\left( 5 \right)}", "5", 1.0, "left/right delimiters"),
    (r"\boxed{\left[1,2\right)}", "[1,2)", 1.0, "left/right around interval"),
    # --- percentages and units (documented choice: percent follows math-verify) ---
    (r"\boxed{50\%}", "50", 1.0, "percent vs its number"),
    (r"\boxed{50\%}", "0.5", 1.0, "percent vs fraction of one"),
    (r"\boxed{40\%}", "0.5", 0.0, "wrong percent"),
    (r"\boxed{10\text{ cm}}", "10", 1.0, "text unit dropped"),
    (r"\boxed{12^\circ}", "12", 1.0, "degrees"),
    (r"\boxed{\$5}", "5", 1.0, "currency"),
    # --- ground-truth shapes ---
    (r"\boxed{6}", r"$6$", 1.0, "ground truth in dollars"),
    (r"\boxed{6}", r"\boxed{6}", 1.0, "ground truth boxed"),
    (r"\boxed{6}", 6, 1.0, "ground truth is a number"),
    (r"\boxed{6}", ["5", "6"], 1.0, "list of acceptable answers"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}", 1.0, "identical text answer"),
    # --- odd input: score 0, never raise ---
    ("", "5", 0.0, "empty response"),
    ("   \n ", "5", 0.0, "blank response"),
    (None, "5", 0.0, "None response"),
    (12345, "5", 0.0, "non-string response"),
    (r"\boxed{5}", None, 0.0, "None ground truth"),
    (r"\boxed{5}", "", 0.0, "empty ground truth"),
    ("no numbers here at all", "5", 0.0, "nothing to extract"),
    (r"\boxed{{{{{", "5", 0.0, "unbalanced braces only"),
    (r"\boxed{\frac{}{}}", "5", 0.0, "malformed LaTeX"),
    ("\\boxed{" + "1+" * 5000 + "1}", "5001", 0.0, "answer too long: refused"),
    ("word " * 200_000 + r"\boxed{7}", "7", 1.0, "huge response, boxed at the end"),
    ("\x00\xff\u202e" + r"\boxed{7}", "7", 1.0, "control characters around"),
]


@pytest.mark.parametrize("response,ground_truth,expected,why", CASES, ids=[c[3] for c in CASES])
def test_math_score_table(response, ground_truth, expected, why):
    assert math_grader.score(response, ground_truth) == expected, why


def test_case_count():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    "response,answer",
    [
        (r"a \boxed{1} b \boxed{2}", "2"),
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
        ("The answer is $x^2$.\nMore text", "x^2"),
        ("we get 3/4 in the end", "3/4"),
        ("", None),
        ("no digits", None),
    ],
)
def test_extract_answer(response, answer):
    assert math_grader.extract_answer(response) == answer


def test_normalize_answer():
    # Spacing commands and delimiters are cosmetic; thousands separators are dropped.
    assert math_grader.normalize_answer(r"$1{,}234{,}567$") == "1234567"
    assert math_grader.normalize_answer(r"\!2\;\pi\, ") == r"2\pi"
    assert math_grader.normalize_answer(r"\left(1,2\right)") == "(1,2)"
    # "1,2" is not a thousands-separated number (2 digits after the comma): kept.
    assert math_grader.normalize_answer("1,2") == "1,2"


@pytest.mark.parametrize(
    "gold,pred",
    [("7", "007"), ("0", "-0"), ("5", "+5"), ("-1", "-1"), ("12", "21"), ("-3", "3"), ("00", "0"), ("1", "01"),
     ("123456789012345678901234567890", "123456789012345678901234567890"),
     ("123456789012345678901234567890", "123456789012345678901234567891"), ("+0", "0"), ("-12", "-012")],
)
def test_integer_answers_compare_as_math_verify_does(gold, pred):
    # Two integer literals skip math-verify's parse; the verdict must be the one it gives.
    mv = math_grader._math_verify()
    want = bool(mv.verify(math_grader._parse(gold), math_grader._parse(pred), timeout_seconds=None))
    assert math_grader._equivalent(gold, pred) is want
    assert math_grader._INTEGER_RE.fullmatch(gold) and math_grader._INTEGER_RE.fullmatch(pred)


@pytest.mark.parametrize("gold,pred", [("100", "1e2"), ("1", "1.0"), ("1000", "1,000"), ("٣", "3")])
def test_non_integer_literals_still_go_through_math_verify(gold, pred):
    # Exponents, decimals, separators and non-ASCII digits are not plain integer literals.
    assert not (math_grader._INTEGER_RE.fullmatch(gold) and math_grader._INTEGER_RE.fullmatch(pred))


def test_works_from_a_worker_thread():
    # math-verify's own alarm-based timeout fails outside the main thread; ours does not.
    out = []
    t = threading.Thread(target=lambda: out.append(math_grader.score(r"\boxed{0.5}", r"\frac12")))
    t.start()
    t.join(30)
    assert out == [1.0]


def test_slow_comparison_is_bounded(monkeypatch):
    # A comparison stuck in Python code is interrupted by the time limit and scores 0.
    def stuck(gold, pred):
        while True:
            time.sleep(0.001)

    monkeypatch.setattr(math_grader, "_equivalent", stuck)
    start = time.monotonic()
    assert math_grader.score_with_status(r"\boxed{1}", "1", timeout_s=0.3) == (0.0, "timeout")
    assert time.monotonic() - start < 2.0
