"""The one place that owns Ray start-up, placement groups, ranks, MASTER_ADDR and torch.distributed.

Every role (rollout, policy, PRM, reference, verifier) is a plain class wrapped by `ray.remote` here;
a role that trains across data-parallel ranks inherits `RankedWorker` so this module can give each
rank its address, port, rank and world size before the role builds its DeepSpeed engine.

Placement: `launch/placement.py` decides, from the config alone, which node index and bundle each actor
gets; this module makes it real. `match_nodes` maps node index n to a Ray node that has the resources
node n needs (and says what is missing when none has), `create_placement_group` pins every bundle to its
node through Ray's `ray.io/node-id` bundle label and waits at most `timeout_s` for the reservation,
and an `ActorGroup` built from `Slot`s starts one actor per slot in those bundles. A plain
`ActorGroup(cls, n)` (tests, benchmarks) still gets a PACK placement group of its own.
CPU counts are logical and the loop's stages run one after another, so actors may outnumber cores.

Code on every node: a job on a cluster address ships copies of prime/, workers/ and launch/ as Ray's
runtime_env `working_dir` (`stage_code`, `init_ray`): every worker starts in it and imports from it
first. (`py_modules` would not do: Ray also puts the driver's current folder first on every worker's
import path, so a checkout at that path on a node would shadow the shipped code.) `check_same_code`
asks every node for the version and a fingerprint of the code it imports, naming the node that differs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"
CODE_PACKAGES = ("prime", "workers", "launch")
DEFAULT_TIMEOUT_S = 300.0


class PlacementError(RuntimeError):
    """Ray cannot place the job (missing nodes or resources, or a reservation that timed out)."""


def code_dirs() -> list[str]:
    """Folders of this checkout's packages (what a cluster job ships to its nodes)."""
    import importlib

    return [os.path.dirname(os.path.abspath(importlib.import_module(name).__file__)) for name in CODE_PACKAGES]


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost")


def stage_code() -> str:
    """A new temporary folder holding copies of prime/, workers/ and launch/ (without caches): what a
    cluster job ships. The caller removes it once Ray has uploaded it."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="prime-code-")
    for src in code_dirs():
        shutil.copytree(src, os.path.join(folder, os.path.basename(src)),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return folder


def init_ray(address: str = "local", num_cpus: int = 0, env_vars: dict[str, str] | None = None,
             working_dir: str | None = None) -> None:
    """Start a local Ray instance bound to loopback, or join the cluster at `address`.

    `env_vars` reach every actor of the job (Ray's job-level runtime environment); `working_dir` (cluster
    addresses) is a folder Ray uploads, starts every worker in and puts first on its import path. A
    cluster address on loopback (several Ray nodes on this machine) keeps the driver on loopback too.
    """
    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars or {})}
    # No usage reports leave the machine unless the user opts in.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == "local":
        # Ray rewrites 127.0.0.1 into the machine's routable address; a local instance stays on
        # loopback only with its single-machine mode, read from the environment by every Ray process
        # it starts, and from this constant by this process (which imported Ray already).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray runs workers at nice 15 by default; on a shared box or a laptop any other job then
        # starves the actors (seen: PRM update 8-10 s -> 17-30 s). The driver waits on them anyway.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # No idle workers started ahead of time: prime's actors each start their own worker (their
        # runtime environment differs from the job's), so prestarted ones only sat idle, each waking
        # about 150 times a second, which preempts the trainer on a small box (bench/idle_wakeups.py).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        _init_local(num_cpus, runtime_env)
    else:
        if working_dir:
            runtime_env["working_dir"] = working_dir
        local = {"_node_ip_address": "127.0.0.1"} if _is_loopback(address) else {}
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False, **local)


def _init_local(num_cpus: int, runtime_env: dict[str, Any], attempts: int = 3) -> None:
    """`ray.init` of a local instance, tried again when its raylet misses Ray's fixed 30 s start-up
    window (seen on a 2-core machine running other Ray jobs: "timed out during startup")."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address="local",  # a new instance even when another one on this machine is recorded as current
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                log_to_driver=True,
                configure_logging=False,
            )
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            logger.warning("local Ray start timed out (attempt %d of %d, machine busy); starting it again",
                           attempt, attempts)
            ray.shutdown()


