"""Where every actor of a job goes, from the config alone: nodes, GPUs, placement-group bundles, TP groups.

A pure function of the config (no Ray): `prime plan` prints it, `launch/roles.py` hands it to
`workers.group`, which maps node index n to a real Ray node and pins each bundle there.

The cluster is `cluster.nodes` nodes of `cluster.gpus_per_node` devices (GPUs; with trainer.device=cpu,
device slots that are bundles of CPUs only, placed the same way so a CPU run exercises the same layout).

split      every role has devices of its own and one placement group. Roles are placed in the order
           rollout, policy, PRM, reference; each unit (an engine's tensor-parallel group, or one
           data-parallel rank) goes to the node with the fewest units of its role so far (then the
           most free devices, then the lowest index), so ranks spread evenly over the nodes; a role's
           ranks are then numbered node by node.
colocated  one placement group of D one-device bundles shared by every role, D the largest of the
           policy, PRM and reference world sizes and num_engines * tensor_parallel_size. The D devices
           fill the nodes evenly in order; rank i of a role with w ranks sits on device i * D // w (so
           ranks of equal world sizes share devices and smaller roles spread too), engine e on the t
           consecutive devices from e * D // E. Each actor takes an equal share of its device's GPU.

A vLLM engine with tensor_parallel_size t > 1 gets t one-GPU bundles (vLLM's Ray executor refuses a
bundle of more than one GPU): its actor sits on the first with no GPU of its own, captures the
placement group for its child tasks, and vLLM's Ray executor starts one worker per bundle, told
which bundles by VLLM_RAY_BUNDLE_INDICES and how much of each GPU by VLLM_RAY_PER_WORKER_GPUS.
The verifier pool needs CPUs only and gets a placement group of its own on any node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prime.algo import uses_process_rewards
from prime.config import Config


class PlanError(ValueError):
    """The job cannot be placed on the configured cluster or does not fit its GPUs; one sentence says why."""


@dataclass(frozen=True)
class ActorPlace:
    """One actor: its node, its devices there, its bundles, and what it takes from them."""

    role: str
    rank: int
    node: int | None
    """None: any node (CPU-only actors)."""
    devices: tuple[int, ...]
    """Device indices on the node: one, or an engine's tensor-parallel group; empty for CPU-only actors."""
    group: str
    """Name of its placement group."""
    bundles: tuple[int, ...]
    """Its bundles in that group (the actor sits on the first)."""
    num_cpus: float
    num_gpus: float
    """GPU the actor itself takes from its bundle."""
    worker_gpus: float = 0.0
    """GPU each of vLLM's tensor-parallel workers takes from its bundle (engines with TP > 1)."""
    env_vars: dict[str, str] = field(default_factory=dict)

    @property
    def captures_children(self) -> bool:
        return len(self.devices) > 1


@dataclass(frozen=True)
class GroupSpec:
    """One placement group: a resource dict per bundle and the node index of each (None: any node)."""

    name: str
    bundles: tuple[dict[str, float], ...]
    nodes: tuple[int | None, ...]


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    gpu: bool
    placement: str
    groups: dict[str, GroupSpec]
    actors: dict[str, list[ActorPlace]]

    def devices_used(self) -> list[tuple[int, int]]:
        """Every (node, device) that hosts an actor, sorted."""
        return sorted({(a.node, d) for acts in self.actors.values() for a in acts for d in a.devices})

    def node_needs(self) -> list[dict[str, float]]:
        """Resources the pinned bundles need on each node (CPU, GPU)."""
        needs = [{"CPU": 0.0, "GPU": 0.0} for _ in range(self.nodes)]
        for spec in self.groups.values():
            for bundle, node in zip(spec.bundles, spec.nodes):
                if node is not None:
                    for key in ("CPU", "GPU"):
                        needs[node][key] += bundle.get(key, 0.0)
        return needs


def roles_of(cfg: Config) -> dict[str, int]:
    """The device-holding roles of the job and their world sizes (engines count as units)."""
    roles = {"rollout": cfg.rollout.num_engines, "policy": cfg.cluster.policy_world_size}
    if uses_process_rewards(cfg.algo.name, cfg.algo.process_coef):
        roles["prm"] = cfg.cluster.prm_world_size
    if cfg.algo.kl_coef > 0.0:
        roles["reference"] = cfg.cluster.policy_world_size
    return roles


def _bundle(cpus: float, gpu: bool) -> dict[str, float]:
    """One bundle's resources (Ray rejects zero amounts, so a TP worker's bundle holds only its GPU)."""
    return ({"CPU": cpus} if cpus else {}) | ({"GPU": 1.0} if gpu else {})


def _engine_place(rank: int, node: int, devices: list[int], group: str, bundles: list[int], cpus: float,
                  gpu_share: float) -> ActorPlace:
    """An engine: one device in-process, or a TP group run by vLLM's Ray executor (module docstring)."""
    if len(devices) == 1:
        return ActorPlace("rollout", rank, node, tuple(devices), group, tuple(bundles), cpus, gpu_share)
    env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles)), "VLLM_RAY_PER_WORKER_GPUS": f"{gpu_share:g}"}
    return ActorPlace("rollout", rank, node, tuple(devices), group, tuple(bundles), cpus, 0.0,
                      worker_gpus=gpu_share, env_vars=env)


def _free_devices_text(free: list[list[int]]) -> str:
    return ", ".join(f"node {n}: {len(f)}" for n, f in enumerate(free))


