"""Rollout generation speed on the CPU: prime's engines under different process and thread layouts.

    python bench/generation.py [--variants vllm,vllm_reserved0,vllm_inproc,vllm_inproc_unseeded,hf]
                               [--rounds 5] [--json out.json]

The work is the `small` point of bench/vs_trl.py: the `small` tiny preset (hidden 512, 4 layers) in
fp32, 16 `arith` prompts x 4 samples x <= 128 new tokens at temperature 1, top-p 1. Each variant is
one engine in its own process (process layout and thread binding are fixed when vLLM starts), all
alive at once; the parent calls them in turn, round by round, so every variant sees the same load.
A pause of 1.5 s before each call lets the previous engine's processes stop spinning (vLLM's
shared-memory queues busy-wait for 1 s after their last message).

Variants:
    vllm                   vLLM's defaults on CPU: an engine-core process (scheduler) and a worker
                           process, the worker's OpenMP threads bound to all cores but the ones vLLM
                           reserves for the engine core (1 of 2 here)
    vllm_reserved0         the same with VLLM_CPU_NUM_OF_RESERVED_CPU=0: the worker binds every core,
                           sharing one with the engine core's busy-wait
    vllm_inproc            scheduler and model in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
                           distributed_executor_backend="uni"), torch on every core, no busy-waiting
                           process beside it; prime's `rollout.vllm_in_process`
    vllm_inproc_unseeded   the same without per-request seeds (`rollout.seeded=false`)
    vllm_inproc_nologprobs vllm_inproc without the sampled tokens' log-probs (the steps between
                           weight-sync checks, `rollout.logprob_check_every`)
    vllm_unseeded          vLLM's defaults without per-request seeds
    vllm_inproc_compiled   vllm_inproc with vLLM's torch.compile (`rollout.enforce_eager=false`; needs a
                           C++ compiler, compiles at start)
    vllm_compiled          vLLM's defaults with torch.compile
    vllm_step              what a CPU step runs: in process, compiled, seeded, no token log-probs (the
                           steps between weight-sync checks)
    vllm_step_unseeded     vllm_step without per-request seeds
    hf                     prime's HF engine (`generate` with a KV cache), torch on every core

Printed per variant: median seconds per call over the rounds after the first (a warm-up), generated
tokens per call and tokens/s, and the load averages before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.vs_trl import check_warmup, choices, load_averages, median_after_first, model_and_data  # noqa: E402

PROMPTS, K, CAP = 16, 4, 128
VARIANTS = {
    # name: (engine, environment, engine kwargs, seeded, token log-probs)
    "vllm": ("vllm", {}, {}, True, True),
    "vllm_unseeded": ("vllm", {}, {}, False, True),
    "vllm_reserved0": ("vllm", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {}, True, True),
    "vllm_inproc": ("vllm", {}, {"in_process": True}, True, True),
    "vllm_inproc_unseeded": ("vllm", {}, {"in_process": True}, False, True),
    "vllm_inproc_nologprobs": ("vllm", {}, {"in_process": True}, True, False),
    "vllm_inproc_compiled": ("vllm", {}, {"in_process": True, "enforce_eager": False}, True, True),
    "vllm_compiled": ("vllm", {}, {"enforce_eager": False}, True, True),
    "vllm_step": ("vllm", {}, {"in_process": True, "enforce_eager": False}, True, False),
    "vllm_step_unseeded": ("vllm", {}, {"in_process": True, "enforce_eager": False}, False, False),
    "hf": ("hf", {}, {}, True, True),
}
DEFAULT_VARIANTS = "vllm,vllm_reserved0,vllm_inproc,vllm_inproc_unseeded,hf"


def prompt_ids(model: str, data: str, count: int = PROMPTS) -> list[list[int]]:
    """The first `count` prompts of the file, rendered and encoded as the driver does."""
    from launch.preflight import check_data
    from prime.data.dataset import encode_prompts, render_prompt
    from prime.models.loading import load_tokenizer

    tok = load_tokenizer(model)
    rows = [row for _, part in check_data("data", data) for row in part][:count]
    return encode_prompts(tok, [render_prompt(tok, list(r["prompt"])) for r in rows])


def serve(variant: str, model: str, data: str) -> int:
    """Child mode: start the variant's engine, then answer `gen SEED` lines with one JSON line each."""
    engine_name, _, kwargs, seeded, logprobs = VARIANTS[variant]
    ids = prompt_ids(model, data)
    if engine_name == "vllm":
        from prime.rollout.vllm import VLLMEngine

        engine = VLLMEngine(model, max_model_len=512, seed=0, **kwargs)
    else:
        from prime.rollout.hf import HFEngine

        engine = HFEngine(model, seed=0)
    print(json.dumps({"ready": variant}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seed = int(cmd[1]) if seeded else None
        t0 = time.perf_counter()
        out = engine.generate(ids, n=K, max_new_tokens=CAP, temperature=1.0, top_p=1.0, seed=seed, logprobs=logprobs)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for group in out for c in group)
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
    return 0


def start(variant: str, model: str, data: str) -> subprocess.Popen:
    env = dict(os.environ, **VARIANTS[variant][1])
    env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)  # what prime's local actors get
    env.pop("MKL_NUM_THREADS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", variant, model, data],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return proc


def read_json(proc: subprocess.Popen, what: str) -> dict:
    """The next JSON line a child process prints (other lines skipped); `what` names it if it exits."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited with code {proc.wait()} (its stderr is above)")
        if line.startswith("{"):
            return json.loads(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=5, help="calls per variant; the first is a warm-up")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "vs_trl"),
                        help="model folder and prompts (shared with bench/vs_trl.py, built once)")
    parser.add_argument("--json", default=None, help="also write the rows (every call's seconds) here")
    parser.add_argument("--serve", nargs=3, metavar=("VARIANT", "MODEL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(*args.serve)
    variants = choices(parser, "--variants", args.variants, VARIANTS)
    check_warmup(parser, "--rounds", args.rounds)
    os.makedirs(args.output_dir, exist_ok=True)
    model, data = model_and_data("small", args.output_dir)
    procs = {v: start(v, model, data) for v in variants}
    calls: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for v, p in procs.items():
            read_json(p, f"variant {v!r}")
        load_before = load_averages()
        for r in range(args.rounds):
            for v, p in procs.items():
                time.sleep(1.5)
                p.stdin.write(f"gen {1000 + r}\n")
                p.stdin.flush()
                calls[v].append(read_json(p, f"variant {v!r}"))
                print(f"round {r}: {v} {calls[v][-1]['seconds']:.2f} s, {calls[v][-1]['tokens']} tokens, "
                      f"load {load_averages()[0]}", file=sys.stderr, flush=True)
        load_after = load_averages()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.stdin.write("quit\n")
                p.stdin.flush()
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    rows = []
    for v in variants:
        secs = median_after_first([c["seconds"] for c in calls[v]])
        toks = median_after_first([c["tokens"] for c in calls[v]])
        rows.append({"variant": v, "seconds": secs, "tokens": toks, "tok_s": toks / secs,
                     "calls": calls[v]})
    print(f"{PROMPTS} prompts x {K} samples x <= {CAP} tokens, small preset, fp32; median of rounds 2-{args.rounds}; "
          f"load {load_before} -> {load_after}")
    print("| variant | s per call | tokens per call | tok/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.2f} | {r['tokens']:.0f} | {r['tok_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "load": [load_before, load_after], "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
