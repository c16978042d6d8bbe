"""Padding-free passes in the trainer, the implicit PRM and the KL reference (tiny Qwen2, DeepSpeed on the CPU)."""

from __future__ import annotations

import pytest
import torch

from prime.train.engine import EngineSettings
from prime.train.losses import PPOClipLoss

pytestmark = pytest.mark.slow

# fp32: a packed pass multiplies matrices of other shapes than the padded one, so sums run in another
# order; about 10 ulps of log-probs of size ~6 (the same bound as tests/models/test_packing.py).
ATOL = 5e-6


def _trainer(path, padding_free, **kw):
    from prime.train.trainer import Trainer

    args = dict(mini_batch_size=8, max_tokens_per_micro_batch=30, padding_free=padding_free)
    args.update(kw)
    return Trainer(path, PPOClipLoss(), EngineSettings(lr=10.0, eps=1e4, zero_stage=2), **args)


def _ppo_batch(batch, logp, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    mask = batch.response_mask
    old_logp = (logp + (torch.rand(logp.shape, generator=gen) - 0.5)) * mask
    return batch.replace(old_logp=old_logp, advantages=torch.randn(logp.shape, generator=gen) * mask)


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


def test_plan_counts_real_tokens(make_batch, tiny_model_path):
    from prime.train.batching import make_micro_batches

    batch = make_batch(8, group_size=4, seed=0)  # lengths 14, 8, 8, 12, 4, 8, 6, 7
    lengths = batch.lengths()
    padded, packed = _trainer(tiny_model_path, False, max_tokens_per_micro_batch=20), \
        _trainer(tiny_model_path, True, max_tokens_per_micro_batch=20)
    assert padded.plan(batch) == [make_micro_batches(lengths, 20)] == [[[0], [3], [1, 2], [5, 7], [4, 6]]]
    assert packed.plan(batch) == [make_micro_batches(lengths, 20, padding_free=True)] == [[[0], [1, 3], [2, 5], [4, 6, 7]]]


def test_trainer_logprobs_and_update_match_padded(make_batch, tiny_model_path):
    padded, packed = _trainer(tiny_model_path, False), _trainer(tiny_model_path, True)
    batch = make_batch(8, group_size=4, seed=0)
    want, got = padded.logprobs(batch), packed.logprobs(batch)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got[batch.response_mask == 0] == 0).all()
    batch = _ppo_batch(batch, want)
    start = _params(padded)
    (m1, logp1), (m2, logp2) = padded.update(batch), packed.update(batch)
    # The packed update's first pass is the packed no-grad pass, bit for bit (same plan, same weights).
    assert torch.equal(logp2, got)
    assert m2["policy/loss"] == pytest.approx(m1["policy/loss"], abs=1e-6)  # fp32 sums of order-1 terms
    assert m2["policy/grad_norm"] == pytest.approx(m1["policy/grad_norm"], rel=1e-5)
    # Adam with eps 1e4 steps by lr * m / eps, linear in the gradient (see test_policy.py): the weights
    # (< 4 in size, fp32 spacing 2.4e-7) end a few roundings apart although they moved by far more.
    p1, p2 = _params(padded), _params(packed)
    assert max(float((p1[k] - start[k]).abs().max()) for k in p1) > 2e-5
    assert max(float((p1[k] - p2[k]).abs().max()) for k in p1) < 1e-6


