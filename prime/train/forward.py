"""Micro-batched log-prob forward passes shared by the policy and PRM trainers.

A batch is the dict of `prime.models.logprobs.pack_sequences` (CPU tensors, possibly with extra
per-response keys). Micro-batches are selected rows, trimmed of all-padding columns, moved to the
model's device, and their log-probs padded back to the batch's response width T.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from prime.train.batching import make_micro_batches, select_rows, trim_padding
from prime.train.engine import all_reduce, world_size

PACKED_KEYS = ("input_ids", "attention_mask", "position_ids", "response_mask")


class EngineCaller:
    """Calls a DeepSpeed engine (or any module) with the keyword arguments `response_logprobs` uses.

    The engine's own `forward(*inputs, **kwargs)` hides whether the wrapped model accepts
    `logits_to_keep` (which saves the LM head on prompt positions), so this adapter exposes it
    when the wrapped model does.
    """

    def __init__(self, engine, module: torch.nn.Module):
        self.engine = engine
        try:
            self._keep = "logits_to_keep" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            self._keep = False

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
        if self._keep and logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        return self.engine(**kwargs)

    __call__ = forward


def check_batch(batch: dict, required: Sequence[str] = PACKED_KEYS) -> int:
    """Validate the packed layout; returns B."""
    missing = [k for k in required if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; it needs {list(required)} (see prime.models.logprobs.pack_sequences)")
    b, width = batch["input_ids"].shape
    t = batch["response_mask"].shape[1]
    if batch["response_mask"].shape[0] != b or width <= t:
        raise ValueError(
            f"input_ids {tuple(batch['input_ids'].shape)} and response_mask {tuple(batch['response_mask'].shape)} "
            "do not fit the layout [B, P+T] / [B, T] with P >= 1"
        )
    return b


def sequence_lengths(batch: dict) -> list[int]:
    """Real tokens (prompt + response) of each row."""
    return batch["attention_mask"].sum(dim=1).tolist()


def forward_logprobs(
    model,
    batch: dict,
    rows: Sequence[int],
    *,
    device: torch.device,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-probs (and entropies) of rows `rows`, at full response width T. Keeps the graph.

    Returns logp [b, T] (and entropy [b, T]) on `device`.
    """
    from prime.models.logprobs import response_logprobs

    b_total = batch["input_ids"].shape[0]
    full_t = batch["response_mask"].shape[1]
    sub = select_rows({k: batch[k] for k in PACKED_KEYS}, rows, b_total)
    ids, attn, pos, rmask, kept = trim_padding(sub["input_ids"], sub["attention_mask"], sub["position_ids"], sub["response_mask"])
    out = response_logprobs(
        model,
        ids.to(device),
        attn.to(device),
        pos.to(device),
        rmask.to(device),
        temperature=temperature,
        return_entropy=return_entropy,
    )
    pad = full_t - kept

    def widen(x):  # [b, T'] -> [b, T]
        return torch.nn.functional.pad(x, (0, pad)) if pad else x

    if return_entropy:
        return widen(out[0]), widen(out[1])
    return widen(out)


def padding_loss(model, batch: dict, rows, *, device: torch.device, temperature: float = 1.0) -> torch.Tensor:
    """A zero loss through a real forward pass on one row of `rows`.

    A rank with fewer micro-batches than the others runs these so every rank calls backward the
    same number of times (ZeRO-2/3 communicate inside backward); the gradient it adds is zero.
    """
    return forward_logprobs(model, batch, rows[:1], device=device, temperature=temperature).sum() * 0.0


def synced_max(n: int) -> int:
    """Largest `n` over the data-parallel ranks."""
    t = torch.tensor([n], dtype=torch.long)
    return int(all_reduce(t, "max").item())


def check_same_on_all_ranks(n: int, what: str) -> None:
    """Raise when `n` differs between ranks (every rank must take the same optimizer steps)."""
    if world_size() == 1:
        return
    lo = int(all_reduce(torch.tensor([n], dtype=torch.long), "min").item())
    hi = int(all_reduce(torch.tensor([n], dtype=torch.long), "max").item())
    if lo != hi:
        raise ValueError(f"{what} differs between data-parallel ranks ({lo} vs {hi}); give every rank the same number of responses")


@torch.no_grad()
def batched_logprobs(
    model,
    batch: dict,
    max_tokens_per_micro_batch: int,
    *,
    device: torch.device,
    temperature: float = 1.0,
) -> torch.Tensor:
    """No-grad log-probs of the whole batch, micro-batched by token budget. Returns [B, T] fp32 on CPU.

    Every rank runs the same number of forward passes (extra ones repeat the first micro-batch
    and are dropped) because ZeRO-3 gathers parameters collectively inside forward.
    """
    b = check_batch(batch)
    out = torch.zeros(batch["response_mask"].shape, dtype=torch.float32)  # [B, T]
    micro = make_micro_batches(sequence_lengths(batch), max_tokens_per_micro_batch)
    n = synced_max(len(micro))
    for k in range(n):
        rows = micro[k] if k < len(micro) else micro[0]
        logp = forward_logprobs(model, batch, rows, device=device, temperature=temperature)
        if k < len(micro):
            out[torch.as_tensor(rows)] = logp.float().cpu()
    assert out.shape[0] == b
    return out
