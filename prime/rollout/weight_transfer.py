"""Moving weights from a trainer into rollout engines bucket by bucket: the plan and the two channels.

No Ray here: `workers/weight_sync.py` wires these pieces to actors, and `prime/rollout/vllm_ext.py`
runs the receiving end inside vLLM's own worker processes.

- The bucket plan cuts a model's named tensors into buckets of about `bucket_bytes` (one dtype per
  bucket, in the model's own order, so a decoder layer's tensors arrive together); `flatten_bucket`
  packs a bucket's tensors into one flat buffer and `unflatten_bucket` gives named views back.
- `BroadcastChannel` (transport "broadcast"): a `torch.distributed` process group of its own
  (separate from any trainer's default group), built from a `TCPStore` on the sender's node, gloo on
  CPU or NCCL on GPU. Rank 0 broadcasts each bucket; every other rank receives it into a fresh buffer.
- `SharedBufferChannel` (transport "ipc"): for receivers on the sender's own device (colocated
  placement). The sender owns one staging buffer of the largest bucket's size and the receivers map
  it once: a CUDA IPC handle on a GPU, a `/dev/shm` file on the CPU. Per bucket the sender fills the
  buffer and the members meet twice on a small gloo group (bucket ready, bucket copied), so no
  weights travel through sockets at all.

Streaming: the sender's tensors come from an iterator that yields one bucket's tensors at a time
(under ZeRO-3 each is a collective gather of just that bucket), and `receive_stream` yields each
bucket as it lands. No process holds more than about one bucket beyond its own weights (see
docs/gpu_memory.md for the bound of each member).
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from prime.config import SHM_DIR, shm_free_bytes

BACKENDS = ("gloo", "nccl")
TRANSPORTS = ("broadcast", "ipc")
_STORE_PREFIX = "prime-weight-sync"
_ABORT = -1


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
    """One transfer: `numel` elements of one dtype, holding `slots` back to back."""

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


def flatten_bucket(bucket: Bucket, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the bucket's tensors into one flat buffer on `device` (or into `out`, a [numel] buffer of
    the bucket's dtype, e.g. a reused staging buffer). # [numel] of bucket.dtype"""
    if out is None:
        out = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)  # [numel]
    elif out.dtype != bucket.dtype or out.numel() != bucket.numel:
        raise ValueError(f"out is {out.numel()} x {out.dtype}, bucket needs {bucket.numel} x {bucket.dtype}")
    for s in bucket.slots:
        t = tensors[s.name]
        if tuple(t.shape) != s.shape or t.dtype != bucket.dtype:
            raise ValueError(
                f"weight {s.name!r} is {tuple(t.shape)} {t.dtype}, but the bucket plan expects {s.shape} {bucket.dtype}"
            )
        out[s.offset : s.offset + s.numel].copy_(t.reshape(-1))
    return out


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


def buckets_to_wire(buckets: list[Bucket]) -> list[dict[str, Any]]:
    """The plan as plain lists, dicts, strings and ints: what vLLM's RPC encoder (msgpack) accepts."""
    return [{"dtype": str(b.dtype).removeprefix("torch."), "numel": b.numel,
             "slots": [[s.name, list(s.shape), s.offset, s.numel] for s in b.slots]} for b in buckets]


