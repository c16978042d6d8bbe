"""The policy update against a plain PyTorch step on the same batch: what prime's trainer (DeepSpeed,
padding-free packing, the loss's bookkeeping) costs over the bare forward, backward and optimizer step.

    .venv/bin/python bench/update_vs_torch.py [--points tiny,small] [--calls 15] [--json out.json]

For each point of bench/vs_trl.py (same model folder, same prompts, same GRPO config), in this one
process with 2 torch threads:

- prime: `Trainer.update(batch, on_policy=True)`, built with the policy's arguments of the point's
  config (`launch.roles.policy_args`: DeepSpeed ZeRO-2 on one CPU rank, packed sequences, the
  point's micro-batch token budget), as the policy actor runs it in a step;
- torch: the same folder loaded with transformers, one padded forward over the same rows, the
  responses' token log-probs, the policy-gradient loss of an on-policy step (ratio 1, so no clip
  applies), backward, grad clip 1.0 and `torch.optim.AdamW` at the same learning rate.

The batch is the point's prompts (8 or 16 `arith` prompts, each K=4 times) with random-token
responses whose lengths are drawn from [cap/2, cap], and random advantages. The two sides are
called in turn for `--calls` rounds; the table gives each side's median seconds over the rounds
after the first two (warm-up) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.vs_trl import K, POINTS, ROOT, check_warmup, choices, load_averages, model_and_data, prime_config  # noqa: E402

WARMUP = 2


def point_batch(point: str, model: str, data: str):
    """The point's prompts, K times each, with random responses and advantages (seeded)."""
    import torch

    from bench.generation import prompt_ids
    from prime.data.batch import pack_sequences

    prompts_per_step, cap = POINTS[point][2], POINTS[point][3]
    prompts = prompt_ids(model, data, prompts_per_step)
    rng = random.Random(0)
    rows = [p for p in prompts for _ in range(K)]
    responses = [[rng.randrange(4, 500) for _ in range(rng.randint(cap // 2, cap))] for _ in rows]
    batch = pack_sequences(rows, responses, pad_id=0)
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask
    return batch.replace(advantages=adv, group_ids=torch.arange(len(rows)) // K)


def padded_logprobs(model, batch):
    """The response tokens' log-probs [B, T] from one padded forward (what a plain trainer computes)."""
    import torch

    prompt_width = batch.input_ids.shape[1] - batch.response_width
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)
    logits = out.logits[:, prompt_width - 1 : -1].float()  # [B, T, V]: the logits that predict the responses
    return torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, prompt_width:, None]).squeeze(-1)


def torch_step(model, opt, batch, grad_clip: float = 1.0) -> None:
    """One plain on-policy policy-gradient step over the padded rows."""
    import torch

    logp = padded_logprobs(model, batch)  # [B, T]
    ratio = torch.exp(logp - logp.detach())
    mask = batch.response_mask
    loss = -(ratio * batch.advantages * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def point_trainer(point: str, model_path: str, data: str, output_dir: str, total_optimizer_steps: int = 10):
    """prime's policy trainer as the point's policy actor builds it, and its engine settings."""
    from launch.roles import policy_args
    from prime.train.trainer import Trainer

    cfg = prime_config(point, model_path, data, 10, os.path.join(output_dir, "runs"), [])
    loss, settings, kwargs = policy_args(cfg, total_optimizer_steps=total_optimizer_steps)
    return Trainer(model_path, loss, settings, **kwargs), settings


def run_point(point: str, calls: int, output_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model_path, data = model_and_data(point, output_dir)
    trainer, settings = point_trainer(point, model_path, data, output_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    plain.train()
    opt = torch.optim.AdamW(plain.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batch = point_batch(point, model_path, data)
    times: dict[str, list[float]] = {"prime": [], "torch": []}
    for _ in range(calls):
        t0 = time.perf_counter()
        trainer.update(batch, on_policy=True)
        times["prime"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_step(plain, opt, batch)
        times["torch"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[WARMUP:]) for k, v in times.items()}
    return {"point": point, "rows": len(batch), "tokens": int(batch.attention_mask.sum()),
            "padded_tokens": int(batch.attention_mask.numel()), "zero_stage": settings.zero_stage,
            "prime_s": med["prime"], "torch_s": med["torch"], "ratio": med["prime"] / med["torch"], "calls": times}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="tiny,small", help=f"comma list of {', '.join(POINTS)}")
    parser.add_argument("--calls", type=int, default=15, help=f"rounds; the first {WARMUP} are a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "vs_trl"),
                        help="where the model folders and prompts are built (or reused)")
    parser.add_argument("--json", default=None, help="also write the rows (every call's seconds) here")
    args = parser.parse_args(argv)
    points = choices(parser, "--points", args.points, POINTS)
    check_warmup(parser, "--calls", args.calls, WARMUP)
    torch.set_num_threads(args.threads)
    print(f"load {load_averages()}; torch threads {torch.get_num_threads()}")
    rows = [run_point(p, args.calls, args.output_dir) for p in points]
    print(f"median seconds over calls {WARMUP + 1}-{args.calls}; sides called in turn")
    print("| point | rows | tokens (padded) | ZeRO | prime update s | plain torch (padded) s | prime / torch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['point']} | {r['rows']} | {r['tokens']} ({r['padded_tokens']}) | {r['zero_stage']} | "
              f"{r['prime_s']:.3f} | {r['torch_s']:.3f} | {r['ratio']:.2f}x |")
    print(f"load {load_averages()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
