"""Policy losses and their aggregation (docs/algorithms.md section 4).

Shapes: B responses in the (micro-)batch, T response positions (right-padded).

Why the loss does not depend on how the batch is split
------------------------------------------------------
Every aggregation mode is a SUM of per-token or per-sequence terms divided by a normaliser N:

    token-mean               sum_{i,t} L[i,t] m[i,t]                    / N,  N = number of valid tokens
    seq-mean-token-mean      sum_i (sum_t L[i,t] m[i,t] / L_i)          / N,  N = number of sequences
    seq-mean-token-sum       sum_i  sum_t L[i,t] m[i,t]                 / N,  N = number of sequences
    seq-mean-token-sum-norm  sum_i  sum_t L[i,t] m[i,t] / T_max,           no N (Dr. GRPO's constant T_max)

The numerator is additive over any partition of the batch, so if every micro-batch divides its own
partial sum by the GLOBAL N (the count over the whole optimizer-step batch: all micro-batches on all
data-parallel ranks), the micro-batch losses add up to exactly the full-batch loss, and so do their
gradients under gradient accumulation. Dividing by the micro-batch's own N instead would weight a
token by 1/(tokens in its micro-batch), which changes the loss whenever micro-batches hold different
numbers of tokens. ``global_normalizer=None`` uses the local N, which is right only when the call
sees the whole batch. seq-mean-token-sum-norm divides by the constant T_max alone (as docs/algorithms.md
and verl define it), so it is additive over micro-batches by construction and ignores N.

Data-parallel engines (DDP, DeepSpeed) AVERAGE gradients over the W ranks; with a global N the
per-rank losses must be SUMMED, so multiply each rank's loss by W (equivalently pass N / W) when the
engine averages. seq-mean-token-sum-norm also needs the same T_max on every micro-batch: pass
``max_len`` (the configured response length) because padded widths differ between micro-batches.
"""

from __future__ import annotations

import torch

from prime.algo._groups import make_groups, require_group_size_at_least_2

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")


