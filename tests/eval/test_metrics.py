"""Hand-computed cases for the evaluation metrics (prime.eval.metrics)."""

import math
from fractions import Fraction

import pytest
import torch

from prime.eval import metrics as M


def same_value(a: str, b: str) -> bool:
    """Answers are the same when they are the same number ("2" == "2.0")."""
    return float(a) == float(b)


# ---------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_example_from_the_definition():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert M.pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-12)  # one product rounding step


def test_pass_at_k_hand_values():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert M.pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)  # float products, a few ulps
    # pass@1 is the fraction correct: 3/10
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)  # float products, a few ulps
    assert M.pass_at_k(4, 0, 3) == 0.0  # no correct sample: the empty product is 1
    assert M.pass_at_k(5, 2, 4) == 1.0  # n - c = 3 < k = 4: every 4-subset holds a correct one
    assert M.pass_at_k(4, 4, 1) == 1.0


def test_pass_at_k_matches_exact_binomials_where_they_are_huge():
    # C(200, 100) ~ 9e58: the product form must agree with exact rational arithmetic.
    n, c, k = 200, 7, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert M.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)  # 7 float factors


def test_mean_pass_at_k_averages_problems():
    # problem 1: n=4, c=1 -> 0.5; problem 2: n=4, c=2 -> 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
    correct = [[True, False, False, False], [True, True, False, False]]
    assert M.mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6) / 2, abs=1e-12)  # float products


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5, n=4"):
        M.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c=6"):
        M.pass_at_k(4, 6, 1)


def test_only_a_full_score_is_correct():
    assert M.is_correct(1.0)
    assert not M.is_correct(0.8)  # a program passing 4 of 5 tests
    assert not M.is_correct(0.0)


# ---------------------------------------------------------------------------------------------
# Answer classes, maj@k


def test_answer_classes_by_representative_and_skipping_missing_answers():
    assert M.answer_classes(["2", None, "2.0", "3", "3"], same_value) == [0, None, 0, 1, 1]

    # A non-transitive "same": within 1 of each other. 2 joins 1's class; 3 is compared with the
    # representative 1 (not with 2), so it founds a class of its own.
    def close(a, b):
        return abs(float(a) - float(b)) <= 1

    assert M.answer_classes(["1", "2", "3"], close) == [0, 0, 1]


def test_maj_at_k_ties_go_to_the_class_that_appeared_first():
    answers = ["5", "7", "7", "5"]
    correct = [False, True, True, False]
    # k=4: {5: samples 0,3} and {7: samples 1,2} tie 2-2; "5" came first -> wrong
    assert not M.majority_solved(answers, correct, same_value, k=4)
    # k=3: {5: 1 sample}, {7: 2 samples} -> "7" -> right
    assert M.majority_solved(answers, correct, same_value, k=3)
    # k=1: only "5"
    assert not M.majority_solved(answers, correct, same_value, k=1)


def test_maj_at_k_groups_equal_answers_written_differently():
    # "0.5" and ".5" are one class of 2, beating "1" (1 sample)
    answers = ["1", "0.5", ".5"]
    assert M.majority_solved(answers, [False, True, True], same_value)


def test_maj_at_k_without_any_answer_is_unsolved():
    assert not M.majority_solved([None, None], [False, False], same_value)


def test_winning_class_counts_weights():
    # class 0 = {0, 2} weighs 0.25 + 0.25 = 0.5; class 1 = {1} weighs 0.75
    assert M.winning_class([0, 1, 0], [0.25, 0.75, 0.25]) == 1
    assert M.winning_class([0, 1, 0]) == 0  # counts: 2 against 1
    assert M.winning_class([None, None]) is None


# ---------------------------------------------------------------------------------------------
# PRM reranking


def test_weighted_vote_beats_plain_majority():
    answers = ["4", "4", "4", "9", "9"]
    correct = [False, False, False, True, True]
    prm = [-3.0, -3.0, -3.0, 2.0, 2.0]
    # majority: "4" has 3 votes against 2 -> wrong
    assert not M.majority_solved(answers, correct, same_value)
    # weighted: "4" weighs 3 * sigmoid(-3) = 3 * 0.04743 = 0.1423,
    #           "9" weighs 2 * sigmoid(2)  = 2 * 0.88080 = 1.7616 -> right
    assert M.weighted_vote_solved(answers, correct, prm, same_value)


def test_best_of_n_takes_the_first_of_tied_maxima():
    # samples 1 and 2 tie at 0.5; the first (1) is wrong
    assert not M.best_of_n_solved([0.1, 0.5, 0.5], [False, False, True])
    assert M.best_of_n_solved([0.1, 0.5, 0.7], [False, False, True])


def test_ranking_pairs_and_pooled_accuracy():
    scores = [0.3, 0.1, 0.3, -1.0]
    correct = [True, False, False, True]
    # correct {0.3, -1.0} x incorrect {0.1, 0.3}:
    # (0.3 > 0.1) = 1, (0.3 == 0.3) = 0.5, (-1 < 0.1) = 0, (-1 < 0.3) = 0 -> 1.5 of 4 pairs
    assert M.ranking_pairs(scores, correct) == (1.5, 4)
    # pooled with another problem's (1 of 1): 2.5 / 5
    assert M.ranking_accuracy([(1.5, 4), (1.0, 1)]) == 0.5
    assert M.ranking_accuracy([(0.0, 0)]) is None
    assert M.ranking_pairs([0.2, 0.4], [True, True]) == (0.0, 0)


# ---------------------------------------------------------------------------------------------
# Implicit-PRM scores from q


def test_split_steps_at_newlines_without_blank_steps():
    pieces = ["Step", " 1", ":\n", "\n", "x", "=", "2", "\n\n", "so", " 3", ""]
    # ":\n" closes step 0; the blank "\n" joins step 1, which "\n\n" closes; the rest is step 2
    assert M.split_steps(pieces) == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]


def test_split_steps_trailing_invisible_tokens_join_the_last_step():
    # "" (an eos decoded without special tokens) after the last newline joins step 1
    assert M.split_steps(["a", "\n", "b", "\n", ""]) == [0, 0, 1, 1, 1]
    assert M.split_steps(["a", "b"]) == [0, 0]  # one line, one step
    assert M.split_steps(["x\ny"]) == [0]  # a newline inside the only token
    assert M.split_steps(["\n", "\n"]) == [0, 0]  # nothing visible: one step


def test_sum_and_min_scores_from_a_hand_written_q():
    q = torch.tensor([1.0, -2.0, 0.5, 4.0, -1.0, 0.5])  # [T=6]
    steps = torch.tensor([0, 0, 1, 1, 2, 2])  # [T]
    beta = 0.5
    # steps: 0.5 * (1 - 2) = -0.5; 0.5 * (0.5 + 4) = 2.25; 0.5 * (-1 + 0.5) = -0.25
    assert M.step_rewards(q, steps, beta).tolist() == [-0.5, 2.25, -0.25]
    assert M.prm_min_score(q, steps, beta) == -0.5
    # sum: 0.5 * (1 - 2 + 0.5 + 4 - 1 + 0.5) = 0.5 * 3 = 1.5
    assert M.prm_sum_score(q, beta) == 1.5


def test_step_rewards_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        M.step_rewards(torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.05)
