"""`prime eval` end to end: a tiny model fitted on six problems, the HF engine, the verifier pool.

Known answers come from a real model: a tiny Qwen2 checkpoint is first fitted (supervised, with
the project's `sft_loss`) until it reproduces a fixed response for each of six prompts. Four are
math problems: three responses are right (one writes its answer as 4.0 against a ground truth of
4, which only the math verifier's equivalence accepts) and one is wrong (15 for 8+8). Two are code
problems: one program is right; the other prints a sum where a product is asked, which passes 1 of
3 tests (score 1/3, so not correct). The fitted model is then evaluated through the `prime`
command with the real engine, grader and PRM scorer; the reference of the PRM is the unfitted
model.
"""

import json
import shutil

import pytest
import torch
import yaml

from launch.cli import main
from prime.data.dataset import build_prompt_dataset
from prime.data.synthetic import ARITH_TEMPLATE, write_rows
from prime.models.loading import load_model, load_tokenizer
from prime.data.batch import pack_sequences
from prime.models.tiny import build_tiny_model
from prime.train.sft import sft_loss, torch_threads

SUM_PROGRAM = "```python\nprint(sum(map(int, input().split())))\n```"
CODE_PROMPT = ("Read two integers a and b from standard input (on one line, separated by a space) and print "
               "their {what}.\nWrite a Python program and put it in a ```python code block.")
# (expression, ground truth, the response the model is fitted to give)
MATH = [
    ("3+4", "7", "3 + 4 = 7.\n\\boxed{7}"),
    ("6*2", "12", "6 * 2 = 12.\n\\boxed{12}"),
    ("9-5", "4", "9 - 5 = 4.\n\\boxed{4.0}"),
    ("8+8", "16", "8 + 8 = 15.\n\\boxed{15}"),
]
CODE = [
    ("sum", {"inputs": ["3 4\n", "2 2\n", "-2 5\n"], "outputs": ["7\n", "4\n", "3\n"]}),
    ("product", {"inputs": ["3 4\n", "2 2\n", "-2 5\n"], "outputs": ["12\n", "4\n", "-10\n"]}),
]
FIT_LOSS = 0.003  # mean NLL per response token the fit must reach (samples then follow it at T=0.6)


def _rows():
    math_rows = [{"data_source": "synthetic/arith", "ability": "math",
                  "prompt": [{"role": "user", "content": ARITH_TEMPLATE.format(expr=e)}],
                  "reward_model": {"ground_truth": gt, "style": "rule"}} for e, gt, _ in MATH]
    code_rows = [{"data_source": "synthetic/code", "ability": "code",
                  "prompt": [{"role": "user", "content": CODE_PROMPT.format(what=what)}],
                  "reward_model": {"ground_truth": json.dumps(tests), "style": "rule"}} for what, tests in CODE]
    return math_rows, code_rows


def _fit(model_dir: str, rows: list[dict], responses: list[str], max_steps: int = 800) -> float:
    """Fit the checkpoint in place until every response is reproduced; returns the final loss."""
    tok = load_tokenizer(model_dir)
    prompts = [item.prompt_ids for item in build_prompt_dataset(rows, tok)]
    targets = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    batch = pack_sequences(prompts, targets, tok.pad_token_id)
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    with torch_threads(1):
        for _ in range(max_steps):
            loss = sft_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < FIT_LOSS:
                break
    model.save_pretrained(model_dir)
    return loss.item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    base = build_tiny_model(str(root / "base"), seed=0)
    policy = shutil.copytree(base, str(root / "policy"))
    math_rows, code_rows = _rows()
    loss = _fit(policy, math_rows + code_rows, [r for _, _, r in MATH] + [SUM_PROGRAM, SUM_PROGRAM])
    assert loss < FIT_LOSS, f"the tiny model did not memorise the six responses (loss {loss})"
    math_file, code_file = write_rows(math_rows, root / "arith.jsonl"), write_rows(code_rows, root / "code.jsonl")
    return {"root": root, "base": base, "policy": policy, "math": str(math_file), "code": str(code_file)}


@pytest.fixture(scope="module")
def result(setup):
    out = setup["root"] / "results.json"
    argv = ["eval", setup["policy"], setup["math"], setup["code"], "--n", "2", "--k", "1,2",
            "--max-new-tokens", "48", "--prm", setup["policy"], "--ref", setup["base"],
            "--out", str(out), "--verify-workers", "2", "--seed", "0"]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_math_metrics(result):
    m = result["metrics"]["arith"]
    # 3 of 4 problems right, every sample alike: every metric is 3/4
    for key in ("greedy_pass@1", "pass@1", "pass@2", "maj@1", "maj@2", "mean_score",
                "prm_best_of_n_sum@2", "prm_best_of_n_min@2", "prm_weighted_vote@2"):
        assert m[key] == 0.75, key
    assert m["problems"] == 4 and m["truncated"] == 0.0
    assert m["prm_rank_acc"] is None and m["prm_rank_pairs"] == 0  # no problem mixes right and wrong


