"""Two data-parallel ranks over gloo give the same PPO update as one rank on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.subprocess_env import child_env

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world: int, model_path: str, out_dir) -> list[tuple[subprocess.Popen, str]]:
    port = str(_free_port())
    started = []
    for rank in range(world):
        out = str(out_dir / f"w{world}_r{rank}.pt")
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, WORKER, model_path, out], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append((proc, out))
    return started


def _results(started) -> list[dict]:
    for proc, _ in started:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log.decode()[-3000:]
    return [torch.load(out) for _, out in started]


def test_two_ranks_match_one_rank(tiny_model_path, tmp_path):
    # Both runs at once (three processes): start-up dominates the time of this test.
    one, two = _start(1, tiny_model_path, tmp_path), _start(2, tiny_model_path, tmp_path)
    (single,), (r0, r1) = _results(one), _results(two)
    for name, p in single["params"].items():
        # Ranks stay identical, and equal the single-process result. Two Adam steps at lr 1e-3
        # move a weight by ~2e-3; Adam divides by sqrt(v), so for near-zero gradients float
        # summation-order noise reaches ~1e-6 of movement. A wrong gradient scale would show in
        # grad_norm (checked to 1e-5 relative) and change clipping.
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert float((r0["params"][name] - p).abs().max()) < 1e-5, name
    # Sums over other micro-batch and rank splits: a few fp32 ulps of values of order 1.
    assert r0["metrics"]["policy/loss"] == pytest.approx(single["metrics"]["policy/loss"], abs=1e-6)
    assert r0["metrics"]["policy/clip_frac"] == pytest.approx(single["metrics"]["policy/clip_frac"], abs=1e-6)
    assert r0["metrics"]["policy/grad_norm"] == pytest.approx(single["metrics"]["policy/grad_norm"], rel=1e-5)