def local_normalizer(mask: torch.Tensor, mode: str) -> float:
    """This (micro-)batch's contribution to the global normaliser of ``mode``.

    Sum it over all micro-batches and ranks (e.g. with all_reduce) to get ``global_normalizer``:
    the number of valid tokens for token-mean, the number of non-empty sequences for the other
    seq-mean modes, and 1.0 for seq-mean-token-sum-norm (which has no count normaliser; the value is
    ignored by :func:`aggregate_loss`).
    """
    _check_mode(mode)
    if mode == "token-mean":
        return float(mask.sum())
    if mode == "seq-mean-token-sum-norm":
        return 1.0
    return float((mask.sum(dim=-1) > 0).sum())


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss matrix to a scalar (see the module docstring for the split invariance).

    Args:
        values: per-token loss L. # [B, T]
        mask: 1 on valid response tokens. # [B, T]
        mode: one of ``LOSS_AGG_MODES``.
        global_normalizer: N over the whole optimizer-step batch (all micro-batches and ranks):
            valid-token count for token-mean, sequence count for the seq-mean-* modes. None uses
            this call's own count (:func:`local_normalizer`).
        max_len: T_max for seq-mean-token-sum-norm (Dr. GRPO's constant,
            https://arxiv.org/abs/2503.20783); defaults to ``values.shape[-1]``.
    Returns:
        scalar loss.
    """
    _check_mode(mode)
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match mask {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    normalizer = local_normalizer(mask, mode) if global_normalizer is None else global_normalizer
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(values.dtype)
    elif normalizer <= 0:
        # An empty micro-batch contributes nothing; avoid 0/0.
        normalizer = 1.0
    token_sums = (values * mask).sum(dim=-1)  # [B]
    if mode == "token-mean":
        numerator = token_sums.sum()
    elif mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).clamp(min=1)  # [B]; empty rows have token_sums 0
        numerator = (token_sums / lengths).sum()
    elif mode == "seq-mean-token-sum":
        numerator = token_sums.sum()
    else:  # seq-mean-token-sum-norm: sum(L * m) / T_max, no count normaliser
        t_max = values.shape[-1] if max_len is None else max_len
        return token_sums.sum() / t_max
    return numerator / normalizer


def _masked_mean_float(values: torch.Tensor, mask: torch.Tensor) -> float:
    n = float(mask.sum())
    return float((values * mask).sum()) / n if n > 0 else 0.0


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    loss_agg: str = "token-mean",
    global_normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with dual clip, aggregated by ``loss_agg``.

    ratio = exp(clamp(logp - old_logp, -20, 20));
    L = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high));
    for A < 0 the dual clip (https://arxiv.org/abs/1912.09729) caps L at -A * clip_ratio_c, so a huge
    ratio on a negative-advantage token cannot blow up the loss. ``clip_ratio_c=None`` disables it.
    clip_high > clip_low is DAPO's clip-higher (https://arxiv.org/abs/2503.14476).

    Args:
        logp: current policy token log-probs (with grad). # [B, T]
        old_logp: rollout policy token log-probs. # [B, T]
        advantages: # [B, T]
        mask: # [B, T]
        global_normalizer, max_len: see :func:`aggregate_loss`.
    Returns:
        (loss, metrics); metrics are Python floats over this call's valid tokens:
        policy/clip_frac, policy/dual_clip_frac, policy/approx_kl (mean of old_logp - logp),
        policy/ratio_mean, policy/ratio_max, policy/loss.
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 (or None to disable the dual clip), got {clip_ratio_c}")
    mask = mask.to(logp.dtype)
    old_logp = old_logp.detach()
    advantages = advantages.detach()
    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    clip_hit = (clipped > unclipped).to(logp.dtype)  # [B, T]
    if clip_ratio_c is not None:
        cap = -advantages * clip_ratio_c  # [B, T]
        negative = advantages < 0
        dual_hit = (negative & (per_token > cap)).to(logp.dtype)  # [B, T]
        per_token = torch.where(negative, torch.minimum(per_token, cap), per_token)
    else:
        dual_hit = torch.zeros_like(per_token)

    loss = aggregate_loss(per_token, mask, loss_agg, global_normalizer, max_len)
    with torch.no_grad():
        ratio_max = float((ratio * mask).max()) if float(mask.sum()) > 0 else 0.0
        metrics = {
            "policy/loss": float(loss.detach()),
            "policy/clip_frac": _masked_mean_float(clip_hit, mask),
            "policy/dual_clip_frac": _masked_mean_float(dual_hit, mask),
            "policy/approx_kl": _masked_mean_float(-log_ratio, mask),
            "policy/ratio_mean": _masked_mean_float(ratio, mask),
            "policy/ratio_max": ratio_max,
        }
    return loss, metrics


def entropy_loss(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Aggregated token entropy, for the bonus ``loss = policy_loss - entropy_coef * entropy``.

    Uses the same aggregation (and global normaliser) as the policy loss so the bonus is split
    invariant too.

    Args:
        entropy: per-token entropy of the current policy. # [B, T]
        mask: # [B, T]
    Returns:
        (aggregated entropy, {"policy/entropy": float}).
    """
    value = aggregate_loss(entropy, mask, mode, global_normalizer, max_len)
    return value, {"policy/entropy": float(value.detach())}


def sequence_logp_sum(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """S_i = sum_t logp[i,t] * m[i,t], GVPO's per-response log-probability. # [B]"""
    return (logp * mask.to(logp.dtype)).sum(dim=-1)


def gvpo_loss(
    logp_sum: torch.Tensor,
    old_logp_sum: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
    num_micro_batches: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GVPO loss (https://arxiv.org/abs/2504.19599), a SUM over responses.

    z_i = beta * (S_i - S_old_i); e_i = (z_i - mean_g z) - (R_i - mean_g R);
    loss = sum_i 0.5 * e_i^2 / (K - 1), divided by ``num_micro_batches`` (gradient-accumulation
    steps). Because it is a sum over responses, micro-batch losses add up to the full-batch loss as
    long as every group stays whole inside one micro-batch (the group means need all K members).
    Gradient: dL/dS_i = beta * e_i / (K - 1) (the group means of e are zero).

    Args:
        logp_sum: S_i, current policy (with grad). # [B]
        old_logp_sum: S_old_i, rollout policy. # [B]
        scores: R_i, per-response reward. # [B]
        group_ids: # [B]
        beta: GVPO's beta (``gvpo.beta``).
        num_micro_batches: gradient-accumulation steps the sum is divided by.
    Returns:
        (loss, metrics) with gvpo/loss, gvpo/residual_rms, gvpo/z_mean_abs.
    Raises:
        ValueError: for groups of size 1.
    """
    if logp_sum.dim() != 1:
        raise ValueError(f"logp_sum must be 1-D [B], got shape {tuple(logp_sum.shape)}")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    groups = make_groups(group_ids, logp_sum.shape[0])
    require_group_size_at_least_2(groups, "GVPO")
    k = groups.size_of_each().to(logp_sum.dtype)  # [B]
    z = beta * (logp_sum - old_logp_sum.detach())  # [B]
    z_centred = z - groups.broadcast(groups.mean(z))  # [B]
    scores = scores.detach().to(logp_sum.dtype)
    r_centred = scores - groups.broadcast(groups.mean(scores))  # [B]
    residual = z_centred - r_centred  # [B]
    loss = (0.5 * residual**2 / (k - 1)).sum() / num_micro_batches
    with torch.no_grad():
        metrics = {
            "gvpo/loss": float(loss),
            "gvpo/residual_rms": float(residual.pow(2).mean().sqrt()),
            "gvpo/z_mean_abs": float(z.abs().mean()),
        }
    return loss, metrics
