"""Prompt datasets in the verl / Eurus-2-RL schema.

One row of an RL prompt dataset looks like::

    {
        "prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
        "reward_model": {"ground_truth": "12", "style": "rule"},
        "ability": "math",                 # math | code | ...
        "data_source": "numina_olympiads",
        "extra_info": {...},               # optional, kept in `raw`
    }

`prompt` may also be a plain string (one user message). For code tasks `ground_truth` is usually
a JSON string of test cases ({"inputs": [...], "outputs": [...]}); it is kept exactly as stored and
handed to the grader unchanged.

Sources (`read_rows`): parquet / jsonl / json files, a directory of such files, a folder written
by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`, pick one with `split`), or a
Hugging Face hub id loaded with `datasets.load_dataset` (the usual path on a cluster). Several
sources can be given as a list; their rows are concatenated in order.

`load_prompt_dataset` reads the rows, renders each prompt with the tokenizer's chat template,
tokenizes it, drops prompts longer than `max_prompt_len` tokens and returns a `PromptDataset`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prime.config import UserError

logger = logging.getLogger("prime.data")

PathLike = str | os.PathLike
Source = PathLike | Sequence[PathLike]

FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
REQUIRED_FIELDS = ("prompt", "reward_model.ground_truth", "ability", "data_source")
VALID_ROLES = ("system", "user", "assistant")
# Rows are tokenized in chunks so a fast tokenizer can batch the work without holding
# hundreds of thousands of encodings at once.
_ENCODE_CHUNK = 1024


@dataclass(frozen=True)
class PromptItem:
    """One tokenized prompt, ready for generation.

    Attributes:
        index: position of this item in its `PromptDataset` (`dataset[i].index == i`); the id the
            sampler hands out and the driver uses to group the K responses of one prompt.
        prompt_ids: token ids of the rendered prompt (chat template with the generation prompt).
        prompt_text: the rendered prompt text that `prompt_ids` encodes.
        ground_truth: `reward_model.ground_truth` as stored (a JSON string of tests for code).
        ability: task kind used to pick a grader ("math", "code", ...).
        data_source: dataset name the row came from.
        raw: the source row, unchanged (including `extra_info`).
        source_row: position of the row in the concatenated source rows, before any drops.
    """

    index: int
    prompt_ids: list[int]
    prompt_text: str
    ground_truth: Any
    ability: str
    data_source: str
    raw: dict
    source_row: int = -1


@dataclass
class PromptDataset(Sequence[PromptItem]):
    """A list-backed, indexable collection of `PromptItem`s.

    Attributes:
        items: the kept prompts, `items[i].index == i`.
        num_dropped_too_long: prompts dropped because they exceeded `max_prompt_len` tokens.
        num_dropped_invalid: rows dropped for missing or malformed fields (only with strict=False).
        max_prompt_len: the limit that was applied (None: no limit).
    """

    items: list[PromptItem]
    num_dropped_too_long: int = 0
    num_dropped_invalid: int = 0
    max_prompt_len: int | None = None
    _lengths: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for i, item in enumerate(self.items):
            if item.index != i:
                raise ValueError(f"PromptDataset item at position {i} has index {item.index}; "
                                 f"items must be numbered 0..{len(self.items) - 1} in order")
        self._lengths = [len(item.prompt_ids) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        return self.items[i]

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)

    def batch(self, indices: Sequence[int]) -> list[PromptItem]:
        """Items at `indices` (as produced by `PromptSampler.next_batch`), in that order."""
        n = len(self.items)
        for i in indices:
            if not 0 <= i < n:
                raise IndexError(f"prompt index {i} out of range for a dataset of {n} prompts")
        return [self.items[i] for i in indices]

    @property
    def prompt_lengths(self) -> list[int]:
        """Token length of every kept prompt."""
        return list(self._lengths)


class DataError(UserError):
    """A dataset cannot be read or holds a bad row; the message names the file (and row) and what is valid."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset path does not exist (or a folder holds no data files)."""


# ----------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------


def read_rows(source: Source, split: str = "train") -> list[dict]:
    """Read raw rows from one source or a list of sources, concatenated in order.

    Args:
        source: a file (.parquet, .jsonl, .json), a directory of such files (read in sorted
            order, recursively), a `save_to_disk` folder, a hub dataset id, or a list of these.
        split: split to take from a saved `DatasetDict` or a hub dataset.

    Returns:
        Plain Python dicts (nested structs become dicts, lists stay lists).
    """
    if isinstance(source, (str, os.PathLike)):
        sources: list[PathLike] = [source]
    else:
        sources = list(source)
        if not sources:
            raise ValueError("no dataset source given: expected a path, a hub id or a list of them")
    rows: list[dict] = []
    for src in sources:
        for _, part in read_rows_by_file(src, split):
            rows.extend(part)
    return rows


