"""`prime eval`: evaluate a model on problem files or a benchmark suite, optionally with PRM reranking.

    prime eval MODEL DATA... [--engine hf|vllm] [--n N] [--k 1,4,8] [--temperature 0.6]
               [--max-new-tokens T] [--prm PRM --ref REF] [--beta 0.05] [--out results.json]
               [--limit N] [--seed S]
    prime eval MODEL --suite configs/eval/prime_paper.yaml [...]

DATA are files or folders in the verl schema (`prime convert-data` writes them from the public
sets); each file is one dataset, or one per data_source when it mixes sources. A suite names hub
sets and converts them on the fly (`prime.eval.suite`). Sampling flags given here override the
suite's values.

Prints one table row per dataset and writes a JSON file with the settings, the per-dataset metrics,
the grader's counters and every problem's samples (text, score, extracted answer, PRM scores).

Everything heavy runs inside `run`, never at import: the vLLM engine starts worker processes that
import the main module again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

from prime.config import PRMConfig, VerifierConfig

logger = logging.getLogger("prime.eval")

ENGINES = ("hf", "vllm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `prime eval` arguments; sampling values default to None so a suite's values show through."""
    p.add_argument("model", help="policy checkpoint folder or hub id")
    p.add_argument("data", nargs="*", help="verl-schema files or folders (.parquet/.jsonl/.json)")
    p.add_argument("--suite", default=None, help="benchmark suite YAML, e.g. configs/eval/prime_paper.yaml")
    p.add_argument("--engine", choices=ENGINES, default="hf")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default: the largest k, or 4)")
    p.add_argument("--k", type=_int_list, default=None, help="comma-separated k of pass@k and maj@k, e.g. 1,4,8")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.6)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default 1024)")
    p.add_argument("--no-greedy", dest="greedy", action="store_const", const=False, default=None,
                   help="skip the extra greedy sample (greedy_pass@1)")
    p.add_argument("--prm", default=None, help="implicit PRM checkpoint (needs --ref)")
    p.add_argument("--ref", default=None, help="reference model of the PRM")
    p.add_argument("--beta", type=float, default=PRMConfig.beta, help="the PRM's beta")
    p.add_argument("--out", default="eval_results.json", help="JSON output path")
    p.add_argument("--limit", type=int, default=None, help="first N problems of every dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="split of hub ids given as DATA")
    p.add_argument("--system-prompt", default=None, help="system message for rows without one")
    p.add_argument("--no-chat-template", action="store_true", help="join messages as plain text (base models)")
    p.add_argument("--device", default=None, help="HF engine and PRM device (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--prm-batch-size", type=int, default=8, help="responses per PRM forward pass")
    p.add_argument("--verify-workers", type=int, default=None, help="grading processes (default: CPU count)")
    p.add_argument("--verify-timeout", type=float, default=VerifierConfig.timeout_s, help="seconds per graded item")
    p.add_argument("--code-test-timeout", type=float, default=VerifierConfig.code_test_timeout_s,
                   help="seconds per test case of a program")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per engine")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6, help="vLLM: GPU memory fraction")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,8, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one k, got {text!r}")
    return values


def _check_args(args: argparse.Namespace) -> None:
    if not args.data and not args.suite:
        raise ValueError("give DATA files or --suite SUITE.yaml (or both)")
    if (args.prm is None) != (args.ref is None):
        raise ValueError("--prm and --ref go together: the PRM's scores are log-ratios against its reference")


def _cli_sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"n": args.n, "k": args.k, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "greedy": args.greedy}


def _device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


@dataclasses.dataclass
class Job:
    """Problems that share one set of sampling settings (all DATA files, or one suite benchmark)."""

    problems: list
    settings: Any


def _plan(args: argparse.Namespace, tokenizer) -> tuple[list[Job], list[dict[str, str]]]:
    """Jobs to run and the suite's disabled benchmarks (name and reason)."""
    from prime.eval.runner import load_problems, problems_from_rows
    from prime.eval.suite import load_suite, make_settings

    render = dict(system_prompt=args.system_prompt, use_chat_template=not args.no_chat_template)
    jobs, skipped = [], []
    if args.data:
        problems = []
        for source in args.data:
            problems += load_problems(source, tokenizer, split=args.split, limit=args.limit, **render)
        jobs.append(Job(problems, make_settings(_cli_sampling(args), seed=args.seed, batch_size=args.batch_size)))
    if args.suite:
        suite = load_suite(args.suite)
        for b in suite.benchmarks:
            if not b.enabled:
                skipped.append({"name": b.name, "reason": b.reason})
                continue
            settings = make_settings(suite.defaults, b.sampling, _cli_sampling(args), seed=args.seed,
                                     batch_size=args.batch_size)
            jobs.append(Job(problems_from_rows(b.rows(), tokenizer, b.name, limit=args.limit, **render), settings))
    return jobs, skipped


