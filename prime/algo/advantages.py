"""Advantage estimators (docs/algorithms.md section 3).

Every estimator takes per-response scores and/or token rewards plus integer ``group_ids`` (one per
response, any order, not necessarily contiguous) and a response mask, and returns token-level
advantages ``[B, T]`` that are zero outside the mask. All group statistics are computed with
``torch.unique`` + ``index_add`` (see ``_groups.py``); nothing loops over the batch in Python.

Shapes: B responses, T response positions (right-padded), G groups.
"""

from __future__ import annotations

import torch

from prime.algo._groups import last_valid_index, make_groups, require_group_size_at_least_2

GRPO_EPS = 1e-6  # added to the group std (docs/algorithms.md section 3)
WHITEN_EPS = 1e-8  # added to the variance in whiten()


def _check_mask(mask: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [B, T], got shape {tuple(mask.shape)}")
    if batch_size is not None and mask.shape[0] != batch_size:
        raise ValueError(f"mask has {mask.shape[0]} rows but the batch has {batch_size} responses")
    return mask


def _response_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response score s_i: ``scores`` itself when [B], or sum_t scores*m when [B, T]."""
    _check_mask(mask)
    if scores.dim() == 2:
        if scores.shape != mask.shape:
            raise ValueError(
                f"token scores shape {tuple(scores.shape)} does not match mask {tuple(mask.shape)}"
            )
        return (scores * mask).sum(dim=-1)  # [B]
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(
            f"scores must be [B] or [B, T] with B = {mask.shape[0]}, got shape {tuple(scores.shape)}"
        )
    return scores


def discounted_reverse_cumsum(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G[:, t] = sum_{s >= t} gamma^(s - t) * rewards[:, s] along the last dimension.

    gamma = 1 is a flipped cumsum; other gammas run the recursion G_t = r_t + gamma * G_{t+1}
    backwards over T (a loop over time positions, never over the batch).
    """
    if gamma == 1.0:
        return rewards.flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])  # [B, T]
    running = torch.zeros_like(rewards[..., 0])  # [B]
    columns = []
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        columns.append(running)
    return torch.stack(columns[::-1], dim=-1)  # [B, T]


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whiten over all valid tokens of the batch: (v - mean) / sqrt(var_unbiased + 1e-8).

    Args:
        values: # [B, T]
        mask: 1 on valid tokens. # [B, T]
    Returns:
        whitened values, zero outside the mask. # [B, T]
    """
    _check_mask(mask)
    mask = mask.to(values.dtype)
    n = mask.sum()
    if float(n) < 2:
        raise ValueError(f"whiten needs at least 2 valid tokens for an unbiased variance, got {float(n):g}")
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / (n - 1)  # Bessel-corrected, as the reference
    return (values - mean) * torch.rsqrt(var + WHITEN_EPS) * mask  # [B, T]


def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, norm_by_std: bool = True
) -> torch.Tensor:
    """GRPO: A_i = (s_i - mean_g s) / (std_g s + 1e-6), broadcast over the response's tokens.

    std is the UNBIASED group std (divides by K - 1). ``norm_by_std=False`` gives Dr. GRPO's
    A_i = s_i - mean_g s (https://arxiv.org/abs/2503.20783). A group with one response has
    s_i - mean_g s = 0 and therefore advantage 0 (it carries no relative signal).

    Args:
        scores: per-response score [B], or token rewards [B, T] summed over the mask.
        group_ids: integer group id per response. # [B]
        mask: response mask. # [B, T]
    Returns:
        advantages. # [B, T]
    """
    s = _response_scores(scores, mask)  # [B]
    groups = make_groups(group_ids, s.shape[0])
    mean = groups.broadcast(groups.mean(s))  # [B]
    centred = s - mean  # [B]
    if norm_by_std:
        k = groups.counts.to(s.dtype)  # [G]
        sq = groups.sum(centred**2)  # [G]
        std = torch.sqrt(sq / (k - 1).clamp(min=1))  # [G] unbiased; 0 for singleton groups
        centred = centred / (groups.broadcast(std) + GRPO_EPS)
    return centred.unsqueeze(-1) * mask.to(s.dtype)  # [B, T]


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = s_i - mean_{j != i} s_j = K / (K - 1) * (s_i - mean_g s).

    https://arxiv.org/abs/2402.14740. Raises ValueError for groups of size 1.

    Args:
        scores: per-response score [B], or token rewards [B, T] summed over the mask.
        group_ids: # [B]
        mask: # [B, T]
    Returns:
        advantages. # [B, T]
    """
    s = _response_scores(scores, mask)  # [B]
    groups = make_groups(group_ids, s.shape[0])
    require_group_size_at_least_2(groups, "RLOO")
    k = groups.size_of_each().to(s.dtype)  # [B]
    adv = k / (k - 1) * (s - groups.broadcast(groups.mean(s)))  # [B]
    return adv.unsqueeze(-1) * mask.to(s.dtype)  # [B, T]


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: G_t = r_t + gamma * G_{t+1}, then whiten G over all valid tokens of the batch.

    https://arxiv.org/abs/2501.03262

    Args:
        token_rewards: # [B, T]
        mask: # [B, T]
    Returns:
        advantages. # [B, T]
    """
    _check_mask(mask, token_rewards.shape[0])
    returns = discounted_reverse_cumsum(token_rewards * mask, gamma)  # [B, T]
    return whiten(returns, mask)


def _leave_one_out_tokens(rewards: torch.Tensor, source_mask: torch.Tensor, groups) -> torch.Tensor:
    """r~[i,t] = r[i,t] * K/(K-1) - (sum_{j in g} m_j)/(K-1) on the positions of ``source_mask``.

    m_j is the mean of r_j over the positions of ``source_mask`` (the reference's ``masked_rloo``).
    Positions outside ``source_mask`` are zero.
    """
    source_mask = source_mask.to(rewards.dtype)
    r = rewards * source_mask  # [B, T]
    per_response_mean = r.sum(dim=-1) / source_mask.sum(dim=-1)  # [B] m_i
    k = groups.size_of_each().to(r.dtype)  # [B]
    baseline = groups.broadcast(groups.sum(per_response_mean)) / (k - 1)  # [B]
    return (r * (k / (k - 1)).unsqueeze(-1) - baseline.unsqueeze(-1)) * source_mask  # [B, T]


def prime_returns(
    process_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    process_coef: float = 5.0,
    outcome_coef: float = 5.0,
    gamma_process: float = 1.0,
    gamma_outcome: float = 1.0,
) -> torch.Tensor:
    """PRIME returns R before whitening (docs/algorithms.md section 3, steps 1-3).

    1. Sources: process rewards r[i,t] and the outcome o_i placed on the last valid token L_i - 1.
    2. Leave-one-out per source, as the PRIME reference code does it: with m_i the mean of r_i over
       its valid tokens, r~[i,t] = r[i,t] * K/(K-1) - (sum_j m_j)/(K-1). For the outcome (a single
       token) this is o_i - mean_{j != i} o_j.
    3. R[i,t] = c_p * sum_{s>=t} gamma_p^(s-t) r~[i,s] + c_o * sum_{s>=t} gamma_o^(s-t) o~[i,s].
    A source whose coefficient is 0 is skipped (``process_rewards`` may then be None).
    https://arxiv.org/abs/2502.01456

    Args:
        process_rewards: token process rewards r. # [B, T]
        outcome: verifier score o_i = acc_i. # [B]
        group_ids: # [B]
        mask: # [B, T]
    Returns:
        R, zero outside the mask. # [B, T]
    Raises:
        ValueError: for groups of size 1 or responses without valid tokens.
    """
    _check_mask(mask, outcome.shape[0])
    if outcome.dim() != 1:
        raise ValueError(f"outcome must be 1-D [B], got shape {tuple(outcome.shape)}")
    groups = make_groups(group_ids, mask.shape[0])
    require_group_size_at_least_2(groups, "PRIME")
    dtype = process_rewards.dtype if process_rewards is not None else outcome.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = mask.to(dtype)
    last = last_valid_index(mask)  # [B]
    returns = torch.zeros_like(mask)  # [B, T]

    if process_coef != 0:
        if process_rewards is None:
            raise ValueError("process_rewards is None but process_coef is non-zero")
        if process_rewards.shape != mask.shape:
            raise ValueError(
                f"process_rewards shape {tuple(process_rewards.shape)} does not match mask {tuple(mask.shape)}"
            )
        r_loo = _leave_one_out_tokens(process_rewards.to(dtype), mask, groups)  # [B, T]
        returns = returns + process_coef * discounted_reverse_cumsum(r_loo, gamma_process)

    if outcome_coef != 0:
        rows = torch.arange(mask.shape[0], device=mask.device)
        outcome_tokens = torch.zeros_like(mask)  # [B, T]
        outcome_tokens[rows, last] = outcome.to(dtype)
        outcome_mask = torch.zeros_like(mask)  # [B, T] one position per response
        outcome_mask[rows, last] = 1.0
        o_loo = _leave_one_out_tokens(outcome_tokens, outcome_mask, groups)  # [B, T]
        returns = returns + outcome_coef * discounted_reverse_cumsum(o_loo, gamma_outcome)

    return returns * mask  # [B, T]


def prime_advantages(
    process_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    process_coef: float = 5.0,
    outcome_coef: float = 5.0,
    gamma_process: float = 1.0,
    gamma_outcome: float = 1.0,
) -> torch.Tensor:
    """PRIME advantages: whiten(prime_returns(...)) over all valid tokens of the batch. # [B, T]"""
    returns = prime_returns(
        process_rewards, outcome, group_ids, mask, process_coef, outcome_coef, gamma_process, gamma_outcome
    )
    return whiten(returns, mask)


def gvpo_centered_scores(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """GVPO's input: R_i - mean_g R (GRPO without std normalisation), per response. # [B]

    Raises ValueError for groups of size 1 (GVPO's loss divides by K - 1).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    groups = make_groups(group_ids, scores.shape[0])
    require_group_size_at_least_2(groups, "GVPO")
    return scores - groups.broadcast(groups.mean(scores))  # [B]
