"""Padding-free micro-batches: the rows of a padded batch concatenated into one row, no pads.

`pack_rows` turns the padded layout of `prime.data.batch.Batch` (left-padded prompts of width P,
right-padded responses of width T) into one row of N = sum(lengths) real tokens whose
`position_ids` restart at 0 for every sequence, plus the indices that map the packed logits back to
the [B, T] response layout (`prime.models.logprobs.response_logprobs(..., padding_free=True)`).
With `share_prompts` the K samples of a prompt (consecutive rows with the same prompt) pack the
prompt once: each later sample is only its response, a segment whose position ids go on from the
prompt's length, and the attention below attends it to the prompt's one copy. At K=4 and prompts
of about a sixth of a sequence that is 17% fewer tokens through every linear layer (forward and
backward); the attention itself still runs each sample's whole sequence.

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

    The row is cut into segments (`cu_seq_lens`). A segment whose position ids start at 0 is a
    sequence of its own (a prompt and, unless it is empty, its response). With `share_prompts` a row
    whose prompt equals the previous row's is packed as its response alone, a segment whose positions
    start at the prompt's length p: it continues the first p tokens of the last segment that starts at
    0 (`packed_sdpa_attention` attends it to them).

    Response token t of row b is packed token `targets[j]` for the j with (rows[j], cols[j]) = (b, t);
    it is predicted by the logits at packed position `keep[j]` (`targets[j] - 1`, except for the first
    response token of a shared prompt: the prompt's last token).
    """

    input_ids: torch.Tensor  # [1, N] long
    position_ids: torch.Tensor  # [1, N] long, each segment's positions counting up from its start
    cu_seq_lens: torch.Tensor  # [S+1] int32, segment s is packed tokens cu[s] .. cu[s+1]-1
    max_length: int  # longest sequence a segment makes (a shared prompt's branch counts the prompt)
    keep: torch.Tensor  # [R] long, packed positions whose logits predict a response token
    rows: torch.Tensor  # [R] long, the padded row of each
    cols: torch.Tensor  # [R] long, its response column
    targets: torch.Tensor  # [R] long, the packed position of the response token itself


def shared_prompt_rows(input_ids: torch.Tensor, real: torch.Tensor, position_ids: torch.Tensor,
                       prompt_width: int) -> torch.Tensor:
    """[B] bool: row b (b > 0) has the same real prompt tokens as row b-1, both rows' tokens at
    positions 0 .. len-1, so its response can be packed against row b-1's prompt (`pack_rows(share_prompts=True)`)."""
    B = input_ids.shape[0]
    P = prompt_width
    shared = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    if B < 2 or P == 0:
        return shared
    plen = real[:, :P].sum(dim=1)  # [B]
    counted = real.long().cumsum(dim=1) - 1  # [B, L] each real token's index in its row
    standard = ((position_ids == counted) | ~real).all(dim=1) & (plen > 0)  # [B] positions 0 .. len-1
    same = ((input_ids[1:, :P] == input_ids[:-1, :P]) | ~real[1:, :P]).all(dim=1) & (plen[1:] == plen[:-1])  # [B-1]
    shared[1:] = same & standard[1:] & standard[:-1]
    return shared


