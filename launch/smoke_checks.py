"""The checks of `launch/gpu_smoke.py`: each returns a one-line detail or raises.

Only torch, transformers and safetensors are needed to import this module; DeepSpeed and vLLM are
imported inside the checks that use them (gpu_smoke.py skips those when they are missing). No Ray:
the streaming weight sync is driven here directly, member by member, with the receiver in a process
of its own (or vLLM's worker process), as the actors do it.
"""

from __future__ import annotations

import math
import threading
import time

import torch

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
RESPONSES = [[20, 21, 22, 23], [24, 25], [26, 27, 28, 29, 30, 31]]
STREAM_BUCKET_BYTES = 64 * 1024  # the tiny model (~2 MiB with lm_head) streams in ~30 buckets


def _batch(pad_id: int = 0):
    from prime.data.batch import pack_sequences

    return pack_sequences(PROMPTS, RESPONSES, pad_id)


def _max_abs(a, b) -> float:
    return float((a - b).abs().max())


def _rows_diff(rows: list[list[float]], logp: torch.Tensor) -> float:
    return max(abs(g - float(logp[i, j])) for i, row in enumerate(rows) for j, g in enumerate(row))


def _vllm_dtype(device: str) -> str:
    # fp32 on the CPU backend; bf16 on GPUs, where every vLLM attention backend supports it.
    return "float32" if device == "cpu" else "bfloat16"


def _engine_tolerance(kind: str, device: str) -> float:
    """How far an engine's log-probs may be from the fp32 trainer's after a sync. fp32 engines run
    the same weights with another summation order (1e-6 measured); a bf16 vLLM engine rounds every
    layer's output to 8 mantissa bits (log-probs of size ~6: a few 1e-2)."""
    return 0.15 if kind == "vllm" and _vllm_dtype(device) == "bfloat16" else 1e-4


class Shared:
    """What several checks reuse: the checkpoint, one ZeRO-3 policy trainer and one vLLM engine."""

    def __init__(self, path: str, device: str) -> None:
        self.path, self.device = path, device
        self._trainer = self._vllm = None
        self._perturbations = 0

    def trainer(self):
        """The ZeRO-3 fp32 policy trainer (built under zero.Init, streamed from the checkpoint)."""
        if self._trainer is None:
            from prime.train.engine import EngineSettings
            from prime.train.losses import PPOClipLoss
            from prime.train.trainer import Trainer

            self._trainer = Trainer(self.path, PPOClipLoss(), EngineSettings(lr=2e-2, zero_stage=3),
                                    mini_batch_size=len(PROMPTS), max_tokens_per_micro_batch=10_000, seed=0)
        return self._trainer

    def perturb(self) -> torch.Tensor:
        """One PPO step with random advantages (so engines fall behind); the new log-probs [B, T]."""
        tr = self.trainer()
        batch = _batch()
        logp = tr.logprobs(batch)  # [B, T]
        self._perturbations += 1
        gen = torch.Generator().manual_seed(self._perturbations)
        adv = torch.randn(logp.shape, generator=gen) * batch.response_mask
        metrics, _ = tr.update(batch.replace(old_logp=logp, advantages=adv))
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise AssertionError(f"non-finite update metrics {bad}")
        return tr.logprobs(batch)

    def vllm(self):
        if self._vllm is None:
            from prime.rollout.vllm import VLLMEngine

            self._vllm = VLLMEngine(self.path, dtype=_vllm_dtype(self.device), max_model_len=256, seed=0,
                                    gpu_memory_utilization=0.25, enforce_eager=True, cpu_kv_cache_gib=0.25,
                                    enable_sleep_mode=self.device == "cuda")
        return self._vllm

    def close(self) -> None:
        if self._vllm is not None:
            self._vllm.shutdown()
            self._vllm = None


# --------------------------------------------------------------------------------------------------
# Single-process numerics
# --------------------------------------------------------------------------------------------------


