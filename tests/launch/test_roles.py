"""What the actor groups are started with, from the config alone (no Ray)."""

from __future__ import annotations

import os

from launch.roles import engine_env
from prime.config import build_config


def test_local_cpu_engines_split_the_cores():
    cores = os.cpu_count() or 1
    cfg = build_config({}, ["trainer.device=cpu", "rollout.num_engines=2"])
    # Two engines generating at once, each with every core, would run 2 x cores OpenMP threads.
    assert engine_env(cfg) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    many = build_config({}, ["trainer.device=cpu", f"rollout.num_engines={2 * cores + 1}",
                             "cluster.policy_world_size=1"])
    assert engine_env(many) == {"OMP_NUM_THREADS": "1"}  # never 0 threads


def test_one_engine_gpus_and_clusters_keep_the_job_settings():
    assert engine_env(build_config({}, ["trainer.device=cpu", "rollout.num_engines=1"])) == {}
    assert engine_env(build_config({}, ["trainer.device=cuda", "rollout.num_engines=2"])) == {}
    assert engine_env(build_config({}, ["trainer.device=cpu", "rollout.num_engines=2", "cluster.address=auto"])) == {}
