"""The bench's pure parts: averaging over the measured steps and the per-stage overhead split."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "step_breakdown.py")
_spec = importlib.util.spec_from_file_location("step_breakdown", _PATH)
step_breakdown = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_breakdown)


def _step(generate, gen_compute, update, update_compute, step):
    return {
        "timing/generate": generate, "compute/generate": gen_compute,
        "timing/update_policy": update, "compute/update_policy": update_compute,
        "timing/step": step, "timing/overhead": step - gen_compute - update_compute,
        "perf/rollout_tokens_per_s": 100.0, "perf/train_tokens_per_s": 50.0,
        "batch/responses": 8.0, "response/mean_len": 10.0, "batch/tokens": 120.0,
    }


def test_summarize_skips_warmup_and_splits_overhead():
    # Warm-up step (excluded): everything slow. Measured steps:
    #   step 2: generate 2.0 wall / 1.8 compute, update 1.0 / 0.9, step 3.2 -> overhead 0.5
    #   step 3: generate 3.0 wall / 2.8 compute, update 1.0 / 0.9, step 4.2 -> overhead 0.5
    per_step = [_step(9.0, 8.0, 5.0, 4.0, 15.0), _step(2.0, 1.8, 1.0, 0.9, 3.2), _step(3.0, 2.8, 1.0, 0.9, 4.2)]
    row = step_breakdown.summarize("tiny", "hf", per_step, warmup=1)
    assert row["steps_measured"] == 2
    assert row["generate"] == pytest.approx(2.5)  # (2.0 + 3.0) / 2
    assert row["step"] == pytest.approx(3.7)  # (3.2 + 4.2) / 2
    assert row["overhead"] == pytest.approx(0.5)
    assert row["overhead_pct"] == pytest.approx(100 * 0.5 / 3.7)
    # generate: 2.5 wall - 2.3 compute; update_policy: 1.0 - 0.9
    assert row["overhead_by_stage"]["generate"] == pytest.approx(0.2)
    assert row["overhead_by_stage"]["update_policy"] == pytest.approx(0.1)
    # untimed: step 3.7 minus the timed stages 2.5 + 1.0
    assert row["overhead_by_stage"]["untimed"] == pytest.approx(0.2)
    assert row["verify"] == 0.0  # a stage the steps did not report counts as 0 s


def test_single_step_is_measured_without_warmup():
    row = step_breakdown.summarize("small", "vllm", [_step(2.0, 1.8, 1.0, 0.9, 3.2)], warmup=0)
    assert row["steps_measured"] == 1 and row["step"] == pytest.approx(3.2)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(SystemExit, match="valid presets: .*tiny"):
        step_breakdown.preset_path("huge")


def test_overrides_reach_the_config_after_the_bench_settings(tmp_path):
    cfg = step_breakdown.bench_config("tiny", "vllm", 3, str(tmp_path),
                                      ("rollout.num_engines=2", "filter.max_rounds=2"))
    assert cfg.rollout.num_engines == 2
    assert cfg.filter.max_rounds == 2  # the bench sets 1; an explicit override wins
    assert cfg.rollout.engine == "vllm" and cfg.trainer.total_steps == 3
