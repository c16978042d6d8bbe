"""Evaluate a policy on problem sets: sample, grade, optionally rerank with an implicit PRM.

The pieces are plain functions and dataclasses, so that any caller can supply its own engine and
grader: the `prime eval` command passes an in-process `HFEngine` or `VLLMEngine` and a
`VerifierPool`; a training driver can pass its rollout engines and verifier actors behind the same
two signatures:

- engine: anything with `RolloutEngine.generate(prompt_ids, n, max_new_tokens, temperature, top_p,
  seed, logprobs) -> list[list[Completion]]` (`prime.rollout.base`; called with `logprobs=False`);
- grade: `grade(items) -> scores`, one float in [0, 1] per item, where an item is a dict
  `{"ability", "data_source", "response", "ground_truth"}` (what `VerifierPool.score` takes; the
  pool's `[0]` element is the score list).

`evaluate(problems, engine, grade, settings, prm=None)` runs:

1. generation: n samples per problem at `settings.temperature` (default 0.6), plus one greedy
   sample for greedy pass@1 (reused from the samples when the temperature is 0);
2. grading of every sample through `grade`;
3. math answers: the final answer of every sample (`prime.verifiers.math.extract_answer`) and,
   per problem, the verifier's verdict on every pair of distinct answers (graded through `grade`
   as well, so a hanging comparison is bounded by the pool's time limit); these decide the answer
   classes of maj@k and of the PRM-weighted vote;
4. with a PRM (`prime.eval.prm.ImplicitPRMScorer` or anything with its `score`), the `sum` and
   `min` scores of every sample;
5. per-problem outcomes and per-dataset metrics (definitions in `prime.eval.metrics`).

Datasets. Every problem carries a dataset name; metrics are reported per name. `load_problems`
names the problems of one file after the file, or after each row's `data_source` when a file mixes
several sources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prime.config import EvalConfig
from prime.data.dataset import build_prompt_dataset, read_rows
from prime.eval import metrics as M
from prime.rollout.base import Completion
from prime.verifiers.math import extract_answer, normalize_answer
from prime.verifiers.registry import resolve_kind

logger = logging.getLogger(__name__)

Grade = Callable[[list[dict]], Sequence[float]]


@dataclass
class EvalProblem:
    """One problem to evaluate.

    Attributes:
        dataset: the name its metrics are reported under.
        index: position within its dataset.
        prompt_ids: the rendered, tokenized prompt.
        prompt_text: the rendered prompt.
        ground_truth: as stored (an answer for math, a JSON test spec for code).
        kind: "math" or "code" (picks the grader and which metrics exist).
        data_source: the row's data_source.
    """

    dataset: str
    index: int
    prompt_ids: list[int]
    prompt_text: str
    ground_truth: Any
    kind: str
    data_source: str


@dataclass
class EvalSettings:
    """Sampling and metric settings of one evaluation.

    Defaults are those of the config's `eval` section (`prime.config.EvalConfig`), except the
    response budget, which a training run takes from its rollout settings.

    Attributes:
        n: samples per problem (pass@k, maj@k and the PRM metrics use them).
        ks: the k of pass@k and maj@k; each must be <= n.
        temperature: sampling temperature of the n samples (0: greedy, all n identical).
        top_p: nucleus of the n samples.
        max_new_tokens: response budget.
        greedy: also decode one greedy response per problem for greedy pass@1.
        seed: sampling seed (a run is reproducible for a given engine and batch size).
        batch_size: prompts per `engine.generate` call.
    """

    n: int = EvalConfig.n
    ks: tuple[int, ...] = field(default_factory=lambda: tuple(EvalConfig().ks))
    temperature: float = EvalConfig.temperature
    top_p: float = EvalConfig.top_p
    max_new_tokens: int = 1024
    greedy: bool = EvalConfig.greedy
    seed: int = 0
    batch_size: int = EvalConfig.batch_size

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        bad = [k for k in self.ks if not 1 <= k <= self.n]
        if not self.ks or bad:
            raise ValueError(f"every k must be in [1, n={self.n}], got ks={list(self.ks)}; raise n or drop {bad}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SampleRecord:
    """One graded response (and its PRM scores when a PRM was given)."""

    text: str
    score: float
    correct: bool
    answer: str | None
    finish_reason: str
    num_tokens: int
    answer_class: int | None = None
    prm_sum: float | None = None
    prm_min: float | None = None
    prm_steps: list[float] | None = None


@dataclass
class ProblemRecord:
    """Everything evaluated for one problem, with its per-problem outcomes (`outcome`)."""

    dataset: str
    index: int
    data_source: str
    kind: str
    prompt: str
    ground_truth: Any
    greedy: SampleRecord | None
    samples: list[SampleRecord]
    outcome: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Per-dataset metrics (dataset -> metric -> value; None where a metric does not apply) and records."""

    metrics: dict[str, dict[str, float | None]]
    records: list[ProblemRecord]


