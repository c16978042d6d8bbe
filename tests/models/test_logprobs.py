import pytest
import torch

from prime.models.loading import load_model
from prime.data.batch import pack_sequences
from prime.models.logprobs import response_logprobs, unpack_response_logprobs

PAD = 3


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return load_model(tiny_model_path)


def _packed(batch):
    return [getattr(batch, k) for k in batch.PACKED]


def _hand_loop_logprobs(model, prompt, response, temperature=1.0):
    """Reference: one unpadded forward per response token, log_softmax of the last logits."""
    out = []
    for t in range(len(response)):
        ids = torch.tensor([prompt + response[:t]])
        logits = model(ids).logits[0, -1].double() / temperature
        out.append(torch.log_softmax(logits, dim=-1)[response[t]].item())
    return out


PROMPTS = [[1, 40, 41, 42, 43, 44, 2], [1, 50], [60, 61, 62, 63]]
RESPONSES = [[100, 101], [110, 111, 112, 113, 114, 115], [120]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_matches_hand_loop(model, temperature):
    batch = pack_sequences(PROMPTS, RESPONSES, pad_id=PAD)
    with torch.no_grad():
        logp = response_logprobs(model, *_packed(batch), temperature=temperature)
    assert logp.shape == (3, 6)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        expected = torch.tensor(_hand_loop_logprobs(model, p, r, temperature), dtype=torch.float64)
        # fp32 padded batch vs float64 log-softmax of unpadded fp32 logits: a few fp32 ulps of values ~5.
        torch.testing.assert_close(logp[b, : len(r)].double(), expected, atol=1e-5, rtol=0)
        assert (logp[b, len(r) :] == 0).all()  # padding positions are exactly 0


def test_entropy_matches_definition(model):
    batch = pack_sequences(PROMPTS, RESPONSES, pad_id=PAD)
    with torch.no_grad():
        logp, entropy = response_logprobs(model, *_packed(batch), return_entropy=True)
        # Row 1 (prompt [1, 50], P = 7 so the prompt sits at columns 5..6): entropy of the
        # distribution that predicts its first response token = -sum p log p over the vocabulary.
        logits = model(torch.tensor([PROMPTS[1]])).logits[0, -1].double()
        lp = torch.log_softmax(logits, dim=-1)
        expected = -(lp.exp() * lp).sum()
    torch.testing.assert_close(entropy[1, 0].double(), expected, atol=1e-5, rtol=0)  # fp32 vs float64, as above
    assert (entropy[2, 1:] == 0).all()
    assert (entropy[:, 0] > 0).all()


def test_response_logprobs_gradient_flows(model):
    batch = pack_sequences(PROMPTS[:2], RESPONSES[:2], pad_id=PAD)
    logp = response_logprobs(model, *_packed(batch))
    logp.sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_unpack_response_logprobs():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert unpack_response_logprobs(logp, mask) == [[-1.0, -2.0], [-0.5]]
    with pytest.raises(ValueError, match="shape"):
        unpack_response_logprobs(logp, mask[:, :2])


def test_bad_temperature(model):
    batch = pack_sequences([[1]], [[2]], pad_id=PAD)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        response_logprobs(model, *_packed(batch), temperature=0)
