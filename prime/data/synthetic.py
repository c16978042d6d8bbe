"""Synthetic tasks in the verl schema, for the CPU demo and tests.

- arithmetic: "Compute 7+5. Put the final answer in \\boxed{}." with ground truth "12"
  (ability "math", graded by the math verifier);
- arithmetic chains: "Compute 3+5+2-4. ..." with ground truth "6" and a worked solution of one
  step per line ("3+5=8\\n8+2=10\\n10-4=6\\n\\boxed{6}") for supervised warm starts; every
  expression belongs to exactly one of the splits "train" and "test" (chosen by a hash of the
  expression), so a held-out evaluation never sees a training instance while the one-step facts
  (8+2=10) are shared;
- code: tiny stdin/stdout programs ("read two integers and print their sum") with APPS-style
  tests {"inputs": [...], "outputs": [...]} stored as a JSON string (ability "code").

Rows are a pure function of (n, seed, options); the writers pick parquet or jsonl by the file
extension. Command line: `prime make-data OUT --kind arith_chain --split test --n 512`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import json
import operator
import os
import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

ARITH_OPS = ("+", "-", "*", "/")
ARITH_SOURCE = "synthetic/arith"
CHAIN_SOURCE = "synthetic/arith_chain"
CHAIN_OPS = ("+", "-")
SPLITS = ("train", "test")
CODE_SOURCE = "synthetic/code"
ARITH_TEMPLATE = "Compute {expr}. Put the final answer in \\boxed{{}}."

_AST_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}


def eval_arith(expr: str) -> Fraction:
    """Exactly evaluate an expression of integers and + - * / with the usual precedence.

    Used to compute ground truths (and by tests to recompute them); anything other than integer
    literals, the four operators and unary minus is rejected.
    """
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _AST_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported element {ast.dump(node)} in arithmetic expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _check_expression_args(n: int, max_operand: int, num_terms: int, template: str) -> None:
    """Raise naming the first out-of-range argument shared by the arithmetic generators."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if num_terms < 2:
        raise ValueError(f"num_terms must be >= 2, got {num_terms}")
    if "{expr}" not in template:
        raise ValueError(f"template must contain '{{expr}}', got {template!r}")


def _check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    ops = tuple(ops)
    bad = [o for o in ops if o not in ARITH_OPS]
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of {ARITH_OPS}, got {ops!r}")
    return ops


def arithmetic_rows(
    n: int,
    seed: int = 0,
    max_operand: int = 10,
    ops: Sequence[str] = ("+", "-", "*"),
    num_terms: int = 2,
    template: str = ARITH_TEMPLATE,
) -> list[dict]:
    """Generate `n` arithmetic prompts in the verl schema.

    Args:
        n: number of rows.
        seed: random seed; the same arguments always give the same rows.
        max_operand: operands are drawn from 0..max_operand (divisors from 1..max_operand).
        ops: operators to use, a subset of + - * /. Expressions whose exact value is not an
            integer (possible with /) are redrawn, so every ground truth is an integer.
        num_terms: operands per expression (difficulty); precedence is the usual one.
        template: user message with an `{expr}` slot.
    """
    _check_expression_args(n, max_operand, num_terms, template)
    ops = _check_ops(ops)
    rng = random.Random(seed)
    rows = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):
            raise ValueError(f"could not draw integer-valued expressions with ops={ops!r}, "
                             f"num_terms={num_terms}, max_operand={max_operand}; use fewer '/' terms")
        terms = [str(rng.randint(0, max_operand))]
        for _ in range(num_terms - 1):
            op = rng.choice(ops)
            low = 1 if op == "/" else 0
            terms += [op, str(rng.randint(low, max_operand))]
        expr = "".join(terms)
        value = eval_arith(expr)  # divisors are >= 1, so this never divides by zero
        if value.denominator != 1:
            continue
        rows.append({
            "data_source": ARITH_SOURCE,
            "prompt": [{"role": "user", "content": template.format(expr=expr)}],
            "ability": "math",
            "reward_model": {"ground_truth": str(value.numerator), "style": "rule"},
            "extra_info": {"index": len(rows), "split": "train", "expression": expr},
        })
    return rows


# Enumerating a split is cheap up to this many expressions (the default, 4 operands of 0..9 joined by
# + or -, has 10**4 * 2**3 = 80,000).
MAX_CHAIN_INSTANCES = 2_000_000
_CHAIN_RE = re.compile(r"\d+(?:[+-]\d+)+")