def check_buckets(device: str) -> str:
    from prime.rollout.weight_transfer import flatten_bucket, plan_buckets, unflatten_bucket, weight_specs

    g = torch.Generator().manual_seed(0)
    named = {
        "w": torch.randn(64, 32, generator=g).to(device),
        "b": torch.randn(32, generator=g).to(device, torch.bfloat16),
        "big": torch.randn(4096, generator=g).to(device),  # 16 KiB > the 8 KiB bucket: its own bucket
        "i": torch.arange(7, device=device),
    }
    buckets = plan_buckets(weight_specs(named), bucket_bytes=8 * 1024)
    out = {}
    for b in buckets:
        flat = flatten_bucket(b, named, device)
        out.update(unflatten_bucket(b, flat.view(torch.uint8).clone().view(b.dtype)))
    bad = [n for n, t in named.items() if not torch.equal(out[n], t) or out[n].device != t.device]
    if bad:
        raise AssertionError(f"round trip changed {bad}")
    return f"{len(buckets)} buckets, exact"


def check_chunked_entropy(device: str) -> str:
    from prime.models.logprobs import token_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 37, 1000, generator=gen) * 3).to(device, torch.bfloat16)  # [B, T, V]
    targets = torch.randint(0, 1000, (2, 37), generator=gen).to(device)  # [B, T]
    mask = torch.ones(2, 37, dtype=torch.bool, device=device)
    logp, ent = token_logprobs(logits, targets, mask, 0.7, return_entropy=True, chunk_tokens=8)
    z = logits.double() / 0.7
    ref_all = torch.log_softmax(z, -1)  # [B, T, V]
    ref_logp = ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    d_logp, d_ent = _max_abs(logp.double(), ref_logp), _max_abs(ent.double(), ref_ent)
    # fp32 chunks against float64 on the same bf16 inputs: values up to ~40, fp32 rounding.
    if d_logp > 1e-4 or d_ent > 1e-4:
        raise AssertionError(f"chunked vs full softmax: logp {d_logp:.1e}, entropy {d_ent:.1e} (limit 1e-4)")
    return f"8-token chunks: |logp diff| {d_logp:.1e}, |entropy diff| {d_ent:.1e}"


