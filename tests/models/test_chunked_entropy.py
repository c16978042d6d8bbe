"""Log-probs and entropies computed a chunk of positions at a time equal the full-softmax values,
with and without gradients, and need a fraction of the memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from prime.models.logprobs import token_logprobs
from tests.subprocess_env import child_env

MiB = 2**20


def _inputs(B=3, T=11, V=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(dtype)  # [B, T, V]
    targets = torch.randint(0, V, (B, T), generator=gen)  # [B, T]
    mask = torch.rand(B, T, generator=gen) > 0.2  # [B, T]
    return logits, targets, mask


def _full_softmax_reference(logits, targets, mask, temperature):
    """The textbook formulas on the whole [B, T, V] tensor, in float64."""
    z = logits.double() / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
    return logp * mask, entropy * mask


@pytest.mark.parametrize("chunk_tokens", [None, 1, 4, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_values_equal_the_full_softmax(chunk_tokens, temperature):
    logits, targets, mask = _inputs()
    logp, ent = token_logprobs(logits, targets, mask, temperature, return_entropy=True, chunk_tokens=chunk_tokens)
    want_logp, want_ent = _full_softmax_reference(logits, targets, mask, temperature)
    # fp32 against float64: |values| <= log(50) + 2 x 3 x 3 / 0.7 ~ 30, fp32 rounding ~1e-7 relative
    # per operation over ~50-term sums.
    assert torch.allclose(logp.double(), want_logp, atol=2e-5, rtol=0)
    assert torch.allclose(ent.double(), want_ent, atol=2e-5, rtol=0)
    assert float(logp[~mask].abs().max()) == 0.0 and float(ent[~mask].abs().max()) == 0.0
    whole = token_logprobs(logits, targets, mask, temperature, return_entropy=True, chunk_tokens=None)
    # Chunked vs one chunk: the same operations per position; only how a reduction over V is split
    # across threads may depend on the chunk's shape (fp32, values up to ~30).
    assert torch.allclose(logp, whole[0], atol=1e-5, rtol=0) and torch.allclose(ent, whole[1], atol=1e-5, rtol=0)


def test_chunked_gradients_equal_the_full_softmax_gradients():
    grads = []
    for chunk_tokens in (None, 3):  # 3 tokens / 3 rows = one position per chunk, checkpointed
        logits, targets, mask = _inputs(dtype=torch.bfloat16)
        logits.requires_grad_(True)
        logp, ent = token_logprobs(logits, targets, mask, 1.0, return_entropy=True, chunk_tokens=chunk_tokens)
        (logp.sum() + 0.1 * ent.sum()).backward()
        grads.append(logits.grad.float())
    # Recomputed chunks run the same fp32 operations as the stored ones; bf16 gradient rounding
    # (8 bits of mantissa, gradients below 1) is the only other difference.
    assert torch.allclose(grads[0], grads[1], atol=1e-2, rtol=0)
    assert float(grads[0].abs().max()) > 0.05


PEAK_SCRIPT = """
import sys, torch
from prime.models.logprobs import token_logprobs
from prime.rollout.weight_transfer import process_memory, reset_peak_memory
chunk = None if sys.argv[1] == "none" else int(sys.argv[1])
gen = torch.Generator().manual_seed(0)
logits = torch.randn(4, 512, 16384, generator=gen).to(torch.bfloat16)  # [B, T, V], 64 MiB
targets = torch.randint(0, 16384, (4, 512), generator=gen)
mask = torch.ones(4, 512, dtype=torch.bool)
token_logprobs(logits[:, :2], targets[:, :2], mask[:, :2], return_entropy=True, chunk_tokens=chunk)  # warm-up
start = process_memory()["rss"]
reset_peak_memory()
with torch.no_grad():
    logp, ent = token_logprobs(logits, targets, mask, return_entropy=True, chunk_tokens=chunk)
print(process_memory()["peak"] - start)
"""


def _peak_extra(chunk: str) -> int:
    env = child_env(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, chunk], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_chunked_entropy_needs_a_fraction_of_the_memory():
    full, chunked = _peak_extra("none"), _peak_extra("256")
    fp32_all = 4 * 512 * 16384 * 4  # one fp32 [B, T, V] tensor: 128 MiB
    fp32_chunk = 256 * 16384 * 4  # one fp32 chunk (256 positions): 16 MiB
    # All at once: the fp32 copy of the logits, the softmax and its product with the logits exist
    # together (at least 2 of them at the peak). In chunks: about 3 chunk-sized fp32 tensors.
    assert full >= 2 * fp32_all, full / MiB
    assert chunked <= 4 * fp32_chunk + 8 * MiB, chunked / MiB  # 8 MiB: small outputs and allocator pages
    print(f"\npeak above the logits: all at once {full / MiB:.0f} MiB, 256-position chunks {chunked / MiB:.0f} MiB")