def _split_units(role: str, count: int, size: int, free: list[list[int]], cfg: Config) -> list[tuple[int, list[int]]]:
    """(node, devices) of each of `count` units of `size` devices, spread evenly (module docstring)."""
    per_node = [0] * len(free)
    units = []
    for unit in range(count):
        fits = [n for n in range(len(free)) if len(free[n]) >= size]
        if not fits:
            what = "engine" if role == "rollout" else "rank"
            raise PlanError(
                f"split placement cannot place {role} {what} {unit} ({size} device{'s' * (size > 1)} on one node): "
                f"free devices left are {_free_devices_text(free)} of cluster.nodes={cfg.cluster.nodes} x "
                f"cluster.gpus_per_node={cfg.cluster.gpus_per_node}; add nodes, lower the world sizes or use "
                f"cluster.placement=colocated")
        node = min(fits, key=lambda n: (per_node[n], -len(free[n]), n))
        devices, free[node] = free[node][:size], free[node][size:]
        per_node[node] += 1
        units.append((node, devices))
    return sorted(units)


def _split(cfg: Config, roles: dict[str, int], gpu: bool) -> tuple[dict[str, GroupSpec], dict[str, list[ActorPlace]]]:
    cpus, tp = cfg.cluster.cpus_per_actor, cfg.rollout.tensor_parallel_size
    free = [list(range(cfg.cluster.gpus_per_node)) for _ in range(cfg.cluster.nodes)]
    groups, actors = {}, {}
    for role, count in roles.items():
        size = tp if role == "rollout" else 1
        units = _split_units(role, count, size, free, cfg)
        name = f"prime-{role}"
        bundles, nodes, places = [], [], []
        for rank, (node, devices) in enumerate(units):
            first = len(bundles)
            # The actor's CPUs sit in its first bundle; vLLM's TP workers take no CPU of their own.
            bundles += [_bundle(cpus, gpu)] + [_bundle(0.0, gpu) for _ in devices[1:]]
            nodes += [node] * len(devices)
            ids = list(range(first, first + len(devices)))
            if role == "rollout":
                places.append(_engine_place(rank, node, devices, name, ids, cpus, 1.0 if gpu else 0.0))
            else:
                places.append(ActorPlace(role, rank, node, tuple(devices), name, tuple(ids), cpus,
                                         1.0 if gpu else 0.0))
        groups[role] = GroupSpec(name, tuple(bundles), tuple(nodes))
        actors[role] = places
    return groups, actors


def _colocated_devices(cfg: Config, total: int) -> list[tuple[int, int]]:
    """(node, device) of each of the `total` shared devices, filling the nodes evenly in order."""
    nodes, per = cfg.cluster.nodes, cfg.cluster.gpus_per_node
    if total > nodes * per:
        raise PlanError(
            f"colocated placement needs {total} GPUs (the largest of the world sizes and rollout.num_engines x "
            f"rollout.tensor_parallel_size), but the cluster has cluster.nodes={nodes} x cluster.gpus_per_node={per} "
            f"= {nodes * per}")
    out = []
    for node in range(nodes):
        count = total // nodes + (1 if node < total % nodes else 0)
        out += [(node, d) for d in range(count)]
    return out


def _colocated(cfg: Config, roles: dict[str, int], gpu: bool) -> tuple[dict[str, GroupSpec], dict[str, list[ActorPlace]]]:
    cpus, tp = cfg.cluster.cpus_per_actor, cfg.rollout.tensor_parallel_size
    total = max(max(w for r, w in roles.items() if r != "rollout"), roles["rollout"] * tp)
    devices = _colocated_devices(cfg, total)
    # Equal shares keep Ray's accounting within one GPU, whatever set of roles a device holds.
    share = round(1.0 / len(roles) - 0.005, 2) if gpu else 0.0
    name = "prime-colocated"
    spec = GroupSpec(name, tuple(_bundle(len(roles) * cpus, gpu) for _ in devices), tuple(n for n, _ in devices))
    actors: dict[str, list[ActorPlace]] = {}
    for role, count in roles.items():
        places = []
        for rank in range(count):
            if role == "rollout":
                first = rank * total // count
                ids = list(range(first, first + tp))
                if len({devices[i][0] for i in ids}) > 1:
                    raise PlanError(
                        f"colocated placement puts rollout engine {rank} on shared devices {first}-{first + tp - 1}, "
                        f"which span two nodes; make rollout.num_engines x rollout.tensor_parallel_size fill whole "
                        f"nodes of cluster.gpus_per_node={cfg.cluster.gpus_per_node}")
                places.append(_engine_place(rank, devices[first][0], [devices[i][1] for i in ids], name, ids, cpus,
                                            share))
            else:
                index = rank * total // count
                node, device = devices[index]
                places.append(ActorPlace(role, rank, node, (device,), name, (index,), cpus, share))
        actors[role] = places
    return {"colocated": spec}, actors


def plan_layout(cfg: Config) -> Layout:
    """The layout of `cfg`'s actors on its cluster shape; raises PlanError when they cannot be placed."""
    gpu = cfg.trainer.device == "cuda"
    roles = roles_of(cfg)
    if cfg.cluster.placement == "colocated":
        groups, actors = _colocated(cfg, roles, gpu)
    else:
        groups, actors = _split(cfg, roles, gpu)
    cpus, n = cfg.cluster.cpus_per_actor, cfg.verifier.num_actors
    groups["verifier"] = GroupSpec("prime-verifier", tuple({"CPU": cpus} for _ in range(n)), (None,) * n)
    actors["verifier"] = [ActorPlace("verifier", i, None, (), "prime-verifier", (i,), cpus, 0.0) for i in range(n)]
    return Layout(cfg.cluster.nodes, cfg.cluster.gpus_per_node, gpu, cfg.cluster.placement, groups, actors)
