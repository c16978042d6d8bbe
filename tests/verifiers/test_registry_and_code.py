"""Registry dispatch, code-block extraction, test-spec parsing and output comparison."""

import json

import pytest

from prime.verifiers import code, registry

ADD_TESTS = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
ADD_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


@pytest.mark.parametrize(
    "row_or_kind,kind",
    [
        ("math", "math"),
        ("CODE", "code"),
        ("coding", "code"),
        ({"ability": "math", "data_source": "numina_olympiads"}, "math"),
        ({"data_source": "numina_cn_k12"}, "math"),
        ({"data_source": "codecontests"}, "code"),
        ({"data_source": "likaixin/TACO-verified"}, "code"),
        ({"data_source": "apps"}, "code"),
        ({"ability": "code", "data_source": "math_like_name"}, "code"),  # ability wins
    ],
)
def test_resolve_kind(row_or_kind, kind):
    assert registry.resolve_kind(row_or_kind) == kind


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task type 'poetry': valid kinds are \['math', 'code'\]"):
        registry.resolve_kind("poetry")
    with pytest.raises(ValueError, match="unknown task type"):
        registry.grade({"ability": "chemistry"}, "x", "y")


def test_grade_dispatches_and_reads_row_ground_truth():
    assert registry.grade("math", r"\boxed{4}", "4") == 1.0
    row = {"ability": "math", "reward_model": {"ground_truth": "4", "style": "rule"}}
    assert registry.grade(row, r"\boxed{4}") == 1.0
    code_row = {"data_source": "taco", "reward_model": {"ground_truth": json.dumps(ADD_TESTS)}}
    assert registry.grade(code_row, ADD_OK) == 1.0
    # Malformed tests are a grader error: 0, status "error", never an exception.
    assert registry.grade_with_status("code", ADD_OK, "{broken") == (0.0, "error")


def test_extract_code_takes_last_python_block():
    response = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```\nprint(3)\n```\n```cpp\nint x;\n```"
    assert code.extract_code(response) == "print(3)\n"  # the cpp block is skipped
    assert code.extract_code("```python\nprint(1)\n") is None  # never closed
    assert code.extract_code("no fences") is None
    assert code.extract_code(None) is None


def test_parse_tests_accepts_dict_and_json_and_rejects_bad_specs():
    assert code.parse_tests(json.dumps(ADD_TESTS)) == (ADD_TESTS["inputs"], ADD_TESTS["outputs"], None)
    spec = {"fn_name": "f", "inputs": [[1]], "outputs": [[2]]}
    assert code.parse_tests(spec) == ([[1]], [[2]], "f")
    with pytest.raises(ValueError, match="1 inputs but 2 outputs"):
        code.parse_tests({"inputs": ["a"], "outputs": ["b", "c"]})
    with pytest.raises(ValueError, match="needs 'inputs' and 'outputs' lists"):
        code.parse_tests({"input": []})
    with pytest.raises(ValueError, match="not valid JSON"):
        code.parse_tests("{nope")


@pytest.mark.parametrize(
    "got,expected,match",
    [
        ("3\n", "3", True),  # trailing whitespace
        ("1 2\n3 4\n", "1 2 3 4", True),  # line structure is not significant
        ("0.3333333", "0.333333333", True),  # floats within 1e-6
        ("0.33", "0.333333", False),
        ("1e-9", "0", True),  # absolute tolerance
        ("007", "7", True),  # integers compare by value...
        ("12345678901234567890", "12345678901234567891", False),  # ...exactly, however long
        ("YES", "yes", False),  # words are case-sensitive
        ("3", "3.0", True),  # a decimal point on one side: float comparison
        ("", "", True),
        ("1 2", "1 2 3", False),
    ],
)
def test_outputs_match(got, expected, match):
    assert code.outputs_match(got, expected) is match


def test_values_match():
    assert code.values_match([1, [2, 3]], [1, (2, 3)])
    assert code.values_match(0.1 + 0.2, 0.3)
    assert not code.values_match(True, 1)  # a bool is not an int here
    assert not code.values_match("1", 1)
    assert code.values_match({"a": 1}, {"a": 1.0000000001})


def test_code_score_edge_cases():
    assert code.score("no code", ADD_TESTS) == 0.0
    assert code.score(ADD_OK, {"inputs": [], "outputs": []}) == 0.0
    # Inputs/outputs given as lists of lines (an APPS variant).
    lines = {"inputs": [["1 2"], ["3 4"]], "outputs": [["3"], ["7"]]}
    assert code.score(ADD_OK, lines) == 1.0
