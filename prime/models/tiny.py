"""Build a tiny, real Hugging Face checkpoint locally (no download) for tests and the CPU demo.

The folder written by `build_tiny_model` is an ordinary Qwen2 checkpoint: `config.json`,
`generation_config.json`, `model.safetensors`, and a fast tokenizer (`tokenizer.json`,
`tokenizer_config.json`, a ChatML chat template). It loads with
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and `vllm.LLM`, so the
rest of prime runs the same code path it uses for a hub checkpoint on a cluster.

The tokenizer is byte-level BPE, so `decode(encode(text)) == text` for any NFC-normalised text.
It uses exactly the normaliser (NFC) and pre-tokenizer split of transformers' `Qwen2Tokenizer`:
for `model_type == "qwen2"` `AutoTokenizer` always instantiates that class, which rebuilds the
pre-tokenizer, so any other split would be silently replaced at load time and the loaded tokenizer
would disagree with the one built here. Digits are split into single tokens, so arithmetic answers
such as `\\boxed{12}` are spelled digit by digit. With `vocab="arith"` merges are learned from a
small built-in corpus of arithmetic, LaTeX and word-problem text; with `vocab="byte"` there are no
merges.

Weights are drawn from a seeded generator, parameter by parameter in name order, so the same
arguments always give the same checkpoint.

Command line: `prime build-tiny-model OUT_DIR [--preset tiny|small] [--vocab ...] [--seed S]`.
"""

from __future__ import annotations

import os

import torch

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, PAD]

# ChatML, as used by Qwen models: every message is `<|im_start|>role\ncontent<|im_end|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, head_dim=64),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, head_dim=64),
}

VOCABS = ("arith", "byte")
_ARITH_VOCAB_SIZE = 512


