"""The PRIME driver: a single controller running the RL loop over Ray actor groups.

    prime train configs/tiny_cpu.yaml [section.key=value ...]

One step (ALGORITHMS.md section 5):
    generate K per prompt -> verify -> accuracy/truncation filter with oversampling until the batch is
    full -> old log-probs (policy) [-> reference log-probs when KL is on] -> implicit-PRM update and
    token rewards (PRIME) -> advantages -> policy update (PPO-clip or GVPO) -> weight sync to the engines.

Kept from the PRIME recipe: online PRM update from verifier outcomes (`prm.update=before` by default,
`after` as the authors' cheaper variant), leave-one-out process and outcome rewards, whitened returns,
accuracy filter [0.2, 0.8]. Changed: the PRM reward normaliser is global over the batch, not per rank.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time

import numpy as np
import ray
import torch

from launch.logger import MetricsLogger
from launch.roles import Roles, build_roles
from launch.stages import (
    StageTimer,
    build_batch,
    collect_groups,
    compute_advantages,
    logprob_gap,
    policy_update,
    prm_rewards,
    response_metrics,
    sharded_logprobs,
)
from prime.config import Config, to_dict, to_yaml
from prime.data.dataset import PromptDataset, load_prompt_dataset
from prime.data.sampler import PromptSampler
from prime.train.checkpoint import find_latest, load_rng_state, load_state, save_checkpoint
from workers.group import init_ray

log = logging.getLogger("prime")


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def prepare_run_dir(cfg: Config) -> str:
    run_dir = os.path.abspath(os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    return run_dir


def resolve_model(cfg: Config, run_dir: str) -> str:
    """The policy checkpoint: the configured path, or a tiny model built locally into the run folder."""
    if cfg.model.path:
        return cfg.model.path
    from prime.models.tiny import build_tiny_model, tiny_model_preset

    path = os.path.join(run_dir, f"init_model_{cfg.model.tiny_preset}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    # Built (and warm-started) under a temporary name, so a crash never leaves a half-made model.
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, seed=cfg.trainer.seed, **tiny_model_preset(cfg.model.tiny_preset))
    if cfg.model.warm_start_steps:
        from prime.train.sft import sft_warm_start

        stats = sft_warm_start(tmp, steps=cfg.model.warm_start_steps, seed=cfg.trainer.seed,
                               system_prompt=cfg.data.system_prompt)
        log.info("warm start: %d supervised steps, loss %.3f -> %.3f in %.1f s", stats["warmstart/steps"],
                 stats["warmstart/loss_first"], stats["warmstart/loss"], stats["warmstart/seconds"])
    os.replace(tmp, path)
    return path


def load_dataset(cfg: Config, tokenizer, run_dir: str) -> PromptDataset:
    files = list(cfg.data.train_files)
    if not files:
        from prime.data.synthetic import make_arithmetic_dataset, make_code_dataset

        path = os.path.join(run_dir, f"synthetic_{cfg.data.synthetic}.parquet")
        if not os.path.exists(path):
            make = make_arithmetic_dataset if cfg.data.synthetic == "arith" else make_code_dataset
            make(path, n=cfg.data.synthetic_size, seed=cfg.trainer.seed)
        files = [path]
    ds = load_prompt_dataset(files, tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                             system_prompt=cfg.data.system_prompt)
    log.info("dataset: %d prompts (%d dropped as longer than data.max_prompt_len=%d)",
             len(ds), ds.num_dropped_too_long, cfg.data.max_prompt_len)
    if len(ds) == 0:
        raise ValueError(f"no prompt is left after dropping {ds.num_dropped_too_long} longer than "
                         f"data.max_prompt_len={cfg.data.max_prompt_len}")
    return ds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def train_step(cfg: Config, step: int, roles: Roles, dataset: PromptDataset, sampler: PromptSampler,
               pad_id: int) -> dict[str, float]:
    timer = StageTimer()
    t_step = time.perf_counter()
    k = cfg.rollout.n

    # 1-3. generate -> verify -> filter, oversampling until the batch is full
    got = collect_groups(
        rollout=roles.rollout, verifier=roles.verifier, dataset=dataset, sampler=sampler,
        batch_size=cfg.trainer.batch_size, n=k, max_new_tokens=cfg.rollout.max_response_len,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=cfg.trainer.seed * 100003 + step,
        accuracy=cfg.filter.accuracy, acc_low=cfg.filter.acc_low, acc_high=cfg.filter.acc_high,
        truncated=cfg.filter.truncated, max_rounds=cfg.filter.max_rounds, oversample=cfg.filter.oversample,
        multiple_of=cfg.cluster.policy_world_size, timer=timer,
    )
    if cfg.rollout.enable_sleep_mode:  # colocated: free the engines' GPU memory while training
        with timer("engine_sleep"):
            roles.rollout.call(lambda a, r: a.sleep.remote())
    batch = build_batch(got.groups, pad_id)
    mask = batch["response_mask"]  # [B, T]
    metrics = dict(got.metrics) | response_metrics(batch)

    # 4. old log-probs from the trainer; their gap to the engine's is the weight-sync health check
    with timer("old_logprob"):
        batch["old_logp"] = sharded_logprobs(roles.policy, batch, k, timer, "old_logprob")
    metrics["rollout/logprob_gap"] = logprob_gap(batch["rollout_logp"], batch["old_logp"], mask)

    # 5. reference log-probs, only for a KL term
    if roles.reference is not None:
        with timer("ref_logprob"):
            batch["ref_logp"] = sharded_logprobs(roles.reference, batch, k, timer, "ref_logprob")

    # 6. implicit PRM: online update from the verifier outcomes, then token rewards
    process_rewards = None
    if roles.prm is not None:
        with timer("prm"):
            process_rewards, prm_metrics = prm_rewards(roles.prm, batch, k, mode=cfg.prm.update,
                                                       ref_is_policy=cfg.prm.ref == "policy", timer=timer)
        metrics |= prm_metrics

    # 7. advantages (GVPO uses the verifier scores directly in its loss)
    with timer("advantages"):
        if cfg.algo.name != "gvpo":
            a = cfg.algo
            batch["advantages"] = compute_advantages(
                a.name, acc=batch["acc"], group_ids=batch["group_ids"], mask=mask,
                process_rewards=process_rewards, norm_by_std=a.norm_by_std, gamma=a.gamma,
                process_coef=a.process_coef, outcome_coef=a.outcome_coef, gamma_process=a.gamma_process,
                gamma_outcome=a.gamma_outcome)
            metrics["advantages/mean_abs"] = float((batch["advantages"].abs() * mask).sum() / mask.sum())
        else:
            batch["scores"] = batch["acc"]

    # 8. policy update
    with timer("update_policy"):
        metrics |= policy_update(roles.policy, batch, k, timer)

    # 9. weight sync policy -> rollout engines
    if cfg.rollout.enable_sleep_mode:
        with timer("engine_wake"):
            roles.rollout.call(lambda a, r: a.wake_up.remote())
    with timer("weight_sync"):
        sync = roles.weight_sync.sync()
    metrics |= sync
    # Compute = what the actors did (gather, broadcast, engine load); moving objects is overhead.
    timer.compute("weight_sync", sum(sync.get(f"weight_sync/{kk}_seconds", 0.0)
                                     for kk in ("gather", "broadcast", "load")))

    step_s = time.perf_counter() - t_step
    metrics |= timer.metrics
    metrics["timing/step"] = step_s
    compute = sum(v for kk, v in timer.metrics.items() if kk.startswith("compute/"))
    metrics["timing/overhead"] = max(0.0, step_s - compute)
    metrics["timing/overhead_frac"] = metrics["timing/overhead"] / step_s
    if metrics.get("compute/generate"):
        metrics["perf/rollout_tokens_per_s"] = metrics["rollout/generated_tokens"] / metrics["compute/generate"]
    metrics["perf/train_tokens_per_s"] = float(batch["attention_mask"].sum()) / max(
        1e-9, metrics["timing/update_policy"])
    return metrics


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save(cfg: Config, roles: Roles, ckpt_root: str, step: int, sampler: PromptSampler) -> str:
    def policy_writer(path: str) -> None:
        roles.policy.call(lambda a, r: a.save_checkpoint.remote(path))

    writers = {"policy": policy_writer}
    if roles.prm is not None:
        writers["prm"] = lambda path: roles.prm.call(lambda a, r: a.save_checkpoint.remote(path))
    state = {"step": step, "sampler": sampler.state_dict()}
    return save_checkpoint(ckpt_root, step, writers, state, keep_last=cfg.trainer.keep_last)


def restore(cfg: Config, roles: Roles, ckpt_root: str, sampler: PromptSampler) -> int:
    """Load the checkpoint `trainer.resume` names; returns the step it ended at (0 when starting fresh)."""
    if cfg.trainer.resume == "none":
        return 0
    path = find_latest(ckpt_root) if cfg.trainer.resume == "auto" else cfg.trainer.resume
    if path is None:
        return 0
    state = load_state(path)
    roles.policy.call(lambda a, r: a.load_checkpoint.remote(os.path.join(path, "policy")))
    if roles.prm is not None:
        roles.prm.call(lambda a, r: a.load_checkpoint.remote(os.path.join(path, "prm")))
    sampler.load_state_dict(state["sampler"])
    load_rng_state(path)
    roles.weight_sync.sync()  # engines started from the initial weights
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def save_final(group, final: str) -> None:
    """A plain HF folder that transformers and vLLM load directly, written to a temp name first."""
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    group.call(lambda a, r: a.save_hf.remote(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("wrote %s", final)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def run(cfg: Config, config_path: str | None = None) -> str:
    """Run a whole training job; returns the run folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    seed_everything(cfg.trainer.seed)
    run_dir = prepare_run_dir(cfg)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    model_path = resolve_model(cfg, run_dir)
    prm_path = cfg.prm.model_path or model_path

    from prime.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    dataset = load_dataset(cfg, tokenizer, run_dir)
    sampler = PromptSampler(len(dataset), cfg.trainer.batch_size, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)

    actor_env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # no per-actor load/save bars under the step bar
    if cfg.trainer.device == "cpu":
        actor_env["DS_ACCELERATOR"] = "cpu"
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, env_vars=actor_env)
    # Optimizer steps per RL step (the LR schedule's horizon); a short last mini-batch is a step too.
    steps_per_rl_step = cfg.actor.ppo_epochs * math.ceil(
        cfg.responses_per_step / (cfg.actor.mini_batch_size or cfg.responses_per_step))
    roles = build_roles(cfg, model_path, prm_path, cfg.trainer.total_steps * steps_per_rl_step)
    log.info("actors ready (engine start %.1f s)", roles.engine_start_s)
    logger = None
    try:
        start = restore(cfg, roles, ckpt_root, sampler)
        logger = MetricsLogger(run_dir, to_dict(cfg), wandb_mode=cfg.logging.wandb_mode,
                               project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                               run_name=cfg.trainer.run_name, total_steps=cfg.trainer.total_steps,
                               start_step=start, progress_bar=cfg.logging.progress_bar)
        for step in range(start + 1, cfg.trainer.total_steps + 1):
            metrics = train_step(cfg, step, roles, dataset, sampler, tokenizer.pad_token_id)
            last = step == cfg.trainer.total_steps
            if (cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or last:
                t0 = time.perf_counter()
                save(cfg, roles, ckpt_root, step, sampler)
                metrics["timing/checkpoint"] = time.perf_counter() - t0
            logger.log(step, metrics)
        save_final(roles.policy, os.path.join(run_dir, "final_policy"))
        if roles.prm is not None:
            save_final(roles.prm, os.path.join(run_dir, "final_prm"))
    finally:
        if logger is not None:
            logger.close()
        roles.shutdown()
        if cfg.cluster.address == "local":
            ray.shutdown()
    return run_dir