def _make_engine(args: argparse.Namespace, jobs: list[Job], device: str, dtype: str):
    if args.engine == "hf":
        from prime.rollout.hf import HFEngine

        return HFEngine(args.model, dtype=dtype, device=device, seed=args.seed)
    from prime.rollout.vllm import VLLMEngine

    longest = max(len(p.prompt_ids) + j.settings.max_new_tokens for j in jobs for p in j.problems)
    return VLLMEngine(args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=dtype,
                      gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=longest,
                      seed=args.seed)


def _make_prm(args: argparse.Namespace, tokenizer, device: str, dtype: str):
    if args.prm is None:
        return None
    from prime.eval.prm import ImplicitPRMScorer, check_same_vocab

    prm = ImplicitPRMScorer(args.prm, args.ref, beta=args.beta, dtype=dtype, device=device,
                            micro_batch_size=args.prm_batch_size)
    check_same_vocab(tokenizer, prm.tokenizer, f"policy {args.model!r}", f"PRM {args.prm!r}")
    return prm


class PoolGrader:
    """`grade(items) -> scores` over a `VerifierPool`, adding up the pool's counters."""

    COUNTERS = ("verify/items", "verify/timeouts", "verify/errors", "verify/seconds")

    def __init__(self, pool):
        self.pool = pool
        self.totals: Counter = Counter()

    def __call__(self, items: list[dict]) -> list[float]:
        scores, metrics = self.pool.score(items)
        for key in self.COUNTERS:
            self.totals[key] += metrics[key]
        return scores


def format_table(metrics: dict[str, dict[str, float | None]]) -> str:
    """A fixed-width table: one row per dataset, one column per metric ("-" where absent)."""
    columns: list[str] = []
    for values in metrics.values():
        columns += [c for c in values if c not in columns and c != "n"]
    counts = {"problems", "prm_rank_pairs"}

    def cell(column: str, value: float | None) -> str:
        if value is None:
            return "-"
        return str(int(value)) if column in counts else f"{value:.3f}"

    rows = [["dataset"] + columns]
    rows += [[name] + [cell(c, values.get(c)) for c in columns] for name, values in metrics.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    """Run the evaluation the arguments describe; returns what it writes to `args.out`."""
    from prime.eval.runner import evaluate
    from prime.models.loading import load_tokenizer
    from prime.verifiers.pool import VerifierPool

    _check_args(args)
    start = time.monotonic()
    device, dtype = _device_and_dtype(args)
    tokenizer = load_tokenizer(args.model)
    jobs, skipped = _plan(args, tokenizer)
    prm = _make_prm(args, tokenizer, device, dtype)
    engine = _make_engine(args, jobs, device, dtype)
    metrics, records, settings = {}, [], {}
    try:
        with VerifierPool(args.verify_workers or os.cpu_count() or 1, args.verify_timeout,
                          code_case_timeout_s=args.code_test_timeout) as pool:
            grader = PoolGrader(pool)
            for job in jobs:
                result = evaluate(job.problems, engine, grader, job.settings, prm=prm)
                metrics.update(result.metrics)
                records += result.records
                settings.update({name: dataclasses.asdict(job.settings) for name in result.metrics})
    finally:
        engine.shutdown()
    payload = {"model": args.model, "engine": args.engine, "prm": args.prm, "ref": args.ref,
               "beta": args.beta if args.prm else None, "settings": settings, "metrics": metrics,
               "skipped": skipped, "verify": dict(grader.totals), "seconds": time.monotonic() - start,
               "problems": [dataclasses.asdict(r) for r in records]}
    print(format_table(metrics))
    for s in skipped:
        print(f"skipped {s['name']}: {s['reason']}")
    _write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prime eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"prime eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
