"""Metrics sinks of the driver: metrics.jsonl, wandb (offline by default), a console line, a progress bar.

Only the driver logs; every other component returns its metrics as a `{"section/name": float}` dict.
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
                 start_step: int = 0, progress_bar: bool = True) -> None:
        self.run_dir = run_dir
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.wandb_run = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=project, entity=entity, name=run_name, dir=run_dir, mode=wandb_mode, config=config,
                resume="allow", id=_wandb_id(run_dir),
            )
        self.bar = None
        if progress_bar and total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="prime", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)
        self.started = time.time()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"step": step, "time": time.time()} | {k: (None if math.isnan(v) else v) for k, v in clean.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)
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
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id
