"""ImplicitPRMScorer on tiny local checkpoints: q = 0 when PRM == REF, hand-checkable q otherwise."""

import math
import shutil

import pytest
import torch

from prime.eval.prm import ImplicitPRMScorer, check_same_vocab
from prime.models.loading import load_model, load_tokenizer
from prime.models.tiny import build_tiny_model
from prime.rollout.hf import HFEngine

RESPONSE_TEXT = "2 + 2 = 4.\nso\n\\boxed{4}"


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("ref")), seed=0)


def _uniform_copy(src: str, dst: str) -> str:
    """`src` with the final RMSNorm weight zeroed: every hidden state, hence every logit, is 0, so
    the model is uniform over its vocabulary: log p(token) = -ln V exactly, whatever the context."""
    shutil.copytree(src, dst)
    model = load_model(src)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def uniform_prm_path(ref_path, tmp_path_factory):
    return _uniform_copy(ref_path, str(tmp_path_factory.mktemp("prm") / "uniform"))


def _pairs(tokenizer):
    """Two prompts and responses of different lengths (the second ends with eos, as engines emit)."""
    prompts = [tokenizer("Compute 2+2.", add_special_tokens=False)["input_ids"],
               tokenizer("What is 1 + 1? Answer:", add_special_tokens=False)["input_ids"]]
    responses = [tokenizer(RESPONSE_TEXT, add_special_tokens=False)["input_ids"],
                 tokenizer("1 + 1 = 2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    return prompts, responses


def test_prm_equal_to_ref_gives_zero_log_ratios(ref_path):
    scorer = ImplicitPRMScorer(ref_path, ref_path, beta=0.05, micro_batch_size=1)
    prompts, responses = _pairs(scorer.tokenizer)
    for q in scorer.log_ratios(prompts, responses):
        assert torch.count_nonzero(q) == 0  # the same weights give the same floats: exactly 0
    for s in scorer.score(prompts, responses):
        assert s.sum == 0.0 and s.min == 0.0 and set(s.steps) == {0.0}


def test_two_different_uniform_models_also_give_zero(ref_path, uniform_prm_path, tmp_path):
    # A different random model, also made uniform: different weights, identical distributions.
    other = build_tiny_model(str(tmp_path / "other_base"), seed=1)
    other_uniform = _uniform_copy(other, str(tmp_path / "other_uniform"))
    scorer = ImplicitPRMScorer(uniform_prm_path, other_uniform)
    prompts, responses = _pairs(scorer.tokenizer)
    for q in scorer.log_ratios(prompts, responses):
        assert torch.count_nonzero(q) == 0


def test_uniform_prm_against_ref_gives_hand_checkable_scores(ref_path, uniform_prm_path):
    beta = 0.05
    scorer = ImplicitPRMScorer(uniform_prm_path, ref_path, beta=beta, micro_batch_size=2)
    prompts, responses = _pairs(scorer.tokenizer)
    vocab = load_model(ref_path).config.vocab_size  # 512 for the tiny tokenizer
    # The reference's own log-probs, through the HF engine's scoring path.
    ref_logp = HFEngine(ref_path).score_logprobs(prompts, responses)
    # q[t] = log(1/V) - log p_ref(y_t) = -ln 512 - ref_logp[t]
    expected_q = [[-math.log(vocab) - lp for lp in row] for row in ref_logp]
    got_q = scorer.log_ratios(prompts, responses)
    for got, want in zip(got_q, expected_q):
        assert got.tolist() == pytest.approx(want, abs=1e-5)  # fp32 logsumexp of 512 logits

    first = scorer.score(prompts, responses)[0]
    # Tokens of RESPONSE_TEXT: '2',' +',' ','2',' =',' ','4','.','\n' | 's','o','\n' | '\\boxed','{','4','}'
    assert scorer.token_pieces(responses[0]) == ["2", " +", " ", "2", " =", " ", "4", ".", "\n",
                                                 "s", "o", "\n", "\\boxed", "{", "4", "}"]
    q = expected_q[0]
    steps = [beta * sum(q[0:9]), beta * sum(q[9:12]), beta * sum(q[12:16])]
    assert first.steps == pytest.approx(steps, abs=1e-5)  # fp32 sums of 3-9 terms
    assert first.min == pytest.approx(min(steps), abs=1e-5)  # same
    assert first.sum == pytest.approx(beta * sum(q), abs=1e-5)  # same, 16 terms


def test_micro_batching_does_not_change_the_scores(ref_path, uniform_prm_path):
    one = ImplicitPRMScorer(uniform_prm_path, ref_path, micro_batch_size=1)
    prompts, responses = _pairs(one.tokenizer)
    together = ImplicitPRMScorer(uniform_prm_path, ref_path, micro_batch_size=8)
    for a, b in zip(one.log_ratios(prompts, responses), together.log_ratios(prompts, responses)):
        # padding changes the matmul shapes, hence fp32 summation order
        assert a.tolist() == pytest.approx(b.tolist(), abs=1e-5)


def test_mismatched_tokenizers_are_refused(ref_path, tmp_path):
    byte_model = build_tiny_model(str(tmp_path / "byte"), vocab="byte")
    with pytest.raises(ValueError, match="share one tokenizer"):
        check_same_vocab(load_tokenizer(ref_path), load_tokenizer(byte_model), "a", "b")
    with pytest.raises(ValueError, match="share one tokenizer"):
        ImplicitPRMScorer(ref_path, byte_model)


def test_empty_responses_are_refused(ref_path):
    scorer = ImplicitPRMScorer(ref_path, ref_path)
    with pytest.raises(ValueError, match="response 0 is empty"):
        scorer.log_ratios([[1, 2]], [[]])
