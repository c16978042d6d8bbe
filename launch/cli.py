"""The `prime` command.

    prime train CONFIG [section.key=value ...] [--dry-run] [--debug]
    prime plan CONFIG [section.key=value ...]
    prime sft CONFIG [section.key=value ...] [--out DIR]
    prime build-tiny-model OUT_DIR [--preset tiny|small] [--vocab arith|byte] [--seed S]
    prime make-data OUT [--kind arith|code|arith_chain] [--n N] [--seed S] [--split train|test]
    prime eval MODEL [DATA ...] [--suite SUITE.yaml] [--engine hf|vllm] [--n N] [--k 1,4,8] ...
    prime convert-data SOURCE OUT [--format NAME] [--split S] [--config C] [--limit N]
    prime sweep SWEEP.yaml [--summarize-only]

Options and positional arguments may come in any order (`prime train --dry-run CONFIG k=v` and
`prime train CONFIG k=v --dry-run` are the same). A user error (bad flag, config key, data file,
model path, output folder, disk space) prints one line naming what is wrong and what would be
valid, and exits 2; `--debug` adds the traceback. A run stopped by SIGTERM exits 0 after its
checkpoint (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import sys
import traceback


class UsageError(Exception):
    """A command line argparse rejects; printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that list the valid options."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        hint = ""
        if message.startswith(prefix):
            # Intermixed parsing lists every positional after an unknown option too; name the options.
            tokens = message[len(prefix):].split()
            flags = [t for t in tokens if t.startswith("-") and not t[1:2].isdigit()]
            message = prefix + " ".join(flags or tokens)
            options = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")} | {"--debug"})
            hint = f"; valid options: {', '.join(options)}"
        raise UsageError(f"{self.prog}: {message}{hint} (see `{self.prog} -h`)")


def _train(args: argparse.Namespace) -> int:
    from prime.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from launch.preflight import check_inputs

        check_inputs(cfg)
        print(to_yaml(cfg), end="")
        return 0
    from launch.placement import PlanError
    from launch.train import run  # heavy imports (ray) only when training
    from workers.group import PlacementError

    try:
        run(cfg)
    except (PlanError, PlacementError) as e:
        print(f"prime: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from launch.placement import PlanError
    from launch.plan import format_plan, make_plan
    from prime.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg)
    except (ConfigError, PlanError) as e:
        print(f"prime plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, " ".join([args.config, *args.overrides])), end="")
    return 0


def _sft(args: argparse.Namespace) -> int:
    import logging
    import os

    from prime.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.model.path:
        raise ConfigError(f"prime sft builds the locally built model of model.tiny_preset; "
                          f"model.path={cfg.model.path!r} must be empty")
    if cfg.model.warm_start_steps < 1:
        raise ConfigError(f"prime sft needs model.warm_start_steps >= 1, got {cfg.model.warm_start_steps}")
    from launch.setup import build_sft_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = args.out or os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name, "sft_model")
    print(build_sft_model(cfg, os.path.abspath(out)))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from prime.models.tiny import build_tiny_model, tiny_model_preset

    print(build_tiny_model(args.out_dir, vocab=args.vocab, seed=args.seed, **tiny_model_preset(args.preset)))
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from prime.data.synthetic import make_synthetic_dataset

    try:
        make_synthetic_dataset(args.kind, args.out, n=args.n, seed=args.seed, split=args.split)
    except ValueError as e:
        print(f"prime make-data: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from launch.eval import run

    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"prime eval: {e}", file=sys.stderr)
        return 2
    return 0


def _convert_data(args: argparse.Namespace) -> int:
    from prime.data.convert import run_from_args

    try:
        run_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"prime convert-data: {e}", file=sys.stderr)
        return 2
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from launch.sweep import main as run_sweep

    return run_sweep(args.sweep, summarize_only=args.summarize_only)


def _add_config_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help="YAML preset, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value, applied after the preset (e.g. algo.name=grpo)")
    p.set_defaults(func=func)
    return p


def _add_data_commands(sub) -> None:
    p = sub.add_parser("build-tiny-model", help="write a tiny HF checkpoint + tokenizer built locally")
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--vocab", choices=["arith", "byte"], default="arith", help="tokenizer vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_build_tiny)

    p = sub.add_parser("make-data", help="write a synthetic dataset in the verl / Eurus-2-RL schema")
    p.add_argument("out", help="output .parquet or .jsonl path")
    p.add_argument("--kind", choices=["arith", "code", "arith_chain"], default="arith")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="arith_chain only: the split, disjoint by expression (test: held-out evaluation)")
    p.set_defaults(func=_make_data)

    from prime.data.convert import add_arguments as add_convert_arguments

    p = sub.add_parser("convert-data", help="convert a public math/code set (hub name or local file) to the verl schema")
    add_convert_arguments(p)
    p.set_defaults(func=_convert_data)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prime", description="Online RL for LLMs with implicit process rewards.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = _add_config_command(sub, "train", "run an RL job from a YAML preset plus dotted overrides", _train)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _add_config_command(sub, "plan", "print where every actor goes and each GPU's memory estimate; starts nothing",
                        _plan)
    p = _add_config_command(sub, "sft", "build the tiny model and give it the supervised warm start RL starts from",
                            _sft)
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/<run_name>/sft_model)")

    from launch.eval import add_arguments as add_eval_arguments

    p = sub.add_parser("eval", help="evaluate a model (pass@k, maj@k, implicit-PRM reranking) on files or a suite")
    add_eval_arguments(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("sweep", help="run a grid of training jobs, then tabulate and plot their held-out results")
    p.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/cpu_ablation.yaml")
    p.add_argument("--summarize-only", action="store_true", help="only rebuild the table and plots from the arms")
    p.set_defaults(func=_sweep)
    _add_data_commands(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The top-level parser picks the command; the command's own parser then takes its options and
    positional arguments in any order (argparse's intermixed parsing, which subcommands lack)."""
    parser = build_parser()
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None:
        args = parser.parse_args(argv)  # -h, or the missing command's error
    else:
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        if argv[command] not in choices or command > 0:
            parser.parse_args(argv)  # the error naming the valid commands, or -h before the command
        sub = choices[argv[command]]
        try:
            args = sub.parse_intermixed_args(argv[command + 1:])
        except TypeError:  # a parser argparse cannot intermix
            args = sub.parse_args(argv[command + 1:])
        args.command = argv[command]
    args.debug = debug
    return args


def _report(args: argparse.Namespace, error: BaseException, code: int) -> int:
    if args.debug:
        traceback.print_exception(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"prime {args.command}: {first}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or stopped by SIGTERM with a checkpoint), 2 a user error, 1 anything else."""
    from prime.config import UserError

    try:
        args = parse(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except UserError as e:
        return _report(args, e, 2)
    except Exception as e:
        faults = sys.modules.get("launch.faults")
        if faults is not None and isinstance(e, faults.JobLost) and not args.debug:
            return _report(args, e, 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
