"""Bucket plan, flatten/unflatten and the broadcast channel, without Ray."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from prime.rollout.weight_transfer import (
    BroadcastChannel,
    Bucket,
    SharedStaging,
    TensorSlot,
    buckets_from_wire,
    buckets_to_wire,
    check_specs,
    choose_backend,
    flatten_bucket,
    join_channel,
    max_bucket_bytes,
    open_store,
    plan_buckets,
    process_memory,
    receive_into,
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
    return _run_members(world, lambda rank: BroadcastChannel("127.0.0.1", port, rank, world, "gloo", "127.0.0.1",
                                                          store=store if rank == 0 else None, timeout_s=30), body)


def _run_members(world: int, join, body) -> dict:
    """`body(join(rank))` for every rank in threads of this process, each channel closed after; results by
    rank, the first member's error raised."""
    results, errors = {}, []

    def member(rank: int) -> None:
        try:
            ch = join(rank)
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


def test_plan_survives_the_wire_format():
    buckets = plan_buckets(weight_specs(_named()), bucket_bytes=32)
    wire = buckets_to_wire(buckets)
    assert wire[0] == {"dtype": "float32", "numel": 6, "slots": [["a", [2, 3], 0, 6]]}
    assert buckets_from_wire(wire) == buckets
    with pytest.raises(ValueError, match="'float33'"):
        buckets_from_wire([{"dtype": "float33", "numel": 1, "slots": []}])


def _run_spec_group(world: int, transport: str, nbytes: int, body) -> dict:
    """Like `_run_group`, but members join through `join_channel` (a spec, as the actors do)."""
    store, port = open_store("127.0.0.1", world, timeout_s=30)
    staging = SharedStaging(nbytes, torch.device("cpu")) if transport == "ipc" else None
    spec = dict(transport=transport, host="127.0.0.1", port=port, world_size=world, backend="gloo", timeout_s=30)
    if staging is not None:
        spec["handle"] = staging.handle
    return _run_members(world, lambda rank: join_channel(spec, rank, "127.0.0.1", store=store if rank == 0 else None,
                                                      staging=staging if rank == 0 else None), body)


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_streams_bucket_by_bucket_from_an_iterator(transport):
    named = _named()
    buckets = plan_buckets(weight_specs(named), bucket_bytes=32)
    produced = []

    def per_bucket():  # what a ZeRO-3 trainer yields: only the current bucket's tensors
        for b in buckets:
            produced.append(len(produced))
            yield {s.name: named[s.name] for s in b.slots}

    def body(ch):
        if ch.rank == 0:
            return ch.send_stream(buckets, per_bucket())
        got = []
        for i, pairs in enumerate(ch.receive_stream(buckets)):
            got.append((i, [n for n, _ in pairs], {n: t.clone() for n, t in pairs}))
        return got

    res = _run_spec_group(3, transport, max_bucket_bytes(buckets), body)
    assert res[0]["buckets"] == 5.0 and produced == [0, 1, 2, 3, 4]
    for r in (1, 2):
        assert [(i, names) for i, names, _ in res[r]] == [(i, [s.name for s in b.slots]) for i, b in enumerate(buckets)]
        for _, _, tensors in res[r]:
            for name, t in tensors.items():
                assert torch.equal(t, named[name])


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_a_sender_failing_mid_stream_releases_the_receivers(transport):
    named = _named()
    buckets = plan_buckets(weight_specs(named), bucket_bytes=32)

    def failing():
        yield {s.name: named[s.name] for s in buckets[0].slots}
        raise RuntimeError("gather failed")

    def body(ch):
        if ch.rank == 0:
            with pytest.raises(RuntimeError, match="gather failed"):
                ch.send_stream(buckets, failing())
            return "sender raised"
        received = []
        with pytest.raises(RuntimeError, match="aborted"):
            for pairs in ch.receive_stream(buckets):
                received.append([n for n, _ in pairs])
        return received

    res = _run_spec_group(2, transport, max_bucket_bytes(buckets), body)
    assert res == {0: "sender raised", 1: [["a"]]}  # the first bucket arrived, then the abort


def test_receive_into_drains_the_stream_when_loading_fails():
    named = _named()
    buckets = plan_buckets(weight_specs(named), bucket_bytes=32)
    loaded = []

    def load(pairs):
        loaded.append([n for n, _ in pairs])
        if len(loaded) == 2:
            raise KeyError("engine refused bucket 1")

    def body(ch):
        if ch.rank == 0:
            return ch.send(buckets, named)  # completes: the receiver keeps receiving after the error
        with pytest.raises(KeyError, match="refused"):
            receive_into(ch, buckets, load)
        return loaded

    res = _run_spec_group(2, "broadcast", 0, body)
    assert res[0]["buckets"] == 5.0 and res[1] == [["a"], ["c"]]


def test_shared_staging_is_one_file_in_memory_removed_at_close():
    staging = SharedStaging(64, torch.device("cpu"))
    assert staging.handle["kind"] == "shm" and staging.handle["path"].startswith("/dev/shm/")
    staging.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    from prime.rollout.weight_transfer import open_shared

    assert open_shared(staging.handle)[:4].tolist() == [1, 2, 3, 4]  # another mapping sees the bytes
    staging.close()
    assert not os.path.exists(staging.handle["path"])
    with pytest.raises(ValueError, match="'tape'"):
        open_shared({"kind": "tape"})


def test_shared_channel_leaves_no_file_once_every_member_mapped_it():
    # A killed job must not leave its staging buffer in /dev/shm: the name goes once all have mapped it.
    named = _named()
    buckets = plan_buckets(weight_specs(named), bucket_bytes=32)
    store, port = open_store("127.0.0.1", 3, timeout_s=30)
    staging = SharedStaging(max_bucket_bytes(buckets), torch.device("cpu"))
    spec = dict(transport="ipc", host="127.0.0.1", port=port, world_size=3, timeout_s=30, handle=staging.handle)

    def body(ch):
        if ch.rank == 0:
            assert not os.path.exists(staging.handle["path"])  # removed in its join, after the mapping barrier
            ch.send_stream(buckets, (named for _ in buckets))
            return ch.send_stream(buckets, (named for _ in buckets))["buckets"]  # and every sync after
        # A receiver leaves that barrier possibly before the sender removed the name; the sender
        # removes it before it stages anything, so it is gone once a bucket has arrived.
        ch.receive(buckets)
        assert not os.path.exists(staging.handle["path"])
        return {n: t.clone() for n, t in ch.receive(buckets)}

    res = _run_members(3, lambda rank: join_channel(spec, rank, "127.0.0.1", store=store if rank == 0 else None,
                                                    staging=staging if rank == 0 else None), body)
    assert res[0] == 5.0
    for r in (1, 2):
        assert all(torch.equal(res[r][n], t) for n, t in named.items())


def test_shared_staging_refuses_more_than_dev_shm_holds(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(ValueError, match=r"needs 64.0 MiB in /dev/shm, which has 10.0 MiB free.*weight_sync=broadcast"):
        SharedStaging(64 * 2**20, torch.device("cpu"))


def test_process_memory_reads_proc():
    m = process_memory()
    assert 0 < m["rss"] <= m["peak"]
