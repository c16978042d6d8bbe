"""GPU memory of a model in training and in a vLLM engine: pure arithmetic, no Ray, no GPU.

`prime plan` (launch/plan.py) adds these per GPU to tell, before anything starts, whether a job fits.
Every number is an estimate of the largest tensors; it leaves out allocator fragmentation and small
buffers, which is why the plan keeps a margin per process (`CUDA_CONTEXT_BYTES`).

Notation: P parameters, w bytes per element of the model dtype (bf16/fp16: 2, fp32: 4), N data-parallel
ranks of the role, DeepSpeed ZeRO stage s. Shape of a Qwen2-style decoder: hidden h, L layers, H heads
of width d = h / H, K key/value heads, MLP width I, vocabulary V.

Parameters (`ModelShape.num_params`):
    embedding V*h, per layer q h*(H*d) + H*d (bias), k and v h*(K*d) + K*d each (bias), o (H*d)*h,
    MLP 3*h*I (gate, up, down), two RMSNorm weights 2*h; final norm h; LM head V*h unless tied.
    Qwen2.5-7B: 28 * 233,057,792 + 2 * 544,997,376 + 3,584 = 7,615,616,512.

Training states per rank (`training_states`), the ZeRO paper's "2 + 2 + K" accounting:
    weights   w*P, divided by N at s = 3;
    gradients w*P, divided by N at s >= 2;
    optimizer mixed precision (w = 2): fp32 master weights + Adam m + v = 12 bytes/param; fp32 training:
              m + v = 8 bytes/param (the weights are their own master); divided by N at s >= 1.
    offload_optimizer (s >= 1): optimizer states and gradient partitions live on the host: 0 on the GPU.
    offload_params (s = 3): parameter partitions live on the host: 0 resident on the GPU.
    At s = 3 a rank also gathers whole parameters while it computes: at most DeepSpeed's default
    stage3_max_live_parameters (1e9) elements, w bytes each (`gathered`, held only while computing).

A frozen reference beside a trainer (`reference_bytes`, the implicit PRM's `prm.ref=frozen`), by
`prm.ref_placement`: replicated w*P on every rank; sharded w*P / N (its ZeRO-3 partition; each forward
gathers one layer at a time, far less than the trainer's own `gathered`); offload 0 on the GPU.

Activations of one micro-batch of T tokens (`activation_bytes`; T is the trainer's token budget
`max_tokens_per_micro_batch`, or one longest row when that is larger):
    per token and layer the backward pass keeps about A = 7h + 3Kd + 4I elements of dtype w: the two
    RMSNorm inputs and outputs (4h), q, k, v before and after rotary embedding (2h + 3Kd, counting the
    rotated k once), the attention output (h), and the MLP's gate, up, SiLU(gate) and SiLU(gate)*up (4I).
    without gradient checkpointing: T * L * A * w;
    with gradient checkpointing:    T * L * h * w (each layer's input) + T * A * w (one layer recomputed);
    logits: T * V * (4 + 4 + w') bytes: the fp32 logits kept for log-softmax's backward, their fp32
    gradient, and that gradient cast back to the model dtype (w' = w, or 0 when the model is fp32);
    a no-grad pass (log-probs, frozen references): one layer's T * A * w and T * V * (w + 4) of logits
    (T * V * 4 in fp32).

vLLM engine per GPU (`engine_memory`), tensor parallel degree t, GPU memory M:
    the engine takes gpu_memory_utilization * M; its weights are w*P / t; the KV cache is the rest.
    A token's KV cache is 2 (k and v) * L * ceil(K / t) * d * w bytes per GPU.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAGE3_MAX_LIVE_PARAMETERS = 10**9
"""DeepSpeed's default `stage3_max_live_parameters`: whole parameters a ZeRO-3 rank holds at once."""
CUDA_CONTEXT_BYTES = 0.5 * GIB
"""Per process that uses a GPU: CUDA context, cuBLAS and NCCL workspaces (typically 0.3-0.6 GiB)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2-style decoder that its memory depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0
    """0: hidden_size // num_heads."""

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_width, self.num_kv_heads * self.head_width
        attention = (h * q + q) + 2 * (h * kv + kv) + q * h
        return attention + 3 * h * self.intermediate_size + 2 * h

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * self.layer_params() + self.hidden_size + head

    def kv_bytes_per_token(self, dtype: str, tensor_parallel: int = 1) -> int:
        """KV-cache bytes of one token on one GPU of a tensor-parallel group."""
        heads = math.ceil(self.num_kv_heads / tensor_parallel)
        return 2 * self.num_layers * heads * self.head_width * DTYPE_BYTES[dtype]

    def describe(self) -> str:
        tie = ", tied embeddings" if self.tie_word_embeddings else ""
        params = self.num_params()
        count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
        return (f"{count} parameters: hidden {self.hidden_size}, {self.num_layers} layers, "
                f"{self.num_heads} heads / {self.num_kv_heads} kv heads, intermediate {self.intermediate_size}, "
                f"vocab {self.vocab_size}{tie}")


QWEN25_7B = ModelShape(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
                       vocab_size=152064, tie_word_embeddings=False)
KNOWN_SHAPES = {
    "PRIME-RL/Eurus-2-7B-SFT": QWEN25_7B,
    "PRIME-RL/Eurus-2-7B-PRIME": QWEN25_7B,
    "Qwen/Qwen2.5-Math-7B": QWEN25_7B,
}
"""Hub checkpoints whose shape is known offline (all fine-tunes of Qwen2.5-Math-7B)."""