def node_ip() -> str:
    """The address Ray registered for this actor's node (127.0.0.1 for a local instance).

    `ray.util.get_node_ip_address()` guesses from the routing table instead, which on a local run
    would send torch.distributed traffic over a non-loopback interface.
    """
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


class RankedWorker:
    """Base of the data-parallel roles: receives its rank and sets up torch.distributed."""

    def master_address(self) -> tuple[str, int]:
        """This actor's node address and a free port on it (asked of rank 0 only)."""
        ip = node_ip()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return ip, port

    def init_distributed(self, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
        # LOCAL_RANK is 0: Ray restricts each actor to its own GPU(s) through CUDA_VISIBLE_DEVICES.
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0",
        )
        self.rank, self.world_size = rank, world_size
        from prime.train.engine import ensure_distributed

        ensure_distributed()


@dataclass(frozen=True)
class NodeInfo:
    """A live Ray node and its total resources."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    is_driver: bool

    def describe(self) -> str:
        return f"node {self.node_id[:8]} ({self.ip}): {self.cpus:g} CPU, {self.gpus:g} GPU"


def cluster_nodes() -> list[NodeInfo]:
    """Live nodes, the driver's first, then by address and id (a stable order for node matching)."""
    here = ray.get_runtime_context().get_node_id()
    nodes = [NodeInfo(n["NodeID"], n["NodeManagerAddress"], float(n["Resources"].get("CPU", 0)),
                      float(n["Resources"].get("GPU", 0)), n["NodeID"] == here)
             for n in ray.nodes() if n["Alive"]]
    return sorted(nodes, key=lambda n: (not n.is_driver, n.ip, n.node_id))


def match_nodes(needs: Sequence[dict[str, float]], nodes: Sequence[NodeInfo] | None = None) -> list[str | None]:
    """The Ray node id for each planned node (None for a planned node that holds nothing).

    Planned node n needs `needs[n]` CPUs and GPUs in total; the biggest needs are matched first, each to
    the first unused node that has them. Raises PlacementError listing the cluster's nodes otherwise.
    """
    nodes = list(cluster_nodes() if nodes is None else nodes)
    chosen: list[str | None] = [None] * len(needs)
    used: set[str] = set()
    order = sorted(range(len(needs)), key=lambda i: (-needs[i].get("GPU", 0), -needs[i].get("CPU", 0), i))
    for i in order:
        cpu, gpu = needs[i].get("CPU", 0.0), needs[i].get("GPU", 0.0)
        if cpu == 0 and gpu == 0:
            continue
        fit = next((n for n in nodes if n.node_id not in used and n.cpus >= cpu and n.gpus >= gpu), None)
        if fit is None:
            have = "; ".join(n.describe() for n in nodes) or "no live node"
            wanted = "; ".join(f"node {j}: {needs[j].get('CPU', 0):g} CPU, {needs[j].get('GPU', 0):g} GPU"
                               for j in range(len(needs)))
            raise PlacementError(
                f"the Ray cluster has no free node for planned node {i} ({cpu:g} CPU, {gpu:g} GPU): the job needs "
                f"{wanted} (cluster.nodes, cluster.gpus_per_node, world sizes) and the cluster has {have}")
        chosen[i] = fit.node_id
        used.add(fit.node_id)
    return chosen


def _bundles_text(bundles: Sequence[dict[str, float]]) -> str:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return f"{len(bundles)} bundles, " + ", ".join(f"{v:g} {k}" for k, v in total.items())


