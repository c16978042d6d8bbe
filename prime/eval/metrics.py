"""Evaluation metrics over graded samples: pass@k, maj@k and implicit-PRM reranking.

Everything here is a pure function of plain Python lists or tensors. Whether two final answers are
the same is decided by a callable passed in (`same(a, b) -> bool`; the runner backs it with the math
verifier), so this module never imports a grader.

Setting. For every problem the policy draws n responses (temperature 0.6 by default; pass@1 is also
reported for one greedy response) and the verifier grades each with a score in [0, 1].

Correct. A response is correct when its score is exactly 1.0 (`is_correct`). Math scores are 0 or
1; a code score is the fraction of test cases passed, so a program that passes 4 of 5 tests (0.8) is
NOT correct: a submission either solves the problem or it does not, as on a judge.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
https://arxiv.org/abs/2107.03374): with c correct among n >= k samples of a problem, the unbiased
estimate of "at least one of k samples is correct" is

    pass@k = 1 - C(n - c, k) / C(n, k)        (= 1 when n - c < k)

averaged over problems. It is computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms
the binomials (C(64, 32) already exceeds 2^60). Example: n = 4, c = 1, k = 2 gives
1 - C(3, 2) / C(4, 2) = 1 - 3/6 = 0.5.

maj@k (majority voting, "self-consistency": Wang et al. 2022, https://arxiv.org/abs/2203.11171):
the first k samples are grouped into answer classes by their extracted final answers; the problem
is solved when the largest class is correct. Classes (`answer_classes`): samples are visited in
order; a sample joins the first existing class whose first member (its representative) it equals
under `same(representative, answer)`, otherwise it founds a new class. Samples without an
extractable answer join no class. A class is correct when its representative is correct (its
members are verifier-equal to it, so they are graded alike). Ties between classes of equal size go
to the class whose first member came first. Because a sample's class depends only on the samples
before it, the classes of the first k samples are the classes of all n restricted to the first k.
For code, classes by program text are meaningless (two different programs can both be right), so
maj@k is defined for math only and reported as absent for code.

Implicit PRM (Yuan et al. 2024, "Free Process Rewards without Process Labels",
https://arxiv.org/abs/2412.01981; PRIME: Cui et al. 2025, https://arxiv.org/abs/2502.01456). For a
response y to prompt x the token log-ratio

    q[t] = log pi_prm(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)

gives two response scores S (beta = 0.05 by default):
- `sum`: S = beta * sum_t q[t], the PRM's outcome reward; sigmoid(S) is its probability that the
  response is correct (it is trained with BCE(sigmoid(S), correct)).
- `min`: the response is split into steps at newlines (`split_steps`); the reward of a step is
  beta * sum of q over the step's tokens; S = the smallest step reward (a chain of reasoning is as
  good as its worst step).

Reranking with S:
- PRM best-of-n: the sample with the highest S; solved when it is correct. Ties go to the earliest
  sample.
- PRM-weighted vote: each answer class weighs the sum over its members of sigmoid(S_sum); the
  heaviest class is the answer (ties: earliest class); solved when it is correct. Math only, like
  maj@k.
- PRM ranking accuracy: over every (correct, incorrect) pair of responses to the same prompt, the
  fraction where the correct one has the higher S; a tie counts 0.5, so 0.5 is chance. Pairs are
  pooled over all problems of a dataset (a problem with more pairs weighs more), and the accuracy
  is absent when no problem has both a correct and an incorrect response.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

CORRECT_SCORE = 1.0
SameAnswer = Callable[[str, str], bool]


def is_correct(score: float) -> bool:
    """True when a verifier score is a full 1.0 (see the module docstring for partial code scores)."""
    return score == CORRECT_SCORE


# ---------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) so that no binomial
    coefficient is formed.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n={n}], got c={c}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct[p]` holds the correctness of problem p's samples."""
    if not correct:
        raise ValueError("pass@k needs at least one problem, got none")
    return sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in correct) / len(correct)


# ---------------------------------------------------------------------------------------------
# Answer classes and voting


def answer_classes(answers: Sequence[str | None], same: SameAnswer) -> list[int | None]:
    """Class label of every sample (None: no extractable answer); labels count up from 0.

    Sample i joins the first class whose representative r (first member) satisfies
    `same(answers[r], answers[i])`, else it founds class `max label + 1`. Classes are therefore
    numbered in the order of their first members.
    """
    representatives: list[int] = []
    labels: list[int | None] = []
    for i, answer in enumerate(answers):
        if answer is None:
            labels.append(None)
            continue
        label = next((c for c, r in enumerate(representatives) if same(answers[r], answer)), None)
        if label is None:
            label = len(representatives)
            representatives.append(i)
        labels.append(label)
    return labels


def winning_class(labels: Sequence[int | None], weights: Sequence[float] | None = None) -> int | None:
    """The first member of the heaviest class (weight 1 per sample by default), or None.

    Classes are compared by total weight; on a tie the class whose first member comes first wins.
    Returns None when no sample has a class.
    """
    if weights is not None and len(weights) != len(labels):
        raise ValueError(f"got {len(weights)} weights for {len(labels)} samples; they must pair up")
    totals: dict[int, float] = {}
    first: dict[int, int] = {}
    for i, label in enumerate(labels):
        if label is None:
            continue
        totals[label] = totals.get(label, 0.0) + (1.0 if weights is None else weights[i])
        first.setdefault(label, i)
    if not totals:
        return None
    best = min(totals, key=lambda c: (-totals[c], first[c]))
    return first[best]


