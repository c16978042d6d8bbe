"""Checks of everything a user gives a training job, before anything is written.

`check_inputs` reads the data files, the model folders, the resume path and the output folder and
raises `UserError` with one line naming the file, row or key and what would be valid; the CLI
prints that line and exits 2. It runs before the run folder exists, so a rejected job leaves
nothing behind. Each row's `ability` / `data_source` is checked against the graders
(`prime.verifiers.registry.resolve_kind`), so a row no grader can score fails here, not at the
step that first samples it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prime.config import Config, UserError
from prime.data.dataset import DataError, RowError, read_rows_by_file, validate_row
from prime.train.checkpoint import is_complete
from prime.verifiers.registry import CODE_NAMES, KINDS, MATH_NAMES, resolve_kind

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class CheckedInputs:
    """What the checks read, so the job does not read it twice: the training rows by file."""

    train_rows: list[tuple[str, list[dict]]] = field(default_factory=list)

    @property
    def rows(self) -> list[dict]:
        return [row for _, rows in self.train_rows for row in rows]


def check_inputs(cfg: Config) -> CheckedInputs:
    """Raise UserError for the first bad input of `cfg`'s job; the training rows when all are good."""
    check_output_dir(cfg.trainer.output_dir, cfg.trainer.run_name)
    check_model("model.path", cfg.model.path)
    check_model("prm.model_path", cfg.prm.model_path)
    check_resume(cfg.trainer.resume)
    checked = CheckedInputs()
    for path in cfg.data.train_files:
        checked.train_rows += check_data("data.train_files", path)
    for path in cfg.data.eval_files:
        check_data("data.eval_files", path)
    return checked


def check_data(key: str, source: str) -> list[tuple[str, list[dict]]]:
    """Read `source` file by file; every row must have the schema's fields and a grader."""
    try:
        parts = read_rows_by_file(source)
    except DataError as e:
        raise DataError(f"{key}: {e}") from e
    if not any(rows for _, rows in parts):
        raise DataError(f"{key}: {source!r} holds no rows; give a .parquet, .jsonl or .json file with at least one row")
    for path, rows in parts:
        for i, row in enumerate(rows):
            try:
                validate_row(row, i)
            except RowError as e:
                raise DataError(f"{key}: {path}: {e}") from e
            _check_grader(key, path, i, row)
    return parts


def _check_grader(key: str, path: str, index: int, row: dict) -> None:
    try:
        resolve_kind(row)
    except ValueError:
        raise DataError(
            f"{key}: {path}: row {index}: no grader for ability={row.get('ability')!r}, "
            f"data_source={row.get('data_source')!r}; valid abilities: {', '.join(KINDS)} (or a data_source "
            f"naming a math set: {', '.join(sorted(MATH_NAMES))}; or a code set: {', '.join(sorted(CODE_NAMES))})"
        ) from None


def check_model(key: str, path: str) -> None:
    """A local model folder must hold config.json and tokenizer files; a hub id (`org/name`) that
    is not a local folder is left to the hub client, unless the hub is offline and it is not cached."""
    if not path:
        return
    expanded = os.path.expanduser(path)
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if os.path.isdir(expanded):
        names = set(os.listdir(expanded))
        if "config.json" not in names:
            raise UserError(f"{key}={path!r} is a folder without config.json; give a Hugging Face model folder "
                            "(config.json, weights, tokenizer files) or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'")
        if not names & set(TOKENIZER_FILES):
            raise UserError(f"{key}={path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        return
    if looks_local or os.path.exists(expanded):
        raise UserError(f"{key}={path!r} does not exist or is not a folder; give a Hugging Face model folder "
                        "or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") and not _in_hub_cache(path):
        raise UserError(f"{key}={path!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE) with "
                        "no cached copy of it; give a local model folder or download it first")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_resume(resume: str) -> None:
    if resume in ("auto", "none"):
        return
    if not os.path.isdir(resume):
        raise UserError(f"trainer.resume={resume!r} does not exist; valid: auto, none, or a checkpoint folder "
                        "such as runs/NAME/checkpoints/step_000050")
    if not is_complete(resume):
        raise UserError(f"trainer.resume={resume!r} is not a complete checkpoint (no COMPLETE marker or "
                        "state.json); valid: auto, none, or a folder such as runs/NAME/checkpoints/step_000050")


def check_output_dir(output_dir: str, run_name: str) -> None:
    """The run folder must be creatable (or exist as a writable folder), without creating it."""
    if not run_name or run_name in (".", "..") or os.sep in run_name:
        raise UserError(f"trainer.run_name={run_name!r} must be a plain folder name (no '{os.sep}')")
    run_dir = os.path.abspath(os.path.join(output_dir, run_name))
    probe = run_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"trainer.output_dir={output_dir!r}: {probe} is a file, not a folder; the run folder "
                        f"{run_dir} cannot be made there")
    why = _unwritable(probe)
    if why:
        raise UserError(f"trainer.output_dir={output_dir!r}: {probe} is {why}, so the run folder {run_dir} cannot "
                        "be written; choose a writable folder")


def _unwritable(folder: str) -> str | None:
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "on a read-only file system"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable by this user"
    return None
