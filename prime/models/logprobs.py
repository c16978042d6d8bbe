"""Per-token response log-probs (and entropies) of a causal LM over the packed layout.

The layout (left-padded prompts of width P, right-padded responses of width T) is that of
`prime.data.batch.Batch`: the logits at columns P-1 .. P+T-2 predict the response tokens at
columns P .. P+T-1 for all rows at once.
"""

from __future__ import annotations

import inspect

import torch


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
        input_ids, attention_mask, position_ids: [B, P+T], as in `prime.data.batch.Batch`.
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
