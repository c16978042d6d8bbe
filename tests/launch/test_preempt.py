"""Preemption: SIGTERM makes the driver finish (or abandon) its step, checkpoint, and exit 0; the
same command then resumes the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.preempt import Preemption, StepAbandoned
from tests.launch.test_e2e import train_argv
from tests.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_requests_a_stop_and_the_deadline_abandons_only_early_stages():
    before = signal.getsignal(signal.SIGTERM)  # another test may have left Ray's handler installed
    stop = Preemption(grace_s=0.05)  # no save measured yet: abandon 70% of the grace after SIGTERM (35 ms)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(StepAbandoned):
            with stop.abandonable():
                time.sleep(2)  # interrupted by the deadline, long before 2 s
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler in place before install() is back

    late = Preemption(grace_s=0.05)
    late.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # an update runs past the deadline: it is not interrupted
        with pytest.raises(StepAbandoned, match="before the step began"):
            with late.abandonable():  # but no new step starts its early stages
                pass
    finally:
        late.uninstall()


def test_the_deadline_keeps_room_for_twice_the_last_save():
    stop = Preemption(grace_s=100.0)
    assert stop.abandon_after_s() == pytest.approx(70.0)  # 100 - 30% of 100, before any save (exact in fp)
    stop.save_estimate_s = 10.0
    assert stop.abandon_after_s() == pytest.approx(80.0)  # 100 - 2 x 10


# Enough steps that SIGTERM, sent once the first step's line is written, lands before the last one:
# with 3, a machine on which a step took 0.1 s finished the run before the signal was handled.
STEPS = 30


def train_args(tmp_path) -> list[str]:
    """STEPS steps of the shrunk tiny preset (tests/launch/test_e2e.py), no scheduled checkpoint."""
    return train_argv(tmp_path, "rollout.max_response_len=8", "algo.name=grpo", "rollout.engine=hf",
                      f"trainer.total_steps={STEPS}", "trainer.save_every=0", "trainer.run_name=pre",
                      "trainer.preempt_grace_s=120")


def wait_for_line(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not (path.exists() and path.read_text().strip()):
        assert proc.poll() is None, "the run ended before its first step"
        assert time.monotonic() - t0 < timeout_s, "no step within the time limit"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_the_same_command_resumes(tmp_path, capsys):
    from launch.cli import main
    from prime.train.checkpoint import find_latest, load_state

    args = train_args(tmp_path)
    run_dir = tmp_path / "pre"
    env = child_env()
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_line(run_dir / "metrics.jsonl", proc, timeout_s=600)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert rc == 0, output[-3000:]
    assert time.monotonic() - t0 < 120, "the driver overran trainer.preempt_grace_s"
    assert "Traceback" not in output and "preempted: stopped after step" in output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = find_latest(str(run_dir / "checkpoints"))
    assert ckpt is not None and load_state(ckpt)["step"] == steps[-1]  # the step it stopped after
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < STEPS
    assert not (run_dir / "final_policy").exists()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "preempted" and events[-1]["checkpoint"] == ckpt

    # The requeued job: the same command resumes after the checkpoint and finishes.
    assert main(args) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert (run_dir / "final_policy" / "config.json").exists()
