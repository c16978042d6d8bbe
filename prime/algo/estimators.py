"""Advantage estimators by name: the one entry point the driver calls (docs/algorithms.md section 3).

`compute_advantages(name, ...)` turns the verifier scores (and, for PRIME, the implicit PRM's
token rewards) into token-level advantages [B, T] for every estimator the project has. Sequence-
level estimators broadcast their per-response value over the response's tokens; GVPO's loss reads
its input, R_i - mean_g R, back from the first token (`prime/train/losses.py`).

`policy_loss_kind(name)` says which policy loss an estimator's advantages feed, and
`uses_process_rewards(name, process_coef)` whether the step needs the implicit PRM at all.
"""

from __future__ import annotations

import torch

from prime.algo._groups import last_valid_index
from prime.algo.advantages import (
    gvpo_centered_scores,
    grpo_advantages,
    prime_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

ESTIMATORS = ("prime", "grpo", "rloo", "reinforce_pp", "gvpo")


def _check_name(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"algo.name={name!r} is not a known estimator; choose one of {ESTIMATORS}")


def policy_loss_kind(name: str) -> str:
    """"gvpo" for GVPO (its own regression loss), "ppo" (PPO-clip) for every other estimator."""
    _check_name(name)
    return "gvpo" if name == "gvpo" else "ppo"


def uses_process_rewards(name: str, process_coef: float) -> bool:
    """Whether the estimator reads the implicit PRM's token rewards (PRIME with c_p != 0)."""
    _check_name(name)
    return name == "prime" and process_coef != 0.0


def outcome_on_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token rewards holding each response's score on its last valid token, zero elsewhere. # [B, T]"""
    rewards = torch.zeros_like(mask, dtype=scores.dtype)  # [B, T]
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_valid_index(mask)] = scores
    return rewards


def compute_advantages(
    name: str,
    *,
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    process_rewards: torch.Tensor | None = None,
    norm_by_std: bool = True,
    gamma: float = 1.0,
    process_coef: float = 5.0,
    outcome_coef: float = 5.0,
    gamma_process: float = 1.0,
    gamma_outcome: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token advantages of estimator `name`, and `advantages/mean_abs`.

    Args:
        name: one of ESTIMATORS.
        scores: verifier score (outcome) per response. # [B]
        group_ids: prompt of each response. # [B]
        mask: response mask. # [B, T]
        process_rewards: the implicit PRM's token rewards (PRIME with process_coef != 0). # [B, T]
        norm_by_std: GRPO only (False gives Dr. GRPO).
        gamma: REINFORCE++'s discount.
        process_coef, outcome_coef, gamma_process, gamma_outcome: PRIME's return coefficients.
    Returns:
        (advantages [B, T], zero outside the mask; metrics).
    """
    _check_name(name)
    mask = mask.to(torch.float32) if not mask.dtype.is_floating_point else mask
    if name == "prime":
        adv = prime_advantages(process_rewards, scores, group_ids, mask, process_coef=process_coef,
                               outcome_coef=outcome_coef, gamma_process=gamma_process, gamma_outcome=gamma_outcome)
    elif name == "grpo":
        adv = grpo_advantages(scores, group_ids, mask, norm_by_std=norm_by_std)
    elif name == "rloo":
        adv = rloo_advantages(scores, group_ids, mask)
    elif name == "reinforce_pp":
        adv = reinforce_pp_advantages(outcome_on_last_token(scores, mask), mask, gamma=gamma)
    else:  # gvpo: R_i - mean_g R, broadcast over the response
        adv = gvpo_centered_scores(scores, group_ids).unsqueeze(-1) * mask  # [B, T]
    return adv, {"advantages/mean_abs": float((adv.abs() * mask).sum() / mask.sum())}
