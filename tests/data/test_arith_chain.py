"""Arithmetic chains: disjoint deterministic splits, right answers and worked solutions, the CLIs."""

import re

import pytest

from prime.data.dataset import load_prompt_dataset, read_rows, validate_row
from prime.data.synthetic import (
    arith_chain_rows,
    chain_solution,
    chain_expressions,
    chain_split,
    chain_steps,
    make_synthetic_dataset,
    make_arith_chain_dataset,
)
from prime.verifiers.math import score

PROMPT_RE = re.compile(r"Compute ([0-9+\-]+)\. Put the final answer in \\boxed\{\}\.")
LINE_RE = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")


def _recompute(expr):
    """Independent recomputation: Python's own evaluator on a string of digits, + and -."""
    assert re.fullmatch(r"[0-9+\-]+", expr)
    return eval(expr, {"__builtins__": {}})  # noqa: S307 - input checked by the regex above


def test_worked_solutions_by_hand():
    # 3+5 = 8, 8+2 = 10, 10-4 = 6
    assert chain_solution("3+5+2-4") == "3+5=8\n8+2=10\n10-4=6\n\\boxed{6}"
    # 0-9 = -9, -9-9 = -18, -18-9 = -27 (the smallest value of 4 operands of 0..9)
    assert chain_solution("0-9-9-9") == "0-9=-9\n-9-9=-18\n-18-9=-27\n\\boxed{-27}"
    # 7-7 = 0, 0+0 = 0
    assert chain_steps("7-7+0") == [(7, "-", 7, 0), (0, "+", 0, 0)]


@pytest.mark.parametrize("expr", ["", "3", "3+", "3*4+1", "-3+4", "3 + 4", None])
def test_chain_steps_rejects_what_is_not_a_chain(expr):
    with pytest.raises(ValueError, match="chain of non-negative integers joined by"):
        chain_steps(expr)


def test_rows_have_right_answers_and_solutions():
    for split in ("train", "test"):
        rows = arith_chain_rows(300, split, seed=1)
        for i, row in enumerate(rows):
            messages, gt, ability, source = validate_row(row, i)
            assert (ability, source) == ("math", "synthetic/arith_chain")
            info = row["extra_info"]
            assert info["split"] == split and info["index"] == i
            expr = PROMPT_RE.fullmatch(messages[0]["content"]).group(1)
            assert expr == info["expression"]
            operands = [int(x) for x in re.split(r"[+-]", expr)]
            assert len(operands) == 4 and all(0 <= x <= 9 for x in operands)
            assert gt == str(_recompute(expr))
            # The solution, line by line: each line is a true fact, the first starts from the first
            # operand, each next one from the previous result, with the expression's next operator
            # and operand; the last line boxes the ground truth.
            *lines, boxed = info["solution"].split("\n")
            assert boxed == f"\\boxed{{{gt}}}"
            value = operands[0]
            ops = re.findall(r"[+-]", expr)
            for line, op, operand in zip(lines, ops, operands[1:], strict=True):
                a, line_op, b, c = LINE_RE.fullmatch(line).groups()
                assert (int(a), line_op, int(b)) == (value, op, operand)
                assert int(c) == _recompute(f"{a}{line_op}{b}")
                value = int(c)
            assert str(value) == gt
            assert score(info["solution"], gt) == 1.0


def test_splits_are_disjoint_and_cover_every_expression():
    train, test = set(chain_expressions("train")), set(chain_expressions("test"))
    assert not train & test
    # Every one of the 10**4 * 2**3 = 80,000 expressions is in exactly one split; about 20% are
    # test (binomial sd sqrt(80000 * 0.2 * 0.8) = 113 expressions, so +-1000 is a loose 9 sd bound).
    assert len(train) + len(test) == 80_000
    assert abs(len(test) - 16_000) < 1000
    # Files of the two splits, whatever their seeds, share no instance and repeat none.
    train_rows = {r["extra_info"]["expression"] for r in arith_chain_rows(4000, "train", seed=0)}
    test_rows = {r["extra_info"]["expression"] for r in arith_chain_rows(4000, "test", seed=0)}
    assert len(train_rows) == len(test_rows) == 4000
    assert train_rows <= train and test_rows <= test


def test_same_arguments_same_rows():
    assert arith_chain_rows(50, "test", seed=3) == arith_chain_rows(50, "test", seed=3)
    assert arith_chain_rows(50, "test", seed=3) != arith_chain_rows(50, "test", seed=4)


