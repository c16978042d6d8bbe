"""Padding-free passes (`response_logprobs(..., padding_free=True)`) agree with the padded ones."""

import pytest
import torch

from prime.data.batch import pack_sequences
from prime.models.loading import load_model
from prime.models.logprobs import response_logprobs
from prime.models.packing import (PACKED_ATTENTION, _sequences, attention_buckets, pack_rows, packed_tokens,
                                  shared_prompt_rows, use_packed_attention)
from prime.models.tiny import build_tiny_model, tiny_model_preset

PAD = 3
# Different prompt and response lengths; row 3 has an empty response, row 4 a one-token prompt.
PROMPTS = [[1, 40, 41, 42, 43, 44, 2], [1, 50], [60, 61, 62, 63], [70, 71, 72], [80]]
RESPONSES = [[100, 101], [110, 111, 112, 113, 114, 115, 116, 117, 118], [120], [], [130, 131, 132, 133]]
# fp32: the packed and padded passes multiply matrices of different shapes (one row of sum(lengths)
# tokens vs B rows of P+T), so BLAS sums in a different order: about 10 ulps of log-probs of size ~7.
ATOL = 5e-6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_pack")), seed=0, **tiny_model_preset("tiny"))


@pytest.fixture(scope="module")
def packed_model(model_path):
    model = load_model(model_path)
    assert use_packed_attention(model) == PACKED_ATTENTION
    return model


def _args(batch):
    return [getattr(batch, k) for k in batch.PACKED]


def _batch():
    return pack_sequences(PROMPTS, RESPONSES, pad_id=PAD)


def _shared():
    """Rollout-like rows: three samples of one prompt (one with an empty response), two of another,
    one prompt alone, then the first prompt again after it (a new group: packed again)."""
    prompts = [[1, 40, 41, 42]] * 3 + [[7, 8]] * 2 + [[9], [1, 40, 41, 42]]
    responses = [[100, 101, 102], [110], [], [120, 121, 122, 123, 124], [130, 131], [140, 141], [150]]
    return pack_sequences(prompts, responses, pad_id=PAD)


def _shared_long_and_short():
    """Shared prompts whose sequences fall into two attention groups (one long response, short ones)."""
    return pack_sequences([[1, 40, 41]] * 3 + [[50, 51]] * 2, [list(range(100, 140)), [110], [111, 112], [120], [121]],
                          pad_id=PAD)


def _long_and_short():
    """One long and three short sequences: the packed attention runs them in two padded groups."""
    return pack_sequences([[1, 40, 41, 42, 43], [50], [60], [70]], [list(range(100, 135)), [110], [120], [130]],
                          pad_id=PAD)


def test_pack_rows_layout():
    batch = pack_sequences([[5, 6], [7]], [[8], [9, 10]], pad_id=0)  # widths P=2, T=2
    p = pack_rows(batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_width)
    assert p.input_ids.tolist() == [[5, 6, 8, 7, 9, 10]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert p.cu_seq_lens.tolist() == [0, 3, 6] and p.max_length == 3
    assert p.keep.tolist() == [1, 3, 4]  # 6 predicts 8; 7 predicts 9; 9 predicts 10
    assert p.rows.tolist() == [0, 1, 1] and p.cols.tolist() == [0, 0, 1]


def test_pack_rows_shares_prompts_layout():
    # Rows 0-2 share the prompt [5, 6] (row 1's response is empty), row 3 has its own.
    batch = pack_sequences([[5, 6], [5, 6], [5, 6], [7]], [[8], [], [9, 10], [11]], pad_id=0)  # P=2, T=2
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_width)
    assert shared_prompt_rows(batch.input_ids, batch.attention_mask > 0, batch.position_ids, 2).tolist() == [
        False, True, True, False]
    p = pack_rows(*args, share_prompts=True)
    assert p.input_ids.tolist() == [[5, 6, 8, 9, 10, 7, 11]]  # the prompt once, then row 2's response
    assert p.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1]]  # row 2's response goes on from the prompt
    assert p.cu_seq_lens.tolist() == [0, 3, 3, 5, 7] and p.max_length == 4
    assert p.targets.tolist() == [2, 3, 4, 6]
    assert p.keep.tolist() == [1, 1, 3, 5]  # 6 predicts 8 and 9 (both first tokens); 9 predicts 10; 7 predicts 11
    assert p.rows.tolist() == [0, 2, 2, 3] and p.cols.tolist() == [0, 0, 1, 0]
    unshared = pack_rows(*args)
    assert unshared.input_ids.tolist() == [[5, 6, 8, 5, 6, 5, 6, 9, 10, 7, 11]]
    assert packed_tokens(*args, share_prompts=True) == 7 and packed_tokens(*args) == 11
    assert torch.equal(unshared.targets, unshared.keep + 1)


def test_pack_rows_shares_only_equal_prompts_at_their_positions():
    batch = pack_sequences([[5, 6], [5, 7], [6], [5, 6]], [[8], [8], [8], [8]], pad_id=0)
    real = batch.attention_mask > 0
    assert shared_prompt_rows(batch.input_ids, real, batch.position_ids, 2).tolist() == [False] * 4
    same = pack_sequences([[5, 6], [5, 6]], [[8], [9]], pad_id=0)
    shifted = same.position_ids.clone()
    shifted[1] += 1  # row 1's positions start at 1: not the prompt row 0 packed
    assert shared_prompt_rows(same.input_ids, same.attention_mask > 0, shifted, 2).tolist() == [False, False]
    assert shared_prompt_rows(same.input_ids, same.attention_mask > 0, same.position_ids, 2).tolist() == [False, True]


