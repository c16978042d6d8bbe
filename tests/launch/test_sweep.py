"""`prime sweep`: the grid, the summary over seeds, resuming a half-done sweep and an arm that fails."""

import json
import os
from pathlib import Path

import pytest
import yaml

from launch.sweep import Arm, Sweep, expand_grid, load_sweep, main, read_arm, summarize, summary_rows
from prime.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_grid_is_the_cross_product_of_named_and_key_axes():
    arms = expand_grid({"algo": {"prime": ["algo.name=prime"], "rloo": ["algo.name=prime", "algo.process_coef=0"]},
                        "trainer.seed": [0, 1]}, ["trainer.total_steps=3"])
    assert [a.name for a in arms] == ["prime-seed0", "prime-seed1", "rloo-seed0", "rloo-seed1"]
    assert arms[2].overrides == ("trainer.total_steps=3", "algo.name=prime", "algo.process_coef=0", "trainer.seed=0")
    assert arms[3].labels == {"algo": "rloo", "trainer.seed": "seed1"}
    with pytest.raises(ConfigError, match="needs a config key"):
        expand_grid({"seeds": [0, 1]}, [])
    with pytest.raises(ConfigError, match="collide"):
        expand_grid({"a": {"p": [], "p-q": []}, "b": {"q-r": [], "r": []}}, [])  # (p, q-r) and (p-q, r)


def test_bad_sweep_files_fail_before_anything_runs(tmp_path):
    base = str(REPO / "configs" / "tiny_cpu.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": base, "output_dir": str(tmp_path / "out"),
                                   "grid": {"algo": {"x": ["algo.name=nope"]}}}))
    with pytest.raises(ConfigError, match="arm x: algo.name"):
        load_sweep(str(bad))
    bad.write_text(yaml.safe_dump({"base": base, "output_dir": "o", "grid": {"trainer.seed": [0]}, "runs": 3}))
    with pytest.raises(ConfigError, match="unknown sweep keys \\['runs'\\]"):
        load_sweep(str(bad))


def _fake_arm(root, name, n, rows):
    folder = root / "arms" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"rollout": {"n": n}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "SWEEP_DONE").write_text("10.0\n")


def test_summary_averages_over_seeds(tmp_path):
    key = "eval/test/greedy_pass@1"
    arms = [Arm(f"a-seed{s}", {"algo": "a", "trainer.seed": f"seed{s}"}, ()) for s in (0, 1)]
    sweep = Sweep(base="b", output_dir=str(tmp_path), arms=arms, seed_axis="trainer.seed")
    # seed 0: 0.2 -> 0.5 -> 0.4 (best 0.5, final 0.4); seed 1: 0.3 -> 0.4 -> 0.6.
    # 2 and 3 generated groups per step, K = 4: 8 then 20 samples (seed 0), 12 then 24 (seed 1).
    _fake_arm(tmp_path, "a-seed0", 4, [{"step": 0, key: 0.2}, {"step": 1, "filter/generated_groups": 2, key: 0.5},
                                       {"step": 2, "filter/generated_groups": 3, key: 0.4}])
    _fake_arm(tmp_path, "a-seed1", 4, [{"step": 0, key: 0.3}, {"step": 1, "filter/generated_groups": 3, key: 0.4},
                                       {"step": 2, "filter/generated_groups": 3, key: 0.6},
                                       {"step": 2, "filter/generated_groups": 3, key: 0.6}])  # logged twice
    results = [read_arm(sweep, a, {}) for a in arms]
    assert results[0].samples_at == {0: 0.0, 1: 8.0, 2: 20.0}
    (row,) = summary_rows(sweep, results)
    assert (row["group"], row["dataset"], row["seeds"]) == ("a", "test", 2)
    assert row["start"][0] == pytest.approx(0.25) and row["final"][0] == pytest.approx(0.5)
    assert row["best"][0] == pytest.approx(0.55)  # (0.5 + 0.6) / 2
    assert row["final"][1] == pytest.approx(0.1414213, rel=1e-5)  # stdev(0.4, 0.6) = 0.2 / sqrt(2)
    assert row["gain"][0] == pytest.approx(0.25)  # (0.2 + 0.3) / 2
    assert row["samples"][0] == pytest.approx(22.0) and row["seconds"][0] == pytest.approx(10.0)
    files = summarize(sweep, log=lambda *_: None)
    assert {os.path.basename(f) for f in files} == {"summary.md", "summary.csv", "test_greedy_pass_at_1.png"}
    assert "| a | test | 2 | 0.250 ± 0.071 | 0.500 ± 0.141 |" in Path(files[0]).read_text()


@pytest.mark.slow
def test_sweep_runs_arms_reports_a_failure_and_resumes(tmp_path):
    spec = {
        "base": str(REPO / "configs" / "tiny_cpu.yaml"),
        "output_dir": str(tmp_path / "sweep"),
        "overrides": ["rollout.engine=hf", "trainer.total_steps=1", "trainer.batch_size=2", "model.warm_start_steps=0",
                      "data.synthetic_size=32", "rollout.max_response_len=8", "logging.wandb_mode=disabled",
                      "cluster.num_cpus=4", "filter.max_rounds=1"],
        "grid": {"algo": {"grpo": ["algo.name=grpo"], "broken": ["data.train_files=[/nonexistent/rows.parquet]"]},
                 "trainer.seed": [0]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    lines = []
    assert main(str(path), log=lines.append) == 1  # one arm failed; the other still ran
    status = json.loads((tmp_path / "sweep" / "status.json").read_text())
    assert status["grpo-seed0"]["status"] == "done" and status["broken-seed0"]["status"] == "failed"
    assert "nonexistent" in status["broken-seed0"]["tail"]
    assert (tmp_path / "sweep" / "arms" / "grpo-seed0" / "SWEEP_DONE").exists()
    # Again: the finished arm is skipped, the failed one is tried again (and fails again).
    lines.clear()
    assert main(str(path), log=lines.append) == 1
    assert any("grpo-seed0: done before, skipped" in line for line in lines)
    assert any("broken-seed0: start" in line for line in lines)
