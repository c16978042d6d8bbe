"""Does RL learn something held-out? The arithmetic-chain probe: SFT start, then held-out pass@1.

    .venv/bin/python bench/arith_chain.py sft /tmp/chain_sft          # tiny preset, 1000 SFT steps
    .venv/bin/prime make-data /tmp/chain_train.parquet --kind arith_chain --n 4096
    .venv/bin/prime train configs/arith_chain_cpu.yaml model.path=/tmp/chain_sft \\
        data.train_files=/tmp/chain_train.parquet
    .venv/bin/python bench/arith_chain.py eval runs/arith_chain_cpu   # start, checkpoints, final
    .venv/bin/python bench/arith_chain.py styles runs/arith_chain_cpu/final_policy  # bare vs worked

`sft` builds the tiny model locally and gives it `prime.train.sft.CHAIN_STEPS` supervised steps on
train-split rows, `CHAIN_BARE_ANSWERS` of them bare answers ("\\boxed{6}") and the rest worked solutions
("3+5=8\\n8+2=10\\n10-4=6\\n\\boxed{6}"), then prints its
held-out greedy pass@1 and sampled (temperature 1) accuracy on the test split, whose expressions
never occur in training (`prime.data.synthetic.chain_split`).

`eval` scores a run folder on the same held-out rows: the start model (`model.path` of the run's
config.yaml), the policy of every kept checkpoint and `final_policy`, with one line per step giving
the verifier accuracy of the run's own rollouts (mean over the last `--window` steps, from
metrics.jsonl) beside the held-out greedy pass@1. A plain HF folder is scored by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_start(out_dir: str, preset: str, steps: int, lr: float, batch_size: int, num_examples: int,
                seed: int, num_eval: int, bare_answers: float) -> dict:
    """Build the tiny model at `out_dir`, warm-start it on worked solutions, measure it held-out."""
    import time

    from prime.models.tiny import build_tiny_model, tiny_model_preset
    from prime.rollout.hf import HFEngine
    from prime.train.sft import CHAIN_MAX_NEW_TOKENS, chain_rows, engine_accuracy, sft_warm_start, torch_threads

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir!r} exists; give a new folder for the SFT start")
    train, held_out = chain_rows(num_examples, seed, num_eval, bare_answers)
    build_tiny_model(out_dir, seed=seed, **tiny_model_preset(preset))
    t0 = time.perf_counter()
    stats = sft_warm_start(out_dir, rows=train, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                           log_every=0, max_new_tokens=CHAIN_MAX_NEW_TOKENS)
    sft_s = time.perf_counter() - t0
    with torch_threads(1):
        engine = HFEngine(out_dir, seed=seed)
        greedy = engine_accuracy(engine, held_out, 1, CHAIN_MAX_NEW_TOKENS, temperature=0.0)
        sampled = engine_accuracy(engine, held_out, 4, CHAIN_MAX_NEW_TOKENS, temperature=1.0, seed=seed)
    return {"model": out_dir, "preset": preset, "steps": steps, "lr": lr, "batch_size": batch_size,
            "num_examples": num_examples, "bare_answers": bare_answers, "seed": seed, "sft_seconds": round(sft_s, 1),
            "loss": round(stats["warmstart/loss"], 4), "heldout_greedy": greedy, "heldout_sampled": sampled,
            "heldout_rows": len(held_out)}


def train_curve(metrics_lines: list[dict], window: int) -> dict[int, float]:
    """Step -> mean of `verify/mean_score_all` over the steps in (step - window, step]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    acc = {int(m["step"]): float(m["verify/mean_score_all"]) for m in metrics_lines}
    out = {}
    for step in sorted(acc):
        xs = [v for s, v in acc.items() if step - window < s <= step]
        out[step] = sum(xs) / len(xs)
    return out


def checkpoint_policy_weights(step_dir: str) -> dict:
    """The policy weights of a run checkpoint (`checkpoints/step_N`), by checkpoint name.

    DeepSpeed keeps the module's full state dict in `policy/<tag>/mp_rank_00_model_states.pt` for
    ZeRO stages 0-2 with one model-parallel rank (what prime trains on the CPU); under ZeRO-3 the
    module there is empty and the run's `final_policy` is the folder to score.
    """
    import torch

    from prime.train.engine import ENGINE_TAG

    path = os.path.join(step_dir, "policy", ENGINE_TAG, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no DeepSpeed policy state at {path!r}; expected a checkpoint step folder "
                                "written by `prime train` (checkpoints/step_NNNNNN)")
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    if not module:
        raise ValueError(f"{path!r} holds no module weights (a ZeRO-3 checkpoint); score final_policy instead")
    return module


def run_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint of a run, by step."""
    from prime.train.checkpoint import is_complete

    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if name.startswith("step_") and name[5:].isdigit() and is_complete(path):
            found.append((int(name[5:]), path))
    return sorted(found)


def run_start_model(run_dir: str) -> str:
    """The model a run started from: `model.path` of its config.yaml, or the tiny model it built."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    return model["path"] or os.path.join(run_dir, f"init_model_{model['tiny_preset']}")


