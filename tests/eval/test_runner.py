"""The runner's pieces: datasets from rows, answer equality through the verifier pool, suites, table."""

from pathlib import Path

import pytest
import yaml

from launch.eval import format_table
from prime.data.synthetic import arithmetic_rows, code_rows
from prime.eval.runner import EvalSettings, answer_equality, dataset_name_of, problems_from_rows
from prime.eval.suite import load_suite, make_settings
from prime.verifiers.pool import VerifierPool

SUITE = Path(__file__).parents[2] / "configs" / "eval" / "prime_paper.yaml"


def test_one_file_is_one_dataset_unless_it_mixes_sources(byte_tokenizer):
    rows = arithmetic_rows(3, seed=0)
    problems = problems_from_rows(rows, byte_tokenizer, "arith")
    assert [(p.dataset, p.index, p.kind) for p in problems] == [("arith", 0, "math"), ("arith", 1, "math"),
                                                                ("arith", 2, "math")]
    mixed = problems_from_rows(rows + code_rows(2, seed=0), byte_tokenizer, "mixed", limit=2)
    # two sources -> two datasets named after them; limit keeps the first 2 of each
    assert [(p.dataset, p.index, p.kind) for p in mixed] == [
        ("synthetic/arith", 0, "math"), ("synthetic/arith", 1, "math"),
        ("synthetic/code", 0, "code"), ("synthetic/code", 1, "code")]


def test_dataset_names():
    assert dataset_name_of("data/math500.parquet") == "math500"
    assert dataset_name_of("data/olympiad/") == "olympiad"
    assert dataset_name_of("HuggingFaceH4/MATH-500") == "MATH-500"


def test_answer_equality_uses_the_math_verifier():
    with VerifierPool(1, timeout_s=20, code_case_timeout_s=4) as pool:
        same_first, same_second = answer_equality(
            [["\\frac{1}{2}", "0.5", "3", None], ["x", "x "]], lambda items: pool.score(items)[0])
    assert same_first("\\frac{1}{2}", "0.5")  # math-verify: 1/2 == 0.5
    assert not same_first("\\frac{1}{2}", "3")
    assert same_second("x", "x ")  # equal after normalisation, no grader call needed


def test_settings_layers_and_defaults():
    s = make_settings({"n": 16, "k": [1, 4, 16], "temperature": 0.6}, {"max_new_tokens": 8192},
                      {"n": None, "temperature": 0.0}, seed=3)
    assert (s.n, s.ks, s.temperature, s.max_new_tokens, s.seed) == (16, (1, 4, 16), 0.0, 8192, 3)
    assert make_settings({"k": [1, 8]}).n == 8  # n follows the largest k
    assert make_settings({"n": 5}).ks == (1, 5)  # k follows n
    with pytest.raises(ValueError, match="every k must be in"):
        EvalSettings(n=2, ks=(1, 4))


def test_the_paper_suite_loads():
    suite = load_suite(SUITE)
    names = [b.name for b in suite.benchmarks]
    assert names == ["aime_2024", "amc", "math_500", "minerva_math", "olympiadbench", "leetcode", "livecodebench"]
    by_name = {b.name: b for b in suite.benchmarks}
    assert by_name["olympiadbench"].config == "OE_TO_maths_en_COMP"
    assert not by_name["leetcode"].enabled and by_name["leetcode"].reason
    assert by_name["livecodebench"].options == {"start_date": "2023-05-01", "end_date": "2024-11-01"}
    settings = make_settings(suite.defaults, by_name["math_500"].sampling)
    assert (settings.n, settings.temperature, settings.max_new_tokens) == (16, 0.6, 8192)


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "source": "x.jsonl", "format": "math500", "tempreature": 1}, "unknown keys \\['tempreature'\\]"),
    ({"name": "a", "source": "x.jsonl", "format": "math5000"}, "format 'math5000' is not one of"),
    ({"name": "a", "enabled": False}, "needs a 'reason'"),
    ({"name": "a", "format": "amc"}, "'source' is required"),
])
def test_suite_errors_name_the_entry(tmp_path, entry, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"benchmarks": [entry]}))
    with pytest.raises(ValueError, match=message):
        load_suite(path)


def test_table_formats_counts_fractions_and_absent_values():
    table = format_table({"math": {"problems": 4.0, "n": 2.0, "pass@1": 0.75, "maj@1": 0.5},
                          "code": {"problems": 2.0, "n": 2.0, "pass@1": 0.5, "maj@1": None}})
    assert table.splitlines() == [
        "dataset  problems  pass@1  maj@1",
        "math            4   0.750  0.500",
        "code            2   0.500      -",
    ]
