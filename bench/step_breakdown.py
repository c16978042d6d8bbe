"""Where the time of one RL step goes: per-stage seconds, throughput and the driver's own overhead.

    python bench/step_breakdown.py --presets tiny,small --engines vllm,hf --steps 3 [--json out.json]
                                   [--override rollout.num_engines=2 ...]

For every (preset, engine) pair this sets up a run through the driver's own set-up
(`launch.setup.start_job`), keeps the actor groups alive and times `launch.train.train_step` for
`--steps` steps. The first step is a warm-up
(lazy initialisation in vLLM, DeepSpeed and the allocator) and is left out of the averages.

Presets are the files `configs/<preset>_cpu.yaml`. The accuracy and truncation filters are switched
off for every preset (`filter.accuracy=false filter.truncated=false filter.max_rounds=1`): the
models are random, so with the accuracy filter on nearly every group fails and a step regenerates
`filter.max_rounds` times, which measures the filter rather than the framework. Each step therefore
generates exactly `trainer.batch_size` prompts x `rollout.n` samples. The models are not warm-started
(`model.warm_start_steps=0`): a random model runs nearly every response to the length limit, so the
token counts, and with them the step times, stay the same from run to run.

Columns (seconds are means over the measured steps):
    generate .. weight_sync   the driver's wall time per stage (`timing/<stage>`)
    step                      wall time of `train_step`
    roll tok/s                generated tokens / engine compute seconds (`perf/rollout_tokens_per_s`)
    train tok/s               prompt+response tokens / update_policy seconds (`perf/train_tokens_per_s`)
    overhead, ovh %           step wall time minus the seconds the actors report as compute
                              (`timing/overhead`), and its share of the step
A second table splits the overhead by stage: `timing/<stage> - compute/<stage>`, plus `untimed`
(step time outside every stage: batch packing and metrics in the driver).

Note: `weight_sync` has no actor-side measurement in the driver (its compute is set to its wall
time), so any overhead inside it is counted as compute, not as overhead. A third table therefore
times one extra sync after the steps, split into the policy's gather, the object-store transport
and the engines' own load time.

The machine's load averages are recorded before and after every pair; other jobs on the same cores
inflate every number, so compare runs taken at a similar load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("generate", "verify", "old_logprob", "prm", "advantages", "update_policy", "weight_sync")
ENGINES = ("vllm", "hf")
BENCH_OVERRIDES = ("filter.accuracy=false", "filter.truncated=false", "filter.max_rounds=1", "model.warm_start_steps=0",
                   "trainer.resume=none", "trainer.save_every=0", "logging.wandb_mode=disabled",
                   "logging.progress_bar=false")


def load_averages() -> list[float]:
    """1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def preset_path(preset: str) -> str:
    path = os.path.join(ROOT, "configs", f"{preset}_cpu.yaml")
    if not os.path.exists(path):
        valid = sorted(f[: -len("_cpu.yaml")] for f in os.listdir(os.path.join(ROOT, "configs"))
                       if f.endswith("_cpu.yaml"))
        raise SystemExit(f"unknown preset {preset!r} (no {path}); valid presets: {', '.join(valid)}")
    return path


def bench_config(preset: str, engine: str, steps: int, output_dir: str, extra: tuple[str, ...] = ()):
    from prime.config import load_config

    overrides = list(BENCH_OVERRIDES) + [
        f"rollout.engine={engine}", f"trainer.total_steps={steps}", f"trainer.output_dir={output_dir}",
        f"trainer.run_name=bench_{preset}_{engine}",
    ]
    return load_config(preset_path(preset), overrides + list(extra))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(preset: str, engine: str, per_step: list[dict[str, float]], warmup: int) -> dict:
    """Means over the steps after the warm-up; per-stage overhead = timing - compute (pure)."""
    measured = per_step[warmup:] or per_step[-1:]

    def avg(key: str) -> float:
        return mean([m.get(key, 0.0) for m in measured])

    row = {"preset": preset, "engine": engine, "steps_measured": len(measured)}
    for s in STAGES:
        row[s] = avg(f"timing/{s}")
    row["step"] = avg("timing/step")
    row["rollout_tokens_per_s"] = avg("perf/rollout_tokens_per_s")
    row["train_tokens_per_s"] = avg("perf/train_tokens_per_s")
    row["overhead"] = avg("timing/overhead")
    row["overhead_pct"] = 100.0 * row["overhead"] / row["step"] if row["step"] else float("nan")
    row["overhead_by_stage"] = {
        s: avg(f"timing/{s}") - avg(f"compute/{s}")
        for s in STAGES + ("filter",) if any(f"timing/{s}" in m for m in measured)
    }
    timed = sum(avg(k) for k in {k for m in measured for k in m if k.startswith("timing/")}
                if k not in ("timing/step", "timing/overhead", "timing/overhead_frac"))
    row["overhead_by_stage"]["untimed"] = row["step"] - timed
    row["generated_tokens"] = avg("rollout/generated_tokens")
    row["batch_tokens"] = avg("batch/tokens")
    row["responses"] = avg("batch/responses")
    row["mean_response_len"] = avg("response/mean_len")
    return row


