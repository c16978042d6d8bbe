"""Moving weights from a trainer into rollout engines in buckets: the plan and one member's channel.

No Ray here: `workers/weight_sync.py` wires these pieces to actors.

- The bucket plan cuts a model's named tensors into buckets of about `bucket_bytes` (one dtype per
  bucket); `flatten_bucket` packs a bucket's tensors into one flat buffer and `unflatten_bucket`
  gives named views back, so a bucket travels as one message.
- `BroadcastChannel` is one member's end of a `torch.distributed` process group of its own
  (separate from any trainer's default group), built from a `TCPStore` on the sender's node, gloo
  on CPU or NCCL on GPU: rank 0 sends each bucket with one broadcast, every other rank receives.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

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
# One member of the broadcast group (runs inside the sender and receiver processes)
# --------------------------------------------------------------------------------------------------


def transport_info(ip: str) -> dict[str, Any]:
    """A member's address `ip` and its GPU identity (None without CUDA), for choosing the backend."""
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
