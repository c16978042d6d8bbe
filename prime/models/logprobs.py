"""Per-token response log-probs (and entropies) of a causal LM over the padded batch layout.

The layout (left-padded prompts of width P, right-padded responses of width T) is that of
`prime.data.batch.Batch`: the logits at columns P-1 .. P+T-2 predict the response tokens at
columns P .. P+T-1 for all rows at once. With `padding_free=True` the model instead runs on the
rows' real tokens concatenated into one row (`prime.models.packing`), and the results come back in
the same [B, T] layout.
"""

from __future__ import annotations

import inspect

import torch

from prime.models.packing import pack_rows

DEFAULT_CHUNK_TOKENS = 1024
"""Positions per chunk of the fp32 log-softmax: 1024 x 152064 (Qwen2.5 vocabulary) x 4 bytes is
0.6 GB per fp32 [chunk, V] tensor."""


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
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    padding_free: bool = False,
    share_prompts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and optionally entropies) of the response tokens under `model`.

    logp[b, t] = log softmax(logits[b, P-1+t] / temperature)[input_ids[b, P+t]], computed in fp32,
    and 0 where response_mask is 0. Gradients flow (the caller decides on no_grad).

    The token log-prob is gathered as `z[token] - logsumexp(z)` and the entropy as
    `logsumexp(z) - sum softmax(z) z`, both over chunks of about `chunk_tokens` positions (see
    `token_logprobs`): no [B, T, V] fp32 tensor exists, only the model's own logits. Only the last
    T+1 positions go through the LM head when the model supports `logits_to_keep`.

    Args:
        model: a causal LM returning `.logits` [B, L, V].
        input_ids, attention_mask, position_ids: [B, P+T], as in `prime.data.batch.Batch`.
        response_mask: [B, T] float, 1 on real response tokens; T is read from its width.
        temperature: logits are divided by it (must be > 0), matching the sampler.
        return_entropy: also return the entropy of each position's distribution, [B, T].
        chunk_tokens: positions per fp32 chunk (None: all at once).
        padding_free: run the model once over the rows' real tokens packed into one row (no compute
            on padding; `prime.models.packing`); the model must have been through
            `use_packed_attention` (or use flash attention) for that to be cheaper than padding.
            Same values up to fp32 rounding (different matmul shapes).
        share_prompts: with `padding_free`, consecutive rows with the same prompt (a prompt's K
            samples) pack it once and their responses attend to that one copy
            (`prime.models.packing.pack_rows`): the prompt's tokens run through the model once
            instead of K times. Needs a model through `use_packed_attention` that kept sdpa (flash
            attention's varlen kernels cannot attend a segment to another one); same values up to
            fp32 rounding.

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
    if padding_free and bool((response_mask > 0).any()):
        return _packed_response_logprobs(model, input_ids, attention_mask, position_ids, response_mask,
                                         temperature, return_entropy, chunk_tokens, share_prompts)

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
    logits = out.logits[:, -(T + 1) : -1, :]  # [B, T, V] (a view), predicts columns P .. P+T-1
    return token_logprobs(logits, input_ids[:, P:], response_mask > 0, temperature=temperature,
                          return_entropy=return_entropy, chunk_tokens=chunk_tokens)


def _packed_response_logprobs(model, input_ids, attention_mask, position_ids, response_mask, temperature,
                              return_entropy, chunk_tokens, share_prompts=False):
    """`response_logprobs` over the rows packed into one row, scattered back to [B, T]."""
    B, T = response_mask.shape
    packed = pack_rows(input_ids, attention_mask, position_ids, T, share_prompts=share_prompts)
    keep = packed.keep  # [R]
    kwargs = dict(cu_seq_lens_q=packed.cu_seq_lens, cu_seq_lens_k=packed.cu_seq_lens,
                  max_length_q=packed.max_length, max_length_k=packed.max_length)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep  # the LM head only on the R positions that predict response tokens
    out = model(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                use_cache=False, **kwargs)
    # [1, R, V]; a model (or engine wrapper) that ignored logits_to_keep returned all N > R positions.
    logits = out.logits[:, keep] if out.logits.shape[1] == packed.input_ids.shape[1] else out.logits
    targets = packed.input_ids[:, packed.targets]  # [1, R]
    mask = (response_mask[packed.rows, packed.cols] > 0)[None]  # [1, R]
    stats = token_logprobs(logits, targets, mask, temperature=temperature, return_entropy=return_entropy,
                           chunk_tokens=chunk_tokens)

    def widen(x: torch.Tensor) -> torch.Tensor:  # [1, R] -> [B, T], 0 off the response tokens
        return x.new_zeros((B, T)).index_put((packed.rows, packed.cols), x[0])

    return (widen(stats[0]), widen(stats[1])) if return_entropy else widen(stats)


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float,
                 entropy: bool) -> tuple[torch.Tensor, ...]:
    """Token log-probs (and entropies) of one chunk of positions, in fp32. # [B, c] each"""
    z = logits.float()  # [B, c, V]
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # [B, c]
    token = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, c]
    zero = torch.zeros_like(lse)
    logp = torch.where(mask, token - lse, zero)  # [B, c]
    if not entropy:
        return (logp,)
    # H = logsumexp(z) - sum_v softmax(z)_v * z_v
    probs = torch.softmax(z, dim=-1)  # [B, c, V]
    ent = torch.where(mask, lse - (probs * z).sum(dim=-1), zero)  # [B, c]
    return logp, ent


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of `targets` under `logits`, a chunk of positions at a time.

    Args:
        logits: [B, T, V] in the model's dtype (a view is fine: only one chunk is ever copied).
        targets: [B, T] token ids; mask: [B, T] bool, outputs are 0 where it is False.
        chunk_tokens: about how many positions (B x chunk width) go through the fp32 softmax at
            once; None takes all T at once.

    The fp32 working set is about 3 x chunk_tokens x V x 4 bytes (the fp32 logits, the softmax and
    its product with the logits) instead of 3 x B x T x V x 4: for V = 152064 and 16384 tokens that
    is 1.9 GB for 1024-token chunks instead of 30 GB. When gradients flow, each chunk runs under
    activation checkpointing (its fp32 intermediates are recomputed in backward, one chunk at a
    time), otherwise autograd would keep every chunk's softmax alive until backward. Every position
    is computed by the same operations whatever the chunking, so the values do not depend on it.

    Returns:
        logp [B, T] fp32 (and entropy [B, T] fp32 when return_entropy).
    """
    B, T, _ = logits.shape
    width = T if chunk_tokens is None else max(1, chunk_tokens // max(B, 1))
    checkpointed = width < T and torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for t0 in range(0, T, width):
        args = (logits[:, t0 : t0 + width], targets[:, t0 : t0 + width], mask[:, t0 : t0 + width],
                temperature, return_entropy)
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*args))
    logp = torch.cat([p[0] for p in parts], dim=1) if len(parts) > 1 else parts[0][0]  # [B, T]
    if not return_entropy:
        return logp
    entropy = torch.cat([p[1] for p in parts], dim=1) if len(parts) > 1 else parts[0][1]  # [B, T]
    return logp, entropy


def unpack_response_logprobs(logp: torch.Tensor, response_mask: torch.Tensor) -> list[list[float]]:
    """Per-row lists of the log-probs on real response tokens (right-padded rows), as floats."""
    if logp.shape != response_mask.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} != response_mask shape {tuple(response_mask.shape)}")
    lengths = (response_mask > 0).sum(dim=1).tolist()  # [B]
    rows = logp.detach().float().cpu().tolist()
    return [row[:n] for row, n in zip(rows, lengths)]
