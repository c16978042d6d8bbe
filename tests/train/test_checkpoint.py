"""Atomic checkpointing: failed saves leave nothing behind, resume finds the newest complete one."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from prime.train.checkpoint import find_latest, load_rng_state, load_state, save_checkpoint


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