def create_placement_group(name: str, bundles: Sequence[dict[str, float]], node_ids: Sequence[str | None] = (),
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> PlacementGroup:
    """A placement group whose bundle i sits on node `node_ids[i]` (any node where None or not given),
    reserved within `timeout_s`; otherwise it is removed and PlacementError says what was asked."""
    selectors = [{NODE_ID_LABEL: n} if n else {} for n in node_ids] if any(node_ids) else None
    pg = placement_group(list(bundles), strategy="PACK", name=name, bundle_label_selector=selectors)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        free = {k: round(v, 2) for k, v in sorted(ray.available_resources().items())
                if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store"))}
        raise PlacementError(
            f"placement group {name} ({_bundles_text(bundles)}) was not ready within {timeout_s:g} s "
            f"(cluster.placement_timeout_s): the Ray cluster cannot reserve it now (available: {free}); free those "
            f"resources, add nodes, or shrink the job")
    return pg


def bundle_nodes(pg: PlacementGroup) -> list[str]:
    """The Ray node id each bundle of `pg` landed on."""
    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in range(len(table))]


@dataclass(frozen=True)
class Slot:
    """Where one actor runs: a bundle of its group's placement group and what it takes from it."""

    bundle: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    capture_child_tasks: bool = False
    """Child tasks and actors (vLLM's tensor-parallel workers) are scheduled in the same placement group."""
    env_vars: dict[str, str] = field(default_factory=dict)


class ActorGroup:
    """Ray actors of one role class, one per slot of a placement group, ranked 0..world_size-1.

    `ActorGroup(cls, n, num_cpus=..., num_gpus=...)` makes its own PACK placement group of n equal bundles
    (waited for at most `timeout_s`); with `pg` and `slots` the actors go where the job's layout put them.
    """

    def __init__(
        self,
        cls: type,
        world_size: int = 0,
        *,
        name: str,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        pg: PlacementGroup | None = None,
        slots: Sequence[Slot] = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_restarts: int = 0,
    ) -> None:
        """`max_restarts`: times Ray restarts an actor of the group that dies (its constructor runs
        again with the same arguments); calls in flight when it died fail and are not retried by Ray."""
        world_size = len(slots) or world_size
        if world_size < 1:
            raise ValueError(f"{name}: world_size must be >= 1, got {world_size}")
        self.name, self.world_size = name, world_size
        self._owns_pg = pg is None
        if pg is None:
            bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {})
            pg = create_placement_group(f"prime-{name}", [bundle] * world_size, timeout_s=timeout_s)
            slots = [Slot(i, num_cpus, num_gpus) for i in range(world_size)]
        self.pg, self.slots, self.max_restarts = pg, list(slots), max_restarts
        self.lanes_allowed = False
        """Whether `lanes` may open lanes (`cluster.step_lanes`, actors of `LaneServer` classes on the
        driver's node: `allow_lanes`)."""
        self._lanes: list | None = None
        remote_cls = ray.remote(cls)
        self._actors = [self._start(remote_cls, slot, args, kwargs or {}) for slot in self.slots]
        if issubclass(cls, RankedWorker):
            addr, port = ray.get(self._actors[0].master_address.remote())
            ray.get([a.init_distributed.remote(addr, port, r, world_size) for r, a in enumerate(self._actors)])

    def _start(self, remote_cls, slot: Slot, args: Sequence[Any], kwargs: dict[str, Any]):
        options: dict[str, Any] = dict(
            num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_restarts=self.max_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=slot.bundle,
                placement_group_capture_child_tasks=slot.capture_child_tasks))
        if slot.env_vars:  # merged into the job's env_vars by Ray
            options["runtime_env"] = {"env_vars": dict(slot.env_vars)}
        return remote_cls.options(**options).remote(*args, **kwargs)

    @property
    def actors(self) -> list[Any]:
        """The ranks' Ray handles. Open lanes are closed first: an actor serving a lane runs no
        Ray call until its lane closes (`workers/lane.py`)."""
        self.close_lanes()
        return self._actors

    def allow_lanes(self, enabled: bool = True) -> bool:
        """Let `lanes` open lanes when `enabled` and every rank runs on the driver's node; returns
        whether it may."""
        here = ray.get_runtime_context().get_node_id()
        self.lanes_allowed = enabled and all(node == here for node in self.node_ids())
        return self.lanes_allowed

    def lanes(self) -> list[Any] | None:
        """One open lane per rank (opened on first use, kept until a Ray call needs the actors);
        None when this group does not use lanes."""
        if not self.lanes_allowed:
            return None
        if self._lanes is not None and any(lane.broken for lane in self._lanes):
            self.close_lanes()
        if self._lanes is None:
            from workers.lane import open_lanes

            self._lanes = open_lanes(self._actors, self.name)
        return self._lanes

    def close_lanes(self, timeout_s: float = 60.0) -> None:
        """Give every rank back to Ray's queue (each finishes the lane calls it has first)."""
        lanes, self._lanes = self._lanes, None
        for lane in lanes or ():
            lane.close(timeout_s)

    def node_ids(self) -> list[str]:
        """The Ray node each rank runs on (from its bundle)."""
        nodes = bundle_nodes(self.pg)
        return [nodes[slot.bundle] for slot in self.slots]

    def call(self, fn: Callable[[Any, int], Any]) -> list[Any]:
        """Run `fn(actor, rank)` (which returns an ObjectRef) on every rank and wait for all results."""
        return ray.get([fn(a, r) for r, a in enumerate(self.actors)])

    def call_async(self, fn: Callable[[Any, int], Any]) -> list[Any]:
        return [fn(a, r) for r, a in enumerate(self.actors)]

    def shutdown(self) -> None:
        self.close_lanes(timeout_s=5.0)
        for a in self._actors:
            ray.kill(a)
        if self._owns_pg:
            remove_placement_group(self.pg)


