"""Weight sync policy -> rollout engines after every update.

Three kinds (`cluster.weight_sync`) behind one small interface (`WeightSync.sync() -> metrics`, or
`start()` then `finish()`, and `close()`):

- `object_store` (`ObjectStoreSync`; CPU and small models): policy rank 0 returns its full HF-named
  state dict, Ray stores it once, and every engine loads it (vLLM in safetensors chunks of at most
  256 MiB through `collective_rpc`). Rank 0 holds a full host copy: not for 7B models.
- `broadcast` (`StreamingSync`): a process group of its own made of policy rank 0 (group rank 0)
  and every receiving process of every engine: vLLM's worker processes themselves, one per
  tensor-parallel rank, joined through prime's worker extension (`prime/rollout/vllm_ext.py`),
  or the actor for the HF engine. NCCL when every member has a GPU of its own, gloo otherwise. The
  weights are gathered, sent and loaded one bucket at a time.
- `ipc` (`StreamingSync`): the sender copies each bucket into a staging buffer that the engines'
  workers map once; a small gloo group only signals "bucket ready" and "bucket copied".
  On GPUs (colocated placement) policy rank i serves engine i on its GPU through a CUDA IPC
  handle (every rank gathers each bucket anyway under ZeRO-3); that needs as many engines as
  policy ranks, one process per engine. On a CPU run the buffer is a /dev/shm file, and policy
  rank 0 serves every engine on its node (the default on one machine: in tiny-model steps with two
  engines the send took 7.5-8 ms this way against 9.4-11 ms over gloo's TCP broadcast).

Every policy rank takes part in a sync: under ZeRO-3 each bucket is gathered collectively.
The bucket plan, the channels and the receiving end need no Ray; they live in
`prime/rollout/weight_transfer.py` and `prime/rollout/vllm_ext.py`. This module wires them to the
actor groups. docs/gpu_memory.md sizes each member's memory.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from prime.rollout.weight_transfer import BACKENDS, Bucket, buckets_to_wire, choose_backend

if TYPE_CHECKING:
    from workers.group import ActorGroup

WEIGHT_SYNC_KINDS = ("object_store", "broadcast", "ipc")


class WeightSync(Protocol):
    """Pushes the policy's current weights into every rollout engine.

    `start()` only submits the actor calls; a policy actor runs them after the calls it already
    has (actors run their calls in order), so the driver can queue a sync right behind an update,
    with no round trip between the two. `finish(started)` waits for it.
    """

    def start(self) -> Any:
        """Submit one sync; pass what it returns to `finish`."""

    def finish(self, started: Any, since: float | None = None) -> dict[str, float]:
        """Wait for a started sync; metrics `weight_sync/bytes`, `weight_sync/buckets`,
        `weight_sync/seconds` (from `since`, a `time.perf_counter()`, else from `start`), ..."""

    def sync(self) -> dict[str, float]:
        """One sync: `finish(start())`."""
        return self.finish(self.start())

    def close(self) -> None:
        """Release the transport's resources (process groups, staging buffers)."""


class ObjectStoreSync(WeightSync):
    """Policy rank 0's state dict through the Ray object store (stored once, read by every engine)."""

    def __init__(self, policy: ActorGroup, rollout: ActorGroup) -> None:
        self.policy, self.rollout = policy, rollout

    def start(self) -> tuple:
        t0 = time.perf_counter()
        refs = [a.export_weights.options(num_returns=2).remote() for a in self.policy.actors]
        weights_ref, _ = refs[0]
        loads = [e.load_weights.remote(weights_ref) for e in self.rollout.actors]  # they wait for the object
        return t0, refs, loads

    def finish(self, started: tuple, since: float | None = None) -> dict[str, float]:
        import ray

        t0, refs, loads = started
        ray.get([nb for _, nb in refs[1:]])  # ranks > 0 return (None, 0) once the gather is done
        load_s = ray.get(loads)
        nbytes = float(ray.get(refs[0][1]))
        seconds = time.perf_counter() - (t0 if since is None else since)
        return {
            "weight_sync/bytes": nbytes,
            "weight_sync/buckets": 1.0,  # one object
            "weight_sync/seconds": seconds,
            "weight_sync/load_seconds": max(load_s),
            "weight_sync/mb_per_s": nbytes / 2**20 / max(seconds, 1e-9),
        }

    def close(self) -> None:
        pass


def _pairs(policy: ActorGroup, rollout: ActorGroup, transport: str, receivers: list[int],
           cpu: bool = False) -> list[tuple[Any, list]]:
    """(sender actor, [(engine actor, its receiving processes)]) for each group of the transport.
    `cpu`: the policy trains on the CPU, where one "ipc" staging buffer in the host's memory
    serves every engine on that host, so policy rank 0 sends to them all, as with "broadcast"."""
    engines = list(zip(rollout.actors, receivers))
    if transport == "broadcast" or cpu:
        return [(policy.actors[0], engines)]
    if len(rollout.actors) != len(policy.actors):
        raise ValueError(f"weight_sync=ipc pairs engine i with policy rank i, so it needs as many engines "
                         f"({len(rollout.actors)}) as policy ranks ({len(policy.actors)}); use broadcast")
    if any(n != 1 for n in receivers):
        raise ValueError(f"weight_sync=ipc needs one process per engine (tensor_parallel_size=1), got {receivers}; "
                         "use broadcast")
    return [(sender, [engine]) for sender, engine in zip(policy.actors, engines)]


def _check_same_device(sender_info: dict, engine_infos: list[dict]) -> None:
    for info in engine_infos:
        if info["ip"] != sender_info["ip"] or info["gpu"] != sender_info["gpu"]:
            where = ("on its policy rank's device (colocated placement puts them together)" if sender_info["gpu"]
                     else "on the policy's node (a CPU run's staging buffer is in that node's memory)")
            raise ValueError(f"weight_sync=ipc needs each engine {where}; policy rank at {sender_info}, "
                             f"engine at {info}; use broadcast")