def chain_split(expr: str, test_fraction: float = 0.2) -> str:
    """The split, "train" or "test", that an expression belongs to: a pure function of its text.

    The first 8 bytes of the SHA-256 of the expression, read as a fraction of 2**64, below
    `test_fraction` mean "test". A hash rather than a seeded draw, so that an expression's split
    does not depend on the seed, on n or on which other rows a file holds: two files of different
    splits can never share an instance.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    u = int.from_bytes(hashlib.sha256(expr.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


def chain_steps(expr: str) -> list[tuple[int, str, int, int]]:
    """The left-to-right steps of a chain of + and -: (running value, op, operand, result) each.

    "3+5+2-4" -> [(3, "+", 5, 8), (8, "+", 2, 10), (10, "-", 4, 6)]. With only + and -, left to
    right is the usual precedence, so the last result is the value of the expression.
    """
    if not isinstance(expr, str) or not _CHAIN_RE.fullmatch(expr):
        raise ValueError(f"expected a chain of non-negative integers joined by + or - "
                         f"(e.g. '3+5+2-4'), got {expr!r}")
    parts = re.findall(r"[+-]|\d+", expr)
    value = int(parts[0])
    steps = []
    for op, operand in zip(parts[1::2], parts[2::2]):
        result = value + int(operand) if op == "+" else value - int(operand)
        steps.append((value, op, int(operand), result))
        value = result
    return steps


def chain_solution(expr: str) -> str:
    """The worked solution of a chain: one step per line, then the boxed value.

    "3+5+2-4" -> "3+5=8\\n8+2=10\\n10-4=6\\n\\boxed{6}". One step per line, so that a
    response's reasoning steps are its lines: the unit in which a process reward can say where a
    chain went wrong.
    """
    steps = chain_steps(expr)
    lines = [f"{a}{op}{b}={c}" for a, op, b, c in steps]
    return "\n".join(lines + [f"\\boxed{{{steps[-1][3]}}}"])


@functools.lru_cache(maxsize=8)
def chain_expressions(split: str, max_operand: int = 9, num_terms: int = 4,
                      test_fraction: float = 0.2) -> tuple[str, ...]:
    """Every expression of a split, in enumeration order (operands first, then operators)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    chain_split("0", test_fraction)  # validates test_fraction
    total = (max_operand + 1) ** num_terms * len(CHAIN_OPS) ** (num_terms - 1)
    if total > MAX_CHAIN_INSTANCES:
        raise ValueError(f"max_operand={max_operand} and num_terms={num_terms} give {total} expressions, "
                         f"more than the {MAX_CHAIN_INSTANCES} this generator enumerates; use fewer")
    pool = []
    for operands in itertools.product(range(max_operand + 1), repeat=num_terms):
        for ops in itertools.product(CHAIN_OPS, repeat=num_terms - 1):
            expr = str(operands[0]) + "".join(o + str(x) for o, x in zip(ops, operands[1:]))
            if chain_split(expr, test_fraction) == split:
                pool.append(expr)
    return tuple(pool)


def arith_chain_rows(
    n: int,
    split: str = "train",
    seed: int = 0,
    max_operand: int = 9,
    num_terms: int = 4,
    test_fraction: float = 0.2,
    template: str = ARITH_TEMPLATE,
) -> list[dict]:
    """`n` distinct multi-step arithmetic prompts of one split, in the verl schema.

    Args:
        n: number of rows; distinct expressions, so at most the size of the split.
        split: "train" or "test"; decided per expression by `chain_split`, so the splits are
            disjoint whatever the seeds and sizes of the files drawn from them.
        seed: which expressions of the split are drawn, and their order.
        max_operand: operands are drawn from 0..max_operand.
        num_terms: operands per expression (num_terms - 1 steps).
        test_fraction: expected share of all expressions in the "test" split.
        template: user message with an `{expr}` slot.

    `extra_info` holds the split, the expression and its worked solution (`chain_solution`),
    the supervised target of the warm start.
    """
    _check_expression_args(n, max_operand, num_terms, template)
    pool = chain_expressions(split, max_operand, num_terms, float(test_fraction))
    if n > len(pool):
        raise ValueError(f"n={n} is more than the {len(pool)} distinct expressions of split {split!r} "
                         f"(max_operand={max_operand}, num_terms={num_terms}, test_fraction={test_fraction})")
    rows = []
    for i, expr in enumerate(random.Random(seed).sample(pool, n)):
        solution = chain_solution(expr)
        rows.append({
            "data_source": CHAIN_SOURCE,
            "prompt": [{"role": "user", "content": template.format(expr=expr)}],
            "ability": "math",
            "reward_model": {"ground_truth": str(chain_steps(expr)[-1][3]), "style": "rule"},
            "extra_info": {"index": i, "split": split, "expression": expr, "solution": solution},
        })
    return rows


