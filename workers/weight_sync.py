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

The bucket plan, flatten and unflatten are pure functions; `BroadcastChannel` is one member's end
of the group and needs no Ray, so both are tested without a cluster.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from workers.group import ActorGroup

WEIGHT_SYNC_KINDS = ("object_store", "broadcast")
BACKENDS = ("gloo", "nccl")
_STORE_PREFIX = "prime-weight-sync"


# --------------------------------------------------------------------------------------------------
# Bucket plan: pure functions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lives inside its bucket's flat buffer (offsets in elements)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """One broadcast: `numel` elements of one dtype, holding `slots` back to back."""

    dtype: torch.dtype
    numel: int
    slots: tuple[TensorSlot, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_specs(named: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor, in the mapping's order."""
    return [(name, tuple(t.shape), t.dtype) for name, t in named.items()]


def plan_buckets(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> list[Bucket]:
    """Group tensors into buckets of at most `bucket_bytes`, one dtype per bucket.

    Tensors keep their order within a dtype. A bucket is closed when the next tensor of its dtype
    would overflow it; a tensor larger than `bucket_bytes` gets a bucket of its own. Buckets are
    listed in the order they were closed, the still-open ones last (in order of first use).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    done: list[Bucket] = []
    open_: dict[torch.dtype, list[TensorSlot]] = {}  # insertion order = first use of the dtype
    sizes: dict[torch.dtype, int] = {}

    def close(dtype: torch.dtype) -> None:
        slots = open_.pop(dtype)
        done.append(Bucket(dtype=dtype, numel=sizes.pop(dtype), slots=tuple(slots)))

    seen = set()
    for name, shape, dtype in specs:
        if name in seen:
            raise ValueError(f"weight name {name!r} appears twice")
        seen.add(name)
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * _itemsize(dtype)
        if dtype in open_ and (sizes[dtype] + numel) * _itemsize(dtype) > bucket_bytes:
            close(dtype)
        if dtype not in open_:
            open_[dtype], sizes[dtype] = [], 0
        open_[dtype].append(TensorSlot(name=name, shape=tuple(int(d) for d in shape), offset=sizes[dtype], numel=numel))
        sizes[dtype] += numel
        if nbytes >= bucket_bytes:  # fills (or overflows) a bucket on its own
            close(dtype)
    for dtype in list(open_):
        close(dtype)
    return done


def flatten_bucket(bucket: Bucket, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Copy the bucket's tensors into one flat buffer on `device`. # [numel] of bucket.dtype"""
    flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)  # [numel]
    for s in bucket.slots:
        t = tensors[s.name]
        if tuple(t.shape) != s.shape or t.dtype != bucket.dtype:
            raise ValueError(
                f"weight {s.name!r} is {tuple(t.shape)} {t.dtype}, but the bucket plan expects {s.shape} {bucket.dtype}"
            )
        flat[s.offset : s.offset + s.numel].copy_(t.reshape(-1))
    return flat


def unflatten_bucket(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Named views into `flat` ([numel] of bucket.dtype), in the bucket's order (no copies)."""
    if flat.dtype != bucket.dtype or flat.numel() != bucket.numel:
        raise ValueError(f"buffer is {flat.numel()} x {flat.dtype}, bucket needs {bucket.numel} x {bucket.dtype}")
    return [(s.name, flat[s.offset : s.offset + s.numel].view(s.shape)) for s in bucket.slots]


def check_specs(expected: list[tuple[str, tuple[int, ...], torch.dtype]], named: Mapping[str, torch.Tensor]) -> None:
    """Raise if the weights no longer have the names/shapes/dtypes the bucket plan was made for."""
    got = weight_specs(named)
    if got == expected:
        return
    exp = {n: (s, d) for n, s, d in expected}
    have = {n: (s, d) for n, s, d in got}
    missing, extra = sorted(set(exp) - set(have)), sorted(set(have) - set(exp))
    changed = [n for n in exp if n in have and exp[n] != have[n]]
    raise ValueError(
        "weights differ from the set-up bucket plan: "
        f"missing {missing[:3]}, unexpected {extra[:3]}, changed {[(n, exp[n], have[n]) for n in changed[:3]]}"
    )


# --------------------------------------------------------------------------------------------------
# One member of the broadcast group (runs inside the policy rank-0 and rollout actors; no Ray)
# --------------------------------------------------------------------------------------------------


def local_transport_info() -> dict[str, Any]:
    """This process's node IP and GPU identity (None without CUDA), for choosing the backend."""
    try:
        from workers.group import node_ip

        ip = node_ip()
    except Exception:  # outside Ray
        ip = "127.0.0.1"
    gpu = None
    if torch.cuda.is_available():
        gpu = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return {"ip": ip, "gpu": gpu}


def choose_backend(infos: list[dict[str, Any]]) -> str:
    """NCCL when every member has its own GPU; gloo otherwise (CPU, or colocated members sharing a
    GPU, which NCCL refuses)."""
    gpus = [i["gpu"] for i in infos]
    if all(g is not None for g in gpus) and len(set(gpus)) == len(gpus):
        return "nccl"
    return "gloo"


class BroadcastChannel:
    """One member's end of the weight-sync group: rank 0 sends buckets, every other rank receives.

    Args:
        host, port: address of the TCPStore (on rank 0's node).
        rank, world_size: this member's rank in the weight-sync group (0 = sender).
        backend: "gloo" (CPU buffers) or "nccl" (buffers on this process's current CUDA device).
        bind_ip: the address gloo binds to (this node's IP; 127.0.0.1 on a local run).
        store: rank 0 passes the master store it opened with `open_store`.
        timeout_s: how long a collective may wait for the other members.

    The constructor blocks until every member has joined, then checks the link with one
    broadcast, so a wrong address fails at set-up rather than in the first sync.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, bind_ip: str,
                 store=None, timeout_s: float = 1800.0) -> None:
        from torch.distributed import PrefixStore, TCPStore

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the group of {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if store is None:
            store = TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        self._store = store
        prefixed = PrefixStore(_STORE_PREFIX, store)
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            opts._devices = [ProcessGroupGloo.create_device(hostname=bind_ip)]
            opts._timeout = timeout
            self._pg = ProcessGroupGloo(prefixed, rank, world_size, opts)
            self.device = torch.device("cpu")
        else:
            from torch.distributed import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = timeout
            self._pg = ProcessGroupNCCL(prefixed, rank, world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        hello = torch.tensor([world_size if rank == 0 else -1], dtype=torch.int64, device=self.device)
        self._broadcast(hello)
        if int(hello.item()) != world_size:
            raise RuntimeError(f"weight-sync handshake failed: got {int(hello.item())}, expected {world_size}")

    @staticmethod
    def open_store(host: str, world_size: int, timeout_s: float = 1800.0):
        """Rank 0: start the TCPStore server on a free port of `host`; returns (store, port)."""
        from torch.distributed import TCPStore

        store = TCPStore(host, 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)
        return store, store.port

    def _broadcast(self, tensor: torch.Tensor) -> None:
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        # Sent as raw bytes: every dtype (bf16 included) travels the same way on both backends.
        self._pg.broadcast([tensor.view(torch.uint8)], opts).wait()

    def send(self, buckets: list[Bucket], named: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """Rank 0: broadcast every bucket. `named=None` tells the receivers to stop with an error
        (the sender could not produce the weights) instead of waiting for buckets that never come."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends")
        t0 = time.perf_counter()
        header = torch.tensor([len(buckets) if named is not None else -1], dtype=torch.int64, device=self.device)
        self._broadcast(header)
        if named is None:
            return {}
        nbytes = 0
        for b in buckets:
            flat = flatten_bucket(b, named, self.device)  # [numel]
            self._broadcast(flat)
            nbytes += b.nbytes
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"bytes": float(nbytes), "buckets": float(len(buckets)), "seconds": time.perf_counter() - t0}

    def receive(self, buckets: list[Bucket]) -> list[tuple[str, torch.Tensor]]:
        """Ranks > 0: receive every bucket; named tensors (views into the received buffers)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 sends; it does not receive")
        header = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        n = int(header.item())
        if n < 0:
            raise RuntimeError("the policy's rank 0 aborted the weight sync (see its error)")
        if n != len(buckets):
            raise RuntimeError(f"sender announced {n} buckets, this receiver's plan has {len(buckets)}")
        out: list[tuple[str, torch.Tensor]] = []
        for b in buckets:
            flat = torch.empty(b.numel, dtype=b.dtype, device=self.device)  # [numel]
            self._broadcast(flat)
            out.extend(unflatten_bucket(b, flat))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def close(self) -> None:
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # a peer that already left is fine at close
                pass
        self._store = None


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

