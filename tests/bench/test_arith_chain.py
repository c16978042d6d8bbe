"""The arithmetic-chain probe's pure parts: the train-accuracy window, checkpoint discovery, errors."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "arith_chain.py")
_spec = importlib.util.spec_from_file_location("arith_chain_bench", _PATH)
arith_chain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arith_chain)


def test_train_curve_is_a_trailing_window_mean():
    lines = [{"step": s, "verify/mean_score_all": v} for s, v in [(1, 0.1), (2, 0.2), (3, 0.6), (4, 0.3)]]
    curve = arith_chain.train_curve(lines, window=2)
    # step 1: 0.1; step 2: (0.1 + 0.2) / 2; step 3: (0.2 + 0.6) / 2; step 4: (0.6 + 0.3) / 2
    assert curve == pytest.approx({1: 0.1, 2: 0.15, 3: 0.4, 4: 0.45})  # float sums, not exact
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        arith_chain.train_curve(lines, window=0)


def test_run_checkpoints_lists_complete_steps_only(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step_000020", True), ("step_000010", True), ("step_000030", False),
                           ("latest", False)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "COMPLETE").write_text("")
            (root / name / "state.json").write_text("{}")
    assert arith_chain.run_checkpoints(str(tmp_path)) == [
        (10, str(root / "step_000010")), (20, str(root / "step_000020"))]
    assert arith_chain.run_checkpoints(str(tmp_path / "no_run")) == []


def test_missing_policy_state_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DeepSpeed policy state at"):
        arith_chain.checkpoint_policy_weights(str(tmp_path))


def test_run_start_model(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  path: /models/sft\n  tiny_preset: tiny\n")
    assert arith_chain.run_start_model(str(tmp_path)) == "/models/sft"
    (tmp_path / "config.yaml").write_text("model:\n  path: ''\n  tiny_preset: small\n")
    assert arith_chain.run_start_model(str(tmp_path)) == str(tmp_path / "init_model_small")
