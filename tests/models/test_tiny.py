import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch.cli import main
from prime.models.tiny import build_tiny_model, build_tokenizer, tiny_model_preset


def test_checkpoint_files_and_config(tiny_model_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(tiny_model_path, name)), name
    with open(os.path.join(tiny_model_path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen2"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    # 128 hidden / 2 heads = head_dim 64 (what vLLM's CPU attention accepts); 2 // 4 -> 1 kv head.
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["num_key_value_heads"] == 1
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] % 64 == 0


def test_loads_with_auto_classes(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert model.dtype == torch.float32
    assert len(tok) <= model.config.vocab_size
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_chat_template(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False).input_ids
    # Special tokens are single ids: 3 im_start and 2 im_end markers in the rendered prompt.
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2


@pytest.mark.parametrize(
    "text",
    [
        "What is 12 + 30? The answer is \\boxed{42}.",
        "\\frac{1}{2} \\cdot 3 = 1.5, so $x^{2} \\le 9$",
        "def f(x):\n    return x ** 2  # square\n",
        "  leading spaces, tabs\tand unicode: café ✓",
    ],
)
def test_tokenizer_round_trip(tiny_model_path, text):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tokens = tok.convert_ids_to_tokens(tok("\\boxed{1234}", add_special_tokens=False).input_ids)
    assert [t for t in tokens if t.isdigit()] == ["1", "2", "3", "4"]


def test_loaded_tokenizer_matches_built_one(tiny_model_path):
    # AutoTokenizer rebuilds qwen2 tokenizers as Qwen2Tokenizer; the ids must not change.
    built = build_tokenizer("arith")
    loaded = AutoTokenizer.from_pretrained(tiny_model_path)
    text = "<|im_start|>user\nSolve 7 * 8 and put the answer in \\boxed{}.<|im_end|>\n"
    assert built(text).input_ids == loaded(text).input_ids


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = build_tiny_model(str(tmp_path / "a"), seed=1)
    b = build_tiny_model(str(tmp_path / "b"), seed=1)
    c = build_tiny_model(str(tmp_path / "c"), seed=2)
    sd = {k: AutoModelForCausalLM.from_pretrained(p).state_dict() for k, p in (("a", a), ("b", b), ("c", c))}
    for name, value in sd["a"].items():
        assert torch.equal(value, sd["b"][name]), name
    assert not torch.equal(sd["a"]["model.embed_tokens.weight"], sd["c"]["model.embed_tokens.weight"])


def test_byte_vocab_and_untied(tmp_path):
    path = build_tiny_model(str(tmp_path / "m"), vocab="byte", tie_word_embeddings=False)
    tok = AutoTokenizer.from_pretrained(path)
    # 256 byte tokens + 4 special tokens, embedding table rounded up to 320.
    assert len(tok) == 260
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 320
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert tok.decode(tok("x = 17", add_special_tokens=False).input_ids) == "x = 17"


def test_presets_and_bad_arguments(tmp_path):
    assert tiny_model_preset("small") == dict(hidden_size=512, num_layers=4, num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="'huge'.*valid presets"):
        tiny_model_preset("huge")
    with pytest.raises(ValueError, match="hidden_size=100"):
        build_tiny_model(str(tmp_path / "x"), hidden_size=100)
    with pytest.raises(ValueError, match="'words'.*valid vocabs"):
        build_tiny_model(str(tmp_path / "y"), vocab="words")


def test_cli_small_preset(tmp_path, capsys):
    assert main(["build-tiny-model", str(tmp_path / "small"), "--preset", "small"]) == 0
    with open(tmp_path / "small" / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (512, 4, 8)
    assert cfg["num_key_value_heads"] == 2
    assert str(tmp_path / "small") in capsys.readouterr().out
