"""Fixtures for the training tests: one tiny Qwen2 checkpoint per session and packed batches."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from prime.models.tiny import build_tiny_model

    # hidden 64, 2 layers: small enough that a DeepSpeed step takes well under a second on CPU.
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=64, num_layers=2, num_heads=1,
                            head_dim=64, vocab="byte", seed=0)


def _make_batch(n: int = 8, group_size: int = 4, seed: int = 0, vocab: int = 200, pad_id: int = 0,
                same_prompt: bool = False):
    """A packed batch of `n` random prompt/response pairs of varied lengths, in groups of `group_size`
    (with `same_prompt`, a group's rows answer one prompt, as a rollout's samples do)."""
    from prime.data.batch import pack_sequences

    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(n):
        p_len = int(torch.randint(2, 7, (1,), generator=gen))
        r_len = int(torch.randint(1, 9, (1,), generator=gen))
        prompt = torch.randint(1, vocab, (p_len,), generator=gen).tolist()
        prompts.append(prompts[-1] if same_prompt and i % group_size else prompt)
        responses.append(torch.randint(1, vocab, (r_len,), generator=gen).tolist())
    return pack_sequences(prompts, responses, pad_id).replace(group_ids=torch.arange(n) // group_size)


@pytest.fixture
def make_batch():
    """Factory fixture: `make_batch(n, group_size, seed, same_prompt=False)` -> packed `Batch` with group_ids."""
    return _make_batch
