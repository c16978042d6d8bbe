"""`prime sweep SWEEP.yaml`: a grid of config overrides, each arm a training job, then one table and plots.

A sweep file:

    # prime sweep configs/sweeps/cpu_ablation.yaml
    base: configs/arith_chain_cpu.yaml      # the preset every arm starts from
    output_dir: runs/sweeps/cpu_ablation     # arms, logs, status and the summary go here
    parallel: 1                              # arms at once (subprocesses; on a cluster, Ray places them)
    overrides: [trainer.total_steps=100]     # applied to every arm
    grid:                                    # the cross product of the axes is the set of arms
      algo:                                  # a named axis: label -> overrides
        prime: [algo.name=prime]
        rloo: [algo.name=prime, algo.process_coef=0]
      trainer.seed: [0, 1, 2]                # a config key: one arm per value
    seed_axis: trainer.seed                  # the axis averaged over in the summary (default)

Paths in the file are relative to the working directory. Each arm runs `prime train BASE
<overrides>` in its own process with `trainer.output_dir=<output_dir>/arms` and
`trainer.run_name=<arm>`, its output in `<output_dir>/logs/<arm>.log`. An arm that finished is
marked by `<output_dir>/arms/<arm>/SWEEP_DONE` and skipped when the sweep runs again; an arm that
stopped half-way resumes from its last checkpoint (`trainer.resume=auto`). An arm that fails is
recorded in `status.json` with its exit code and the tail of its log, and the other arms go on.

The summary (`summary.md`, `summary.csv`, `*.png`) groups arms by everything but the seed axis and
reports, per held-out dataset, the final and best value of the headline metric (greedy pass@1)
with mean and standard deviation over seeds, the wall time and the generated samples; the plots
show held-out accuracy against step and against generated samples (mean over seeds, band from the
lowest to the highest seed), and the PRM's held-out ranking accuracy for the arms that have one.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from prime.config import ConfigError, load_config, load_yaml

DONE_MARKER = "SWEEP_DONE"
HEADLINE = "greedy_pass@1"


@dataclass(frozen=True)
class Arm:
    """One job of the sweep: its name, its labels per axis and its overrides."""

    name: str
    labels: dict[str, str]
    overrides: tuple[str, ...]


@dataclass
class Sweep:
    """A parsed sweep file."""

    base: str
    output_dir: str
    arms: list[Arm]
    seed_axis: str
    parallel: int = 1
    axes: list[str] = field(default_factory=list)


def _axis_values(axis: str, spec: Any) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every value of one axis: a mapping label -> overrides, or a list of values
    of the config key `axis`."""
    if isinstance(spec, dict):
        out = []
        for label, overrides in spec.items():
            if isinstance(overrides, str):
                overrides = [overrides]
            if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
                raise ConfigError(f"grid.{axis}.{label}: expected a list of section.key=value overrides, got {overrides!r}")
            out.append((str(label), list(overrides)))
        return out
    if isinstance(spec, list) and spec:
        if "." not in axis:
            raise ConfigError(f"grid.{axis}: a list of values needs a config key as the axis (e.g. trainer.seed), "
                              f"or give a mapping label -> overrides")
        return [(f"{axis.split('.')[-1]}{v}", [f"{axis}={json.dumps(v) if isinstance(v, (list, dict)) else v}"])
                for v in spec]
    raise ConfigError(f"grid.{axis}: expected a non-empty list of values or a mapping label -> overrides, got {spec!r}")


