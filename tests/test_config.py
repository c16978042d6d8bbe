"""Config tree: presets, dotted overrides, and the error message for each kind of bad input."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prime.config import Config, ConfigError, build_config, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_prime_authors_run():
    cfg = build_config()
    assert cfg.algo.name == "prime"
    assert (cfg.prm.beta, cfg.prm.lr, cfg.prm.update, cfg.prm.loss) == (0.05, 1e-6, "before", "ce")
    assert (cfg.filter.acc_low, cfg.filter.acc_high) == (0.2, 0.8)
    assert (cfg.algo.process_coef, cfg.algo.outcome_coef) == (5.0, 5.0)
    assert (cfg.actor.clip_low, cfg.actor.clip_high, cfg.actor.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert cfg.algo.kl_coef == 0.0 and cfg.actor.entropy_coef == 0.0


def test_preset_then_overrides_apply_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("algo:\n  name: rloo\nrollout:\n  n: 2\n  temperature: 0.7\n")
    cfg = load_config(str(preset), ["algo.name=grpo", "rollout.n=8", "data.train_files=a.parquet"])
    assert cfg.algo.name == "grpo"  # override beats preset
    assert cfg.rollout.n == 8
    assert cfg.rollout.temperature == 0.7  # preset beats default
    assert cfg.data.train_files == ["a.parquet"]  # one path on the command line becomes a list
    assert isinstance(build_config(None, ["prm.beta=1"]).prm.beta, float)  # int accepted for float


def test_yaml_round_trip_reproduces_the_config(tmp_path):
    cfg = build_config(None, ["algo.name=gvpo", "rollout.n=4", "actor.mini_batch_size=8"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


BAD = [
    # (overrides, words the message must contain)
    (["algo.nmae=grpo"], ["unknown key 'algo.nmae'", "did you mean 'algo.name'", "valid keys of 'algo'"]),
    (["rollouts.n=4"], ["unknown key 'rollouts'", "did you mean 'rollout'"]),
    (["prm.betta=0.1"], ["did you mean 'prm.beta'", "granularity"]),
    (["rollout.n=four"], ["rollout.n", "'four'", "expected int"]),
    (["rollout.n=2.5"], ["rollout.n", "2.5", "expected int"]),
    (["rollout.logprob_check_every=-1"], ["rollout.logprob_check_every must be >= 0", "-1"]),
    (["prm.beta=high"], ["prm.beta", "'high'", "expected float"]),
    (["algo.name=ppo"], ["algo.name", "'ppo'", "one of 'prime', 'grpo', 'rloo', 'reinforce_pp', 'gvpo'"]),
    (["prm.update=sometimes"], ["prm.update", "'before', 'after', 'none'"]),
    (["filter.accuracy=maybe"], ["filter.accuracy", "expected bool"]),
    (["actor.padding_free=packed"], ["actor.padding_free", "'packed'", "expected bool"]),
    (["prm.padding_free=2"], ["prm.padding_free", "got 2", "expected bool"]),
    (["algo.name=rloo", "rollout.n=1"], ["algo.name=rloo", "rollout.n must be >= 2", "rollout.n=1"]),
    (["algo.name=prime", "rollout.n=1"], ["algo.name=prime", "rollout.n must be >= 2"]),
    (["algo.name=gvpo", "rollout.n=1"], ["algo.name=gvpo", "rollout.n must be >= 2"]),
    (["filter.acc_low=0.9", "filter.acc_high=0.1"], ["acc_low=0.9", "acc_high=0.1"]),
    (["rollout.temperature=0"], ["rollout.temperature must be > 0"]),
    (["actor.zero_stage=4"], ["actor.zero_stage must be 0, 1, 2 or 3, got 4"]),
    (["algo.name=gvpo", "rollout.n=4", "trainer.batch_size=4", "actor.mini_batch_size=6"],
     ["whole groups", "actor.mini_batch_size (6)", "rollout.n (4)"]),
    (["trainer.batch_size=2", "rollout.n=2", "actor.mini_batch_size=8"], ["actor.mini_batch_size=8", "= 4"]),
    (["rollout"], ["not of the form section.key=value"]),
    (["model.path=/ckpt", "model.warm_start_steps=10"], ["model.warm_start_steps=10", "locally built model"]),
    (["rollout=3"], ["rollout: expected a mapping"]),
    (["data.synthetic=arith_chain", "model.warm_start_bare_answers=1.0"], ["warm_start_bare_answers must be in [0, 1)"]),
    (["model.warm_start_bare_answers=0.5"], ["warm_start_bare_answers=0.5 needs data.synthetic=arith_chain"]),
    (["data.train_files=[]", "data.synthetic=none"], ["data.train_files is empty"]),
    (["trainer.batch_size=3", "cluster.policy_world_size=2"], ["trainer.batch_size (3)", "cluster.policy_world_size (2)"]),
    (["actor.offload_params=true"], ["actor.offload_params=true needs actor.zero_stage=3", "actor.zero_stage=2"]),
    (["prm.offload_params=true", "prm.zero_stage=1"], ["prm.offload_params=true", "prm.zero_stage=1"]),
    (["cluster.offload_trainers=true", "actor.zero_stage=0"], ["cluster.offload_trainers=true", "actor.zero_stage=0"]),
    (["prm.ref=policy", "prm.ref_placement=sharded"], ["prm.ref_placement=sharded", "prm.ref=policy"]),
    (["prm.ref_placement=everywhere"], ["prm.ref_placement", "'replicated', 'sharded', 'offload'"]),
    (["cluster.weight_sync=nccl"], ["cluster.weight_sync", "'auto', 'object_store', 'broadcast', 'ipc'"]),
    (["cluster.weight_sync=ipc", "rollout.num_engines=2", "trainer.device=cuda", "cluster.placement=colocated"],
     ["weight_sync=ipc", "rollout.num_engines (2)", "cluster.policy_world_size (1)"]),
    (["cluster.weight_sync=ipc", "trainer.device=cuda"], ["weight_sync=ipc", "cluster.placement=colocated"]),
    (["rollout.sleep_level=3"], ["rollout.sleep_level", "one of 1, 2"]),
    (["prm.offload_optimizer=true", "prm.zero_stage=0"], ["prm.offload_optimizer=true needs prm.zero_stage >= 1"]),
    (["rollout.tensor_parallel_size=2"], ["rollout.tensor_parallel_size=2", "trainer.device=cuda", "(got vllm, cpu)"]),
    (["model.shape.hidden_size=64"], ["model.shape gives hidden_size but not num_layers"]),
    (["cluster.gpu_memory_gib=0"], ["cluster.gpu_memory_gib must be > 0, got 0"]),
    (["cluster.nodes=0"], ["cluster.nodes must be >= 1, got 0"]),
    (["cluster.nodez=2"], ["did you mean 'cluster.nodes'"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_fails_with_a_clear_message(overrides, words):
    with pytest.raises(ConfigError) as info:
        build_config(None, overrides)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(missing))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(listy))
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  total_step: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'trainer.total_steps'"):
        load_config(str(typo))


def test_every_preset_resolves():
    presets = sorted((REPO / "configs").glob("*.yaml"))
    for path in presets:
        assert isinstance(load_config(str(path)), Config), path
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "prime train" in first, f"{path} must open with its command"


def test_dry_run_prints_the_resolved_config(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("trainer:\n  total_steps: 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", str(preset), "algo.name=grpo", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    resolved = load_config(None, [])  # defaults
    assert "name: grpo" in out and "total_steps: 3" in out
    assert out.count("\n") > 50 and resolved.algo.name == "prime"


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(textwrap.dedent("""\
        algo:
          name: rloo
        rollout:
          n: 1
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", str(preset), "--dry-run"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "rollout.n must be >= 2" in proc.stderr and "Traceback" not in proc.stderr


