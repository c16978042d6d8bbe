import pytest
import torch

from prime.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random Qwen2 checkpoint (hidden 128, 2 layers, head_dim 64) built once per session."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")), seed=0)


def _eos_biased_embedding(embedding: torch.Tensor, eos_id: int, boost: float) -> torch.Tensor:
    """An embedding table that makes the (tied-embedding) model favour eos.

    Column 0 is set to 1.0 for every token and to `boost` for eos. Every input token then puts
    +1 (or +boost) on hidden coordinate 0, which stays positive through the small random layers,
    so after the final RMSNorm h[0] is about sqrt(hidden) = 11.3. The tied LM head turns that into
    logit[v] = h[0] * E[v, 0] + (random rest): eos gets an extra ~11.3 * (boost - 1) nats over every
    other token. boost=2 -> eos probability ~0.9 at every step; boost=1.3 -> ~3.4 nats, a few %.
    """
    out = embedding.clone()
    out[:, 0] = 1.0
    out[eos_id, 0] = boost
    return out


@pytest.fixture(scope="session")
def eos_biased_embedding():
    """The `_eos_biased_embedding(embedding, eos_id, boost)` helper, as a fixture."""
    return _eos_biased_embedding