def test_code_metrics(result):
    m = result["metrics"]["code"]
    for key in ("greedy_pass@1", "pass@1", "pass@2"):
        assert m[key] == 0.5, key  # 1 of 2 problems
    # scores: 1 (sum program on the sum task) and 1/3 (1 of 3 product tests) -> mean (1 + 1/3) / 2
    assert m["mean_score"] == pytest.approx(2 / 3, abs=1e-9)  # float division
    assert m["maj@1"] is None and m["prm_weighted_vote@2"] is None  # no answer classes for code


def test_records(result):
    problems = {(p["dataset"], p["index"]): p for p in result["problems"]}
    p2, p3 = problems[("arith", 2)], problems[("arith", 3)]
    assert [s["text"] for s in p2["samples"]] == [MATH[2][2]] * 2
    assert p2["samples"][0]["answer"] == "4.0" and p2["samples"][0]["score"] == 1.0  # 4.0 == 4
    assert p3["samples"][0]["answer"] == "15" and not p3["samples"][0]["correct"]
    assert p3["ground_truth"] == "16" and p3["greedy"]["text"] == MATH[3][2]
    assert [s["answer_class"] for s in p3["samples"]] == [0, 0]
    product = problems[("code", 1)]
    assert product["samples"][0]["score"] == pytest.approx(1 / 3, abs=1e-9)  # 1 of 3 tests
    assert product["samples"][0]["answer"] is None and not product["samples"][0]["correct"]
    # The fitted PRM prefers its memorised responses to the unfitted reference: S > 0. A math
    # response is two steps ("3 + 4 = 7.\n" | "\boxed{7}" + eos), the program three.
    for p in result["problems"]:
        for s in p["samples"]:
            assert s["prm_sum"] > 0 and s["prm_min"] > 0
            assert len(s["prm_steps"]) == (2 if p["kind"] == "math" else 3)
            assert s["prm_sum"] == pytest.approx(sum(s["prm_steps"]), abs=1e-4)  # fp32 sums
    assert result["verify"]["verify/errors"] == 0


def test_console_table_lists_both_datasets(setup, capsys):
    out = setup["root"] / "again.json"
    argv = ["eval", setup["policy"], setup["code"], "--n", "1", "--max-new-tokens", "48", "--no-greedy",
            "--temperature", "0", "--out", str(out), "--verify-workers", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["dataset", "problems", "greedy_pass@1"]
    assert lines[1].split()[:4] == ["code", "2", "-", "0.667"]  # no greedy sample; mean score 2/3


def test_suite_on_local_fixture_files(setup, tmp_path, capsys):
    from pathlib import Path

    fixtures = Path(__file__).parents[1] / "data" / "fixtures"
    suite = {"defaults": {"n": 1, "max_new_tokens": 4, "temperature": 0},
             "benchmarks": [{"name": "tiny_math500", "source": str(fixtures / "math500.jsonl"), "format": "math500"},
                            {"name": "tiny_apps", "source": str(fixtures / "apps.jsonl"), "format": "apps", "k": [1]},
                            {"name": "off", "enabled": False, "reason": "not runnable here"}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "suite.json"
    assert main(["eval", setup["base"], "--suite", str(path), "--out", str(out), "--verify-workers", "1"]) == 0
    result = json.loads(out.read_text())
    assert list(result["metrics"]) == ["tiny_math500", "tiny_apps"]
    assert result["metrics"]["tiny_math500"]["problems"] == 2  # 2 of the 4 fixture rows convert
    assert result["settings"]["tiny_apps"]["max_new_tokens"] == 4
    assert result["skipped"] == [{"name": "off", "reason": "not runnable here"}]
    assert "skipped off: not runnable here" in capsys.readouterr().out


def test_bad_arguments_are_reported(setup, capsys):
    assert main(["eval", setup["policy"], setup["math"], "--prm", setup["policy"]]) == 2
    assert "--prm and --ref go together" in capsys.readouterr().err
    assert main(["eval", setup["policy"], setup["math"], "--n", "2", "--k", "1,4"]) == 2
    assert "every k must be in [1, n=2]" in capsys.readouterr().err
