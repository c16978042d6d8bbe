"""prime's GRPO step against TRL's GRPOTrainer, on the same model folder, prompts and settings.

    pip install -e '.[bench]'                      # TRL (trl==1.16.0): only this benchmark needs it
    .venv/bin/python bench/vs_trl.py --points tiny,small --steps 5 [--json out.json]
    .venv/bin/python bench/vs_trl.py --steps 4 --baseline actor.old_logprob_pass=always   # + the old step

For every point (`tiny`: 8 prompts x 4 samples x <= 24 new tokens on the 2-layer preset; `small`:
16 x 4 x <= 128 on the 4-layer, hidden-512 preset) this builds the model folder as
`prime build-tiny-model OUT --preset P` does and the prompts as `prime make-data OUT --kind arith`
does (both reused when present under --output-dir), then runs

- TRL's `GRPOTrainer` in this process: HF `generate`, no KL (beta 0), fp32 (bf16=False: TRL's
  default bf16 autocast is many times slower on a CPU without bf16 units), one optimizer step per
  generation (steps_per_generation = gradient_accumulation_steps = 1, num_iterations 1), and
- prime's GRPO through its own driver (`launch.setup.start_job`, `launch.train.train_step`) with the
  vLLM engine, Ray actors and DeepSpeed, filters off so every step trains on the whole batch; at
  the tiny point with two compiled rollout engines of one thread each (`rollout.num_engines=2
  rollout.enforce_eager=false` over `configs/tiny_cpu.yaml`). vLLM spends most of the tiny model's
  decode step in Python (scheduling, input preparation, output processing, the model's many small
  ops); two engines run that on both cores at once (`launch.roles.engine_env` splits the cores
  between them), and the compiled model fuses the small ops. The preset keeps one eager engine:
  its runs are too short to earn back the compile (about 30 s at the start). At the small point,
  where the model's kernels take most of the step, two engines made no clear difference (README),
  so it runs the preset (compiled, one engine);

with the same K, response cap, temperature (1.0, top-p 1, no top-k), learning rate (the preset's
`actor.lr`), grad clip 1.0 and seed. The two sides are interleaved: a callback at the end of each TRL
step runs one prime step, so both see the same load on the machine. Step times are medians over the
steps after the first (a warm-up for both). A TRL step is timed from `on_step_begin` (before its
generation) to `on_step_end` (after its optimizer step).

Printed per point: each side's median step seconds and their ratio (prime / TRL), generated tokens
per step, prime's per-stage seconds (generate, verify, old_logprob, update_policy, weight_sync),
rollout tokens/s and its overhead (step wall time minus the actors' compute), the largest
`rollout/logprob_gap` over the steps that check the weight sync (`rollout.logprob_check_every`: the
first and every 10th; it shows the engines sampled from the trainer's weights) and the load
averages before and after. A markdown table sums it up.

"update limit" is the machine's limit for the policy update of the point, measured in this process
right after the point (TRL done, prime's actors shut down): every linear layer of the model folder
(`bench/limits.py`, `train_linears`: forward and both backward multiplies, fp32, on the policy's
thread count) over the median step's packed tokens (`batch/tokens`), best of `--limit-repeats`.
"update / limit" divides the policy actor's own update seconds (`compute/update_policy`, the median
step) by it: what attention, norms, the loss, the optimizer and the step's other processes add to
the bare multiplies. With `actor.share_prompts` (the default) the update runs fewer tokens than the
batch holds, each prompt once for its K samples (`policy/tokens`, printed as "update ran"); "/ limit
of those" divides by the limit scaled to them (the multiplies' time is linear in the tokens), so it
tells how near the machine the update computes, apart from the work it saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTS = {
    # point: (model preset, config preset, prompts per step, response cap, prime overrides of the point)
    # tiny: two one-thread engines, compiled (configs/tiny_cpu.yaml keeps one eager engine, which
    # starts about 10 s sooner, and 30 s more without the compile, for the demo and the tests); see
    # the module docstring.
    "tiny": ("tiny", "tiny", 8, 24, ("rollout.num_engines=2", "rollout.enforce_eager=false")),
    "small": ("small", "small", 16, 128, ()),
}
K = 4
STAGES = ("generate", "verify", "old_logprob", "update_policy", "weight_sync")


def load_averages() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def model_and_data(point: str, output_dir: str) -> tuple[str, str]:
    """The model folder and prompt file of a point, built as the `prime` commands build them."""
    from prime.data.synthetic import make_synthetic_dataset
    from prime.models.tiny import build_tiny_model, tiny_model_preset

    preset = POINTS[point][0]
    model = os.path.join(output_dir, f"model_{preset}")
    if not os.path.exists(os.path.join(model, "config.json")):
        build_tiny_model(model, seed=0, **tiny_model_preset(preset))  # prime build-tiny-model model --preset P
    data = os.path.join(output_dir, "arith.parquet")
    if not os.path.exists(data):
        make_synthetic_dataset("arith", data, n=512, seed=0)  # prime make-data data --kind arith
    return model, data


def prime_config(point: str, model: str, data: str, steps: int, output_dir: str, extra: list[str]):
    from prime.config import load_config

    _, preset, prompts, cap, point_overrides = POINTS[point]
    overrides = [*point_overrides,
        f"model.path={model}", "model.warm_start_steps=0", f"data.train_files=[{data}]", "algo.name=grpo", "algo.kl_coef=0.0",
        "rollout.engine=vllm", f"rollout.n={K}", f"rollout.max_response_len={cap}", "rollout.temperature=1.0",
        "rollout.top_p=1.0", f"trainer.batch_size={prompts}", f"trainer.total_steps={steps}",
        "filter.accuracy=false", "filter.truncated=false", "filter.max_rounds=1", "trainer.resume=none",
        "trainer.save_every=0", "trainer.seed=0", "logging.wandb_mode=disabled", "logging.progress_bar=false",
        f"trainer.output_dir={output_dir}", f"trainer.run_name=vs_trl_{point}",
    ]
    return load_config(os.path.join(ROOT, "configs", f"{preset}_cpu.yaml"), overrides + list(extra))


def arith_reward(completions, ground_truth, **_) -> list[float]:
    """The verifier prime's math actors run (`prime.verifiers.math.score`), in TRL's reward signature."""
    from prime.verifiers.math import score

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [score(t, g) for t, g in zip(texts, ground_truth)]


def trl_trainer(point: str, model: str, data: str, steps: int, lr: float, output_dir: str, callback):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from launch.preflight import check_data

    rows = [row for _, part in check_data("data", data) for row in part]
    ds = Dataset.from_list([{"prompt": list(r["prompt"]), "ground_truth": str(r["reward_model"]["ground_truth"])}
                            for r in rows])
    _, _, prompts, cap, _ = POINTS[point]
    args = GRPOConfig(
        output_dir=os.path.join(output_dir, f"trl_{point}"), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=prompts * K, num_generations=K, gradient_accumulation_steps=1,
        max_completion_length=cap, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
        max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, seed=0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        model_init_kwargs={"dtype": torch.float32}, dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(model)
    return GRPOTrainer(model=model, reward_funcs=arith_reward, args=args, train_dataset=ds,
                       processing_class=tok, callbacks=[callback])


def make_callback(prime_step):
    """A TRL callback timing each step and running one prime step after it."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.t0, self.steps, self.tokens = 0.0, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self.t0)
            prime_step()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(logs["completions/mean_length"] * args.per_device_train_batch_size)

    return Interleave()