def test_a_float_override_written_without_a_dot_is_a_float():
    # YAML 1.1 reads 1e-4 as a string; the key's type says it is a float.
    cfg = load_config(None, ["actor.lr=1e-4", "prm.lr=3E-6"])
    assert cfg.actor.lr == 1e-4 and cfg.prm.lr == 3e-6


@pytest.mark.parametrize("overrides,kind", [
    ([], "ipc"),  # one CPU machine: one /dev/shm buffer for every engine
    (["rollout.num_engines=2"], "ipc"),
    (["cluster.address=auto"], "broadcast"),  # a CPU cluster: the engines may be on other machines
    (["trainer.device=cuda", "cluster.placement=colocated"], "ipc"),
    (["trainer.device=cuda", "cluster.placement=colocated", "rollout.num_engines=2"], "broadcast"),
    (["trainer.device=cuda", "cluster.placement=colocated", "rollout.tensor_parallel_size=2"], "broadcast"),
    (["trainer.device=cuda", "cluster.placement=split"], "broadcast"),
    (["cluster.weight_sync=object_store"], "object_store"),
    (["cluster.weight_sync=ipc"], "ipc"),
])
def test_weight_sync_auto_resolves_by_placement(overrides, kind, monkeypatch):
    import prime.config

    monkeypatch.setattr(prime.config, "_shm_holds", lambda mb: True)
    assert prime.config.weight_sync_kind(load_config(None, overrides)) == kind


def test_weight_sync_auto_on_the_cpu_needs_room_in_dev_shm(monkeypatch):
    import prime.config

    assert prime.config._shm_holds(0) is os.path.isdir("/dev/shm")
    assert not prime.config._shm_holds(2**40)  # 1 EiB
    asked = []
    monkeypatch.setattr(prime.config, "_shm_holds", lambda mb: asked.append(mb) or False)
    assert prime.config.weight_sync_kind(load_config(None, ["cluster.weight_sync_bucket_mb=64"])) == "broadcast"
    assert asked == [128]  # two buckets
