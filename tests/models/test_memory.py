"""`prime.models.memory`: parameter counts, ZeRO states, activations and engine memory, by hand."""

from __future__ import annotations

import json

import pytest

from prime.models.memory import (
    GIB,
    KNOWN_SHAPES,
    QWEN25_7B,
    ModelShape,
    activation_bytes,
    engine_memory,
    resolve_shape,
    shape_from_hf_config,
    training_states,
)
from prime.models.tiny import preset_hf_config

# h=8, L=2, H=2 heads of d=4, K=1 kv head, I=16, V=10: small enough to count by hand.
SMALL = ModelShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=10)


def test_qwen25_7b_parameter_count():
    # Per layer: q 3584*3584 + 3584 = 12,848,640; k and v 2 * (3584*512 + 512) = 3,671,040;
    # o 3584*3584 = 12,845,056; MLP 3*3584*18944 = 203,685,888; norms 2*3584 = 7,168 -> 233,057,792.
    # 28 layers = 6,525,618,176; embedding and untied head 2 * 152064*3584 = 1,089,994,752; final norm 3,584.
    assert QWEN25_7B.layer_params() == 233_057_792
    assert QWEN25_7B.num_params() == 7_615_616_512
    assert KNOWN_SHAPES["PRIME-RL/Eurus-2-7B-SFT"] == QWEN25_7B


def test_tiny_model_parameter_count_matches_the_built_model(tiny_model_path):
    # hidden 128, 2 layers, 2 heads of 64, 1 kv head, MLP 512, vocab 512, tied:
    # per layer q 128*128+128 = 16,512; k, v 128*64+64 = 8,256 each; o 16,384; MLP 3*128*512 = 196,608;
    # norms 256 -> 246,272; 2 layers 492,544 + embedding 512*128 = 65,536 + final norm 128 = 558,208.
    from transformers import AutoModelForCausalLM

    shape, source = resolve_shape(tiny_model_path)
    assert source.endswith("config.json")
    assert shape.num_params() == 558_208
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert sum(p.numel() for p in model.parameters()) == 558_208
    # The preset's sizes, known without building the model, are the built model's.
    assert shape_from_hf_config(preset_hf_config("tiny"), "preset") == shape


def test_training_states_by_zero_stage():
    # P = 1000 parameters, bf16 (2 bytes), N = 4 ranks: weights 2P, gradients 2P, Adam 12P before ZeRO.
    p, n = 1000, 4

    def states(stage, **kw):
        s = training_states(p, dtype="bfloat16", zero_stage=stage, ranks=n, **kw)
        return s.resident.weights, s.resident.gradients, s.resident.optimizer, s.gathered

    assert states(0) == (2000, 2000, 12000, 0)
    assert states(1) == (2000, 2000, 3000, 0)  # optimizer / 4
    assert states(2) == (2000, 500, 3000, 0)  # + gradients / 4
    assert states(3) == (500, 500, 3000, 2000)  # + weights / 4; whole parameters gathered while computing
    assert states(3, offload_optimizer=True) == (500, 0, 0, 2000)
    assert states(3, offload_optimizer=True, offload_params=True) == (0, 0, 0, 2000)
    # fp32: weights 4P, gradients 4P, Adam m + v 8P (no separate master copy).
    fp32 = training_states(p, dtype="float32", zero_stage=0, ranks=1).resident
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4000, 4000, 8000)
    with pytest.raises(ValueError, match="zero_stage=4"):
        training_states(p, dtype="bfloat16", zero_stage=4, ranks=1)


def test_activation_bytes():
    # A = 7h + 3Kd + 4I = 56 + 12 + 64 = 132 elements per token and layer; bf16: 264 bytes. T = 3 tokens.
    # Logits while training: T*V*(4 + 4 + 2) = 3*10*10 = 300.
    # no checkpointing: T*L*264 = 1584, + 300 = 1884.
    assert activation_bytes(SMALL, 3, dtype="bfloat16", checkpointing=False) == 1884
    # checkpointing: T*(L*h*2 + 264) = 3*(32 + 264) = 888, + 300 = 1188.
    assert activation_bytes(SMALL, 3, dtype="bfloat16", checkpointing=True) == 1188
    # no-grad: one layer T*264 = 792 + logits T*V*(2 + 4) = 180 -> 972.
    assert activation_bytes(SMALL, 3, dtype="bfloat16", checkpointing=False, training=False) == 972
    # fp32: A is 528 bytes; T*L*528 = 3168, logits T*V*8 = 240 -> 3408.
    assert activation_bytes(SMALL, 3, dtype="float32", checkpointing=False) == 3408


def test_engine_memory_and_kv_per_token():
    # 0.7 of 80 GiB = 60,129,542,144 bytes; bf16 weights 2 * 7,615,616,512 = 15,231,233,024; KV is the rest.
    mem = engine_memory(QWEN25_7B, dtype="bfloat16", tensor_parallel=1, gpu_memory_utilization=0.7,
                        gpu_bytes=80 * GIB)
    assert mem.weights == 15_231_233_024
    assert mem.kv_cache == pytest.approx(44_898_309_120, rel=1e-12)  # 0.7 * 80 GiB is not exact in binary
    # KV per token: 2 * 28 layers * 4 kv heads * 128 * 2 bytes = 57,344; TP 2 halves the heads; TP 8 keeps one.
    assert QWEN25_7B.kv_bytes_per_token("bfloat16") == 57_344
    assert QWEN25_7B.kv_bytes_per_token("bfloat16", 2) == 28_672
    assert QWEN25_7B.kv_bytes_per_token("bfloat16", 8) == 14_336
    assert engine_memory(QWEN25_7B, dtype="bfloat16", tensor_parallel=2, gpu_memory_utilization=0.7,
                         gpu_bytes=80 * GIB).weights == 15_231_233_024 / 2


def test_resolve_shape_reads_local_folders_and_the_table_and_names_the_way_out(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 16, "vocab_size": 10}))
    assert resolve_shape(str(folder))[0] == SMALL
    assert resolve_shape("Qwen/Qwen2.5-Math-7B")[0] == QWEN25_7B
    with pytest.raises(ValueError) as info:
        resolve_shape("someone/unknown-model", key="prm.model_path")
    msg = str(info.value)
    assert "prm.model_path='someone/unknown-model'" in msg and "model.shape.hidden_size" in msg
    with pytest.raises(ValueError, match="no intermediate_size"):
        shape_from_hf_config({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10},
                             "x/config.json")
