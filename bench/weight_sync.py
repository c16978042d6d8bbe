"""Weight-sync seconds and peak memory: policy rank 0 -> rollout engines, by transport and model shape.

    .venv/bin/python bench/weight_sync.py                                   # tiny and small, HF engines
    .venv/bin/python bench/weight_sync.py --shapes qwen2-0.5b --engine vllm --kinds broadcast,ipc \\
        --bucket-mb 256 --repeats 2                                          # a 0.5B Qwen2 shape into vLLM

One policy actor (DeepSpeed on the CPU; ZeRO-3 by default, so every bucket is a gather) and
`--engines` rollout actors on a local Ray instance, all from one random checkpoint of the given
shape. Each transport syncs once to warm up, then `--repeats` times. The table gives the median
seconds of a whole sync as the driver sees it and its parts, and the largest peak-RSS growth of the
sender process and of the receiving processes (vLLM's worker, or the HF actor) during a sync, from
/proc (VmHWM reset before each sync). The actors run with a fixed glibc mmap threshold so RSS
follows live memory. The last lines project the measured rate and the memory bounds to a 7B model
in bf16 (docs/gpu_memory.md has the arithmetic).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20
# Random Qwen2-shaped checkpoints (tied embeddings; head_dim 64, which vLLM's CPU attention takes).
SHAPES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, head_dim=64),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, head_dim=64),
    "mid": dict(hidden_size=512, num_layers=16, num_heads=8, head_dim=64, num_kv_heads=2, intermediate_size=2048),
    "qwen2-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, head_dim=64, num_kv_heads=2,
                       intermediate_size=4864, vocab_size=151936),
    "qwen2-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=24, head_dim=64, num_kv_heads=4,
                       intermediate_size=8960, vocab_size=151936),
}
# Qwen2.5-7B (the PRIME 7B policy): hidden 3584, 28 layers, kv 4 x 128, MLP 18944, vocab 152064, untied.
SEVEN_B = dict(params=7.615e9, bf16_bytes=15.23e9, layer_bytes=466e6, tensor_bytes=1.09e9)


def _build(policy_cls, rollout_cls, path: str, args):
    from prime.train.engine import EngineSettings
    from prime.train.losses import PPOClipLoss
    from workers.group import ActorGroup

    policy = ActorGroup(policy_cls, 1, name="bench-policy")
    policy.call(lambda a, r: a.build.remote(path, PPOClipLoss(), EngineSettings(lr=1e-4, zero_stage=args.zero),
                                            dict(mini_batch_size=1, max_tokens_per_micro_batch=1024)))
    kwargs = dict(dtype="float32")
    if args.engine == "vllm":
        kwargs |= dict(max_model_len=256, enforce_eager=True, cpu_kv_cache_gib=0.25)
    rollout = ActorGroup(rollout_cls, args.engines, name="bench-rollout",
                         kwargs=dict(engine=args.engine, model_path=path, engine_kwargs=kwargs))
    rollout.call(lambda a, r: a.ready.remote())
    return policy, rollout


def _measured_sync(ws, policy, rollout) -> dict:
    """One sync with the peak RSS growth of the sender and of the receiving processes."""
    import ray

    s0 = ray.get(policy.actors[0].memory.remote(True))
    r0 = [m for ms in rollout.call(lambda a, r: a.memory.remote(True)) for m in ms]
    metrics = ws.sync()
    s1 = ray.get(policy.actors[0].memory.remote())
    r1 = [m for ms in rollout.call(lambda a, r: a.memory.remote()) for m in ms]
    return metrics | {"sender_mb": (s1["peak"] - s0["rss"]) / MiB,
                      "receiver_mb": max(b["peak"] - a["rss"] for a, b in zip(r0, r1)) / MiB}


def _layer_and_tensor(buckets) -> tuple[int, int]:
    sizes: dict[str, int] = {}
    largest = 0
    for b in buckets:
        for s in b.slots:
            n = s.numel * (b.nbytes // b.numel)
            key = re.match(r"model\.layers\.\d+\.", s.name)
            sizes[key.group(0) if key else s.name] = sizes.get(key.group(0) if key else s.name, 0) + n
            largest = max(largest, n)
    return max(sizes.values()), largest


def bench_shape(shape: str, args, tmp: str) -> list[dict]:
    from prime.models.tiny import build_tiny_model
    from workers.policy import PolicyWorker
    from workers.rollout import RolloutWorker
    from workers.weight_sync import make_weight_sync

    path = build_tiny_model(os.path.join(tmp, shape), vocab="byte", **SHAPES[shape])
    policy, rollout = _build(PolicyWorker, RolloutWorker, path, args)
    rows = []
    try:
        for kind in args.kinds.split(","):
            ws = make_weight_sync(kind, policy, rollout, args.bucket_mb)
            try:
                runs = [_measured_sync(ws, policy, rollout) for _ in range(1 + args.repeats)]
                layer, tensor = _layer_and_tensor(ws.buckets) if hasattr(ws, "buckets") else (0, 0)
            finally:
                ws.close()
            rows.append(_row(shape, kind, runs, layer, tensor))
    finally:
        policy.shutdown()
        rollout.shutdown()
    return rows


def _row(shape: str, kind: str, runs: list[dict], layer: int, tensor: int) -> dict:
    steady = runs[1:] or runs

    def med(key: str) -> float:
        return statistics.median(r.get(key, float("nan")) for r in steady)

    return dict(shape=shape, transport=kind, mb=med("weight_sync/bytes") / MiB, buckets=med("weight_sync/buckets"),
                seconds=med("weight_sync/seconds"), gather=med("weight_sync/gather_seconds"),
                send=med("weight_sync/broadcast_seconds"), load=med("weight_sync/load_seconds"),
                first_s=runs[0]["weight_sync/seconds"], sender_mb=max(r["sender_mb"] for r in runs),
                receiver_mb=max(r["receiver_mb"] for r in runs), layer_mb=layer / MiB, tensor_mb=tensor / MiB)


def _print(rows: list[dict], args) -> None:
    print(f"\nweight sync, {args.engines} {args.engine} engine(s), ZeRO-{args.zero} sender, bucket {args.bucket_mb} MiB, "
          f"median of {args.repeats} after a first sync, {os.cpu_count()} CPU cores")
    header = (f"{'shape':<11} {'transport':<12} {'MiB':>8} {'buckets':>7} {'sync s':>7} {'first s':>7} {'gather':>7} "
              f"{'send':>7} {'load':>7} {'sender +MiB':>11} {'recv +MiB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:<11} {r['transport']:<12} {r['mb']:8.1f} {r['buckets']:7.0f} {r['seconds']:7.2f} "
              f"{r['first_s']:7.2f} {r['gather']:7.2f} {r['send']:7.2f} {r['load']:7.2f} {r['sender_mb']:11.1f} "
              f"{r['receiver_mb']:9.1f}")
    for r in rows:
        if r["transport"] == "object_store":
            continue
        rate = r["mb"] * MiB / r["seconds"]
        # A tensor over the bucket size travels alone: the 7B embedding and head (1.09 GB) are the
        # largest bucket and, as modules, the largest "layer" too.
        b = max(args.bucket_mb * MiB, SEVEN_B["tensor_bytes"])
        layer = max(SEVEN_B["layer_bytes"], SEVEN_B["tensor_bytes"])
        recv = b + 2 * layer + SEVEN_B["tensor_bytes"]
        print(f"7B bf16 projection ({r['transport']}, {r['shape']}): {SEVEN_B['bf16_bytes'] / 1e9:.1f} GB at this "
              f"machine's {rate / 1e6:.0f} MB/s = {SEVEN_B['bf16_bytes'] / rate:.0f} s; extra memory per sync: sender "
              f"<= 4 x largest bucket = {4 * b / 1e9:.1f} GB, each receiver <= "
              f"{recv / 1e9:.1f} GB (whole-state-dict sync: >= {SEVEN_B['bf16_bytes'] / 1e9:.1f} GB per process)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,small", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--kinds", default="object_store,broadcast,ipc")
    ap.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")

    import ray

    from workers.group import init_ray

    init_ray("local", num_cpus=args.num_cpus, env_vars={"OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                                                       "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in args.shapes.split(","):
                rows += bench_shape(shape, args, tmp)
    finally:
        ray.shutdown()
    _print(rows, args)


if __name__ == "__main__":
    main()