def check_generate(path: str, device: str, dtype: str) -> str:
    from prime.data.batch import pack_sequences
    from prime.models.logprobs import response_logprobs
    from prime.rollout.hf import HFEngine

    eng = HFEngine(path, dtype=dtype, device=device, seed=0)
    t0 = time.perf_counter()
    out = eng.generate(PROMPTS, n=4, max_new_tokens=24, temperature=1.0, seed=1)
    gen_s = time.perf_counter() - t0
    comps = [c for group in out for c in group]
    tokens = sum(len(c.token_ids) for c in comps)
    if len(out) != len(PROMPTS) or any(len(g) != 4 for g in out):
        raise AssertionError("wrong number of completions")
    if not all(math.isfinite(x) and x <= 1e-6 for c in comps for x in c.logprobs):
        raise AssertionError("non-finite or positive log-probs")
    # The sampler's log-probs (KV cache, incremental) against one full forward pass of the same tokens.
    batch = pack_sequences([c.prompt_ids for c in comps], [c.token_ids for c in comps], eng.pad_id)
    packed = [getattr(batch, k).to(device) for k in batch.PACKED]
    with torch.no_grad():
        full = response_logprobs(eng.model, *packed).float().cpu()  # [B, T]
    sampled = torch.zeros_like(full)
    for i, c in enumerate(comps):
        sampled[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    diff = float(((full - sampled).abs() * batch.response_mask).max())
    # fp32: cache vs full forward differ only by summation order; bf16 rounds each layer's output.
    tol = 1e-3 if dtype == "float32" else 0.25
    if diff > tol:
        raise AssertionError(f"sampled vs full-forward log-probs differ by {diff:.2e} > {tol}")
    return f"{tokens} tokens, {tokens / gen_s:.0f} tok/s, |sampled - forward| {diff:.1e}"


def check_logprobs_device_vs_cpu(path: str, device: str) -> str:
    from prime.models.loading import load_model, load_tokenizer
    from prime.models.logprobs import response_logprobs

    batch = _batch(load_tokenizer(path).pad_token_id)
    cpu_model = load_model(path, dtype="float32", device="cpu")
    dev_model = load_model(path, dtype="float32", device=device)
    with torch.no_grad():
        packed = [getattr(batch, k) for k in batch.PACKED]
        ref, ref_ent = response_logprobs(cpu_model, *packed, return_entropy=True)  # [B, T]
        got, got_ent = response_logprobs(dev_model, *(t.to(device) for t in packed), return_entropy=True)
    d, de = _max_abs(got.cpu(), ref), _max_abs(got_ent.cpu(), ref_ent)
    if d > 1e-4 or de > 1e-4:  # fp32 without TF32: only summation order differs
        raise AssertionError(f"{device} vs cpu: logp {d:.2e}, entropy {de:.2e} (limit 1e-4)")
    return f"max |logp diff| {d:.1e}, entropy {de:.1e}"


# --------------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------------


def _ppo_batch(trainer, seed: int):
    batch = _batch().replace(group_ids=torch.zeros(len(PROMPTS), dtype=torch.long))
    logp = trainer.logprobs(batch)  # [B, T]
    gen = torch.Generator().manual_seed(seed)
    return batch.replace(old_logp=logp, advantages=torch.randn(logp.shape, generator=gen) * batch.response_mask)


def check_policy(path: str, device: str, bf16: bool) -> str:
    from prime.rollout.hf import HFEngine
    from prime.train.engine import EngineSettings
    from prime.train.losses import PPOClipLoss
    from prime.train.trainer import Trainer

    tr = Trainer(path, PPOClipLoss(), EngineSettings(lr=1e-3, zero_stage=2, bf16=bf16),
                 mini_batch_size=len(PROMPTS), max_tokens_per_micro_batch=10_000, seed=0)
    if tr.device.type != torch.device(device).type:
        raise AssertionError(f"trainer is on {tr.device}, expected {device}")
    before = {n: p.detach().float().cpu().clone() for n, p in tr.engine.module.named_parameters()}
    batch = _ppo_batch(tr, seed=0)
    t0 = time.perf_counter()
    m, _ = tr.update(batch)
    step_s = time.perf_counter() - t0
    bad = [k for k, v in m.items() if not math.isfinite(v)]
    if bad:
        raise AssertionError(f"non-finite metrics {bad}")
    moved = max(_max_abs(p.detach().float().cpu(), before[n]) for n, p in tr.engine.module.named_parameters())
    if moved <= 0:
        raise AssertionError("the update did not change the weights")
    detail = f"update {step_s:.2f}s, loss {m['policy/loss']:.4f}, grad_norm {m['policy/grad_norm']:.3f}"
    if not bf16:
        eng = HFEngine(path, dtype="float32", device=device)
        eng.load_weights(tr.named_weights().items())
        d = _rows_diff(eng.score_logprobs(PROMPTS, RESPONSES), tr.logprobs(batch))
        if d > 1e-4:  # same fp32 weights, same device
            raise AssertionError(f"engine after load_weights differs from the trainer by {d:.2e}")
        detail += f", engine vs trainer after load {d:.1e}"
    return detail


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def check_zero3_policy(shared: Shared) -> str:
    tr = shared.trainer()
    numel = sum(math.prod(shape) for _, shape, _ in tr.weight_specs())
    want = shared.perturb()
    a0 = _allocated()
    moved = tr.offload_states()
    freed = a0 - _allocated()
    got = tr.logprobs(_batch())  # reloads the states first
    if not torch.equal(got, want):
        raise AssertionError(f"log-probs changed across offload/reload by {_max_abs(got, want):.2e}")
    if moved and freed < 8 * numel:  # at least the fp32 weights and their fp32 master copy left the GPU
        raise AssertionError(f"offload freed {freed} bytes of GPU memory, expected >= {8 * numel}")
    shared.perturb()  # the optimizer still steps after the round trip
    detail = f"{numel / 1e6:.2f} M params partitioned"
    return detail + (f", offload freed {freed / 2**20:.1f} MiB and reloaded" if moved else ", offload: no GPU")


def check_prm_zero3(path: str, device: str) -> str:
    from prime.train.engine import EngineSettings
    from prime.train.prm import build_implicit_prm

    placement = "offload" if device == "cuda" else "sharded"
    settings = EngineSettings(lr=1e-3, zero_stage=3, gradient_checkpointing=True)
    prm = build_implicit_prm(path, settings, ref="frozen", ref_placement=placement, beta=0.05,
                             mini_batch_size=len(PROMPTS), max_tokens_per_micro_batch=10_000, seed=0)
    batch = _batch().replace(scores=torch.tensor([1.0, 0.0, 1.0]), group_ids=torch.tensor([0, 0, 0]))
    rewards, m = prm.update_and_rewards(batch, mode="before")  # rewards [B, T]
    bad = [k for k, v in m.items() if not math.isfinite(v)]
    if bad:
        raise AssertionError(f"non-finite metrics {bad}")
    if not torch.isfinite(rewards).all() or float((rewards * (1 - batch.response_mask)).abs().max()) != 0.0:
        raise AssertionError("token rewards are non-finite or non-zero outside the responses")
    if float(rewards.abs().max()) == 0.0:
        raise AssertionError("the updated PRM still equals its reference (all rewards 0)")
    return f"reference {placement}, loss {m['prm/loss']:.4f}, grad_norm {m['prm/grad_norm']:.3f}"


# --------------------------------------------------------------------------------------------------
# Streaming weight sync
# --------------------------------------------------------------------------------------------------


def _open_group(trainer, transport: str, backend: str, buckets, world: int = 2) -> tuple[dict, object, object]:
    """Rank 0's side of a weight-sync group: (spec, store, staging)."""
    from prime.rollout.weight_transfer import SharedStaging, max_bucket_bytes, open_store

    store, port = open_store("127.0.0.1", world, timeout_s=300)
    spec = dict(transport=transport, host="127.0.0.1", port=port, world_size=world, backend=backend, timeout_s=300)
    staging = None
    if transport == "ipc":
        staging = SharedStaging(max_bucket_bytes(buckets), trainer.device)
        spec["handle"] = staging.handle
    return spec, store, staging


def _send(channel, trainer, buckets) -> dict[str, float]:
    """Stream the trainer's weights through `channel`, bucket by bucket, leaving the last gather."""
    source = trainer.weight_buckets(buckets)
    sent = channel.send_stream(buckets, source)
    for _ in source:
        pass
    return sent


def _receiver_main(path: str, device: str, spec: dict, plan: list, queue) -> None:
    """A separate process holding an HF engine: join as rank 1, receive one sync, report its scores."""
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        from prime.rollout.hf import HFEngine

        eng = HFEngine(path, dtype="float32", device=device)
        eng.join_weight_sync(spec, 1, plan, "127.0.0.1")
        stats = eng.receive_weights()
        scores = eng.score_logprobs(PROMPTS, RESPONSES)
        eng.close_weight_sync()
        queue.put({"stats": stats, "scores": scores, "memory": eng.memory()[0]})
    except Exception:  # reported by the parent
        import traceback

        queue.put({"error": traceback.format_exc()})


def check_stream_to_process(shared: Shared, transport: str, backend: str) -> str:
    import multiprocessing as mp

    from prime.rollout.weight_transfer import buckets_to_wire, join_channel, plan_buckets

    tr = shared.trainer()
    want = shared.perturb()
    buckets = plan_buckets(tr.weight_specs(), STREAM_BUCKET_BYTES)
    spec, store, staging = _open_group(tr, transport, backend, buckets)
    receiver_device = "cpu" if shared.device == "cpu" else ("cuda:1" if backend == "nccl" else "cuda:0")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver_main, args=(shared.path, receiver_device, spec, buckets_to_wire(buckets), queue))
    proc.start()
    try:
        channel = join_channel(spec, 0, "127.0.0.1", store=store, staging=staging)
        try:
            sent = _send(channel, tr, buckets)
            result = queue.get(timeout=300)
        finally:
            channel.close()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    if "error" in result:
        raise RuntimeError(result["error"])
    d = _rows_diff(result["scores"], want)
    if d > 1e-4:  # the same fp32 weights on the same kind of device
        raise AssertionError(f"receiver's log-probs differ from the trainer's by {d:.2e} after the sync")
    return (f"{len(buckets)} buckets, {sent['bytes'] / 2**20:.1f} MiB, send {sent['seconds']:.2f}s, "
            f"receiver load {result['stats']['load_seconds']:.2f}s, |receiver - trainer| {d:.1e}")


