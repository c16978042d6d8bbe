"""Fixtures for the evaluation tests."""

import pytest


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    """The tiny model's byte-level tokenizer (ChatML template), loaded from disk like a hub one."""
    from prime.models.loading import load_tokenizer
    from prime.models.tiny import build_tiny_model

    return load_tokenizer(build_tiny_model(str(tmp_path_factory.mktemp("eval_byte")), vocab="byte"))
