"""Converters of public sets (prime.data.convert) on small fixture files in the sets' own layouts.

The fixture rows are made-up problems written in each source's field layout; some are built to be
rejected, and every test checks the per-reason rejection counts.
"""

import json
from pathlib import Path

import pytest

from prime.data.convert import (
    CODE_INSTRUCTION,
    MATH_INSTRUCTION,
    convert_rows,
    convert_source,
    decode_lcb_tests,
    main,
    resolve_format,
)
from prime.data.dataset import build_prompt_dataset, read_rows, validate_row
from prime.verifiers.registry import grade

FIXTURES = Path(__file__).parent / "fixtures"


def convert(name: str, fmt: str, **options):
    return convert_rows(read_rows(FIXTURES / name), fmt, **options)


def user_text(row: dict) -> str:
    return row["prompt"][-1]["content"]


def truth(row: dict):
    return row["reward_model"]["ground_truth"]


def check_schema(rows, ability):
    for i, row in enumerate(rows):
        validate_row(row, i)
        assert row["ability"] == ability
        assert row["reward_model"]["style"] == "rule"
        assert isinstance(truth(row), str)


# ---------------------------------------------------------------------------------------------
# Math


def test_math500():
    result = convert("math500.jsonl", "math500")
    assert [truth(r) for r in result.rows] == ["23", "\\frac{3}{4}"]
    assert dict(result.rejected) == {"missing answer": 1, "missing problem": 1}
    assert result.total == 4
    check_schema(result.rows, "math")
    # the exact prompt: problem text + the one instruction constant
    assert user_text(result.rows[0]) == "What is $3 \\cdot 7 + 2$?" + MATH_INSTRUCTION
    assert MATH_INSTRUCTION == "\n\nSolve the problem and give the final answer in the form \\boxed{answer}."
    assert result.rows[0]["data_source"] == "math_500"
    assert result.rows[0]["extra_info"]["unique_id"] == "test/prealgebra/9001.json"


def test_aime_both_layouts():
    result = convert("aime_2024.jsonl", "aime")  # ID / Problem / Answer (an int)
    assert [truth(r) for r in result.rows] == ["401", "24"]
    assert dict(result.rejected) == {"missing answer": 1}
    other = convert("aimo_aime.jsonl", "aime")  # id / problem / answer (a string)
    assert [truth(r) for r in other.rows] == ["055"]
    assert other.rows[0]["extra_info"]["url"].endswith("Problem_1")
    check_schema(result.rows + other.rows, "math")


def test_amc_float_answers_become_plain_numbers():
    result = convert("amc.jsonl", "amc")
    assert [truth(r) for r in result.rows] == ["142", "2.5"]  # 142.0 -> "142"
    assert dict(result.rejected) == {"missing answer": 1}


def test_minerva():
    result = convert("minervamath.jsonl", "minerva")
    assert [truth(r) for r in result.rows] == ["60", "7"]
    assert dict(result.rejected) == {"missing answer": 1}
    assert user_text(result.rows[1]).startswith("Compute $\\sqrt{49}$.")


def test_olympiadbench_joins_multi_part_answers_and_rejects_images():
    result = convert("olympiadbench.jsonl", "olympiadbench")
    assert [truth(r) for r in result.rows] == ["$23$", "$1$, $2$"]
    assert dict(result.rejected) == {"needs an image": 1, "missing answer": 1}
    assert result.rows[0]["data_source"] == "olympiad_bench"


def test_converted_math_rows_grade_with_the_math_verifier():
    rows = convert("math500.jsonl", "math500").rows
    assert grade(rows[1], "so the fraction is \\boxed{0.75}") == 1.0  # 3/4 == 0.75
    assert grade(rows[1], "\\boxed{\\frac{2}{3}}") == 0.0
    olympiad = convert("olympiadbench.jsonl", "olympiadbench").rows
    assert grade(olympiad[1], "\\boxed{1, 2}") == 1.0


# ---------------------------------------------------------------------------------------------
# Code


