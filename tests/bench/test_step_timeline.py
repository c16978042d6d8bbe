"""The timeline bench's pure parts: reading Ray's task events and cutting a step into its segments."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "step_timeline.py")
_spec = importlib.util.spec_from_file_location("step_timeline", _PATH)
step_timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_timeline)


def test_actor_spans_keeps_actor_tasks_in_seconds():
    events = [
        {"cat": "task::PolicyWorker.update", "name": "update", "ts": 2_000_000.0, "dur": 500_000.0},
        {"cat": "task:execute", "name": "task:execute", "ts": 2_000_100.0, "dur": 400_000.0},  # a phase, not a task
        {"cat": "submit_task", "name": "submit_task", "ts": 1_999_000.0, "dur": 30.0},
        {"cat": "task::RolloutWorker.generate", "name": "generate", "ts": 1_000_000.0},  # no duration: left out
    ]
    assert step_timeline.actor_spans(events) == [("PolicyWorker.update", 2.0, 2.5)]


def test_critical_path_cuts_a_step_into_segments_that_add_up():
    # Step from 10.000 to 10.200 s. Engine 0 generates 10.002-10.060, engine 1 10.003-10.070; the
    # verifier grades engine 0's share 10.062-10.064 and engine 1's 10.072-10.075; the update runs
    # 10.080-10.150, the send 10.151-10.160, the engines receive until 10.170 and 10.190.
    spans = [
        ("RolloutWorker.generate", 10.002, 10.060), ("RolloutWorker.generate", 10.003, 10.070),
        ("VerifierWorker.score_generated", 10.062, 10.064), ("VerifierWorker.score_generated", 10.072, 10.075),
        ("PolicyWorker.update", 10.080, 10.150), ("RolloutWorker.receive_weights", 10.081, 10.170),
        ("RolloutWorker.receive_weights", 10.082, 10.190), ("PolicyWorker.send_weights", 10.151, 10.160),
        ("RolloutWorker.generate", 10.201, 10.260),  # the next step's: left out
    ]
    got = step_timeline.critical_path(10.0, 10.2, spans)
    want = {"to generate": 0.002, "generate": 0.068, "grading after": 0.005, "to update": 0.005,
            "update": 0.070, "to sync": 0.001, "sync": 0.039, "to step end": 0.010}
    assert list(got) == list(step_timeline.SEGMENTS)
    assert got == pytest.approx(want, abs=1e-9)
    assert sum(got.values()) == pytest.approx(0.2, abs=1e-9)  # the whole step, nothing counted twice


def test_critical_path_names_the_missing_task():
    spans = [("RolloutWorker.generate", 1.0, 1.1), ("VerifierWorker.score_generated", 1.1, 1.2)]
    with pytest.raises(ValueError, match="no 'update' task began in the step"):
        step_timeline.critical_path(0.9, 1.5, spans)