def test_sequences_attach_segments_to_the_prompt_they_continue():
    # lengths and first positions of: prompt+response (5), a response at 3, an empty one, a new prompt (2), one at 2
    assert _sequences([5, 2, 0, 2, 4], [0, 3, 0, 0, 2]) == [(0, 0, 0, 5), (0, 3, 5, 2), (7, 0, 7, 2), (7, 2, 9, 4)]
    with pytest.raises(ValueError, match="segment 0 starts at position 2.*no segment starting at position 0"):
        _sequences([3], [2])
    with pytest.raises(ValueError, match="segment 1 starts at position 4.*there is 3 tokens"):
        _sequences([3, 2], [0, 4])


def test_pack_rows_rejects_other_layouts():
    batch = pack_sequences([[5, 6], [7]], [[8], [9, 10]], pad_id=0)
    right_padded_prompt = batch.attention_mask.clone()
    right_padded_prompt[1, :2] = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="left-padded prompts and right-padded responses"):
        pack_rows(batch.input_ids, right_padded_prompt, batch.position_ids, 2)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_matches_padded(packed_model, temperature):
    batch = _batch()
    with torch.no_grad():
        want, want_ent = response_logprobs(packed_model, *_args(batch), temperature=temperature, return_entropy=True)
        got, got_ent = response_logprobs(packed_model, *_args(batch), temperature=temperature, return_entropy=True,
                                         padding_free=True)
    assert got.shape == want.shape == (5, 9)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_ent, want_ent, atol=ATOL, rtol=0)
    off = batch.response_mask == 0
    assert (got[off] == 0).all() and (got_ent[off] == 0).all()  # exactly 0 off the response tokens
    assert (got[~off] < 0).all()


def test_attention_buckets_bound_padding():
    assert attention_buckets([40, 2, 2, 2, 0]) == [[0, 1], [2, 3]]  # 2 x 40 <= 2 x 42, 3 x 40 > 2 x 44
    assert attention_buckets([5, 9, 7]) == [[0, 1, 2]]
    assert attention_buckets([]) == [] and attention_buckets([0]) == []


def test_packed_matches_padded_across_attention_groups(packed_model):
    batch = _long_and_short()
    assert len(attention_buckets(batch.lengths())) == 2
    with torch.no_grad():
        want = response_logprobs(packed_model, *_args(batch))
        got = response_logprobs(packed_model, *_args(batch), padding_free=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("make", [_shared, _shared_long_and_short], ids=["one-group", "two-groups"])
def test_shared_prompts_match_padded(packed_model, make):
    batch = make()
    packed = pack_rows(*_args(batch)[:3], batch.response_width, share_prompts=True)
    assert packed.input_ids.shape[1] < int(batch.attention_mask.sum())  # prompts were packed once
    with torch.no_grad():
        want, want_ent = response_logprobs(packed_model, *_args(batch), return_entropy=True)
        got, got_ent = response_logprobs(packed_model, *_args(batch), return_entropy=True, padding_free=True,
                                         share_prompts=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_ent, want_ent, atol=ATOL, rtol=0)
    off = batch.response_mask == 0
    assert (got[off] == 0).all() and (got[~off] < 0).all()


def test_packed_without_switch_uses_transformers_block_mask(model_path, packed_model):
    """An sdpa model that was not switched still gets the per-sequence masking right (transformers
    builds the block-diagonal mask from the restarting position ids), only with N x N attention."""
    plain = load_model(model_path)
    assert plain.config._attn_implementation == "sdpa"
    batch = _batch()
    with torch.no_grad():
        got = response_logprobs(plain, *_args(batch), padding_free=True)
        want = response_logprobs(packed_model, *_args(batch), padding_free=True)
        padded = response_logprobs(plain, *_args(batch))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The switch changes nothing on padded batches: it hands them to transformers' sdpa function.
    assert torch.equal(padded, response_logprobs(packed_model, *_args(batch)))


def test_packed_chunking_does_not_change_values(packed_model):
    batch = _batch()
    with torch.no_grad():
        whole = response_logprobs(packed_model, *_args(batch), padding_free=True, chunk_tokens=None)
        chunked = response_logprobs(packed_model, *_args(batch), padding_free=True, chunk_tokens=4)
    assert torch.equal(whole, chunked)


def test_packed_position_ids_alone_keep_sequences_apart(packed_model):
    """A direct call with restarting position ids (no cu_seq_lens) is split into its sequences."""
    seqs = [[1, 40, 41, 100], [60, 61, 62, 63, 120, 121], [80, 130]]
    ids = torch.tensor([sum(seqs, [])])
    pos = torch.tensor([sum((list(range(len(s))) for s in seqs), [])])
    with torch.no_grad():
        packed = packed_model(input_ids=ids, position_ids=pos).logits[0]  # [N, V]
        alone = torch.cat([packed_model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("make,share", [(_batch, False), (_long_and_short, False), (_shared, True),
                                        (_shared_long_and_short, True)],
                         ids=["one-group", "two-groups", "shared-one-group", "shared-two-groups"])
def test_packed_gradients_match_padded(model_path, make, share):
    batch = make()
    weights = torch.linspace(0.5, 1.5, batch.response_width)  # [T], a loss that weighs every position differently
    grads = []
    for padding_free in (False, True):
        model = load_model(model_path)
        use_packed_attention(model)
        logp, ent = response_logprobs(model, *_args(batch), return_entropy=True, padding_free=padding_free,
                                      chunk_tokens=8, share_prompts=share and padding_free)
        loss = -(logp * weights).sum() / batch.response_mask.sum() - 0.01 * ent.mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        # Same fp32 reason as ATOL; gradients reach 0.4 here, atol 1e-6 is about 30 ulps of the largest.
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_use_packed_attention_refuses_eager(model_path):
    eager = load_model(model_path, attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        use_packed_attention(eager)
