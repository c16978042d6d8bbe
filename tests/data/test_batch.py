"""The packed batch: layout, row selection, trimming and the checks that name what is missing."""

import pytest
import torch

from prime.data.batch import Batch, pack_sequences

PAD = 3


def test_pack_sequences_layout():
    # Prompts [5,6] and [7]; responses [8] and [9,10,11]. P = 2, T = 3.
    out = pack_sequences([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=PAD)
    assert out.input_ids.tolist() == [[5, 6, 8, PAD, PAD], [PAD, 7, 9, 10, 11]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    # cumsum(mask) - 1 clamped at 0: row 0 -> [0,1,2,2,2], row 1 -> [0,0,1,2,3].
    assert out.position_ids.tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert out.response_mask.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert out.input_ids.dtype == torch.long and out.response_mask.dtype == torch.float32
    assert len(out) == 2 and out.response_width == 3 and out.lengths() == [3, 4]


def test_pack_sequences_bad_input():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack_sequences([[1], [2]], [[3]], pad_id=PAD)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack_sequences([[1], []], [[3], [4]], pad_id=PAD)


def test_trimmed_keeps_layout():
    # Two rows, P = 4, T = 3. Row 0: prompt [-, -, 5, 6], response [7, -, -];
    # row 1: prompt [-, 1, 2, 3], response [4, 8, -]. Column 0 and response column 2 are padding
    # everywhere, so the trimmed batch is P' = 3, T' = 2.
    input_ids = torch.tensor([[0, 0, 5, 6, 7, 0, 0], [0, 1, 2, 3, 4, 8, 0]])
    attention_mask = (input_ids > 0).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    response_mask = attention_mask[:, 4:].float()
    ids, attn, pos, rmask = Batch(input_ids, attention_mask, position_ids, response_mask).trimmed()
    assert ids.tolist() == [[0, 5, 6, 7, 0], [1, 2, 3, 4, 8]]
    assert pos.tolist() == position_ids[:, 1:6].tolist()
    assert rmask.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_select_replace_packed_and_require():
    b = pack_sequences([[1], [2, 2], [3]], [[4], [5], [6, 6]], pad_id=0)
    b = b.replace(scores=torch.tensor([0.0, 1.0, 0.5]), group_ids=torch.tensor([0, 0, 1]))
    sub = b.select([2, 0])
    assert sub.scores.tolist() == [0.5, 0.0] and sub.group_ids.tolist() == [1, 0]
    assert sub.input_ids.tolist() == [b.input_ids[2].tolist(), b.input_ids[0].tolist()]
    assert sub.response_width == b.response_width  # rows keep the batch's width
    assert b.packed().scores is None and b.packed().input_ids is b.input_ids
    b.require("scores", "group_ids")
    with pytest.raises(ValueError, match="no old_logp, advantages"):
        b.require("scores", "old_logp", "advantages")


def test_rows_must_agree():
    b = pack_sequences([[1], [2]], [[4], [5]], pad_id=0)
    with pytest.raises(ValueError, match="scores has 3 rows but the batch has 2"):
        b.replace(scores=torch.zeros(3))
    with pytest.raises(ValueError, match="P >= 1"):
        Batch(b.input_ids[:, 1:], b.attention_mask[:, 1:], b.position_ids[:, 1:], b.response_mask)


def test_pickles_through_numpy_and_back_exactly():
    """Batches cross Ray as numpy arrays (Batch.__reduce__): every field comes back with its dtype
    and values; bfloat16 stays a tensor; arrays Ray hands out read-only are copied, so the rebuilt
    tensors are writable."""
    import dataclasses
    import pickle

    import numpy as np

    from prime.data.batch import _batch_from_fields, pack_sequences

    b = pack_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    b = b.replace(group_ids=torch.tensor([0, 0]), scores=torch.tensor([1.0, 0.0]),
                  truncated=torch.tensor([True, False]), old_logp=torch.randn(2, 3).to(torch.bfloat16))
    c = pickle.loads(pickle.dumps(b))
    for f in dataclasses.fields(b):
        x, y = getattr(b, f.name), getattr(c, f.name)
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), f.name
    frozen = [getattr(b, f.name) for f in dataclasses.fields(b)]
    frozen = [v.numpy() if v is not None and v.dtype != torch.bfloat16 else v for v in frozen]
    for v in frozen:
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    d = _batch_from_fields(tuple(frozen))
    d.input_ids[0, 0] = 42  # writable, and not the original's memory
    assert int(b.input_ids[0, 0]) != 42
