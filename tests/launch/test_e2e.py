"""End-to-end runs of the driver on CPU through real Ray actors, DeepSpeed and the generation engines.

Each run is the tiny preset shrunk to 2 prompts x 4 samples x 16 tokens. The PRIME run uses the
vLLM CPU engine (the demo's path); GRPO and GVPO use the HF engine to keep the suite short.
"""

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Keys every step must log, whatever the estimator.
COMMON_KEYS = {
    "verify/mean_score", "filter/kept_groups", "filter/rounds", "rollout/logprob_gap", "response/mean_len",
    "timing/generate", "timing/verify", "timing/update_policy", "timing/weight_sync",
    "timing/step", "timing/overhead", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s",
    "policy/grad_norm", "policy/lr",
}


PRESET = str(REPO / "configs" / "tiny_cpu.yaml")
TINY = ("trainer.batch_size=2", "rollout.max_response_len=16", "logging.wandb_mode=offline", "logging.progress_bar=false",
        "cluster.num_cpus=6", "data.synthetic_size=64", "filter.max_rounds=2", "model.warm_start_steps=0",
        "rollout.logprob_check_every=1")  # every step checks the weight sync (the tests read the gap of each)


def make_cfg(tmp_path, *overrides):
    from prime.config import build_config, load_yaml

    return build_config(load_yaml(PRESET), [f"trainer.output_dir={tmp_path}", *TINY, *overrides])


def train_argv(tmp_path, *overrides) -> list[str]:
    """The arguments of `prime train` for the same shrunk preset as `make_cfg`."""
    return ["train", PRESET, f"trainer.output_dir={tmp_path}", *TINY, *overrides]


def eval_file(tmp_path) -> str:
    """Eight held-out arithmetic rows (another seed than the training set's)."""
    from prime.data.synthetic import arithmetic_rows, write_rows

    return str(write_rows(arithmetic_rows(8, seed=123), tmp_path / "heldout.jsonl"))


def check_eval(rows, steps, prm=False):
    """Held-out metrics at step 0, at the evaluated steps and after the last."""
    evaluated = [r["step"] for r in rows if "eval/heldout/greedy_pass@1" in r]
    assert evaluated == steps, evaluated
    row = rows[-1]
    for key in ("eval/heldout/pass@1", "eval/heldout/pass@4", "eval/heldout/maj@4", "eval/heldout/mean_score"):
        assert 0.0 <= row[key] <= 1.0, key
    if prm:
        assert 0.0 <= row["eval/heldout/prm_best_of_n_sum@4"] <= 1.0


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_state(folder):
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out |= load_file(str(f))
    return out


def max_abs_change(a_dir, b_dir):
    a, b = load_state(a_dir), load_state(b_dir)
    common = set(a) & set(b)
    assert common, "no common tensor names"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in common)


def check_run(run_dir, steps, extra_keys=(), prm=False):
    rows = [r for r in read_metrics(run_dir) if r["step"] > 0]  # step 0 holds only the first evaluation
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        missing = (COMMON_KEYS | set(extra_keys)) - set(r)
        assert not missing, f"step {r['step']} lacks {sorted(missing)}"
        # The engines' log-probs of what they sampled match the trainer's: weights are in sync. The
        # mean gap is fp32 kernel rounding (~1e-7 here); a missed sync moves it above 1e-2.
        assert r["rollout/logprob_gap"] < 1e-3, r["rollout/logprob_gap"]
    init = os.path.join(run_dir, "init_model_tiny")
    assert max_abs_change(init, os.path.join(run_dir, "final_policy")) > 0, "policy weights did not change"
    if prm:
        assert max_abs_change(init, os.path.join(run_dir, "final_prm")) > 0, "PRM weights did not change"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final_policy"))
    assert (Path(run_dir) / "config.yaml").exists()
    assert list((Path(run_dir) / "wandb").glob("offline-run-*")), "no wandb offline run"
    return rows