def choices(parser: argparse.ArgumentParser, flag: str, text: str, valid) -> list[str]:
    """The comma list `text` given to `flag`, each item checked against `valid` (a parser error names it)."""
    items = [x for x in text.split(",") if x]
    for x in items:
        if x not in valid:
            parser.error(f"{flag}: {x!r} is not valid; valid: {', '.join(valid)}")
    return items


def check_warmup(parser: argparse.ArgumentParser, flag: str, n: int, warmup: int = 1) -> None:
    """Timings take the median after `warmup` warm-up rounds, so `flag` needs at least one more."""
    if n <= warmup:
        what = "the first is a warm-up" if warmup == 1 else f"the first {warmup} are a warm-up"
        parser.error(f"{flag} must be >= {warmup + 1} ({what}), got {n}")


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def actor_code(job) -> str:
    """Where the policy actor imports `prime` from (the checkout this benchmark measures)."""
    import ray

    return ray.get(job.roles.policy.actors[0].__ray_call__.remote(lambda self: __import__("prime").__file__))


def update_limit(model: str, tokens: int, repeats: int) -> float:
    """The best seconds of the model's linear layers, forward and backward, over `tokens` packed rows
    (`bench.limits.train_linears`), on as many torch threads as a local CPU policy actor uses
    (`launch.setup.library_env`: every core)."""
    from bench.limits import linear_shapes, train_linears
    from prime.models.memory import resolve_shape
    from prime.train.sft import torch_threads

    shape, _ = resolve_shape(model)
    with torch_threads(os.cpu_count() or 1):
        best, _, _ = train_linears(tokens, linear_shapes(shape), repeats)
    return best


def run_point(point: str, steps: int, output_dir: str, extra: list[str], variant: str,
              limit_repeats: int = 5) -> dict:
    from launch.setup import start_job
    from launch.train import train_step

    model, data = model_and_data(point, output_dir)
    cfg = prime_config(point, model, data, steps, output_dir, extra)
    load_before = load_averages()
    job = start_job(cfg)
    print(f"  {point}: the policy actor imports prime from {actor_code(job)}", file=sys.stderr, flush=True)
    prime_metrics: list[dict[str, float]] = []

    def prime_step() -> None:
        m = train_step(job, len(prime_metrics) + 1)
        prime_metrics.append({k: float(v) for k, v in m.items() if isinstance(v, (int, float))})
        print(f"  {point} prime step {len(prime_metrics)}: {m['timing/step']:.2f} s, trl step "
              f"{cb.steps[-1]:.2f} s, load {load_averages()[0]}", file=sys.stderr, flush=True)

    cb = make_callback(prime_step)
    try:
        trainer = trl_trainer(point, model, data, steps, cfg.actor.lr, output_dir, cb)
        trainer.train()
    finally:
        job.shutdown()
    row = summarize(point, cb, prime_metrics, load_before) | {"variant": variant}
    if limit_repeats > 0:
        row["update_limit"] = update_limit(model, round(row["batch_tokens"]), limit_repeats)
        row["update_vs_limit"] = row["update_compute"] / row["update_limit"]
        row["update_vs_run_limit"] = row["update_vs_limit"] * row["batch_tokens"] / row["update_tokens"]
    return row


