"""ImplicitPRMTrainer on a tiny Qwen2 model with DeepSpeed on the CPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

ACC = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def _prm(path, **kw):
    from prime.train.prm import ImplicitPRMTrainer

    args = dict(lr=1e-3, beta=0.5, mini_batch_size=4, max_tokens_per_micro_batch=30)
    args.update(kw)
    return ImplicitPRMTrainer(path, **args)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("loss", ["ce", "dpo"])
def test_prm_update_changes_weights_and_before_differs_from_none(make_batch, tiny_model_path, loss):
    from prime.algo.implicit_prm import token_rewards

    prm = _prm(tiny_model_path, loss=loss)
    batch = make_batch(8, group_size=4, seed=3)
    mask = batch["response_mask"]
    # A fresh PRM equals its frozen reference: q = 0 everywhere, so every reward is 0.
    r_none, m_none = prm.update_and_rewards(batch, ACC, batch["group_ids"], mode="none")
    assert torch.equal(r_none, torch.zeros_like(mask))
    assert set(m_none) == {"prm/acc", "prm/rank_acc"}

    before = _params(prm)
    r_before, metrics = prm.update_and_rewards(batch, ACC, batch["group_ids"], mode="before")
    assert _max_diff(before, _params(prm)) > 1e-5
    assert metrics["prm/num_steps"] == 2.0
    # Before the first step Q = 0: BCE = log 2 for every response; each DPO pair -log sigmoid(0) = log 2.
    # The reported loss averages both mini-batches, the second one after one step, so it is close.
    assert metrics["prm/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.2)
    assert {"prm/acc", "prm/rank_acc", "prm/grad_norm", "prm/lr"} <= set(metrics)
    assert not torch.allclose(r_before, r_none)
    assert torch.all(r_before[mask == 0] == 0)
    # batch_norm: the largest |reverse cumulative sum| of the rewards is 1 (up to the 1e-6 eps).
    rev = r_before.flip(-1).cumsum(-1).flip(-1)
    assert float((rev.abs() * mask).max()) == pytest.approx(1.0, abs=1e-4)
    # Rewards agree with the algo function applied to the updated PRM's log-probs on the whole batch.
    expected = token_rewards(prm.prm_logprobs(batch), prm.ref_logprobs(batch), mask, 0.5)
    assert torch.allclose(r_before, expected, atol=1e-6)


def test_prm_after_mode_uses_pre_step_scores(make_batch, tiny_model_path):
    prm = _prm(tiny_model_path, mini_batch_size=8)
    batch = make_batch(8, group_size=4, seed=4)
    before = _params(prm)
    # One mini-batch: its rewards come from the forward pass before the only step, where the
    # PRM still equals the reference, so all rewards are 0 although the weights changed.
    rewards, metrics = prm.update_and_rewards(batch, ACC, batch["group_ids"], mode="after")
    assert metrics["prm/num_steps"] == 1.0
    assert _max_diff(before, _params(prm)) > 1e-5
    assert torch.equal(rewards, torch.zeros_like(rewards))
    # With two mini-batches the second one is scored after the first step: not all zero.
    prm2 = _prm(tiny_model_path, mini_batch_size=4)
    rewards2, _ = prm2.update_and_rewards(batch, ACC, batch["group_ids"], mode="after")
    assert torch.equal(rewards2[:4], torch.zeros(4, rewards2.shape[1]))
    assert float(rewards2[4:].abs().sum()) > 0


def test_prm_with_policy_reference_needs_ref_logp(make_batch, tiny_model_path, tmp_path):
    prm = _prm(tiny_model_path, ref="policy", loss="dpo")
    assert prm.ref_model is None
    batch = make_batch(8, group_size=4, seed=5)
    with pytest.raises(ValueError, match="ref_logp"):
        prm.token_rewards(batch)
    old_logp = prm.prm_logprobs(batch)
    metrics = prm.update(batch, ACC, batch["group_ids"], ref_logp=old_logp)
    assert metrics["prm/num_steps"] == 2.0
    assert "lm_head.weight" in prm.named_weights()
    prm.save_checkpoint(str(tmp_path / "prm"))
    prm.load_checkpoint(str(tmp_path / "prm"))


def test_prm_dpo_without_pairs_skips_the_step(make_batch, tiny_model_path):
    prm = _prm(tiny_model_path, loss="dpo", mini_batch_size=8)
    batch = make_batch(8, group_size=4, seed=6)
    before = _params(prm)
    metrics = prm.update(batch, torch.ones(8), batch["group_ids"])
    assert metrics["prm/num_steps"] == 0.0
    assert _max_diff(before, _params(prm)) == 0.0


def test_prm_rejects_bad_settings(tiny_model_path):
    with pytest.raises(ValueError, match="granularity"):
        _prm(tiny_model_path, granularity="step")