def _in_threads(*fns) -> list:
    """Run every fn in its own thread; their results, re-raising the first error."""
    out, errors = [None] * len(fns), []

    def call(i: int) -> None:
        try:
            out[i] = fns[i]()
        except Exception as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def stream_into_engine(engine, trainer, transport: str, backend: str = "gloo") -> dict[str, float]:
    """One streaming sync from `trainer` (this process) into `engine`'s own receiving processes."""
    from prime.rollout.weight_transfer import buckets_to_wire, join_channel, plan_buckets

    buckets = plan_buckets(trainer.weight_specs(), STREAM_BUCKET_BYTES)
    spec, store, staging = _open_group(trainer, transport, backend, buckets, world=1 + engine.receivers)
    channel, _ = _in_threads(lambda: join_channel(spec, 0, "127.0.0.1", store=store, staging=staging),
                             lambda: engine.join_weight_sync(spec, 1, buckets_to_wire(buckets), "127.0.0.1"))
    try:
        sent, received = _in_threads(lambda: _send(channel, trainer, buckets), engine.receive_weights)
    finally:
        engine.close_weight_sync()
        channel.close()
    return sent | {"load_seconds": received["load_seconds"], "buckets": float(len(buckets))}


def check_vllm_stream(shared: Shared) -> str:
    engine = shared.vllm()
    want = shared.perturb()
    stale = _rows_diff(engine.score_logprobs(PROMPTS, RESPONSES), want)
    stats = stream_into_engine(engine, shared.trainer(), "broadcast")
    d = _rows_diff(engine.score_logprobs(PROMPTS, RESPONSES), want)
    tol = _engine_tolerance("vllm", shared.device)
    if d > tol or stale < 2 * tol:
        raise AssertionError(f"vLLM vs trainer: {d:.2e} after the sync (limit {tol}), {stale:.2e} before")
    return (f"{stats['buckets']:.0f} buckets into vLLM's worker, {stats['seconds']:.2f}s; "
            f"|vLLM - trainer| {stale:.1e} before, {d:.1e} after")


