"""What an idle prime job costs a computation beside it on a small CPU box: how often each of the job's
processes wakes up, and how much slower the policy update runs beside it.

    .venv/bin/python bench/idle_wakeups.py [--calls 4] [--sample-s 4] [--json out.json]

The job is the `small` point of bench/vs_trl.py (one in-process vLLM engine, the policy, one verifier
actor and Ray's own processes), started and run for one step, then left idle. The computation is the
update of bench/update_vs_torch.py (prime's `Trainer.update` on the point's batch, 2 torch threads) in
a process of its own: called `--calls` times before the job starts, beside the idle job, and after
it stopped. During a step the job's other processes sit idle the same way while the policy updates,
so the ratio is what they take out of the step's update.

Printed: wake-ups per second of every process that wakes at least 10 times a second (summed over
its threads: voluntary plus involuntary context switches, from /proc, over `--sample-s` seconds),
with its busiest threads; then the update's median seconds and its involuntary context switches per
call (preemptions) in each phase, each median over the phase's calls after the first.

Two sources dominated before prime changed them: each gloo process group runs an event-loop thread
that wakes every 10 ms (vLLM's in-process engine made 13 of them, a one-rank trainer 2;
`one_gloo_device` in prime/rollout/gloo.py), and Ray's prestarted idle workers (turned off in workers/group.py).
What remains: every Ray worker's main thread checks for signals every 10 ms while it waits for a
call, the weight sync's gloo group, and Ray's raylet, GCS and agents.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.generation import read_json  # noqa: E402
from bench.vs_trl import POINTS, check_warmup, load_averages, model_and_data, prime_config  # noqa: E402

POINT = "small"
UPDATE = "the update process"


def switches() -> dict[tuple[int, str, int, str], int]:
    """Context switches so far of every thread on the machine: {(pid, process, tid, thread name): count}."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
            name = cmd.split(" ", 1)[0] if cmd.startswith("ray::") else os.path.basename(cmd.split(" ")[0])
            if "python" in name and " " in cmd:  # a Python program: name it by its script or module
                name = next((os.path.basename(a) for a in cmd.split(" ")[1:] if not a.startswith("-")), name)
            for tid in os.listdir(f"/proc/{pid}/task"):
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                n = sum(int(line.split()[1]) for line in open(f"/proc/{pid}/task/{tid}/status")
                        if "ctxt_switches" in line)
                out[(int(pid), name or comm, int(tid), comm)] = n
        except (OSError, ValueError):  # the process or thread ended meanwhile
            continue
    return out


def wakeups(seconds: float) -> list[dict]:
    """Per process: wake-ups per second over `seconds`, and its busiest threads."""
    before = switches()
    time.sleep(seconds)
    after = switches()
    procs: dict[tuple[int, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for key, n in after.items():  # threads of one name summed
        pid, name, _, comm = key
        woke = n - before.get(key, n)
        if woke > 0:
            procs[pid, name][comm] += woke / seconds
    rows = [{"pid": pid, "process": name, "per_s": sum(th.values()),
             "threads": th.most_common(4)} for (pid, name), th in procs.items()]
    return sorted(rows, key=lambda r: -r["per_s"])


def serve(model: str, data: str) -> int:
    """Child mode: build the point's policy trainer and batch, then answer `update` lines with one JSON line."""
    import torch

    torch.set_num_threads(2)
    from bench.update_vs_torch import point_batch, point_trainer

    trainer, _ = point_trainer(POINT, model, data, os.path.join(ROOT, "runs", "idle_wakeups"), 1000)
    batch = point_batch(POINT, model, data)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "update":
            break
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        t0 = time.perf_counter()
        trainer.update(batch, on_policy=True)
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "preempted": resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - r0}),
              flush=True)
    return 0


def phase(proc: subprocess.Popen, name: str, calls: int) -> dict:
    got = []
    for i in range(calls):
        proc.stdin.write("update\n")
        proc.stdin.flush()
        got.append(read_json(proc, UPDATE))
        print(f"{name} call {i}: {got[-1]['seconds']:.2f} s, preempted {got[-1]['preempted']}, "
              f"load {load_averages()[0]}", file=sys.stderr, flush=True)
    return {"phase": name, "seconds": statistics.median(c["seconds"] for c in got[1:]),
            "preempted": statistics.median(c["preempted"] for c in got[1:]), "calls": got}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4, help="update calls per phase; the first is a warm-up")
    parser.add_argument("--sample-s", type=float, default=4.0, help="seconds over which wake-ups are counted")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "vs_trl"),
                        help="model folder and prompts (shared with bench/vs_trl.py, built once)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--serve", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(*args.serve)
    check_warmup(parser, "--calls", args.calls)
    if args.sample_s <= 0:
        parser.error(f"--sample-s must be > 0, got {args.sample_s}")
    os.makedirs(args.output_dir, exist_ok=True)
    model, data = model_and_data(POINT, args.output_dir)

    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", model, data],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    phases = []
    try:
        read_json(proc, UPDATE)
        phases.append(phase(proc, "alone, before the job", args.calls))
        from launch.setup import start_job
        from launch.train import train_step

        cfg = prime_config(POINT, model, data, 1, os.path.join(ROOT, "runs", "idle_wakeups"),
                           list(POINTS[POINT][4]))
        job = start_job(cfg)
        try:
            train_step(job, 1)
            time.sleep(2.0)  # the step's last replies and log lines settle
            wake = wakeups(args.sample_s)
            phases.append(phase(proc, "beside the idle job", args.calls))
        finally:
            job.shutdown()
        time.sleep(2.0)
        phases.append(phase(proc, "alone, after the job", args.calls))
    finally:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"wake-ups per second of an idle job ({POINT} point, after one step; {args.sample_s:g} s sampled); "
          f"total {sum(r['per_s'] for r in wake):.0f}")
    print("| process | wake-ups/s | busiest threads (per s) |\n|---|---|---|")
    for r in wake:
        if r["per_s"] >= 10:
            threads = ", ".join(f"{t} {n:.0f}" for t, n in r["threads"])
            print(f"| {r['process']} ({r['pid']}) | {r['per_s']:.0f} | {threads} |")
    alone = statistics.median([phases[0]["seconds"], phases[2]["seconds"]])
    print(f"\npolicy update ({POINT} point, {args.calls} calls per phase, median after the first)")
    print("| phase | update s | preemptions per call | vs alone |\n|---|---|---|---|")
    for p in phases:
        print(f"| {p['phase']} | {p['seconds']:.2f} | {p['preempted']:.0f} | {p['seconds'] / alone:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wakeups": wake, "phases": phases}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
