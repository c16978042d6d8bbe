"""Prompt data: verl / Eurus-2-RL schema datasets, the resumable prompt sampler, synthetic tasks.

    from prime.data import load_prompt_dataset, PromptSampler
    ds = load_prompt_dataset("data/train.parquet", tokenizer, max_prompt_len=1024)
    sampler = PromptSampler(len(ds), batch_size=256, seed=0)
    batch = ds.batch(sampler.next_batch())
"""

from prime.data.dataset import (
    DataError,
    PromptDataset,
    PromptItem,
    RowError,
    build_prompt_dataset,
    load_prompt_dataset,
    read_rows,
)
from prime.data.sampler import PromptSampler, epoch_permutation

__all__ = [
    "DataError",
    "PromptDataset",
    "PromptItem",
    "PromptSampler",
    "RowError",
    "build_prompt_dataset",
    "epoch_permutation",
    "load_prompt_dataset",
    "read_rows",
]
