"""Tests for prime.data.synthetic: rows follow the verl schema and ground truths are right."""

import json
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from prime.data.dataset import load_prompt_dataset, read_rows, validate_row
from prime.data.synthetic import (
    CODE_TASKS,
    arithmetic_rows,
    code_rows,
    eval_arith,
    make_synthetic_dataset,
    make_arithmetic_dataset,
    make_code_dataset,
)

PROMPT_RE = re.compile(r"Compute ([0-9+\-*/]+)\. Put the final answer in \\boxed\{\}\.")


def _recompute(expr):
    """Independent recomputation: Python's own evaluator on a string of digits and operators."""
    assert re.fullmatch(r"[0-9+\-*/]+", expr)
    return eval(expr, {"__builtins__": {}})  # noqa: S307 - input checked by the regex above


def test_arithmetic_rows_are_valid_and_correct():
    rows = arithmetic_rows(200, seed=0, max_operand=10, ops=("+", "-", "*"))
    assert len(rows) == 200
    for i, row in enumerate(rows):
        messages, gt, ability, source = validate_row(row, i)
        assert (ability, source) == ("math", "synthetic/arith")
        assert row["reward_model"]["style"] == "rule"
        expr = PROMPT_RE.fullmatch(messages[0]["content"]).group(1)
        assert expr == row["extra_info"]["expression"]
        a, b = (int(x) for x in re.split(r"[+\-*]", expr))
        assert 0 <= a <= 10 and 0 <= b <= 10
        assert gt == str(_recompute(expr))
    # All three operators show up in 200 draws.
    assert {op for row in rows for op in "+-*" if op in row["extra_info"]["expression"]} == {"+", "-", "*"}


def test_arithmetic_first_row_by_hand():
    row = arithmetic_rows(1, seed=0)[0]
    assert row["prompt"] == [{"role": "user", "content": "Compute 6-0. Put the final answer in \\boxed{}."}]
    assert row["reward_model"]["ground_truth"] == "6"  # 6 - 0


def test_division_and_more_terms_give_integer_answers():
    rows = arithmetic_rows(100, seed=1, max_operand=12, ops=("+", "*", "/"), num_terms=3)
    for row in rows:
        expr = row["extra_info"]["expression"]
        assert len(re.findall(r"\d+", expr)) == 3
        value = _recompute(expr)
        assert value == int(value) and row["reward_model"]["ground_truth"] == str(int(value))
    assert any("/" in row["extra_info"]["expression"] for row in rows)


def test_same_seed_same_rows():
    assert arithmetic_rows(20, seed=5) == arithmetic_rows(20, seed=5)
    assert arithmetic_rows(20, seed=5) != arithmetic_rows(20, seed=6)
    assert code_rows(10, seed=5) == code_rows(10, seed=5)


def test_eval_arith_precedence_and_rejects_other_code():
    assert eval_arith("2+3*4") == 14  # * binds tighter: 2 + 12
    assert eval_arith("12/4/2") == Fraction(3, 2)  # left to right: (12/4)/2
    with pytest.raises(ValueError, match="unsupported element"):
        eval_arith("__import__('os')")


def test_bad_options():
    with pytest.raises(ValueError, match=r"ops must be a non-empty subset of \('\+', '-', '\*', '/'\), got \('%',\)"):
        arithmetic_rows(1, ops=("%",))
    with pytest.raises(ValueError, match="max_operand must be >= 1"):
        arithmetic_rows(1, max_operand=0)
    with pytest.raises(ValueError, match="unknown|subset"):
        code_rows(1, tasks=("sort",))


def test_code_rows_have_apps_style_tests_with_right_outputs():
    expected = {"sum": lambda a, b: a + b, "difference": lambda a, b: a - b,
                "product": lambda a, b: a * b, "max": max}
    rows = code_rows(40, seed=0, num_tests=3)
    for i, row in enumerate(rows):
        _, gt, ability, source = validate_row(row, i)
        assert (ability, source) == ("code", "synthetic/code")
        tests = json.loads(gt)
        assert set(tests) == {"inputs", "outputs"} and len(tests["inputs"]) == len(tests["outputs"]) == 3
        f = expected[row["extra_info"]["task"]]
        for inp, out in zip(tests["inputs"], tests["outputs"]):
            a, b = map(int, inp.split())
            assert out == f"{f(a, b)}\n"
    assert {row["extra_info"]["task"] for row in rows} == set(CODE_TASKS)


def test_reference_solution_passes_the_generated_tests():
    """A correct program for the "sum" task prints exactly the stored outputs."""
    row = next(r for r in code_rows(20, seed=3) if r["extra_info"]["task"] == "sum")
    tests = json.loads(row["reward_model"]["ground_truth"])
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    for inp, out in zip(tests["inputs"], tests["outputs"]):
        run = subprocess.run([sys.executable, "-c", program], input=inp, capture_output=True, text=True, timeout=30)
        assert run.stdout == out


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_written_files_load_as_prompt_datasets(tmp_path, byte_tokenizer, suffix):
    arith = make_arithmetic_dataset(tmp_path / f"arith{suffix}", n=16, seed=0)
    code = make_code_dataset(tmp_path / f"code{suffix}", n=4, seed=0)
    assert read_rows(arith) == arithmetic_rows(16, seed=0)
    assert read_rows(code) == code_rows(4, seed=0)
    ds = load_prompt_dataset([arith, code], byte_tokenizer)
    assert len(ds) == 20
    assert [it.ability for it in ds] == ["math"] * 16 + ["code"] * 4


def test_bad_output_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.parquet or \.jsonl"):
        make_arithmetic_dataset(tmp_path / "rows.csv", n=2)


def test_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "sub" / "train.jsonl"
    from launch.cli import main

    assert main(["make-data", str(out), "--n", "8", "--seed", "2", "--kind", "code"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert read_rows(out) == code_rows(8, seed=2)
    assert make_synthetic_dataset("arith", tmp_path / "a.parquet", n=5) == tmp_path / "a.parquet"
    assert read_rows(tmp_path / "a.parquet") == arithmetic_rows(5, seed=0)
