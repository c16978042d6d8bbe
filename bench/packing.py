"""Padded vs padding-free passes: seconds of one micro-batch's log-prob pass on the CPU.

    python bench/packing.py [--repeats 5] [--threads 2] [--samples 1] [--block-mask] [--json out.json]

The model is the `small` tiny preset (hidden 512, 4 layers, 8 heads, GQA 4:1, vocabulary 512),
built locally in fp32. The batch holds 64 sequences of random token ids, prompts of 20-40 tokens and
responses of 10-128 tokens (uniform, seed 0): about 6,300 real tokens, 64 x 167 = 10,700 in the
padded layout. Both passes go through `prime.models.logprobs.response_logprobs` on the whole batch
as one micro-batch, the padded one on the `Batch` layout, the padding-free one with
`padding_free=True` on the model after `use_packed_attention` (the trainer's set-up).

Rows (seconds: median over `--repeats` runs after one warm-up run; the variants take turns run by
run, so they share the machine's load):
    logprobs (no grad)   the no-grad pass (old log-probs, references)
    fwd+bwd mean logp    forward and backward of the mean log-prob over response tokens (the update)
Columns: padded, padding-free, speed-up = padded / padding-free, and the largest |difference| of
the log-probs (or of the gradients) between the two. `--block-mask` adds a column for an sdpa
model that was not switched: transformers then builds a dense block-diagonal mask from the
restarting position ids, so every layer attends over all N packed tokens (N x N). `--samples K`
makes the batch a rollout's: 64 / K prompts, each answered by K of the responses (consecutive rows),
and adds a column with `share_prompts=True` (`actor.share_prompts`): each prompt packed once for its
K responses.

The machine's load averages are printed before and after; other jobs on the same cores inflate
every number, so compare runs taken at a similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS, PROMPT_LEN, RESPONSE_LEN = 64, (20, 40), (10, 128)


def load_averages() -> list[float]:
    """1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def make_batch(vocab: int, seed: int = 0, samples: int = 1):
    """64 rows of random tokens; with `samples` K > 1, 64 / K prompts, each for K consecutive rows."""
    from prime.data.batch import pack_sequences

    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*PROMPT_LEN))] for _ in range(ROWS // samples)]
    prompts = [p for p in prompts for _ in range(samples)]
    responses = [[rng.randrange(4, vocab) for _ in range(rng.randint(*RESPONSE_LEN))] for _ in range(ROWS)]
    return pack_sequences(prompts, responses, pad_id=3)


def timed_alternating(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds of `repeats` calls of every function in `fns`, one warm-up call each first. The
    functions take turns call by call, so they share whatever load other jobs put on the machine.
    Returns ({name: [seconds]}, {name: last result})."""
    outs = {name: fn() for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, outs


def passes(model, batch, padding_free: bool, share_prompts: bool = False):
    """(no-grad pass, forward+backward pass) closures; the second returns the gradients."""
    import torch

    from prime.models.logprobs import response_logprobs

    args = [getattr(batch, k) for k in batch.PACKED]
    mask = batch.response_mask

    def no_grad():
        with torch.no_grad():
            return response_logprobs(model, *args, padding_free=padding_free, share_prompts=share_prompts)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        logp = response_logprobs(model, *args, padding_free=padding_free, share_prompts=share_prompts)
        ((logp * mask).sum() / mask.sum()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    return no_grad, fwd_bwd


def max_grad_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run(repeats: int, block_mask: bool, samples: int = 1) -> dict:
    from prime.models.loading import load_model
    from prime.models.packing import packed_tokens, use_packed_attention
    from prime.models.tiny import build_tiny_model, tiny_model_preset

    path = build_tiny_model(tempfile.mkdtemp(prefix="bench_packing_"), seed=0, **tiny_model_preset("small"))
    padded_model, packed_model = load_model(path), load_model(path)
    use_packed_attention(packed_model)
    batch = make_batch(padded_model.config.vocab_size, samples=samples)
    variants = [("padded", padded_model, False, False), ("padding-free", packed_model, True, False)]
    if samples > 1:
        variants.append(("padding-free, shared prompts", packed_model, True, True))
    if block_mask:
        variants.append(("padding-free, block mask", padded_model, True, False))
    res: dict = {"real_tokens": int(batch.attention_mask.sum()), "padded_tokens": int(batch.input_ids.numel()),
                 "unique_tokens": packed_tokens(batch.input_ids, batch.attention_mask, batch.position_ids,
                                                batch.response_width, share_prompts=True), "samples": samples,
                 "load_before": load_averages(), "seconds": {}, "runs": {}, "max_abs_diff": {}}
    fns = {name: passes(model, batch, padding_free, share) for name, model, padding_free, share in variants}
    runs_lp, logps = timed_alternating({name: f[0] for name, f in fns.items()}, repeats)
    print("  logprobs (no grad): " + "; ".join(f"{n} {' '.join(f'{t:.2f}' for t in ts)} s" for n, ts in runs_lp.items()),
          flush=True)
    fwd_bwd = {name: (lambda f=f: {k: g.clone() for k, g in f[1]().items()}) for name, f in fns.items()}
    runs_fb, grads = timed_alternating(fwd_bwd, repeats)
    print("  fwd+bwd: " + "; ".join(f"{n} {' '.join(f'{t:.2f}' for t in ts)} s" for n, ts in runs_fb.items()),
          flush=True)
    outs = {}
    for name in fns:
        res["seconds"][name] = {"logprobs": statistics.median(runs_lp[name]), "fwd_bwd": statistics.median(runs_fb[name])}
        res["runs"][name] = {"logprobs": runs_lp[name], "fwd_bwd": runs_fb[name]}
        outs[name] = (logps[name], grads[name])
    ref_logp, ref_grads = outs["padded"]
    for name, (logp, grads) in outs.items():
        res["max_abs_diff"][name] = {"logprobs": float((logp - ref_logp).abs().max()),
                                     "grads": max_grad_diff(grads, ref_grads)}
    res["load_after"] = load_averages()
    return res


def table(res: dict) -> str:
    names = list(res["seconds"])
    head = f"| pass | {' | '.join(f'{n} s' for n in names)} | " + " | ".join(
        f"speed-up ({n})" for n in names[1:]) + " | " + " | ".join(f"max abs diff ({n})" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (3 * len(names) - 1)]
    for key, label in (("logprobs", "logprobs (no grad)"), ("fwd_bwd", "fwd+bwd mean logp")):
        secs = [res["seconds"][n][key] for n in names]
        diff_key = "logprobs" if key == "logprobs" else "grads"
        lines.append(f"| {label} | " + " | ".join(f"{s:.3f}" for s in secs) + " | "
                     + " | ".join(f"{secs[0] / s:.2f}x" for s in secs[1:]) + " | "
                     + " | ".join(f"{res['max_abs_diff'][n][diff_key]:.1e}" for n in names[1:]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per pass after one warm-up run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--block-mask", action="store_true", help="also time an unswitched sdpa model (dense mask)")
    parser.add_argument("--samples", type=int, default=1,
                        help="responses per prompt (a divisor of 64); > 1 adds the shared-prompts column")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.samples < 1 or ROWS % args.samples:
        parser.error(f"--samples must divide {ROWS}, got {args.samples}")
    import torch

    torch.set_num_threads(args.threads)
    print(f"load averages before: {load_averages()}; torch threads {torch.get_num_threads()}", flush=True)
    res = run(args.repeats, args.block_mask, args.samples)
    res.update(threads=args.threads, repeats=args.repeats, torch=torch.__version__)
    print(f"small preset, fp32, {ROWS} sequences ({ROWS // args.samples} prompts x {args.samples}): "
          f"{res['real_tokens']} real tokens ({res['unique_tokens']} with each prompt once), {res['padded_tokens']} padded; "
          f"median of {args.repeats} after a warm-up; load averages {res['load_before']} -> {res['load_after']}")
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