def expand_grid(grid: dict[str, Any], common: list[str]) -> list[Arm]:
    """Every combination of the axes' values, in file order (the last axis varies fastest)."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("the sweep needs a non-empty 'grid' mapping of axes")
    axes = [(axis, _axis_values(axis, spec)) for axis, spec in grid.items()]
    arms = []
    for combo in itertools.product(*(values for _, values in axes)):
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        overrides = tuple(common) + tuple(o for _, ovs in combo for o in ovs)
        name = "-".join(label for label, _ in combo).replace("/", "_")
        arms.append(Arm(name, labels, overrides))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"arm names collide: {sorted(n for n in names if names.count(n) > 1)}; make the labels unique")
    return arms


def load_sweep(path: str) -> Sweep:
    """Parse and check a sweep file; every arm's config is resolved, so a bad override fails here."""
    spec = load_yaml(path)
    unknown = sorted(set(spec) - {"base", "output_dir", "overrides", "grid", "seed_axis", "parallel"})
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {unknown}; valid: base, output_dir, overrides, grid, "
                          "seed_axis, parallel")
    for key in ("base", "output_dir"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ConfigError(f"{path}: '{key}' must be a path, got {spec.get(key)!r}")
    common = spec.get("overrides") or []
    if not isinstance(common, list):
        raise ConfigError(f"{path}: 'overrides' must be a list of section.key=value, got {common!r}")
    arms = expand_grid(spec.get("grid"), [str(o) for o in common])
    for arm in arms:  # fail before any arm runs
        try:
            load_config(spec["base"], list(arm.overrides))
        except ConfigError as e:
            raise ConfigError(f"arm {arm.name}: {e}") from None
    parallel = spec.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"{path}: 'parallel' must be an integer >= 1, got {parallel!r}")
    return Sweep(base=spec["base"], output_dir=spec["output_dir"], arms=arms,
                 seed_axis=spec.get("seed_axis", "trainer.seed"), parallel=parallel, axes=list(spec["grid"]))


# --------------------------------------------------------------------------------------------------
# Running the arms
# --------------------------------------------------------------------------------------------------


def arm_dir(sweep: Sweep, arm: Arm) -> str:
    return os.path.join(sweep.output_dir, "arms", arm.name)


def arm_command(sweep: Sweep, arm: Arm) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", sweep.base, *arm.overrides,
            f"trainer.output_dir={os.path.join(sweep.output_dir, 'arms')}", f"trainer.run_name={arm.name}",
            "logging.progress_bar=false"]


