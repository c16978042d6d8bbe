"""One data-parallel rank of tests/train/test_distributed.py (run as a script with RANK/WORLD_SIZE set).

Usage: python dp_worker.py MODEL_PATH OUT_FILE
Trains one PPO update (2 optimizer steps of 8 responses) on this rank's shard of a fixed
16-response batch and saves the resulting parameters and metrics to OUT_FILE.
"""

from __future__ import annotations

import os
import sys

import torch


def main(model_path: str, out_file: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import _make_batch

    from prime.train.engine import EngineSettings
    from prime.train.losses import PPOClipLoss
    from prime.train.trainer import Trainer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    trainer = Trainer(model_path, PPOClipLoss(), EngineSettings(lr=1e-3, zero_stage=2), mini_batch_size=8,
                      max_tokens_per_micro_batch=25)
    batch = _make_batch(16, group_size=4, seed=11)
    logp = trainer.logprobs(batch)
    gen = torch.Generator().manual_seed(12)
    mask = batch.response_mask
    batch = batch.replace(old_logp=(logp + 0.4 * (torch.rand(logp.shape, generator=gen) - 0.5)) * mask,
                          advantages=torch.randn(logp.shape, generator=gen) * mask)
    # Mini-batch j of the single-rank run is rows 8j..8j+7; with W ranks each rank holds 8/W of
    # those rows, so the union over ranks of every local mini-batch is the same set of rows.
    per_rank = 8 // world
    rows = [j * 8 + rank * per_rank + i for j in range(2) for i in range(per_rank)]
    metrics, _ = trainer.update(batch.select(rows))
    params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    torch.save({"params": params, "metrics": metrics}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
