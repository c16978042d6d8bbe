"""Benchmark suites: a YAML file naming benchmarks, where to read them and how to sample.

    defaults:                 # apply to every benchmark unless it sets its own
      n: 16
      k: [1, 4, 16]
      temperature: 0.6
      max_new_tokens: 4096
    benchmarks:
      - name: math_500
        source: HuggingFaceH4/MATH-500     # hub name, or a local file / folder in the source layout
        format: math500                    # a prime.data.convert format
        split: test
        max_new_tokens: 8192               # per-benchmark sampling override
      - name: olympiadbench
        source: Hothan/OlympiadBench
        config: OE_TO_maths_en_COMP        # hub config
        format: olympiadbench
      - name: livecodebench
        source: json                       # datasets' json builder over data_files
        data_files: [hf://datasets/...]
        format: livecodebench
        start_date: "2023-05-01"           # converter options
        end_date: "2024-11-01"
      - name: leetcode
        enabled: false                     # listed, not run, with the reason printed
        reason: ...

Sampling keys (in `defaults` or a benchmark): n, k, temperature, top_p, max_new_tokens, greedy.
Values given on the command line override both. `configs/eval/prime_paper.yaml` is the PRIME
paper's set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from prime.data.convert import FORMATS, convert_source
from prime.eval.runner import EvalSettings

SAMPLING_KEYS = ("n", "k", "temperature", "top_p", "max_new_tokens", "greedy")
OPTION_KEYS = ("start_date", "end_date")
SOURCE_KEYS = ("name", "source", "format", "split", "config", "data_files", "limit", "enabled", "reason")


@dataclass
class Benchmark:
    """One benchmark of a suite (see the module docstring for the keys)."""

    name: str
    source: str = ""
    format: str = ""
    split: str = "train"
    config: str | None = None
    data_files: list[str] | None = None
    limit: int | None = None
    enabled: bool = True
    reason: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """The benchmark's rows, converted to the verl schema (rejections are logged)."""
        return convert_source(self.source, None, self.format, split=self.split, config=self.config,
                              data_files=self.data_files, limit=self.limit, **self.options).rows


@dataclass
class Suite:
    """A list of benchmarks and the sampling defaults they share."""

    benchmarks: list[Benchmark]
    defaults: dict[str, Any] = field(default_factory=dict)


def _check_keys(where: str, entry: dict, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")


def _benchmark(entry: Any, i: int, path: str) -> Benchmark:
    where = f"{path}: benchmarks[{i}]"
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ValueError(f"{where} must be a mapping with at least a 'name', got {entry!r}")
    _check_keys(where, entry, SOURCE_KEYS + SAMPLING_KEYS + OPTION_KEYS)
    b = Benchmark(**{k: entry[k] for k in SOURCE_KEYS if k in entry},
                  sampling={k: entry[k] for k in SAMPLING_KEYS if k in entry},
                  options={k: str(entry[k]) for k in OPTION_KEYS if k in entry})
    if isinstance(b.data_files, str):
        b.data_files = [b.data_files]
    if b.enabled:
        if not b.source:
            raise ValueError(f"{where} ({b.name}): 'source' is required for an enabled benchmark")
        if b.format not in FORMATS:
            raise ValueError(f"{where} ({b.name}): format {b.format!r} is not one of {sorted(FORMATS)}")
    elif not b.reason:
        raise ValueError(f"{where} ({b.name}): a disabled benchmark needs a 'reason'")
    return b


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; errors name the file, the entry and the valid keys."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or not data["benchmarks"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'benchmarks' list")
    _check_keys(str(path), data, ("defaults", "benchmarks"))
    defaults = data.get("defaults") or {}
    _check_keys(f"{path}: defaults", defaults, SAMPLING_KEYS)
    benchmarks = [_benchmark(e, i, str(path)) for i, e in enumerate(data["benchmarks"])]
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: benchmark names must be unique, got {names}")
    return Suite(benchmarks=benchmarks, defaults=defaults)


def make_settings(*layers: dict[str, Any], seed: int = 0, batch_size: int | None = None) -> EvalSettings:
    """`EvalSettings` from sampling-key layers, later layers winning; None values are skipped.

    When only one of n and k is set, n defaults to the largest k and k to (1, n).
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    kwargs = {"ks" if k == "k" else k: v for k, v in merged.items()}
    if isinstance(kwargs.get("ks"), int):
        kwargs["ks"] = (kwargs["ks"],)
    # One of n and k implies the other: n = the largest k, or k = 1 and n.
    if "n" not in kwargs and "ks" in kwargs:
        kwargs["n"] = max(kwargs["ks"])
    if "ks" not in kwargs and "n" in kwargs:
        kwargs["ks"] = tuple(sorted({1, int(kwargs["n"])}))
    valid = {f.name for f in fields(EvalSettings)}
    kwargs = {k: v for k, v in kwargs.items() if k in valid}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    return EvalSettings(seed=seed, **kwargs)