def _read_status(sweep: Sweep) -> dict[str, dict]:
    path = os.path.join(sweep.output_dir, "status.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _write_status(sweep: Sweep, status: dict[str, dict]) -> None:
    path = os.path.join(sweep.output_dir, "status.json")
    with open(path + ".tmp", "w") as f:
        json.dump(status, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _tail(path: str, lines: int = 8) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_arms(sweep: Sweep, log=print) -> dict[str, dict]:
    """Run every arm without a done marker, `sweep.parallel` at a time; returns the status of every arm."""
    os.makedirs(os.path.join(sweep.output_dir, "logs"), exist_ok=True)
    status = _read_status(sweep)
    todo = [a for a in sweep.arms if not os.path.exists(os.path.join(arm_dir(sweep, a), DONE_MARKER))]
    for arm in sweep.arms:
        if arm not in todo:
            status.setdefault(arm.name, {})["status"] = "done"
            log(f"[sweep] {arm.name}: done before, skipped")
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    queue = list(todo)
    while queue or running:
        while queue and len(running) < sweep.parallel:
            arm = queue.pop(0)
            log_path = os.path.join(sweep.output_dir, "logs", f"{arm.name}.log")
            out = open(log_path, "a")
            log(f"[sweep] {arm.name}: start ({' '.join(arm.overrides)})")
            running[arm.name] = (subprocess.Popen(arm_command(sweep, arm), stdout=out, stderr=subprocess.STDOUT),
                                 time.time(), out)
        time.sleep(0.5)
        for name, (proc, started, out) in list(running.items()):
            if proc.poll() is None:
                continue
            out.close()
            del running[name]
            status[name] = _finished(sweep, name, proc.returncode, time.time() - started, status.get(name, {}))
            log(f"[sweep] {name}: {status[name]['status']} (exit {proc.returncode}, "
                f"{status[name]['seconds']:.0f} s)")
            _write_status(sweep, status)
    return status


def _finished(sweep: Sweep, name: str, rc: int, seconds: float, before: dict) -> dict:
    log_path = os.path.join(sweep.output_dir, "logs", f"{name}.log")
    total = before.get("seconds", 0.0) + seconds  # wall time over every attempt of the arm
    if rc == 0 and not os.path.exists(os.path.join(sweep.output_dir, "arms", name, "final_policy")):
        # Stopped by SIGTERM with a checkpoint: not done; the next `prime sweep` resumes it.
        return {"status": "preempted", "rc": 0, "seconds": total, "log": log_path}
    if rc == 0:
        with open(os.path.join(sweep.output_dir, "arms", name, DONE_MARKER), "w") as f:
            f.write(f"{total:.1f}\n")
        return {"status": "done", "rc": 0, "seconds": total, "log": log_path}
    return {"status": "failed", "rc": rc, "seconds": total, "log": log_path, "tail": _tail(log_path)}


# --------------------------------------------------------------------------------------------------
# Summary: table and plots
# --------------------------------------------------------------------------------------------------


@dataclass
class ArmResult:
    """What one finished (or partial) arm logged: held-out curves and its budget."""

    arm: Arm
    status: str
    seconds: float
    curves: dict[str, list[tuple[int, float]]]  # metric key -> [(step, value)]
    samples_at: dict[int, float]  # step -> generated samples up to and including that step


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl rows, one per step (a step logged twice keeps its last line)."""
    by_step: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_step[int(row["step"])] = by_step.get(int(row["step"]), {}) | row
    return [by_step[s] for s in sorted(by_step)]


def read_arm(sweep: Sweep, arm: Arm, status: dict) -> ArmResult:
    folder = arm_dir(sweep, arm)
    rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
    n = 1
    if os.path.exists(os.path.join(folder, "config.yaml")):
        n = int(load_yaml(os.path.join(folder, "config.yaml"))["rollout"]["n"])
    curves: dict[str, list[tuple[int, float]]] = {}
    samples_at, total = {}, 0.0
    for row in rows:
        total += float(row.get("filter/generated_groups") or 0.0) * n
        samples_at[row["step"]] = total
        for key, value in row.items():
            if key.startswith("eval/") and value is not None:
                curves.setdefault(key, []).append((row["step"], float(value)))
    info = status.get(arm.name, {})
    seconds = float(info.get("seconds", 0.0))
    done = os.path.exists(os.path.join(folder, DONE_MARKER))
    if done and not seconds:
        with open(os.path.join(folder, DONE_MARKER)) as f:
            seconds = float(f.read().strip() or 0.0)
    state = "done" if done else info.get("status", "partial" if rows else "missing")
    return ArmResult(arm, state, seconds, curves, samples_at)


def group_name(sweep: Sweep, arm: Arm) -> str:
    """The arm's labels on every axis but the seed axis: the arms averaged together."""
    return "-".join(label for axis, label in arm.labels.items() if axis != sweep.seed_axis) or "all"


def headline_keys(results: list[ArmResult]) -> list[str]:
    """`eval/<dataset>/greedy_pass@1` of every held-out dataset any arm logged."""
    return sorted({k for r in results for k in r.curves if k.endswith(f"/{HEADLINE}")})


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(sweep: Sweep, results: list[ArmResult]) -> list[dict[str, Any]]:
    """One row per (group, held-out dataset): start, final and best headline value over seeds."""
    groups: dict[str, list[ArmResult]] = {}
    for r in results:
        groups.setdefault(group_name(sweep, r.arm), []).append(r)
    rows = []
    for key in headline_keys(results):
        dataset = key[len("eval/"):-len(f"/{HEADLINE}")]
        for group, members in groups.items():
            done = [r for r in members if r.status == "done" and r.curves.get(key)]
            start = [r.curves[key][0][1] for r in done if r.curves[key][0][0] == 0]
            final = [r.curves[key][-1][1] for r in done]
            best = [max(v for _, v in r.curves[key]) for r in done]
            rows.append({
                "group": group, "dataset": dataset, "seeds": len(done),
                "failed": sum(r.status == "failed" for r in members),
                "start": _mean_std(start), "final": _mean_std(final), "best": _mean_std(best),
                "gain": _mean_std([f - s for f, s in zip(final, start)]) if len(start) == len(final) else (math.nan, math.nan),
                "seconds": _mean_std([r.seconds for r in done]),
                "samples": _mean_std([max(r.samples_at.values(), default=0.0) for r in done]),
            })
    return rows


def _fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_tables(sweep: Sweep, rows: list[dict[str, Any]], results: list[ArmResult]) -> tuple[str, str]:
    """summary.md (with the failed arms listed) and summary.csv in the sweep folder."""
    md = os.path.join(sweep.output_dir, "summary.md")
    head = f"held-out {HEADLINE}: mean ± std over seeds ({sweep.seed_axis})"
    lines = [f"# Sweep {os.path.basename(sweep.output_dir.rstrip('/'))}", "", head, "",
             "| arm | dataset | seeds | start | final | best | final - start | wall s | samples |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['dataset']} | {r['seeds']} | {_fmt(r['start'])} | {_fmt(r['final'])} | "
                     f"{_fmt(r['best'])} | {_fmt(r['gain'])} | {_fmt(r['seconds'], 0)} | {_fmt(r['samples'], 0)} |")
    failed = [r for r in results if r.status != "done"]
    if failed:
        lines += ["", "Arms that did not finish: " + ", ".join(f"{r.arm.name} ({r.status})" for r in failed)]
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    path_csv = os.path.join(sweep.output_dir, "summary.csv")
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "dataset", "seeds", "failed", "start_mean", "start_std", "final_mean", "final_std",
                    "best_mean", "best_std", "gain_mean", "gain_std", "seconds_mean", "samples_mean"])
        for r in rows:
            w.writerow([r["group"], r["dataset"], r["seeds"], r["failed"], *r["start"], *r["final"], *r["best"],
                        *r["gain"], r["seconds"][0], r["samples"][0]])
    return md, path_csv


