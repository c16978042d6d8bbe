"""The PRIME driver: a single controller running the RL loop over Ray actor groups.

    prime train configs/tiny_cpu.yaml [section.key=value ...]

One step (docs/algorithms.md section 5):
    generate K per prompt -> verify -> accuracy/truncation filter with oversampling until the batch is
    full -> old log-probs (policy) [-> reference log-probs when KL is on] -> implicit-PRM update and
    token rewards (PRIME) -> advantages -> policy update (PPO-clip or GVPO) -> weight sync to the engines.

Kept from the PRIME recipe: online PRM update from verifier outcomes (`prm.update=before` by default,
`after` as the authors' cheaper variant), leave-one-out process and outcome rewards, whitened returns,
accuracy filter [0.2, 0.8]. Changed: the PRM reward normaliser is global over the batch, not per rank.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from launch.logger import MetricsLogger
from launch.setup import Job, start_job
from launch.stages import (
    Sampling,
    StageTimer,
    build_batch,
    collect_groups,
    policy_update,
    prm_rewards,
    response_metrics,
    sharded_logprobs,
)
from prime.algo import compute_advantages, logprob_gap
from prime.config import Config, rollout_seed, to_dict
from prime.data.batch import Batch
from prime.train.checkpoint import find_latest, load_rng_state, load_state, save_checkpoint

log = logging.getLogger("prime")


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def sampling_of(cfg: Config) -> Sampling:
    r, f = cfg.rollout, cfg.filter
    return Sampling(n=r.n, max_new_tokens=r.max_response_len, temperature=r.temperature, top_p=r.top_p,
                    accuracy=f.accuracy, acc_low=f.acc_low, acc_high=f.acc_high, drop_truncated=f.truncated,
                    max_rounds=f.max_rounds, oversample=f.oversample)


def rollout_stage(job: Job, step: int, timer: StageTimer) -> tuple[Batch, dict[str, float]]:
    """generate -> verify -> filter, oversampling until the batch is full; the packed batch."""
    cfg, roles = job.cfg, job.roles
    got = collect_groups(
        rollout=roles.rollout, verifier=roles.verifier, dataset=job.dataset, sampler=job.sampler,
        batch_size=cfg.trainer.batch_size, sampling=sampling_of(cfg),
        seed_of=lambda rnd, engine: rollout_seed(cfg.trainer.seed, step, rnd, engine),
        multiple_of=cfg.cluster.policy_world_size, timer=timer,
    )
    if cfg.rollout.enable_sleep_mode:  # colocated: free the engines' GPU memory while training
        with timer("engine_sleep"):
            roles.rollout.call(lambda a, r: a.sleep.remote(cfg.rollout.sleep_level))
    batch = build_batch(got.groups, job.pad_id)
    return batch, dict(got.metrics) | response_metrics(batch)


def advantage_stage(cfg: Config, batch: Batch, process_rewards) -> tuple[Batch, dict[str, float]]:
    a = cfg.algo
    adv, metrics = compute_advantages(
        a.name, scores=batch.scores, group_ids=batch.group_ids, mask=batch.response_mask,
        process_rewards=process_rewards, norm_by_std=a.norm_by_std, gamma=a.gamma, process_coef=a.process_coef,
        outcome_coef=a.outcome_coef, gamma_process=a.gamma_process, gamma_outcome=a.gamma_outcome)
    return batch.replace(advantages=adv), metrics


def sync_stage(job: Job, timer: StageTimer) -> dict[str, float]:
    """Push the new policy weights into the engines and get them ready to generate.

    Colocated, the order keeps the GPU's peak low: the engines' weights wake (their KV cache
    stays released), the sync fills them, the trainers' states go to the host, and only then does
    the KV cache come back.
    """
    roles, cfg = job.roles, job.cfg
    if cfg.rollout.enable_sleep_mode:
        with timer("engine_wake"):
            roles.rollout.call(lambda a, r: a.wake_up.remote(["weights"]))
    with timer("weight_sync"):
        sync = roles.weight_sync.sync()
    if cfg.cluster.offload_trainers:
        with timer("offload_trainers"):
            for group in (g for g in (roles.policy, roles.prm) if g is not None):
                group.call(lambda a, r: a.offload_states.remote())
    if cfg.rollout.enable_sleep_mode:
        with timer("engine_wake"):
            roles.rollout.call(lambda a, r: a.wake_up.remote(["kv_cache"]))
    # Compute = what the actors did (gather, broadcast, engine load); moving objects is overhead.
    actor_s = sum(sync.get(f"weight_sync/{part}_seconds", 0.0) for part in ("gather", "broadcast", "load"))
    timer.compute("weight_sync", actor_s)
    return sync


def step_timing(timer: StageTimer, step_s: float, batch: Batch, metrics: dict[str, float]) -> dict[str, float]:
    """timing/*, compute/*, the framework's overhead and the throughputs of the step."""
    out = dict(timer.metrics)
    out["timing/step"] = step_s
    compute = sum(v for kk, v in timer.metrics.items() if kk.startswith("compute/"))
    out["timing/overhead"] = max(0.0, step_s - compute)
    out["timing/overhead_frac"] = out["timing/overhead"] / step_s
    if out.get("compute/generate"):
        out["perf/rollout_tokens_per_s"] = metrics["rollout/generated_tokens"] / out["compute/generate"]
    out["perf/train_tokens_per_s"] = float(batch.attention_mask.sum()) / max(1e-9, out["timing/update_policy"])
    return out


def train_step(job: Job, step: int) -> dict[str, float]:
    cfg, roles, k = job.cfg, job.roles, job.cfg.rollout.n
    timer = StageTimer()
    t_step = time.perf_counter()
    # 1-3. generate -> verify -> filter
    batch, metrics = rollout_stage(job, step, timer)
    # 4. old log-probs from the trainer; their gap to the engine's is the weight-sync health check
    with timer("old_logprob"):
        batch = batch.replace(old_logp=sharded_logprobs(roles.policy, batch, k, timer, "old_logprob"))
    metrics["rollout/logprob_gap"] = logprob_gap(batch.rollout_logp, batch.old_logp, batch.response_mask)
    # 5. reference log-probs, only for a KL term
    if roles.reference is not None:
        with timer("ref_logprob"):
            batch = batch.replace(ref_logp=sharded_logprobs(roles.reference, batch, k, timer, "ref_logprob"))
    # 6. implicit PRM: online update from the verifier outcomes, then token rewards
    process_rewards = None
    if roles.prm is not None:
        with timer("prm"):
            process_rewards, prm_metrics = prm_rewards(roles.prm, batch, k, mode=cfg.prm.update,
                                                       ref_is_policy=cfg.prm.ref == "policy", timer=timer)
        metrics |= prm_metrics
    # 7. advantages
    with timer("advantages"):
        batch, adv_metrics = advantage_stage(cfg, batch, process_rewards)
    metrics |= adv_metrics
    # 8. policy update
    with timer("update_policy"):
        metrics |= policy_update(roles.policy, batch, k, timer)
    # 9. weight sync policy -> rollout engines
    metrics |= sync_stage(job, timer)
    return metrics | step_timing(timer, time.perf_counter() - t_step, batch, metrics)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def ckpt_root(job: Job) -> str:
    return os.path.join(job.run_dir, "checkpoints")


def save(job: Job, step: int) -> str:
    roles = job.roles
    writers = {"policy": lambda path: roles.policy.call(lambda a, r: a.save_checkpoint.remote(path))}
    if roles.prm is not None:
        writers["prm"] = lambda path: roles.prm.call(lambda a, r: a.save_checkpoint.remote(path))
    state = {"step": step, "sampler": job.sampler.state_dict()}
    return save_checkpoint(ckpt_root(job), step, writers, state, keep_last=job.cfg.trainer.keep_last)


def restore(job: Job) -> int:
    """Load the checkpoint `trainer.resume` names; returns the step it ended at (0 when starting fresh)."""
    resume, roles = job.cfg.trainer.resume, job.roles
    if resume == "none":
        return 0
    path = find_latest(ckpt_root(job)) if resume == "auto" else resume
    if path is None:
        return 0
    state = load_state(path)
    roles.policy.call(lambda a, r: a.load_checkpoint.remote(os.path.join(path, "policy")))
    if roles.prm is not None:
        roles.prm.call(lambda a, r: a.load_checkpoint.remote(os.path.join(path, "prm")))
    job.sampler.load_state_dict(state["sampler"])
    load_rng_state(path)
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


def train_loop(job: Job, logger: MetricsLogger, start: int) -> None:
    t = job.cfg.trainer
    for step in range(start + 1, t.total_steps + 1):
        metrics = train_step(job, step)
        if (t.save_every and step % t.save_every == 0) or step == t.total_steps:
            t0 = time.perf_counter()
            save(job, step)
            metrics["timing/checkpoint"] = time.perf_counter() - t0
        logger.log(step, metrics)
    save_final(job.roles.policy, os.path.join(job.run_dir, "final_policy"))
    if job.roles.prm is not None:
        save_final(job.roles.prm, os.path.join(job.run_dir, "final_prm"))


def run(cfg: Config) -> str:
    """Run a whole training job; returns the run folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job = start_job(cfg)
    logger = None
    try:
        start = restore(job)
        if start or cfg.rollout.enable_sleep_mode:
            # Resumed: the engines started from the initial weights. Colocated: they have slept
            # since the trainers were built.
            sync_stage(job, StageTimer())
        lg = cfg.logging
        logger = MetricsLogger(job.run_dir, to_dict(cfg), wandb_mode=lg.wandb_mode, project=lg.wandb_project,
                               entity=lg.wandb_entity, run_name=cfg.trainer.run_name,
                               total_steps=cfg.trainer.total_steps, start_step=start, progress_bar=lg.progress_bar)
        train_loop(job, logger, start)
    finally:
        if logger is not None:
            logger.close()
        job.shutdown()
    return job.run_dir
