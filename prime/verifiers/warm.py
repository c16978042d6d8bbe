"""Grade a few answers once, so the lazy parts of math grading are built before grading workers fork.

The grading pool (`prime.verifiers.pool`) imports this module in its forkserver, after math-verify.
The first answers a process grades build math-verify's LaTeX grammar and sympy's parsers on demand:
measured on a 2-core CPU, about 0.9 s for the first malformed `\\boxed` answer and 0.5 s for the
first symbolic one, against milliseconds afterwards. Built here once, every forked worker (and every
replacement of a killed one) inherits them, so those seconds do not land in a training step.
"""

from __future__ import annotations

from prime.verifiers.math import score

# (response, ground truth): a malformed box, a symbolic answer, a fraction, a plain number.
WARM_ITEMS = (
    ("so \\boxed +|4}, fin", "7"),
    ("the answer is \\boxed{x+1}", "3"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{12}", "12"),
)

for _response, _truth in WARM_ITEMS:
    score(_response, _truth)
