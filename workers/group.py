"""The one place that owns Ray start-up, placement groups, ranks, MASTER_ADDR and torch.distributed.

Every role (rollout, policy, PRM, reference, verifier) is a plain class wrapped by `ray.remote` here;
a role that trains across data-parallel ranks inherits `RankedWorker` so this module can give each
rank its address, port, rank and world size before the role builds its DeepSpeed engine.

Placement:
    split      each role gets its own placement group (rollout GPUs separate from training GPUs).
    colocated  all roles share one placement group of `world` bundles; each actor takes a fraction of
               its bundle's GPU, so the i-th rank of every role lands on the same device.
On CPU both reduce to "everything on this node"; CPU counts are logical and the loop's stages run one
after another, so actors may outnumber cores.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def init_ray(address: str = "local", num_cpus: int = 0, env_vars: dict[str, str] | None = None) -> None:
    """Start a local Ray instance bound to loopback, or join the cluster at `address`.

    `env_vars` reach every actor of the job (Ray's job-level runtime environment).
    """
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(env_vars or {})}
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
        ray.init(
            address="local",  # a new instance even when another one on this machine is recorded as current
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=False,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env)


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


class ActorGroup:
    """`world_size` Ray actors of one role class, placed together, ranked 0..world_size-1."""

    def __init__(
        self,
        cls: type,
        world_size: int,
        *,
        name: str,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        shared_pg: PlacementGroup | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        max_restarts: int = 0,
    ) -> None:
        """`max_restarts`: times Ray restarts an actor of the group that dies (its constructor runs
        again with the same arguments); calls in flight when it died fail and are not retried by Ray."""
        if world_size < 1:
            raise ValueError(f"{name}: world_size must be >= 1, got {world_size}")
        self.name, self.world_size = name, world_size
        self._owns_pg = shared_pg is None
        if shared_pg is None:
            bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {})
            self.pg = placement_group([bundle] * world_size, strategy="PACK", name=f"prime-{name}")
            ray.get(self.pg.ready())
        else:
            self.pg = shared_pg
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                name=None,
                max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*args, **(kwargs or {}))
            for i in range(world_size)
        ]
        if issubclass(cls, RankedWorker):
            addr, port = ray.get(self.actors[0].master_address.remote())
            ray.get([a.init_distributed.remote(addr, port, r, world_size) for r, a in enumerate(self.actors)])

    def call(self, fn: Callable[[Any, int], Any]) -> list[Any]:
        """Run `fn(actor, rank)` (which returns an ObjectRef) on every rank and wait for all results."""
        return ray.get([fn(a, r) for r, a in enumerate(self.actors)])

    def call_async(self, fn: Callable[[Any, int], Any]) -> list[Any]:
        return [fn(a, r) for r, a in enumerate(self.actors)]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        if self._owns_pg:
            remove_placement_group(self.pg)


def shared_placement_group(bundles: int, num_cpus: float, num_gpus: float) -> PlacementGroup:
    """One bundle per device for colocated placement (every role's rank i uses bundle i)."""
    bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {})
    pg = placement_group([bundle] * bundles, strategy="PACK", name="prime-colocated")
    ray.get(pg.ready())
    return pg


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