def evaluate_run(run_dir: str, num_eval: int, window: int) -> list[dict]:
    """Held-out greedy pass@1 of a run's start, checkpoints and final policy (see the module doc)."""
    from prime.rollout.hf import HFEngine
    from prime.train.sft import CHAIN_MAX_NEW_TOKENS, chain_rows, engine_accuracy, torch_threads

    _, held_out = chain_rows(1, 0, num_eval)
    curve: dict[int, float] = {}
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            curve = train_curve([json.loads(line) for line in f if line.strip()], window)
    rows = []
    with torch_threads(1):
        engine = HFEngine(run_start_model(run_dir))

        def score(eng) -> float:
            return engine_accuracy(eng, held_out, 1, CHAIN_MAX_NEW_TOKENS, temperature=0.0)

        rows.append({"step": 0, "train_acc": None, "heldout_greedy": score(engine)})
        for step, path in run_checkpoints(run_dir):
            engine.load_weights(checkpoint_policy_weights(path).items())
            rows.append({"step": step, "train_acc": curve.get(step), "heldout_greedy": score(engine)})
        final = os.path.join(run_dir, "final_policy")
        if os.path.isdir(final):
            rows.append({"step": "final", "train_acc": curve[max(curve)] if curve else None,
                         "heldout_greedy": score(HFEngine(final))})
    return rows


def style_accuracy(model_dir: str, num_eval: int, n: int, seed: int) -> list[dict]:
    """Held-out accuracy split by behaviour: responses that open with the bare `\\boxed{}` value vs
    responses that write the steps out, for greedy decoding and for `n` samples at temperature 1."""
    from prime.rollout.hf import HFEngine
    from prime.train.sft import CHAIN_MAX_NEW_TOKENS, _eval_prompts, chain_rows, torch_threads
    from prime.verifiers.math import score

    _, held_out = chain_rows(1, 0, num_eval)
    rows = []
    with torch_threads(1):
        engine = HFEngine(model_dir, seed=seed)
        prompts, truths = _eval_prompts(engine.tokenizer, held_out, None)
        for temperature, k in ((0.0, 1), (1.0, n)):
            groups = engine.generate(prompts, n=k, max_new_tokens=CHAIN_MAX_NEW_TOKENS,
                                     temperature=temperature, seed=seed)
            graded = [(score(c.text, gt), c.text.lstrip().startswith("\\boxed"))
                      for group, gt in zip(groups, truths) for c in group]
            bare = [s for s, is_bare in graded if is_bare]
            worked = [s for s, is_bare in graded if not is_bare]
            rows.append({"temperature": temperature, "samples": len(graded),
                         "acc": sum(s for s, _ in graded) / len(graded), "bare_frac": len(bare) / len(graded),
                         "acc_bare": sum(bare) / len(bare) if bare else None,
                         "acc_worked": sum(worked) / len(worked) if worked else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    from prime.train.sft import CHAIN_BARE_ANSWERS, CHAIN_EVAL_PROMPTS, CHAIN_NUM_EXAMPLES, CHAIN_STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sft", help="build the tiny model and warm-start it on the train split")
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--steps", type=int, default=CHAIN_STEPS)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-examples", type=int, default=CHAIN_NUM_EXAMPLES)
    p.add_argument("--bare-answers", type=float, default=CHAIN_BARE_ANSWERS,
                   help="share of examples trained on the bare boxed answer instead of the worked steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-eval", type=int, default=CHAIN_EVAL_PROMPTS)
    p = sub.add_parser("eval", help="held-out greedy pass@1 along a run (or of one HF folder)")
    p.add_argument("path", help="a run folder (runs/<name>) or a plain HF model folder")
    p.add_argument("--num-eval", type=int, default=CHAIN_EVAL_PROMPTS)
    p.add_argument("--window", type=int, default=10, help="steps averaged into the train accuracy")
    p = sub.add_parser("styles", help="held-out accuracy of one HF folder, bare answers vs worked steps")
    p.add_argument("model_dir")
    p.add_argument("--num-eval", type=int, default=256)
    p.add_argument("--n", type=int, default=4, help="temperature-1 samples per problem")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "styles":
        for row in style_accuracy(args.model_dir, args.num_eval, args.n, args.seed):
            print(json.dumps(row))
        return 0
    if args.command == "sft":
        print(json.dumps(build_start(args.out_dir, args.preset, args.steps, args.lr, args.batch_size,
                                     args.num_examples, args.seed, args.num_eval, args.bare_answers)))
        return 0
    if os.path.isfile(os.path.join(args.path, "config.json")):
        from prime.train.sft import CHAIN_MAX_NEW_TOKENS, chain_rows, greedy_accuracy

        _, held_out = chain_rows(1, 0, args.num_eval)
        print(json.dumps({"model": args.path,
                          "heldout_greedy": greedy_accuracy(args.path, held_out, CHAIN_MAX_NEW_TOKENS)}))
        return 0
    for row in evaluate_run(args.path, args.num_eval, args.window):
        train = "  -  " if row["train_acc"] is None else f"{row['train_acc']:.3f}"
        print(f"step {row['step']!s:>5}  train_acc {train}  heldout_greedy {row['heldout_greedy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
