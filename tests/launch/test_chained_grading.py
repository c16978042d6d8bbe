"""Grading chained to generation (`launch.stages.generate_and_verify`) on real Ray actors.

Two HF engines and one verifier actor: each engine's share is graded by `score_generated` from
the generation's ObjectRef, without the driver in between, or (over the groups' lanes) sent on
by the driver the moment it is back. With seeded sampling the completions
must be those of a plain `generate`, and every score the one the grader gives in this process,
prompt by prompt, however the prompts were dealt.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = ["3+4=", "12-5=", "7*6=", "9+9=", "20-13="]


@pytest.fixture(scope="module")
def actors(tmp_path_factory):
    import ray

    from prime.models.tiny import build_tiny_model
    from workers.group import ActorGroup, init_ray
    from workers.rollout import RolloutWorker
    from workers.verifier import VerifierWorker

    path = _digit_biased(build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0))
    init_ray("local", num_cpus=4, env_vars={"OMP_NUM_THREADS": "1"})
    rollout = ActorGroup(RolloutWorker, 2, name="rollout",
                         kwargs=dict(engine="hf", model_path=path, engine_kwargs=dict(dtype="float32")))
    verifier = ActorGroup(VerifierWorker, 1, name="verifier",
                          kwargs=dict(num_workers=1, timeout_s=10.0, code_case_timeout_s=5.0))
    rollout.call(lambda a, r: a.ready.remote())
    yield path, rollout, verifier
    rollout.shutdown()
    verifier.shutdown()
    ray.shutdown()


def _digit_biased(path: str) -> str:
    """The random model made to favour digits, so most of its responses end in a number to grade.

    Column 0 of the tied embedding is set to 1 for every token and to 1.4 for the digits: every
    input then puts a positive value on hidden coordinate 0, which survives the small random
    layers, and the tied head gives each digit a few nats more than any other token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weight = model.get_input_embeddings().weight.data
    weight[:, 0] = 1.0
    weight[[tok.convert_tokens_to_ids(str(d)) for d in range(10)], 0] = 1.4
    model.save_pretrained(path)
    return path


def _prompts(path: str, ground_truths: list[str]):
    from transformers import AutoTokenizer

    from prime.data.dataset import PromptItem

    tok = AutoTokenizer.from_pretrained(path)
    return [PromptItem(index=i, prompt_ids=tok(q)["input_ids"], prompt_text=q, ground_truth=gt, ability="math",
                       data_source="arith", raw={}, source_row=i)
            for i, (q, gt) in enumerate(zip(QUESTIONS, ground_truths))]


@pytest.mark.parametrize("lanes", [False, True], ids=["ray", "lanes"])
def test_chained_grading_scores_each_response_of_its_own_prompt(actors, lanes):
    from launch.stages import Sampling, StageTimer, generate, generate_and_verify
    from prime.verifiers.math import extract_answer, score

    path, rollout, verifier = actors
    for group in (rollout, verifier):
        group.close_lanes()
        group.allow_lanes(False)
    s = Sampling(n=3, max_new_tokens=12, temperature=1.0, top_p=1.0, accuracy=False, acc_low=0.0, acc_high=1.0,
                 drop_truncated=False, max_rounds=1, oversample=1.0)
    seeds = {0: 101, 1: 202}
    # To make the scores tell prompts apart, each prompt's ground truth is the answer its second
    # sample gives (where it gives one), or a number none of its samples gives.
    plain, _ = generate(rollout, [p.prompt_ids for p in _prompts(path, ["0"] * len(QUESTIONS))], n=s.n,
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                        seed_of_engine=seeds.get)
    truths = [extract_answer(comps[1].text) or "987654321" for comps in plain]
    prompts = _prompts(path, truths)

    timer = StageTimer()
    for group in (rollout, verifier):  # over the lanes (`workers/lane.py`) the results must be the same
        assert group.allow_lanes(lanes) == lanes
    completions, scores, metrics = generate_and_verify(rollout, verifier, prompts, s, seeds.get, timer)
    assert (rollout._lanes is not None) == lanes and (verifier._lanes is not None) == lanes

    assert [[c.token_ids for c in comps] for comps in completions] == [[c.token_ids for c in comps] for comps in plain]
    expected = [[score(c.text, p.ground_truth) for c in comps] for p, comps in zip(prompts, completions)]
    assert scores == expected
    assert any(extract_answer(comps[1].text) for comps in plain), "no sample gave an answer: the test shows nothing"
    assert all(row[1] == 1.0 for row, comps in zip(scores, plain) if extract_answer(comps[1].text))
    assert metrics["verify/items"] == len(QUESTIONS) * s.n and metrics["verify/errors"] == 0.0
    # Only the grading after the last engine finished counts as compute, never more than the grading took.
    assert 0.0 <= timer.metrics["compute/verify"] < timer.metrics["timing/generate"] + timer.metrics["timing/verify"]
