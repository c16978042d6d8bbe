"""Smoke test of the non-Ray code paths on one device: run on a GPU box (no Ray, no vLLM needed).

    python launch/gpu_smoke.py                 # CUDA (the default)
    python launch/gpu_smoke.py --device cpu    # the same checks on the CPU

Checks, each timed, on a tiny Qwen2 checkpoint built locally:
  1. weight-sync buckets: flatten / unflatten round trip on the device is exact (mixed dtypes);
  2. HF engine generation on the device (fp32 and bf16); the sampled tokens' log-probs agree with a
     full forward pass (`response_logprobs`);
  3. `response_logprobs` on the device equals the CPU result (fp32, within 1e-4);
  4. the trainer with the PPO loss and DeepSpeed ZeRO-2 on the device: one PPO update in fp32 and in bf16, the
     weights change, and after `load_weights` into the HF engine the engine scores responses like
     the trainer (fp32);
  5. the implicit PRM: one update and token rewards.
Prints a table of results and timings; exits 1 if any check fails. `launch/gpu_smoke.sh` installs
the dependencies and runs this script.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback

# The device has to be fixed before torch (or DeepSpeed) is imported: `--device cpu` hides any GPU
# so DeepSpeed picks its CPU accelerator and gloo, exactly as on a machine without one.
_ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ARGS.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
_ARGS.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="tiny-model size")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when not installed


def _prepare_env(device: str) -> None:
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
RESPONSES = [[20, 21, 22, 23], [24, 25], [26, 27, 28, 29, 30, 31]]


class Results:
    """Rows of (check, ok, seconds, detail)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, float, str]] = []

    def run(self, name: str, fn) -> object:
        t0 = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Exception as e:
            traceback.print_exc()
            detail, ok = f"{type(e).__name__}: {e}", False
        self.rows.append((name, ok, time.perf_counter() - t0, str(detail or "")))
        return ok

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'check':<{w}}  result  seconds  detail", "-" * (w + 40)]
        for name, ok, sec, detail in self.rows:
            lines.append(f"{name:<{w}}  {'ok' if ok else 'FAIL':<6}  {sec:7.2f}  {detail[:120]}")
        return "\n".join(lines)

    @property
    def failed(self) -> int:
        return sum(not ok for _, ok, _, _ in self.rows)


def _batch(pad_id: int):
    from prime.data.batch import pack_sequences

    return pack_sequences(PROMPTS, RESPONSES, pad_id)


def _max_abs(a, b) -> float:
    return float((a - b).abs().max())


def check_buckets(device: str) -> str:
    import torch

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


