"""Bad input to `prime train`: exit 2, one line naming the file, row or key and what is valid, no
traceback, and nothing written (no run folder). The same table is in docs/errors.md for users.

Each case builds its input under the test's folder and runs the real command (`launch.cli.main`);
every case is rejected before any actor, model or run folder exists, except `prompts_too_long`,
which needs the tokenizer of the locally built model and so shows that a later user error removes
the run folder it made.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from launch.cli import main
from tests.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[2]
PRESET = str(REPO / "configs" / "tiny_cpu.yaml")
GOOD_ROW = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"},
            "ability": "math", "data_source": "arith"}


def rows_file(tmp: Path, rows: list, name: str = "train.jsonl") -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_file(tmp: Path, name: str, text: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def without(key: str) -> dict:
    return {k: v for k, v in GOOD_ROW.items() if k != key}


def model_dir(tmp: Path, files: tuple[str, ...]) -> str:
    path = tmp / "model"
    path.mkdir()
    for name in files:
        (path / name).write_text("{}")
    return str(path)


def incomplete_checkpoint(tmp: Path) -> str:
    path = tmp / "ckpt" / "step_000003"
    path.mkdir(parents=True)
    (path / "state.json").write_text("{}")
    return str(path)


@dataclass
class Case:
    name: str
    description: str
    """What the user gave (the first column of the docs table)."""
    args: Callable[[Path], list[str]]
    """The command's arguments after `prime`, built under the test's folder."""
    expect: str
    """A part of the one-line message."""


def train(*overrides: str, preset: str = PRESET) -> list[str]:
    return ["train", preset, *overrides]


def _data(rows_or_path) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = rows_or_path(tmp) if callable(rows_or_path) else rows_file(tmp, rows_or_path)
        return train(f"data.train_files=[{path}]")
    return build


CASES = [
    # The command line
    Case("unknown_flag", "an unknown option (`--frob`)", lambda t: train("--frob"),
         "unrecognized arguments: --frob; valid options: --debug, --dry-run, --help"),
    Case("unknown_command", "a misspelt command (`prime trian`)", lambda t: ["trian", PRESET],
         "invalid choice: 'trian' (choose from 'train', 'plan', 'sft'"),
    Case("no_config", "no config file argument", lambda t: ["train"], "the following arguments are required: config"),
    Case("override_form", "an override without `=` (`algo.name`)", lambda t: train("algo.name"),
         "override 'algo.name' is not of the form section.key=value"),
    # The config
    Case("config_missing", "a config file that does not exist", lambda t: train(preset=str(t / "nope.yaml")),
         "config file not found"),
    Case("config_yaml", "a config file that is not valid YAML",
         lambda t: train(preset=text_file(t, "bad.yaml", "trainer: [1, 2\n")), "is not valid YAML"),
    Case("config_not_mapping", "a config file holding a list, not sections",
         lambda t: train(preset=text_file(t, "list.yaml", "- 1\n- 2\n")), "must hold a mapping of sections, got list"),
    Case("unknown_key", "a misspelt key (`trainer.batch_sizee=2`)", lambda t: train("trainer.batch_sizee=2"),
         "unknown key 'trainer.batch_sizee' (did you mean 'trainer.batch_size'?)"),
    Case("unknown_section", "a misspelt section (`trainr.seed=1`)", lambda t: train("trainr.seed=1"),
         "unknown key 'trainr' (did you mean 'trainer'?)"),
    Case("wrong_type", "a value of the wrong type (`rollout.n=abc`)", lambda t: train("rollout.n=abc"),
         "rollout.n: got 'abc' (str), expected int"),
    Case("bad_choice", "a value outside its choices (`algo.name=ppo`)", lambda t: train("algo.name=ppo"),
         "algo.name: got 'ppo' (str), expected one of 'prime', 'grpo'"),
    Case("out_of_range", "a value out of range (`rollout.n=0`)", lambda t: train("rollout.n=0"),
         "rollout.n must be >= 1, got 0"),
    Case("cross_field", "a batch that does not split over the ranks",
         lambda t: train("trainer.batch_size=3", "cluster.policy_world_size=2"),
         "trainer.batch_size (3) must be divisible by cluster.policy_world_size (2)"),
    Case("grace", "a preemption grace of 0 s", lambda t: train("trainer.preempt_grace_s=0"),
         "trainer.preempt_grace_s must be > 0, got 0.0"),
    Case("restarts", "a negative restart budget", lambda t: train("trainer.max_restarts=-1"),
         "trainer.max_restarts must be >= 0, got -1"),
    # Data files
    Case("data_missing", "a training file that does not exist", _data(lambda t: str(t / "nope.parquet")),
         "data.train_files: dataset path"),
    Case("data_empty", "an empty training file", _data(lambda t: text_file(t, "empty.jsonl", "")),
         "holds no rows; give a .parquet, .jsonl or .json file with at least one row"),
    Case("data_bad_json", "a JSON-lines file with a broken line",
         _data(lambda t: text_file(t, "broken.jsonl", json.dumps(GOOD_ROW) + "\n{\"prompt\": \n")),
         "broken.jsonl:2: invalid JSON line"),
    Case("data_not_mapping", "a row that is a list, not an object", _data([GOOD_ROW, [1, 2]]),
         "train.jsonl: row 1: expected a mapping with fields"),
    Case("data_no_prompt", "a row without `prompt`", _data([without("prompt")]),
         "train.jsonl: row 0: missing required field 'prompt'"),
    Case("data_no_truth", "a row without `reward_model.ground_truth`", _data([GOOD_ROW, without("reward_model")]),
         "row 1: missing required field 'reward_model.ground_truth'"),
    Case("data_no_ability", "a row without `ability`", _data([without("ability")]),
         "row 0: missing required field 'ability'"),
    Case("data_ability_type", "an `ability` that is not a string", _data([GOOD_ROW | {"ability": 3}]),
         "row 0: field 'ability' must be a string, got 3"),
    Case("data_no_grader", "a row no grader can score (`ability: chemistry`)",
         _data([GOOD_ROW, GOOD_ROW | {"ability": "chemistry", "data_source": "lab"}]),
         "row 1: no grader for ability='chemistry', data_source='lab'; valid abilities: math, code"),
    Case("data_bad_role", "a message with an unknown role",
         _data([GOOD_ROW | {"prompt": [{"role": "narrator", "content": "hi"}]}]),
         "prompt[0].role is 'narrator'; valid roles: system, user, assistant"),
    Case("data_empty_prompt", "an empty prompt list", _data([GOOD_ROW | {"prompt": []}]),
         "field 'prompt' must be a string or a non-empty list"),
    Case("data_suffix", "a file type that is not read (`.csv`)", _data(lambda t: text_file(t, "rows.csv", "a,b\n")),
         "unsupported dataset file"),
    Case("data_empty_dir", "a folder without data files", _data(lambda t: (t / "d").mkdir() or str(t / "d")),
         "holds no .parquet, .jsonl, .json files"),
    Case("data_bad_parquet", "a corrupt parquet file", _data(lambda t: text_file(t, "bad.parquet", b"PAR1 not parquet")),
         "bad.parquet: not a readable parquet file"),
    Case("data_json_object", "a .json file holding one object", _data(lambda t: text_file(t, "obj.json", '{"a": 1}')),
         "obj.json: expected a JSON list of rows or JSON lines, got a dict"),
    Case("eval_no_grader", "a held-out file with a row no grader can score",
         lambda t: train(f"data.eval_files=[{rows_file(t, [GOOD_ROW | {'ability': 'poetry'}], 'heldout.jsonl')}]",
                         "trainer.eval_every=1"),
         "data.eval_files: "),
    Case("prompts_too_long", "prompts all longer than `data.max_prompt_len`", lambda t: train("data.max_prompt_len=2"),
         "no prompt is left after dropping"),
    # Model folders
    Case("model_missing", "a model folder that does not exist", lambda t: train(f"model.path={t / 'nope'}"),
         "does not exist or is not a folder"),
    Case("model_no_config", "a model folder without config.json",
         lambda t: train(f"model.path={model_dir(t, ('tokenizer.json',))}"), "is a folder without config.json"),
    Case("model_no_tokenizer", "a model folder without tokenizer files",
         lambda t: train(f"model.path={model_dir(t, ('config.json',))}"), "holds no tokenizer"),
    Case("model_hub_offline", "a hub id that is not cached while the hub is offline",
         lambda t: train("model.path=someorg/not-cached-model"), "the hub is offline (HF_HUB_OFFLINE)"),
    Case("prm_missing", "a PRM folder that does not exist", lambda t: train(f"prm.model_path={t / 'nope'}"),
         "prm.model_path="),
    # Output folder and resume
    Case("output_is_file", "an output folder under a file",
         lambda t: train(f"trainer.output_dir={text_file(t, 'afile', 'x')}/runs"), "is a file, not a folder"),
    Case("run_dir_is_file", "a run folder name taken by a file",
         lambda t: train(f"trainer.output_dir={t}", f"trainer.run_name={Path(text_file(t, 'taken', 'x')).name}"),
         "is a file, not a folder"),
    Case("run_name_path", "a run name with a slash", lambda t: train("trainer.run_name=a/b"),
         "trainer.run_name='a/b' must be a plain folder name"),
    Case("resume_missing", "a resume path that does not exist", lambda t: train(f"trainer.resume={t / 'nope'}"),
         "does not exist; valid: auto, none, or a checkpoint folder"),
    Case("resume_incomplete", "a resume folder that is not a complete checkpoint",
         lambda t: train(f"trainer.resume={incomplete_checkpoint(t)}"), "is not a complete checkpoint"),
]


DEFAULTS = {"trainer.run_name": "bad", "model.warm_start_steps": "0", "trainer.total_steps": "1",
            "rollout.engine": "hf", "logging.wandb_mode": "disabled"}


def run_case(case: Case, tmp_path: Path, capsys) -> tuple[int, str, set[str], set[str]]:
    """The exit status, stderr, and every path under the test folder before and after the command."""
    args = case.args(tmp_path)
    if args[0] == "train" and len(args) > 1:
        given = {a.split("=", 1)[0] for a in args if "=" in a}
        defaults = DEFAULTS | {"trainer.output_dir": str(tmp_path / "out")}
        args += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    before = {str(p) for p in tmp_path.rglob("*")}
    code = main(args)
    return code, capsys.readouterr().err, before, {str(p) for p in tmp_path.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    code, err, before, after = run_case(case, tmp_path, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert case.expect in err, err
    assert "Traceback" not in err
    assert after == before, f"a rejected job wrote {sorted(after - before)}"


def test_at_least_thirty_cases_and_all_documented():
    assert len(CASES) >= 30
    docs = (REPO / "docs" / "errors.md").read_text()
    missing = [c.description for c in CASES if c.description not in docs]
    assert not missing, f"docs/errors.md lacks: {missing}"


def test_read_only_output_folder(tmp_path, capsys):
    """An output folder on a read-only file system (a read-only tmpfs; mounting needs root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code = main(train(f"trainer.output_dir={ro}/runs", "logging.wandb_mode=disabled"))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "is on a read-only file system" in err and "choose a writable folder" in err
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_real_process_exits_2_and_debug_shows_the_traceback(tmp_path):
    """The exit status of the process itself, and `--debug` (placed anywhere) adding the traceback."""
    env = child_env()
    cmd = [sys.executable, "-m", "launch.cli", "train", PRESET, "rollout.n=abc", f"trainer.output_dir={tmp_path}"]
    plain = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.strip().count("\n") == 0, plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(cmd[:4] + ["--debug"] + cmd[4:], cwd=REPO, env=env, capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("prime train: rollout.n: got 'abc'")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("order", [
    ["--dry-run", PRESET, "algo.name=grpo"],
    [PRESET, "--dry-run", "algo.name=grpo"],
    [PRESET, "algo.name=grpo", "--dry-run"],
])
def test_flags_in_any_order(order, capsys):
    assert main(["train", *order]) == 0
    assert "name: grpo" in capsys.readouterr().out