def read_rows_by_file(src: PathLike, split: str = "train") -> list[tuple[str, list[dict]]]:
    """The rows of one source, file by file: `(file, rows)` for each data file of a folder (in
    sorted order), `(path, rows)` for a single file, a `save_to_disk` folder or a hub id; so
    checks can name the file a bad row is in."""
    path = Path(src)
    if path.is_file():
        return [(str(path), _read_file(path))]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return [(str(path), _read_saved_dataset(path, split))]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataNotFoundError(
                f"directory {str(path)!r} holds no {', '.join(FILE_SUFFIXES)} files and is not a "
                "folder written by datasets' save_to_disk")
        return [(str(f), _read_file(f)) for f in files]
    text = os.fspath(src)
    if _looks_like_local_path(text):
        raise DataNotFoundError(f"dataset path {text!r} does not exist")
    return [(text, _read_hub_dataset(text, split))]


def _looks_like_local_path(text: str) -> bool:
    """A hub id is `name` or `org/name`; anything with a file suffix or a path prefix is local."""
    return (text.endswith(FILE_SUFFIXES) or text.startswith(("/", ".", "~"))
            or text.count("/") > 1 or "\\" in text or text == "")


def _read_file(path: Path) -> list[dict]:
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported dataset file {str(path)!r}: expected one of {', '.join(FILE_SUFFIXES)}")
    try:
        if path.suffix == ".parquet":
            return _read_parquet(path)
        if path.suffix == ".jsonl":
            return _read_file_as_jsonl(path)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" dataset files are really JSON lines.
        return _read_file_as_jsonl(path)
    if isinstance(data, list):
        return data
    raise DataError(f"{path}: expected a JSON list of rows or JSON lines, got a {type(data).__name__}")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e


def _read_file_as_jsonl(path: Path) -> list[dict]:
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: invalid JSON line ({e.msg}); each line must hold one row "
                            "as a JSON object") from e
    return rows


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"split {split!r} not in saved dataset {str(path)!r}; "
                             f"available splits: {sorted(ds.keys())}")
        ds = ds[split]
    return ds.to_list()


