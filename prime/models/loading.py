"""Load a causal LM and its tokenizer from a local folder or a hub id.

One code path for everything: the tiny checkpoint written by `prime.models.tiny` in tests and
the CPU demo goes through exactly the same calls as a hub checkpoint on a GPU cluster.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bf16", ...) or a torch dtype to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {sorted(DTYPES)}")
    return DTYPES[dtype]


def _check_source(path_or_hub_id: str) -> None:
    """Fail early with the path in the message when a local-looking path does not exist.

    Anything that looks like a filesystem path (absolute, relative with ./ or ../, or ~) must
    exist; a bare `org/name` is left for the hub client to resolve.
    """
    looks_local = os.path.isabs(path_or_hub_id) or path_or_hub_id.startswith((".", "~"))
    expanded = os.path.expanduser(path_or_hub_id)
    if looks_local and not os.path.isdir(expanded):
        raise FileNotFoundError(
            f"model path {path_or_hub_id!r} does not exist or is not a folder; pass a checkpoint "
            f"folder (config.json + weights) or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )


def load_model(
    path_or_hub_id: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load an `AutoModelForCausalLM` in `dtype` on `device`, in eval mode.

    Args:
        path_or_hub_id: a checkpoint folder or a hub id.
        dtype: parameter dtype name ("float32", "bfloat16", "float16" or short forms).
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).
        trust_remote_code: passed to transformers (needed by some hub models).
        attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None keeps the default.
    """
    from transformers import AutoModelForCausalLM

    _check_source(path_or_hub_id)
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path_or_hub_id), **kwargs)
    model.to(device)
    model.eval()
    return model


def load_tokenizer(
    path: str, padding_side: str = "left", trust_remote_code: bool = False
):
    """Load the tokenizer of a checkpoint with explicit padding settings.

    Padding side defaults to "left" (prompts are left-padded for generation and log-prob
    batches). A tokenizer without a pad token gets its eos token as pad, with a log line.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    _check_source(path)
    tok = AutoTokenizer.from_pretrained(os.path.expanduser(path), trust_remote_code=trust_remote_code)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad token nor an eos token")
        logger.info("tokenizer at %s has no pad token; using eos token %r as pad", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok
