"""Pure torch math of the project: advantages, policy losses, implicit PRM, KL, filters.

Everything here is a function of tensors and explicit scalars (no config objects, no workers) and
imports only torch. See shared/ALGORITHMS.md for the formulas.
"""

from prime.algo.advantages import (
    discounted_reverse_cumsum,
    gvpo_centered_scores,
    grpo_advantages,
    prime_advantages,
    prime_returns,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from prime.algo.filters import accuracy_filter, group_filter_stats, truncation_filter
from prime.algo.implicit_prm import (
    batch_norm_scale,
    prm_ce_loss,
    prm_dpo_loss,
    sequence_rewards,
    token_rewards,
)
from prime.algo.kl import KL_KINDS, kl_penalty
from prime.algo.policy_loss import (
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_loss,
    gvpo_loss,
    local_normalizer,
    ppo_clip_loss,
    sequence_logp_sum,
)

__all__ = [
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "accuracy_filter",
    "aggregate_loss",
    "batch_norm_scale",
    "discounted_reverse_cumsum",
    "entropy_loss",
    "group_filter_stats",
    "grpo_advantages",
    "gvpo_centered_scores",
    "gvpo_loss",
    "kl_penalty",
    "local_normalizer",
    "ppo_clip_loss",
    "prime_advantages",
    "prime_returns",
    "prm_ce_loss",
    "prm_dpo_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_logp_sum",
    "sequence_rewards",
    "token_rewards",
    "truncation_filter",
    "whiten",
]