def buckets_from_wire(wire: list[dict[str, Any]]) -> list[Bucket]:
    """Inverse of `buckets_to_wire`."""
    out = []
    for b in wire:
        dtype = getattr(torch, b["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"bucket dtype {b['dtype']!r} is not a torch dtype")
        slots = tuple(TensorSlot(name, tuple(shape), offset, numel) for name, shape, offset, numel in b["slots"])
        out.append(Bucket(dtype=dtype, numel=int(b["numel"]), slots=slots))
    return out


def max_bucket_bytes(buckets: list[Bucket]) -> int:
    return max((b.nbytes for b in buckets), default=0)


# --------------------------------------------------------------------------------------------------
# Process memory: what the tests and benchmarks measure
# --------------------------------------------------------------------------------------------------


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Resident set size now (`rss`) and its high-water mark (`peak`), in bytes, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
    return out


def reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux `clear_refs` 5); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Members of a weight-sync group (run inside the sender and receiver processes)
# --------------------------------------------------------------------------------------------------


def transport_info(ip: str) -> dict[str, Any]:
    """A member's address `ip` and its GPU identity (None without CUDA), for choosing the transport."""
    gpu = None
    if torch.cuda.is_available():
        gpu = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return {"ip": ip, "gpu": gpu}


def choose_backend(infos: list[dict[str, Any]]) -> str:
    """NCCL when every member has its own GPU; gloo otherwise (CPU, or members sharing a GPU, which
    NCCL refuses)."""
    gpus = [i["gpu"] for i in infos]
    if all(g is not None for g in gpus) and len(set(gpus)) == len(gpus):
        return "nccl"
    return "gloo"


def open_store(host: str, world_size: int, timeout_s: float = 1800.0):
    """Rank 0: start the group's TCPStore server on a free port of `host`; returns (store, port)."""
    from torch.distributed import TCPStore

    store = TCPStore(host, 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                     wait_for_workers=False)
    return store, store.port


class _Group:
    """A process group of its own: the store, the backend and the few collectives the channels use."""

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

    def _broadcast(self, tensor: torch.Tensor) -> None:
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        # Sent as raw bytes: every dtype (bf16 included) travels the same way on both backends.
        self._pg.broadcast([tensor.view(torch.uint8)], opts).wait()

    def _status(self, value: int = 0) -> int:
        """Rank 0 announces `value` (a bucket index, or _ABORT); every rank returns it."""
        t = torch.tensor([value if self.rank == 0 else 0], dtype=torch.int64, device=self.device)
        self._broadcast(t)
        return int(t.item())

    def _expect(self, index: int) -> None:
        got = self._status()
        if got == _ABORT:
            raise RuntimeError("the sender aborted the weight sync (see its error)")
        if got != index:
            raise RuntimeError(f"weight sync out of step: sender announced bucket {got}, expected {index}")

    def _sync_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def close(self) -> None:
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # a peer that already left is fine at close
                pass
        self._store = None


class BroadcastChannel(_Group):
    """Transport "broadcast": rank 0 broadcasts every bucket, every other rank receives it.

    Args:
        host, port: address of the TCPStore (on rank 0's node).
        rank, world_size: this member's rank in the weight-sync group (0 = sender).
        backend: "gloo" (CPU buffers) or "nccl" (buffers on this process's current CUDA device).
        bind_ip: the address gloo binds to (this node's IP; 127.0.0.1 on a local run).
        store: rank 0 passes the master store it opened with `open_store`.
        timeout_s: how long a collective may wait for the other members.

    The constructor blocks until every member has joined, then checks the link with one
    broadcast, so a wrong address fails at set-up rather than in the first sync. Each bucket is
    preceded by a one-number status (its index, or -1 when the sender failed), so an error on the
    sender reaches the receivers instead of leaving them waiting.
    """

    open_store = staticmethod(open_store)

    def send(self, buckets: list[Bucket], named: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """Rank 0: broadcast every bucket of a whole state dict. `named=None` tells the receivers to
        stop with an error (the sender could not produce the weights)."""
        if named is None:
            self._status(_ABORT)
            return {}
        return self.send_stream(buckets, (named for _ in buckets))

    def send_stream(self, buckets: list[Bucket], sources: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Rank 0: broadcast bucket i from the i-th mapping `sources` yields (it may hold just that
        bucket's tensors). One send buffer of the largest multi-tensor bucket's size is reused for
        every bucket; a bucket of one tensor is sent from the tensor itself."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends")
        t0 = time.perf_counter()
        multi = [b for b in buckets if len(b.slots) > 1]
        buffer = torch.empty(max_bucket_bytes(multi), dtype=torch.uint8, device=self.device)
        it = iter(sources)
        for i, b in enumerate(buckets):
            try:
                named = next(it)
                flat = self._as_flat(b, named)
                if flat is None:
                    flat = flatten_bucket(b, named, out=buffer[: b.nbytes].view(b.dtype))  # [numel]
            except BaseException:
                self._status(_ABORT)  # release the receivers before raising
                raise
            self._status(i)
            self._broadcast(flat)
            del named, flat
        self._sync_device(self.device)
        return {"bytes": float(sum(b.nbytes for b in buckets)), "buckets": float(len(buckets)),
                "seconds": time.perf_counter() - t0}

    def _as_flat(self, bucket: Bucket, named: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A one-tensor bucket already laid out as the wire needs it (the bucket plan gives every
        tensor over the bucket size a bucket of its own) is sent as it is, without a staging copy."""
        if len(bucket.slots) != 1:
            return None
        s = bucket.slots[0]
        t = named[s.name]
        if t.device != self.device or t.dtype != bucket.dtype or tuple(t.shape) != s.shape or not t.is_contiguous():
            return None
        return t.reshape(-1)

    def receive_stream(self, buckets: list[Bucket]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ranks > 0: yield each bucket's named tensors as it arrives (views into a fresh buffer, so
        a consumer may keep them; nothing else holds on to them)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 sends; it does not receive")
        for i, b in enumerate(buckets):
            self._expect(i)
            flat = torch.empty(b.numel, dtype=b.dtype, device=self.device)  # [numel]
            self._broadcast(flat)
            self._sync_device(self.device)
            named = unflatten_bucket(b, flat)
            del flat  # the consumer's views alone keep the buffer alive
            yield named
            del named

    def receive(self, buckets: list[Bucket]) -> list[tuple[str, torch.Tensor]]:
        """Ranks > 0: every bucket at once (small models and tests)."""
        return [pair for named in self.receive_stream(buckets) for pair in named]


# --------------------------------------------------------------------------------------------------
# Transport "ipc": one staging buffer on the sender's device, mapped by the receivers
# --------------------------------------------------------------------------------------------------


class SharedStaging:
    """The sender's staging buffer and the handle that lets another process on the same device map it.

    On a GPU the buffer is device memory exported as a CUDA IPC handle; on the CPU it is a file in
    /dev/shm (memory, not disk) that both sides map. The handle is plain data (msgpack-safe).
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        if nbytes < 1:
            raise ValueError(f"staging buffer size must be >= 1 byte, got {nbytes}")
        self.path = None
        if device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            _, args = reduce_tensor(self.tensor)
            gpu = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = {"kind": "cuda", "nbytes": nbytes, "gpu": gpu, "args": pickle.dumps(args)}
        elif device.type == "cpu":
            free = shm_free_bytes()
            if free < nbytes:
                raise ValueError(f"the weight-sync staging buffer needs {nbytes / 2**20:.1f} MiB in {SHM_DIR}, which "
                                 f"has {free / 2**20:.1f} MiB free; use cluster.weight_sync=broadcast, or a smaller "
                                 "cluster.weight_sync_bucket_mb (a container may need a larger --shm-size)")
            self.path = f"{SHM_DIR}/prime-weight-sync-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
            self.tensor = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)
            self.handle = {"kind": "shm", "nbytes": nbytes, "path": self.path}
        else:
            raise ValueError(f"shared staging needs a cuda or cpu device, got {device}")

    def unlink(self) -> None:
        """Remove the /dev/shm file's name once every member has mapped it: the memory lives as long as
        a mapping does, and nothing is left behind if a process is killed."""
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        self.tensor = None
        self.unlink()


def open_shared(handle: Mapping[str, Any]) -> torch.Tensor:
    """Map the sender's staging buffer in this process. # [nbytes] uint8"""
    if handle["kind"] == "shm":
        return torch.from_file(handle["path"], shared=True, size=int(handle["nbytes"]), dtype=torch.uint8)
    if handle["kind"] != "cuda":
        raise ValueError(f"unknown staging handle kind {handle['kind']!r}; valid: 'shm', 'cuda'")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = torch.cuda.current_device()
    mine = str(torch.cuda.get_device_properties(index).uuid)
    if mine != handle["gpu"]:
        raise RuntimeError(f"transport 'ipc' needs the sender's GPU {handle['gpu']}, this process has {mine}; "
                           "use transport 'broadcast' for engines on other GPUs")
    args = list(pickle.loads(handle["args"]))
    args[6] = index  # the storage's device index as this process numbers it
    return rebuild_cuda_tensor(*args)


class SharedBufferChannel(_Group):
    """Transport "ipc": members on one device exchange buckets through the sender's staging buffer.

    A gloo group of its own carries only the per-bucket status and a barrier. The receivers copy
    each bucket out of the staging buffer before the barrier that lets the sender overwrite it:
    a loader may keep a bucket's tensors until a layer is complete (vLLM's layerwise reload does).

    Args: as `BroadcastChannel`, plus `staging` (rank 0: its `SharedStaging`) or `handle`
    (ranks > 0: the staging's handle).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, bind_ip: str, *, store=None,
                 staging: SharedStaging | None = None, handle: Mapping[str, Any] | None = None,
                 timeout_s: float = 1800.0) -> None:
        if rank == 0 and staging is None:
            raise ValueError("rank 0 of a shared channel needs its SharedStaging")
        if rank > 0 and handle is None:
            raise ValueError("a receiver of a shared channel needs the staging handle")
        super().__init__(host, port, rank, world_size, "gloo", bind_ip, store=store, timeout_s=timeout_s)
        self._staging = staging
        self.buffer = staging.tensor if rank == 0 else open_shared(handle)  # [nbytes] uint8
        self._barrier()  # every member has mapped the buffer
        if rank == 0:
            staging.unlink()

    def _barrier(self) -> None:
        t = torch.zeros(1)
        self._pg.allreduce([t]).wait()

    def send_stream(self, buckets: list[Bucket], sources: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Rank 0: stage bucket i from the i-th mapping of `sources`, announce it, wait until every
        receiver has copied it."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends")
        if max_bucket_bytes(buckets) > self.buffer.numel():
            raise ValueError(f"largest bucket ({max_bucket_bytes(buckets)} B) exceeds the staging buffer "
                             f"({self.buffer.numel()} B)")
        t0 = time.perf_counter()
        it = iter(sources)
        for i, b in enumerate(buckets):
            try:
                flatten_bucket(b, next(it), out=self.buffer[: b.nbytes].view(b.dtype))
                self._sync_device(self.buffer.device)
            except BaseException:
                self._status(_ABORT)
                raise
            self._status(i)
            self._barrier()  # every receiver has its copy
        return {"bytes": float(sum(b.nbytes for b in buckets)), "buckets": float(len(buckets)),
                "seconds": time.perf_counter() - t0}

    def receive_stream(self, buckets: list[Bucket]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ranks > 0: yield each bucket's named tensors (a private copy on the staging's device)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 sends; it does not receive")
        for i, b in enumerate(buckets):
            self._expect(i)
            flat = self.buffer[: b.nbytes].view(b.dtype).clone()  # [numel]
            self._sync_device(flat.device)
            self._barrier()
            named = unflatten_bucket(b, flat)
            del flat
            yield named
            del named

    def receive(self, buckets: list[Bucket]) -> list[tuple[str, torch.Tensor]]:
        return [pair for named in self.receive_stream(buckets) for pair in named]

    def close(self) -> None:
        self.buffer = None
        if self._staging is not None:
            self._staging.close()
        super().close()


# --------------------------------------------------------------------------------------------------
# Joining and receiving, for any member
# --------------------------------------------------------------------------------------------------


def join_channel(spec: Mapping[str, Any], rank: int, bind_ip: str, *, store=None,
                 staging: SharedStaging | None = None) -> BroadcastChannel | SharedBufferChannel:
    """Join the group `spec` describes as `rank`.

    `spec` is plain data (it crosses Ray and vLLM's RPC): transport, host, port, world_size,
    backend (broadcast only), timeout_s and, for transport "ipc", the staging handle.
    """
    transport = spec["transport"]
    common = dict(host=spec["host"], port=int(spec["port"]), rank=rank, world_size=int(spec["world_size"]),
                  bind_ip=bind_ip, store=store, timeout_s=float(spec["timeout_s"]))
    if transport == "broadcast":
        return BroadcastChannel(backend=spec["backend"], **common)
    if transport == "ipc":
        return SharedBufferChannel(staging=staging, handle=spec.get("handle"), **common)
    raise ValueError(f"transport={transport!r} is not valid; choose one of {TRANSPORTS}")


def receive_into(channel, buckets: list[Bucket], load) -> dict[str, float]:
    """Receive every bucket and pass each one's named tensors to `load` as it lands.

    If `load` fails, the remaining buckets are still received (and dropped) so the sender and the
    other receivers finish the sync; then the error is raised.
    """
    t0, load_s, error = time.perf_counter(), 0.0, None
    for named in channel.receive_stream(buckets):
        if error is not None:
            continue
        t1 = time.perf_counter()
        try:
            load(named)
        except Exception as e:  # re-raised once the stream is drained
            error = e
        load_s += time.perf_counter() - t1
        del named
    if error is not None:
        raise error
    return {"receive_seconds": time.perf_counter() - t0 - load_s, "load_seconds": load_s}