def check_vllm_sleep_wake(shared: Shared) -> str:
    engine = shared.vllm()
    want = shared.perturb()
    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep(level=2)
    freed = torch.cuda.mem_get_info()[0] - free0
    if freed < 2**30:  # gpu_memory_utilization 0.25 of the GPU: weights and KV cache, many GiB
        raise AssertionError(f"sleep(level=2) freed only {freed / 2**20:.0f} MiB")
    engine.wake_up(["weights"])
    stats = stream_into_engine(engine, shared.trainer(), "ipc")  # colocated: CUDA IPC on one GPU
    engine.wake_up(["kv_cache"])
    d = _rows_diff(engine.score_logprobs(PROMPTS, RESPONSES), want)
    if d > _engine_tolerance("vllm", shared.device):
        raise AssertionError(f"after sleep, wake(weights), sync, wake(kv): vLLM differs from the trainer by {d:.2e}")
    out = engine.generate(PROMPTS[:1], n=2, max_new_tokens=4, seed=0)
    return (f"sleep freed {freed / 2**30:.1f} GiB; ipc sync {stats['seconds']:.2f}s; |vLLM - trainer| {d:.1e}; "
            f"generated {sum(len(c.token_ids) for c in out[0])} tokens")


# --------------------------------------------------------------------------------------------------
# One colocated PRIME step
# --------------------------------------------------------------------------------------------------


