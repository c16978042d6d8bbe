"""Fixtures for the prime.data tests: a real tiny tokenizer loaded from disk."""

import pytest


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    """The tiny model's byte-level tokenizer (no merges), loaded the way a hub checkpoint is.

    With no merges every byte of ordinary text is one token and every special token is one
    token, so prompt lengths can be counted by hand in the tests.
    """
    from transformers import AutoTokenizer

    from prime.models.tiny import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("tiny_byte")), vocab="byte")
    return AutoTokenizer.from_pretrained(path)