def band(members: list[ArmResult], key: str) -> list[tuple[int, float, float, float, float]]:
    """(step, mean samples, mean, lowest, highest) over the seeds, at the steps every seed evaluated."""
    curves = [dict(r.curves[key]) for r in members if r.curves.get(key)]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    out = []
    for s in steps:
        values = [c[s] for c in curves]
        samples = statistics.fmean(r.samples_at.get(s, 0.0) for r in members if r.curves.get(key))
        out.append((s, samples, statistics.fmean(values), min(values), max(values)))
    return out


def plot(sweep: Sweep, results: list[ArmResult]) -> list[str]:
    """PNG plots: every held-out dataset against step and against generated samples, and the PRM's
    held-out ranking accuracy; one curve per arm group, a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[ArmResult]] = {}
    for r in results:
        if r.status == "done":
            groups.setdefault(group_name(sweep, r.arm), []).append(r)
    written = []
    for key in headline_keys(results) + ["eval/prm_rank_acc"]:
        curves = {g: band(m, key) for g, m in groups.items()}
        curves = {g: c for g, c in curves.items() if c}
        if not curves:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for g, pts in curves.items():
            for ax, x in ((axes[0], [p[0] for p in pts]), (axes[1], [p[1] for p in pts])):
                line, = ax.plot(x, [p[2] for p in pts], marker="o", markersize=3, label=f"{g} (n={len(groups[g])})")
                ax.fill_between(x, [p[3] for p in pts], [p[4] for p in pts], color=line.get_color(), alpha=0.15)
        name = key[len("eval/"):].replace("/", "_").replace("@", "_at_")
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("generated samples")
        axes[0].set_ylabel(key[len("eval/"):])
        if key == "eval/prm_rank_acc":
            for ax in axes:
                ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{key[len('eval/'):]}: mean over seeds, band = lowest to highest seed")
        fig.tight_layout()
        path = os.path.join(sweep.output_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summarize(sweep: Sweep, log=print) -> list[str]:
    """Tables and plots of whatever the arms have logged so far; returns the files written."""
    status = _read_status(sweep)
    results = [read_arm(sweep, arm, status) for arm in sweep.arms]
    rows = summary_rows(sweep, results)
    files = [*write_tables(sweep, rows, results), *plot(sweep, results)]
    with open(files[0]) as f:
        log(f.read())
    return files


def main(path: str, summarize_only: bool = False, log=print) -> int:
    """`prime sweep`: run the arms not done yet, then summarize; 1 if an arm failed."""
    sweep = load_sweep(path)
    os.makedirs(sweep.output_dir, exist_ok=True)
    with open(os.path.join(sweep.output_dir, "sweep.yaml"), "w") as f:  # what was run
        yaml.safe_dump(load_yaml(path), f, sort_keys=False)
    status = _read_status(sweep) if summarize_only else run_arms(sweep, log)
    files = summarize(sweep, log)
    log("[sweep] wrote " + ", ".join(files))
    failed = [name for name, s in status.items() if s.get("status") == "failed"]
    if failed:
        log(f"[sweep] {len(failed)} arm(s) failed: {', '.join(failed)} (see their logs)")
    return 1 if failed else 0
