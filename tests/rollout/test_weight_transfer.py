"""Bucket plan, flatten/unflatten and the broadcast channel, without Ray."""

from __future__ import annotations

import threading

import pytest
import torch

from prime.rollout.weight_transfer import (
    BroadcastChannel,
    Bucket,
    TensorSlot,
    check_specs,
    choose_backend,
    flatten_bucket,
    plan_buckets,
    unflatten_bucket,
    weight_specs,
)


def _named() -> dict[str, torch.Tensor]:
    """Mixed dtypes; sizes in bytes: a 24, b 16, c 64, d 8 (bf16), e 12."""
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(2, 3, generator=g),  # fp32, 6 elements
        "b": torch.arange(4, dtype=torch.int32),  # int32, 4 elements
        "c": torch.randn(16, generator=g),  # fp32, 64 bytes: larger than a 32-byte bucket
        "d": torch.randn(2, 2, generator=g).to(torch.bfloat16),  # bf16, 4 elements
        "e": torch.randn(3, generator=g),  # fp32, 3 elements
    }


def test_plan_buckets_groups_by_dtype_and_isolates_large_tensors():
    buckets = plan_buckets(weight_specs(_named()), bucket_bytes=32)
    # fp32: "a" (24 B) opens a bucket; "c" (64 B) would overflow it, so "a" is closed and "c" gets a
    # bucket of its own (closed at once: it alone exceeds 32 B). "e" (12 B) opens the next fp32 bucket.
    # int32 "b" (16 B) and bf16 "d" (8 B) each stay in one open bucket, flushed at the end.
    assert [(b.dtype, [s.name for s in b.slots]) for b in buckets] == [
        (torch.float32, ["a"]),
        (torch.float32, ["c"]),
        (torch.int32, ["b"]),
        (torch.bfloat16, ["d"]),
        (torch.float32, ["e"]),
    ]
    assert [b.nbytes for b in buckets] == [24, 64, 16, 8, 12]


def test_plan_buckets_packs_consecutive_tensors_with_offsets():
    specs = [("x", (2, 2), torch.float32), ("y", (3,), torch.float32), ("z", (1,), torch.float32)]
    # 40-byte buckets: x (16 B) + y (12 B) = 28 B fit; z (4 B) brings it to 32 B, still fits.
    (b,) = plan_buckets(specs, bucket_bytes=40)
    assert b.numel == 8
    assert b.slots == (TensorSlot("x", (2, 2), 0, 4), TensorSlot("y", (3,), 4, 3), TensorSlot("z", (1,), 7, 1))
    # 28-byte buckets: x + y = 28 B fill the first bucket exactly; z starts a second one.
    assert [[s.name for s in b.slots] for b in plan_buckets(specs, bucket_bytes=28)] == [["x", "y"], ["z"]]


def test_plan_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([("x", (1,), torch.float32)], bucket_bytes=0)
    with pytest.raises(ValueError, match="appears twice"):
        plan_buckets([("x", (1,), torch.float32), ("x", (1,), torch.float32)], bucket_bytes=64)


def test_flatten_unflatten_round_trip_is_exact():
    named = _named()
    out = {}
    for b in plan_buckets(weight_specs(named), bucket_bytes=32):
        flat = flatten_bucket(b, named)
        assert flat.dtype == b.dtype and flat.shape == (b.numel,)
        # Through a byte buffer, as the channel sends it.
        received = flat.view(torch.uint8).clone().view(b.dtype)
        out.update(unflatten_bucket(b, received))
    assert list(sorted(out)) == sorted(named)
    for name, t in named.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)


def test_flatten_rejects_a_tensor_that_does_not_match_the_plan():
    b = Bucket(torch.float32, 4, (TensorSlot("w", (2, 2), 0, 4),))
    with pytest.raises(ValueError, match="'w'"):
        flatten_bucket(b, {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="bucket needs"):
        unflatten_bucket(b, torch.zeros(3))


def test_check_specs_names_the_changed_weight():
    named = _named()
    check_specs(weight_specs(named), named)
    named["a"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="'a'"):
        check_specs(weight_specs(_named()), named)


def test_choose_backend():
    assert choose_backend([{"gpu": None}, {"gpu": None}]) == "gloo"
    assert choose_backend([{"gpu": "u0"}, {"gpu": "u1"}]) == "nccl"
    # Colocated: two members on one GPU (NCCL refuses that).
    assert choose_backend([{"gpu": "u0"}, {"gpu": "u0"}]) == "gloo"
    assert choose_backend([{"gpu": "u0"}, {"gpu": None}]) == "gloo"


def _run_group(world: int, body) -> dict:
    """Run `body(channel)` on `world` gloo members in threads of this process; results by rank."""
    store, port = BroadcastChannel.open_store("127.0.0.1", world, timeout_s=30)
    results, errors = {}, []

    def member(rank: int) -> None:
        try:
            ch = BroadcastChannel("127.0.0.1", port, rank, world, "gloo", "127.0.0.1",
                                  store=store if rank == 0 else None, timeout_s=30)
            results[rank] = body(ch)
            ch.close()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_gloo_channel_broadcasts_every_bucket_to_every_receiver():
    named = _named()
    buckets = plan_buckets(weight_specs(named), bucket_bytes=32)

    def body(ch):
        return ch.send(buckets, named) if ch.rank == 0 else dict(ch.receive(buckets))

    res = _run_group(3, body)
    assert res[0]["buckets"] == 5.0 and res[0]["bytes"] == 24 + 64 + 16 + 8 + 12
    for r in (1, 2):
        assert sorted(res[r]) == sorted(named)
        for name, t in named.items():
            assert torch.equal(res[r][name], t)


def test_gloo_channel_abort_reaches_the_receivers():
    buckets = plan_buckets(weight_specs(_named()), bucket_bytes=32)

    def body(ch):
        if ch.rank == 0:
            return ch.send(buckets, None)
        with pytest.raises(RuntimeError, match="aborted"):
            ch.receive(buckets)
        return "raised"

    assert _run_group(2, body) == {0: {}, 1: "raised"}
