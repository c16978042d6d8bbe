"""A full disk at checkpoint time: exit 2 with one line saying so, the previous checkpoint kept, and
the step's metrics line written (it precedes the checkpoint)."""

import json

import pytest

from tests.launch.test_e2e import train_argv
from tests.train.test_checkpoint import small_disk

pytestmark = pytest.mark.slow


def test_a_full_disk_ends_the_run_with_exit_2_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    from launch.cli import main
    from prime.train.checkpoint import find_latest, is_complete

    run_dir = tmp_path / "disk"
    ckpts = run_dir / "checkpoints"
    # One checkpoint of the tiny GRPO policy (about 9.0 MB: weights and Adam states) fits in 14 MiB,
    # but then the 5.6 MB left are less than the previous checkpoint's size: step 2's save is refused.
    with small_disk(ckpts, "14m"):
        code = main(train_argv(tmp_path, "rollout.max_response_len=8", "algo.name=grpo", "rollout.engine=hf",
                               "trainer.total_steps=3", "trainer.save_every=1", "trainer.run_name=disk"))
        err = capsys.readouterr().err
        assert code == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"prime train: not enough disk space for checkpoint step_000002 under {ckpts}: "
                               "it needs about 9"), last
        assert "(the size of step_000001)" in last and "MiB) free; the previous checkpoint step_000001 is kept" in last
        assert "Traceback" not in err
        latest = find_latest(str(ckpts))
        assert latest == str(ckpts / "step_000001") and is_complete(latest)
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 2's line is on record; a resume would cut it back and redo step 2
