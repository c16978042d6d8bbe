"""Weight-sync throughput: object store vs bucketed broadcast, policy rank 0 -> HF engine actors.

    .venv/bin/python bench/weight_sync.py                    # tiny and small presets, 1 engine
    .venv/bin/python bench/weight_sync.py --engines 2 --repeats 5 --bucket-mb 64

One policy actor (DeepSpeed ZeRO-2 on the CPU) and `--engines` HF rollout actors on a local Ray
instance. Each transport syncs once to warm up, then `--repeats` times; the table gives the median
seconds of a whole sync as the driver sees it (gather + transfer + load), its parts, and MB/s of
checkpoint bytes per second of that whole sync.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_preset(preset: str, engines: int, repeats: int, bucket_mb: float, tmp: str) -> list[dict]:
    from prime.models.tiny import build_tiny_model, tiny_model_preset
    from prime.train.engine import EngineSettings
    from prime.train.losses import PPOClipLoss
    from workers.group import ActorGroup
    from workers.policy import PolicyWorker
    from workers.rollout import RolloutWorker
    from workers.weight_sync import make_weight_sync

    path = build_tiny_model(os.path.join(tmp, preset), **tiny_model_preset(preset))
    policy = ActorGroup(PolicyWorker, 1, name=f"bench-policy-{preset}")
    policy.call(lambda a, r: a.build.remote(path, PPOClipLoss(), EngineSettings(lr=1e-4, zero_stage=2),
                                            dict(mini_batch_size=1, max_tokens_per_micro_batch=1024)))
    rollout = ActorGroup(RolloutWorker, engines, name=f"bench-rollout-{preset}",
                         kwargs=dict(engine="hf", model_path=path, engine_kwargs=dict(dtype="float32")))
    rollout.call(lambda a, r: a.ready.remote())
    rows = []
    try:
        for kind in ("object_store", "broadcast"):
            ws = make_weight_sync(kind, policy, rollout, bucket_mb)
            try:
                ws.sync()  # warm-up
                runs = [ws.sync() for _ in range(repeats)]
            finally:
                ws.close()

            def med(key: str) -> float:
                return statistics.median(r.get(key, float("nan")) for r in runs)

            rows.append(dict(
                preset=preset, transport=kind, mb=med("weight_sync/bytes") / 2**20, buckets=med("weight_sync/buckets"),
                seconds=med("weight_sync/seconds"), gather=med("weight_sync/gather_seconds"),
                broadcast=med("weight_sync/broadcast_seconds"), load=med("weight_sync/load_seconds"),
                mb_per_s=med("weight_sync/mb_per_s"),
            ))
    finally:
        policy.shutdown()
        rollout.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args()

    import ray

    from workers.group import init_ray

    init_ray("local", num_cpus=args.num_cpus)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for preset in args.presets.split(","):
                rows += bench_preset(preset, args.engines, args.repeats, args.bucket_mb, tmp)
    finally:
        ray.shutdown()

    print(f"\nweight sync, {args.engines} HF engine(s), bucket {args.bucket_mb} MB, median of {args.repeats}, "
          f"{os.cpu_count()} CPU cores")
    header = f"{'preset':<6} {'transport':<12} {'MB':>7} {'buckets':>7} {'sync s':>8} {'gather s':>8} " \
             f"{'bcast s':>8} {'load s':>8} {'MB/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['preset']:<6} {r['transport']:<12} {r['mb']:7.2f} {r['buckets']:7.0f} {r['seconds']:8.4f} "
              f"{r['gather']:8.4f} {r['broadcast']:8.4f} {r['load']:8.4f} {r['mb_per_s']:8.1f}")


if __name__ == "__main__":
    main()