_HF_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size", "vocab_size": "vocab_size"}


def shape_from_hf_config(config: dict, source: str) -> ModelShape:
    """The shape in a HF config.json mapping; `source` names it in the error about a missing key."""
    missing = [key for key in _HF_KEYS.values() if key not in config]
    if missing:
        raise ValueError(f"{source} has no {', '.join(missing)}; give the sizes as model.shape.* instead")
    values = {name: int(config[key]) for name, key in _HF_KEYS.items()}
    return ModelShape(**values, num_kv_heads=int(config.get("num_key_value_heads") or values["num_heads"]),
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      head_dim=int(config.get("head_dim") or 0))


def _cached_config(repo_id: str) -> str | None:
    """config.json of a hub id in the local hub cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id: nothing cached under it
        return None
    return found if isinstance(found, str) else None


def _downloaded_config(repo_id: str) -> str | None:
    """config.json of a hub id fetched from the hub (honours HF_HUB_OFFLINE), or None."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, "config.json")
    except Exception:  # offline, unknown repo, no access: the caller's error names the ways out
        return None


def resolve_shape(path: str, key: str = "model.path", download: bool = False) -> tuple[ModelShape, str]:
    """(shape, where it came from) of checkpoint `path`: a local folder's config.json, the built-in table
    `KNOWN_SHAPES`, the local hub cache, or (with `download`) the hub. Raises ValueError naming `key`."""
    local = os.path.join(path, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            return shape_from_hf_config(json.load(f), local), local
    if path in KNOWN_SHAPES:
        return KNOWN_SHAPES[path], "the built-in table of known checkpoints"
    cached = _cached_config(path) or (_downloaded_config(path) if download else None)
    if cached:
        with open(cached) as f:
            return shape_from_hf_config(json.load(f), cached), cached
    raise ValueError(
        f"cannot find the shape of {key}={path!r}: it is no local folder with a config.json, not in the local hub "
        f"cache and not among the known checkpoints ({', '.join(sorted(KNOWN_SHAPES))}); set model.shape.hidden_size, "
        f"num_layers, num_heads, num_kv_heads, intermediate_size and vocab_size, or point {key} at a local folder")


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU, by kind."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0

    def __add__(self, other: Memory) -> Memory:
        return Memory(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class TrainingStates:
    """A training rank's memory: `resident` stays between steps; `gathered` (ZeRO-3 whole parameters)
    is held only while the rank computes."""

    resident: Memory
    gathered: float


def training_states(params: int, *, dtype: str, zero_stage: int, ranks: int, offload_params: bool = False,
                    offload_optimizer: bool = False) -> TrainingStates:
    """Weights, gradients and optimizer states of one of `ranks` DeepSpeed ranks (module docstring)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage} is not valid; choose one of 0, 1, 2, 3")
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    w = DTYPE_BYTES[dtype]
    weights = 0.0 if (offload_params and zero_stage == 3) else w * params / (ranks if zero_stage == 3 else 1)
    gradients = w * params / (ranks if zero_stage >= 2 else 1)
    optimizer = (12 if w != 4 else 8) * params / (ranks if zero_stage >= 1 else 1)
    if offload_optimizer and zero_stage >= 1:
        gradients = optimizer = 0.0
    gathered = w * min(params, STAGE3_MAX_LIVE_PARAMETERS) if zero_stage == 3 else 0.0
    return TrainingStates(Memory(weights=weights, gradients=gradients, optimizer=optimizer), gathered)


REF_PLACEMENTS = ("replicated", "sharded", "offload")


def reference_bytes(params: int, *, dtype: str, placement: str, ranks: int) -> float:
    """GPU bytes of a frozen reference on one of `ranks` ranks, placed as `placement` says (module docstring)."""
    if placement not in REF_PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not valid; choose one of {REF_PLACEMENTS}")
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if placement == "offload":
        return 0.0
    full = DTYPE_BYTES[dtype] * params
    return full / ranks if placement == "sharded" else full


def activation_bytes(shape: ModelShape, tokens: int, *, dtype: str, checkpointing: bool, training: bool = True) -> float:
    """Activation bytes of one micro-batch of `tokens` tokens (module docstring)."""
    w = DTYPE_BYTES[dtype]
    h, d = shape.hidden_size, shape.head_width
    per_layer = (7 * h + 3 * shape.num_kv_heads * d + 4 * shape.intermediate_size) * w  # bytes per token
    if not training:
        return tokens * per_layer + tokens * shape.vocab_size * (w + 4 if w != 4 else 4)
    if checkpointing:
        layers = tokens * (shape.num_layers * h * w + per_layer)
    else:
        layers = tokens * shape.num_layers * per_layer
    return layers + tokens * shape.vocab_size * (8 + (w if w != 4 else 0))


def engine_memory(shape: ModelShape, *, dtype: str, tensor_parallel: int, gpu_memory_utilization: float,
                  gpu_bytes: float) -> Memory:
    """One GPU of a vLLM engine: its weight shard and the KV cache left in its share of the GPU (may be
    negative: the share is smaller than the weights)."""
    weights = DTYPE_BYTES[dtype] * shape.num_params() / tensor_parallel
    return Memory(weights=weights, kv_cache=gpu_memory_utilization * gpu_bytes - weights)
