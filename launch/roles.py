"""Builders: the only code that reads the config tree to construct the actor groups.

Each builder turns config sections into the flat arguments of a role (typed settings, a loss
object, plain keyword arguments) and asks `workers.group` to place it. The roles never see the
config object, and the estimator's consequences (which policy loss, whether a PRM exists) come from
`prime.algo`, so nothing here branches on an algorithm's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from launch.placement import Layout
from prime.algo import policy_loss_kind
from prime.config import Config, weight_sync_kind
from prime.train.engine import EngineSettings
from prime.train.losses import Regularizers, policy_loss
from workers.group import ActorGroup, PlacementError, Slot, cluster_nodes, create_placement_group, match_nodes
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
    placement_groups: list = field(default_factory=list)

    def placement_record(self) -> dict[str, list[dict[str, Any]]]:
        """Where every rank runs: its Ray node id and address, and its bundle (written to placement.json)."""
        ips = {n.node_id: n.ip for n in cluster_nodes()}
        return {name: [{"rank": r, "node_id": node, "node_ip": ips.get(node, "?"), "bundle": slot.bundle}
                       for r, (node, slot) in enumerate(zip(g.node_ids(), g.slots))]
                for name, g in self.groups().items()}

    def groups(self) -> dict[str, ActorGroup]:
        """The role groups that exist in this job, by role name."""
        named = {"rollout": self.rollout, "verifier": self.verifier, "policy": self.policy, "prm": self.prm,
                 "reference": self.reference}
        return {name: g for name, g in named.items() if g is not None}

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every role: each actor's own clean-up (engines, grading pools) for up to `timeout_s`
        per group (a rank hung beside a dead peer does not answer), then kill the actors."""
        for group in self.groups().values():  # Ray calls reach actors only once their lanes are closed
            group.close_lanes(timeout_s=timeout_s)
        try:
            self.weight_sync.close()
        except Exception:  # a transport whose peers are already gone needs no clean close
            pass
        for group in self.groups().values():
            try:  # let each role stop its own subprocesses (engines, grading pools) before it is killed
                ray.get([a.shutdown.remote() for a in group.actors], timeout=timeout_s)
            except Exception:  # an actor that already died needs no clean stop
                pass
            group.shutdown()
        for pg in self.placement_groups:
            remove_placement_group(pg)


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
                  seed=cfg.trainer.seed, trust_remote_code=cfg.model.trust_remote_code, padding_free=a.padding_free,
                  share_prompts=a.share_prompts)
    return loss, settings, kwargs