def tiny_model_preset(name: str) -> dict:
    """Keyword arguments of `build_tiny_model` for a named preset ("tiny" or "small")."""
    if name not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def preset_hf_config(name: str, vocab: str = "arith") -> dict:
    """The sizes `build_tiny_model` writes into config.json for preset `name`, without building the model
    (for the memory plan). The vocabulary is its upper bound: the tokenizer's target size rounded up to 64."""
    if vocab not in VOCABS:
        raise ValueError(f"unknown tokenizer vocab {vocab!r}; valid vocabs: {list(VOCABS)}")
    p = tiny_model_preset(name)
    tokens = _ARITH_VOCAB_SIZE if vocab == "arith" else 256 + len(SPECIAL_TOKENS)
    return {
        "hidden_size": p["hidden_size"], "num_hidden_layers": p["num_layers"], "num_attention_heads": p["num_heads"],
        "num_key_value_heads": max(1, p["num_heads"] // 4), "intermediate_size": 4 * p["hidden_size"],
        "vocab_size": (tokens + 63) // 64 * 64, "head_dim": p["head_dim"], "tie_word_embeddings": True,
    }


def _arith_corpus() -> list[str]:
    """A small deterministic corpus of math-flavoured text used to learn BPE merges."""
    words = (
        "what is the sum of and product difference quotient answer number numbers total each "
        "how many much more less than times plus minus equals solve find let if then so "
        "there are has have had a an in on for to from with by per remainder value compute "
        "apples books students dollars cents hours minutes days left gives gets buys sells "
        "first second third half twice square root fraction percent final step think "
        "def return print for in range if else while import len int str list true false none "
        "system user assistant please reason put your within"
    ).split()
    latex = [
        "\\boxed{", "\\frac{", "\\sqrt{", "\\cdot", "\\times", "\\div", "\\left(", "\\right)",
        "\\pi", "\\le", "\\ge", "\\neq", "\\infty", "\\text{", "\\dfrac{", "^{", "_{", "$$",
    ]
    corpus = []
    for a in range(0, 40):
        for b in range(0, 40, 3):
            corpus.append(f"{a} + {b} = {a + b}")
            corpus.append(f"{a} * {b} = {a * b}")
            corpus.append(f"{a} - {b} = {a - b}")
            corpus.append(f"What is {a} plus {b}? The answer is \\boxed{{{a + b}}}.")
    for i, w in enumerate(words):
        corpus.append(f"{w} {words[(i * 7) % len(words)]} {words[(i * 13) % len(words)]}")
        corpus.append(f"The {w} is {i}.")
    for cmd in latex:
        corpus.extend([f"{cmd}{k}}}" for k in range(10)] * 3)
        corpus.append(f"$x {cmd} y$")
    corpus.extend(["\n\n", "  ", "    ", "\n"] * 20)
    return corpus


def build_tokenizer(vocab: str = "arith", model_max_length: int = 1024):
    """Build the byte-level BPE fast tokenizer (a `PreTrainedTokenizerFast`) with ChatML template.

    `vocab="arith"` learns merges up to 512 entries from `_arith_corpus`; `vocab="byte"` keeps the
    256 byte tokens plus the special tokens only.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if vocab not in VOCABS:
        raise ValueError(f"unknown tokenizer vocab {vocab!r}; valid vocabs: {list(VOCABS)}")
    tok = Tokenizer(models.BPE())
    # Same normaliser and split as Qwen2Tokenizer (see the module docstring for why).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_size = _ARITH_VOCAB_SIZE if vocab == "arith" else len(alphabet) + len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = _arith_corpus() if vocab == "arith" else []
    tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, END_OF_TEXT],
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _seeded_state_dict(model: torch.nn.Module, seed: int, init_std: float) -> dict[str, torch.Tensor]:
    """Fresh values for every parameter, drawn in sorted-name order from one seeded generator.

    Norm weights are 1 (as in a freshly initialised transformer); every other tensor (matrices,
    embeddings, attention biases) is N(0, init_std). Independent of the library's init order.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            out[name] = torch.ones_like(param)
        else:
            out[name] = torch.randn(param.shape, generator=gen, dtype=torch.float32) * init_std
    return out


def build_tiny_model(
    out_dir: str,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int | None = None,
    vocab: str = "arith",
    seed: int = 0,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 1024,
    num_kv_heads: int | None = None,
    init_std: float = 0.02,
    vocab_size: int | None = None,
) -> str:
    """Write a randomly initialised Qwen2 checkpoint + tokenizer to `out_dir`; return the path.

    Args:
        out_dir: folder to create (or overwrite files in).
        hidden_size: model width; must equal `num_heads * head_dim`.
        num_layers: decoder layers.
        num_heads: attention heads.
        head_dim: per-head width; 64 is what vLLM's CPU attention accepts.
        intermediate_size: MLP width; default 4 * hidden_size.
        vocab: tokenizer vocabulary, "arith" (BPE merges for math text) or "byte" (no merges).
        seed: seed of the weight generator.
        tie_word_embeddings: share the input embedding and the LM head (as small Qwen models do).
        max_position_embeddings: longest sequence (also the tokenizer's model_max_length).
        num_kv_heads: key/value heads (grouped-query attention); default max(1, num_heads // 4).
        init_std: standard deviation of the random weights.
        vocab_size: embedding rows, at least the tokenizer's (default: the tokenizer's size rounded
            up to a multiple of 64); a larger table gives a real model's shape (Qwen2: 151936).
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size != num_heads * head_dim:
        raise ValueError(
            f"hidden_size={hidden_size} must equal num_heads * head_dim = {num_heads} * {head_dim}"
        )
    kv_heads = num_kv_heads if num_kv_heads is not None else max(1, num_heads // 4)
    if num_heads % kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv_heads}")

    tokenizer = build_tokenizer(vocab, model_max_length=max_position_embeddings)
    # Round the embedding table up to a multiple of 64, as real checkpoints do.
    rounded = (len(tokenizer) + 63) // 64 * 64
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    vocab_size = max(rounded, vocab_size or 0)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    bos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=init_std,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    config.head_dim = head_dim
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config)
    model.load_state_dict(_seeded_state_dict(model, seed, init_std), strict=False)
    if tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
