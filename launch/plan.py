"""`prime plan CONFIG [overrides]`: where every actor goes and what each GPU holds, before anything starts.

    prime plan configs/prime_7b.yaml cluster.nodes=2 cluster.policy_world_size=16

The layout comes from `launch/placement.py`, the memory arithmetic from `prime/models/memory.py`.
Per GPU the plan adds what its actors hold in the two phases of a step:

    generate  the engines' share of the GPU (weights + KV cache) and every trainer's resident states;
    train     the resident states, plus the largest working set among the trainers on the GPU (one
              micro-batch's activations, and at ZeRO-3 the whole parameters being computed with): the
              stages run one after another and each training call returns its cached blocks when it
              ends; the engines hold nothing when `rollout.enable_sleep_mode` is on, their share otherwise.

Each process on a GPU also costs `CUDA_CONTEXT_BYTES`. `prime train` runs `check_plan` before it asks
Ray for anything; the plan fails with one sentence when the layout cannot be placed or a GPU's peak
exceeds `cluster.gpu_memory_gib` (checked for trainer.device=cuda only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch.placement import Layout, PlanError, plan_layout
from prime.config import Config, ModelShapeConfig
from prime.models.memory import (
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    GIB,
    Memory,
    ModelShape,
    activation_bytes,
    engine_memory,
    reference_bytes,
    resolve_shape,
    training_states,
)


@dataclass
class DeviceMemory:
    """What one GPU holds: `resident` in both phases, the largest trainer `working` set while training,
    the engines' `engine` share while generating (and while training unless they sleep)."""

    node: int
    device: int
    actors: list[str] = field(default_factory=list)
    resident: Memory = field(default_factory=Memory)
    working: Memory = field(default_factory=Memory)
    engine: Memory = field(default_factory=Memory)
    processes: int = 0
    engines_sleep: bool = False
    context_bytes: float = CUDA_CONTEXT_BYTES
    """Per process on the device (0 for CPU device slots)."""

    def phase(self, name: str) -> Memory:
        """The memory by kind in phase `name` ("generate" or "train"), without the process overhead."""
        if name == "generate":
            return self.resident + self.engine
        return self.resident + self.working + (Memory() if self.engines_sleep else self.engine)

    @property
    def other(self) -> float:
        return self.processes * self.context_bytes

    @property
    def peak(self) -> tuple[str, float]:
        """(phase, bytes) of the larger phase."""
        return max((("generate", self.phase("generate").total + self.other),
                    ("train", self.phase("train").total + self.other)), key=lambda p: p[1])


@dataclass
class Shapes:
    policy: ModelShape
    policy_source: str
    prm: ModelShape
    prm_source: str


@dataclass
class Plan:
    cfg: Config
    layout: Layout
    shapes: Shapes | None
    devices: list[DeviceMemory]
    note: str = ""


def _given_shape(shape: ModelShapeConfig) -> ModelShape | None:
    if not shape.hidden_size:
        return None
    return ModelShape(hidden_size=shape.hidden_size, num_layers=shape.num_layers, num_heads=shape.num_heads,
                      num_kv_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
                      vocab_size=shape.vocab_size, tie_word_embeddings=shape.tie_word_embeddings)


def resolve_shapes(cfg: Config, download: bool = False) -> Shapes:
    """Shapes of the policy and the PRM: model.shape, the locally built model's preset, or the checkpoint."""
    from prime.models.memory import shape_from_hf_config
    from prime.models.tiny import preset_hf_config

    given = _given_shape(cfg.model.shape)
    if given is not None:
        policy, source = given, "model.shape"
    elif not cfg.model.path:
        preset = f"model.tiny_preset={cfg.model.tiny_preset}"
        policy, source = shape_from_hf_config(preset_hf_config(cfg.model.tiny_preset), preset), preset
    else:
        policy, source = resolve_shape(cfg.model.path, "model.path", download)
    if not cfg.prm.model_path or cfg.prm.model_path == cfg.model.path:
        return Shapes(policy, source, policy, source)
    prm, prm_source = resolve_shape(cfg.prm.model_path, "prm.model_path", download)
    return Shapes(policy, source, prm, prm_source)


def _tokens(cfg: Config, budget: int) -> int:
    """Tokens of the largest micro-batch: the budget, or one longest row when that is larger."""
    return max(budget, cfg.data.max_prompt_len + cfg.rollout.max_response_len)