def test_prime_with_vllm_runs_checkpoints_and_resumes(tmp_path):
    from launch.train import run
    from prime.train.checkpoint import find_latest

    # The 7B preset's memory settings in miniature: ZeRO-3 trainers built under zero.Init, the PRM's
    # reference sharded, the weights streamed into vLLM's worker through a shared staging buffer,
    # engines asleep while training and trainer states offloaded while generating (both no-ops
    # without a GPU, but the driver's order runs).
    memory = ("actor.zero_stage=3", "prm.zero_stage=3", "prm.ref_placement=sharded", "cluster.weight_sync=ipc",
              "rollout.enable_sleep_mode=true", "cluster.offload_trainers=true")
    cfg = make_cfg(tmp_path, "algo.name=prime", "rollout.engine=vllm", "trainer.total_steps=2",
                   "trainer.save_every=1", "trainer.run_name=prime", *memory)
    run_dir = run(cfg)
    rows = check_run(run_dir, 2, extra_keys={"prm/loss", "prm/acc", "prm/reward_mean", "policy/clip_frac",
                                             "weight_sync/buckets"}, prm=True)
    assert all(r["policy/lr"] > 0 for r in rows)
    ckpt = find_latest(os.path.join(run_dir, "checkpoints"))
    assert ckpt is not None and ckpt.endswith("step_000002")
    state = json.loads(Path(ckpt, "state.json").read_text())
    assert state["step"] == 2

    # Resume: the same run folder, one more step; it must continue at step 3 with the restored weights
    # synced to the fresh engine (a tiny log-prob gap) and the sampler where it stopped.
    cfg3 = make_cfg(tmp_path, "algo.name=prime", "rollout.engine=vllm", "trainer.total_steps=3",
                    "trainer.save_every=1", "trainer.run_name=prime", "trainer.resume=auto", *memory)
    run(cfg3)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["rollout/logprob_gap"] < 1e-3  # as in check_run
    state3 = json.loads(Path(find_latest(os.path.join(run_dir, "checkpoints")), "state.json").read_text())
    assert state3["step"] == 3
    assert state3["sampler"]["num_served"] > state["sampler"]["num_served"]


@pytest.mark.parametrize("algo,sync,engines,extra", [
    ("grpo", "object_store", 1, {"policy/clip_frac", "advantages/mean_abs"}),
    # two engines sharing the cores (launch.roles.engine_env), both fed by one broadcast
    ("gvpo", "broadcast", 2, {"gvpo/loss", "weight_sync/buckets"}),
])
def test_grpo_and_gvpo_with_hf_engine(tmp_path, algo, sync, engines, extra):
    from launch.train import run

    cfg = make_cfg(tmp_path, f"algo.name={algo}", "rollout.engine=hf", "trainer.total_steps=2",
                   "trainer.save_every=2", f"trainer.run_name={algo}", f"cluster.weight_sync={sync}",
                   f"rollout.num_engines={engines}", "trainer.eval_every=2",
                   f"data.eval_files=[{eval_file(tmp_path)}]")
    run_dir = run(cfg)
    rows = read_metrics(run_dir)
    check_eval(rows, [0, 2])
    assert rows[0]["step"] == 0  # the start point of the held-out curve
    check_run(run_dir, 2, extra_keys=extra | {"weight_sync/bytes"})
    assert not (Path(run_dir) / "final_prm").exists()  # no PRM outside PRIME


def test_resume_restores_weights_exactly(tmp_path):
    """A checkpoint's policy, loaded into a new run, gives the same log-probs as the run that saved it."""
    from launch.train import run

    cfg = make_cfg(tmp_path, "algo.name=rloo", "rollout.engine=hf", "trainer.total_steps=1",
                   "trainer.save_every=1", "trainer.run_name=rloo")
    run_dir = run(cfg)
    saved = load_state(os.path.join(run_dir, "final_policy"))
    cfg2 = make_cfg(tmp_path, "algo.name=rloo", "rollout.engine=hf", "trainer.total_steps=1",
                    "trainer.save_every=1", "trainer.run_name=rloo", "trainer.resume=auto")
    run(cfg2)  # nothing left to do: restores step 1 and writes the final policy again
    again = load_state(os.path.join(run_dir, "final_policy"))
    assert len(read_metrics(run_dir)) == 1
    for k in saved:
        torch.testing.assert_close(saved[k], again[k], rtol=0, atol=0)


def test_prime_with_two_data_parallel_ranks(tmp_path):
    """Policy and PRM each on 2 DeepSpeed ranks (gloo) placed by workers.group, fed whole-group shards."""
    from launch.train import run

    cfg = make_cfg(tmp_path, "algo.name=prime", "rollout.engine=hf", "trainer.total_steps=2",
                   "trainer.save_every=2", "trainer.run_name=dp2", "cluster.policy_world_size=2",
                   "cluster.prm_world_size=2", "cluster.num_cpus=8", "trainer.eval_every=5",
                   f"data.eval_files=[{eval_file(tmp_path)}]")
    run_dir = run(cfg)
    rows = read_metrics(run_dir)
    check_eval(rows, [0, 2], prm=True)  # the PRM's 2 ranks score the held-out samples
    check_run(run_dir, 2, extra_keys={"prm/loss", "policy/clip_frac"}, prm=True)
