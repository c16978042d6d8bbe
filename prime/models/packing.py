"""Padding-free micro-batches: the rows of a padded batch concatenated into one row, no pads.

`pack_rows` turns the padded layout of `prime.data.batch.Batch` (left-padded prompts of width P,
right-padded responses of width T) into one row of N = sum(lengths) real tokens whose
`position_ids` restart at 0 for every sequence, plus the indices that map the packed logits back to
the [B, T] response layout (`prime.models.logprobs.response_logprobs(..., padding_free=True)`).

Attention must stay inside each sequence. What transformers 5.19 does with such a row
(masking_utils.py): when `attention_mask` is None and `position_ids` restart inside a row,
`find_packed_sequence_indices` detects the sequences and `create_causal_mask` ANDs the causal mask
with a block-diagonal one. For sdpa and eager that mask is a dense [1, 1, N, N] tensor, so every
layer's attention costs N^2 instead of sum(length^2): for 64 sequences of about 100 tokens that is
64 times the attention work of the sequences themselves, and on the `small` tiny model it made the
packed pass slower than the padded one. flash_attention_2/3/4 instead read `cu_seq_lens_q/k` (or
derive them from the position ids) and run varlen kernels, which is what packing needs, but they
exist only on GPUs.

So `use_packed_attention` switches an sdpa model to `PACKED_ATTENTION`, an attention function
registered with transformers' `AttentionInterface`: given the packed row's `cu_seq_lens_q` (which
`response_logprobs` passes, as for flash attention) or packed `position_ids`, it runs causal sdpa
within each sequence (the linear layers, the MLP and the LM head see only real tokens); any other call (a padded batch with its mask, an unpacked row) goes
to transformers' own sdpa function unchanged, so the switched model computes what it did before.
Its mask function builds no mask for mask-less calls, so no N x N tensor is ever made. Flash
attention models are left as they are (their varlen path already does this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACKED_ATTENTION = "prime_packed_sdpa"
"""The attention implementation name `use_packed_attention` gives an sdpa model."""

NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Implementations whose own kernels keep packed sequences apart (from `cu_seq_lens_q/k`)."""


@dataclass(frozen=True)
class PackedRows:
    """B padded rows as one packed row of N real tokens; R response tokens in all.

    Response token t of row b is packed token `keep[j] + 1` for the j with (rows[j], cols[j]) =
    (b, t); it is predicted by the logits at packed position `keep[j]`.
    """

    input_ids: torch.Tensor  # [1, N] long
    position_ids: torch.Tensor  # [1, N] long, restarting at 0 for each sequence
    cu_seq_lens: torch.Tensor  # [B+1] int32, sequence b is packed tokens cu[b] .. cu[b+1]-1
    max_length: int  # longest sequence
    keep: torch.Tensor  # [R] long, packed positions whose logits predict a response token
    rows: torch.Tensor  # [R] long, the padded row of each
    cols: torch.Tensor  # [R] long, its response column


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              response_width: int) -> PackedRows:
    """Pack the real tokens of padded rows (the `Batch` layout, responses of width `response_width`).

    Raises ValueError when a row is not left-padded in its prompt and right-padded in its response,
    or has response tokens but no prompt token to predict the first one from.
    """
    B, L = input_ids.shape
    P, T = L - response_width, response_width
    real = attention_mask > 0  # [B, L]
    plen = real[:, :P].sum(dim=1)  # [B]
    rlen = real[:, P:].sum(dim=1)  # [B]
    left = torch.arange(P, device=real.device) >= (P - plen)[:, None]  # [B, P]
    right = torch.arange(T, device=real.device) < rlen[:, None]  # [B, T]
    if not (torch.equal(real[:, :P], left) and torch.equal(real[:, P:], right)):
        raise ValueError("padding-free packing needs left-padded prompts and right-padded responses "
                         "(the prime.data.batch.Batch layout)")
    if bool(((plen == 0) & (rlen > 0)).any()):
        raise ValueError("a row has response tokens but no prompt token; the first response token "
                         "needs one to be predicted from")
    lengths = plen + rlen  # [B]
    ends = lengths.cumsum(0)  # [B]
    cu = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)  # [B+1]
    rows = torch.repeat_interleave(torch.arange(B, device=real.device), rlen)  # [R]
    resp_starts = rlen.cumsum(0) - rlen  # [B]
    cols = torch.arange(rows.numel(), device=real.device) - resp_starts[rows]  # [R]
    keep = (ends - lengths)[rows] + plen[rows] - 1 + cols  # [R]
    return PackedRows(input_ids[real][None], position_ids[real][None], cu,
                      int(lengths.max()) if B else 0, keep, rows, cols)


