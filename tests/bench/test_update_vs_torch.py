"""bench/update_vs_torch.py compares equal work: the plain PyTorch side scores the same response
tokens of the same rows as prime's trainer, and its step changes the weights."""

import pytest
import torch

from bench.update_vs_torch import padded_logprobs, point_batch, torch_step
from bench.vs_trl import model_and_data


@pytest.fixture(scope="module")
def tiny_point(tmp_path_factory):
    return model_and_data("tiny", str(tmp_path_factory.mktemp("point")))


def test_point_batch_is_the_points_prompts_k_times(tiny_point):
    batch = point_batch("tiny", *tiny_point)
    assert len(batch) == 32  # 8 prompts x K=4
    prompt_width = batch.input_ids.shape[1] - batch.response_width
    prompts = batch.input_ids[:, :prompt_width]
    for g in range(8):
        assert all(torch.equal(prompts[4 * g], prompts[4 * g + j]) for j in range(1, 4))
    lengths = batch.response_mask.sum(1)
    assert lengths.min() >= 12 and lengths.max() <= 24  # [cap/2, cap]
    assert batch.group_ids.tolist() == [i // 4 for i in range(32)]
    assert torch.all(batch.advantages[batch.response_mask == 0] == 0)


def test_plain_side_scores_what_prime_scores(tiny_point):
    from transformers import AutoModelForCausalLM

    from prime.models.logprobs import response_logprobs

    model_path, data = tiny_point
    batch = point_batch("tiny", model_path, data)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        plain = padded_logprobs(model, batch)
        packed = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                   batch.response_mask, padding_free=True)
    mask = batch.response_mask.bool()
    # Padded attention (masked sdpa over the whole row) and packed attention (per-sequence causal
    # sdpa) add the same fp32 terms in different orders; log-probs of ~-6 nats then agree to ~1e-6.
    torch.testing.assert_close(plain[mask], packed[mask], rtol=0, atol=1e-4)

    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    torch_step(model, opt, batch)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