# ---------------------------------------------------------------------------------------------
# Problems


def dataset_name_of(source: str) -> str:
    """A short dataset name for a file, folder or hub id: the file stem, or the id's last part."""
    path = Path(str(source).rstrip("/"))
    return path.stem if path.suffix in (".parquet", ".jsonl", ".json") else path.name


def problems_from_rows(rows: Sequence[dict], tokenizer, name: str, *, limit: int | None = None,
                       system_prompt: str | None = None, use_chat_template: bool = True) -> list[EvalProblem]:
    """Render and tokenize rows (verl schema) into problems named `name`, or per data_source.

    When the rows come from more than one data_source, each source is its own dataset. `limit`
    keeps the first `limit` problems of every dataset. An invalid row raises (`RowError`).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    ds = build_prompt_dataset(rows, tokenizer, system_prompt=system_prompt, use_chat_template=use_chat_template)
    mixed = len({item.data_source for item in ds}) > 1
    counts: dict[str, int] = {}
    problems = []
    for item in ds:
        dataset = item.data_source if mixed else name
        index = counts.get(dataset, 0)
        if limit is not None and index >= limit:
            continue
        counts[dataset] = index + 1
        kind = resolve_kind({"ability": item.ability, "data_source": item.data_source})
        problems.append(EvalProblem(dataset=dataset, index=index, prompt_ids=item.prompt_ids,
                                    prompt_text=item.prompt_text, ground_truth=item.ground_truth,
                                    kind=kind, data_source=item.data_source))
    return problems


def load_problems(source: str, tokenizer, name: str | None = None, *, split: str = "train",
                  limit: int | None = None, system_prompt: str | None = None,
                  use_chat_template: bool = True) -> list[EvalProblem]:
    """Read a file, folder or hub id (`prime.data.dataset.read_rows`) and build its problems."""
    rows = read_rows(source, split=split)
    if not rows:
        raise ValueError(f"dataset {source!r} holds no rows")
    return problems_from_rows(rows, tokenizer, name or dataset_name_of(source), limit=limit,
                              system_prompt=system_prompt, use_chat_template=use_chat_template)


# ---------------------------------------------------------------------------------------------
# Generation and grading


def generate(engine, problems: Sequence[EvalProblem], n: int, temperature: float, settings: EvalSettings
             ) -> list[list[Completion]]:
    """`n` completions per problem, in `settings.batch_size` prompts per engine call."""
    out: list[list[Completion]] = []
    for start in range(0, len(problems), settings.batch_size):
        chunk = problems[start:start + settings.batch_size]
        out.extend(engine.generate(
            [p.prompt_ids for p in chunk], n=n, max_new_tokens=settings.max_new_tokens,
            temperature=temperature, top_p=1.0 if temperature == 0 else settings.top_p,
            seed=settings.seed + start * n, logprobs=False,  # grading reads the text only
        ))
    return out


def grade_completions(problems: Sequence[EvalProblem], groups: Sequence[Sequence[Completion]], grade: Grade
                      ) -> list[list[float]]:
    """Scores of every completion of every problem, in one `grade` call."""
    items = [
        {"ability": p.kind, "data_source": p.data_source, "response": c.text, "ground_truth": p.ground_truth}
        for p, group in zip(problems, groups) for c in group
    ]
    flat = list(grade(items)) if items else []
    if len(flat) != len(items):
        raise ValueError(f"grade returned {len(flat)} scores for {len(items)} items")
    out, pos = [], 0
    for group in groups:
        out.append([float(s) for s in flat[pos:pos + len(group)]])
        pos += len(group)
    return out


def _boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def answer_equality(answer_lists: Sequence[Sequence[str | None]], grade: Grade) -> list[M.SameAnswer]:
    """One `same(a, b)` per problem, deciding every pair of its distinct answers with the math grader.

    `same(a, b)` is the verifier's verdict on response `\\boxed{b}` against ground truth `a` (the
    earlier answer plays the ground truth, as the class representative does in `answer_classes`).
    Answers equal after `normalize_answer` are the same without a grader call. All pairs of all
    problems go to `grade` at once.
    """
    items, keys = [], []
    for p, answers in enumerate(answer_lists):
        distinct = list(dict.fromkeys(normalize_answer(a) for a in answers if a is not None))
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                items.append({"ability": "math", "response": _boxed(b), "ground_truth": a})
                keys.append((p, a, b))
    scores = list(grade(items)) if items else []
    verdicts: list[dict[tuple[str, str], bool]] = [{} for _ in answer_lists]
    for (p, a, b), s in zip(keys, scores):
        verdicts[p][(a, b)] = M.is_correct(float(s))

    def make_same(table: dict[tuple[str, str], bool]) -> M.SameAnswer:
        def same(a: str, b: str) -> bool:
            a, b = normalize_answer(a), normalize_answer(b)
            return a == b or table.get((a, b), False)
        return same

    return [make_same(t) for t in verdicts]


# ---------------------------------------------------------------------------------------------
# Records and outcomes


def _sample_record(c: Completion, score: float, kind: str) -> SampleRecord:
    return SampleRecord(text=c.text, score=score, correct=M.is_correct(score),
                        answer=extract_answer(c.text) if kind == "math" else None,
                        finish_reason=c.finish_reason, num_tokens=len(c.token_ids))


def _attach_prm(records: Sequence[ProblemRecord], groups: Sequence[Sequence[Completion]], prm) -> None:
    """Score every sample with the PRM (one call over all samples) and store the scores."""
    prompts = [c.prompt_ids for group in groups for c in group]
    responses = [c.token_ids for group in groups for c in group]
    scores = iter(prm.score(prompts, responses))
    for record in records:
        for sample in record.samples:
            s = next(scores)
            sample.prm_sum, sample.prm_min, sample.prm_steps = s.sum, s.min, s.steps


def problem_outcome(record: ProblemRecord, ks: Sequence[int], same: M.SameAnswer | None, has_prm: bool
                    ) -> dict[str, Any]:
    """Per-problem results that the dataset metrics average (see `prime.eval.metrics`).

    Keys: `n`, `correct` (count), `greedy_correct`, `maj@k` (math), and with a PRM
    `prm_best_of_n_sum`, `prm_best_of_n_min`, `prm_weighted_vote` (math), `prm_rank_wins`,
    `prm_rank_pairs`.
    """
    correct = [s.correct for s in record.samples]
    out: dict[str, Any] = {"n": len(correct), "correct": sum(correct),
                           "greedy_correct": None if record.greedy is None else record.greedy.correct}
    answers = [s.answer for s in record.samples]
    if record.kind == "math":
        for sample, label in zip(record.samples, M.answer_classes(answers, same)):
            sample.answer_class = label
        for k in ks:
            out[f"maj@{k}"] = M.majority_solved(answers, correct, same, k)
    if has_prm:
        sums = [s.prm_sum for s in record.samples]
        out["prm_best_of_n_sum"] = M.best_of_n_solved(sums, correct)
        out["prm_best_of_n_min"] = M.best_of_n_solved([s.prm_min for s in record.samples], correct)
        if record.kind == "math":
            out["prm_weighted_vote"] = M.weighted_vote_solved(answers, correct, sums, same)
        out["prm_rank_wins"], out["prm_rank_pairs"] = M.ranking_pairs(sums, correct)
    return out


# ---------------------------------------------------------------------------------------------
# Dataset metrics


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def dataset_metrics(records: Sequence[ProblemRecord], ks: Sequence[int], has_prm: bool) -> dict[str, float | None]:
    """Metrics of one dataset from its problem records (names as in the module docstring).

    maj@k and the PRM-weighted vote are None unless every problem is math; prm_rank_acc is None
    when no problem has both a correct and an incorrect sample.
    """
    n = records[0].outcome["n"]
    all_math = all(r.kind == "math" for r in records)
    correct = [[s.correct for s in r.samples] for r in records]
    greedy = [r.outcome["greedy_correct"] for r in records if r.outcome["greedy_correct"] is not None]
    out: dict[str, float | None] = {
        "problems": float(len(records)),
        "n": float(n),
        "greedy_pass@1": _mean([float(g) for g in greedy]),
        "mean_score": _mean([s.score for r in records for s in r.samples]),
        "truncated": _mean([float(s.finish_reason == "length") for r in records for s in r.samples]),
    }
    for k in ks:
        out[f"pass@{k}"] = M.mean_pass_at_k(correct, k)
    for k in ks:
        out[f"maj@{k}"] = _mean([float(r.outcome[f"maj@{k}"]) for r in records]) if all_math else None
    if has_prm:
        out[f"prm_best_of_n_sum@{n}"] = _mean([float(r.outcome["prm_best_of_n_sum"]) for r in records])
        out[f"prm_best_of_n_min@{n}"] = _mean([float(r.outcome["prm_best_of_n_min"]) for r in records])
        out[f"prm_weighted_vote@{n}"] = (
            _mean([float(r.outcome["prm_weighted_vote"]) for r in records]) if all_math else None)
        pairs = [(r.outcome["prm_rank_wins"], r.outcome["prm_rank_pairs"]) for r in records]
        out["prm_rank_acc"] = M.ranking_accuracy(pairs)
        out["prm_rank_pairs"] = float(sum(p for _, p in pairs))
    return out


def metrics_by_dataset(records: Sequence[ProblemRecord], ks: Sequence[int], has_prm: bool
                       ) -> dict[str, dict[str, float | None]]:
    """`dataset_metrics` of every dataset, in order of first appearance."""
    by_name: dict[str, list[ProblemRecord]] = {}
    for r in records:
        by_name.setdefault(r.dataset, []).append(r)
    return {name: dataset_metrics(rs, ks, has_prm) for name, rs in by_name.items()}


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def _greedy_completions(engine, problems, sampled, settings) -> list[Completion] | None:
    if not settings.greedy:
        return None
    if settings.temperature == 0:
        return [group[0] for group in sampled]
    return [group[0] for group in generate(engine, problems, 1, 0.0, settings)]


def evaluate(problems: Sequence[EvalProblem], engine, grade: Grade, settings: EvalSettings,
             prm=None) -> EvalResult:
    """Sample, grade and (with `prm`) rerank every problem; see the module docstring."""
    if not problems:
        raise ValueError("no problems to evaluate")
    sampled = generate(engine, problems, settings.n, settings.temperature, settings)
    greedy = _greedy_completions(engine, problems, sampled, settings)
    to_grade = [list(g) + ([greedy[i]] if greedy else []) for i, g in enumerate(sampled)]
    scores = grade_completions(problems, to_grade, grade)
    records = []
    for p, group, s, g in zip(problems, sampled, scores, greedy or [None] * len(problems)):
        samples = [_sample_record(c, x, p.kind) for c, x in zip(group, s)]
        greedy_record = None if g is None else _sample_record(g, s[-1], p.kind)
        records.append(ProblemRecord(dataset=p.dataset, index=p.index, data_source=p.data_source,
                                     kind=p.kind, prompt=p.prompt_text, ground_truth=p.ground_truth,
                                     greedy=greedy_record, samples=samples))
    if prm is not None:
        _attach_prm(records, sampled, prm)
    math_records = [r for r in records if r.kind == "math"]
    sames = iter(answer_equality([[s.answer for s in r.samples] for r in math_records], grade))
    for r in records:
        r.outcome = problem_outcome(r, settings.ks, next(sames) if r.kind == "math" else None, prm is not None)
    return EvalResult(metrics=metrics_by_dataset(records, settings.ks, prm is not None), records=records)