# --------------------------------------------------------------------------------------------------
# Every node: run a function there, compare the code it imports
# --------------------------------------------------------------------------------------------------


def run_on_nodes(fn: Callable[..., Any], node_ids: Sequence[str], *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """`fn(*args)` once on each node (a zero-CPU task pinned there), results in order."""
    task = ray.remote(num_cpus=0)(fn)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(*args)
            for n in node_ids]
    return ray.get(refs, timeout=timeout_s)


def probe_shared_folder(probe: str, token: str) -> str:
    """Run on a node: "" when it reads `token` from file `probe` (and leaves `probe`-<node id> next to it
    for the driver to see), else why not."""
    try:
        with open(probe) as f:
            seen = f.read()
    except OSError as e:
        return f"cannot read {probe} ({e.strerror})"
    if seen != token:
        return f"reads another {probe} than the driver wrote"
    node = ray.get_runtime_context().get_node_id()
    try:
        with open(f"{probe}-{node}", "w") as f:
            f.write(token)
    except OSError as e:
        return f"cannot write next to {probe} ({e.strerror})"
    return ""


def code_fingerprint() -> tuple[str, str]:
    """(prime's version, sha256 of the .py files of prime/, workers/ and launch/ as this process imports them)."""
    import prime

    digest = hashlib.sha256()
    for folder in code_dirs():
        base = os.path.dirname(folder)
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, base).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return prime.__version__, digest.hexdigest()[:12]


def code_mismatches(driver: tuple[str, str], reports: Sequence[tuple[str, str, tuple[str, str]]]) -> list[str]:
    """One phrase per node whose (version, fingerprint) differs from the driver's; reports are (id, ip, pair)."""
    return [f"node {node_id[:8]} ({ip}) runs prime {v} with code {fp}" for node_id, ip, (v, fp) in reports
            if (v, fp) != driver]


def check_same_code(nodes: Sequence[NodeInfo] | None = None) -> None:
    """Every live node imports the same prime code as the driver; PlacementError names those that do not."""
    nodes = list(cluster_nodes() if nodes is None else nodes)
    reports = run_on_nodes(code_fingerprint, [n.node_id for n in nodes])
    driver = code_fingerprint()
    bad = code_mismatches(driver, [(n.node_id, n.ip, r) for n, r in zip(nodes, reports)])
    if bad:
        raise PlacementError(
            f"{'; '.join(bad)}, but the driver runs prime {driver[0]} with code {driver[1]}: install the same "
            f"checkout on every node, or set cluster.ship_code=true to send this one with the job")


def shard_groups(num_items: int, group_size: int, world_size: int) -> list[list[int]]:
    """Split item indices 0..num_items-1 into `world_size` contiguous shards of whole groups.

    Items are laid out group after group (K consecutive responses per prompt). Shards differ by at
    most one group; a rank may get an empty shard only when there are fewer groups than ranks.
    """
    if num_items % group_size:
        raise ValueError(f"{num_items} items do not split into groups of {group_size}")
    groups = num_items // group_size
    base, extra = divmod(groups, world_size)
    out, start = [], 0
    for r in range(world_size):
        g = base + (1 if r < extra else 0)
        out.append(list(range(start * group_size, (start + g) * group_size)))
        start += g
    return out