# Each code task: (statement, how to build one input from two ints, the expected output).
_CODE_TASKS: dict[str, tuple[str, Callable[[int, int], str]]] = {
    "sum": ("Read two integers a and b from standard input (on one line, separated by a space) "
            "and print their sum.", lambda a, b: str(a + b)),
    "difference": ("Read two integers a and b from standard input (on one line, separated by a "
                   "space) and print a - b.", lambda a, b: str(a - b)),
    "product": ("Read two integers a and b from standard input (on one line, separated by a space) "
                "and print their product.", lambda a, b: str(a * b)),
    "max": ("Read two integers a and b from standard input (on one line, separated by a space) "
            "and print the larger of the two.", lambda a, b: str(max(a, b))),
}
CODE_TASKS = tuple(_CODE_TASKS)
CODE_SUFFIX = "\nWrite a Python program and put it in a ```python code block."


def code_task_output(task: str, a: int, b: int) -> str:
    """Expected stdout of `task` on input "a b" (with the trailing newline print adds)."""
    if task not in _CODE_TASKS:
        raise ValueError(f"unknown code task {task!r}; valid tasks: {', '.join(CODE_TASKS)}")
    return _CODE_TASKS[task][1](a, b) + "\n"


def code_rows(n: int, seed: int = 0, num_tests: int = 3, max_operand: int = 100,
              tasks: Sequence[str] = CODE_TASKS) -> list[dict]:
    """Generate `n` stdin/stdout coding prompts with APPS-style tests.

    `reward_model.ground_truth` is a JSON string {"inputs": ["3 4\\n", ...], "outputs": ["7\\n", ...]},
    the format the code verifier and the Eurus-2 code rows use.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num_tests < 1:
        raise ValueError(f"num_tests must be >= 1, got {num_tests}")
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in _CODE_TASKS]
    if not tasks or bad:
        raise ValueError(f"tasks must be a non-empty subset of {CODE_TASKS}, got {tasks!r}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = rng.choice(tasks)
        pairs = [(rng.randint(-max_operand, max_operand), rng.randint(-max_operand, max_operand))
                 for _ in range(num_tests)]
        tests = {"inputs": [f"{a} {b}\n" for a, b in pairs],
                 "outputs": [code_task_output(task, a, b) for a, b in pairs]}
        rows.append({
            "data_source": CODE_SOURCE,
            "prompt": [{"role": "user", "content": _CODE_TASKS[task][0] + CODE_SUFFIX}],
            "ability": "code",
            "reward_model": {"ground_truth": json.dumps(tests), "style": "rule"},
            "extra_info": {"index": i, "split": "train", "task": task},
        })
    return rows


def write_rows(rows: list[dict], out_path: str | os.PathLike) -> Path:
    """Write rows to .parquet or .jsonl (chosen by extension); parent folders are created."""
    path = Path(out_path)
    if path.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"output path {str(path)!r} must end in .parquet or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return path


def make_arithmetic_dataset(out_path: str | os.PathLike, n: int, seed: int = 0, max_operand: int = 10,
                            ops: Sequence[str] = ("+", "-", "*"), num_terms: int = 2) -> Path:
    """Write `arithmetic_rows(...)` to `out_path` (.parquet or .jsonl) and return the path."""
    return write_rows(arithmetic_rows(n, seed, max_operand, ops, num_terms), out_path)


def make_arith_chain_dataset(out_path: str | os.PathLike, n: int, split: str = "train", seed: int = 0,
                             max_operand: int = 9, num_terms: int = 4) -> Path:
    """Write `arith_chain_rows(...)` of one split to `out_path` (.parquet or .jsonl) and return the path."""
    return write_rows(arith_chain_rows(n, split, seed, max_operand, num_terms), out_path)


def make_code_dataset(out_path: str | os.PathLike, n: int, seed: int = 0, num_tests: int = 3,
                      max_operand: int = 100) -> Path:
    """Write `code_rows(...)` to `out_path` (.parquet or .jsonl) and return the path."""
    return write_rows(code_rows(n, seed, num_tests, max_operand), out_path)


SYNTHETIC_KINDS = ("arith", "arith_chain", "code")


def make_synthetic_dataset(kind: str, out_path: str | os.PathLike, n: int, seed: int = 0,
                           split: str = "train") -> Path:
    """Write `n` rows of a bundled task with its default options (`data.synthetic`).

    Only `arith_chain` has a held-out split disjoint from its training one (`chain_split`); the
    other tasks have so few distinct problems (363 for `arith`) that a "test" file would repeat
    training problems, so asking for one is an error rather than a leaky evaluation.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic task {kind!r}; valid: {', '.join(SYNTHETIC_KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind == "arith_chain":
        return make_arith_chain_dataset(out_path, n, split, seed)
    if split != "train":
        raise ValueError(f"the synthetic task {kind!r} has no held-out split disjoint from training; "
                         "use arith_chain (or give held-out files)")
    make = make_arithmetic_dataset if kind == "arith" else make_code_dataset
    return make(out_path, n, seed)