def prm_args(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of `prime.train.prm.build_implicit_prm`."""
    p = cfg.prm
    mini = p.mini_batch_size or max(1, cfg.responses_per_step // 4)
    if p.loss == "dpo":  # whole groups per mini-batch
        mini = max(cfg.rollout.n, (mini // cfg.rollout.n) * cfg.rollout.n)
    settings = EngineSettings(lr=p.lr, grad_clip=p.grad_clip, zero_stage=p.zero_stage,
                              offload_optimizer=p.offload_optimizer, offload_params=p.offload_params,
                              bf16=cfg.model.dtype == "bfloat16",
                              gradient_checkpointing=cfg.model.gradient_checkpointing or p.gradient_checkpointing)
    return dict(settings=settings, ref=p.ref, ref_placement=p.ref_placement, beta=p.beta, loss=p.loss,
                granularity=p.granularity, norm=p.norm,
                mini_batch_size=mini, max_tokens_per_micro_batch=p.max_tokens_per_micro_batch,
                temperature=cfg.rollout.temperature, seed=cfg.trainer.seed,
                trust_remote_code=cfg.model.trust_remote_code, padding_free=p.padding_free, share_prompts=p.share_prompts)


def rollout_engine_args(cfg: Config) -> dict[str, Any]:
    r = cfg.rollout
    common = dict(dtype=cfg.model.dtype, seed=cfg.trainer.seed, trust_remote_code=cfg.model.trust_remote_code)
    if r.engine == "hf":
        return common | dict(device=cfg.trainer.device)
    # A tensor-parallel engine runs its workers as Ray actors in the one-GPU bundles launch/placement.py gave it.
    executor = {"distributed_executor_backend": "ray"} if r.tensor_parallel_size > 1 else {}
    return common | executor | dict(
        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        max_model_len=cfg.data.max_prompt_len + r.max_response_len, enforce_eager=r.enforce_eager,
        enable_sleep_mode=r.enable_sleep_mode, cpu_kv_cache_gib=r.cpu_kv_cache_gib,
        in_process=r.cpu_in_process and cfg.trainer.device == "cpu" and r.tensor_parallel_size == 1,
    )


def engine_env(cfg: Config) -> dict[str, str]:
    """What each rollout engine's actor adds to `launch.setup.library_env`. On a local CPU run the
    engines generate at the same time, so each takes an equal share of the cores (`OMP_NUM_THREADS`,
    at least 1) instead of all of them: with more threads than cores, OpenMP's spinning threads wait on
    each other (two engines with two threads each on 2 cores: a tiny-preset generate took 1.03 s
    instead of 0.24 s with one thread each)."""
    if cfg.trainer.device == "cpu" and cfg.cluster.address == "local" and cfg.rollout.num_engines > 1:
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cfg.rollout.num_engines))}
    return {}


TRAINER_HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 48)}
"""glibc malloc settings, read when a process starts: no block gets its own mapping (every
allocation comes from the heap), and the heap is never trimmed (a free top under 256 TiB stays)."""


def trainer_env(cfg: Config) -> dict[str, str]:
    """What each trainer actor (policy, PRM, reference) adds to `launch.setup.library_env`: with
    trainer.device=cpu and cluster.trainer_heap=keep, `TRAINER_HEAP_ENV`, so that freed activations
    stay in the process for the next pass (see `ClusterConfig.trainer_heap`)."""
    if cfg.trainer.device == "cpu" and cfg.cluster.trainer_heap == "keep":
        return dict(TRAINER_HEAP_ENV)
    return {}


def reserve(cfg: Config, layout: Layout) -> dict[str, Any]:
    """The layout's placement groups, by name, each bundle pinned to the Ray node matched to its planned
    node; all or none (what was reserved is released when one group fails)."""
    node_ids = match_nodes(layout.node_needs())
    pgs: dict[str, Any] = {}
    try:
        for spec in layout.groups.values():
            nodes = [None if n is None else node_ids[n] for n in spec.nodes]
            pgs[spec.name] = create_placement_group(spec.name, spec.bundles, nodes, cfg.cluster.placement_timeout_s)
    except PlacementError:
        for pg in pgs.values():
            remove_placement_group(pg)
        raise
    return pgs


def _group(cls: type, role: str, layout: Layout, pgs: dict[str, Any], env: dict[str, str] | None = None,
           **kwargs) -> ActorGroup:
    """The actors of `role` in the slots the layout gave them (`env`: added to each one's environment)."""
    places = layout.actors[role]
    slots = [Slot(p.bundles[0], p.num_cpus, p.num_gpus, p.captures_children, p.env_vars | (env or {}))
             for p in places]
    return ActorGroup(cls, name=role, pg=pgs[places[0].group], slots=slots, **kwargs)


def build_roles(cfg: Config, model_path: str, prm_path: str, total_optimizer_steps: int, layout: Layout,
                pgs: dict[str, Any]) -> Roles:
    """The actor groups in the placement groups `reserve` made (Roles.shutdown releases them).

    With sleep mode (colocated GPUs) the engines start and fall asleep before DeepSpeed builds the
    trainers on the same GPUs; otherwise the engines start while the trainers build."""
    restarts = cfg.trainer.actor_max_restarts  # Ray restarts a dead engine or verifier; its work is sent again
    rollout = _group(RolloutWorker, "rollout", layout, pgs, env=engine_env(cfg), max_restarts=restarts, kwargs=dict(
        engine=cfg.rollout.engine, model_path=model_path, engine_kwargs=rollout_engine_args(cfg)))
    verifier = _group(VerifierWorker, "verifier", layout, pgs, max_restarts=restarts, kwargs=dict(
        num_workers=cfg.verifier.workers_per_actor, timeout_s=cfg.verifier.timeout_s,
        code_case_timeout_s=cfg.verifier.code_test_timeout_s))
    starts = None
    if cfg.rollout.enable_sleep_mode:
        starts = rollout.call(lambda a, r: a.ready.remote())
        rollout.call(lambda a, r: a.sleep.remote(cfg.rollout.sleep_level))
    trainer_vars = trainer_env(cfg)  # the same for every trainer role
    policy = _group(PolicyWorker, "policy", layout, pgs, env=trainer_vars)
    loss, settings, kwargs = policy_args(cfg, total_optimizer_steps)
    policy.call(lambda a, r: a.build.remote(model_path, loss, settings, kwargs))
    prm = None
    if "prm" in layout.actors:
        prm = _group(PRMWorker, "prm", layout, pgs, env=trainer_vars)
        prm.call(lambda a, r: a.build.remote(prm_path, prm_args(cfg)))
    reference = None
    if "reference" in layout.actors:
        reference = _group(ReferenceWorker, "reference", layout, pgs, env=trainer_vars, kwargs=dict(
            model_path=model_path, dtype=cfg.model.dtype,
            max_tokens_per_micro_batch=cfg.actor.max_tokens_per_micro_batch, temperature=cfg.rollout.temperature,
            trust_remote_code=cfg.model.trust_remote_code, padding_free=cfg.actor.padding_free,
            share_prompts=cfg.actor.share_prompts))
    if starts is None:
        starts = rollout.call(lambda a, r: a.ready.remote())
    # After the trainer is built and the engines are up: the streaming plan needs both.
    weight_sync = make_weight_sync(weight_sync_kind(cfg), policy, rollout, cfg.cluster.weight_sync_bucket_mb)
    for group in (rollout, verifier, policy, prm, reference):
        if group is not None:
            group.allow_lanes(cfg.cluster.step_lanes)
    return Roles(rollout=rollout, verifier=verifier, policy=policy, prm=prm, reference=reference,
                 engine_start_s=max(starts), weight_sync=weight_sync, placement_groups=list(pgs.values()))
