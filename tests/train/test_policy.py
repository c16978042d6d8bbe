"""PolicyTrainer on a tiny Qwen2 model with DeepSpeed on the CPU (ZeRO-2, one process)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def _trainer(path, **kw):
    from prime.train.policy import PolicyTrainer

    args = dict(lr=1e-3, mini_batch_size=8, max_tokens_per_micro_batch=10_000, zero_stage=2)
    args.update(kw)
    return PolicyTrainer(path, **args)


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _ppo_batch(trainer, make_batch, seed=0):
    batch = make_batch(8, group_size=4, seed=seed)
    logp = trainer.compute_logprobs(batch)
    gen = torch.Generator().manual_seed(seed + 100)
    mask = batch["response_mask"]
    # Old log-probs off by up to +-0.5 so that some ratios leave the clip range.
    batch["old_logp"] = (logp + (torch.rand(logp.shape, generator=gen) - 0.5)) * mask
    batch["advantages"] = torch.randn(logp.shape, generator=gen) * mask
    batch["scores"] = torch.rand(8, generator=gen)
    return batch


def test_ppo_update_matches_algo_loss_and_changes_weights(make_batch, tiny_model_path):
    from prime.algo.policy_loss import ppo_clip_loss
    from prime.models.logprobs import response_logprobs

    tr = _trainer(tiny_model_path, max_tokens_per_micro_batch=30)
    batch = _ppo_batch(tr, make_batch)
    before = _params(tr)
    # Expected loss: the algo function on the full batch with the weights before the step.
    with torch.no_grad():
        logp = response_logprobs(tr.engine.module, batch["input_ids"], batch["attention_mask"],
                                 batch["position_ids"], batch["response_mask"])
        expected, expected_m = ppo_clip_loss(logp, batch["old_logp"], batch["advantages"], batch["response_mask"])
    metrics = tr.update(batch)
    assert metrics["policy/pg_loss"] == pytest.approx(float(expected), abs=1e-5)
    assert metrics["policy/clip_frac"] == pytest.approx(expected_m["policy/clip_frac"], abs=1e-6)
    assert metrics["policy/approx_kl"] == pytest.approx(expected_m["policy/approx_kl"], abs=1e-5)
    assert metrics["policy/num_steps"] == 1.0 and metrics["policy/lr"] == pytest.approx(1e-3)
    assert metrics["policy/grad_norm"] > 0 and metrics["policy/entropy"] > 0
    assert _max_diff(before, _params(tr)) > 1e-5
    # compute_logprobs agrees with the plain forward pass of the model.
    assert torch.allclose(tr.compute_logprobs(batch), response_logprobs(
        tr.engine.module, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
        batch["response_mask"]).detach(), atol=1e-5)


@pytest.mark.parametrize("loss_kind,loss_agg", [("ppo", "token-mean"), ("ppo", "seq-mean-token-sum-norm"), ("gvpo", "token-mean")])
def test_update_is_the_same_with_one_or_many_micro_batches(make_batch, tiny_model_path, loss_kind, loss_agg):
    from prime.train.batching import make_micro_batches
    from prime.train.forward import sequence_lengths

    kw = dict(loss_kind=loss_kind, loss_agg=loss_agg, entropy_coef=0.01, mini_batch_size=4)
    one = _trainer(tiny_model_path, max_tokens_per_micro_batch=10_000, **kw)
    many = _trainer(tiny_model_path, max_tokens_per_micro_batch=20, **kw)
    batch = _ppo_batch(one, make_batch)
    # The small budget really splits each mini-batch of 4 (one group for gvpo) into several micro-batches.
    mini = {k: v[:4] for k, v in batch.items()}
    assert len(make_micro_batches(sequence_lengths(mini), 20)) > 1
    m1, m2 = one.update(batch), many.update(batch)
    assert m1["policy/num_steps"] == m2["policy/num_steps"] == 2.0
    assert m1["policy/loss"] == pytest.approx(m2["policy/loss"], abs=1e-6)
    assert m1["policy/grad_norm"] == pytest.approx(m2["policy/grad_norm"], rel=1e-5)
    assert _max_diff(_params(one), _params(many)) < 1e-6


def test_gvpo_update_with_whole_groups(make_batch, tiny_model_path):
    tr = _trainer(tiny_model_path, loss_kind="gvpo", mini_batch_size=4, max_tokens_per_micro_batch=15)
    batch = _ppo_batch(tr, make_batch)
    before = _params(tr)
    metrics = tr.update(batch)
    assert metrics["policy/num_steps"] == 2.0
    assert metrics["gvpo/loss"] > 0 and metrics["gvpo/residual_rms"] > 0
    assert _max_diff(before, _params(tr)) > 1e-5


def test_checkpoint_round_trip_restores_weights_and_optimizer(make_batch, tiny_model_path, tmp_path):
    kw = dict(lr_warmup_steps=3)
    a = _trainer(tiny_model_path, **kw)
    a.update(_ppo_batch(a, make_batch, seed=1))
    a.save_checkpoint(str(tmp_path / "ckpt"))
    batch2 = _ppo_batch(a, make_batch, seed=2)
    b = _trainer(tiny_model_path, **kw)
    b.load_checkpoint(str(tmp_path / "ckpt"))
    assert _max_diff(_params(a), _params(b)) == 0.0
    # One more step on each: equal only if Adam moments and the warm-up position were restored
    # (a fresh optimizer would take a different, larger first step at lr 1/3 of 2/3).
    ma, mb = a.update(batch2), b.update(batch2)
    assert ma["policy/lr"] == mb["policy/lr"] == pytest.approx(2e-3 / 3)
    assert _max_diff(_params(a), _params(b)) < 1e-7
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
        assert torch.equal(state[name], tensor), name
    AutoTokenizer.from_pretrained(out)