def _read_hub_dataset(name: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth or unknown-name errors: say what was tried
        raise DataNotFoundError(
            f"{name!r} is not a local path and loading it as a hub dataset "
            f"(datasets.load_dataset({name!r}, split={split!r})) failed: {e}") from e
    return ds.to_list()


# ----------------------------------------------------------------------------------------------
# Validating rows and rendering prompts
# ----------------------------------------------------------------------------------------------


class RowError(DataError):
    """A dataset row is missing a required field or has a malformed one."""


def validate_row(row: Any, row_index: int) -> tuple[list[dict], Any, str, str]:
    """Check one row and return (messages, ground_truth, ability, data_source).

    Raises:
        RowError: naming the row index and the missing or malformed field.
    """
    if not isinstance(row, Mapping):
        raise RowError(f"row {row_index}: expected a mapping with fields {list(REQUIRED_FIELDS)}, "
                       f"got {type(row).__name__}")
    if row.get("prompt") is None:
        raise RowError(f"row {row_index}: missing required field 'prompt' "
                       f"(required: {', '.join(REQUIRED_FIELDS)}; present: {sorted(row)})")
    messages = _as_messages(row["prompt"], row_index)
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or reward_model.get("ground_truth") is None:
        raise RowError(f"row {row_index}: missing required field 'reward_model.ground_truth' "
                       f"(got reward_model={reward_model!r})")
    for name in ("ability", "data_source"):
        value = row.get(name)
        if value is None or value == "":
            raise RowError(f"row {row_index}: missing required field {name!r} "
                           f"(required: {', '.join(REQUIRED_FIELDS)}; present: {sorted(row)})")
        if not isinstance(value, str):
            raise RowError(f"row {row_index}: field {name!r} must be a string, got {value!r}")
    return messages, reward_model["ground_truth"], row["ability"], row["data_source"]


def _as_messages(prompt: Any, row_index: int) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or len(prompt) == 0:
        raise RowError(f"row {row_index}: field 'prompt' must be a string or a non-empty list of "
                       f"{{'role', 'content'}} messages, got {prompt!r}")
    messages = []
    for j, m in enumerate(prompt):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise RowError(f"row {row_index}: prompt[{j}] must be a mapping with 'role' and "
                           f"'content', got {m!r}")
        if m["role"] not in VALID_ROLES:
            raise RowError(f"row {row_index}: prompt[{j}].role is {m['role']!r}; "
                           f"valid roles: {', '.join(VALID_ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f"row {row_index}: prompt[{j}].content must be a string, got {m['content']!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def build_messages(messages: list[dict], system_prompt: str | None = None,
                   instruction_suffix: str | None = None) -> list[dict]:
    """Apply the configured system prompt and instruction suffix to a row's messages.

    The system prompt is added only when the row has no system message of its own (datasets
    such as Eurus-2-RL carry one and it is kept). The suffix is appended to the last user message.
    Returns new message dicts; the input is not modified.
    """
    out = [dict(m) for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    if instruction_suffix:
        user_positions = [i for i, m in enumerate(out) if m["role"] == "user"]
        if not user_positions:
            raise ValueError(f"instruction_suffix is set but the prompt has no user message: {messages!r}")
        last = user_positions[-1]
        out[last]["content"] = out[last]["content"] + instruction_suffix
    return out


def render_prompt(tokenizer: Any, messages: list[dict], use_chat_template: bool = True) -> str:
    """Render messages into the prompt text the policy sees.

    With the chat template the text ends with the assistant generation prompt. Without it
    (base models) the message contents are joined with blank lines.
    """
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; set use_chat_template=False to "
                             "join the message contents as plain text, or use a tokenizer with one")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def encode_prompts(tokenizer: Any, texts: list[str], use_chat_template: bool = True) -> list[list[int]]:
    """Tokenize rendered prompt texts.

    Chat templates already write any BOS token they need (Llama-style templates start with
    `{{ bos_token }}`), so templated text is encoded with add_special_tokens=False; encoding it
    with the tokenizer's defaults would put a second BOS in front. Plain text (no template) gets
    the tokenizer's usual special tokens.
    """
    add_special = not use_chat_template
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start:start + _ENCODE_CHUNK]
        ids.extend(list(x) for x in tokenizer(chunk, add_special_tokens=add_special)["input_ids"])
    return ids


# ----------------------------------------------------------------------------------------------
# Building a PromptDataset
# ----------------------------------------------------------------------------------------------


def build_prompt_dataset(
    rows: Sequence[Any],
    tokenizer: Any,
    *,
    max_prompt_len: int | None = None,
    system_prompt: str | None = None,
    instruction_suffix: str | None = None,
    use_chat_template: bool = True,
    strict: bool = True,
) -> PromptDataset:
    """Validate, render and tokenize rows into a `PromptDataset`.

    Args:
        rows: raw rows in the verl schema (see the module docstring).
        tokenizer: a Hugging Face tokenizer (fast or slow) with a chat template.
        max_prompt_len: prompts with more tokens than this are dropped (counted in
            `num_dropped_too_long` and logged). None keeps all.
        system_prompt: system message added to rows that have none.
        instruction_suffix: text appended to the last user message of every row.
        use_chat_template: render with the tokenizer's chat template (True) or join contents.
        strict: raise `RowError` on the first bad row (True), or drop bad rows and count them in
            `num_dropped_invalid` (False).
    """
    if max_prompt_len is not None and max_prompt_len <= 0:
        raise ValueError(f"max_prompt_len must be a positive integer or None, got {max_prompt_len!r}")
    parsed = []  # (source_row, row, messages, ground_truth, ability, data_source)
    num_invalid = 0
    for r, row in enumerate(rows):
        try:
            messages, gt, ability, source = validate_row(row, r)
        except RowError as e:
            if strict:
                raise
            num_invalid += 1
            logger.debug("dropping invalid row: %s", e)
            continue
        messages = build_messages(messages, system_prompt, instruction_suffix)
        parsed.append((r, row, messages, gt, ability, source))
    if num_invalid:
        logger.warning("dropped %d of %d rows with missing or malformed fields", num_invalid, len(rows))

    texts = [render_prompt(tokenizer, p[2], use_chat_template) for p in parsed]
    all_ids = encode_prompts(tokenizer, texts, use_chat_template)

    items: list[PromptItem] = []
    num_too_long = 0
    for (r, row, _, gt, ability, source), text, ids in zip(parsed, texts, all_ids):
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            num_too_long += 1
            continue
        items.append(PromptItem(index=len(items), prompt_ids=ids, prompt_text=text, ground_truth=gt,
                                ability=ability, data_source=source, raw=dict(row), source_row=r))
    if num_too_long:
        logger.warning("dropped %d of %d prompts longer than max_prompt_len=%d tokens",
                       num_too_long, len(parsed), max_prompt_len)
    logger.info("prompt dataset: %d prompts kept (%d too long, %d invalid)",
                len(items), num_too_long, num_invalid)
    return PromptDataset(items=items, num_dropped_too_long=num_too_long,
                         num_dropped_invalid=num_invalid, max_prompt_len=max_prompt_len)


def load_prompt_dataset(
    source: Source,
    tokenizer: Any,
    *,
    max_prompt_len: int | None = None,
    system_prompt: str | None = None,
    instruction_suffix: str | None = None,
    use_chat_template: bool = True,
    strict: bool = True,
    split: str = "train",
) -> PromptDataset:
    """Read rows from `source` (see `read_rows`) and build a `PromptDataset` from them.

    Example:
        >>> ds = load_prompt_dataset("data/train.parquet", tok, max_prompt_len=1024)
        >>> ds[0].prompt_ids, ds[0].ground_truth, ds.num_dropped_too_long
    """
    rows = read_rows(source, split=split)
    if not rows:
        raise DataError(f"dataset source {source!r} holds no rows")
    return build_prompt_dataset(rows, tokenizer, max_prompt_len=max_prompt_len,
                                system_prompt=system_prompt, instruction_suffix=instruction_suffix,
                                use_chat_template=use_chat_template, strict=strict)
