"""After a weight sync, the vLLM engine scores a fixed response exactly as the policy worker does.

Real Ray actors: one `PolicyWorker` (DeepSpeed ZeRO-2 on CPU) and one `RolloutWorker` running the
vLLM CPU engine, both built from the same tiny checkpoint.
"""

import pytest
import ray
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def actors(tmp_path_factory):
    from launch.roles import policy_args
    from prime.config import build_config
    from prime.models.tiny import build_tiny_model
    from workers.group import ActorGroup, init_ray
    from workers.policy import PolicyWorker
    from workers.rollout import RolloutWorker

    path = build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=3)
    cfg = build_config(None, ["trainer.batch_size=1", "rollout.n=4", "actor.lr=0.01", "rollout.max_response_len=16"])
    init_ray("local", num_cpus=4, env_vars={"VLLM_LOGGING_LEVEL": "WARNING"})
    rollout = ActorGroup(RolloutWorker, 1, name="rollout", kwargs=dict(
        engine="vllm", model_path=path,
        engine_kwargs=dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0)))
    policy = ActorGroup(PolicyWorker, 1, name="policy")
    loss, settings, kwargs = policy_args(cfg, total_optimizer_steps=10)
    policy.call(lambda a, r: a.build.remote(path, loss, settings, kwargs))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    yield policy, rollout, tok
    ray.get(rollout.actors[0].shutdown.remote())
    policy.shutdown()
    rollout.shutdown()
    ray.shutdown()


def fixed_batch(tok):
    from prime.data.batch import pack_sequences

    prompt = tok.apply_chat_template([{"role": "user", "content": "Compute 3+4."}], add_generation_prompt=True)
    prompt = prompt if isinstance(prompt[0], int) else prompt["input_ids"]
    responses = [tok.encode("7 is the answer: \\boxed{7}", add_special_tokens=False) + [tok.eos_token_id],
                 tok.encode("3+4=8", add_special_tokens=False)]
    prompts = [list(prompt), list(prompt)]
    return prompts, responses, pack_sequences(prompts, responses, tok.pad_token_id)


def engine_logprobs(rollout, prompts, responses):
    out = ray.get(rollout.actors[0].score_logprobs.remote(prompts, responses))
    width = max(len(r) for r in responses)
    t = torch.zeros(len(responses), width)
    for i, row in enumerate(out):
        t[i, : len(row)] = torch.tensor(row)
    return t


def policy_logprobs(policy, batch):
    (logp, _), = policy.call(lambda a, r: a.logprobs.remote(batch))
    return torch.tensor(logp)  # the training verbs return numpy (workers.training.wire)


def test_vllm_logprobs_follow_the_policy_after_weight_sync(actors):
    from workers.weight_sync import ObjectStoreSync

    policy, rollout, tok = actors
    prompts, responses, batch = fixed_batch(tok)
    mask = batch.response_mask

    before_engine = engine_logprobs(rollout, prompts, responses)
    before_policy = policy_logprobs(policy, batch)
    # vLLM's CPU kernels vs the DeepSpeed-wrapped transformers model, both fp32.
    assert ((before_engine - before_policy).abs() * mask).max() < 1e-4

    # A real PPO update with a large learning rate moves the policy.
    update = batch.replace(old_logp=before_policy, advantages=torch.tensor([[1.0], [-1.0]]) * mask)
    ((metrics, _), _), = policy.call(lambda a, r: a.update.remote(update))
    assert metrics["policy/grad_norm"] > 0
    after_policy = policy_logprobs(policy, batch)
    assert ((after_policy - before_policy).abs() * mask).max() > 1e-2

    stale = engine_logprobs(rollout, prompts, responses)
    assert ((stale - after_policy).abs() * mask).max() > 1e-2  # the engine still has the old weights

    ObjectStoreSync(policy, rollout).sync()
    synced = engine_logprobs(rollout, prompts, responses)
    assert ((synced - after_policy).abs() * mask).max() < 1e-4  # as before the update
    assert ((synced - before_engine).abs() * mask).max() > 1e-2
