"""The critical path of a GRPO step, from the actors' own task timestamps: where the hand-offs between
processes go.

    python bench/step_timeline.py [--point tiny] [--steps 12] [--trace timeline.json]

Runs `--steps` steps of a `bench/vs_trl.py` point (the same model folder, prompts and config) through
the driver (`launch.train.train_step`), then reads Ray's task events (`ray.timeline()`: when each
actor task started and ended, argument decoding and result storing included) and cuts every step,
from the driver's call to its return, into consecutive segments that add up to the step:

    to generate         the driver's call until the first engine starts its `generate` task
    generate            first engine start to last engine end
    grading after       last engine end to the last `score_generated` end (grading chained to
                        generation starts on an engine's share as soon as it returns)
    to update           the scores back to the driver, its own work (filter, batch, advantages) and
                        the update call, until the policy starts its `update` task
    update              the policy's `update` task
    to sync             the policy's `update` end until its `send_weights` task starts
    sync                `send_weights` start to the last engine's `receive_weights` end
    to step end         the engines' answer back to the driver, until `train_step` returns

The "to ..." segments are hand-offs between processes (plus the driver's own work in "to update").
The job runs with `cluster.step_lanes=false`: over lanes (`workers/lane.py`) the step's verbs run
inside one long Ray task per actor, which its task events cannot cut.
It prints the median of each segment over the steps after the first, in milliseconds. `--trace`
also writes Ray's timeline with one driver event per step, for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEGMENTS = ("to generate", "generate", "grading after", "to update", "update", "to sync", "sync", "to step end")


def actor_spans(events: list[dict]) -> list[tuple[str, float, float]]:
    """(`Class.method`, start s, end s) of every actor task in Ray's timeline (`ts`, `dur` in µs)."""
    return [(e["cat"][len("task::"):], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
            for e in events if str(e.get("cat", "")).startswith("task::") and "dur" in e]


def critical_path(start: float, end: float, spans: list[tuple[str, float, float]]) -> dict[str, float]:
    """The segments (SEGMENTS, seconds) of one step from `start` to `end` (the driver's wall clock),
    given the actor task spans that began inside it."""
    inside = [s for s in spans if start <= s[1] <= end]

    def of(method: str) -> list[tuple[float, float]]:
        found = [(a, b) for name, a, b in inside if name.endswith("." + method)]
        if not found:
            raise ValueError(f"no {method!r} task began in the step [{start:.6f}, {end:.6f}]: this timeline "
                             "expects a GRPO step with graded generation, one update and a weight sync")
        return found

    gen, graded = of("generate"), of("score_generated")
    (update,), (send,) = of("update"), of("send_weights")
    gen_start, gen_end = min(a for a, _ in gen), max(b for _, b in gen)
    scores_end = max(gen_end, max(b for _, b in graded))
    received = max(b for _, b in of("receive_weights"))
    return {
        "to generate": gen_start - start,
        "generate": gen_end - gen_start,
        "grading after": scores_end - gen_end,
        "to update": update[0] - scores_end,
        "update": update[1] - update[0],
        "to sync": send[0] - update[1],
        "sync": received - send[0],
        "to step end": end - received,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", default="tiny", choices=("tiny", "small"), help="a bench/vs_trl.py point")
    parser.add_argument("--steps", type=int, default=12, help="steps to run; the first is a warm-up")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "vs_trl"),
                        help="model folders, prompts and run folders (shared with bench/vs_trl.py)")
    parser.add_argument("--trace", default="", help="also write Ray's timeline plus the driver's steps here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first is a warm-up), got {args.steps}")
    import ray

    import vs_trl
    from launch.setup import start_job
    from launch.train import train_step

    model, data = vs_trl.model_and_data(args.point, args.output_dir)
    # Ray's task events see only Ray calls: the step's calls go as such, not over lanes.
    job = start_job(vs_trl.prime_config(args.point, model, data, args.steps, args.output_dir,
                                        ["cluster.step_lanes=false"]))
    steps = []
    try:
        for step in range(1, args.steps + 1):
            t0 = time.time()
            train_step(job, step)
            steps.append((t0, time.time()))
        time.sleep(2.5)  # the workers send their task events to Ray's GCS once a second
        events = ray.timeline()
    finally:
        job.shutdown()
    spans = actor_spans(events)
    rows = [critical_path(a, b, spans) for a, b in steps[1:]]
    step_ms = statistics.median(1000 * (b - a) for a, b in steps[1:])
    print(f"{args.point}: median of {len(rows)} steps after the first, ms (step {step_ms:.1f})")
    print("| " + " | ".join(SEGMENTS) + " |")
    print("|" + "---|" * len(SEGMENTS))
    print("| " + " | ".join(f"{1000 * statistics.median(r[k] for r in rows):.2f}" for k in SEGMENTS) + " |")
    if args.trace:
        events += [{"cat": "driver", "name": f"train_step {i}", "pid": "driver", "tid": "train_step", "ph": "X",
                    "ts": a * 1e6, "dur": (b - a) * 1e6} for i, (a, b) in enumerate(steps, start=1)]
        with open(args.trace, "w") as f:
            json.dump(events, f)
        print(f"wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
