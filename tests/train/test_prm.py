"""The implicit PRM (trainer + PRM loss + frozen reference) on a tiny Qwen2 model with DeepSpeed on the CPU."""

from __future__ import annotations

import pytest
import torch

from prime.train.engine import EngineSettings

pytestmark = pytest.mark.slow

ACC = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def _prm(path, **kw):
    from prime.train.prm import build_implicit_prm

    args = dict(beta=0.5, mini_batch_size=4, max_tokens_per_micro_batch=30)
    args.update(kw)
    return build_implicit_prm(path, EngineSettings(lr=1e-3, grad_clip=10.0), **args)


def _params(prm):
    return {n: p.detach().clone() for n, p in prm.trainer.engine.module.named_parameters()}


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _labelled(make_batch, seed, acc=ACC):
    return make_batch(8, group_size=4, seed=seed).replace(scores=acc)


@pytest.mark.parametrize("loss", ["ce", "dpo"])
def test_prm_update_changes_weights_and_before_differs_from_none(make_batch, tiny_model_path, loss):
    from prime.algo.implicit_prm import token_rewards

    prm = _prm(tiny_model_path, loss=loss)
    batch = _labelled(make_batch, seed=3)
    mask = batch.response_mask
    # A fresh PRM equals its frozen reference, and both are scored pass by pass alike: q is exactly
    # 0 everywhere, so every reward is exactly 0.
    r_none, m_none = prm.update_and_rewards(batch, mode="none")
    assert torch.equal(r_none, torch.zeros_like(mask))
    assert set(m_none) == {"prm/acc", "prm/rank_acc"}

    before = _params(prm)
    r_before, metrics = prm.update_and_rewards(batch, mode="before")
    assert _max_diff(before, _params(prm)) > 1e-5
    assert metrics["prm/num_steps"] == 2.0
    # Before the first step Q = 0: BCE = log 2 for every response; each DPO pair -log sigmoid(0) = log 2.
    # The reported loss averages both mini-batches, the second one after one step, so it is close.
    assert metrics["prm/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.2)
    assert {"prm/acc", "prm/rank_acc", "prm/grad_norm", "prm/lr"} <= set(metrics)
    assert not torch.allclose(r_before, r_none)
    assert torch.all(r_before[mask == 0] == 0)
    # batch_norm: the largest |reverse cumulative sum| of the rewards is 1, up to the 1e-6 eps of
    # the divisor relative to sums of order 1e-2.
    rev = r_before.flip(-1).cumsum(-1).flip(-1)
    assert float((rev.abs() * mask).max()) == pytest.approx(1.0, abs=1e-4)
    # Rewards agree with the algo function applied to the updated PRM's log-probs on the whole batch
    # (same passes, so only the reward arithmetic could differ; it is the same function).
    ref = prm.trainer.logprobs(batch, model=prm.ref_model)
    expected = token_rewards(prm.trainer.logprobs(batch), ref, mask, 0.5)
    assert torch.equal(r_before, expected)


def test_prm_after_mode_uses_pre_step_scores(make_batch, tiny_model_path):
    prm = _prm(tiny_model_path, mini_batch_size=8)
    batch = _labelled(make_batch, seed=4)
    before = _params(prm)
    # One mini-batch: its rewards come from the forward pass before the only step, where the PRM
    # still equals the reference. The reference is scored with the same passes (the trainer's
    # plan), so q is exactly 0 and so is every reward, although the weights changed. (Scored with
    # different passes, q would be rounding noise of ~1e-7, which batch_norm divides by the largest
    # |reverse cumulative sum| + 1e-6 and so blows up to rewards of order 0.1.)
    rewards, metrics = prm.update_and_rewards(batch, mode="after")
    assert metrics["prm/num_steps"] == 1.0
    assert _max_diff(before, _params(prm)) > 1e-5
    assert torch.equal(rewards, torch.zeros_like(rewards))
    # With two mini-batches the second one is scored after the first step: not all zero.
    prm2 = _prm(tiny_model_path, mini_batch_size=4)
    rewards2, _ = prm2.update_and_rewards(batch, mode="after")
    assert torch.equal(rewards2[:4], torch.zeros(4, rewards2.shape[1]))
    assert float(rewards2[4:].abs().sum()) > 0


def test_prm_with_policy_reference_needs_ref_logp(make_batch, tiny_model_path, tmp_path):
    prm = _prm(tiny_model_path, ref="policy", loss="dpo")
    assert prm.ref_model is None
    batch = _labelled(make_batch, seed=5)
    with pytest.raises(ValueError, match="ref_logp"):
        prm.update_and_rewards(batch, mode="none")
    old_logp = prm.trainer.logprobs(batch)
    _, metrics = prm.update_and_rewards(batch.replace(ref_logp=old_logp), mode="before")
    assert metrics["prm/num_steps"] == 2.0
    assert "lm_head.weight" in prm.trainer.named_weights()
    prm.trainer.save_checkpoint(str(tmp_path / "prm"))
    prm.trainer.load_checkpoint(str(tmp_path / "prm"))


def test_prm_dpo_without_pairs_skips_the_step(make_batch, tiny_model_path):
    prm = _prm(tiny_model_path, loss="dpo", mini_batch_size=8)
    batch = _labelled(make_batch, seed=6, acc=torch.ones(8))
    before = _params(prm)
    _, metrics = prm.update_and_rewards(batch, mode="after")
    assert metrics["prm/num_steps"] == 0.0
    assert _max_diff(before, _params(prm)) == 0.0  # no step: the weights are the very same tensors' values


def test_prm_rejects_bad_settings(tiny_model_path):
    with pytest.raises(ValueError, match="granularity"):
        _prm(tiny_model_path, granularity="step")
    with pytest.raises(ValueError, match="prm.loss"):
        _prm(tiny_model_path, loss="mse")


@pytest.mark.parametrize("loss", ["ce", "dpo"])
def test_prm_updates_move_q_towards_the_labels(make_batch, tiny_model_path, loss):
    """The direction of learning: a few updates on one labelled batch make the correct responses'
    Q larger than the incorrect ones' (rank accuracy 1) and, for CE, lower the loss below log 2."""
    from prime.algo.implicit_prm import sequence_rewards

    prm = _prm(tiny_model_path, loss=loss, mini_batch_size=8)
    batch = _labelled(make_batch, seed=5)
    for _ in range(8):
        _, metrics = prm.update_and_rewards(batch, mode="before")
    ref = prm.trainer.logprobs(batch, model=prm.ref_model)
    q = sequence_rewards(prm.trainer.logprobs(batch), ref, batch.response_mask, 0.5)  # [B]
    correct, wrong = q[ACC == 1], q[ACC == 0]
    # Every correct response of a group above every incorrect one of the same group.
    for g in range(2):
        rows = batch.group_ids == g
        assert q[rows & (ACC == 1)].min() > q[rows & (ACC == 0)].max()
    assert correct.mean() > wrong.mean()
    if loss == "ce":
        assert metrics["prm/loss"] < 0.6  # log 2 = 0.693 at the start; 8 steps at lr 1e-3 fit 8 rows
