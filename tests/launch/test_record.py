"""The run's record stays exact: metrics.jsonl is cut back to the checkpoint's step on resume, and an
actor still writing for a driver killed with SIGKILL stops, so its temp folder can be removed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.logger import MetricsLogger, read_records
from prime.train.checkpoint import remove_leftovers
from tests.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[2]


def write_lines(path: Path, steps, torn: bool = False) -> None:
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": float(s)}) + "\n")
        if torn:
            f.write('{"step": 9, "lo')  # a line cut short by a kill mid-write


def logger(run_dir: Path, start: int, fresh: bool = False) -> MetricsLogger:
    return MetricsLogger(str(run_dir), {}, wandb_mode="disabled", start_step=start, progress_bar=False, fresh=fresh)


def test_resume_cuts_the_record_back_to_the_checkpoint_step(tmp_path):
    # Steps 0 (evaluation) to 5 were logged, 5 twice by an older run, the last line torn; the
    # checkpoint is step 3: lines 4 and 5 are cut, and the resumed steps append after 3.
    write_lines(tmp_path / "metrics.jsonl", [0, 1, 2, 3, 4, 5, 5], torn=True)
    lg = logger(tmp_path, start=3)
    lg.log(4, {"loss": 40.0})
    lg.close()
    rows = read_records(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["loss"] == 40.0
    assert lg.wandb_through == 5  # steps up to 5 reached wandb before: not sent again


def test_a_run_from_step_0_starts_a_new_record(tmp_path):
    # No checkpoint was reached (or trainer.resume=none): the step-0 evaluation is logged again.
    write_lines(tmp_path / "metrics.jsonl", [0, 1, 2])
    lg = logger(tmp_path, start=0, fresh=True)
    lg.rewind(0)
    lg.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "" and lg.wandb_through == -1


DRIVER = textwrap.dedent("""
    import os, sys, time
    import ray
    from workers.group import init_ray

    init_ray("local", 2)

    @ray.remote
    class Writer:  # stands for a DeepSpeed rank writing its shards into the checkpoint's temp folder
        def pid(self):
            return os.getpid()

        def write(self, folder):
            os.makedirs(folder, exist_ok=True)
            for i in range(100000):
                with open(os.path.join(folder, f"shard{i}"), "w") as f:
                    f.write("x" * 1000)
                time.sleep(0.05)

    w = Writer.remote()
    print(ray.get(w.pid.remote()), flush=True)
    w.write.remote(sys.argv[1])
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie has stopped


@pytest.mark.slow
def test_an_actor_writing_for_a_driver_killed_with_sigkill_stops(tmp_path):
    """Ray actors are owned by their driver (none is detached): when the driver dies, Ray kills them."""
    root = tmp_path / "checkpoints"
    folder = root / ".tmp-step_000003-4242"
    env = child_env()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(folder)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    actor = None
    try:
        actor = int(driver.stdout.readline())
        t0 = time.monotonic()
        while (len(os.listdir(folder)) if folder.exists() else 0) < 5:
            assert time.monotonic() - t0 < 60, "the actor never wrote"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        t0 = time.monotonic()
        while alive(actor):
            assert time.monotonic() - t0 < 60, "the actor outlived its driver by a minute"
            time.sleep(0.2)
        stopped_after = time.monotonic() - t0
        count = len(os.listdir(folder))
        time.sleep(1.0)
        assert len(os.listdir(folder)) == count  # nothing more is written
        assert stopped_after < 30
    finally:
        if driver.poll() is None:
            driver.kill()
        if actor is not None and alive(actor):
            os.kill(actor, signal.SIGKILL)
    assert remove_leftovers(str(root)) == [folder.name] and not folder.exists()