def _sequence_lengths(cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Lengths [S] of the sequences packed in a single row, from `cu_seq_lens` or from position ids
    that restart; None when the row holds one sequence (or there is nothing to tell)."""
    if cu_seq_lens is not None:
        return cu_seq_lens.diff().long()
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos.diff() != 1).flatten() + 1  # a new sequence where positions do not go on
    if starts.numel() == 0:
        return None
    bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), pos.numel())])
    return bounds.diff()


def attention_buckets(lengths: list[int], slack: float = 2.0) -> list[list[int]]:
    """Group sequences (indices into `lengths`) so that each group, right-padded to its longest
    member, holds at most `slack` x its real tokens. Longest first, greedily; each group's indices
    ascending; empty sequences are left out. One group when the lengths are within a factor of about
    `slack` of each other."""
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    longest = real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * longest <= slack * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            longest = real = lengths[i]
    return [sorted(g) for g in groups]


def _causal_sdpa_padded(query, key, value, lengths: list[int], starts: list[int], seqs: list[int], dropout, scaling,
                        gqa) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sdpa of the packed sequences `seqs`, right-padded to the longest of them for one call.

    Returns (out [n, H, D] for their n tokens, the packed indices [n] of those tokens)."""
    dev = query.device
    lens = torch.tensor([lengths[s] for s in seqs], device=dev)  # [S']
    row = torch.repeat_interleave(torch.arange(len(seqs), device=dev), lens, output_size=int(lens.sum()))  # [n]
    pos = torch.arange(row.numel(), device=dev) - (lens.cumsum(0) - lens)[row]  # [n] position in its sequence
    token = torch.tensor([starts[s] for s in seqs], device=dev)[row] + pos  # [n] index in the packed row
    longest = max(lengths[s] for s in seqs)

    every = row.numel() == query.shape[2]  # all the row's tokens, in order (token == arange)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, D] -> [S', h, longest, D]
        buf = x.new_zeros((len(seqs), longest, x.shape[1], x.shape[3]))
        tokens = x[0] if every else x[0, :, token]  # [h, n, D]
        return buf.index_put((row, pos), tokens.transpose(0, 1)).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(padded(query), padded(key), padded(value), dropout_p=dropout,
                                                           scale=scaling, is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2)[row, pos], token


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal sdpa within each packed sequence, else transformers' sdpa.

    query [1, H, N, D], key/value [1, Hkv, N, D] for a packed row; returns [1, N, H, D]. The sequences
    go right-padded into [S, H, Lmax, D] for one sdpa call with is_causal=True per `attention_buckets`
    group: a real query then sees only its own sequence's earlier tokens, never a pad (pads come
    after it), and padding costs at most twice the real tokens in this layer's attention only, not in
    the linear layers. One call per sequence wastes nothing, but the CPU sdpa kernel's per-call cost
    made it 4x slower than the padded batch.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    lengths = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        lengths = _sequence_lengths(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"))
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = lengths.tolist()
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"the packed sequences cover {sum(lengths)} tokens but the row has {query.shape[2]}")
    window = kwargs.get("sliding_window")
    if window is not None and max(lengths) > window:
        raise NotImplementedError("packed sequences longer than the sliding window are not supported")
    gqa = query.shape[1] != key.shape[1] and use_gqa_in_sdpa(None, key, value)
    if query.shape[1] != key.shape[1] and not gqa:
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // key.shape[1])
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    parts = [_causal_sdpa_padded(query, key, value, lengths, starts, seqs, dropout, scaling, gqa)
             for seqs in attention_buckets(lengths)]
    if len(parts) == 1:  # all sequences in one group, in order: token i is row i already
        return parts[0][0][None], None
    out = torch.cat([p[0] for p in parts])  # [N, H, D] in group order
    where = torch.empty(query.shape[2], dtype=torch.long, device=query.device)  # [N] row of token i in `out`
    where[torch.cat([p[1] for p in parts])] = torch.arange(query.shape[2], device=query.device)
    return out[where][None], None  # [1, N, H, D] in packed order


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function of `PACKED_ATTENTION`: no mask for a cache-less, mask-less causal call (a plain
    row or a packed one: `packed_sdpa_attention` applies causality per sequence), transformers' sdpa
    mask for everything else (padding masks, caches, sliding windows, custom mask functions)."""
    from transformers.masking_utils import sdpa_mask

    plain = (attention_mask is None and kwargs.get("local_size") is None and not kwargs.get("use_vmap")
             and not kwargs.get("q_offset") and not kwargs.get("kv_offset")
             and kwargs.get("q_length") == kwargs.get("kv_length"))
    if plain:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> None:
    """Make `PACKED_ATTENTION` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> str:
    """Prepare `model` (an HF causal LM) for padding-free passes; returns its attention implementation.

    sdpa becomes `PACKED_ATTENTION` (same results on padded batches, per-sequence attention on packed
    rows); flash attention stays. Raises ValueError for other implementations (eager would build an
    N x N mask and N x N attention weights per head for the packed row).
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in NATIVE_VARLEN:
        return impl
    if impl not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(f"padding-free passes need an sdpa or flash-attention model, this one uses "
                         f"attn_implementation={impl!r}; load it with sdpa or turn padding_free off")
    register_packed_attention()
    if impl != PACKED_ATTENTION:
        model.set_attn_implementation(PACKED_ATTENTION)
    return PACKED_ATTENTION
