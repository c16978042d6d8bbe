"""bench/limits.py times vLLM's oneDNN linear kernel: it must compute the same product as torch."""

import pytest
import torch

from bench.limits import onednn_linear


def test_onednn_linear_matches_torch_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(768, 512, generator=g)  # the small preset's fused qkv shape
    x = torch.randn(64, 512, generator=g)
    f = onednn_linear(w)
    if f is None:
        pytest.skip("vLLM's compiled CPU ops are not installed")
    # fp32 sums of 512 products of unit normals (|sum| ~ 23): the kernels block and order the
    # additions differently, so results differ in the last bits; 1e-3 absolute is ~1e-4 relative.
    torch.testing.assert_close(f(x), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-3)


def test_linear_shapes_of_the_small_preset_are_the_fused_layout():
    from bench.limits import LINEARS, linear_shapes
    from prime.models.memory import shape_from_hf_config

    small = {"hidden_size": 512, "num_attention_heads": 8, "head_dim": 64, "num_key_value_heads": 2,
             "intermediate_size": 2048, "num_hidden_layers": 4, "vocab_size": 512}
    assert linear_shapes(shape_from_hf_config(small, "small")) == LINEARS
    # No head_dim and no key/value heads in the config: head_dim = hidden / heads, kv heads = heads.
    mha = {"hidden_size": 96, "num_attention_heads": 3, "intermediate_size": 256, "num_hidden_layers": 1,
           "vocab_size": 50}
    assert linear_shapes(shape_from_hf_config(mha, "mha")) == [(96, 96 + 2 * 96), (96, 96), (96, 512), (256, 96),
                                                                (96, 50)]


def test_train_linears_counts_forward_and_both_backward_multiplies():
    from bench.limits import train_linears

    best, med, flops = train_linears(10, [(4, 6), (6, 3)], repeats=3)
    assert flops == 6 * 10 * 4 * 6 + 6 * 10 * 6 * 3  # 2 x N x in x out for each of the three products
    assert 0 < best <= med
