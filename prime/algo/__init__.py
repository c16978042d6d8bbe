"""Pure torch math of the project: advantages, policy losses, implicit PRM, KL, filters.

Everything here is a function of tensors and explicit scalars (no config objects, no workers) and
imports only torch. The formulas, their defaults and the papers they come from: docs/algorithms.md.
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
from prime.algo.estimators import ESTIMATORS, compute_advantages, policy_loss_kind, uses_process_rewards
from prime.algo.filters import accuracy_filter, group_filter_stats, keep_groups, truncation_filter
from prime.algo.implicit_prm import (
    batch_norm_scale,
    better_pairs,
    prm_ce_loss,
    prm_dpo_loss,
    rank_counts,
    sequence_rewards,
    token_rewards,
)
from prime.algo.kl import KL_KINDS, kl_penalty, logprob_gap
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
    "ESTIMATORS",
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "accuracy_filter",
    "aggregate_loss",
    "batch_norm_scale",
    "better_pairs",
    "compute_advantages",
    "discounted_reverse_cumsum",
    "entropy_loss",
    "group_filter_stats",
    "grpo_advantages",
    "gvpo_centered_scores",
    "gvpo_loss",
    "keep_groups",
    "kl_penalty",
    "local_normalizer",
    "logprob_gap",
    "policy_loss_kind",
    "ppo_clip_loss",
    "prime_advantages",
    "prime_returns",
    "prm_ce_loss",
    "prm_dpo_loss",
    "rank_counts",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_logp_sum",
    "sequence_rewards",
    "token_rewards",
    "truncation_filter",
    "uses_process_rewards",
    "whiten",
]