def _role_memory(cfg: Config, role: str, shapes: Shapes) -> tuple[Memory, Memory]:
    """(resident, working) memory of one rank of a training or reference role on its GPU."""
    dtype = cfg.model.dtype
    ckpt = cfg.model.gradient_checkpointing or (role == "prm" and cfg.prm.gradient_checkpointing)
    if role == "reference":
        tokens = _tokens(cfg, cfg.actor.max_tokens_per_micro_batch)
        acts = activation_bytes(shapes.policy, tokens, dtype=dtype, checkpointing=False, training=False)
        return Memory(weights=DTYPE_BYTES[dtype] * shapes.policy.num_params()), Memory(activations=acts)
    section, shape = (cfg.actor, shapes.policy) if role == "policy" else (cfg.prm, shapes.prm)
    ranks = cfg.cluster.policy_world_size if role == "policy" else cfg.cluster.prm_world_size
    states = training_states(shape.num_params(), dtype=dtype, zero_stage=section.zero_stage, ranks=ranks,
                             offload_params=section.offload_params, offload_optimizer=section.offload_optimizer)
    acts = activation_bytes(shape, _tokens(cfg, section.max_tokens_per_micro_batch), dtype=dtype,
                            checkpointing=ckpt)
    resident = states.resident
    if role == "prm" and cfg.prm.ref == "frozen":  # the frozen reference, as prm.ref_placement puts it
        ref = reference_bytes(shape.num_params(), dtype=dtype, placement=cfg.prm.ref_placement, ranks=ranks)
        resident = resident + Memory(weights=ref)
    return resident, Memory(weights=states.gathered, activations=acts)


def _engine(cfg: Config, shape: ModelShape, tensor_parallel: int, gpu_bytes: float) -> Memory:
    """One GPU of an engine: vLLM takes its share of the GPU; HF `generate` holds the weights and a KV cache
    that grows with the batch (not estimated)."""
    weights = DTYPE_BYTES[cfg.model.dtype] * shape.num_params()
    if cfg.rollout.engine == "hf":
        return Memory(weights=weights)
    if cfg.trainer.device == "cpu":  # the CPU backend sizes its KV cache in GiB
        # In process, the linear layers keep their plain weights beside vLLM's packed kernels
        # (prime/rollout/vllm_ext.py): two copies of every matrix (vLLM keeps the embedding's anyway).
        copies = 2 if cfg.rollout.cpu_in_process and cfg.rollout.tensor_parallel_size == 1 else 1
        return Memory(weights=copies * weights, kv_cache=cfg.rollout.cpu_kv_cache_gib * GIB)
    return engine_memory(shape, dtype=cfg.model.dtype, tensor_parallel=tensor_parallel,
                         gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, gpu_bytes=gpu_bytes)


def device_memory(cfg: Config, layout: Layout, shapes: Shapes) -> list[DeviceMemory]:
    """The memory of every GPU that hosts an actor, by phase."""
    gpu_bytes = cfg.cluster.gpu_memory_gib * GIB
    sleeps = cfg.rollout.enable_sleep_mode and cfg.rollout.engine == "vllm"  # the HF engine never sleeps
    context = CUDA_CONTEXT_BYTES if layout.gpu else 0.0
    devices = {key: DeviceMemory(*key, engines_sleep=sleeps, context_bytes=context) for key in layout.devices_used()}
    roles = {role: _role_memory(cfg, role, shapes) for role in layout.actors if role not in ("rollout", "verifier")}
    for role, places in layout.actors.items():
        for place in places:
            for device in place.devices:
                d = devices[(place.node, device)]
                d.actors.append(f"{role}{place.rank}")
                d.processes += 1
                if role == "rollout":
                    d.engine = d.engine + _engine(cfg, shapes.policy, len(place.devices), gpu_bytes)
                    continue
                resident, working = roles[role]
                d.resident = d.resident + resident
                if working.total > d.working.total:
                    d.working = working
    return [devices[key] for key in sorted(devices)]


