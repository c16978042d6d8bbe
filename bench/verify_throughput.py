"""Graded items per second of the verifier pool, for math and for code.

    python bench/verify_throughput.py --workers 2 --math-items 400 --code-items 48

Math: a mix of boxed fractions, radicals, polynomials, sets, "answer is" and wrong answers.
Code: stdin/stdout problems with 4 test cases each; of every 8 responses, 4 are correct, 2 wrong,
1 partially correct and 1 loops forever (each of its cases runs into the per-case timeout).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prime.verifiers.pool import VerifierPool  # noqa: E402

MATH_TEMPLATES = [
    (r"so the result is \boxed{\frac{%d}{%d}}", lambda a, b: f"{a / b:.6f}"),
    (r"We get \boxed{%d\sqrt{%d}}.", lambda a, b: rf"\sqrt{{{a * a * b}}}"),
    (r"Expanding, \boxed{(x+%d)(x+%d)}", lambda a, b: f"x^2+{a + b}x+{a * b}"),
    (r"The set is \boxed{\{%d, %d\}}", lambda a, b: rf"\{{{b},{a}\}}"),
    ("Thus the answer is %d + %d.", lambda a, b: str(a + b)),
    (r"\boxed{%d}, or maybe %d", lambda a, b: str(a + 1)),  # wrong on purpose
]

PROGRAMS = [
    "a, b = map(int, input().split())\nprint(a + b)",  # correct
    "import sys\nprint(sum(map(int, sys.stdin.read().split())))",  # correct
    "a, b = map(int, input().split())\nprint(a + b)",  # correct
    "x = input().split()\nprint(int(x[0]) + int(x[1]))",  # correct
    "a, b = map(int, input().split())\nprint(a - b)",  # wrong
    "print(0)",  # wrong
    "a, b = map(int, input().split())\nprint(a + b if a < 3 else a * b)",  # partial (2 of 4)
    "while True:\n    pass",  # timeout on every case
]
CODE_TESTS = {"inputs": ["1 2\n", "2 5\n", "3 4\n", "10 20\n"], "outputs": ["3\n", "7\n", "7\n", "30\n"]}


def math_items(n: int) -> list[dict]:
    items = []
    for i in range(n):
        template, truth = MATH_TEMPLATES[i % len(MATH_TEMPLATES)]
        a, b = 2 + i % 7, 3 + i % 5
        items.append({"ability": "math", "response": template % (a, b), "ground_truth": truth(a, b)})
    return items


def code_items(n: int) -> list[dict]:
    return [
        {"ability": "code", "response": f"```python\n{PROGRAMS[i % len(PROGRAMS)]}\n```", "ground_truth": CODE_TESTS}
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="grading processes")
    parser.add_argument("--math-items", type=int, default=400)
    parser.add_argument("--code-items", type=int, default=48)
    parser.add_argument("--case-timeout", type=float, default=1.0, help="seconds per code test case")
    args = parser.parse_args()

    rows = []
    with VerifierPool(args.workers, timeout_s=30.0, code_case_timeout_s=args.case_timeout) as pool:
        pool.score(math_items(4) + code_items(2))  # warm-up: workers import sympy, first sandbox
        no_loops = [it for it in code_items(args.code_items) if "while True" not in it["response"]]
        batches = (
            ("math", math_items(args.math_items)),
            ("code", code_items(args.code_items)),
            ("code*", no_loops),
        )
        for kind, items in batches:
            start = time.monotonic()
            scores, metrics = pool.score(items)
            seconds = time.monotonic() - start
            rows.append((kind, args.workers, len(items), seconds, len(items) / seconds,
                         metrics["verify/mean_score"], int(metrics["verify/timeouts"]), int(metrics["verify/errors"])))

    print(f"cpu cores: {os.cpu_count()}, code case timeout: {args.case_timeout:g} s")
    header = f"{'kind':<6}{'workers':>8}{'items':>7}{'seconds':>9}{'items/s':>9}{'mean':>7}{'timeouts':>9}{'errors':>7}"
    print(header)
    print("-" * len(header))
    for kind, workers, n, seconds, rate, mean, timeouts, errors in rows:
        print(f"{kind:<6}{workers:>8}{n:>7}{seconds:>9.2f}{rate:>9.1f}{mean:>7.3f}{timeouts:>9}{errors:>7}")
    print("code*: the same mix without the looping programs (sandbox + execution cost only)")


if __name__ == "__main__":
    main()
