"""This machine's limits for the `small` point: what generation and the policy update would take if
the model's matrix multiplies were all they did.

    python bench/limits.py [--threads 2] [--repeats 5] [--tokens 9600] [--decode-steps 118]

The `small` preset (hidden 512, 4 layers, 8 query and 2 key/value heads of 64, MLP 2048, vocabulary
512, tied head): 15.5M parameters, about 31 MFLOP per token forward. Its linear layers in vLLM's
fused layout are, per layer, qkv 512 -> 768, o 512 -> 512, gate_up 512 -> 4096 and down 2048 -> 512,
then the head 512 -> 512. Rows printed (seconds: best and median of `--repeats`, fp32, `--threads`
torch threads):

    gemm 2048^3                  the square multiply, GFLOP/s: the machine's best case
    decode linears (64 rows)     every linear layer once per step at the decode batch of the small
                                 point (16 prompts x 4 samples), for `--decode-steps` steps: the
                                 generation of 64 x steps tokens without attention, sampling or any
                                 framework; tokens/s = 64 x steps / seconds. torch.nn.functional.linear
    decode linears, oneDNN       the same on vLLM's CPU kernel for fp32 linears (oneDNN, the weight
      prepacked                  reordered once at load): the decode floor of a vLLM engine here
    train linears (N rows)       each linear layer's forward and both backward multiplies (input and
                                 weight gradients) over `--tokens` packed tokens: the policy update's
                                 forward + backward without attention, norms or the optimizer

Prints the load averages before and after; other jobs on the cores inflate every row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.vs_trl import load_averages  # noqa: E402
from prime.models.memory import ModelShape  # noqa: E402

HIDDEN, LAYERS, MLP, VOCAB, Q, KV = 512, 4, 2048, 512, 512, 128
# (in, out) of each linear layer, vLLM's fused layout; the head last
LINEARS = [(HIDDEN, Q + 2 * KV), (Q, HIDDEN), (HIDDEN, 2 * MLP), (MLP, HIDDEN)] * LAYERS + [(HIDDEN, VOCAB)]


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return min(xs), statistics.median(xs)


def linear_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of a decoder (`prime.models.memory.ModelShape`, e.g. from
    `resolve_shape(model_folder)`), in the fused layout (qkv, o, gate_up, down per layer, the head
    last): what `LINEARS` is for the small preset."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_width, shape.num_kv_heads * shape.head_width
    mlp = shape.intermediate_size
    layer = [(h, q + 2 * kv), (q, h), (h, 2 * mlp), (mlp, h)]
    return layer * shape.num_layers + [(h, shape.vocab_size)]


def train_linears(tokens: int, shapes: list[tuple[int, int]], repeats: int,
                  generator: torch.Generator | None = None) -> tuple[float, float, float]:
    """(best s, median s, FLOPs) of every linear layer's forward and both backward multiplies (input
    and weight gradients) over `tokens` packed rows: an update's forward + backward without
    attention, norms, the loss or the optimizer. fp32, on torch's current threads."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) for k, n in shapes]
    xs = {k: torch.randn(tokens, k, generator=g) for k, _ in shapes}
    gys = {n: torch.randn(tokens, n, generator=g) for _, n in shapes}

    def train():
        for (k, n), w in zip(shapes, weights):
            torch.nn.functional.linear(xs[k], w)  # forward [N, n]
            gys[n] @ w  # input gradient [N, k]
            gys[n].t() @ xs[k]  # weight gradient [n, k]

    best, med = timed(train, repeats)
    return best, med, float(sum(6 * tokens * k * n for k, n in shapes))


def onednn_linear(w: torch.Tensor):
    """`x -> x @ w.T` on the kernel vLLM's CPU backend uses for fp32 linear layers: a oneDNN matmul
    whose weight was reordered once, at load, into the layout the kernel reads (`create_onednn_mm`,
    block size 32 as vLLM passes it). None where vLLM's compiled CPU ops are not installed."""
    try:
        import vllm._custom_ops as ops

        handler = ops.create_onednn_mm(w.t(), 32)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return lambda x: ops.onednn_mm(handler, x, None)


def _onednn_decode(weights: list[torch.Tensor], x64: dict[int, torch.Tensor], steps: int):
    """The decode loop of `main` on `onednn_linear`; None without vLLM's CPU ops."""
    linears = [onednn_linear(w) for w in weights]
    if any(f is None for f in linears):
        return None
    ks = [w.shape[1] for w in weights]

    def decode():
        for _ in range(steps):
            for k, f in zip(ks, linears):
                f(x64[k])

    return decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=9600, help="packed tokens of one update (the small point: ~9.6k)")
    ap.add_argument("--decode-steps", type=int, default=118, help="decode steps (the small point: ~118 tokens each)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load {load_averages()}; torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    rows = []

    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    best, med = timed(lambda: a @ b, args.repeats)
    rows.append(("gemm 2048^3", best, med, f"{2 * 2048**3 / best / 1e9:.0f} GFLOP/s"))

    weights = [torch.randn(n, k, generator=g) for k, n in LINEARS]
    x64 = {k: torch.randn(64, k, generator=g) for k, _ in LINEARS}

    def decode():
        for _ in range(args.decode_steps):
            for (k, _), w in zip(LINEARS, weights):
                torch.nn.functional.linear(x64[k], w)

    best, med = timed(decode, args.repeats)
    flops = sum(2 * 64 * k * n for k, n in LINEARS) * args.decode_steps
    rows.append((f"decode linears (64 rows, {args.decode_steps} steps)", best, med,
                 f"{64 * args.decode_steps / best:.0f} tok/s, {flops / best / 1e9:.0f} GFLOP/s"))

    onednn = _onednn_decode(weights, x64, args.decode_steps)
    if onednn is None:
        rows.append(("decode linears, oneDNN prepacked", float("nan"), float("nan"), "vLLM's CPU ops not importable"))
    else:
        best, med = timed(onednn, args.repeats)
        rows.append((f"decode linears, oneDNN prepacked (64 rows, {args.decode_steps} steps)", best, med,
                     f"{64 * args.decode_steps / best:.0f} tok/s, {flops / best / 1e9:.0f} GFLOP/s"))

    best, med, flops = train_linears(args.tokens, LINEARS, args.repeats, g)
    rows.append((f"train linears ({args.tokens} rows)", best, med,
                 f"{flops / 1e12:.2f} TFLOP, {flops / best / 1e9:.0f} GFLOP/s"))

    print("| row | best s | median s | rate |\n|---|---|---|---|")
    for name, best, med, rate in rows:
        print(f"| {name} | {best:.3f} | {med:.3f} | {rate} |")
    print(f"load {load_averages()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
