"""One call that says whether the GPU path works: every check the installed packages allow, a table.

    python launch/gpu_smoke.py                 # CUDA (the default)
    python launch/gpu_smoke.py --device cpu    # the same checks on the CPU

Checks, each timed, on a tiny Qwen2 checkpoint built locally (no downloads):
  - weight-sync buckets round trip; chunked log-prob/entropy equal the full softmax on the device;
  - HF generation on the device (fp32, bf16) agrees with a full forward; log-probs device vs CPU;
  - the policy trainer: ZeRO-2 PPO updates (fp32, bf16); ZeRO-3 built under zero.Init with its
    states offloaded to the host and back (GPU); the implicit PRM under ZeRO-3 with a sharded
    reference;
  - the streaming weight sync end to end without vLLM: a ZeRO-3 trainer streams its weights bucket
    by bucket into an HF engine in another process, over gloo, over the staging buffer of transport
    "ipc" (CUDA IPC on a GPU, /dev/shm on the CPU) and over NCCL (two GPUs); the receiver's
    log-probs then equal the trainer's;
  - with vLLM installed: the same sync into vLLM's worker process; sleep and wake in the colocated
    order (weights, sync, KV cache; GPU only);
  - one colocated PRIME step in one process: engine (vLLM if installed, else HF), PRM and policy
    on one device: generate, verify, PRM update and rewards, advantages, policy update, trainer
    states to the host, weights streamed into the engine, which then scores like the policy.

A check whose packages are missing prints "skipped (why)" and does not fail the run. Exits 1 if any
check that ran failed. `launch/gpu_smoke.sh` installs what it can and runs this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback

# The device has to be fixed before torch (or DeepSpeed) is imported: `--device cpu` hides any GPU
# so DeepSpeed picks its CPU accelerator and gloo, exactly as on a machine without one.
_ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ARGS.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
_ARGS.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="tiny-model size")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when not installed

def _prepare_env(device: str) -> None:
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Results:
    """Rows of (check, status, seconds, detail); status is ok, FAIL or skipped."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, str]] = []

    def run(self, name: str, fn, needs: list[tuple[bool, str]] = ()) -> bool:
        missing = [why for ok, why in needs if not ok]
        if missing:
            self.rows.append((name, "skipped", 0.0, f"({'; '.join(missing)})"))
            return False
        t0 = time.perf_counter()
        try:
            detail, status = fn(), "ok"
        except Exception as e:
            traceback.print_exc()
            detail, status = f"{type(e).__name__}: {e}", "FAIL"
        self.rows.append((name, status, time.perf_counter() - t0, str(detail or "")))
        print(f"[{status}] {name}: {detail}", flush=True)
        return status == "ok"

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'check':<{w}}  {'result':<7}  seconds  detail", "-" * (w + 60)]
        for name, status, sec, detail in self.rows:
            lines.append(f"{name:<{w}}  {status:<7}  {sec:7.2f}  {detail[:150]}")
        return "\n".join(lines)

    @property
    def failed(self) -> int:
        return sum(status == "FAIL" for _, status, _, _ in self.rows)

    @property
    def ran(self) -> int:
        return sum(status != "skipped" for _, status, _, _ in self.rows)


def _installed(module: str) -> tuple[bool, str]:
    return importlib.util.find_spec(module) is not None, f"{module} not installed"


def _vllm_sleep_mode() -> tuple[bool, str]:
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm not installed"
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available()), "vLLM has no sleep mode on this platform"
    except Exception as e:  # a broken vLLM install: the vLLM checks report it
        return False, f"vllm does not import: {type(e).__name__}"


def run_checks(results: Results, shared, device: str) -> None:
    import torch

    from launch.smoke_checks import (
        check_buckets,
        check_chunked_entropy,
        check_colocated_prime_step,
        check_generate,
        check_logprobs_device_vs_cpu,
        check_policy,
        check_prm_zero3,
        check_stream_to_process,
        check_vllm_sleep_wake,
        check_vllm_stream,
        check_zero3_policy,
    )

    ds, vllm = _installed("deepspeed"), _installed("vllm")
    two_gpus = (device == "cuda" and torch.cuda.device_count() >= 2,
                f"needs 2 CUDA GPUs, found {torch.cuda.device_count() if device == 'cuda' else 0}")
    path = shared.path
    results.run("weight-sync buckets round trip", lambda: check_buckets(device))
    results.run("chunked logp/entropy = full softmax", lambda: check_chunked_entropy(device))
    results.run("hf generate fp32", lambda: check_generate(path, device, "float32"))
    results.run("hf generate bf16", lambda: check_generate(path, device, "bfloat16"))
    results.run(f"response_logprobs {device} vs cpu (fp32)", lambda: check_logprobs_device_vs_cpu(path, device))
    results.run("policy ZeRO-2 PPO update fp32", lambda: check_policy(path, device, bf16=False), [ds])
    results.run("policy ZeRO-2 PPO update bf16", lambda: check_policy(path, device, bf16=True), [ds])
    results.run("policy ZeRO-3 zero.Init + state offload", lambda: check_zero3_policy(shared), [ds])
    results.run("PRM ZeRO-3 update, sharded reference", lambda: check_prm_zero3(path, device), [ds])
    for transport, backend, needs in (("broadcast", "gloo", [ds]), ("ipc", "gloo", [ds]),
                                      ("broadcast", "nccl", [ds, two_gpus])):
        label = f"{transport} {backend}"
        if transport == "ipc":
            label = "ipc (CUDA IPC)" if device == "cuda" else "ipc (/dev/shm)"
        results.run(f"stream sync {label} -> HF process",
                    lambda t=transport, b=backend: check_stream_to_process(shared, t, b), needs)
    results.run("vLLM engine + stream sync", lambda: check_vllm_stream(shared), [ds, vllm])
    results.run("vLLM sleep/wake: weights, sync, KV", lambda: check_vllm_sleep_wake(shared),
                [ds, vllm, _vllm_sleep_mode()])
    results.run("colocated PRIME step (one process)", lambda: check_colocated_prime_step(shared), [ds])


def main(argv: list[str] | None = None) -> int:
    args = _ARGS.parse_args(argv)
    _prepare_env(args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons need true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False

    from launch.smoke_checks import Shared
    from prime.models.tiny import build_tiny_model, tiny_model_preset

    results = Results()
    info = f"torch {torch.__version__}, device {args.device}"
    if args.device == "cuda":
        info += f" ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU)"
    print(info, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        holder = {}

        def build():
            holder["path"] = build_tiny_model(os.path.join(tmp, "model"), **tiny_model_preset(args.preset))
            return args.preset

        if results.run("build tiny model", build):
            shared = Shared(holder["path"], args.device)
            try:
                run_checks(results, shared, args.device)
            finally:
                shared.close()
    print()
    print(info)
    print(results.table())
    print(f"\n{results.ran - results.failed}/{results.ran} checks passed, "
          f"{len(results.rows) - results.ran} skipped, {time.perf_counter() - t0:.0f} s")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