def packed_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  response_width: int, share_prompts: bool = False) -> int:
    """How many tokens `pack_rows` packs for these rows: their real tokens, each prompt once for the
    consecutive rows that share it with `share_prompts`."""
    real = attention_mask > 0
    if not share_prompts:
        return int(real.sum())
    P = input_ids.shape[1] - response_width
    shared = shared_prompt_rows(input_ids, real, position_ids, P)  # [B]
    return int(real.sum()) - int(real[shared, :P].sum())


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              response_width: int, share_prompts: bool = False) -> PackedRows:
    """Pack the real tokens of padded rows (the `Batch` layout, responses of width `response_width`).

    With `share_prompts`, consecutive rows with the same prompt (`shared_prompt_rows`: the K samples
    of a prompt, as a rollout batch holds them) pack the prompt once: the first row as prompt plus
    response, each following row as its response alone, a segment continuing the prompt. The model
    then runs the prompt's tokens once instead of K times; the attention must follow the segments
    (`packed_sdpa_attention`), which flash attention's varlen kernels do not.

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
    shared = shared_prompt_rows(input_ids, real, position_ids, P) if share_prompts else torch.zeros_like(plen, dtype=torch.bool)
    own_prompt = torch.where(shared, torch.zeros_like(plen), plen)  # [B] prompt tokens packed with the row
    lengths = own_prompt + rlen  # [B] the row's segment
    ends = lengths.cumsum(0)  # [B]
    starts = ends - lengths  # [B]
    cu = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)  # [B+1]
    ar = torch.arange(B, device=real.device)
    root = torch.cummax(torch.where(shared, torch.zeros_like(ar), ar), 0).values  # [B] row that packed the prompt
    rows = torch.repeat_interleave(ar, rlen)  # [R]
    resp_starts = rlen.cumsum(0) - rlen  # [B]
    cols = torch.arange(rows.numel(), device=real.device) - resp_starts[rows]  # [R]
    targets = (starts + own_prompt)[rows] + cols  # [R]
    first_of_shared = shared[rows] & (cols == 0)  # [R] predicted by the shared prompt's last token
    keep = torch.where(first_of_shared, (starts + plen)[root][rows] - 1, targets - 1)  # [R]
    packed = real.clone()
    packed[:, :P] &= ~shared[:, None]
    virtual = plen + rlen  # [B] a segment's sequence, counting a shared prompt
    return PackedRows(input_ids[packed][None], position_ids[packed][None], cu,
                      int(virtual.max()) if B else 0, keep, rows, cols, targets)


def _segments(cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None,
              n: int) -> tuple[list[int], list[int]] | None:
    """(lengths, first positions) of the segments packed in a single row of `n` tokens, from
    `cu_seq_lens` or from position ids that do not go on; None when the row holds one sequence (or
    there is nothing to tell). First positions are 0 where position ids are not given."""
    pos = position_ids[0] if position_ids is not None and tuple(position_ids.shape) == (1, n) else None
    if cu_seq_lens is not None:
        lengths = cu_seq_lens.diff().long()
    elif pos is None:
        return None
    else:
        starts = torch.nonzero(pos.diff() != 1).flatten() + 1  # a new segment where positions do not go on
        if starts.numel() == 0:
            return None
        bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), n)])
        lengths = bounds.diff()
    if pos is None or n == 0:
        return lengths.tolist(), [0] * lengths.numel()
    begins = (lengths.cumsum(0) - lengths).clamp(max=n - 1)  # an empty last segment begins at n
    return lengths.tolist(), pos[begins].masked_fill(lengths == 0, 0).tolist()


def _sequences(lengths: list[int], firsts: list[int]) -> list[tuple[int, int, int, int]]:
    """The causal sequence of every non-empty segment: (prefix start, prefix length, start, length)
    in the packed row. A segment whose positions start at 0 is a sequence of its own (no prefix); one
    whose positions start at p > 0 continues the first p tokens of the last segment that started at 0
    (a prompt shared by several responses, `pack_rows(share_prompts=True)`).

    Raises ValueError when such a segment has no segment before it to continue, or a shorter one."""
    out, begin, root = [], 0, None
    for s, (n, p) in enumerate(zip(lengths, firsts)):
        if n > 0:
            if p == 0:
                root = (begin, n)
                out.append((begin, 0, begin, n))
            elif root is None or p > root[1]:
                have = "no segment starting at position 0 before it" if root is None else f"{root[1]} tokens"
                raise ValueError(f"packed segment {s} starts at position {p}, so it continues a segment of at "
                                 f"least {p} tokens, but there is {have}")
            else:
                out.append((root[0], p, begin, n))
        begin += n
    return out


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


def _causal_sdpa_padded(query, key, value, seqs: list[tuple[int, int, int, int]], dropout, scaling,
                        gqa) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sdpa of the sequences `seqs` (`_sequences` tuples), right-padded to the longest of them
    for one call. A sequence with a prefix runs the prefix's queries too (attention only: their
    outputs are dropped, the prefix's own sequence gives them).

    Returns (out [n, H, D] for the n packed tokens the sequences own, the packed indices [n] of those tokens)."""
    dev = query.device
    pre = torch.tensor([q[1] for q in seqs], device=dev)  # [S'] prefix lengths
    lens = pre + torch.tensor([q[3] for q in seqs], device=dev)  # [S'] prefix + own tokens
    row = torch.repeat_interleave(torch.arange(len(seqs), device=dev), lens, output_size=int(lens.sum()))  # [n']
    pos = torch.arange(row.numel(), device=dev) - (lens.cumsum(0) - lens)[row]  # [n'] position in its sequence
    own = pos >= pre[row]  # [n'] False on a prefix's queries
    starts = torch.tensor([q[2] for q in seqs], device=dev)
    prefix_starts = torch.tensor([q[0] for q in seqs], device=dev)
    token = torch.where(own, starts[row] + pos - pre[row], prefix_starts[row] + pos)  # [n'] index in the packed row
    longest = int(lens.max())
    shared = bool(pre.any())

    every = not shared and row.numel() == query.shape[2]  # all the row's tokens, in order (token == arange)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, D] -> [S', h, longest, D]
        buf = x.new_zeros((len(seqs), longest, x.shape[1], x.shape[3]))
        tokens = x[0] if every else x[0, :, token]  # [h, n', D]
        return buf.index_put((row, pos), tokens.transpose(0, 1)).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(padded(query), padded(key), padded(value), dropout_p=dropout,
                                                           scale=scaling, is_causal=True, enable_gqa=gqa)
    if shared:
        row, pos, token = row[own], pos[own], token[own]
    return out.transpose(1, 2)[row, pos], token


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal sdpa within each packed sequence, else transformers' sdpa.

    query [1, H, N, D], key/value [1, Hkv, N, D] for a packed row; returns [1, N, H, D]. The row's
    segments come from `cu_seq_lens_q` (or from position ids that restart) and their first position
    ids (`_sequences`): a segment that starts at position p > 0 continues the first p tokens of the
    last one that started at 0, so K responses packed after one copy of their prompt each attend to
    it (`pack_rows(share_prompts=True)`). The sequences go right-padded into [S, H, Lmax, D] for one
    sdpa call with is_causal=True per `attention_buckets` group: a real query then sees only its own
    sequence's earlier tokens, never a pad (pads come after it), and padding costs at most twice the
    real tokens in this layer's attention only, not in the linear layers. One call per sequence
    wastes nothing, but the CPU sdpa kernel's per-call cost made it 4x slower than the padded batch.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    segments = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        segments = _segments(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), query.shape[2])
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths, firsts = segments
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"the packed sequences cover {sum(lengths)} tokens but the row has {query.shape[2]}")
    seqs = _sequences(lengths, firsts)
    window = kwargs.get("sliding_window")
    if window is not None and max((q[1] + q[3] for q in seqs), default=0) > window:
        raise NotImplementedError("packed sequences longer than the sliding window are not supported")
    gqa = query.shape[1] != key.shape[1] and use_gqa_in_sdpa(None, key, value)
    if query.shape[1] != key.shape[1] and not gqa:
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // key.shape[1])
    groups = attention_buckets([q[1] + q[3] for q in seqs])
    parts = [_causal_sdpa_padded(query, key, value, [seqs[i] for i in g], dropout, scaling, gqa) for g in groups]
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
