"""What one Ray actor call costs on this machine, there and back, by what it carries.

    python bench/ray_latency.py [--calls 300] [--rounds 3]

The floor under prime's per-step overhead (`timing/overhead`): a step makes four such calls that
the next stage waits for (generation, the chained grading's answer, the policy update, the weight
sync's answer). A local Ray instance bound to 127.0.0.1 starts one idle actor; the driver calls its
echo method `--calls` times per payload and prints the median round trip, in `--rounds` rounds so
that the machine's drift shows. Payloads:

    int           a Python int
    list          32 lists of 24 floats (the shape of a tiny step's sampling log-probs)
    numpy         a float32 array 8 x 64
    torch         a float32 tensor 8 x 64 (a tensor pickles through its storage object)
    torch x4      four such tensors
    batch         a `prime.data.batch.Batch` of 32 rows x 60 columns (its fields cross as numpy)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def payloads() -> dict:
    import numpy as np
    import torch

    from prime.data.batch import pack_sequences

    rows = 32
    batch = pack_sequences([[1] * 36] * rows, [[2] * 24] * rows, pad_id=0)
    batch = batch.replace(old_logp=torch.zeros(rows, 24), advantages=torch.zeros(rows, 24),
                          group_ids=torch.arange(rows), scores=torch.zeros(rows))
    return {
        "int": 1,
        "list": [[0.1] * 24 for _ in range(32)],
        "numpy": np.zeros((8, 64), np.float32),
        "torch": torch.zeros(8, 64),
        "torch x4": [torch.zeros(8, 64) for _ in range(4)],
        "batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per payload and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1:
        parser.error(f"--calls and --rounds must be >= 1, got {args.calls} and {args.rounds}")
    import ray

    from workers.group import init_ray

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x):
            return x

    init_ray("local", num_cpus=2)
    try:
        actor = Echo.remote()
        items = payloads()
        for x in items.values():  # first calls: worker start-up and imports
            ray.get(actor.echo.remote(x))
        table = {name: [] for name in items}
        for _ in range(args.rounds):
            for name, x in items.items():
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    ray.get(actor.echo.remote(x))
                    times.append(time.perf_counter() - t0)
                table[name].append(1e3 * statistics.median(times))
    finally:
        ray.shutdown()
    print(f"median round trip to an idle actor, ms ({args.calls} calls a round; load {os.getloadavg()[0]:.2f}):")
    print("| payload | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
    print("|---|" + "---|" * args.rounds)
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