def _check_engines(cfg: Config, shapes: Shapes) -> None:
    """An engine's share of its GPU must hold its weights and the KV cache of one full-length sequence."""
    r = cfg.rollout
    if r.engine != "vllm":
        return
    mem = engine_memory(shapes.policy, dtype=cfg.model.dtype, tensor_parallel=r.tensor_parallel_size,
                        gpu_memory_utilization=r.gpu_memory_utilization, gpu_bytes=cfg.cluster.gpu_memory_gib * GIB)
    share = r.gpu_memory_utilization * cfg.cluster.gpu_memory_gib
    if mem.kv_cache <= 0:
        raise PlanError(
            f"rollout.gpu_memory_utilization={r.gpu_memory_utilization:g} gives each engine GPU {share:.1f} GiB of "
            f"cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g}, not more than its {mem.weights / GIB:.1f} GiB of "
            f"weights (rollout.tensor_parallel_size={r.tensor_parallel_size}); raise it or the tensor-parallel size")
    seq = cfg.data.max_prompt_len + r.max_response_len
    tokens = int(mem.kv_cache // shapes.policy.kv_bytes_per_token(cfg.model.dtype, r.tensor_parallel_size))
    if tokens < seq:
        raise PlanError(
            f"each engine's KV cache ({mem.kv_cache / GIB:.2f} GiB) holds {tokens} tokens, fewer than one sequence of "
            f"data.max_prompt_len + rollout.max_response_len = {seq}; raise rollout.gpu_memory_utilization")


def _check_devices(cfg: Config, devices: list[DeviceMemory]) -> None:
    limit = cfg.cluster.gpu_memory_gib * GIB
    worst = max(devices, key=lambda d: d.peak[1], default=None)
    if worst is None or worst.peak[1] <= limit:
        return
    phase, peak = worst.peak
    mem = worst.phase(phase)
    parts = ", ".join(f"{name} {getattr(mem, name) / GIB:.1f}" for name in
                      ("weights", "gradients", "optimizer", "activations", "kv_cache") if getattr(mem, name))
    raise PlanError(
        f"node {worst.node} GPU {worst.device} ({' '.join(worst.actors)}) would need {peak / GIB:.1f} GiB while it "
        f"{'generates' if phase == 'generate' else 'trains'} ({parts}, {worst.other / GIB:.1f} GiB per-process "
        f"overhead) but cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g}; turn on model.gradient_checkpointing, "
        f"lower the max_tokens_per_micro_batch budgets or rollout.gpu_memory_utilization, offload "
        f"(actor/prm.offload_params, offload_optimizer), shard the PRM reference (prm.ref_placement=sharded or "
        f"offload), or spread the job over more GPUs")


def make_plan(cfg: Config, download: bool = False) -> Plan:
    """The layout and, where the model shapes are known, the memory of every GPU; raises PlanError when
    the layout cannot be placed or (trainer.device=cuda) a GPU does not fit."""
    layout = plan_layout(cfg)
    try:
        shapes = resolve_shapes(cfg, download)
    except ValueError as e:
        if layout.gpu:
            raise PlanError(str(e)) from None
        return Plan(cfg, layout, None, [], note=f"no memory estimate: {e}")
    devices = device_memory(cfg, layout, shapes)
    if layout.gpu:
        _check_engines(cfg, shapes)
        _check_devices(cfg, devices)
        return Plan(cfg, layout, shapes, devices)
    return Plan(cfg, layout, shapes, devices,
                note="trainer.device=cpu: the estimate is of host memory and is not checked against cluster.gpu_memory_gib")


def check_plan(cfg: Config) -> Plan:
    """What `prime train` runs before it starts Ray (reads the model's config.json from the hub if need be)."""
    return make_plan(cfg, download=True)


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def _resources(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _runs(items: list) -> list[tuple[object, int, int]]:
    """(item, first index, last index) of each run of equal consecutive items."""
    out: list[tuple[object, int, int]] = []
    for i, item in enumerate(items):
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1], i)
        else:
            out.append((item, i, i))
    return out


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _group_lines(layout: Layout) -> list[str]:
    lines = ["placement groups (bundle -> node; Ray pins each bundle to its node)"]
    for spec in layout.groups.values():
        kinds = [(_resources(b), "any node" if n is None else f"node {n}") for b, n in zip(spec.bundles, spec.nodes)]
        runs = "; ".join(f"bundle{'s' * (b > a)} {_span(a, b)}: {b - a + 1} x {res} on {node}"
                         for (res, node), a, b in _runs(kinds))
        lines.append(f"  {spec.name:<16} {runs}")
    return lines


def _actor_text(place, device: int, word: str) -> str:
    label = f"{place.role} {'engine' if place.role == 'rollout' else 'rank'} {place.rank}"
    if len(place.devices) > 1:
        i = place.devices.index(device)
        group = ",".join(map(str, place.devices))
        actor = f", the engine actor ({place.num_cpus:g} CPU)" if i == 0 else ""
        return (f"{label} TP worker {i} of {word}s {group} ({place.group} bundle {place.bundles[i]}, "
                f"{place.worker_gpus:g} {word}{actor})")
    gpu = f", {place.num_gpus:g} GPU" if word == "GPU" else ""
    return f"{label} ({place.group} bundle {place.bundles[0]}, {place.num_cpus:g} CPU{gpu})"