def check_generate(path: str, device: str, dtype: str) -> str:
    import torch

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
    mask = batch.response_mask
    sampled = torch.zeros_like(full)
    for i, c in enumerate(comps):
        sampled[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    diff = float(((full - sampled).abs() * mask).max())
    # fp32: cache vs full forward differ only by summation order; bf16 rounds each layer's output.
    tol = 1e-3 if dtype == "float32" else 0.25
    if diff > tol:
        raise AssertionError(f"sampled vs full-forward log-probs differ by {diff:.2e} > {tol}")
    return f"{tokens} tokens, {tokens / gen_s:.0f} tok/s, |sampled - forward| {diff:.1e}"


def check_logprobs_device_vs_cpu(path: str, device: str) -> str:
    import torch

    from prime.models.loading import load_model, load_tokenizer
    from prime.models.logprobs import response_logprobs

    tok = load_tokenizer(path)
    batch = _batch(tok.pad_token_id)
    cpu_model = load_model(path, dtype="float32", device="cpu")
    dev_model = load_model(path, dtype="float32", device=device)
    with torch.no_grad():
        packed = [getattr(batch, k) for k in batch.PACKED]
        ref, ref_ent = response_logprobs(cpu_model, *packed, return_entropy=True)  # [B, T]
        got, got_ent = response_logprobs(dev_model, *(t.to(device) for t in packed), temperature=1.0,
                                         return_entropy=True)
    d, de = _max_abs(got.cpu(), ref), _max_abs(got_ent.cpu(), ref_ent)
    if d > 1e-4 or de > 1e-4:
        raise AssertionError(f"{device} vs cpu: logp {d:.2e}, entropy {de:.2e} (limit 1e-4)")
    return f"max |logp diff| {d:.1e}, entropy {de:.1e}"


def _ppo_batch(trainer, pad_id: int, seed: int):
    import torch

    batch = _batch(pad_id).replace(group_ids=torch.zeros(len(PROMPTS), dtype=torch.long))
    logp = trainer.logprobs(batch)  # [B, T]
    gen = torch.Generator().manual_seed(seed)
    return batch.replace(old_logp=logp, advantages=torch.randn(logp.shape, generator=gen) * batch.response_mask)


def check_policy(path: str, device: str, bf16: bool) -> str:
    import torch

    from prime.models.loading import load_tokenizer
    from prime.rollout.hf import HFEngine
    from prime.train.engine import EngineSettings
    from prime.train.losses import PPOClipLoss
    from prime.train.trainer import Trainer

    pad_id = load_tokenizer(path).pad_token_id
    tr = Trainer(path, PPOClipLoss(), EngineSettings(lr=1e-3, zero_stage=2, bf16=bf16),
                 mini_batch_size=len(PROMPTS), max_tokens_per_micro_batch=10_000, seed=0)
    if tr.device.type != torch.device(device).type:
        raise AssertionError(f"trainer is on {tr.device}, expected {device}")
    before = {n: p.detach().float().cpu().clone() for n, p in tr.engine.module.named_parameters()}
    batch = _ppo_batch(tr, pad_id, seed=0)
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
        # The sync payload: the trainer's named weights loaded in place into an engine on the device.
        eng = HFEngine(path, dtype="float32", device=device)
        eng.load_weights(tr.named_weights().items())
        want = tr.logprobs(batch)  # [B, T]
        got = eng.score_logprobs(PROMPTS, RESPONSES)
        d = max(abs(g - float(want[i, j])) for i, row in enumerate(got) for j, g in enumerate(row))
        if d > 1e-4:
            raise AssertionError(f"engine after load_weights differs from the trainer by {d:.2e}")
        detail += f", engine vs trainer after load {d:.1e}"
    return detail


def check_prm(path: str, device: str) -> str:
    import torch

    from prime.models.loading import load_tokenizer
    from prime.train.engine import EngineSettings
    from prime.train.prm import build_implicit_prm

    pad_id = load_tokenizer(path).pad_token_id
    prm = build_implicit_prm(path, EngineSettings(lr=1e-3, zero_stage=2), ref="frozen", beta=0.05,
                             mini_batch_size=len(PROMPTS), max_tokens_per_micro_batch=10_000, seed=0)
    batch = _batch(pad_id).replace(scores=torch.tensor([1.0, 0.0, 1.0]), group_ids=torch.tensor([0, 0, 0]))
    rewards, m = prm.update_and_rewards(batch, mode="before")  # rewards [B, T]
    bad = [k for k, v in m.items() if not math.isfinite(v)]
    if bad:
        raise AssertionError(f"non-finite metrics {bad}")
    if not torch.isfinite(rewards).all() or float((rewards * (1 - batch.response_mask)).abs().max()) != 0.0:
        raise AssertionError("token rewards are non-finite or non-zero outside the responses")
    return f"loss {m['prm/loss']:.4f}, grad_norm {m['prm/grad_norm']:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = _ARGS.parse_args(argv)
    _prepare_env(args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons need true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False

    from prime.models.tiny import build_tiny_model, tiny_model_preset

    results = Results()
    info = f"torch {torch.__version__}, device {args.device}"
    if args.device == "cuda":
        info += f" ({torch.cuda.get_device_name(0)})"
    print(info, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        holder = {}

        def build():
            holder["path"] = build_tiny_model(os.path.join(tmp, "model"), **tiny_model_preset(args.preset))
            return args.preset

        if not results.run("build tiny model", build):
            print(results.table())
            return 1
        path, dev = holder["path"], args.device
        results.run("weight-sync buckets round trip", lambda: check_buckets(dev))
        results.run("hf generate fp32", lambda: check_generate(path, dev, "float32"))
        results.run("hf generate bf16", lambda: check_generate(path, dev, "bfloat16"))
        results.run(f"response_logprobs {dev} vs cpu (fp32)", lambda: check_logprobs_device_vs_cpu(path, dev))
        results.run("policy ZeRO-2 PPO update fp32", lambda: check_policy(path, dev, bf16=False))
        results.run("policy ZeRO-2 PPO update bf16", lambda: check_policy(path, dev, bf16=True))
        results.run("implicit PRM update", lambda: check_prm(path, dev))
    print()
    print(info)
    print(results.table())
    print(f"\n{len(results.rows) - results.failed}/{len(results.rows)} checks passed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