def test_split_of_known_expressions():
    # The first 8 bytes of sha256(expression) as a fraction of 2**64 (hashlib, written down once):
    #   "3+5+2-4" -> b46297c44d09d54c -> 0.7046 >= 0.2: train
    #   "8-6+6+1" -> 0cadb290e3848331 -> 0.0495 <  0.2: test
    #   "3-9-2+5" -> 2a0e974d80ed8dad -> 0.1643 <  0.2: test, but train when test_fraction = 0.1
    # A change of the hash would move instances between splits and fail here.
    assert chain_split("3+5+2-4") == "train"
    assert chain_split("8-6+6+1") == "test"
    assert chain_split("3-9-2+5") == "test"
    assert chain_split("3-9-2+5", test_fraction=0.1) == "train"
    assert chain_split("3+5+2-4", test_fraction=0.71) == "test"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown split 'dev'; valid splits: train, test"):
        arith_chain_rows(1, "dev")
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 0"):
        chain_split("1+2", test_fraction=0)
    with pytest.raises(ValueError, match=r"n=20000 is more than the \d+ distinct expressions of split 'test'"):
        arith_chain_rows(20_000, "test")
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.0"):
        arith_chain_rows(1, "test", test_fraction=1.0)
    with pytest.raises(ValueError, match="num_terms must be >= 2"):
        arith_chain_rows(1, num_terms=1)
    with pytest.raises(ValueError, match="more than the 2000000 this generator enumerates"):
        arith_chain_rows(1, max_operand=99, num_terms=4)  # 100**4 * 2**3 = 8e8 expressions


def test_fewer_terms_and_operands():
    # 3 operands of 0..2: 3**3 * 2**2 = 108 expressions in all.
    assert len(chain_expressions("train", 2, 3)) + len(chain_expressions("test", 2, 3)) == 108
    assert arith_chain_rows(0, "train", max_operand=2, num_terms=3) == []
    for row in arith_chain_rows(10, "train", max_operand=2, num_terms=3, seed=0):
        assert len(row["extra_info"]["solution"].split("\n")) == 3  # 2 steps + the boxed line


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_written_files_load_as_prompt_datasets(tmp_path, byte_tokenizer, suffix):
    path = make_arith_chain_dataset(tmp_path / f"chain{suffix}", n=12, split="test", seed=2)
    assert read_rows(path) == arith_chain_rows(12, "test", seed=2)
    ds = load_prompt_dataset([path], byte_tokenizer)
    assert len(ds) == 12 and {it.data_source for it in ds} == {"synthetic/arith_chain"}


def test_make_synthetic_dataset_dispatches_and_refuses_a_leaky_test_split(tmp_path):
    out = make_synthetic_dataset("arith_chain", tmp_path / "test.jsonl", n=6, seed=4, split="test")
    assert read_rows(out) == arith_chain_rows(6, "test", seed=4)
    with pytest.raises(ValueError, match="'arith' has no held-out split disjoint from training"):
        make_synthetic_dataset("arith", tmp_path / "x.jsonl", n=6, split="test")
    with pytest.raises(ValueError, match="unknown synthetic task 'chain'; valid: arith, arith_chain, code"):
        make_synthetic_dataset("chain", tmp_path / "x.jsonl", n=6)
    assert not (tmp_path / "x.jsonl").exists()


def test_prime_make_data_writes_the_split(tmp_path, capsys):
    from launch.cli import main as prime_main

    out = tmp_path / "held_out.parquet"
    assert prime_main(["make-data", str(out), "--kind", "arith_chain", "--split", "test", "--n", "8",
                       "--seed", "3"]) == 0
    rows = read_rows(out)
    assert rows == arith_chain_rows(8, "test", seed=3)
    assert {r["extra_info"]["split"] for r in rows} == {"test"}
    train_out = tmp_path / "train.jsonl"
    assert prime_main(["make-data", str(train_out), "--kind", "arith_chain", "--n", "8"]) == 0
    assert read_rows(train_out) == arith_chain_rows(8, "train", seed=0)
    # --split is only for the chains; the other kinds say so and write nothing.
    assert prime_main(["make-data", str(tmp_path / "a.jsonl"), "--kind", "arith", "--split", "test"]) == 2
    assert "has no held-out split disjoint from training" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
