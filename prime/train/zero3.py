"""Building a ZeRO-3 model straight from a checkpoint folder, in the training dtype, without any rank
ever holding the whole model.

`transformers`' own ZeRO-3 path (`HfDeepSpeedConfig` + `from_pretrained`) builds the model under
`deepspeed.zero.Init` but then has every rank read the complete state dict into host memory
(15 GB per rank for a 7B model in bf16, 30 GB in fp32), and it needs `accelerate`. Here:

1. the model is constructed under `deepspeed.zero.Init(config)` with weight initialisation
   switched off (`transformers.initialization.no_init_weights`): each parameter is partitioned
   across the ranks the moment its module is built, onto the accelerator (or the host with
   parameter offload), in the training dtype;
2. the checkpoint is streamed module by module: every rank gathers one module's parameters
   (`GatheredParameters(modifier_rank=0)`), rank 0 alone reads just those tensors from the
   safetensors files (one tensor at a time, read rather than memory-mapped) and copies them in,
   and leaving the context broadcasts them and re-partitions.

Host memory per rank is its partition (on a CPU machine; nothing on a GPU one) plus one module
gathered, plus on rank 0 one tensor read from disk. docs/gpu_memory.md has the arithmetic.
"""

from __future__ import annotations

import json
import os

import torch

from prime.train.engine import _import_deepspeed, ensure_distributed

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def local_checkpoint(path: str) -> str:
    """`path` itself when it is a folder, else the local snapshot of the hub id `path` (config and
    safetensors only; fetched once into the hub cache where the hub is reachable)."""
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])


def checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file of a checkpoint folder (single file or sharded with an index)."""
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    single = os.path.join(path, _SINGLE)
    if os.path.isfile(single):
        with open(single, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return dict.fromkeys((k for k in header if k != "__metadata__"), single)
    raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path!r}; ZeRO-3 loading reads safetensors checkpoints "
                            "(save the model with safe_serialization=True)")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Reader:
    """Rank 0's access to a checkpoint's tensors, one tensor at a time.

    Reads each tensor's byte range from its safetensors file into a fresh buffer (the format is an
    8-byte header length, a JSON header of dtype, shape and data offsets, then the data). Memory-
    mapping the file instead would put every page it touches into this process's RSS until the
    file is closed: the whole checkpoint, on top of the partitions.
    """

    def __init__(self, files: dict[str, str]) -> None:
        self.files, self._headers = files, {}

    def _header(self, fname: str) -> tuple[int, dict]:
        if fname not in self._headers:
            with open(fname, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[fname] = (8 + n, json.loads(f.read(n)))
        return self._headers[fname]

    def get(self, name: str) -> torch.Tensor:
        fname = self.files[name]
        base, header = self._header(fname)
        entry = header[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} in {fname!r} has dtype {entry['dtype']}; readable: {sorted(_DTYPES)}")
        start, end = entry["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(fname, "rb") as f:
            f.seek(base + start)
            if f.readinto(buf.numpy()) != end - start:
                raise OSError(f"{fname!r} ends before tensor {name!r} does")
        return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _module_tensors(model: torch.nn.Module, files: dict[str, str]):
    """(module, [(checkpoint name, parameter)], [(name, buffer)]) per module, each parameter once."""
    seen: set[int] = set()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        params = []
        for n, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = prefix + n
            if name not in files and not (tied and name == "lm_head.weight"):
                raise KeyError(f"checkpoint has no tensor {name!r}; it has e.g. {sorted(files)[:3]}")
            params.append((name, p))
        buffers = [(prefix + n, b) for n, b in module.named_buffers(recurse=False)
                   if b is not None and prefix + n in files]
        yield module, params, buffers


@torch.no_grad()
def stream_checkpoint_into(model: torch.nn.Module, path: str) -> int:
    """Copy the checkpoint at `path` into a `zero.Init`-partitioned model, module by module (collective:
    every rank calls it). Returns the number of tensors loaded."""
    deepspeed = _import_deepspeed()
    files = checkpoint_files(path)
    rank0 = _rank() == 0
    reader = _Reader(files)
    count = 0
    for _, params, buffers in _module_tensors(model, files):
        loadable = [(n, p) for n, p in params if n in files]
        if loadable:
            with deepspeed.zero.GatheredParameters([p for _, p in loadable], modifier_rank=0):
                if rank0:
                    for name, p in loadable:
                        p.data.copy_(reader.get(name))
        for name, b in buffers:  # buffers are not partitioned: every rank reads its own (small) copy
            b.copy_(reader.get(name))
        count += len(loadable) + len(buffers)
    return count


def build_partitioned_model(path: str, dtype: torch.dtype, config: dict, trust_remote_code: bool = False):
    """The causal LM at `path`, built under `zero.Init(config)` in `dtype` and loaded by
    `stream_checkpoint_into`. `config` is the DeepSpeed config the engine will use (its ZeRO
    section decides where the partitions live)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    ensure_distributed()
    deepspeed = _import_deepspeed()
    path = local_checkpoint(path)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dtype != (torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32):
        raise ValueError(f"dtype {dtype} disagrees with the DeepSpeed config's bf16 setting {config.get('bf16')}")
    # zero.Init takes its dtype from the config's bf16 section (its `dtype` argument is ignored on
    # accelerators without fp16, the CPU among them).
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=config):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    stream_checkpoint_into(model, path)
    model.eval()
    return model
