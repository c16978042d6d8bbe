"""Supervised warm start of a checkpoint on the synthetic arithmetic task.

PRIME starts RL from an SFT checkpoint. The CPU demo builds a randomly initialised tiny model
(`prime.models.tiny`), which almost never answers an arithmetic prompt correctly; the accuracy
filter (keep groups with mean accuracy in [0.2, 0.8]) then drops nearly every group and RL has
nothing to learn from. `sft_warm_start` gives such a model a short supervised fine-tune, in
place, on prompt -> answer pairs of the same task, so that its sampled (temperature 1.0)
accuracy lands in the middle range where groups of K samples disagree and the filter keeps them.

What is trained:
- prompts are rendered exactly as the RL data path renders them (`build_messages`,
  `render_prompt` with the chat template, `encode_prompts`), so the model sees the same tokens;
- the target is the row's worked solution when it carries one (`extra_info.solution`, e.g. the
  arithmetic chains' "3+5=8\\n8+2=10\\n10-4=6\\n\\boxed{6}"), else the bare final answer
  `\\boxed{12}`, followed by the eos token (`<|im_end|>` for the tiny tokenizer); the loss is the
  mean negative log-likelihood of the response tokens only (the prompt is context, never a target);
- plain torch AdamW with a constant learning rate, grad-norm clip 1.0, no DeepSpeed.

The defaults are deliberately short: they are chosen to *under*-fit, so the tiny preset ends up
answering roughly half of fresh prompts correctly when sampling, not all of them (a model that is
always right gives groups of identical scores, which the filter drops just like a model that is
always wrong). `target_acc` stops training early once the sampled accuracy on held-out prompts
reaches a value, for models whose learning speed differs from the tiny preset's.

The checkpoint is never left half-written: the new weights and every other file of the folder
(tokenizer, generation config) are written to a sibling temporary folder, which is renamed into
place only when complete (the old folder is removed after that).

Command line: `prime sft CONFIG [section.key=value ...]`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator

import torch

from prime.data.batch import Batch, pack_sequences
from prime.data.dataset import build_messages, encode_prompts, render_prompt, validate_row
from prime.models.loading import load_model, load_tokenizer
from prime.models.logprobs import response_logprobs

logger = logging.getLogger(__name__)

# Seeds of the default data, offset from `seed` so that neither set coincides with the RL prompt
# set the driver draws with `arithmetic_rows(n, seed=trainer.seed)`.
_TRAIN_SEED_OFFSET = 1_000
_EVAL_SEED_OFFSET = 2_000
_BARE_SEED_OFFSET = 3_000
DEFAULT_EVAL_PROMPTS = 64

# Defaults measured on the tiny preset (hidden 128, 2 layers), one thread: 500 steps of 32
# examples at lr 1e-3 take about half a minute and leave a sampled accuracy near 0.5 on fresh
# prompts (0.44-0.55 over seeds 0-3); 300 steps give about 0.2, 700 steps about 0.6.
# lr 3e-3 learns more slowly at batch 32 and 1e-2 does not get past guessing.
DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 1e-3
DEFAULT_NUM_EXAMPLES = 2048

# The arithmetic chains (`prime.data.synthetic.arith_chain_rows`: 4 operands of 0..9 joined by + or -),
# tiny preset, one thread, lr 1e-3, batch 32, 4096 train-split rows. All worked solutions: held-out
# greedy pass@1 on 256 test-split rows is 0.33 after 300 steps (sampled 0.18, about 45 s), 0.52 after
# 400 and 0.54 after 500. With 60% of the rows bare answers (`CHAIN_BARE_ANSWERS`) and 1000 steps
# (`prime sft configs/arith_chain_cpu.yaml`, seed 0), greedy decoding gives the bare answer to 81% of the
# problems and scores 0.215 (0.14 on those, 0.52 where it writes the steps out); temperature-1 samples
# write the steps out 40% of the time and are right 0.36 of the time when they do, 0.14 when they do
# not: the headroom an RL run is measured on. (With 50% bare answers greedy writes most steps out and
# already scores 0.51.)
CHAIN_STEPS = 1000
CHAIN_BARE_ANSWERS = 0.6
CHAIN_NUM_EXAMPLES = 4096
CHAIN_EVAL_PROMPTS = 512
CHAIN_MAX_NEW_TOKENS = 40


def chain_rows(num_examples: int = CHAIN_NUM_EXAMPLES, seed: int = 0, num_eval: int = CHAIN_EVAL_PROMPTS,
               bare_answers: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Warm-start rows of the arithmetic chains (train split) and held-out rows (test split).

    The training rows depend on `seed` (drawn with `seed + 1000`, so they differ from an RL file
    drawn with `seed`; both are train-split instances). The held-out rows are the test split's
    seed-0 draw whatever `seed` is, so every start and every RL run is measured on the same
    problems; no test-split expression is ever a training one.

    `bare_answers` is the share of training rows (a seeded draw, about that share) whose worked
    solution is dropped, so that `target_text` teaches them the bare boxed answer: a start that
    imitates two behaviours, writing the steps out and guessing the value at once.
    """
    from prime.data.synthetic import arith_chain_rows

    if not 0.0 <= bare_answers < 1.0:
        raise ValueError(f"bare_answers must be in [0, 1), got {bare_answers}")
    rows = arith_chain_rows(num_examples, "train", seed=seed + _TRAIN_SEED_OFFSET)
    rng = random.Random(seed + _BARE_SEED_OFFSET)
    for row in rows:
        if rng.random() < bare_answers:
            row["extra_info"] = {**row["extra_info"], "solution": None}
    return rows, arith_chain_rows(num_eval, "test", seed=0)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(num_threads)`, then restore; None changes nothing.

    The tiny preset's matrices are too small to gain from a second thread, while on an
    oversubscribed 2-core machine a multi-threaded torch step was measured 20x slower than a
    single-threaded one (2.1 s vs 0.09 s for 32 examples).
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def answer_text(ground_truth: str) -> str:
    """The supervised response for a ground truth: the bare boxed answer, e.g. `\\boxed{12}`."""
    return f"\\boxed{{{ground_truth}}}"


def target_text(row: dict, row_index: int = 0, use_solution: bool = True) -> str:
    """The supervised response of a row: its worked solution when it has one, else the boxed answer.

    A worked solution is `extra_info.solution` (the arithmetic-chain rows carry one, e.g.
    "3+5=8\\n8+2=10\\n10-4=6\\n\\boxed{6}"); `use_solution=False` trains the bare answer even then.
    """
    _, ground_truth, _, _ = validate_row(row, row_index)
    solution = (row.get("extra_info") or {}).get("solution")
    if use_solution and solution is not None:
        if not isinstance(solution, str) or not solution:
            raise ValueError(f"row {row_index}: extra_info.solution must be a non-empty string, got {solution!r}")
        return solution
    return answer_text(str(ground_truth))


def build_sft_examples(
    tokenizer, rows: list[dict], system_prompt: str | None = None, use_solution: bool = True
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of (prompt, response) pairs for supervised fine-tuning.

    Prompts go through the same rendering as the RL prompt dataset; each response is
    `target_text(row)` (the worked solution when the row has one, else `answer_text(ground_truth)`)
    followed by the eos token id, so the model learns to stop.

    Returns:
        (prompt_ids, response_ids), one list of token ids per row.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the SFT target needs one to end the answer")
    texts, answers = [], []
    for i, row in enumerate(rows):
        messages, _, _, _ = validate_row(row, i)
        texts.append(render_prompt(tokenizer, build_messages(messages, system_prompt)))
        answers.append(target_text(row, i, use_solution))
    prompt_ids = encode_prompts(tokenizer, texts)
    eos = tokenizer.eos_token_id
    response_ids = [list(r) + [eos] for r in tokenizer(answers, add_special_tokens=False)["input_ids"]]
    return prompt_ids, response_ids


def sft_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood over the response tokens of a packed batch (a scalar)."""
    logp = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                             batch.response_mask)  # [B, T], 0 outside response_mask
    mask = batch.response_mask  # [B, T]
    return -(logp * mask).sum() / mask.sum()


def default_rows(num_examples: int, seed: int, num_eval: int = DEFAULT_EVAL_PROMPTS) -> tuple[list[dict], list[dict]]:
    """Default training rows and held-out evaluation rows of the arithmetic task.

    Both are fresh draws of `arithmetic_rows` (operands 0..10, + - *) with seeds offset from
    `seed`. That task has only 11 * 11 * 3 = 363 distinct expressions and the RL prompt set
    is drawn from the same ones, so the evaluation rows are new rows of the same distribution
    the RL run samples from (most of their expressions also occur in training), which is the
    accuracy that decides what the filter keeps.
    """
    from prime.data.synthetic import arithmetic_rows

    train_rows = arithmetic_rows(num_examples, seed=seed + _TRAIN_SEED_OFFSET)
    eval_rows = arithmetic_rows(num_eval, seed=seed + _EVAL_SEED_OFFSET)
    return train_rows, eval_rows


def _grade(completions, ground_truths: list[str]) -> float:
    """Mean math score over all completions (one list of completions per prompt)."""
    from prime.verifiers.math import score

    scores = [score(c.text, gt) for group, gt in zip(completions, ground_truths) for c in group]
    return sum(scores) / len(scores)


def _eval_prompts(tokenizer, rows: list[dict], system_prompt: str | None) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (rendered as for RL) and ground truths of evaluation rows."""
    if not rows:
        raise ValueError("accuracy needs at least one evaluation row, got an empty list")
    prompt_ids, _ = build_sft_examples(tokenizer, rows, system_prompt)
    return prompt_ids, [str(validate_row(r, i)[1]) for i, r in enumerate(rows)]


def engine_accuracy(
    engine,
    rows: list[dict],
    n: int = 4,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    system_prompt: str | None = None,
) -> float:
    """Mean math score of `n` completions per row from a loaded `HFEngine` (its current weights).

    `temperature=0` is greedy decoding (then `n` copies would be identical; use n=1). The engine
    can be refreshed with `engine.load_weights` between calls, so one engine scores a series of
    checkpoints of the same architecture.
    """
    if temperature == 0 and n != 1:
        raise ValueError(f"greedy decoding (temperature=0) gives identical completions; use n=1, got n={n}")
    prompt_ids, truths = _eval_prompts(engine.tokenizer, rows, system_prompt)
    completions = engine.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed)
    return _grade(completions, truths)


def sampled_accuracy(
    model_dir: str,
    rows: list[dict],
    n: int = 4,
    max_new_tokens: int = 16,
    seed: int = 0,
    *,
    system_prompt: str | None = None,
    num_threads: int | None = 1,
) -> float:
    """Mean math score of `n` temperature-1.0 samples per prompt, generated with `HFEngine`.

    This is the accuracy the RL accuracy filter sees: a value near 0 or 1 means most groups of
    samples agree and get dropped.

    Args:
        model_dir: checkpoint folder.
        rows: math rows in the verl schema (prompt + reward_model.ground_truth).
        n: samples per prompt.
        max_new_tokens: generation budget per sample.
        seed: sampling seed (the same arguments give the same accuracy).
        system_prompt: as `data.system_prompt` of the RL run.
        num_threads: torch threads while generating (see `torch_threads`); None keeps the setting.
    """
    from prime.rollout.hf import HFEngine

    with torch_threads(num_threads):
        engine = HFEngine(model_dir, seed=seed)
        return engine_accuracy(engine, rows, n, max_new_tokens, 1.0, seed, system_prompt)


def greedy_accuracy(
    model_dir: str,
    rows: list[dict],
    max_new_tokens: int = 16,
    *,
    system_prompt: str | None = None,
    num_threads: int | None = 1,
) -> float:
    """Greedy pass@1: the mean math score of one temperature-0 completion per prompt (`HFEngine`).

    The held-out number a trained checkpoint is judged by: unlike `sampled_accuracy` it does not
    depend on a sampling seed, and it rises only when the most likely answer becomes the right one.
    Arguments as in `sampled_accuracy`.
    """
    from prime.rollout.hf import HFEngine

    with torch_threads(num_threads):
        engine = HFEngine(model_dir)
        return engine_accuracy(engine, rows, 1, max_new_tokens, 0.0, 0, system_prompt)


def _replace_checkpoint(model: torch.nn.Module, model_dir: str) -> None:
    """Write `model` over the checkpoint at `model_dir`, keeping every other file (tokenizer, ...).

    The folder is copied to a hidden sibling temporary folder, the model is saved into the copy
    (rewriting config and weights), and the copy is renamed into place. Between the two renames
    the old folder exists complete as `<model_dir>.old-<pid>`, so a crash never leaves a
    half-written checkpoint at `model_dir`.
    """
    model_dir = os.path.abspath(model_dir)
    parent = os.path.dirname(model_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(model_dir)}.warmstart-", dir=parent)
    old = f"{model_dir}.old-{os.getpid()}"
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        model.save_pretrained(tmp)
        os.rename(model_dir, old)
        os.rename(tmp, model_dir)
    except BaseException:
        if not os.path.exists(model_dir) and os.path.isdir(old):
            os.rename(old, model_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_args(model_dir: str, *, steps: int, batch_size: int, lr: float, num_examples: int,
                target_acc: float | None, max_seconds: float | None, eval_every: int, log_every: int,
                max_new_tokens: int) -> None:
    """Raise naming the first argument of `sft_warm_start` that is out of range."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model_dir {model_dir!r} is not a folder; the warm start rewrites a local "
                                "checkpoint folder in place (download a hub model to a folder first)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if target_acc is not None and not 0.0 < target_acc <= 1.0:
        raise ValueError(f"target_acc must be in (0, 1] or None, got {target_acc}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if log_every < 0:
        raise ValueError(f"log_every must be >= 0, got {log_every}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _resolve_rows(rows: list[dict] | None, eval_rows: list[dict] | None, num_examples: int, seed: int,
                  measure: bool) -> tuple[list[dict], list[dict] | None]:
    """Training rows and (when the accuracy is measured) evaluation rows, the defaults filled in."""
    if rows is None:
        rows, default_eval = default_rows(num_examples, seed)
        eval_rows = default_eval if eval_rows is None else eval_rows
    elif not rows:
        raise ValueError("rows is an empty list; pass training rows, or None for the synthetic task")
    if measure and eval_rows is None:
        raise ValueError("the accuracy is to be measured (target_acc or measure is set) but custom rows "
                         "were given without eval_rows; pass held-out eval_rows")
    return rows, eval_rows if measure else None


def sft_warm_start(
    model_dir: str,
    *,
    rows: list[dict] | None = None,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    target_acc: float | None = None,
    max_seconds: float | None = None,
    log_every: int = 50,
    eval_rows: list[dict] | None = None,
    eval_every: int = 50,
    measure: bool = False,
    system_prompt: str | None = None,
    num_threads: int | None = 1,
    use_solution: bool = True,
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """Supervised fine-tuning, in place, of the checkpoint at `model_dir` on prompt -> answer pairs.

    Args:
        model_dir: HF checkpoint folder (weights + tokenizer); its weights are replaced by the
            tuned ones (saved in float32), every other file is kept.
        rows: training rows in the verl schema; None draws `num_examples` synthetic arithmetic
            rows with seed `seed + 1000` (the RL prompt set uses `seed`).
        num_examples: size of the default training set.
        steps: optimizer steps (an upper bound when `target_acc` or `max_seconds` stops earlier).
        batch_size: examples per step, drawn without replacement within each pass over the data.
        lr: AdamW learning rate (constant; weight decay 0; grad-norm clip 1.0).
        seed: seed of the default data, of the example order and of the evaluation samples; the
            same arguments give the same checkpoint.
        target_acc: stop once the sampled accuracy on the evaluation rows (checked every
            `eval_every` steps) reaches this value; None trains for `steps` steps.
        max_seconds: stop after this much wall time (checked after every step).
        log_every: log the mean loss every this many steps (0: never); `warmstart/loss` averages the last ones.
        eval_rows: held-out rows for the accuracy; None with default `rows` uses 64 fresh
            synthetic rows (seed `seed + 2000`, see `default_rows`).
        eval_every: steps between accuracy checks when `target_acc` is set.
        measure: measure the sampled accuracy of the final model (`target_acc` implies it).
        system_prompt: system message added to every prompt, as `data.system_prompt` does.
        num_threads: torch threads during the call (`torch_threads`); None keeps the setting.
        use_solution: train a row's worked solution when it has one (`target_text`), else the answer.
        max_new_tokens: generation budget of the accuracy checks (4-operand chains need 33).

    Accuracy is `sampled_accuracy`'s (4 samples per prompt at temperature 1.0). Returns the metrics
    `warmstart/{loss_first,loss,steps,seconds,examples}` (seconds: all but the save; examples: the
    training set size) and, when measured, `warmstart/acc`.
    """
    args = dict(steps=steps, batch_size=batch_size, lr=lr, target_acc=target_acc, max_seconds=max_seconds,
                eval_every=eval_every, log_every=log_every, max_new_tokens=max_new_tokens)
    _check_args(model_dir, num_examples=num_examples, **args)
    measure = measure or target_acc is not None
    rows, eval_rows = _resolve_rows(rows, eval_rows, num_examples, seed, measure)
    with torch_threads(num_threads):
        model, metrics = _train(model_dir, rows, eval_rows, seed=seed, system_prompt=system_prompt,
                                use_solution=use_solution, **args)
    _replace_checkpoint(model, model_dir)
    return metrics


def _shuffled_batches(prompts: list[list[int]], responses: list[list[int]], batch_size: int, pad_id: int,
                      seed: int) -> Iterator[Batch]:
    """Packed batches of `batch_size` examples: one seeded shuffled pass over the data after another
    (a batch may span two passes)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(len(prompts), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield pack_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)


def _sft_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    """One AdamW step on the batch's response NLL (grad-norm clip 1.0); returns the loss."""
    loss = sft_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


class _Accuracy:
    """Sampled accuracy of the model being trained on held-out rows, through a second copy of it
    in an `HFEngine` that is refreshed in place before each check."""

    def __init__(self, model_dir: str, model: torch.nn.Module, tokenizer, rows: list[dict],
                 system_prompt: str | None, seed: int, max_new_tokens: int):
        from prime.rollout.hf import HFEngine

        self.model, self.seed, self.max_new_tokens = model, seed, max_new_tokens
        self.engine = HFEngine(model_dir, seed=seed)
        self.prompts, self.truths = _eval_prompts(tokenizer, rows, system_prompt)

    def measure(self) -> float:
        self.engine.load_weights((name, p.detach()) for name, p in self.model.named_parameters())
        return _grade(self.engine.generate(self.prompts, n=4, max_new_tokens=self.max_new_tokens, seed=self.seed), self.truths)


def _train(model_dir: str, rows: list[dict], eval_rows: list[dict] | None, *, steps: int,
           batch_size: int, lr: float, seed: int, target_acc: float | None,
           max_seconds: float | None, log_every: int, eval_every: int, system_prompt: str | None,
           use_solution: bool, max_new_tokens: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """The SFT loop of `sft_warm_start` (arguments as there); returns the tuned model and metrics.

    Accuracy is measured when `eval_rows` is given: every `eval_every` steps if `target_acc` is
    set, and on the final weights.
    """
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    prompts, responses = build_sft_examples(tokenizer, rows, system_prompt, use_solution)
    pad_id = tokenizer.pad_token_id

    accuracy = (_Accuracy(model_dir, model, tokenizer, eval_rows, system_prompt, seed, max_new_tokens)
                if eval_rows else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    batches = _shuffled_batches(prompts, responses, batch_size, pad_id, seed)
    losses: list[float] = []
    acc, acc_step = None, -1
    step = 0
    while step < steps:
        loss = _sft_step(model, optimizer, next(batches))
        step += 1
        losses.append(loss)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"SFT loss became {losses[-1]} at step {step}; lower lr (now {lr})")
        if log_every and step % log_every == 0:
            logger.info("warm start step %d/%d: loss %.4f", step, steps, sum(losses[-log_every:]) / log_every)
        if target_acc is not None and step % eval_every == 0:
            model.eval()
            acc, acc_step = accuracy.measure(), step
            model.train()
            logger.info("warm start step %d: sampled accuracy %.3f (target %.3f)", step, acc, target_acc)
            if acc >= target_acc:
                break
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            logger.info("warm start stopped at step %d after max_seconds=%s", step, max_seconds)
            break
    model.eval()
    if accuracy is not None and acc_step != step:
        acc = accuracy.measure()
    tail = losses[-max(1, log_every):]
    metrics = {
        "warmstart/loss_first": losses[0],
        "warmstart/loss": sum(tail) / len(tail),
        "warmstart/steps": float(step),
        "warmstart/seconds": time.perf_counter() - t0,
        "warmstart/examples": float(len(prompts)),
    }
    if acc is not None:
        metrics["warmstart/acc"] = acc
    return model, metrics
