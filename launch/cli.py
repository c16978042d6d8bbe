"""The `prime` command.

    prime train CONFIG [section.key=value ...] [--dry-run]
    prime build-tiny-model OUT_DIR [--preset tiny|small]
    prime make-data OUT [--kind arith|code|arith_chain] [--n N] [--seed S] [--split train|test]
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from prime.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"prime: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from launch.train import run  # heavy imports (ray) only when training

    run(cfg, config_path=args.config)
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from prime.models.tiny import build_tiny_model, tiny_model_preset

    path = build_tiny_model(args.out_dir, **tiny_model_preset(args.preset))
    print(path)
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from prime.data.synthetic import make_arith_chain_dataset, make_arithmetic_dataset, make_code_dataset

    if args.kind == "arith_chain":
        make_arith_chain_dataset(args.out, n=args.n, split=args.split, seed=args.seed)
    elif args.split != "train":
        print(f"prime: --split {args.split} applies only to --kind arith_chain (the other kinds have no "
              f"held-out split); got --kind {args.kind}", file=sys.stderr)
        return 2
    else:
        make = make_arithmetic_dataset if args.kind == "arith" else make_code_dataset
        make(args.out, n=args.n, seed=args.seed)
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prime", description="Online RL for LLMs with implicit process rewards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run an RL job from a YAML preset plus dotted overrides")
    p.add_argument("config", help="YAML preset, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the preset (e.g. algo.name=grpo)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("build-tiny-model", help="write a tiny HF checkpoint + tokenizer built locally")
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.set_defaults(func=_build_tiny)

    p = sub.add_parser("make-data", help="write a synthetic dataset in the verl / Eurus-2-RL schema")
    p.add_argument("out", help="output .parquet or .jsonl path")
    p.add_argument("--kind", choices=["arith", "code", "arith_chain"], default="arith")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="arith_chain only: the split, disjoint by expression (test: held-out evaluation)")
    p.set_defaults(func=_make_data)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