def _actor_lines(layout: Layout) -> list[str]:
    word = "GPU" if layout.gpu else "slot"
    lines = [f"actors by node and {word}"]
    for node in range(layout.nodes):
        on_node = [d for n, d in layout.devices_used() if n == node]
        lines.append(f"  node {node}: {len(on_node)} of {layout.gpus_per_node} {word}s used")
        for device in on_node:
            texts = [_actor_text(p, device, word) for acts in layout.actors.values() for p in acts
                     if p.node == node and device in p.devices]
            lines.append(f"    {word} {device}: " + "; ".join(texts))
    free = [p for acts in layout.actors.values() for p in acts if p.node is None]
    for role in sorted({p.role for p in free}):
        ranks = [p for p in free if p.role == role]
        bundles = _span(ranks[0].bundles[0], ranks[-1].bundles[0])
        lines.append(f"  any node: {role} {_span(0, len(ranks) - 1)} ({ranks[0].group} bundle{'s' * (len(ranks) > 1)} "
                     f"{bundles}, {ranks[0].num_cpus:g} CPU each)")
    return lines


def _memory_lines(plan: Plan) -> list[str]:
    word = "GPU" if plan.layout.gpu else "slot"
    limit = f" / {plan.cfg.cluster.gpu_memory_gib:g}" if plan.layout.gpu else ""
    lines = [f"memory per {word}, GiB (estimate, prime/models/memory.py; the larger of the generate and train phases)",
             f"  node {word:<4} {'actors':<28} weights  grads  optim  activ  kv_cache  other  phase     peak{limit}"]
    for d in plan.devices:
        phase, peak = d.peak
        m = d.phase(phase)
        values = [m.weights, m.gradients, m.optimizer, m.activations, m.kv_cache, d.other]
        cells = "".join(f"{v / GIB:>{w}.2f}" for v, w in zip(values, (7, 7, 7, 7, 10, 7)))
        lines.append(f"  {d.node:<4} {d.device:<4} {' '.join(d.actors):<28} {cells}  {phase:<8} {peak / GIB:>6.2f}")
    return lines


def _summary(plan: Plan) -> str:
    worst = max(plan.devices, key=lambda d: d.peak[1])
    phase, peak = worst.peak
    other = "train" if phase == "generate" else "generate"
    other_total = worst.phase(other).total + worst.other
    return (f"fits: the fullest GPU (node {worst.node} GPU {worst.device}) peaks at {peak / GIB:.1f} of "
            f"{plan.cfg.cluster.gpu_memory_gib:g} GiB while it {'generates' if phase == 'generate' else 'trains'} "
            f"({other_total / GIB:.1f} GiB in the {other} phase)")


def _engine_line(plan: Plan) -> str:
    """How many tokens each vLLM engine GPU's KV cache holds."""
    cfg, shape = plan.cfg, plan.shapes.policy
    r = cfg.rollout
    mem = engine_memory(shape, dtype=cfg.model.dtype, tensor_parallel=r.tensor_parallel_size,
                        gpu_memory_utilization=r.gpu_memory_utilization, gpu_bytes=cfg.cluster.gpu_memory_gib * GIB)
    per_token = shape.kv_bytes_per_token(cfg.model.dtype, r.tensor_parallel_size)
    tokens, seq = int(mem.kv_cache // per_token), cfg.data.max_prompt_len + r.max_response_len
    return (f"vLLM engines: {r.gpu_memory_utilization:g} of each GPU, {mem.weights / GIB:.2f} GiB of weights and "
            f"{mem.kv_cache / GIB:.2f} GiB of KV cache per GPU ({per_token / 1024:g} KiB per token): {tokens} tokens, "
            f"{tokens // seq} sequences of {seq} tokens at once (before vLLM's own activations and CUDA graphs)")


def format_plan(plan: Plan, source: str) -> str:
    cfg, layout = plan.cfg, plan.layout
    word = "GPU" if layout.gpu else "device slot"
    lines = [f"prime plan: {source}",
             f"cluster: {layout.nodes} node{'s' * (layout.nodes > 1)} x {layout.gpus_per_node} {word}s"
             + (f" x {cfg.cluster.gpu_memory_gib:g} GiB" if layout.gpu else "")
             + f", placement {layout.placement}, trainer.device={cfg.trainer.device}, address {cfg.cluster.address}"]
    if plan.shapes is not None:
        s = plan.shapes
        lines.append(f"policy model: {cfg.model.path or 'built locally'}, {s.policy.describe()} (from {s.policy_source})")
        if s.prm_source != s.policy_source:
            lines.append(f"prm model: {cfg.prm.model_path}, {s.prm.describe()} (from {s.prm_source})")
    lines += [""] + _group_lines(layout) + [""] + _actor_lines(layout)
    if plan.devices:
        lines += [""] + _memory_lines(plan)
    if plan.devices and layout.gpu and cfg.rollout.engine == "vllm":
        lines.append(_engine_line(plan))
    if plan.note:
        lines.append(plan.note)
    elif plan.devices:
        lines.append(_summary(plan))
    return "\n".join(lines) + "\n"