def probe_weight_sync(roles) -> dict[str, float]:
    """One extra object-store weight sync after the timed steps, split into its parts.

    `gather` is the policy exporting its weights into the object store, `engine_load` the seconds
    `RolloutWorker.load_weights` reports, `transport` the rest (moving the object to the engines).
    The driver counts only the actors' own seconds as compute; this shows the whole split.
    Reloading the same weights leaves the engines unchanged.
    """
    import ray

    t0 = time.perf_counter()
    refs = [a.export_weights.options(num_returns=2).remote() for a in roles.policy.actors]
    ray.get([nbytes for _, nbytes in refs])  # done exporting; the weights stay in the object store
    t1 = time.perf_counter()
    loads = ray.get([e.load_weights.remote(refs[0][0]) for e in roles.rollout.actors])
    t2 = time.perf_counter()
    engine_load = max(loads)
    return {"gather": t1 - t0, "engine_load": engine_load, "transport": t2 - t1 - engine_load, "total": t2 - t0}


def bench_pair(preset: str, engine: str, steps: int, output_dir: str, extra: tuple[str, ...] = ()) -> dict:
    """Set up a run as `prime train` does, time `train_step` `steps` times, tear it down."""
    from launch.setup import start_job
    from launch.train import train_step

    cfg = bench_config(preset, engine, steps, output_dir, extra)
    load_before = load_averages()
    t0 = time.perf_counter()
    job = start_job(cfg)
    setup_s = time.perf_counter() - t0
    per_step = []
    try:
        for step in range(1, steps + 1):
            metrics = train_step(job, step)
            per_step.append({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            stages = " ".join(f"{s}={metrics.get(f'timing/{s}', 0.0):.2f}" for s in STAGES)
            print(f"  {preset}/{engine} step {step}: {metrics['timing/step']:.2f} s "
                  f"(overhead {metrics['timing/overhead']:.3f} s, load {load_averages()[0]}) {stages}",
                  file=sys.stderr, flush=True)
        sync_probe = probe_weight_sync(job.roles)
    finally:
        job.shutdown()
    row = summarize(preset, engine, per_step, warmup=1 if steps > 1 else 0)
    row["weight_sync_probe"] = sync_probe
    row["setup_s"] = setup_s
    row["engine_start_s"] = job.roles.engine_start_s
    row["load_before"] = load_before
    row["load_after"] = load_averages()
    row["per_step"] = per_step
    return row


def format_table(rows: list[dict]) -> str:
    head = ["preset", "engine"] + list(STAGES) + ["step", "roll tok/s", "train tok/s", "overhead", "ovh %", "load1"]
    lines = []
    for r in rows:
        cells = [r["preset"], r["engine"]] + [f"{r[s]:.3f}" for s in STAGES] + [
            f"{r['step']:.3f}", f"{r['rollout_tokens_per_s']:.0f}", f"{r['train_tokens_per_s']:.0f}",
            f"{r['overhead']:.3f}", f"{r['overhead_pct']:.1f}", f"{r['load_after'][0]:.2f}"]
        lines.append(cells)
    return _grid(head, lines)


def format_overhead(rows: list[dict]) -> str:
    keys = list(STAGES) + ["filter", "untimed"]
    head = ["preset", "engine"] + [f"ovh:{k}" for k in keys]
    lines = [[r["preset"], r["engine"]] + [f"{r['overhead_by_stage'].get(k, 0.0):.3f}" for k in keys] for r in rows]
    return _grid(head, lines)


def _grid(head: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*c) for c in lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma list of configs/<preset>_cpu.yaml")
    parser.add_argument("--engines", default="vllm,hf", help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--steps", type=int, default=3, help="steps per pair; the first is a warm-up")
    parser.add_argument("--json", default=None, help="also write the rows (with every step's metrics) here")
    parser.add_argument("--override", action="append", default=[],
                        help="a config override for every pair, e.g. rollout.num_engines=2 (repeatable)")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "bench"),
                        help="run folders (models and data are built once and reused)")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            parser.error(f"--engines: {e!r} is not an engine; valid: {', '.join(ENGINES)}")
    for p in presets:
        preset_path(p)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rows = []
    t0 = time.perf_counter()
    for preset in presets:
        for engine in engines:
            print(f"[{time.perf_counter() - t0:6.0f} s] {preset}/{engine}: load {load_averages()}",
                  file=sys.stderr, flush=True)
            rows.append(bench_pair(preset, engine, args.steps, args.output_dir, tuple(args.override)))
    print(f"steps per pair: {args.steps} (first excluded as warm-up); seconds are means per step; "
          f"total {time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    print()
    print("overhead by stage (timing - compute; untimed = step outside every stage), seconds:")
    print(format_overhead(rows))
    print()
    print("weight sync probe (one extra sync after the steps), seconds:")
    print(_grid(["preset", "engine", "gather", "transport", "engine_load", "total"],
                [[r["preset"], r["engine"]] + [f"{r['weight_sync_probe'][k]:.3f}" for k in
                                               ("gather", "transport", "engine_load", "total")] for r in rows]))
    print("load averages (1, 5, 15 min) before/after each pair: "
          + "; ".join(f"{r['preset']}/{r['engine']} {r['load_before']} -> {r['load_after']}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "warmup_steps": 1 if args.steps > 1 else 0, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
