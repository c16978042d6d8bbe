"""`prime plan`: the layout by node shape and the per-GPU memory check, from the config alone (no GPU, no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.placement import PlanError, plan_layout
from launch.plan import format_plan, make_plan
from prime.config import build_config, load_yaml
from prime.models.memory import GIB, QWEN25_7B

REPO = Path(__file__).resolve().parents[2]
# The presets' ipc weight sync pairs engine i with policy rank i on one GPU; layouts that do not, use broadcast.
BROADCAST = "cluster.weight_sync=broadcast"
TWO_NODES = ["cluster.nodes=2", "cluster.policy_world_size=16", "cluster.prm_world_size=16", "rollout.num_engines=16"]


def preset(name: str, *overrides: str):
    return build_config(load_yaml(str(REPO / "configs" / name)), list(overrides))


def ranks_by_node(layout, role):
    return [(p.node, p.devices) for p in layout.actors[role]]


def test_prime_7b_fits_one_node_of_eight_80_gib_gpus():
    plan = make_plan(preset("prime_7b.yaml"))
    layout = plan.layout
    # Colocated: rank i of every role on GPU i of node 0, one shared bundle per GPU.
    for role in ("rollout", "policy", "prm"):
        assert ranks_by_node(layout, role) == [(0, (i,)) for i in range(8)]
    assert layout.groups["colocated"].bundles == ({"CPU": 6.0, "GPU": 1.0},) * 8  # 3 roles x 2 CPUs
    assert {p.num_gpus for p in layout.actors["policy"]} == {0.33}  # round(1/3 - 0.005, 2)
    assert len(plan.devices) == 8
    gpu0 = plan.devices[0]
    assert gpu0.actors == ["rollout0", "policy0", "prm0"]
    # Generating: the engine's 0.7 * 80 = 56 GiB, the PRM's frozen reference sharded over the 8 PRM ranks,
    # 2 * 7,615,616,512 / 8 = 1,903,904,128 bytes (policy and PRM states are offloaded), and 3 processes x 0.5 GiB.
    assert QWEN25_7B.num_params() == 7_615_616_512
    phase, peak = gpu0.peak
    assert phase == "generate"
    assert peak == pytest.approx(56 * GIB + 1_903_904_128 + 1.5 * GIB, rel=1e-12)  # float sums
    assert peak < 80 * GIB
    text = format_plan(plan, "configs/prime_7b.yaml")
    assert "fits: the fullest GPU (node 0 GPU 0) peaks at 59.3 of 80 GiB while it generates" in text


@pytest.mark.parametrize("placement, ref_bytes", [
    ("replicated", 15_231_233_024),  # 2 bytes x 7,615,616,512 on every PRM rank
    ("sharded", 1_903_904_128),  # its ZeRO-3 partition: 15,231,233,024 / 8
    ("offload", 0),  # partitions in host memory
])
def test_prm_reference_placement_counts_its_bytes_on_each_gpu(placement, ref_bytes):
    plan = make_plan(preset("prime_7b.yaml", f"prm.ref_placement={placement}"))
    for d in plan.devices:  # the reference is the only resident state (trainers offload theirs)
        assert d.resident.weights == ref_bytes
        assert d.phase("generate").weights == pytest.approx(2 * 7_615_616_512 + ref_bytes, rel=1e-12)  # float sums
    # 16 PRM ranks on two nodes halve the partition; a replicated copy stays whole.
    two = make_plan(preset("prime_7b.yaml", f"prm.ref_placement={placement}", *TWO_NODES))
    expect = ref_bytes / 2 if placement == "sharded" else ref_bytes
    assert {d.resident.weights for d in two.devices} == {expect}


def test_prime_7b_fits_two_nodes_and_spreads_ranks_over_them():
    plan = make_plan(preset("prime_7b.yaml", *TWO_NODES))
    layout = plan.layout
    # 16 shared GPUs fill both nodes: rank i on node i // 8, GPU i % 8.
    assert ranks_by_node(layout, "policy") == [(i // 8, (i % 8,)) for i in range(16)]
    assert layout.node_needs() == [{"CPU": 48.0, "GPU": 8.0}, {"CPU": 48.0, "GPU": 8.0}]
    assert len(plan.devices) == 16 and all(d.peak[1] < 80 * GIB for d in plan.devices)
    # The preset's 8 ranks on two nodes spread 4 + 4 instead of packing node 0.
    spread = plan_layout(preset("prime_7b.yaml", "cluster.nodes=2"))
    assert [p.node for p in spread.actors["policy"]] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_split_placement_spreads_each_role_evenly():
    layout = plan_layout(preset("prime_7b.yaml", BROADCAST, "cluster.placement=split", "cluster.nodes=3",
                                "cluster.policy_world_size=6", "cluster.prm_world_size=6", "rollout.num_engines=6",
                                "trainer.batch_size=264"))
    # 18 units on 3 x 8 GPUs: every role 2 per node, its ranks numbered node by node.
    for role in ("rollout", "policy", "prm"):
        assert [p.node for p in layout.actors[role]] == [0, 0, 1, 1, 2, 2]
    devices = [(p.node, p.devices[0]) for acts in layout.actors.values() for p in acts if p.devices]
    assert len(set(devices)) == 18  # no two actors share a GPU
    assert all(b == {"CPU": 2.0, "GPU": 1.0} for b in layout.groups["policy"].bundles)


def test_tensor_parallel_engines_get_one_gpu_bundles():
    split = plan_layout(preset("prime_7b.yaml", BROADCAST, "cluster.placement=split", "cluster.nodes=2",
                               "rollout.tensor_parallel_size=2", "rollout.num_engines=2",
                               "cluster.policy_world_size=4", "cluster.prm_world_size=4"))
    engine = split.actors["rollout"][1]
    assert engine.node == 1 and engine.devices == (0, 1) and engine.bundles == (2, 3)
    assert split.groups["rollout"].bundles[2:] == ({"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0})
    # The actor holds no GPU; vLLM's workers take one each from the bundles it names.
    assert (engine.num_gpus, engine.worker_gpus, engine.captures_children) == (0.0, 1.0, True)
    assert engine.env_vars == {"VLLM_RAY_BUNDLE_INDICES": "2,3", "VLLM_RAY_PER_WORKER_GPUS": "1"}
    colocated = plan_layout(preset("prime_7b.yaml", BROADCAST, "rollout.tensor_parallel_size=2", "rollout.num_engines=4"))
    engine = colocated.actors["rollout"][3]
    assert engine.devices == (6, 7) and engine.bundles == (6, 7)
    assert engine.env_vars == {"VLLM_RAY_BUNDLE_INDICES": "6,7", "VLLM_RAY_PER_WORKER_GPUS": "0.33"}


def test_a_too_large_config_fails_with_one_sentence():
    # Without gradient checkpointing a 16384-token micro-batch keeps T*L*A*2 = 16384*28*204,800 bytes of
    # layer activations and 16384*152064*10 bytes of logits: 110.7 GiB, on top of the sharded PRM reference
    # (1.77 GiB), 1e9 gathered parameters x 2 bytes (1.86 GiB) and 3 x 0.5 GiB per process: 115.8 GiB.
    with pytest.raises(PlanError) as info:
        make_plan(preset("prime_7b.yaml", "model.gradient_checkpointing=false"))
    msg = str(info.value)
    assert msg.startswith("node 0 GPU 0 (rollout0 policy0 prm0) would need 115.8 GiB while it trains")
    assert "activations 110.7" in msg and "cluster.gpu_memory_gib=80" in msg and msg.count(". ") == 0


def test_unsatisfiable_placements_and_engine_shares_fail_with_one_sentence():
    with pytest.raises(PlanError, match=r"colocated placement needs 16 GPUs .* cluster.nodes=1 x "
                                        r"cluster.gpus_per_node=8 = 8"):
        make_plan(preset("prime_7b.yaml", BROADCAST, "cluster.policy_world_size=16"))
    with pytest.raises(PlanError, match="split placement cannot place policy rank 0 .* node 0: 0"):
        make_plan(preset("prime_7b.yaml", BROADCAST, "cluster.placement=split"))
    with pytest.raises(PlanError, match=r"gpu_memory_utilization=0.15 gives each engine GPU 12.0 GiB"):
        make_plan(preset("prime_7b.yaml", "rollout.gpu_memory_utilization=0.15"))
    # 0.178 * 80 = 14.24 GiB leaves 0.055 GiB after 14.18 GiB of weights: about 1,000 tokens of 57,344 bytes.
    with pytest.raises(PlanError, match="fewer than one sequence"):
        make_plan(preset("prime_7b.yaml", "rollout.gpu_memory_utilization=0.178"))


def test_cpu_runs_are_planned_but_not_checked_against_gpu_memory():
    plan = make_plan(build_config(None, ["trainer.device=cpu", "cluster.policy_world_size=2",
                                         "cluster.prm_world_size=2", "cluster.nodes=2", "cluster.gpus_per_node=3",
                                         "trainer.batch_size=4"]))
    layout = plan.layout
    assert [p.node for p in layout.actors["policy"]] == [0, 1]
    assert [p.node for p in layout.actors["prm"]] == [0, 1]
    assert layout.groups["policy"].bundles == ({"CPU": 1.0},) * 2
    assert "not checked" in plan.note


def test_an_in_process_cpu_engine_counts_its_weights_twice():
    """The in-process CPU engine keeps plain weights beside vLLM's packed kernels (prime/rollout/vllm_ext.py)."""
    from launch.plan import _engine
    from prime.models.memory import ModelShape

    shape = ModelShape(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=512, head_dim=64)
    fp32 = 4 * shape.num_params()
    for in_process, copies in (("true", 2), ("false", 1)):
        cfg = build_config(None, ["trainer.device=cpu", f"rollout.cpu_in_process={in_process}",
                                  "rollout.cpu_kv_cache_gib=2", "model.dtype=float32"])
        mem = _engine(cfg, shape, 1, 0.0)
        assert mem.weights == copies * fp32 and mem.kv_cache == 2 * GIB


def test_cli_prints_the_plan_and_train_checks_it_before_ray():
    ok = subprocess.run([sys.executable, "-m", "launch.cli", "plan", "configs/prime_7b.yaml", *TWO_NODES],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "node 1: 8 of 8 GPUs used" in ok.stdout and "fits:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "launch.cli", "train", "configs/prime_7b.yaml",
                          "model.gradient_checkpointing=false"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("prime: node 0 GPU 0") and "Traceback" not in bad.stderr
    assert "Ray" not in bad.stderr and "ray.init" not in bad.stderr  # it never got as far as starting Ray