def test_shared_prompts_keep_groups_and_match_padded(make_batch, tiny_model_path):
    """A prompt's samples packed against one copy of it (`share_prompts`): the plan keeps each group in
    one micro-batch, and log-probs, loss and the updated weights are the padded ones up to rounding."""
    padded, shared = _trainer(tiny_model_path, False), _trainer(tiny_model_path, True, share_prompts=True)
    assert shared.share_prompts
    batch = make_batch(8, group_size=4, seed=2, same_prompt=True)
    micro = [set(mb) for mini in shared.plan(batch) for mb in mini]
    assert all(set(range(4 * g, 4 * g + 4)) <= mb for mb in micro for g in {i // 4 for i in mb})  # whole groups
    want, got = padded.logprobs(batch), shared.logprobs(batch)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    batch = _ppo_batch(batch, want)
    start = _params(padded)
    (m1, _), (m2, _) = padded.update(batch), shared.update(batch)
    assert m2["policy/loss"] == pytest.approx(m1["policy/loss"], abs=1e-6)  # as in the test above
    assert m2["policy/grad_norm"] == pytest.approx(m1["policy/grad_norm"], rel=1e-5)
    p1, p2 = _params(padded), _params(shared)
    assert max(float((p1[k] - start[k]).abs().max()) for k in p1) > 2e-5
    assert max(float((p1[k] - p2[k]).abs().max()) for k in p1) < 1e-6


def test_prm_rewards_match_padded(make_batch, tiny_model_path):
    from prime.train.prm import build_implicit_prm

    batch = make_batch(8, group_size=4, seed=3, same_prompt=True).replace(scores=torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 1]))
    rewards = []
    for padding_free, share in ((False, False), (True, False), (True, True)):
        prm = build_implicit_prm(tiny_model_path, EngineSettings(lr=1e-3, grad_clip=10.0), beta=0.5, mini_batch_size=4,
                                 max_tokens_per_micro_batch=30, padding_free=padding_free, share_prompts=share)
        ref = prm.with_reference(batch).ref_logp
        # A fresh PRM equals its reference and both run the same packed passes: q is exactly 0.
        assert torch.equal(prm.log_ratios(batch.replace(ref_logp=ref)), torch.zeros_like(ref))
        rewards.append(prm.update_and_rewards(batch, mode="before")[0])
    # Rewards (up to ~0.2) are beta x log-ratios after one update each, divided by batch_norm's ~1e-2
    # divisor, so the log-prob rounding above comes back a few times larger (3e-7 measured).
    torch.testing.assert_close(rewards[1], rewards[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards[2], rewards[0], atol=1e-5, rtol=0)


def test_kl_reference_worker_matches_padded(make_batch, tiny_model_path):
    from workers.reference import ReferenceWorker

    batch = make_batch(8, group_size=4, seed=1)
    kw = dict(dtype="float32", max_tokens_per_micro_batch=30, temperature=0.7)
    want, _ = ReferenceWorker(tiny_model_path, **kw).logprobs(batch)
    got, _ = ReferenceWorker(tiny_model_path, padding_free=True, **kw).logprobs(batch)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    shared = make_batch(8, group_size=4, seed=1, same_prompt=True)
    want, _ = ReferenceWorker(tiny_model_path, **kw).logprobs(shared)
    got, _ = ReferenceWorker(tiny_model_path, padding_free=True, share_prompts=True, **kw).logprobs(shared)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("share", [False, True], ids=["packed", "shared-prompts"])
def test_zero3_sharded_reference_and_checkpointing(make_batch, tiny_model_path, share):
    """ZeRO-3 partitions, a sharded reference behind an EngineCaller (index tensor as logits_to_keep),
    and gradient checkpointing (the packed attention recomputed in backward) give the padded numbers,
    with each prompt packed once for its group too."""
    from prime.train.prm import build_implicit_prm

    batch = make_batch(8, group_size=4, seed=3, same_prompt=share).replace(scores=torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 1]))
    settings = EngineSettings(lr=1e-3, zero_stage=3, gradient_checkpointing=True)
    kw = dict(beta=0.5, mini_batch_size=4, max_tokens_per_micro_batch=30, ref_placement="sharded")
    padded = build_implicit_prm(tiny_model_path, settings, **kw)
    packed = build_implicit_prm(tiny_model_path, settings, padding_free=True, share_prompts=share, **kw)
    assert packed.trainer.share_prompts == share
    want, got = padded.with_reference(batch).ref_logp, packed.with_reference(batch).ref_logp
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert torch.equal(packed.update_and_rewards(batch, mode="none")[0], torch.zeros_like(got))
    r_want, r_got = padded.update_and_rewards(batch)[0], packed.update_and_rewards(batch)[0]
    torch.testing.assert_close(r_got, r_want, atol=1e-5, rtol=0)  # as in test_prm_rewards_match_padded
