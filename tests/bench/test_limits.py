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
