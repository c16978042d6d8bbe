"""Atomic run checkpoints: a crash mid-save never leaves a half-written checkpoint behind.

Layout under `ckpt_root`:

    step_000120/          one complete checkpoint
        policy/ prm/ ...  whatever the writers put there (DeepSpeed folders, HF folders)
        state.json        driver state: step, data position, ... (written by us)
        rng.pt            python / numpy / torch RNG states (written by us)
        COMPLETE          marker, written last inside the folder
    latest                text file naming the newest complete folder (updated last of all)
    .tmp-step_000130-PID/ a save in progress (ignored by readers, removed on failure)

Order of a save: writers fill the temp folder, then state.json, rng.pt and COMPLETE are written
and fsynced, the folder is renamed to `step_N` (atomic on one file system), and only then is
`latest` replaced (temp file + os.replace). A crash at any point leaves the previous `latest` and
its folder intact; `find_latest` also double-checks the COMPLETE marker.

With several processes (data-parallel ranks writing their own shards) every rank must run the
writers into the same temp folder; call this on the driver with writers that fan out to the
ranks, so that one process owns the rename.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable

import torch

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_path(path: str) -> None:
    """fsync a file or a folder (folder fsync makes renames/creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on folders
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def rng_state() -> dict:
    """Python, numpy and torch (CPU and, if present, CUDA) RNG states."""
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(path: str) -> None:
    """Restore the RNG states saved in checkpoint folder `path`."""
    # The file holds Python tuples and numpy arrays, which the weights-only loader rejects; it
    # is our own file from our own checkpoint folder.
    set_rng_state(torch.load(os.path.join(path, RNG_FILE), weights_only=False))


def load_state(path: str) -> dict:
    """The driver state (state.json) of checkpoint folder `path`."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and os.path.isfile(os.path.join(path, STATE_FILE))


def _complete_steps(ckpt_root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        match = _STEP_DIR.match(name)
        path = os.path.join(ckpt_root, name)
        if match and os.path.isdir(path) and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(ckpt_root: str) -> str | None:
    """Path of the newest complete checkpoint under `ckpt_root`, or None.

    Follows the `latest` pointer when it names a complete checkpoint; otherwise (pointer missing,
    or its folder damaged) falls back to the highest-numbered complete `step_N` folder.
    """
    pointer = os.path.join(ckpt_root, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(ckpt_root, name)
        if name and _STEP_DIR.match(name) and is_complete(path):
            return path
    steps = _complete_steps(ckpt_root)
    return steps[-1][1] if steps else None


def _write_latest(ckpt_root: str, name: str) -> None:
    tmp = os.path.join(ckpt_root, f".{LATEST_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_root, LATEST_FILE))
    _fsync_path(ckpt_root)


def save_checkpoint(
    ckpt_root: str,
    step: int,
    writers: dict[str, Callable[[str], None]],
    state: dict,
    keep_last: int | None = None,
) -> str:
    """Write checkpoint `step` atomically; returns its final path.

    Args:
        ckpt_root: folder holding all checkpoints of a run.
        step: training step (names the folder `step_{step:06d}`).
        writers: name -> function writing into the folder it is given (`ckpt/<name>`), e.g.
            {"policy": policy.save_checkpoint, "prm": prm.save_checkpoint}.
        state: JSON-serialisable driver state (step, data position, ...); `step` is added.
        keep_last: when set, delete all but the newest `keep_last` complete checkpoints after a
            successful save.
    Raises:
        whatever a writer raises, after removing the temp folder (the previous checkpoint and
        `latest` are untouched).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    os.makedirs(ckpt_root, exist_ok=True)
    name = step_dir_name(step)
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        for sub, write in writers.items():
            if not sub or os.sep in sub or sub in (STATE_FILE, RNG_FILE, COMPLETE_MARKER):
                raise ValueError(f"writer name {sub!r} must be a plain folder name other than {STATE_FILE}, {RNG_FILE}, {COMPLETE_MARKER}")
            write(os.path.join(tmp, sub))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "step": step}, f, indent=2, sort_keys=True)
        torch.save(rng_state(), os.path.join(tmp, RNG_FILE))
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            f.write("ok\n")
        _fsync_tree(tmp)
        if os.path.exists(final):
            # Re-saving a step (e.g. after a resume): the old copy goes only once the new one is ready.
            old = os.path.join(ckpt_root, f".old-{name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(ckpt_root, name)
    if keep_last is not None:
        for _, path in _complete_steps(ckpt_root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final
