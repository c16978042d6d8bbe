import pytest
import torch

from prime.data.batch import pack_sequences
from prime.models.logprobs import response_logprobs, unpack_response_logprobs
from prime.rollout.base import Completion, RolloutEngine
from prime.rollout.hf import HFEngine

PROMPTS = [[1, 40, 41, 42, 2, 202, 1], [1, 50], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return HFEngine(tiny_model_path, seed=0)


def _reference_logprobs(model, completions, temperature=1.0):
    """response_logprobs of the sampled tokens, one list per completion."""
    batch = pack_sequences([c.prompt_ids for c in completions], [c.token_ids for c in completions], pad_id=3)
    with torch.no_grad():
        logp = response_logprobs(model, *(getattr(batch, k) for k in batch.PACKED), temperature=temperature)
    return unpack_response_logprobs(logp, batch.response_mask)


def _check_conventions(completions, tokenizer, eos_id, max_new_tokens):
    for c in completions:
        assert isinstance(c, Completion)
        assert len(c.logprobs) == len(c.token_ids) >= 1
        assert all(lp <= 0 for lp in c.logprobs)
        if c.finish_reason == "stop":
            # eos is kept as the last token and appears nowhere else
            assert c.token_ids[-1] == eos_id and eos_id not in c.token_ids[:-1]
        else:
            assert c.finish_reason == "length"
            assert len(c.token_ids) == max_new_tokens and eos_id not in c.token_ids
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_generate_shapes_and_conventions(engine):
    out = engine.generate(PROMPTS, n=4, max_new_tokens=6, seed=3)
    assert len(out) == 3 and all(len(group) == 4 for group in out)
    for prompt, group in zip(PROMPTS, out):
        assert all(c.prompt_ids == prompt for c in group)
    _check_conventions([c for g in out for c in g], engine.tokenizer, engine.tokenizer.eos_token_id, 6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_response_logprobs(engine, temperature):
    out = engine.generate(PROMPTS, n=3, max_new_tokens=8, temperature=temperature, seed=1)
    flat = [c for g in out for c in g]
    reference = _reference_logprobs(engine.model, flat, temperature)
    for c, ref in zip(flat, reference):
        # KV-cache decoding vs one full fp32 forward pass: same math, other kernels and shapes.
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref), atol=1e-5, rtol=0)


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine):
    # With top_p < 1 the sampling distribution is the nucleus renormalised, so every returned
    # log-prob is >= the untruncated one, by log(1 / nucleus mass) > 0.
    out = engine.generate(PROMPTS, n=2, max_new_tokens=5, top_p=0.5, seed=2)
    flat = [c for g in out for c in g]
    for c, ref in zip(flat, _reference_logprobs(engine.model, flat)):
        assert all(lp > r + 1e-3 for lp, r in zip(c.logprobs, ref))


def test_seeds(engine):
    a = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=11)
    b = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=11)
    c = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=12)
    ids = lambda out: [x.token_ids for g in out for x in g]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # Without a seed, successive calls draw different samples.
    assert ids(engine.generate(PROMPTS, n=2, max_new_tokens=6)) != ids(engine.generate(PROMPTS, n=2, max_new_tokens=6))


def test_without_logprobs_samples_the_same_tokens(engine):
    a = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=11)
    b = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=11, logprobs=False)
    assert [x.token_ids for g in a for x in g] == [x.token_ids for g in b for x in g]
    assert all(x.logprobs == [] for g in b for x in g)


def test_greedy_repeats_the_argmax(engine):
    out = engine.generate(PROMPTS[:1], n=3, max_new_tokens=4, temperature=0.0)
    group = out[0]
    assert group[0].token_ids == group[1].token_ids == group[2].token_ids
    with torch.no_grad():
        first = engine.model(torch.tensor([PROMPTS[0]])).logits[0, -1].argmax().item()
    assert group[0].token_ids[0] == first


