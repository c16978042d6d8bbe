"""One rank of tests/train/test_zero3_loading.py (run as a script with RANK/WORLD_SIZE set).

Usage: python build_pair_worker.py MODEL_PATH WARMUP_PATH OUT_FILE
First builds everything once from the small WARMUP_PATH checkpoint (so imports and DeepSpeed's
one-time set-up are not counted), then measures this process's peak RSS above its RSS before each
phase, on MODEL_PATH:
  load: one ZeRO-3 model built under zero.Init and streamed from the checkpoint;
  pair: a policy trainer and an implicit PRM (trainer + sharded frozen reference), all ZeRO-3,
        as the PRIME 7B preset builds them;
then checks the pair scores like the checkpoint, and saves the numbers to OUT_FILE.
"""

from __future__ import annotations

import gc
import os
import sys

import torch


def build_pair(model_path: str, settings):
    from prime.train.losses import PPOClipLoss
    from prime.train.prm import build_implicit_prm
    from prime.train.trainer import Trainer

    policy = Trainer(model_path, PPOClipLoss(), settings, mini_batch_size=2, max_tokens_per_micro_batch=1000)
    prm = build_implicit_prm(model_path, settings, ref_placement="sharded", mini_batch_size=2,
                             max_tokens_per_micro_batch=1000)
    return policy, prm


def main(model_path: str, warmup_path: str, out_file: str) -> None:
    from prime.data.batch import pack_sequences
    from prime.models.loading import load_model
    from prime.models.logprobs import response_logprobs
    from prime.rollout.weight_transfer import process_memory, reset_peak_memory
    from prime.train.engine import EngineSettings, ds_config, ensure_distributed
    from prime.train.zero3 import build_partitioned_model

    ensure_distributed()
    settings = EngineSettings(lr=1e-5, zero_stage=3)
    out = {}
    warm = build_pair(warmup_path, settings)
    del warm

    gc.collect()
    start = process_memory()["rss"]
    reset_peak_memory()
    model = build_partitioned_model(model_path, settings.dtype, ds_config(settings))
    out["load"] = process_memory()["peak"] - start
    del model
    gc.collect()

    start = process_memory()["rss"]
    reset_peak_memory()
    policy, prm = build_pair(model_path, settings)
    out["pair"] = process_memory()["peak"] - start

    batch = pack_sequences([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]], 0).replace(group_ids=torch.tensor([0, 0]))
    reference = load_model(model_path)
    with torch.no_grad():
        want = response_logprobs(reference, *(getattr(batch, k) for k in batch.PACKED))  # [B, T]
    out["policy_diff"] = float((policy.logprobs(batch) - want).abs().max())
    out["ref_diff"] = float((prm.trainer.logprobs(batch, model=prm.ref_model) - want).abs().max())
    torch.save(out, out_file)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1], sys.argv[2], sys.argv[3])
