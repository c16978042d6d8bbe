"""Tests for prime.data.sampler: per-epoch permutations, epoch crossing, exact resume."""

import json

import pytest

from prime.data.sampler import PromptSampler, epoch_permutation


def _stream(sampler, sizes):
    return [sampler.next_batch(n) for n in sizes]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    p0 = epoch_permutation(50, seed=3, epoch=0)
    p1 = epoch_permutation(50, seed=3, epoch=1)
    assert sorted(p0) == list(range(50)) and sorted(p1) == list(range(50))
    assert p0 != p1
    assert p0 == epoch_permutation(50, seed=3, epoch=0)  # a pure function of (len, seed, epoch)
    assert epoch_permutation(5, seed=3, epoch=7, shuffle=False) == [0, 1, 2, 3, 4]


def test_same_seed_same_stream_different_seed_different_stream():
    sizes = [4, 7, 1, 13]
    a = _stream(PromptSampler(20, batch_size=4, seed=1), sizes)
    b = _stream(PromptSampler(20, batch_size=4, seed=1), sizes)
    c = _stream(PromptSampler(20, batch_size=4, seed=2), sizes)
    assert a == b
    assert a != c


def test_batches_cross_epoch_boundaries():
    s = PromptSampler(5, batch_size=3, seed=0)
    e0, e1, e2 = (epoch_permutation(5, 0, e) for e in range(3))
    assert s.next_batch() == e0[:3]
    # 2 left in epoch 0, then 1 from epoch 1.
    assert s.next_batch() == e0[3:] + e1[:1]
    assert (s.epoch, s.position) == (1, 1)
    # Larger than the dataset: the rest of epoch 1 (4) + all of epoch 2 (5) + 1 of epoch 3.
    big = s.next_batch(10)
    assert big[:9] == e1[1:] + e2
    assert big[9] == epoch_permutation(5, 0, 3)[0]
    assert (s.epoch, s.position, s.num_served) == (3, 1, 16)


def test_exact_end_of_epoch_moves_to_the_next_epoch():
    s = PromptSampler(4, batch_size=4, seed=0, shuffle=False)
    assert s.next_batch() == [0, 1, 2, 3]
    assert (s.epoch, s.position) == (1, 0)
    assert s.next_batch(2) == [0, 1]


def test_iteration_yields_batch_size_batches():
    s = PromptSampler(3, batch_size=2, seed=0, shuffle=False)
    it = iter(s)
    assert [next(it) for _ in range(3)] == [[0, 1], [2, 0], [1, 2]]


def test_zero_and_default_sizes():
    s = PromptSampler(6, batch_size=4, seed=0)
    assert s.next_batch(0) == []
    assert len(s.next_batch()) == 4


def test_resume_from_state_dict_continues_identically():
    sizes_before = [3, 8, 1]
    sizes_after = [5, 11, 2, 7]
    a = PromptSampler(9, batch_size=3, seed=42)
    _stream(a, sizes_before)
    # The state goes through JSON as a checkpoint would store it.
    state = json.loads(json.dumps(a.state_dict()))
    expected = _stream(a, sizes_after)

    b = PromptSampler(9, batch_size=3, seed=42)
    b.load_state_dict(state)
    assert (b.epoch, b.position, b.num_served) == (1, 3, 12)  # 12 served = one epoch of 9 + 3
    assert _stream(b, sizes_after) == expected


def test_load_state_rejects_a_different_dataset_or_seed():
    state = PromptSampler(9, batch_size=3, seed=42).state_dict()
    with pytest.raises(ValueError, match="dataset_len=9 but this sampler has dataset_len=10"):
        PromptSampler(10, batch_size=3, seed=42).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=42 but this sampler has seed=0"):
        PromptSampler(9, batch_size=3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PromptSampler(9, batch_size=3, seed=42).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        PromptSampler(9, batch_size=3, seed=42).load_state_dict({"epoch": 0, "position": 9})


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset_len=0, batch_size=2), "dataset_len must be a positive integer, got 0"),
    (dict(dataset_len=4, batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(dataset_len=4, batch_size=2, seed=-1), "seed must be a non-negative integer, got -1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptSampler(**kwargs)


def test_negative_request():
    with pytest.raises(ValueError, match="non-negative integer n, got -1"):
        PromptSampler(4, batch_size=2).next_batch(-1)


def test_put_back_serves_buffered_prompts_first_and_survives_resume():
    s = PromptSampler(10, batch_size=4, seed=1)
    first = s.next_batch(4)
    s.put_back(first[2:])  # two prompts whose groups did not fit in the batch
    state = s.state_dict()
    nxt = s.next_batch(5)
    assert nxt[:2] == first[2:]
    # the other three continue the permutation exactly where it stopped
    fresh = PromptSampler(10, batch_size=4, seed=1)
    assert nxt[2:] == fresh.next_batch(7)[4:]
    resumed = PromptSampler(10, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    assert resumed.next_batch(5) == nxt
    with pytest.raises(ValueError, match="outside"):
        s.put_back([10])
