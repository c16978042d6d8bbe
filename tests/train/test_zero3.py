"""ZeRO-3 on one CPU process: a model built under zero.Init and streamed from its checkpoint trains and
scores like the ZeRO-2 one, its weights stream out bucket by bucket, and the PRM's reference can be
sharded or offloaded without changing its scores."""

from __future__ import annotations

import json
import os

import pytest
import torch

from prime.train.engine import EngineSettings

pytestmark = pytest.mark.slow


def _trainer(path, stage: int, lr: float = 1e-2):
    from prime.train.losses import PPOClipLoss
    from prime.train.trainer import Trainer

    return Trainer(path, PPOClipLoss(), EngineSettings(lr=lr, zero_stage=stage), mini_batch_size=8,
                   max_tokens_per_micro_batch=30)


def _ppo_batch(trainer, make_batch):
    batch = make_batch(8, group_size=4, seed=5)
    logp = trainer.logprobs(batch)
    gen = torch.Generator().manual_seed(6)
    return batch.replace(old_logp=logp, advantages=torch.randn(logp.shape, generator=gen) * batch.response_mask)


def test_zero3_trains_and_scores_like_zero2(tiny_model_path, make_batch):
    z2, z3 = _trainer(tiny_model_path, 2), _trainer(tiny_model_path, 3)
    batch = _ppo_batch(z2, make_batch)
    # The same fp32 weights and the same forward; ZeRO-3 only stores them partitioned.
    assert torch.allclose(z3.logprobs(batch), batch.old_logp, atol=1e-6, rtol=0)
    m2, _ = z2.update(batch)
    m3, _ = z3.update(batch)
    # Same gradients up to summation order (ZeRO-3 reduces per parameter partition).
    assert m3["policy/grad_norm"] == pytest.approx(m2["policy/grad_norm"], rel=1e-5)
    w2, w3 = z2.named_weights(), z3.named_weights()
    assert list(w2) == list(w3)
    # Two Adam steps at lr 1e-2 from the same gradients (up to float noise, amplified where a
    # gradient is near 0 by Adam's division by sqrt(v)).
    assert max(float((w2[k] - w3[k]).abs().max()) for k in w2) < 1e-4
    assert not z3.offload_states()  # nothing to free on a CPU machine


def test_zero3_weights_stream_bucket_by_bucket(tiny_model_path):
    from prime.rollout.weight_transfer import plan_buckets

    tr = _trainer(tiny_model_path, 3)
    full = tr.named_weights()
    specs = tr.weight_specs()
    assert [s[0] for s in specs] == list(full) and specs[-1][0] == "lm_head.weight"
    assert all(tuple(full[n].shape) == shape and full[n].dtype == dtype for n, shape, dtype in specs)
    buckets = plan_buckets(specs, 20_000)  # ~20 KB: the 82 KB embedding alone, the rest packed
    seen = []
    for named in tr.weight_buckets(buckets):
        for name, t in named.items():
            assert torch.equal(t, full[name]), name
            seen.append(name)
    assert sorted(seen) == sorted(full) and len(buckets) > 5


def test_stream_checkpoint_names_a_missing_tensor(tiny_model_path, tmp_path):
    import shutil

    from prime.train.engine import ds_config
    from prime.train.zero3 import build_partitioned_model, checkpoint_files

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the checkpoint has 2 layers
    config["layer_types"] = config["layer_types"] + config["layer_types"][-1:]
    config["max_window_layers"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="model.layers.2"):
        build_partitioned_model(str(broken), torch.float32, ds_config(EngineSettings(lr=1.0, zero_stage=3)))
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint_files(str(broken))


@pytest.mark.parametrize("placement", ["sharded", "offload"])
def test_prm_reference_placements_score_alike(tiny_model_path, make_batch, placement):
    from prime.train.prm import build_implicit_prm

    kw = dict(beta=0.5, mini_batch_size=4, max_tokens_per_micro_batch=30)
    settings = EngineSettings(lr=1e-3, zero_stage=3, gradient_checkpointing=True)
    replicated = build_implicit_prm(tiny_model_path, settings, **kw)
    placed = build_implicit_prm(tiny_model_path, settings, ref_placement=placement, **kw)
    batch = make_batch(8, group_size=4, seed=3).replace(scores=torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 1]))
    want = replicated.with_reference(batch).ref_logp
    got = placed.with_reference(batch).ref_logp
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # the same weights, gathered per layer
    # A fresh PRM equals its reference: rewards are exactly zero whichever way the reference lives.
    rewards, _ = placed.update_and_rewards(batch, mode="none")
    assert torch.equal(rewards, torch.zeros_like(rewards))
    with pytest.raises(ValueError, match="'everywhere'.*replicated"):
        build_implicit_prm(tiny_model_path, settings, ref_placement="everywhere", **kw)


def test_offload_params_needs_zero3():
    with pytest.raises(ValueError, match="zero_stage=3"):
        EngineSettings(lr=1.0, zero_stage=2, offload_params=True)
