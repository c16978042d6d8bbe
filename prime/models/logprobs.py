"""Pack prompt/response pairs into one batch and compute per-token response log-probs.

Batch layout (shared by the policy, the reference model and the implicit PRM):

    input_ids      [B, P+T]   prompt LEFT-padded to width P, response RIGHT-padded to width T
    attention_mask [B, P+T]   1 on real tokens, 0 on padding
    position_ids   [B, P+T]   cumsum(attention_mask) - 1, clamped at 0 (so padding never shifts
                              the positions of real tokens; the model sees each row as if unpadded)
    response_mask  [B, T]     1.0 on real response tokens

Every prompt ends at column P-1 and every response starts at column P, so the logits at columns
P-1 .. P+T-2 predict the response tokens at columns P .. P+T-1 for all rows at once.
"""

from __future__ import annotations

import inspect

import torch


def pack_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pack token-id lists into the left-padded prompt / right-padded response layout.

    Returns a dict with input_ids, attention_mask, position_ids (long) and response_mask (float),
    shapes as in the module docstring. Every prompt must have at least one token (its last token
    predicts the first response token).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up")
    if not prompts:
        raise ValueError("cannot pack an empty batch (0 prompts)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(len(r) for r in responses)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)  # [B, P+T]
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)  # [B, P+T]
    response_mask = torch.zeros((B, T), dtype=torch.float32)  # [B, T]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p) : P] = 1
        if r:
            input_ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, P : P + len(r)] = 1
            response_mask[i, : len(r)] = 1.0
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P+T]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
    }


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and optionally entropies) of the response tokens under `model`.

    logp[b, t] = log softmax(logits[b, P-1+t] / temperature)[input_ids[b, P+t]], computed in fp32,
    and 0 where response_mask is 0. Gradients flow (the caller decides on no_grad).

    The token log-prob is gathered as `z[token] - logsumexp(z)`, so the full [B, T, V]
    log-softmax is never materialised (the fp32 logits are). Only the last T+1 positions go
    through the LM head when the model supports `logits_to_keep`.

    Args:
        model: a causal LM returning `.logits` [B, L, V].
        input_ids, attention_mask, position_ids: [B, P+T] from `pack_sequences`.
        response_mask: [B, T] float, 1 on real response tokens; T is read from its width.
        temperature: logits are divided by it (must be > 0), matching the sampler.
        return_entropy: also return the entropy of each position's distribution, [B, T].

    Returns:
        logp [B, T] (and entropy [B, T] when return_entropy).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, L = input_ids.shape
    T = response_mask.shape[1]
    P = L - T
    if P < 1:
        raise ValueError(f"input width {L} leaves no prompt column before a response of width {T}")
    if T == 0:
        empty = input_ids.new_zeros((B, 0), dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty

    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = T + 1  # positions P-1 .. P+T-1
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    )
    logits = out.logits  # [B, T+1, V] with logits_to_keep, else [B, L, V]
    logits = logits[:, -(T + 1) : -1, :].float()  # [B, T, V], predicts columns P .. P+T-1
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, P:]  # [B, T]
    lse = torch.logsumexp(logits, dim=-1)  # [B, T]
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    mask = response_mask > 0  # [B, T]
    logp = torch.where(mask, token_logits - lse, torch.zeros_like(lse))  # [B, T]
    if not return_entropy:
        return logp
    # H = logsumexp(z) - sum_v softmax(z)_v * z_v
    probs = torch.softmax(logits, dim=-1)  # [B, T, V]
    entropy = lse - (probs * logits).sum(dim=-1)  # [B, T]
    entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
    return logp, entropy


def unpack_response_logprobs(logp: torch.Tensor, response_mask: torch.Tensor) -> list[list[float]]:
    """Per-row lists of the log-probs on real response tokens (right-padded rows), as floats."""
    if logp.shape != response_mask.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} != response_mask shape {tuple(response_mask.shape)}")
    lengths = (response_mask > 0).sum(dim=1).tolist()  # [B]
    rows = logp.detach().float().cpu().tolist()
    return [row[:n] for row, n in zip(rows, lengths)]
