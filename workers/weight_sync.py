"""Weight sync policy -> rollout engines after every update.

Two transports behind one small interface (`WeightSync.sync() -> metrics`, `close()`):

- `ObjectStoreSync` (default; CPU and small models): policy rank 0 returns its full HF-named state
  dict, Ray stores it once, and every engine receives the same object reference, so the driver
  never holds the tensors.
- `BroadcastSync`: a `torch.distributed` process group of its own (separate from the policy's
  DeepSpeed group) made of policy rank 0 (group rank 0, the sender) and one receiver per rollout
  engine actor (group ranks 1..E). It is built from a `TCPStore` on policy rank 0's node and a
  gloo backend on CPU or an NCCL backend on GPU, without touching any process's default group.
  The weights are cut into buckets of about `bucket_mb` (one dtype per bucket), each bucket is
  flattened into one buffer and broadcast from rank 0; receivers unflatten it by the bucket plan
  they got through Ray at set-up and hand the named tensors to their engine's `load_weights`.

Every policy rank takes part in a sync: under ZeRO-3 the full weights are gathered collectively
(`PolicyWorker.send_weights` / `export_weights` handle that; ranks > 0 return nothing).

With vLLM on GPUs the broadcast lands in the rollout actor's process and `VLLMEngine.load_weights`
then forwards the tensors to the engine workers through `collective_rpc`. vLLM 0.32 also has a
weight-transfer API (`weight_transfer_config=WeightTransferConfig(backend="nccl")` when building
the `LLM`, then `init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update` on the engine and `NCCLTrainerWeightTransferEngine` on the trainer side)
with which NCCL lands directly in the engine workers' GPU memory; using it is a follow-up.

The bucket plan and `BroadcastChannel` (one member's end of the group) need no Ray; they live in
`prime/rollout/weight_transfer.py`. This module only wires them to the actor groups.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from prime.rollout.weight_transfer import BACKENDS, Bucket, choose_backend

if TYPE_CHECKING:
    from workers.group import ActorGroup

WEIGHT_SYNC_KINDS = ("object_store", "broadcast")


# --------------------------------------------------------------------------------------------------
# Driver side: the two transports
# --------------------------------------------------------------------------------------------------


class WeightSync(Protocol):
    """Pushes the policy's current weights into every rollout engine."""

    def sync(self) -> dict[str, float]:
        """One sync; metrics `weight_sync/bytes`, `weight_sync/buckets`, `weight_sync/seconds`, ..."""

    def close(self) -> None:
        """Release the transport's resources (process groups)."""


class ObjectStoreSync:
    """Policy rank 0's state dict through the Ray object store (stored once, read by every engine)."""

    def __init__(self, policy: ActorGroup, rollout: ActorGroup) -> None:
        self.policy, self.rollout = policy, rollout

    def sync(self) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        refs = [a.export_weights.options(num_returns=2).remote() for a in self.policy.actors]
        weights_ref, nbytes_ref = refs[0]
        ray.get([nb for _, nb in refs[1:]])  # ranks > 0 return (None, 0) once the gather is done
        load_s = ray.get([e.load_weights.remote(weights_ref) for e in self.rollout.actors])
        nbytes = float(ray.get(nbytes_ref))
        seconds = time.perf_counter() - t0
        return {
            "weight_sync/bytes": nbytes,
            "weight_sync/buckets": 1.0,  # one object
            "weight_sync/seconds": seconds,
            "weight_sync/load_seconds": max(load_s),
            "weight_sync/mb_per_s": nbytes / 2**20 / max(seconds, 1e-9),
        }

    def close(self) -> None:
        pass


class BroadcastSync:
    """Bucketed broadcast from policy rank 0 to every engine over a process group of its own.

    Set-up (once): the policy gathers its weights to plan the buckets (a collective under ZeRO-3),
    rank 0 opens a TCPStore on its node, and rank 0 plus every engine actor join the group.
    `backend=None` picks NCCL when every member has a GPU of its own and gloo otherwise.
    """

    def __init__(self, policy: ActorGroup, rollout: ActorGroup, bucket_mb: float = 256,
                 backend: str | None = None, timeout_s: float = 1800.0) -> None:
        import ray

        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS} or None (automatic)")
        self.policy, self.rollout = policy, rollout
        sender = policy.actors[0]
        plans = ray.get([a.weight_bucket_plan.remote(int(bucket_mb * 2**20)) for a in policy.actors])
        self.buckets: list[Bucket] = plans[0]
        infos = ray.get([sender.transport_info.remote()] + [e.transport_info.remote() for e in rollout.actors])
        self.backend = backend or choose_backend(infos)
        world = 1 + len(rollout.actors)
        host, port = ray.get(sender.open_weight_sync.remote(world, timeout_s))
        joins = [sender.join_weight_sync.remote(host, port, 0, world, self.backend, self.buckets, timeout_s)]
        joins += [e.join_weight_sync.remote(host, port, i + 1, world, self.backend, self.buckets, timeout_s)
                  for i, e in enumerate(rollout.actors)]
        ray.get(joins)
        self.nbytes = sum(b.nbytes for b in self.buckets)

    def sync(self) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        # Receivers first so they are waiting when rank 0 starts broadcasting (order is not required
        # for correctness: each side blocks in the collective until the other arrives).
        recv = [e.receive_weights.remote() for e in self.rollout.actors]
        send = [a.send_weights.remote() for a in self.policy.actors]
        sent = ray.get(send)[0]
        received = ray.get(recv)
        seconds = time.perf_counter() - t0
        return {
            "weight_sync/bytes": sent["bytes"],
            "weight_sync/buckets": sent["buckets"],
            "weight_sync/seconds": seconds,
            "weight_sync/gather_seconds": sent["gather_seconds"],
            "weight_sync/broadcast_seconds": sent["seconds"],
            "weight_sync/load_seconds": max(r["load_seconds"] for r in received),
            "weight_sync/mb_per_s": sent["bytes"] / 2**20 / max(seconds, 1e-9),
        }

    def close(self) -> None:
        import ray

        ray.get([self.policy.actors[0].close_weight_sync.remote()]
                + [e.close_weight_sync.remote() for e in self.rollout.actors])


def make_weight_sync(kind: str, policy_group: ActorGroup, rollout_group: ActorGroup, bucket_mb: float = 256,
                     backend: str | None = None) -> WeightSync:
    """The transport named by `cluster.weight_sync` ("object_store" or "broadcast")."""
    if kind == "object_store":
        return ObjectStoreSync(policy_group, rollout_group)
    if kind == "broadcast":
        return BroadcastSync(policy_group, rollout_group, bucket_mb=bucket_mb, backend=backend)
    raise ValueError(f"weight_sync={kind!r} is not valid; choose one of {WEIGHT_SYNC_KINDS}")

