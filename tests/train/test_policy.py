"""The trainer with the policy losses, on a tiny Qwen2 model with DeepSpeed on the CPU (ZeRO-2, one process)."""

from __future__ import annotations

import pytest
import torch

from prime.train.engine import EngineSettings
from prime.train.losses import GVPOLoss, PPOClipLoss, Regularizers

pytestmark = pytest.mark.slow


def _trainer(path, loss=None, *, lr=1e-3, eps=1e-8, lr_warmup_steps=0, **kw):
    from prime.train.trainer import Trainer

    args = dict(mini_batch_size=8, max_tokens_per_micro_batch=10_000)
    args.update(kw)
    settings = EngineSettings(lr=lr, eps=eps, zero_stage=2, lr_warmup_steps=lr_warmup_steps)
    return Trainer(path, loss or PPOClipLoss(), settings, **args)


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _ppo_batch(trainer, make_batch, seed=0):
    from prime.algo.advantages import gvpo_centered_scores

    batch = make_batch(8, group_size=4, seed=seed)
    logp = trainer.logprobs(batch)
    gen = torch.Generator().manual_seed(seed + 100)
    mask = batch.response_mask
    # Old log-probs off by up to +-0.5 so that some ratios leave the clip range.
    old_logp = (logp + (torch.rand(logp.shape, generator=gen) - 0.5)) * mask
    advantages = torch.randn(logp.shape, generator=gen) * mask
    if isinstance(trainer.loss, GVPOLoss):  # GVPO reads R_i - mean_g R from the first token
        advantages = gvpo_centered_scores(torch.rand(8, generator=gen), batch.group_ids)[:, None] * mask
    return batch.replace(old_logp=old_logp, advantages=advantages)


def test_ppo_update_matches_algo_loss_and_changes_weights(make_batch, tiny_model_path):
    from prime.algo.policy_loss import ppo_clip_loss
    from prime.models.logprobs import response_logprobs

    tr = _trainer(tiny_model_path, max_tokens_per_micro_batch=30)
    batch = _ppo_batch(tr, make_batch)
    before = _params(tr)
    # Expected loss: the algo function on the full batch with the weights before the step.
    with torch.no_grad():
        logp = response_logprobs(tr.engine.module, batch.input_ids, batch.attention_mask, batch.position_ids,
                                 batch.response_mask)
        expected, expected_m = ppo_clip_loss(logp, batch.old_logp, batch.advantages, batch.response_mask)
    metrics, update_logp = tr.update(batch)
    # fp32 sums over micro-batches vs one full-batch sum: a few ulps of values of order 1.
    assert metrics["policy/pg_loss"] == pytest.approx(float(expected), abs=1e-5)
    assert metrics["policy/clip_frac"] == pytest.approx(expected_m["policy/clip_frac"], abs=1e-6)  # a count ratio
    assert metrics["policy/approx_kl"] == pytest.approx(expected_m["policy/approx_kl"], abs=1e-5)  # as pg_loss
    assert metrics["policy/num_steps"] == 1.0 and metrics["policy/lr"] == pytest.approx(1e-3)  # lr x factor 1.0
    assert metrics["policy/grad_norm"] > 0 and metrics["policy/entropy"] > 0
    assert _max_diff(before, _params(tr)) > 1e-5
    assert torch.allclose(update_logp, logp, atol=1e-5)  # trimmed micro-batches vs one padded pass: fp32 rounding


def test_logprobs_equal_the_first_update_pass_bit_for_bit(make_batch, tiny_model_path):
    tr = _trainer(tiny_model_path, max_tokens_per_micro_batch=30, mini_batch_size=4)
    batch = _ppo_batch(tr, make_batch)
    before = tr.logprobs(batch)
    _, update_logp = tr.update(batch)
    # Mini-batch 1 (rows 0-3) is scored before any step: same plan, same weights, same numbers.
    assert torch.equal(update_logp[:4], before[:4])
    assert not torch.equal(update_logp[4:], before[4:])  # rows 4-7 were scored after the first step


@pytest.mark.parametrize("loss", [PPOClipLoss(), PPOClipLoss(reg=Regularizers(entropy_coef=0.01)), GVPOLoss()],
                         ids=["ppo", "ppo-entropy", "gvpo"])
def test_on_policy_update_equals_the_update_after_an_old_logprob_pass(make_batch, tiny_model_path, loss):
    # One mini-batch, one epoch, several micro-batches (budget 30): the separate no-grad pass and the
    # update's own forward run the same plan on the same weights, so the old log-probs are the same
    # bits and so are the loss, its gradient and the step. Exact equality, no tolerance.
    with_pass = _trainer(tiny_model_path, loss, max_tokens_per_micro_batch=30)
    skipped = _trainer(tiny_model_path, loss, max_tokens_per_micro_batch=30)
    batch = _ppo_batch(with_pass, make_batch).replace(old_logp=None)
    assert with_pass.single_pass(batch) and len(with_pass.plan(batch)[0]) > 1
    m1, logp1 = with_pass.update(batch.replace(old_logp=with_pass.logprobs(batch)))
    m2, logp2 = skipped.update(batch, on_policy=True)
    assert torch.equal(logp1, logp2)
    assert m1 == m2
    p1, p2 = _params(with_pass), _params(skipped)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert _max_diff(p1, _params(_trainer(tiny_model_path, loss))) > 1e-5  # the step did move the weights


