"""DeepSpeed engine construction and the few distributed helpers the trainers share.

deepspeed is imported lazily so that importing `prime.train` stays cheap.

Gradient accumulation, the way the trainers use it:
    The trainers normalise every micro-batch loss by the GLOBAL normaliser of its mini-batch
    (token or sequence count summed over all micro-batches and all data-parallel ranks), so the
    gradient we want is the gradient of the plain SUM of the micro-batch losses over micro-batches
    and ranks. DeepSpeed divides the loss by `gradient_accumulation_steps` inside
    `engine.backward` (and in its output hooks), and averages gradients over data-parallel ranks.
    So the engine is configured with `gradient_accumulation_steps = 1` (the division is a no-op),
    the accumulation boundary is set by hand (`set_gradient_accumulation_boundary(False)` for every
    micro-batch but the last, `True` for the last, then one `engine.step()`), and each rank
    multiplies its loss by the data-parallel world size before `backward` to undo the averaging
    (see `backward_micro_batches`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from prime.rollout.gloo import one_gloo_device

VALID_LR_SCHEDULES = ("constant", "cosine")
VALID_ZERO_STAGES = (0, 1, 2, 3)


def lr_factor(
    step: int,
    *,
    warmup_steps: int = 0,
    schedule: str = "constant",
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0 = the first step).

    Linear warm-up over `warmup_steps` steps (step 0 already uses 1/warmup_steps, never 0), then
    `constant` (1.0) or `cosine` decay from 1.0 to `min_lr_ratio` at `total_steps`.
    """
    if schedule not in VALID_LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not valid; choose one of {VALID_LR_SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError("lr_schedule='cosine' needs total_steps (the number of optimizer steps)")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed():
    """Import deepspeed quietly, choosing the CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (over a minute, and
        # it needs a C++ toolchain) that only tensor-parallel inference uses. Training does not.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def _one_device_if_alone(world: int, backend: str) -> contextlib.AbstractContextManager:
    """`one_gloo_device()` for a one-process gloo world (every group it makes has one rank), else nothing."""
    return one_gloo_device() if backend == "gloo" and world == 1 else contextlib.nullcontext()


def _engine_groups() -> contextlib.AbstractContextManager:
    """`_one_device_if_alone` of the initialised world, around `deepspeed.initialize` (which makes groups)."""
    import torch.distributed as dist

    return _one_device_if_alone(world_size(), dist.get_backend())


def ensure_distributed() -> None:
    """Initialise torch.distributed if the caller has not.

    When RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT are in the environment (a launcher set them)
    they are used; otherwise a single-process group is created on 127.0.0.1 with a free port.
    The backend is nccl on GPU and gloo on CPU.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    deepspeed = _import_deepspeed()
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if os.environ["MASTER_ADDR"].startswith("127."):
        # Keep gloo's connections on the loopback device (it otherwise picks the hostname's address).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with _one_device_if_alone(int(os.environ["WORLD_SIZE"]), backend):
        deepspeed.init_distributed(dist_backend=backend)


def accelerator_device() -> torch.device:
    """This rank's device: its current GPU (Ray gives each actor its own), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the default group (no-op for one process). `op`: sum | max | min.

    gloo cannot reduce tensors that live on a GPU and nccl cannot reduce CPU tensors, so the
    tensor is moved to the backend's device and back.
    """
    import torch.distributed as dist

    if world_size() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op={op!r} is not valid; choose one of {tuple(ops)}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    work = tensor.to(device)
    dist.all_reduce(work, op=ops[op])
    tensor.copy_(work.to(tensor.device))
    return tensor


@dataclass(frozen=True)
class EngineSettings:
    """How a trainer's DeepSpeed engine optimises (flat values the launcher takes from the config).

    lr: AdamW learning rate; weight_decay, betas, eps: AdamW's other settings.
    grad_clip: global gradient-norm clip (<= 0 disables it).
    zero_stage: DeepSpeed ZeRO stage (0-3).
    offload_optimizer: optimizer states on the host (GPU only; on a CPU machine they are there already).
    offload_params: ZeRO-3 parameter partitions on the host between uses (GPU only, stage 3).
    bf16: bf16 weights and compute (fp32 master weights inside DeepSpeed).
    lr_warmup_steps, lr_schedule, total_steps, min_lr_ratio: the schedule of `lr_factor`.
    gradient_checkpointing: recompute activations in backward (less memory, one more forward).
    """

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in VALID_ZERO_STAGES:
            raise ValueError(f"zero_stage={self.zero_stage!r} is not valid; choose one of {VALID_ZERO_STAGES}")
        if self.lr_schedule not in VALID_LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not valid; choose one of {VALID_LR_SCHEDULES}")
        if self.lr_schedule == "cosine" and not self.total_steps:
            raise ValueError("lr_schedule='cosine' needs total_steps (the number of optimizer steps)")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage=3 (parameters are partitioned only there), "
                             f"got zero_stage={self.zero_stage}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are loaded and trained in (DeepSpeed keeps fp32 master weights)."""
        return torch.bfloat16 if self.bf16 else torch.float32


def zero_config(stage: int, *, offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """DeepSpeed's `zero_optimization` section. Offloading is dropped on a machine without a GPU,
    where every state is on the host already."""
    on_gpu = torch.cuda.is_available()
    if (offload_optimizer or offload_params) and not on_gpu:
        logging.getLogger(__name__).info("offload settings ignored: no GPU, every state is on the host already")
    zero: dict = {"stage": stage}
    if offload_optimizer and on_gpu and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params and on_gpu and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def ds_config(settings: EngineSettings) -> dict:
    """The DeepSpeed config of a trainer: the engine's and, under ZeRO-3, `zero.Init`'s.

    `gradient_accumulation_steps` is 1 and the caller sets the accumulation boundary by hand, see
    the module docstring.
    """
    s = settings
    offload = bool(s.offload_optimizer and torch.cuda.is_available())
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size(),
        "gradient_clipping": float(s.grad_clip) if s.grad_clip > 0 else 0.0,
        "zero_optimization": zero_config(s.zero_stage, offload_optimizer=s.offload_optimizer,
                                         offload_params=s.offload_params),
        "bf16": {"enabled": bool(s.bf16)},
        "optimizer": {
            "type": "AdamW",
            # torch.optim.AdamW everywhere except with CPU offload, where DeepSpeedCPUAdam is the
            # fast choice; FusedAdam would need a compiled extension.
            "params": {"lr": s.lr, "betas": list(s.betas), "eps": s.eps, "weight_decay": s.weight_decay,
                       "torch_adam": not offload},
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, settings: EngineSettings):
    """Wrap `model` in a DeepSpeed engine with AdamW, grad-norm clipping and a warm-up/decay schedule."""
    s = settings
    ensure_distributed()
    deepspeed = _import_deepspeed()
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def make_scheduler(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        def factor(step: int) -> float:
            return lr_factor(step, warmup_steps=s.lr_warmup_steps, schedule=s.lr_schedule,
                             total_steps=s.total_steps, min_lr_ratio=s.min_lr_ratio)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    params = [p for p in model.parameters() if p.requires_grad]
    with _engine_groups():
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config(s), lr_scheduler=make_scheduler
        )
    return engine


def frozen_config(bf16: bool, offload_params: bool) -> dict:
    """DeepSpeed config of a frozen model partitioned by ZeRO-3 (no optimizer, no gradients)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size(),
        "zero_optimization": zero_config(3, offload_params=offload_params),
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
    }


def build_frozen_engine(model: torch.nn.Module, config: dict):
    """A ZeRO-3 inference engine over `model` (built under `zero.Init` with the same `config`): each
    rank holds 1/world of the weights (on the host with parameter offload) and every forward
    gathers one layer at a time, collectively."""
    ensure_distributed()
    deepspeed = _import_deepspeed()
    model.requires_grad_(False)
    with _engine_groups():
        engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _to_pinned_host(t: torch.Tensor, cache: dict) -> None:
    """Move `t`'s data into a pinned host buffer kept in `cache` (reused by every later offload)."""
    buf = cache.get(id(t))
    if buf is None:
        buf = cache[id(t)] = torch.empty_like(t, device="cpu").pin_memory()
    buf.copy_(t.data)
    t.data = buf


def _stage3_moves_own_fp32_states(engine) -> bool:
    """ZeRO-3's `offload_states` moves fp32 master weights and Adam moments only for DeepSpeed's
    FusedAdam (a compiled extension); with torch's AdamW, the default here, this module moves them."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return (engine.zero_optimization_stage() == 3 and not engine.zero_use_cpu_optimizer()
            and type(inner).__name__ != "FusedAdam")


def _fp32_states(engine) -> list[torch.Tensor]:
    """ZeRO-3's fp32 master partitions and the inner optimizer's moment tensors."""
    opt = engine.optimizer
    states = list(opt.fp32_partitioned_groups_flat)
    for state in opt.optimizer.state.values():
        states += [v for k, v in state.items() if torch.is_tensor(v) and k != "step"]
    return states


def _params_offloaded(engine) -> bool:
    """DeepSpeed keeps the parameter partitions on the host (`offload_param`, actor/prm.offload_params);
    its `offload_states` then refuses to move anything."""
    cfg = engine.zero_offload_param()
    return cfg is not None and getattr(cfg.device, "value", cfg.device) not in (None, "none")


def _offload_include(engine) -> list | None:
    """The state kinds `engine.offload_states` should move (None: every kind). fp32 master weights and
    Adam moments are left out when this module moves them itself or when DeepSpeed's CPU optimizer
    (offload_optimizer) keeps them, and the gradient partitions too, on the host already."""
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S

    if engine.zero_use_cpu_optimizer():
        return [S.lp_params, S.contiguous_grad_buffer] if engine.zero_optimization_stage() == 3 else [S.lp_params]
    if _stage3_moves_own_fp32_states(engine):
        return [S.lp_params, S.lp_grads, S.contiguous_grad_buffer]
    return None


def offload_engine_states(engine) -> None:
    """Move a ZeRO (stage 1-3) engine's states to pinned host memory: weights, gradients, fp32
    master weights and optimizer moments; `reload_engine_states` brings them back. Colocated
    training frees the GPU this way while the rollout engines generate. What DeepSpeed already
    offloads (offload_params, offload_optimizer) stays where it is; with offload_params only the fp32
    states this module moves itself can go (DeepSpeed refuses to move the rest)."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        raise ValueError("offloading a trainer's states needs ZeRO stage 1, 2 or 3, got zero_stage=0")
    if _stage3_moves_own_fp32_states(engine):
        cache = engine.__dict__.setdefault("_prime_pinned", {})
        for t in _fp32_states(engine):
            _to_pinned_host(t, cache)
    if not _params_offloaded(engine):
        engine.offload_states(include=_offload_include(engine))


def reload_engine_states(engine) -> None:
    """Undo `offload_engine_states`."""
    if not _params_offloaded(engine):
        engine.reload_states()
    if _stage3_moves_own_fp32_states(engine):
        for t in _fp32_states(engine):
            t.data = t.data.to(engine.device)


def backward_micro_batches(
    engine,
    n_micro_batches: int,
    loss_fn: Callable[[int], torch.Tensor],
) -> None:
    """Run backward over `n_micro_batches` micro-batches with the boundary set by hand.

    `loss_fn(k)` does the forward of micro-batch k and returns its loss, already normalised by
    the global normaliser (so the wanted gradient is that of the sum over micro-batches and
    ranks). The loss is multiplied by the data-parallel world size because DeepSpeed averages
    gradients over ranks. Call `engine.step()` afterwards. Every rank must pass the same
    `n_micro_batches` (ZeRO-2/3 communicate inside backward).
    """
    scale = float(world_size())
    for k in range(n_micro_batches):
        engine.set_gradient_accumulation_boundary(k == n_micro_batches - 1)
        loss = loss_fn(k)
        engine.backward(loss * scale)


def optimizer_step(engine) -> float:
    """`engine.step()`; returns the global gradient norm before clipping.

    ZeRO (stages 1-3) and the bf16 optimizer record the norm; plain stage 0 in fp32 does not, so
    it is computed here from the already all-reduced gradients before the step.
    """
    norm = None
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    engine.step()
    if norm is None:
        recorded = engine.get_global_grad_norm()
        norm = float("nan") if recorded is None else float(recorded)
    return norm


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_named_weights(module: torch.nn.Module, zero_stage: int, tie_lm_head: bool = True) -> dict:
    """Full, HF-named state dict on the CPU (gathering ZeRO-3 partitions one tensor at a time).

    Tied parameters are listed under every name (`lm_head.weight` next to
    `model.embed_tokens.weight`): inference engines expect every checkpoint tensor. Under ZeRO-3
    every rank takes part in each gather but only rank 0 keeps a host copy; the others return
    the buffers only.
    """
    out: dict[str, torch.Tensor] = {}
    if zero_stage == 3:
        deepspeed = _import_deepspeed()
        keep = _rank() == 0
        for name, p in module.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if keep:
                    out[name] = p.data.detach().to("cpu", copy=True)
        for mod_name, mod in module.named_modules():
            for buf_name, buf in mod.named_buffers(recurse=False):
                # Non-persistent buffers (rotary inv_freq) are not checkpoint tensors.
                if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                    out[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().to("cpu", copy=True)
    else:
        for name, t in module.state_dict().items():
            out[name] = t.detach().to("cpu", copy=True)
        for name, p in module.named_parameters(remove_duplicate=False):
            out.setdefault(name, p.detach().to("cpu", copy=True))
    if tie_lm_head and "lm_head.weight" not in out:
        for key in ("model.embed_tokens.weight", "embed_tokens.weight"):
            if key in out:
                out["lm_head.weight"] = out[key].clone()
                break
    return out


def weight_sources(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of `module` by HF name, in the module's order (a decoder layer's
    tensors together): parameters (ZeRO-3 placeholders under ZeRO-3) and persistent buffers, a tied
    parameter under each of its names (`lm_head.weight` next to `model.embed_tokens.weight`:
    inference engines expect every checkpoint tensor). Nothing is copied or gathered."""
    out = dict(module.state_dict(keep_vars=True))
    if "lm_head.weight" not in out:
        for key in ("model.embed_tokens.weight", "embed_tokens.weight"):
            if key in out:
                out["lm_head.weight"] = out[key]
                break
    return out


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)


def streamed_weight_specs(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, full shape, dtype) of every tensor `weight_sources` lists, without gathering anything."""
    return [(name, _full_shape(t), t.dtype) for name, t in weight_sources(module).items()]


@torch.no_grad()
def iter_weight_buckets(module: torch.nn.Module, buckets: list) -> Iterator[dict[str, torch.Tensor]]:
    """For each bucket of the plan, its full tensors by name, on the weights' device.

    ZeRO-3 partitions are gathered one bucket at a time (a collective: every rank must drain this
    iterator in step) and released when the next bucket is asked for, so a rank holds at most one
    bucket of gathered weights. Without ZeRO-3 the tensors are the parameters themselves.
    """
    sources = weight_sources(module)
    for bucket in buckets:
        missing = [s.name for s in bucket.slots if s.name not in sources]
        if missing:
            raise ValueError(f"the bucket plan names weights the model lacks: {missing[:3]}; "
                             f"the model has e.g. {list(sources)[:3]}")
        named = {s.name: sources[s.name] for s in bucket.slots}
        partitioned = list({id(t): t for t in named.values() if hasattr(t, "ds_id")}.values())
        if partitioned:
            deepspeed = _import_deepspeed()
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                yield {name: t.detach() for name, t in named.items()}
        else:
            yield {name: t.detach() for name, t in named.items()}


ENGINE_TAG = "engine"
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template")


def save_engine_checkpoint(engine, path: str) -> None:
    """DeepSpeed checkpoint (weights, optimizer and LR-scheduler state) under `path`.

    Collective: every rank must call it (each writes its ZeRO partition). `path` must be on a
    file system all ranks share.
    """
    engine.save_checkpoint(path, tag=ENGINE_TAG)


def load_engine_checkpoint(engine, path: str) -> None:
    """Restore what `save_engine_checkpoint` wrote (collective)."""
    if not os.path.isdir(os.path.join(path, ENGINE_TAG)):
        raise FileNotFoundError(f"no engine checkpoint at {path!r} (expected a {ENGINE_TAG!r} folder inside)")
    load_path, _ = engine.load_checkpoint(
        path, tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path!r}")


def save_hf_folder(engine, zero_stage: int, source_path: str, out_dir: str) -> None:
    """Write a plain Hugging Face folder (config, safetensors weights, generation config and the
    tokenizer of `source_path`) loadable by transformers and vLLM. Collective under ZeRO-3;
    rank 0 writes.
    """
    import shutil

    import torch.distributed as dist

    module = engine.module
    weights = gather_named_weights(module, zero_stage)
    if _rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        if getattr(module.config, "tie_word_embeddings", False):
            # Tied: the head is the embedding; storing it twice confuses loaders.
            weights.pop("lm_head.weight", None)
        module.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
        if os.path.isdir(source_path):
            for name in sorted(os.listdir(source_path)):
                src = os.path.join(source_path, name)
                if os.path.isfile(src) and (name.startswith(_TOKENIZER_FILE_PREFIXES) or name.endswith((".model", ".tiktoken"))):
                    shutil.copy2(src, os.path.join(out_dir, name))
        else:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source_path).save_pretrained(out_dir)
    if world_size() > 1:
        dist.barrier()
