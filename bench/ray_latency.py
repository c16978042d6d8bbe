"""What one call to an actor costs on this machine, there and back, by what it carries: a Ray
actor call against the same call over a lane (`workers/lane.py`).

    python bench/ray_latency.py [--calls 300] [--rounds 3] [--busy 2] [--compiled]

The floor under prime's per-step overhead (`timing/overhead`): a step makes four such calls that
the next stage waits for (generation, the chained grading's answer, the policy update, the weight
sync's answer). A local Ray instance bound to 127.0.0.1 starts one idle actor; the driver calls its
echo method `--calls` times per payload and transport and prints the median round trip, in
`--rounds` rounds so that the machine's drift shows. `--busy N` runs N processes that spin on the
CPU meanwhile (the cores as busy as in a step's compute). `--compiled` adds Ray's compiled graphs
(one echo through a compiled DAG) and the CPU time its idle actor burns in 2 s. Payloads:

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


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median_ms(call, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per payload, transport and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--compiled", action="store_true", help="also Ray's compiled graphs")
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1 or args.busy < 0:
        parser.error(f"--calls and --rounds must be >= 1 and --busy >= 0, got {args.calls}, {args.rounds} "
                     f"and {args.busy}")
    import multiprocessing as mp

    import ray

    from workers.group import init_ray
    from workers.lane import LaneServer, open_lanes

    class EchoWorker(LaneServer):
        def echo(self, x):
            return x

        def pid(self) -> int:
            return os.getpid()

    init_ray("local", num_cpus=2)
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    compiled_idle = None
    try:
        actor = ray.remote(num_cpus=0)(EchoWorker).remote()
        items = payloads()
        for x in items.values():  # first calls: worker start-up and imports
            ray.get(actor.echo.remote(x))
        pid = ray.get(actor.pid.remote())
        for p in spinners:
            p.start()
        transports = ["ray", "lane"] + (["compiled"] if args.compiled else [])
        table = {(name, t): [] for name in items for t in transports}
        for _ in range(args.rounds):
            for name, x in items.items():
                table[(name, "ray")].append(_median_ms(lambda: ray.get(actor.echo.remote(x)), args.calls))
            lane = open_lanes([actor], "echo")[0]
            for name, x in items.items():
                table[(name, "lane")].append(_median_ms(lambda: (lane.submit("echo", x), lane.result()), args.calls))
            lane.close()
            if args.compiled:
                compiled_idle = _compiled_round(actor, pid, items, table, args.calls)
    finally:
        stop.set()
        for p in spinners:
            p.join()
        ray.shutdown()
    print(f"median round trip to an idle actor, ms ({args.calls} calls a round; {args.busy} spinning processes; "
          f"load {os.getloadavg()[0]:.2f}):")
    print("| payload | transport | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
    print("|---|---|" + "---|" * args.rounds)
    for (name, transport), values in table.items():
        print(f"| {name} | {transport} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    if compiled_idle is not None:
        print(f"CPU seconds the compiled graph's actor spent in 2 s waiting for input: {compiled_idle:.2f}")


def _compiled_round(actor, pid: int, items: dict, table: dict, calls: int) -> float:
    """One round through a Ray compiled graph of the echo; returns the CPU seconds its actor (process
    `pid`) spent in 2 s of waiting for the next input."""
    import ray
    from ray.dag import InputNode

    with InputNode() as inp:
        dag = actor.echo.bind(inp)
    graph = dag.experimental_compile()
    try:
        for name, x in items.items():
            ray.get(graph.execute(x))
            table[(name, "compiled")].append(_median_ms(lambda: ray.get(graph.execute(x)), calls))
        c0 = _cpu_seconds(pid)
        time.sleep(2.0)  # the graph stays compiled: its actor waits on its input channel
        return _cpu_seconds(pid) - c0
    finally:
        graph.teardown()


if __name__ == "__main__":
    main()
