"""Builders: the only code that reads the config tree to construct the actor groups.

Each builder turns config sections into the flat arguments of a role (typed settings, a loss
object, plain keyword arguments) and asks `workers.group` to place it. The roles never see the
config object, and the estimator's consequences (which policy loss, whether a PRM exists) come from
`prime.algo`, so nothing here branches on an algorithm's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from prime.algo import policy_loss_kind, uses_process_rewards
from prime.config import Config
from prime.train.engine import EngineSettings
from prime.train.losses import Regularizers, policy_loss
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


def uses_prm(cfg: Config) -> bool:
    return uses_process_rewards(cfg.algo.name, cfg.algo.process_coef)


def uses_reference(cfg: Config) -> bool:
    return cfg.algo.kl_coef > 0.0


def policy_args(cfg: Config, total_optimizer_steps: int) -> tuple[Any, EngineSettings, dict[str, Any]]:
    """(loss, engine settings, trainer keyword arguments) of the policy."""
    a = cfg.actor
    reg = Regularizers(loss_agg=a.loss_agg, max_len=cfg.rollout.max_response_len, entropy_coef=a.entropy_coef,
                       kl_coef=cfg.algo.kl_coef, kl_type=cfg.algo.kl_type)
    loss = policy_loss(policy_loss_kind(cfg.algo.name), clip_low=a.clip_low, clip_high=a.clip_high,
                       clip_ratio_c=a.clip_ratio_c, gvpo_beta=cfg.algo.gvpo_beta, reg=reg)
    settings = EngineSettings(
        lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip, zero_stage=a.zero_stage,
        offload_optimizer=a.offload_optimizer, offload_params=a.offload_params, bf16=cfg.model.dtype == "bfloat16",
        lr_warmup_steps=a.lr_warmup_steps,
        lr_schedule=a.lr_schedule, total_steps=total_optimizer_steps,
        gradient_checkpointing=cfg.model.gradient_checkpointing)
    kwargs = dict(mini_batch_size=a.mini_batch_size or cfg.responses_per_step, epochs=a.ppo_epochs,
                  max_tokens_per_micro_batch=a.max_tokens_per_micro_batch, temperature=cfg.rollout.temperature,
                  seed=cfg.trainer.seed, trust_remote_code=cfg.model.trust_remote_code)
    return loss, settings, kwargs


def prm_args(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of `prime.train.prm.build_implicit_prm`."""
    p = cfg.prm
    mini = p.mini_batch_size or max(1, cfg.responses_per_step // 4)
    if p.loss == "dpo":  # whole groups per mini-batch
        mini = max(cfg.rollout.n, (mini // cfg.rollout.n) * cfg.rollout.n)
    settings = EngineSettings(lr=p.lr, grad_clip=p.grad_clip, zero_stage=p.zero_stage,
                              bf16=cfg.model.dtype == "bfloat16", gradient_checkpointing=p.gradient_checkpointing,
                              offload_optimizer=p.offload_optimizer, offload_params=p.offload_params)
    return dict(settings=settings, ref=p.ref, ref_placement=p.ref_placement, beta=p.beta, loss=p.loss,
                granularity=p.granularity, norm=p.norm,
                mini_batch_size=mini, max_tokens_per_micro_batch=p.max_tokens_per_micro_batch,
                temperature=cfg.rollout.temperature, seed=cfg.trainer.seed,
                trust_remote_code=cfg.model.trust_remote_code)


def rollout_engine_args(cfg: Config) -> dict[str, Any]:
    r = cfg.rollout
    common = dict(dtype=cfg.model.dtype, seed=cfg.trainer.seed, trust_remote_code=cfg.model.trust_remote_code)
    if r.engine == "hf":
        return common | dict(device=cfg.trainer.device)
    return common | dict(
        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        max_model_len=cfg.data.max_prompt_len + r.max_response_len, enforce_eager=r.enforce_eager,
        enable_sleep_mode=r.enable_sleep_mode, cpu_kv_cache_gib=r.cpu_kv_cache_gib,
    )


@dataclass
class _Placement:
    """Where the groups go: a shared placement group (colocated GPUs) or each its own."""

    shared_pg: Any
    train_gpu: float
    rollout_gpu: float


def _placement(cfg: Config) -> _Placement:
    gpu = cfg.trainer.device == "cuda"
    if not gpu:
        return _Placement(None, 0.0, 0.0)
    if cfg.cluster.placement != "colocated":
        return _Placement(None, 1.0, float(cfg.rollout.tensor_parallel_size))
    # Every role's rank i shares bundle i's GPU; equal fractions keep Ray's accounting within one GPU.
    roles_on_gpu = 2 + int(uses_prm(cfg)) + int(uses_reference(cfg))
    share = round(1.0 / roles_on_gpu - 0.005, 2)
    pg = shared_placement_group(cfg.cluster.policy_world_size, num_cpus=roles_on_gpu * cfg.cluster.cpus_per_actor,
                                num_gpus=1.0)
    return _Placement(pg, share, share)


def build_roles(cfg: Config, model_path: str, prm_path: str, total_optimizer_steps: int) -> Roles:
    cpus, world = cfg.cluster.cpus_per_actor, cfg.cluster.policy_world_size
    place = _placement(cfg)
    rollout = ActorGroup(
        RolloutWorker, cfg.rollout.num_engines, name="rollout", num_cpus=cpus, num_gpus=place.rollout_gpu,
        shared_pg=place.shared_pg if cfg.rollout.num_engines <= world else None,
        kwargs=dict(engine=cfg.rollout.engine, model_path=model_path, engine_kwargs=rollout_engine_args(cfg)),
    )
    verifier = ActorGroup(
        VerifierWorker, cfg.verifier.num_actors, name="verifier", num_cpus=cpus,
        kwargs=dict(num_workers=cfg.verifier.workers_per_actor, timeout_s=cfg.verifier.timeout_s,
                    code_case_timeout_s=cfg.verifier.code_test_timeout_s),
    )
    starts = rollout.call(lambda a, r: a.ready.remote())
    if cfg.rollout.enable_sleep_mode:  # colocated: the engines free their GPU memory before DeepSpeed builds
        rollout.call(lambda a, r: a.sleep.remote(cfg.rollout.sleep_level))
    policy = ActorGroup(PolicyWorker, world, name="policy", num_cpus=cpus, num_gpus=place.train_gpu,
                        shared_pg=place.shared_pg)
    loss, settings, kwargs = policy_args(cfg, total_optimizer_steps)
    policy.call(lambda a, r: a.build.remote(model_path, loss, settings, kwargs))
    prm = None
    if uses_prm(cfg):
        same_ranks = cfg.cluster.prm_world_size == world
        prm = ActorGroup(PRMWorker, cfg.cluster.prm_world_size, name="prm", num_cpus=cpus, num_gpus=place.train_gpu,
                         shared_pg=place.shared_pg if same_ranks else None)
        prm.call(lambda a, r: a.build.remote(prm_path, prm_args(cfg)))
    reference = None
    if uses_reference(cfg):
        reference = ActorGroup(ReferenceWorker, world, name="reference", num_cpus=cpus, num_gpus=place.train_gpu,
                               shared_pg=place.shared_pg,
                               kwargs=dict(model_path=model_path, dtype=cfg.model.dtype,
                                           max_tokens_per_micro_batch=cfg.actor.max_tokens_per_micro_batch,
                                           temperature=cfg.rollout.temperature,
                                           trust_remote_code=cfg.model.trust_remote_code))
    # After the trainer is built and the engines are up: the streaming plan needs both.
    weight_sync = make_weight_sync(cfg.cluster.weight_sync, policy, rollout, cfg.cluster.weight_sync_bucket_mb)
    return Roles(rollout=rollout, verifier=verifier, policy=policy, prm=prm, reference=reference,
                 engine_start_s=max(starts), weight_sync=weight_sync)