def test_on_policy_update_needs_a_single_pass(make_batch, tiny_model_path):
    tr = _trainer(tiny_model_path, mini_batch_size=4)
    batch = _ppo_batch(tr, make_batch).replace(old_logp=None)
    assert not tr.single_pass(batch)
    with pytest.raises(ValueError, match="single pass over the batch, but the update makes 1 epoch\\(s\\) over 2"):
        tr.update(batch, on_policy=True)


@pytest.mark.parametrize("loss", [PPOClipLoss(reg=Regularizers(entropy_coef=0.01)),
                                  PPOClipLoss(reg=Regularizers(loss_agg="seq-mean-token-sum-norm", entropy_coef=0.01)),
                                  GVPOLoss(reg=Regularizers(entropy_coef=0.01))], ids=["ppo-token-mean", "ppo-seq-norm", "gvpo"])
def test_update_is_the_same_with_one_or_many_micro_batches(make_batch, tiny_model_path, loss):
    from prime.train.batching import make_micro_batches

    # Adam with eps far above every |gradient| (here < 20) steps by lr * m / eps: linear in the
    # gradient, so summation-order rounding in the gradients stays at rounding level in the weights
    # (with the default eps Adam divides by sqrt(v) and turns a rounding difference on a near-zero
    # gradient into a step of about lr).
    kw = dict(lr=10.0, eps=1e4, mini_batch_size=4)
    one = _trainer(tiny_model_path, loss, max_tokens_per_micro_batch=10_000, **kw)
    many = _trainer(tiny_model_path, loss, max_tokens_per_micro_batch=20, **kw)
    batch = _ppo_batch(one, make_batch)
    start = _params(one)
    # The small budget really splits each mini-batch of 4 (one group for gvpo) into several micro-batches.
    assert len(make_micro_batches(batch.select(range(4)).lengths(), 20)) > 1
    (m1, _), (m2, _) = one.update(batch), many.update(batch)
    assert m1["policy/num_steps"] == m2["policy/num_steps"] == 2.0
    # Partial sums in another order: a few fp32 ulps of losses of order 1.
    assert m1["policy/loss"] == pytest.approx(m2["policy/loss"], abs=1e-6)
    assert m1["policy/grad_norm"] == pytest.approx(m2["policy/grad_norm"], rel=1e-5)  # as the loss, relative
    # Weights of magnitude < 4 after two steps of at most lr / eps * |g| = 2e-2: float32 spacing
    # there is 2.4e-7, so two roundings apart at most 5e-7.
    assert _max_diff(_params(one), start) > 2e-5  # the updates moved the weights well past the tolerance
    print("max weight difference", _max_diff(_params(one), _params(many)))
    assert _max_diff(_params(one), _params(many)) < 5e-7


def test_gvpo_update_with_whole_groups(make_batch, tiny_model_path):
    tr = _trainer(tiny_model_path, GVPOLoss(), mini_batch_size=4, max_tokens_per_micro_batch=15)
    batch = _ppo_batch(tr, make_batch)
    before = _params(tr)
    metrics, _ = tr.update(batch)
    assert metrics["policy/num_steps"] == 2.0
    assert metrics["gvpo/loss"] > 0 and metrics["gvpo/residual_rms"] > 0
    assert _max_diff(before, _params(tr)) > 1e-5


def test_missing_batch_field_names_the_stage(make_batch, tiny_model_path):
    tr = _trainer(tiny_model_path)
    with pytest.raises(ValueError, match="no old_logp, advantages"):
        tr.update(make_batch(8, group_size=4))


def test_checkpoint_round_trip_restores_weights_and_optimizer(make_batch, tiny_model_path, tmp_path):
    a = _trainer(tiny_model_path, lr_warmup_steps=3)
    a.update(_ppo_batch(a, make_batch, seed=1))
    a.save_checkpoint(str(tmp_path / "ckpt"))
    batch2 = _ppo_batch(a, make_batch, seed=2)
    b = _trainer(tiny_model_path, lr_warmup_steps=3)
    b.load_checkpoint(str(tmp_path / "ckpt"))
    assert _max_diff(_params(a), _params(b)) == 0.0  # loaded from the saved tensors, no arithmetic
    # One more step on each: equal only if Adam moments and the warm-up position were restored
    # (a fresh optimizer would take a different, larger first step at lr 1/3 of 2/3).
    (ma, _), (mb, _) = a.update(batch2), b.update(batch2)
    assert ma["policy/lr"] == mb["policy/lr"] == pytest.approx(2e-3 / 3)  # 1e-3 x 2/3 in binary floats
    assert _max_diff(_params(a), _params(b)) == 0.0  # same state, same inputs, same process: same kernels
    with pytest.raises(FileNotFoundError):
        b.load_checkpoint(str(tmp_path / "missing"))


def test_named_weights_and_save_hf(make_batch, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tr = _trainer(tiny_model_path)
    tr.update(_ppo_batch(tr, make_batch))
    weights = tr.named_weights()
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" in weights
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert all(t.device.type == "cpu" for t in weights.values())
    out = str(tmp_path / "hf")
    tr.save_hf(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    state = loaded.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name  # saved and loaded, no arithmetic
    AutoTokenizer.from_pretrained(out)