def summarize(point: str, cb, prime_metrics: list[dict[str, float]], load_before: list[float]) -> dict:
    def med(key: str) -> float:
        return median_after_first([m.get(key, 0.0) for m in prime_metrics])

    row = {"point": point, "trl_step": median_after_first(cb.steps), "prime_step": med("timing/step"),
           "trl_tokens": median_after_first(cb.tokens) if cb.tokens else float("nan"),
           "prime_tokens": med("rollout/generated_tokens"), "rollout_tok_s": med("perf/rollout_tokens_per_s"),
           "overhead": med("timing/overhead"), "overhead_pct": 100 * med("timing/overhead_frac"),
           "load_before": load_before, "load_after": load_averages(),
           "trl_steps": cb.steps, "prime_steps": [m["timing/step"] for m in prime_metrics]}
    row["ratio"] = row["prime_step"] / row["trl_step"]
    for s in STAGES:
        row[s] = med(f"timing/{s}")
    row["update_compute"] = med("compute/update_policy")
    row["batch_tokens"] = med("batch/tokens")
    row["update_tokens"] = med("policy/tokens") or row["batch_tokens"]  # what the update ran
    # The weight-sync check on the steps that log it (rollout.logprob_check_every): the engines sampled
    # from the weights the trainer scored with, so the timed run was also a correct one.
    gaps = [m["rollout/logprob_gap"] for m in prime_metrics if "rollout/logprob_gap" in m]
    row["logprob_gap"] = max(gaps) if gaps else float("nan")
    row["logprob_gap_steps"] = len(gaps)
    return row


def markdown(rows: list[dict]) -> str:
    head = ["point", "prime variant", "TRL step s", "prime step s", "prime/TRL", "TRL gen tok/step", "prime gen tok/step",
            *(f"{s} s" for s in STAGES), "update limit s (tokens)", "update / limit", "update ran (/ limit of those)",
            "prime roll tok/s",
            "overhead s (%)", "logprob gap (steps)",
            "load 1/5/15 before -> after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["point"], r["variant"], f"{r['trl_step']:.2f}", f"{r['prime_step']:.2f}", f"{r['ratio']:.2f}x",
                 f"{r['trl_tokens']:.0f}", f"{r['prime_tokens']:.0f}", *(f"{r[s]:.2f}" for s in STAGES),
                 f"{r.get('update_limit', float('nan')):.2f} ({r['batch_tokens']:.0f})",
                 f"{r.get('update_vs_limit', float('nan')):.2f}x",
                 f"{r.get('update_tokens', r['batch_tokens']):.0f} ({r.get('update_vs_run_limit', float('nan')):.2f}x)",
                 f"{r['rollout_tok_s']:.0f}",
                 f"{r['overhead']:.3f} ({r['overhead_pct']:.1f}%)",
                 f"{r['logprob_gap']:.1e} ({r['logprob_gap_steps']})", f"{r['load_before']} -> {r['load_after']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="tiny,small", help=f"comma list of {', '.join(POINTS)}")
    parser.add_argument("--steps", type=int, default=5, help="steps per side and point; the first is a warm-up")
    parser.add_argument("--json", default=None, help="also write the rows (with every step's seconds) here")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "vs_trl"),
                        help="model folders, prompts and run folders (built once, reused)")
    parser.add_argument("--prime-override", action="append", default=[],
                        help="extra prime config override (repeatable), e.g. rollout.seeded=false")
    parser.add_argument("--baseline", action="append", default=[],
                        help="override (repeatable) giving a baseline variant of prime, run at every point before "
                             "the default one, each against its own interleaved TRL run; e.g. "
                             "actor.old_logprob_pass=always")
    parser.add_argument("--limit-repeats", type=int, default=5,
                        help="timings of the update limit per point, the best is kept (0: skip it)")
    args = parser.parse_args(argv)
    points = choices(parser, "--points", args.points, POINTS)
    check_warmup(parser, "--steps", args.steps)
    try:
        import trl  # noqa: F401
    except ImportError:
        parser.error("TRL is not installed; pip install -e '.[bench]' (trl==1.16.0)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for p in points:
        print(f"{p}: load {load_averages()}", file=sys.stderr, flush=True)
        variants = ([("baseline: " + " ".join(args.baseline), args.prime_override + args.baseline)]
                    if args.baseline else []) + [("default", args.prime_override)]
        for name, overrides in variants:
            rows.append(run_point(p, args.steps, args.output_dir, overrides, name, args.limit_repeats))
    print(f"median step seconds after the first of {args.steps} steps; sides interleaved step by step; "
          f"prime overrides: {args.prime_override or 'none'}")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
