"""Convert public math and code sets into the project's row schema (verl / Eurus-2-RL).

Every converted row is

    {"data_source": str, "prompt": [{"role": "user", "content": str}], "ability": "math" | "code",
     "reward_model": {"ground_truth": str, "style": "rule"}, "extra_info": {...}}

Formats (`FORMATS`; `--format NAME`, or inferred from a hub name in `HUB_FORMATS`):

| format        | source layout (fields read)                                                      |
| ------------- | -------------------------------------------------------------------------------- |
| eurus2        | PRIME-RL/Eurus-2-RL-Data: already this schema (math and code rows); validated     |
| math500       | HuggingFaceH4/MATH-500: problem, answer (+ subject, level, unique_id kept)        |
| aime          | Maxwell-Jia/AIME_2024 (ID, Problem, Answer) or AI-MO/aimo-validation-aime          |
|               | (id, problem, answer, url)                                                        |
| amc           | AI-MO/aimo-validation-amc: problem, answer (a float such as 142.0 -> "142")      |
| minerva       | math-ai/minervamath (question, answer) or a problem/answer layout                 |
| olympiadbench | Hothan/OlympiadBench (config OE_TO_maths_en_COMP): question, final_answer (list), |
|               | context; rows with an image are rejected                                          |
| apps, taco    | codeparrot/apps, BAAI/TACO: question, input_output (JSON string with inputs,      |
|               | outputs and, for call-based problems, fn_name), starter_code                     |
| livecodebench | livecodebench/code_generation_lite: question_content, starter_code,               |
|               | public_test_cases, private_test_cases, metadata (func_name), contest_date         |

Prompts. A math row's user message is the problem followed by `MATH_INSTRUCTION`, exactly:
"\\n\\nSolve the problem and give the final answer in the form \\boxed{answer}." (the verifier
reads the last \\boxed{}). A code row's message is the statement, the starter code when there is one
(`STARTER_INSTRUCTION`), and `CODE_INSTRUCTION`, asking for one ```python block (the code verifier
runs the last one).

Code ground truths are JSON strings of the APPS/TACO test spec the code verifier reads:
{"inputs": [...], "outputs": [...]} plus "fn_name" for call-based problems, whose inputs are
argument lists.

Rejected rows (no answer, no usable tests, an image, outside a date window, ...) are dropped,
counted per reason in `Conversion.rejected`, and logged.

LiveCodeBench keeps its hidden tests in `private_test_cases` as base64 of zlib-compressed pickled
JSON text. They are unpickled with an unpickler that refuses every class and function (a pickle can
otherwise run code), so only plain strings, numbers, lists and dicts load.

Reading: local .parquet/.jsonl/.json files or folders (`prime.data.dataset.read_rows`), or a hub
name through `datasets.load_dataset` (with `config` for sets such as OlympiadBench).

Command line:

    python -m prime.data.convert HuggingFaceH4/MATH-500 data/math500.parquet --split test
    python -m prime.data.convert ./aime.jsonl data/aime.parquet --format aime
    prime convert-data SOURCE OUT [--format F] ...          (the same, from the prime command)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import pickle
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prime.data.dataset import RowError, read_rows, validate_row

logger = logging.getLogger("prime.data")

MATH_INSTRUCTION = "\n\nSolve the problem and give the final answer in the form \\boxed{answer}."
CODE_INSTRUCTION = "\n\nWrite a Python 3 solution and put the complete code in one ```python code block at the end."
STDIN_INSTRUCTION = "\n\nThe program reads its input from standard input and prints the answer to standard output."
STARTER_INSTRUCTION = "\n\nStart from this code and keep its signature:\n```python\n{starter}\n```"


class RejectRow(ValueError):
    """A source row that cannot become an evaluable row; `reason` is the short, countable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Conversion:
    """Converted rows and the count of rejected source rows per reason."""

    rows: list[dict]
    rejected: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Source rows seen."""
        return len(self.rows) + sum(self.rejected.values())


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _field(row: Mapping, *names: str) -> Any:
    """The first of `names` present in `row` with a non-empty value, else None."""
    for name in names:
        value = row.get(name)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return None


def answer_text(value: Any) -> str:
    """A ground-truth answer as text: 142.0 -> "142", 0.25 -> "0.25", " 7 " -> "7"."""
    if isinstance(value, bool):
        raise RejectRow("malformed answer", f"a boolean answer {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if not text:
        raise RejectRow("missing answer")
    return text


def math_row(problem: Any, answer: Any, data_source: str, extra: dict) -> dict:
    """A math row: the problem plus `MATH_INSTRUCTION`, the answer as ground truth."""
    if not isinstance(problem, str) or not problem.strip():
        raise RejectRow("missing problem")
    if answer is None:
        raise RejectRow("missing answer")
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem.strip() + MATH_INSTRUCTION}],
        "ability": "math",
        "reward_model": {"ground_truth": answer_text(answer), "style": "rule"},
        "extra_info": extra,
    }


def code_prompt(statement: str, starter_code: str | None, call_based: bool) -> str:
    """Statement + starter code (if any) + how to answer."""
    text = statement.strip()
    if starter_code and starter_code.strip():
        text += STARTER_INSTRUCTION.format(starter=starter_code.rstrip())
    if not call_based:
        text += STDIN_INSTRUCTION
    return text + CODE_INSTRUCTION


def check_tests(tests: Mapping) -> dict:
    """Validate an APPS/TACO test spec and return it as {"inputs", "outputs"[, "fn_name"]}."""
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
        raise RejectRow("no tests", f"inputs/outputs are {type(inputs).__name__}/{type(outputs).__name__}")
    if len(inputs) != len(outputs):
        raise RejectRow("malformed tests", f"{len(inputs)} inputs but {len(outputs)} outputs")
    spec = {"inputs": inputs, "outputs": outputs}
    fn_name = tests.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str):
            raise RejectRow("malformed tests", f"fn_name {fn_name!r} is not a string")
        spec["fn_name"] = fn_name
    return spec


def code_row(statement: Any, tests: dict, starter_code: str | None, data_source: str, extra: dict) -> dict:
    """A code row with a validated test spec stored as a JSON string."""
    if not isinstance(statement, str) or not statement.strip():
        raise RejectRow("missing problem")
    spec = check_tests(tests)
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": code_prompt(statement, starter_code, "fn_name" in spec)}],
        "ability": "code",
        "reward_model": {"ground_truth": json.dumps(spec), "style": "rule"},
        "extra_info": extra,
    }


def _json(value: Any, reason: str) -> Any:
    """Parse a JSON string (values already parsed pass through)."""
    if not isinstance(value, (str, bytes)):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise RejectRow(reason, f"invalid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Math formats


def _extra(row: Mapping, index: int, *keys: str) -> dict:
    extra = {"index": index}
    for key in keys:
        if row.get(key) is not None:
            extra[key.lower()] = row[key]
    return extra


def convert_math500(row: Mapping, index: int, options: Mapping) -> dict:
    """HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id."""
    return math_row(_field(row, "problem"), _field(row, "answer"), "math_500",
                    _extra(row, index, "unique_id", "subject", "level"))


def convert_aime(row: Mapping, index: int, options: Mapping) -> dict:
    """AIME: Problem/Answer (Maxwell-Jia/AIME_2024) or problem/answer (AI-MO/aimo-validation-aime)."""
    return math_row(_field(row, "problem", "Problem", "question"), _field(row, "answer", "Answer"),
                    "aime", _extra(row, index, "id", "ID", "url"))


def convert_amc(row: Mapping, index: int, options: Mapping) -> dict:
    """AI-MO/aimo-validation-amc: problem, answer (stored as a float), url."""
    return math_row(_field(row, "problem", "question"), _field(row, "answer"), "amc",
                    _extra(row, index, "id", "url"))


def convert_minerva(row: Mapping, index: int, options: Mapping) -> dict:
    """Minerva Math: question/answer (math-ai/minervamath) or problem/answer."""
    return math_row(_field(row, "question", "problem"), _field(row, "answer", "final_answer"),
                    "minerva_math", _extra(row, index, "idx", "id", "type"))


def convert_olympiadbench(row: Mapping, index: int, options: Mapping) -> dict:
    """OlympiadBench: question (+ context), final_answer (a list); text-only rows.

    A list with several entries is one multi-part answer; its parts are joined with ", ", the
    form the math verifier compares as a tuple.
    """
    if any(row.get(f"image_{i}") for i in range(1, 10)):
        raise RejectRow("needs an image")
    answers = row.get("final_answer")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not [a for a in answers if str(a).strip()]:
        raise RejectRow("missing answer")
    question = _field(row, "question", "problem")
    context = _field(row, "context")
    if isinstance(question, str) and isinstance(context, str):
        question = context.strip() + "\n\n" + question.strip()
    answer = ", ".join(str(a).strip() for a in answers if str(a).strip())
    return math_row(question, answer, "olympiad_bench", _extra(row, index, "id", "subfield", "unit"))


# ---------------------------------------------------------------------------------------------
# Code formats


def _apps_like(row: Mapping, index: int, data_source: str) -> dict:
    raw = row.get("input_output")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RejectRow("no tests", "input_output is empty")
    tests = _json(raw, "malformed tests")
    if not isinstance(tests, Mapping):
        raise RejectRow("malformed tests", f"input_output is a {type(tests).__name__}, not a mapping")
    extra = _extra(row, index, "problem_id", "difficulty", "url", "source")
    return code_row(_field(row, "question"), dict(tests), _field(row, "starter_code"), data_source, extra)


def convert_apps(row: Mapping, index: int, options: Mapping) -> dict:
    """codeparrot/apps: question, input_output (JSON: inputs, outputs, fn_name), starter_code."""
    return _apps_like(row, index, "apps")


def convert_taco(row: Mapping, index: int, options: Mapping) -> dict:
    """BAAI/TACO: the APPS layout (question, input_output, starter_code)."""
    return _apps_like(row, index, "taco")


class _PlainUnpickler(pickle.Unpickler):
    """Loads only built-in values (str, bytes, numbers, lists, dicts): every global is refused."""

    def find_class(self, module: str, name: str):
        raise RejectRow("malformed tests", f"the pickled tests reference {module}.{name}; only plain values are read")


def decode_lcb_tests(value: Any) -> list:
    """LiveCodeBench test cases: a JSON list, or base64(zlib(pickle(JSON text))) as stored for
    private tests."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    if value.lstrip().startswith("["):
        return _json(value, "malformed tests")
    try:
        raw = zlib.decompress(base64.b64decode(value))
        text = _PlainUnpickler(io.BytesIO(raw)).load()
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as e:
        raise RejectRow("malformed tests", f"undecodable private tests ({e})") from None
    return _json(text, "malformed tests")


def _lcb_spec(cases: list, fn_name: str | None) -> dict:
    """Test spec from LiveCodeBench cases ({input, output, testtype}).

    Functional cases hold one JSON value per line of `input` (the arguments) and a JSON `output`.
    """
    functional = [c.get("testtype") == "functional" for c in cases]
    if any(functional) and not all(functional):
        raise RejectRow("malformed tests", "stdin and functional test cases are mixed")
    if not all(functional):
        return {"inputs": [c["input"] for c in cases], "outputs": [c["output"] for c in cases]}
    if not fn_name:
        raise RejectRow("malformed tests", "functional tests without metadata.func_name")
    inputs = [[_json(line, "malformed tests") for line in c["input"].split("\n") if line.strip()] for c in cases]
    outputs = [_json(c["output"], "malformed tests") for c in cases]
    return {"inputs": inputs, "outputs": outputs, "fn_name": fn_name}


def convert_livecodebench(row: Mapping, index: int, options: Mapping) -> dict:
    """livecodebench/code_generation_lite rows; options start_date/end_date ("YYYY-MM-DD") keep a
    window of contest dates (inclusive)."""
    date = str(row.get("contest_date") or "")[:10]
    start, end = options.get("start_date"), options.get("end_date")
    if (start and date < start) or (end and date > end):
        raise RejectRow("outside date window", f"contest_date {date!r} not in [{start}, {end}]")
    cases = decode_lcb_tests(row.get("public_test_cases")) + decode_lcb_tests(row.get("private_test_cases"))
    if not cases or not all(isinstance(c, Mapping) and "input" in c and "output" in c for c in cases):
        raise RejectRow("no tests")
    metadata = _json(row.get("metadata") or "{}", "malformed metadata")
    fn_name = metadata.get("func_name") if isinstance(metadata, Mapping) else None
    extra = _extra(row, index, "question_id", "platform", "difficulty", "contest_date")
    return code_row(_field(row, "question_content"), _lcb_spec(cases, fn_name), _field(row, "starter_code"),
                    "livecodebench", extra)


# ---------------------------------------------------------------------------------------------
# Eurus-2-RL-Data (already in the schema)


def convert_eurus2(row: Mapping, index: int, options: Mapping) -> dict:
    """PRIME-RL/Eurus-2-RL-Data rows, kept as they are after validation (code tests parsed)."""
    try:
        _, ground_truth, ability, _ = validate_row(row, index)
    except RowError as e:
        raise RejectRow("malformed row", str(e)) from None
    if ability == "code":
        tests = _json(ground_truth, "malformed tests")
        if not isinstance(tests, Mapping):
            raise RejectRow("no tests", f"ground truth is a {type(tests).__name__}")
        check_tests(tests)
    elif ability == "math":
        answer_text(ground_truth)
    return dict(row)


# ---------------------------------------------------------------------------------------------
# Registry and driver


Converter = Callable[[Mapping, int, Mapping], dict]
FORMATS: dict[str, Converter] = {
    "eurus2": convert_eurus2,
    "math500": convert_math500,
    "aime": convert_aime,
    "amc": convert_amc,
    "minerva": convert_minerva,
    "olympiadbench": convert_olympiadbench,
    "apps": convert_apps,
    "taco": convert_taco,
    "livecodebench": convert_livecodebench,
}
HUB_FORMATS = {
    "PRIME-RL/Eurus-2-RL-Data": "eurus2",
    "HuggingFaceH4/MATH-500": "math500",
    "Maxwell-Jia/AIME_2024": "aime",
    "AI-MO/aimo-validation-aime": "aime",
    "AI-MO/aimo-validation-amc": "amc",
    "math-ai/minervamath": "minerva",
    "knoveleng/Minerva-Math": "minerva",
    "Hothan/OlympiadBench": "olympiadbench",
    "math-ai/olympiadbench": "olympiadbench",
    "codeparrot/apps": "apps",
    "BAAI/TACO": "taco",
    "livecodebench/code_generation_lite": "livecodebench",
}


def resolve_format(source: str, fmt: str | None) -> str:
    """The format name: `fmt` when given, else the known format of a hub name."""
    if fmt is None:
        fmt = HUB_FORMATS.get(str(source))
        if fmt is None:
            raise ValueError(f"cannot tell the format of {source!r}; pass one of {sorted(FORMATS)} "
                             f"(known hub names: {sorted(HUB_FORMATS)})")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {sorted(FORMATS)}")
    return fmt


def convert_rows(rows: Sequence[Mapping], fmt: str, limit: int | None = None, **options) -> Conversion:
    """Convert source rows with format `fmt`; rejected rows are counted per reason and logged.

    `limit` stops after that many converted rows. Options go to the format's converter
    (livecodebench: start_date, end_date).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {sorted(FORMATS)}")
    convert = FORMATS[fmt]
    result = Conversion(rows=[])
    for index, row in enumerate(rows):
        if limit is not None and len(result.rows) >= limit:
            break
        try:
            if not isinstance(row, Mapping):
                raise RejectRow("malformed row", f"a {type(row).__name__}, not a mapping")
            result.rows.append(convert(row, index, options))
        except RejectRow as e:
            result.rejected[e.reason] += 1
            logger.debug("row %d rejected: %s", index, e)
    if result.rejected:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.rejected.items()))
        logger.warning("%s: converted %d of %d rows; rejected %s", fmt, len(result.rows), result.total, reasons)
    return result


def load_source_rows(source: str, split: str = "train", config: str | None = None,
                     data_files: str | list[str] | None = None) -> list[dict]:
    """Rows of a local file/folder, or of a hub dataset (with an optional config or data files)."""
    if Path(source).exists() or (config is None and data_files is None):
        return read_rows(source, split=split)
    import datasets

    return datasets.load_dataset(source, config, split=split, data_files=data_files).to_list()


def convert_source(source: str, out: str | None = None, fmt: str | None = None, *, split: str = "train",
                   config: str | None = None, data_files: str | list[str] | None = None,
                   limit: int | None = None, **options) -> Conversion:
    """Read `source`, convert it, and write the rows to `out` (.parquet or .jsonl) when given."""
    fmt = resolve_format(source, fmt)
    result = convert_rows(load_source_rows(source, split, config, data_files), fmt, limit=limit, **options)
    if not result.rows:
        raise ValueError(f"no row of {source!r} could be converted as {fmt!r} "
                         f"(rejected: {dict(result.rejected)})")
    if out is not None:
        from prime.data.synthetic import write_rows

        write_rows(result.rows, out)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line arguments (shared by `prime convert-data`)."""
    parser.add_argument("source", help="local .parquet/.jsonl/.json file or folder, or a hub name")
    parser.add_argument("out", help="output .parquet or .jsonl")
    parser.add_argument("--format", dest="fmt", choices=sorted(FORMATS), default=None,
                        help="source layout; inferred from known hub names")
    parser.add_argument("--split", default="train", help="split of a hub dataset or saved DatasetDict")
    parser.add_argument("--config", default=None, help="hub dataset config (e.g. OE_TO_maths_en_COMP)")
    parser.add_argument("--limit", type=int, default=None, help="keep at most this many converted rows")
    parser.add_argument("--start-date", default=None, help="livecodebench: first contest date, YYYY-MM-DD")
    parser.add_argument("--end-date", default=None, help="livecodebench: last contest date, YYYY-MM-DD")


def run_from_args(args: argparse.Namespace) -> Conversion:
    """Convert as the parsed arguments say and print a one-line summary."""
    options = {k: v for k, v in (("start_date", args.start_date), ("end_date", args.end_date)) if v}
    result = convert_source(args.source, args.out, args.fmt, split=args.split, config=args.config,
                            limit=args.limit, **options)
    rejected = ", ".join(f"{r}: {c}" for r, c in sorted(result.rejected.items())) or "none"
    print(f"wrote {len(result.rows)} rows to {args.out} ({result.total} read; rejected: {rejected})")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prime.data.convert",
                                     description="Convert a public math/code set into the verl row schema.")
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