def majority_solved(
    answers: Sequence[str | None], correct: Sequence[bool], same: SameAnswer, k: int | None = None
) -> bool:
    """maj@k of one problem: is the largest answer class among the first k samples correct?"""
    k = len(answers) if k is None else k
    _check_k(k, len(answers), "maj@k")
    labels = answer_classes(answers[:k], same)
    winner = winning_class(labels)
    return winner is not None and bool(correct[winner])


def weighted_vote_solved(
    answers: Sequence[str | None], correct: Sequence[bool], prm_scores: Sequence[float], same: SameAnswer
) -> bool:
    """PRM-weighted vote of one problem: is the class with the largest sum of sigmoid(S) correct?"""
    labels = answer_classes(answers, same)
    winner = winning_class(labels, [_sigmoid(s) for s in prm_scores])
    return winner is not None and bool(correct[winner])


def _sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _check_k(k: int, n: int, name: str) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"{name} needs 1 <= k <= n, got k={k}, n={n}")


# ---------------------------------------------------------------------------------------------
# PRM reranking


def best_of_n_solved(prm_scores: Sequence[float], correct: Sequence[bool]) -> bool:
    """PRM best-of-n of one problem: is the sample with the highest S correct (ties: first)?"""
    if not prm_scores or len(prm_scores) != len(correct):
        raise ValueError(f"best-of-n needs one PRM score per sample, got {len(prm_scores)} scores "
                         f"for {len(correct)} samples")
    best = max(range(len(prm_scores)), key=lambda i: (prm_scores[i], -i))
    return bool(correct[best])


def ranking_pairs(prm_scores: Sequence[float], correct: Sequence[bool]) -> tuple[float, int]:
    """(wins, pairs) over the (correct, incorrect) pairs of one problem; a tie is half a win."""
    if len(prm_scores) != len(correct):
        raise ValueError(f"got {len(prm_scores)} PRM scores for {len(correct)} samples; they must pair up")
    good = [s for s, c in zip(prm_scores, correct) if c]
    bad = [s for s, c in zip(prm_scores, correct) if not c]
    wins = sum(1.0 if g > b else 0.5 if g == b else 0.0 for g in good for b in bad)
    return wins, len(good) * len(bad)


def ranking_accuracy(per_problem: Sequence[tuple[float, int]]) -> float | None:
    """Pooled ranking accuracy from `ranking_pairs` of every problem; None when there is no pair."""
    pairs = sum(p for _, p in per_problem)
    if pairs == 0:
        return None
    return sum(w for w, _ in per_problem) / pairs


# ---------------------------------------------------------------------------------------------
# Implicit-PRM response scores from token log-ratios


def split_steps(pieces: Sequence[str]) -> list[int]:
    """Step index of every token, given each token's decoded text (`pieces[t]`).

    Rule: a token whose text contains "\\n" ends the current step (and belongs to it), provided
    the step holds some non-whitespace text; blank lines therefore never form a step of their own
    and join the step that follows them. Tokens after the last cut form a final step when they hold
    visible text; otherwise (e.g. a lone eos, whose text is empty) they join the previous step.
    A response of one line is one step.
    """
    ids: list[int] = []
    step, visible = 0, False
    for piece in pieces:
        ids.append(step)
        visible = visible or bool(piece.strip())
        if "\n" in piece and visible:
            step, visible = step + 1, False
    trailing = ids and ids[-1] == step
    if trailing and not visible and step > 0:
        ids = [min(s, step - 1) for s in ids]
    return ids


def step_rewards(q: torch.Tensor, step_ids: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * sum of q over the tokens of each step.

    Args:
        q: token log-ratios of one response. # [T]
        step_ids: step index of each token, 0..S-1, non-decreasing. # [T]
    Returns:
        step rewards. # [S]
    """
    if q.shape != step_ids.shape or q.dim() != 1:
        raise ValueError(f"q {tuple(q.shape)} and step_ids {tuple(step_ids.shape)} must be the same [T] shape")
    if q.numel() == 0:
        raise ValueError("cannot score an empty response (no tokens)")
    num_steps = int(step_ids.max()) + 1
    sums = torch.zeros(num_steps, dtype=q.dtype, device=q.device)  # [S]
    return beta * sums.index_add_(0, step_ids.long(), q)  # [S]


def prm_sum_score(q: torch.Tensor, beta: float) -> float:
    """S_sum = beta * sum_t q[t] of one response. q: # [T]"""
    if q.dim() != 1 or q.numel() == 0:
        raise ValueError(f"q must be a non-empty [T] tensor, got shape {tuple(q.shape)}")
    return beta * float(q.sum())


def prm_min_score(q: torch.Tensor, step_ids: torch.Tensor, beta: float) -> float:
    """S_min = the smallest step reward of one response. q, step_ids: # [T]"""
    return float(step_rewards(q, step_ids, beta).min())
