"""A PRIME job on a two-node Ray cluster simulated on this machine: placement across nodes, code shipped to
every node, checkpoints and final models complete in the shared run folder (checked at start), and a resume.

Both "nodes" are Ray nodes started by `ray.cluster_utils.Cluster` on 127.0.0.1, each with its own CPU count
and a custom resource naming it. Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes
every Ray process resolve its own address to loopback; the test checks that no socket of the cluster's
processes uses another address.

    pytest -m multinode
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.launch.test_e2e import check_run, make_cfg, read_metrics

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")


@pytest.fixture
def two_nodes(monkeypatch):
    """A head node (4 CPUs, resource sim_node_a) and a worker node (3 CPUs, resource sim_node_b) on loopback."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_worker_niceness", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    common = dict(node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=300 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=4, resources={"sim_node_a": 1}, **common))
    cluster.add_node(num_cpus=3, resources={"sim_node_b": 1}, **common)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def node_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def sockets_off_loopback() -> list[str]:
    """Sockets of this process and its descendants (the Ray nodes) bound or connected elsewhere than loopback."""
    import psutil

    me = psutil.Process()
    bad = []
    for proc in [me] + me.children(recursive=True):
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            for addr in (c.laddr, c.raddr):
                if addr and addr.ip not in LOOPBACK:
                    bad.append(f"{proc.name()} {c.status} {addr.ip}:{addr.port}")
    return bad


def imported_from(node_id: str) -> str:
    """Where a task on `node_id` imports prime from."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def where() -> str:
        import prime

        return prime.__file__

    task = ray.remote(num_cpus=0)(where)
    return ray.get(task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote())


def two_node_cfg(tmp_path, cluster, steps: int):
    return make_cfg(tmp_path, "algo.name=prime", "rollout.engine=hf", f"trainer.total_steps={steps}",
                    "trainer.save_every=1", "trainer.run_name=two_nodes", f"cluster.address={cluster.address}",
                    "cluster.nodes=2", "cluster.gpus_per_node=3", "cluster.policy_world_size=2",
                    "cluster.prm_world_size=2", "cluster.ship_code=true", "cluster.placement_timeout_s=120")


def test_prime_spans_two_nodes_checkpoints_in_one_place_and_resumes(tmp_path, two_nodes):
    from launch.train import run
    from prime.train.checkpoint import find_latest

    run_dir = run(two_node_cfg(tmp_path, two_nodes, steps=2))
    check_run(run_dir, 2, extra_keys={"prm/loss", "policy/clip_frac"}, prm=True)

    # Policy and PRM rank 1 ran on the second node, rank 0 (and the engine) on the first.
    a, b = node_with("sim_node_a"), node_with("sim_node_b")
    placed = json.loads(Path(run_dir, "placement.json").read_text())
    for role in ("policy", "prm"):
        assert [r["node_id"] for r in placed[role]] == [a, b], role
    assert [r["node_id"] for r in placed["rollout"]] == [a]
    assert {r["node_ip"] for rs in placed.values() for r in rs} == {"127.0.0.1"}

    # Every node imports the code the job shipped (Ray's runtime_env working_dir), not this checkout.
    for node in (a, b):
        where = imported_from(node)
        assert "runtime_resources" in where and "working_dir_files" in where, where

    # The checkpoint in the run folder holds both ranks' DeepSpeed shards of each model.
    ckpt = find_latest(os.path.join(run_dir, "checkpoints"))
    assert ckpt is not None and ckpt.endswith("step_000002")
    for model in ("policy", "prm"):
        shards = sorted(p.name for p in Path(ckpt, model).rglob("*optim_states.pt"))
        assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards

    # Resume on the same cluster: one more step continues at 3 with the restored weights in the engine.
    run(two_node_cfg(tmp_path, two_nodes, steps=3))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["rollout/logprob_gap"] < 1e-3  # engine and trainer agree: the sync after restore worked
    state = json.loads(Path(find_latest(os.path.join(run_dir, "checkpoints")), "state.json").read_text())
    assert state["step"] == 3
    assert not sockets_off_loopback(), sockets_off_loopback()

