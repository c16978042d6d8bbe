"""The PRIME driver: a single controller running the RL loop over Ray actor groups.

    prime train configs/tiny_cpu.yaml [section.key=value ...]

One step (docs/algorithms.md section 5):
    generate K per prompt -> verify -> accuracy/truncation filter with oversampling until the batch is
    full -> old log-probs (policy) [-> reference log-probs when KL is on] -> implicit-PRM update and
    token rewards (PRIME) -> advantages -> policy update (PPO-clip or GVPO) -> weight sync to the engines.

Kept from the PRIME recipe: online PRM update from verifier outcomes (`prm.update=before` by default,
`after` as the authors' cheaper variant), leave-one-out process and outcome rewards, whitened returns,
accuracy filter [0.2, 0.8]. Changed: the PRM reward normaliser is global over the batch, not per rank.

Faults (docs/reliability.md): a verifier or rollout actor that dies is restarted and its share of
the step sent again (`launch/faults.py`); a lost training rank or node makes the driver rebuild the
actor groups and resume from the last checkpoint in-process (`trainer.max_restarts`); SIGTERM ends
the run with a checkpoint and exit 0 (`launch/preempt.py`); a step's metrics line is written before
its checkpoint is committed, and a resume cuts metrics.jsonl back to the checkpoint's step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any

from launch.evaluation import run_eval
from launch.faults import JobLost, loss_cause
from launch.logger import MetricsLogger
from launch.preempt import Preemption, StepAbandoned
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
from prime.train.checkpoint import (
    find_latest,
    load_rng_state,
    load_state,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger("prime")

PID_FILE = "driver.pid"
"""In the run folder while the driver runs: its process id, for whatever must send it SIGTERM."""


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def sampling_of(cfg: Config, logprobs: bool = True) -> Sampling:
    r, f = cfg.rollout, cfg.filter
    return Sampling(n=r.n, max_new_tokens=r.max_response_len, temperature=r.temperature, top_p=r.top_p,
                    accuracy=f.accuracy, acc_low=f.acc_low, acc_high=f.acc_high, drop_truncated=f.truncated,
                    max_rounds=f.max_rounds, oversample=f.oversample, logprobs=logprobs)


def checks_logprobs(cfg: Config, step: int, first: bool) -> bool:
    """Whether step `step` asks the engines for log-probs for the weight-sync check: the first step
    a driver runs (`first`) and every step that is a multiple of `rollout.logprob_check_every`."""
    every = cfg.rollout.logprob_check_every
    return every > 0 and (first or step % every == 0)


def rollout_stage(job: Job, step: int, timer: StageTimer, logprobs: bool = True) -> tuple[Batch, dict[str, float]]:
    """generate -> verify -> filter, oversampling until the batch is full; the packed batch. `logprobs`:
    the engines return each token's log-prob (`batch.rollout_logp`; zeros otherwise)."""
    cfg, roles = job.cfg, job.roles
    got = collect_groups(
        rollout=roles.rollout, verifier=roles.verifier, dataset=job.dataset, sampler=job.sampler,
        batch_size=cfg.trainer.batch_size, sampling=sampling_of(cfg, logprobs),
        seed_of=lambda rnd, engine: rollout_seed(cfg.trainer.seed, step, rnd, engine) if cfg.rollout.seeded else None,
        multiple_of=cfg.cluster.policy_world_size, timer=timer, recovery=job.recovery,
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


def queued_sync(cfg: Config) -> bool:
    """Whether the weight sync is queued right behind the policy update (see `WeightSync.start`):
    when nothing has to happen between the two, that is, no sleeping engines to wake and no
    trainer states to offload first."""
    return not (cfg.rollout.enable_sleep_mode or cfg.cluster.offload_trainers)


def sync_stage(job: Job, timer: StageTimer, started: Any = None) -> dict[str, float]:
    """Push the new policy weights into the engines and get them ready to generate; `started`: a
    sync queued behind the update (`queued_sync`), only waited for here.

    Colocated, the order keeps the GPU's peak low: the engines' weights wake (their KV cache
    stays released), the sync fills them, the trainers' states go to the host, and only then does
    the KV cache come back.
    """
    roles, cfg = job.roles, job.cfg
    if started is not None:
        t0 = time.perf_counter()
        with timer("weight_sync"):
            sync = roles.weight_sync.finish(started, since=t0)
    else:
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


def on_policy_update(cfg: Config, has_prm: bool) -> bool:
    """Whether the step skips the separate old-log-prob pass: the policy update is one pass (one
    epoch over one mini-batch holding the whole batch), so its own forward, before its only optimizer
    step, gives the old log-probs bit for bit; and nothing reads them before the update (the PRM
    does with `prm.ref=policy`). `actor.old_logprob_pass=always` keeps the pass."""
    a = cfg.actor
    if a.old_logprob_pass == "always":
        return False
    single = a.ppo_epochs == 1 and (a.mini_batch_size == 0 or a.mini_batch_size >= cfg.responses_per_step)
    return single and not (has_prm and cfg.prm.ref == "policy")


def train_step(job: Job, step: int, stop: Preemption | None = None) -> dict[str, float]:
    """One RL step; under preemption its stages 1-5 (no actor state changes) may be abandoned."""
    cfg, roles, k = job.cfg, job.roles, job.cfg.rollout.n
    timer = StageTimer()
    t_step = time.perf_counter()
    check = checks_logprobs(cfg, step, first=job.steps_run == 0)
    job.steps_run += 1
    with stop.abandonable() if stop is not None else contextlib.nullcontext():
        # 1-3. generate -> verify -> filter
        batch, metrics = rollout_stage(job, step, timer, logprobs=check)
        # 4. old log-probs from the trainer (unless the update's own pass gives them, see
        # `on_policy_update`); on check steps their gap to the engine's is the weight-sync health check
        on_policy = on_policy_update(cfg, roles.prm is not None)
        if not on_policy:
            with timer("old_logprob"):
                batch = batch.replace(old_logp=sharded_logprobs(roles.policy, batch, k, timer, "old_logprob"))
            if check:
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
    # 8. policy update, and (`queued_sync`) the weight sync submitted right behind it
    with timer("update_policy"):
        policy_metrics, update_logp, started = policy_update(
            roles.policy, batch, k, timer, on_policy, then=roles.weight_sync.start if queued_sync(cfg) else None)
    metrics |= policy_metrics
    if on_policy and check:  # the update's forward scored the batch with the weights the engines sampled from
        metrics["rollout/logprob_gap"] = logprob_gap(batch.rollout_logp, update_logp, batch.response_mask)
    # 9. weight sync policy -> rollout engines
    metrics |= sync_stage(job, timer, started)
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


def resume_point(job: Job) -> str | None:
    """The checkpoint `trainer.resume` names (None: start from step 0)."""
    resume = job.cfg.trainer.resume
    if resume == "none":
        return None
    return find_latest(ckpt_root(job)) if resume == "auto" else os.path.abspath(resume)  # actors may start elsewhere


def restore(job: Job, path: str | None) -> int:
    """Load checkpoint `path` into the actors and the driver (None: the state of step 0); returns its step."""
    roles = job.roles
    job.checkpoint = path
    if path is None:
        job.reset_driver_state()
        return 0
    state = load_state(path)
    roles.policy.call(lambda a, r: a.load_checkpoint.remote(os.path.join(path, "policy")))
    if roles.prm is not None:
        roles.prm.call(lambda a, r: a.load_checkpoint.remote(os.path.join(path, "prm")))
    job.sampler.load_state_dict(state["sampler"])
    load_rng_state(path)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def ready_engines(job: Job, start: int) -> None:
    """Bring freshly built engines to the policy's weights before the first step: resumed, they hold
    the initial weights; with sleep mode they have slept since the trainers were built (the sync
    wakes them in the low-peak order of `sync_stage`)."""
    if start or job.cfg.rollout.enable_sleep_mode:
        sync_stage(job, StageTimer())


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


def eval_due(cfg: Config, step: int) -> bool:
    """Held-out evaluation before the first step (step 0), every `trainer.eval_every` steps and after the last."""
    t = cfg.trainer
    return bool(t.eval_every) and (step % t.eval_every == 0 or step == t.total_steps)


def save_due(cfg: Config, step: int) -> bool:
    t = cfg.trainer
    return bool(t.save_every and step % t.save_every == 0) or step == t.total_steps


def timed_save(job: Job, step: int, stop: Preemption) -> None:
    t0 = time.perf_counter()
    job.checkpoint = save(job, step)
    stop.save_estimate_s = time.perf_counter() - t0


def checked_step(job: Job, step: int, stop: Preemption) -> dict[str, float] | None:
    """A step's metrics (with its evaluation and `faults/*`), or None when preemption abandoned it
    (the sampler and RNG are then back at the step's start, so the previous step can be saved)."""
    sampler_state, rng = job.sampler.state_dict(), rng_state()
    try:
        metrics = train_step(job, step, stop)
    except StepAbandoned as e:
        job.sampler.load_state_dict(sampler_state)
        set_rng_state(rng)
        job.recovery.take_metrics()
        log.warning("step %d abandoned: %s", step, e)
        return None
    if eval_due(job.cfg, step):
        metrics |= run_eval(job.cfg, job.eval_problems, job.roles, job.tokenizer, job.recovery)
    if stop.save_estimate_s is not None:
        metrics["timing/last_checkpoint"] = stop.save_estimate_s  # the latest save (this step's comes after its line)
    return metrics | job.recovery.take_metrics()


def stop_preempted(job: Job, logger: MetricsLogger, step: int, stop: Preemption) -> bool:
    """Checkpoint `step` (unless it is the newest checkpoint already) and end the loop."""
    newest = int(load_state(job.checkpoint)["step"]) if job.checkpoint else 0
    if step > newest:
        timed_save(job, step, stop)
    logger.event(step, "preempted", checkpoint=job.checkpoint)
    log.warning("preempted: stopped after step %d with checkpoint %s; the same command resumes the run",
                step, job.checkpoint)
    return False


def train_loop(job: Job, logger: MetricsLogger, start: int, stop: Preemption) -> bool:
    """Steps `start + 1 ..`; each step's line is logged before its checkpoint is written. True when
    the run finished, False when preemption stopped it."""
    t = job.cfg.trainer
    if start == 0 and eval_due(job.cfg, 0):
        logger.log(0, run_eval(job.cfg, job.eval_problems, job.roles, job.tokenizer, job.recovery))
    for step in range(start + 1, t.total_steps + 1):
        metrics = None if stop.requested else checked_step(job, step, stop)
        if metrics is None:
            return stop_preempted(job, logger, step - 1, stop)
        logger.log(step, metrics)
        if save_due(job.cfg, step) or stop.requested:
            timed_save(job, step, stop)
    save_final(job.roles.policy, os.path.join(job.run_dir, "final_policy"))
    if job.roles.prm is not None:
        save_final(job.roles.prm, os.path.join(job.run_dir, "final_prm"))
    return True


def restart_job(job: Job, logger: MetricsLogger, number: int, cause: str) -> int:
    """Rebuild the actor groups and resume from this run's newest checkpoint; returns its step."""
    path = job.checkpoint
    log.warning("restart %d/%d of the job from %s; cause: %s", number, job.cfg.trainer.max_restarts,
                path or "step 0", cause)
    logger.event(int(load_state(path)["step"]) if path else 0, "restart", number=number, cause=cause,
                 checkpoint=path)
    job.rebuild_roles()
    job.steps_run = 0  # new engines: the first step after the restart checks their weights
    start = restore(job, path)
    ready_engines(job, start)
    logger.rewind(start)
    job.recovery.take_metrics()
    job.recovery.counts["faults/job_restarts"] = float(number)
    return start


def train_with_restarts(job: Job, logger: MetricsLogger, start: int, stop: Preemption) -> bool:
    """`train_loop`, restarted in-process from the last checkpoint after a lost rank, node or actor,
    up to `trainer.max_restarts` times."""
    restarts, cause = 0, None
    while True:
        try:
            if cause is not None:
                start = restart_job(job, logger, restarts, cause)
            return train_loop(job, logger, start, stop)
        except Exception as e:
            cause = loss_cause(e, job.roles.groups())
            if cause is None:
                raise
            if restarts >= job.cfg.trainer.max_restarts:
                raise JobLost(f"the job was lost {restarts + 1} time(s), more than trainer.max_restarts="
                              f"{job.cfg.trainer.max_restarts}; last cause: {cause}") from e
            restarts += 1


def open_logger(job: Job, start: int) -> MetricsLogger:
    cfg, lg = job.cfg, job.cfg.logging
    return MetricsLogger(job.run_dir, to_dict(cfg), wandb_mode=lg.wandb_mode, project=lg.wandb_project,
                         entity=lg.wandb_entity, run_name=cfg.trainer.run_name, total_steps=cfg.trainer.total_steps,
                         start_step=start, progress_bar=lg.progress_bar, fresh=cfg.trainer.resume == "none")


def run(cfg: Config) -> str:
    """Run a whole training job (or until preemption); returns the run folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = Preemption(cfg.trainer.preempt_grace_s)
    stop.install()
    job = logger = None
    try:
        job = start_job(cfg, after_ray=stop.install)  # Ray puts in its own SIGTERM handler
        with open(os.path.join(job.run_dir, PID_FILE), "w") as f:  # whom a preStop hook signals
            f.write(f"{os.getpid()}\n")
        removed = remove_leftovers(ckpt_root(job))
        if removed:
            log.info("removed what interrupted saves left: %s", ", ".join(removed))
        start = restore(job, resume_point(job))
        ready_engines(job, start)
        logger = open_logger(job, start)
        train_with_restarts(job, logger, start, stop)
    finally:
        stop.uninstall()
        if logger is not None:
            logger.close()
        if job is not None:
            job.shutdown(timeout_s=5.0 if stop.requested else 60.0)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(job.run_dir, PID_FILE))
    return job.run_dir
