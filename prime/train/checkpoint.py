"""Atomic run checkpoints: a crash mid-save never leaves a half-written checkpoint behind.

Layout under `ckpt_root`:

    step_000120/          one complete checkpoint
        policy/ prm/ ...  whatever the writers put there (DeepSpeed folders, HF folders)
        state.json        driver state: step, data position, ... (written by us)
        rng.pt            python / numpy / torch RNG states (written by us)
        COMPLETE          marker, written last inside the folder
    latest                text file naming the newest complete folder (updated last of all)
    .tmp-step_000130-PID/ a save in progress (ignored by readers, removed on failure)
    .old-step_000120-PID/ the previous copy of a step being saved again (removed once replaced)

Order of a save: writers fill the temp folder, then state.json, rng.pt and COMPLETE are written
and fsynced, the folder is renamed to `step_N` (atomic on one file system), and only then is
`latest` replaced (temp file + os.replace). A crash at any point leaves the previous `latest` and
its folder intact; `find_latest` also double-checks the COMPLETE marker.

With several processes (data-parallel ranks writing their own shards) every rank must run the
writers into the same temp folder; call this on the driver with writers that fan out to the
ranks, so that one process owns the rename.

Leftovers of a driver that died mid-save (its `.tmp-*` folder, which its actors may have kept
writing into until Ray killed them with their owner, a half-deleted old checkpoint) are removed by
`remove_leftovers`, which every save and every run start calls.

Disk space: a save first checks that the file system has room for another checkpoint of the
previous one's size (deleting, when short, old checkpoints that the `keep_last` rotation would
delete after this save anyway, never the only complete one), and a save that runs out of space
midway raises `DiskFullError` (path, bytes needed, bytes free) with the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable

import torch

from prime.config import UserError

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp-step_\d+|old-step_\d+|latest\.tmp)-\d+$")
# A failed write with less than this left on the file system is taken as running out of space.
_NEARLY_FULL_BYTES = 64 * 2**20
_NO_SPACE_TEXTS = ("No space left on device", "ENOSPC", "Disk quota exceeded", "EDQUOT")


class DiskFullError(UserError):
    """A checkpoint does not fit on its file system; the previous checkpoint is kept."""


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


def dir_size(path: str) -> int:
    """Bytes of every file under `path` (0 when it does not exist)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # removed while walking
                pass
    return total


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path`."""
    return shutil.disk_usage(path).free


def _delete_checkpoint(path: str) -> None:
    """Remove a complete checkpoint, its COMPLETE marker first, so a deletion cut short never
    leaves a folder that looks complete."""
    try:
        os.remove(os.path.join(path, COMPLETE_MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(ckpt_root: str, keep: str | None = None) -> list[str]:
    """Remove what interrupted saves left under `ckpt_root`; returns the names removed.

    `.tmp-step_*` folders (a save that never finished), `step_*` folders without their COMPLETE
    marker (a deletion cut short), stray `latest` temp files. A `.old-step_N-*` copy whose
    `step_N` is missing (a crash between the two renames of a re-save) is renamed back instead.
    `keep` names an entry to leave alone (the caller's own save in progress).
    """
    if not os.path.isdir(ckpt_root):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        if name == keep:
            continue
        if name.startswith(".old-step_") and _LEFTOVER.match(name):
            final = os.path.join(ckpt_root, name[len(".old-"):].rsplit("-", 1)[0])
            if not os.path.exists(final) and is_complete(path):
                os.rename(path, final)
                continue
        if _LEFTOVER.match(name) or (_STEP_DIR.match(name) and os.path.isdir(path) and not is_complete(path)):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed


def _rotate(ckpt_root: str, new_step: int, keep_others: int) -> None:
    """Delete complete checkpoints other than step `new_step`, keeping the `keep_others` newest."""
    others = [(step, path) for step, path in _complete_steps(ckpt_root) if step != new_step]
    for _, path in others[: max(0, len(others) - keep_others)]:
        _delete_checkpoint(path)


def _make_room(ckpt_root: str, step: int, keep_last: int | None) -> None:
    """Raise DiskFullError unless the file system holds another checkpoint of the previous one's
    size; when short, first delete the old checkpoints this save's rotation would delete anyway
    (always keeping one complete checkpoint until the new one is committed)."""
    previous = find_latest(ckpt_root)
    if previous is None:
        return
    need = dir_size(previous)
    if free_bytes(ckpt_root) >= need:
        return
    if keep_last is not None:
        _rotate(ckpt_root, step, max(1, keep_last - 1))
    free = free_bytes(ckpt_root)
    if free < need:
        what = f"needs about {_bytes(need)} (the size of {os.path.basename(previous)})"
        raise DiskFullError(_no_space_message(ckpt_root, step, what, free, previous))


def _bytes(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


def _no_space_message(ckpt_root: str, step: int, what: str, free: int, previous: str | None) -> str:
    kept = f"the previous checkpoint {os.path.basename(previous)} is kept" if previous else "no checkpoint exists yet"
    return (f"not enough disk space for checkpoint {step_dir_name(step)} under {ckpt_root}: it {what}, "
            f"{_bytes(free)} free; {kept}. Free space there, lower trainer.keep_last, or point "
            f"trainer.output_dir at a larger disk")


def _is_out_of_space(error: BaseException, free: int) -> bool:
    """A write error with the file system (nearly) full, or one that says so itself (torch's writer
    reports a short write as "unexpected pos", without the OS error)."""
    text = f"{error!r} {error}"
    if any(t in text for t in _NO_SPACE_TEXTS):
        return True
    return free < _NEARLY_FULL_BYTES and (isinstance(error, OSError) or "unexpected pos" in text)


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
        keep_last: when set, keep the new checkpoint and the `keep_last - 1` newest others after a
            successful save (the one just written is never deleted, whatever its step number).
    Raises:
        DiskFullError: before writing, when the previous checkpoint's size is not free, or when a
            write runs out of space; the temp folder is removed, the previous checkpoint kept.
        whatever a writer raises otherwise, after removing the temp folder (the previous
        checkpoint and `latest` are untouched).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    for sub in writers:
        if not sub or os.sep in sub or sub in (STATE_FILE, RNG_FILE, COMPLETE_MARKER):
            raise ValueError(f"writer name {sub!r} must be a plain folder name other than "
                             f"{STATE_FILE}, {RNG_FILE}, {COMPLETE_MARKER}")
    os.makedirs(ckpt_root, exist_ok=True)
    name = step_dir_name(step)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    remove_leftovers(ckpt_root)
    _make_room(ckpt_root, step, keep_last)
    os.makedirs(tmp)
    try:
        _fill(tmp, writers, state, step)
    except BaseException as e:
        written, free = dir_size(tmp), free_bytes(ckpt_root)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_out_of_space(e, free):
            previous = find_latest(ckpt_root)
            what = f"ran out of space after writing {_bytes(written)}"
            if previous:
                what += f" (the previous checkpoint takes {_bytes(dir_size(previous))})"
            raise DiskFullError(_no_space_message(ckpt_root, step, what, free, previous)) from e
        raise
    final = _commit(ckpt_root, tmp, name)
    _write_latest(ckpt_root, name)
    if keep_last is not None:
        _rotate(ckpt_root, step, keep_last - 1)
    return final


def _fill(tmp: str, writers: dict[str, Callable[[str], None]], state: dict, step: int) -> None:
    """The writers' folders, then state.json, rng.pt and (last) the COMPLETE marker, all fsynced."""
    for sub, write in writers.items():
        write(os.path.join(tmp, sub))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({**state, "step": step}, f, indent=2, sort_keys=True)
    torch.save(rng_state(), os.path.join(tmp, RNG_FILE))
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
        f.write("ok\n")
    _fsync_tree(tmp)


def _commit(ckpt_root: str, tmp: str, name: str) -> str:
    """Rename the filled temp folder to `name`; a previous copy of the same step goes only once
    the new one is in place (re-saving a step, e.g. after a resume)."""
    final = os.path.join(ckpt_root, name)
    try:
        if os.path.exists(final):
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
    return final
