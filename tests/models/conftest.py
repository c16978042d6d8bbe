import pytest

from prime.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random Qwen2 checkpoint (hidden 128, 2 layers, head_dim 64) built once per session."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")), seed=0)
