"""Both weight-sync transports on a real policy actor (DeepSpeed ZeRO-2 on CPU) and an HF engine actor.

After a real PPO update the engines score a fixed response differently from the policy; after a
sync their log-probs equal the policy's `logprobs` (within 1e-5, both fp32 on the CPU).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
RESPONSES = [[12, 13, 14], [15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def actors(tmp_path_factory):
    import ray

    from prime.models.tiny import build_tiny_model
    from workers.group import ActorGroup, init_ray
    from workers.policy import PolicyWorker
    from workers.rollout import RolloutWorker

    path = build_tiny_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=64, num_layers=2, num_heads=1,
                            head_dim=64, vocab="byte", seed=0)
    from prime.train.engine import EngineSettings
    from prime.train.losses import PPOClipLoss

    init_ray("local", num_cpus=4, env_vars={"OMP_NUM_THREADS": "1"})
    policy = ActorGroup(PolicyWorker, 1, name="policy")
    policy.call(lambda a, r: a.build.remote(path, PPOClipLoss(), EngineSettings(lr=1e-2, zero_stage=2),
                                            dict(mini_batch_size=2, max_tokens_per_micro_batch=10_000)))
    # One engine keeps start-up short; several receivers are covered by the channel tests.
    rollout = ActorGroup(RolloutWorker, 1, name="rollout",
                         kwargs=dict(engine="hf", model_path=path, engine_kwargs=dict(dtype="float32")))
    rollout.call(lambda a, r: a.ready.remote())
    yield policy, rollout
    policy.shutdown()
    rollout.shutdown()
    ray.shutdown()


def _batch(pad_id: int = 0):
    from prime.data.batch import pack_sequences

    return pack_sequences(PROMPTS, RESPONSES, pad_id)


def _policy_logp(policy) -> list[list[float]]:
    import ray

    from prime.models.logprobs import unpack_response_logprobs

    batch = _batch()
    logp, _ = ray.get(policy.actors[0].logprobs.remote(batch))
    return unpack_response_logprobs(torch.tensor(logp), batch.response_mask)


def _engine_logp(rollout) -> list[list[list[float]]]:
    return rollout.call(lambda a, r: a.score_logprobs.remote(PROMPTS, RESPONSES))


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _perturb(policy, seed: int, then=None):
    """One real PPO step with random advantages (old_logp = current log-probs, so ratio 1); `then()`
    runs once the update is submitted, before it is waited for. Returns what `then` returned."""
    import ray

    batch = _batch()
    logp = torch.tensor(ray.get(policy.actors[0].logprobs.remote(batch))[0])
    gen = torch.Generator().manual_seed(seed)
    batch = batch.replace(old_logp=logp, advantages=torch.randn(logp.shape, generator=gen) * batch.response_mask)
    ref = policy.actors[0].update.remote(batch)
    queued = then() if then is not None else None
    (metrics, _), _ = ray.get(ref)
    assert metrics["policy/grad_norm"] > 0
    return queued


def _check_sync(policy, rollout, weight_sync, seed: int) -> dict:
    _perturb(policy, seed)
    want = _policy_logp(policy)
    for got in _engine_logp(rollout):
        assert _max_diff(got, want) > 1e-3  # the engines still hold older weights
    metrics = weight_sync.sync()
    for got in _engine_logp(rollout):
        assert _max_diff(got, want) < 1e-5  # HF engine vs the trainer's micro-batched fp32 passes
    return metrics


def test_object_store_sync(actors):
    from workers.weight_sync import make_weight_sync

    policy, rollout = actors
    ws = make_weight_sync("object_store", policy, rollout, 256)
    m = _check_sync(policy, rollout, ws, seed=1)
    assert m["weight_sync/bytes"] > 0 and m["weight_sync/buckets"] == 1.0 and m["weight_sync/seconds"] > 0
    ws.close()


def test_broadcast_sync_in_several_buckets(actors):
    from workers.weight_sync import make_weight_sync

    policy, rollout = actors
    # 0.05 MB buckets: the tiny model (about 0.3 MB with lm_head) needs several broadcasts.
    ws = make_weight_sync("broadcast", policy, rollout, 0.05)
    try:
        assert ws.backend == "gloo"
        m = _check_sync(policy, rollout, ws, seed=2)
        assert m["weight_sync/buckets"] == len(ws.buckets) > 1
        assert m["weight_sync/bytes"] == ws.nbytes
        m2 = _check_sync(policy, rollout, ws, seed=3)  # the group is reused across syncs
        assert m2["weight_sync/bytes"] == m["weight_sync/bytes"]
    finally:
        ws.close()


@pytest.mark.parametrize("kind", ["object_store", "broadcast"])
def test_sync_queued_behind_an_update_carries_the_updated_weights(actors, kind):
    # The driver starts the sync before the update has returned (launch.train.queued_sync): the
    # policy actor runs the send after the update, so the engines get the new weights.
    from workers.weight_sync import make_weight_sync

    policy, rollout = actors
    ws = make_weight_sync(kind, policy, rollout, 0.05)
    try:
        ws.sync()
        before = _policy_logp(policy)
        started = _perturb(policy, seed=4, then=ws.start)
        m = ws.finish(started)
        want = _policy_logp(policy)
        assert _max_diff(want, before) > 1e-3  # the update changed the policy
        for got in _engine_logp(rollout):
            assert _max_diff(got, want) < 1e-5
        assert m["weight_sync/bytes"] > 0 and m["weight_sync/seconds"] > 0
    finally:
        ws.close()


def test_both_transports_move_the_same_bytes(actors):
    from workers.weight_sync import make_weight_sync

    policy, rollout = actors
    obj = make_weight_sync("object_store", policy, rollout).sync()
    ws = make_weight_sync("broadcast", policy, rollout, 1)
    try:
        assert ws.sync()["weight_sync/bytes"] == obj["weight_sync/bytes"]
    finally:
        ws.close()


def test_make_weight_sync_rejects_unknown_kind():
    from workers.weight_sync import make_weight_sync

    with pytest.raises(ValueError, match="'nccl'.*object_store"):
        make_weight_sync("nccl", None, None, 1)
