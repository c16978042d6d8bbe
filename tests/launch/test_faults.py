"""Actors killed in the middle of a step, on CPU through local Ray, the tiny model and the HF engine.

One run loses, by SIGKILL at the start of the verb (`workers/failpoints.py`), its verifier actor in
step 1, its rollout engine in step 2 and its policy rank in step 4 (checkpoints at steps 2 and 4,
so step 3's line is already written when the rank dies). The first two are restarted by Ray and
their share of the step is sent again; the third makes the driver rebuild every actor group and
resume in-process from the checkpoint of step 2. The record must then hold steps 1-4 once each,
with every metric and the final weights equal to an uninterrupted run's.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.launch.test_e2e import load_state, make_cfg, read_metrics

pytestmark = pytest.mark.slow

# GRPO without the accuracy filter: one generation round per step, so the n-th call of a verb is step n's.
ARGS = ("algo.name=grpo", "rollout.engine=hf", "filter.accuracy=false", "trainer.total_steps=4",
        "trainer.save_every=2", "rollout.max_response_len=8")
FAILPOINTS = "verifier.score@1,rollout.generate@2,policy.update@4"


def volatile(key: str) -> bool:
    """Wall times, throughputs and fault counts differ between runs; everything else must not."""
    return key == "time" or key.split("/")[0] in ("timing", "compute", "perf", "faults") or "seconds" in key \
        or key.endswith("per_s")


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not volatile(k)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from launch.train import run

    return run(make_cfg(tmp_path_factory.mktemp("base"), *ARGS, "trainer.run_name=base"))


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    from launch.train import run

    tmp = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIME_FAILPOINTS", FAILPOINTS)
        mp.setenv("PRIME_FAILPOINT_DIR", str(tmp / "failpoints"))
        run_dir = run(make_cfg(tmp, *ARGS, "trainer.run_name=faults"))
    return run_dir, tmp / "failpoints"


def test_a_killed_verifier_is_restarted_and_its_step_completes(faulted):
    run_dir, counters = faulted
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 1 and rows[0]["faults/verifier_restarts"] == 1.0
    # Its share was graded again: step 1 holds every response's score (2 prompts x 4 samples).
    assert rows[0]["verify/items"] == 8.0
    assert int((counters / "verifier.score").read_text()) >= 2  # the killed call and its retry


def test_a_killed_rollout_engine_is_restarted_and_its_step_completes(faulted):
    run_dir, _ = faulted
    row = read_metrics(run_dir)[1]
    assert row["step"] == 2 and row["faults/rollout_restarts"] == 1.0
    # The restarted engine got the policy's current weights before generating again: the gap
    # between its log-probs and the trainer's stays at fp32 rounding (a stale engine is > 1e-2).
    assert row["rollout/logprob_gap"] < 1e-3


def test_a_killed_policy_rank_resumes_in_process_and_matches_an_uninterrupted_run(faulted, uninterrupted):
    run_dir, _ = faulted
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3's first line was cut back on resume
    assert rows[2]["faults/job_restarts"] == 1.0
    events = [json.loads(line) for line in Path(run_dir, "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["restart"]
    assert "policy 0 died" in events[0]["cause"] and events[0]["checkpoint"].endswith("step_000002")
    # Bit-exact: the same prompts, samples, scores, losses and gradient norms as without faults.
    assert comparable(rows) == comparable(read_metrics(uninterrupted))
    a = load_state(os.path.join(run_dir, "final_policy"))
    b = load_state(os.path.join(uninterrupted, "final_policy"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # One wandb run across the restart, and nothing left of the interrupted saves.
    assert len(list(Path(run_dir, "wandb").glob("offline-run-*"))) == 1
    assert not [p for p in Path(run_dir, "checkpoints").iterdir() if p.name.startswith(".")]