def test_score_logprobs_matches_response_logprobs(engine):
    responses = [[100, 101, 102], [110], [120, 121]]
    scores = engine.score_logprobs(PROMPTS, responses)
    assert [len(s) for s in scores] == [3, 1, 2]
    batch = pack_sequences(PROMPTS, responses, pad_id=3)
    with torch.no_grad():
        ref = unpack_response_logprobs(response_logprobs(engine.model, *(getattr(batch, k) for k in batch.PACKED)), batch.response_mask)
    assert scores == ref


def test_load_weights_changes_generation_and_finish_reasons(tiny_model_path, eos_biased_embedding):
    engine = HFEngine(tiny_model_path)
    eos = engine.tokenizer.eos_token_id
    emb = engine.model.state_dict()["model.embed_tokens.weight"]
    before = engine.score_logprobs(PROMPTS, [[eos]] * 3)
    # boost 2: eos has probability ~0.9 at every step, so (almost) everything stops at once.
    engine.load_weights([("model.embed_tokens.weight", eos_biased_embedding(emb, eos, boost=2.0))])
    after = engine.score_logprobs(PROMPTS, [[eos]] * 3)
    assert all(a[0] > -0.5 > b[0] for a, b in zip(after, before))
    out = engine.generate(PROMPTS, n=4, max_new_tokens=5, seed=0)
    flat = [c for g in out for c in g]
    assert sum(c.token_ids == [eos] for c in flat) >= 9
    assert all(c.text == "" for c in flat if c.token_ids == [eos])
    _check_conventions(flat, engine.tokenizer, eos, 5)
    # boost 1.3: eos ~ a few % per step, so stops after several tokens and length caps mix.
    engine.load_weights([("model.embed_tokens.weight", eos_biased_embedding(emb, eos, boost=1.3))])
    flat = [c for g in engine.generate(PROMPTS, n=8, max_new_tokens=10, seed=0) for c in g]
    reasons = {c.finish_reason for c in flat}
    assert reasons == {"stop", "length"}
    assert any(c.finish_reason == "stop" and len(c.token_ids) > 1 for c in flat)
    _check_conventions(flat, engine.tokenizer, eos, 10)
    for c, ref in zip(flat, _reference_logprobs(engine.model, flat)):  # tolerance as above
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref), atol=1e-5, rtol=0)


def test_load_weights_is_strict(engine):
    with pytest.raises(KeyError, match="'model.nope.weight'.*valid names include"):
        engine.load_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight.*shape \\(3,\\), expected \\(128,\\)"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])
    emb = engine.model.state_dict()["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="tied weights .*different values"):
        engine.load_weights([("model.embed_tokens.weight", emb + 1), ("lm_head.weight", emb)])


def test_bad_arguments(engine):
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        engine.generate(PROMPTS, n=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\], got 1.5"):
        engine.generate(PROMPTS, n=1, max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], n=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="response 0 is empty"):
        engine.score_logprobs([[1]], [[]])


def test_sleep_wake_shutdown_are_safe(tiny_model_path):
    engine = HFEngine(tiny_model_path)
    engine.sleep()
    engine.wake_up()
    assert engine.generate([[1, 2]], n=1, max_new_tokens=2)[0][0].finish_reason in ("stop", "length")
    engine.shutdown()
    assert engine.model is None


def test_safetensors_chunks_bound_each_message():
    from safetensors.torch import load

    from prime.rollout.vllm import safetensors_chunks

    a, b, c = torch.zeros(10), torch.ones(300), torch.full((5,), 2.0)
    tied = {"x": a, "y": b, "z": c, "y_alias": b}
    # 1 KiB chunks: x (40 B) + y (1200 B) reach 1 KiB and close the first chunk; z (20 B) and the
    # alias of y (1200 B, cloned: safetensors refuses shared storage) close the second.
    chunks = [load(blob) for blob in safetensors_chunks(tied.items(), 1024)]
    assert [sorted(ch) for ch in chunks] == [["x", "y"], ["y_alias", "z"]]
    assert torch.equal(chunks[1]["y_alias"], b) and torch.equal(chunks[0]["x"], a)
