import logging

import pytest
import torch

from prime.models.loading import load_model, load_tokenizer, resolve_dtype


def test_load_model_and_tokenizer(tiny_model_path):
    model = load_model(tiny_model_path)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    tok = load_tokenizer(tiny_model_path)
    assert tok.padding_side == "left"
    assert load_tokenizer(tiny_model_path, padding_side="right").padding_side == "right"


def test_load_model_bf16(tiny_model_path):
    model = load_model(tiny_model_path, dtype="bf16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_tokenizer(missing)


def test_bad_dtype_and_padding_side(tiny_model_path):
    with pytest.raises(ValueError, match="'float8'.*valid dtypes"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="'middle'"):
        load_tokenizer(tiny_model_path, padding_side="middle")


def test_pad_token_falls_back_to_eos(tiny_model_path, tmp_path, caplog):
    tok = load_tokenizer(tiny_model_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    # The config.json decides the tokenizer class; copy it next to the tokenizer files.
    (tmp_path / "config.json").write_text(open(f"{tiny_model_path}/config.json").read())
    with caplog.at_level(logging.INFO, logger="prime.models.loading"):
        tok2 = load_tokenizer(str(tmp_path))
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"
    assert "no pad token" in caplog.text