def _prime_trainers(path: str):
    from prime.train.engine import EngineSettings
    from prime.train.losses import Regularizers, policy_loss
    from prime.train.prm import build_implicit_prm
    from prime.train.trainer import Trainer

    loss = policy_loss("ppo", reg=Regularizers(entropy_coef=1e-3))  # the entropy bonus: chunked entropy in backward
    policy = Trainer(path, loss, EngineSettings(lr=1e-3, zero_stage=3, gradient_checkpointing=True),
                     mini_batch_size=8, max_tokens_per_micro_batch=4096, seed=0)
    prm = build_implicit_prm(path, EngineSettings(lr=1e-3, zero_stage=3, gradient_checkpointing=True),
                             ref_placement="sharded", beta=0.05, mini_batch_size=8, max_tokens_per_micro_batch=4096)
    return policy, prm


def _rollout(engine, path: str):
    """Two arithmetic prompts x 4 samples, graded by the math verifier; the packed batch."""
    from prime.data.batch import pack_sequences
    from prime.data.synthetic import arithmetic_rows
    from prime.models.loading import load_tokenizer
    from prime.verifiers.math import score

    tok = load_tokenizer(path)
    rows = arithmetic_rows(2, seed=0)
    prompts = []
    for row in rows:
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
        prompts.append(list(ids if isinstance(ids[0], int) else ids["input_ids"]))
    groups = engine.generate(prompts, n=4, max_new_tokens=16, temperature=1.0, seed=0)
    comps = [c for g in groups for c in g]
    scores = [score(c.text, row["reward_model"]["ground_truth"]) for row, g in zip(rows, groups) for c in g]
    batch = pack_sequences([c.prompt_ids for c in comps], [c.token_ids or [tok.pad_token_id] for c in comps],
                           tok.pad_token_id)
    return batch.replace(scores=torch.tensor(scores), group_ids=torch.arange(len(rows)).repeat_interleave(4))


def _engine_for_step(shared: Shared):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return shared.vllm(), "vllm"
    from prime.rollout.hf import HFEngine

    return HFEngine(shared.path, dtype="float32", device=shared.device, seed=0), "hf"


def _sync_engine(engine, kind: str, policy) -> None:
    """Stream the policy into the engine: over transport ipc into vLLM's worker, or (HF, in this
    process) bucket by bucket straight into its model."""
    if kind == "vllm":
        stream_into_engine(engine, policy, "ipc")
        return
    from prime.rollout.weight_transfer import plan_buckets

    buckets = plan_buckets(policy.weight_specs(), STREAM_BUCKET_BYTES)
    for named in policy.weight_buckets(buckets):
        engine.load_weights(named.items())


def check_colocated_prime_step(shared: Shared) -> str:
    from prime.algo import compute_advantages

    engine, kind = _engine_for_step(shared)
    engine.wake_up()
    policy, prm = _prime_trainers(shared.path)
    batch = _rollout(engine, shared.path)
    engine.sleep(level=2)  # the trainers get the device
    batch = batch.replace(old_logp=policy.logprobs(batch))
    rewards, prm_metrics = prm.update_and_rewards(batch, mode="before")
    adv, _ = compute_advantages("prime", scores=batch.scores, group_ids=batch.group_ids,
                                mask=batch.response_mask, process_rewards=rewards)
    metrics, _ = policy.update(batch.replace(advantages=adv))
    # prm/rank_acc is NaN by definition when no group has two different scores.
    bad = [k for k, v in (metrics | prm_metrics).items() if not math.isfinite(v) and k != "prm/rank_acc"]
    if bad:
        raise AssertionError(f"non-finite metrics {bad}")
    engine.wake_up(["weights"])
    _sync_engine(engine, kind, policy)
    offloaded = [policy.offload_states(), prm.trainer.offload_states()]  # [False, False] without a GPU
    engine.wake_up(["kv_cache"])
    want = policy.logprobs(_batch())
    d = _rows_diff(engine.score_logprobs(PROMPTS, RESPONSES), want)
    if d > _engine_tolerance(kind, shared.device):
        raise AssertionError(f"{kind} engine differs from the updated policy by {d:.2e}")
    return (f"{kind}: {len(batch)} responses, acc {float(batch.scores.mean()):.2f}, prm/loss "
            f"{prm_metrics['prm/loss']:.3f}, policy/loss {metrics['policy/loss']:.3f}, states offloaded: "
            f"{all(offloaded)}, |engine - policy| {d:.1e}")