class StreamingSync(WeightSync):
    """Bucket-by-bucket sync straight into the engines' worker processes ("broadcast" or "ipc").

    Set-up (once): every policy rank plans the buckets from its weights' names, shapes and dtypes
    (no gather), each sender opens its group (TCPStore, and for "ipc" the staging buffer), and the
    sender and the engines' receiving processes join it. `backend=None` picks NCCL for
    "broadcast" when every member has a GPU of its own, gloo otherwise; "ipc" signals over gloo.
    """

    def __init__(self, policy: ActorGroup, rollout: ActorGroup, transport: str = "broadcast",
                 bucket_mb: float = 256, backend: str | None = None, timeout_s: float = 1800.0) -> None:
        import ray

        if transport not in ("broadcast", "ipc"):
            raise ValueError(f"transport={transport!r} is not valid; choose 'broadcast' or 'ipc'")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS} or None (automatic)")
        self.policy, self.rollout, self.transport = policy, rollout, transport
        plans = ray.get([a.weight_bucket_plan.remote(int(bucket_mb * 2**20)) for a in policy.actors])
        self.buckets: list[Bucket] = plans[0]
        self.nbytes = sum(b.nbytes for b in self.buckets)
        receivers = ray.get([e.weight_sync_receivers.remote() for e in rollout.actors])
        cpu = transport == "ipc" and ray.get(policy.actors[0].transport_info.remote())["gpu"] is None
        groups = _pairs(policy, rollout, transport, receivers, cpu)
        self.senders = [sender for sender, _ in groups]
        self.backends = [self._join(sender, engines, backend, timeout_s) for sender, engines in groups]
        self.backend = self.backends[0]

    def _join(self, sender, engines: list, backend: str | None, timeout_s: float) -> str:
        """Open one group (sender + the engines' processes) and have every member join it."""
        import ray

        sender_info = ray.get(sender.transport_info.remote())
        engine_infos = [i for infos in ray.get([e.transport_infos.remote() for e, _ in engines]) for i in infos]
        if self.transport == "ipc":
            _check_same_device(sender_info, engine_infos)
            backend = "gloo"
        backend = backend or choose_backend([sender_info] + engine_infos)
        world = 1 + sum(n for _, n in engines)
        spec = ray.get(sender.open_weight_sync.remote(self.transport, world, backend, timeout_s))
        plan = buckets_to_wire(self.buckets)
        joins, first = [sender.join_weight_sync.remote(spec)], 1
        for engine, n in engines:
            joins.append(engine.join_weight_sync.remote(spec, first, plan))
            first += n
        ray.get(joins)
        return backend

    def start(self) -> tuple:
        t0 = time.perf_counter()
        # Receivers first so they are waiting when the senders start (each side would block in the
        # collective until the other arrives anyway). Over the groups' lanes when both have them
        # (`workers/lane.py`): a sync queued behind the policy's update on its lane starts the moment
        # the update ends, in the same Ray task.
        engines, ranks = self.rollout.lanes(), self.policy.lanes()
        if engines is not None and ranks is not None:
            for lane in engines:
                lane.submit("receive_weights")
            for lane in ranks:
                lane.submit("send_weights")
            return t0, engines, ranks
        recv = [e.receive_weights.remote() for e in self.rollout.actors]
        send = [a.send_weights.remote() for a in self.policy.actors]
        return t0, recv, send

    def finish(self, started: tuple, since: float | None = None) -> dict[str, float]:
        import ray

        from workers.lane import Lane, lane_results

        t0, recv, send = started
        if send and isinstance(send[0], Lane):
            try:
                sent = [s for s in lane_results(self.policy, send) if s is not None]
            except BaseException:  # the engines' replies will not be read: their lanes must not stay open
                self.rollout.close_lanes(timeout_s=5.0)
                raise
            received = lane_results(self.rollout, recv)
        else:
            sent = [s for s in ray.get(send) if s is not None]
            received = ray.get(recv)
        seconds = time.perf_counter() - (t0 if since is None else since)
        return {
            "weight_sync/bytes": sent[0]["bytes"],
            "weight_sync/buckets": sent[0]["buckets"],
            "weight_sync/seconds": seconds,
            "weight_sync/gather_seconds": max(s["gather_seconds"] for s in sent),
            "weight_sync/broadcast_seconds": max(s["seconds"] for s in sent),
            "weight_sync/load_seconds": max(r["load_seconds"] for r in received),
            "weight_sync/mb_per_s": sent[0]["bytes"] / 2**20 / max(seconds, 1e-9),
        }

    def close(self) -> None:
        import ray

        self.policy.close_lanes()  # the senders' handles were kept from the start: no lane may hold them
        self.rollout.close_lanes()
        ray.get([s.close_weight_sync.remote() for s in self.senders]
                + [e.close_weight_sync.remote() for e in self.rollout.actors])


def make_weight_sync(kind: str, policy_group: ActorGroup, rollout_group: ActorGroup, bucket_mb: float = 256,
                     backend: str | None = None) -> WeightSync:
    """The transport named by `cluster.weight_sync` (WEIGHT_SYNC_KINDS)."""
    if kind == "object_store":
        return ObjectStoreSync(policy_group, rollout_group)
    if kind in ("broadcast", "ipc"):
        return StreamingSync(policy_group, rollout_group, transport=kind, bucket_mb=bucket_mb, backend=backend)
    raise ValueError(f"weight_sync={kind!r} is not valid; choose one of {WEIGHT_SYNC_KINDS}")