def test_apps_stdin_and_call_based():
    result = convert("apps.jsonl", "apps")
    assert dict(result.rejected) == {"no tests": 1, "malformed tests": 1}
    check_schema(result.rows, "code")
    stdin, call = result.rows
    assert json.loads(truth(stdin)) == {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"]}
    assert json.loads(truth(call))["fn_name"] == "biggest"
    assert "def biggest(xs):" in user_text(call)  # the starter code is shown
    assert "standard input" in user_text(stdin) and "standard input" not in user_text(call)
    assert user_text(stdin).endswith(CODE_INSTRUCTION)


def test_converted_code_rows_run_with_the_code_verifier():
    stdin, call = convert("apps.jsonl", "apps").rows
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert grade(stdin, good) == 1.0
    assert grade(stdin, "```python\nprint(3)\n```") == 0.5  # right on the first of 2 tests only
    assert grade(call, "```python\ndef biggest(xs):\n    return max(xs)\n```") == 1.0


def test_taco():
    result = convert("taco.jsonl", "taco")
    assert len(result.rows) == 1 and dict(result.rejected) == {"malformed tests": 1}
    assert result.rows[0]["data_source"] == "taco"


def test_livecodebench_private_tests_date_window_and_functional_tests():
    windowed = convert("livecodebench.jsonl", "livecodebench", start_date="2023-05-01", end_date="2024-11-01")
    assert dict(windowed.rejected) == {"outside date window": 1, "malformed tests": 1}
    stdin, functional = windowed.rows
    # 1 public + 2 private (decoded from base64 / zlib / pickle) stdin cases
    assert json.loads(truth(stdin)) == {"inputs": ["4\n", "5\n", "0\n"], "outputs": ["16\n", "25\n", "0\n"]}
    spec = json.loads(truth(functional))
    assert spec == {"inputs": [[[1, 2, 3], 2], [[4, 5], 7]], "outputs": [True, False], "fn_name": "contains"}
    program = "```python\nclass Solution:\n    def contains(self, nums, target):\n        return target in nums\n```"
    assert grade(functional, program) == 1.0
    everything = convert("livecodebench.jsonl", "livecodebench")  # no window: the 2022 row stays
    assert len(everything.rows) == 3 and dict(everything.rejected) == {"malformed tests": 1}


def test_lcb_private_tests_refuse_pickled_functions():
    import base64
    import pickle
    import zlib

    blob = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()
    with pytest.raises(ValueError, match="builtins.print"):
        decode_lcb_tests(blob)


def test_eurus2_rows_pass_through_after_validation():
    rows = read_rows(FIXTURES / "eurus2.jsonl")
    result = convert_rows(rows, "eurus2")
    assert result.rows == rows[:2]  # unchanged, system message included
    assert dict(result.rejected) == {"malformed tests": 1, "malformed row": 1}


# ---------------------------------------------------------------------------------------------
# Driver, formats, command line


def test_converted_rows_build_a_prompt_dataset(byte_tokenizer):
    rows = convert("math500.jsonl", "math500").rows + convert("apps.jsonl", "apps").rows
    ds = build_prompt_dataset(rows, byte_tokenizer)
    assert len(ds) == 4 and ds.num_dropped_invalid == 0


def test_format_is_inferred_from_known_hub_names_only():
    assert resolve_format("HuggingFaceH4/MATH-500", None) == "math500"
    assert resolve_format("x.jsonl", "amc") == "amc"
    with pytest.raises(ValueError, match="cannot tell the format"):
        resolve_format("some/unknown-set", None)
    with pytest.raises(ValueError, match="valid formats"):
        resolve_format("x.jsonl", "mathh")


def test_limit_counts_converted_rows():
    assert len(convert("aime_2024.jsonl", "aime", limit=1).rows) == 1


def test_command_line_writes_parquet(tmp_path, capsys):
    out = tmp_path / "minerva.parquet"
    main([str(FIXTURES / "minervamath.jsonl"), str(out), "--format", "minerva"])
    assert "wrote 2 rows" in capsys.readouterr().out
    assert [truth(r) for r in read_rows(out)] == ["60", "7"]


def test_a_source_with_nothing_convertible_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "no answer"}) + "\n")
    with pytest.raises(ValueError, match="missing answer"):
        convert_source(str(bad), None, "math500")
