"""Metrics sinks of the driver: metrics.jsonl, wandb (offline by default), a console line, a progress bar.

Only the driver logs; every other component returns its metrics as a `{"section/name": float}` dict.

The record is exact across crashes and resumes: a step's line is written (and fsynced) before that
step's checkpoint is committed, and a run that resumes from the checkpoint of step S first cuts
metrics.jsonl back to the lines of steps <= S (`rewind`), so every step appears once, in order,
whatever point a crash hit. wandb continues the same run (a stable id per run folder); a step
already sent to it before a crash is not sent again (wandb keeps the first value of a step), and
with a bit-exact resume the values are the same apart from timings. Restarts, preemptions and
other events of the run go to events.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

CONSOLE_KEYS = (
    ("verify/mean_score_all", "acc", "{:.3f}"),  # over every generated response, before filtering
    ("filter/kept_groups", "kept", "{:.0f}"),
    ("prm/loss", "prm_loss", "{:.4f}"),
    ("prm/acc", "prm_acc", "{:.2f}"),
    ("gvpo/loss", "gvpo_loss", "{:.4f}"),
    ("policy/grad_norm", "grad_norm", "{:.3f}"),
    ("rollout/logprob_gap", "gap", "{:.1e}"),
    ("response/mean_len", "len", "{:.1f}"),
    ("timing/step", "step_s", "{:.1f}"),
)


class MetricsLogger:
    def __init__(self, run_dir: str, config: dict, *, wandb_mode: str = "offline", project: str = "prime",
                 entity: str | None = None, run_name: str = "prime", total_steps: int = 0,
                 start_step: int = 0, progress_bar: bool = True, fresh: bool = False) -> None:
        """`start_step`: the step the run resumes after (0: from the start); `fresh`: a new run in
        an existing folder (trainer.resume=none), which also starts a new wandb run."""
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.jsonl = None
        # Steps up to this one already reached wandb (before a crash, or before an in-process restart).
        self.wandb_through = -1 if fresh else max((r["step"] for r in read_records(self.path)), default=-1)
        self.rewind(start_step)
        self.wandb_run = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=project, entity=entity, name=run_name, dir=run_dir, mode=wandb_mode, config=config,
                resume="allow", id=_wandb_id(run_dir, fresh),
            )
        self.bar = None
        if progress_bar and total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="prime", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)
        self.started = time.time()

    def rewind(self, step: int) -> None:
        """Keep only the lines of steps <= `step` (none when `step` is 0: a run from the start
        logs its step-0 evaluation again), then append after them."""
        if self.jsonl is not None:
            self.jsonl.close()
        kept = {r["step"]: r for r in read_records(self.path) if step > 0 and r["step"] <= step}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(kept[s]) + "\n" for s in sorted(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.jsonl = open(self.path, "a", buffering=1)
        bar = getattr(self, "bar", None)
        if bar is not None:  # an in-process restart goes back to `step`
            bar.n = step
            bar.refresh()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"step": step, "time": time.time()} | {k: (None if math.isnan(v) else v) for k, v in clean.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        os.fsync(self.jsonl.fileno())  # on disk before the step's checkpoint can be committed
        if self.wandb_run is not None and step > self.wandb_through:
            self.wandb_run.log(clean, step=step)
            self.wandb_through = step
        parts = [f"step {step}"]
        for key, short, fmt in CONSOLE_KEYS:
            if key in clean and not math.isnan(clean[key]):
                parts.append(f"{short}={fmt.format(clean[key])}")
        for key, value in clean.items():  # held-out greedy pass@1 of every dataset, when evaluated
            if key.startswith("eval/") and key.endswith("/greedy_pass@1"):
                parts.append(f"eval:{key[len('eval/'):-len('/greedy_pass@1')]}={value:.3f}")
        if "eval/prm_rank_acc" in clean:
            parts.append(f"eval:prm_rank={clean['eval/prm_rank_acc']:.2f}")
        line = " | ".join(parts)
        self.print(line)
        if self.bar is not None:
            self.bar.update(1)

    def print(self, line: str) -> None:
        """A console line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """One line in events.jsonl (restarts with their cause, preemption, ...)."""
        record = {"step": step, "time": time.time(), "event": kind} | fields
        with open(os.path.join(self.run_dir, "events.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_records(path: str) -> list[dict]:
    """The step records of a metrics.jsonl, skipping a line cut short by a crash."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
    return out


def _wandb_id(run_dir: str, fresh: bool = False) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same wandb run (a new
    one when the run starts over in the same folder)."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(path) and not fresh:
        return open(path).read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id
