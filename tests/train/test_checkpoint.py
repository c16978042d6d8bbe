"""Atomic checkpointing: failed saves leave nothing behind, resume finds the newest complete one."""

from __future__ import annotations

import os
import random
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from prime.train.checkpoint import (
    DiskFullError,
    find_latest,
    load_rng_state,
    load_state,
    remove_leftovers,
    save_checkpoint,
)


def _writer(text: str):
    def write(path: str) -> None:
        os.makedirs(path)
        with open(os.path.join(path, "weights.txt"), "w") as f:
            f.write(text)

    return write


def test_save_then_find_latest(tmp_path):
    root = str(tmp_path)
    assert find_latest(root) is None
    p1 = save_checkpoint(root, 1, {"policy": _writer("a")}, {"data_pos": 10})
    p2 = save_checkpoint(root, 2, {"policy": _writer("b")}, {"data_pos": 20})
    assert find_latest(root) == p2
    assert os.path.basename(p1) == "step_000001"
    assert load_state(p2) == {"data_pos": 20, "step": 2}
    with open(os.path.join(p2, "policy", "weights.txt")) as f:
        assert f.read() == "b"
    assert open(os.path.join(root, "latest")).read().strip() == "step_000002"


def test_failing_writer_leaves_previous_checkpoint_untouched(tmp_path):
    root = str(tmp_path)
    good = save_checkpoint(root, 1, {"policy": _writer("a")}, {"data_pos": 10})

    def broken(path: str) -> None:
        os.makedirs(path)
        with open(os.path.join(path, "half.bin"), "w") as f:
            f.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 2, {"policy": _writer("b"), "prm": broken}, {"data_pos": 20})
    # No step_2 folder, no temp folder, latest still names step 1.
    assert sorted(os.listdir(root)) == ["latest", "step_000001"]
    assert find_latest(root) == good


def test_find_latest_ignores_incomplete_and_temp_folders(tmp_path):
    root = str(tmp_path)
    good = save_checkpoint(root, 3, {}, {})
    # A crashed save of step 4 renamed without marker, a leftover temp folder, and a stale pointer.
    os.makedirs(os.path.join(root, "step_000004"))
    os.makedirs(os.path.join(root, ".tmp-step_000005-123"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_000004\n")
    assert find_latest(root) == good


def test_keep_last_prunes_old_checkpoints(tmp_path):
    root = str(tmp_path)
    for step in range(1, 5):
        save_checkpoint(root, step, {}, {"step_seen": step}, keep_last=2)
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_000003", "step_000004"]


def test_resave_same_step_replaces_it(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 1, {"policy": _writer("old")}, {})
    path = save_checkpoint(root, 1, {"policy": _writer("new")}, {})
    with open(os.path.join(path, "policy", "weights.txt")) as f:
        assert f.read() == "new"
    assert sorted(os.listdir(root)) == ["latest", "step_000001"]


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    path = save_checkpoint(str(tmp_path), 7, {}, {})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    # Disturb the generators, restore, and draw again: the same numbers come out.
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_rng_state(path)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_state_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(str(tmp_path), 1, {}, {"bad": object()})
    assert find_latest(str(tmp_path)) is None
    assert [d for d in os.listdir(tmp_path) if d.startswith(".tmp")] == []


def _tensor_writer(nbytes: int, calls: list | None = None):
    """A writer saving `nbytes` of float32 with torch.save, as the trainers' checkpoints do."""

    def write(path: str) -> None:
        if calls is not None:
            calls.append(path)
        os.makedirs(path)
        torch.save(torch.ones(nbytes // 4), os.path.join(path, "weights.pt"))

    return write


@contextmanager
def small_disk(path, size: str):
    """A tmpfs of `size` mounted at `path` (mounting needs root; the test is skipped otherwise)."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield str(path)
    finally:
        # A failed torch.save's file stays open while its traceback is referenced: detach lazily then.
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_save_that_runs_out_of_space_says_so_and_keeps_the_previous_one(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as root:
        first = save_checkpoint(root, 1, {"policy": _tensor_writer(300_000)}, {})
        # 300 kB are kept and about 700 kB free, enough for the check against the previous size,
        # but this save writes 2 MB: torch's writer fails midway ("unexpected pos").
        with pytest.raises(DiskFullError) as err:
            save_checkpoint(root, 2, {"policy": _tensor_writer(2_000_000)}, {})
        msg = str(err.value)
        assert f"under {root}: it ran out of space after writing" in msg and "0.0 MiB) free" in msg
        assert "the previous checkpoint step_000001 is kept" in msg and "\n" not in msg
        assert find_latest(root) == first and sorted(os.listdir(root)) == ["latest", "step_000001"]


def test_a_save_is_refused_before_writing_when_the_previous_size_is_not_free(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as root:
        first = save_checkpoint(root, 1, {"policy": _tensor_writer(600_000)}, {})
        calls: list = []
        with pytest.raises(DiskFullError, match=r"it needs about 6\d{5} bytes \(0.6 MiB\) \(the size of step_000001\)"):
            save_checkpoint(root, 2, {"policy": _tensor_writer(600_000, calls)}, {}, keep_last=1)
        assert calls == [] and find_latest(root) == first  # nothing written, the only checkpoint kept


def test_a_short_disk_first_drops_what_rotation_would_drop(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as root:
        for step in (1, 2):
            save_checkpoint(root, step, {"policy": _tensor_writer(400_000)}, {}, keep_last=2)
        # ~820 kB used, ~200 kB free: step 1 (which keep_last=2 drops after this save anyway) goes first.
        save_checkpoint(root, 3, {"policy": _tensor_writer(400_000)}, {}, keep_last=2)
        assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_000002", "step_000003"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 5, {}, {})
    # Resumed from an earlier checkpoint: the new step 3 is kept, not the higher-numbered step 5.
    newest = save_checkpoint(root, 3, {}, {}, keep_last=1)
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_000003"]
    assert find_latest(root) == newest


def test_remove_leftovers_of_interrupted_saves(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 1, {}, {})
    save_checkpoint(root, 2, {}, {})
    os.makedirs(os.path.join(root, ".tmp-step_000003-4242", "policy"))  # a driver killed mid-save
    os.remove(os.path.join(root, "step_000001", "COMPLETE"))  # a rotation cut short
    os.rename(os.path.join(root, "step_000002"), os.path.join(root, ".old-step_000002-4242"))  # mid re-save
    assert remove_leftovers(root) == [".tmp-step_000003-4242", "step_000001"]
    assert sorted(os.listdir(root)) == ["latest", "step_000002"] and find_latest(root).endswith("step_000002")
