"""The losses the trainer optimises: small adapters from a micro-batch to the math in `prime.algo`.

Each adapter says which batch fields it reads, the counts it normalises by (the trainer sums them
over micro-batches and ranks, see `prime/train/trainer.py`), its value and its metrics. Formulas
and defaults: docs/algorithms.md sections 2 and 4.

- `PPOClipLoss`: clipped surrogate on token advantages (PRIME, GRPO, RLOO, REINFORCE++).
- `GVPOLoss`: GVPO's squared residual over whole groups; its sequence-level input is the
  advantage of the response's first token (estimators broadcast a sequence value over the tokens).
- `PRMCrossEntropyLoss` and `PRMPairwiseLoss`: the implicit PRM's online losses.

The two policy losses share the optional entropy bonus and KL-to-reference terms, aggregated like
the policy loss (`loss_agg`) over the mini-batch's global normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prime.algo.implicit_prm import better_pairs, prm_ce_loss, prm_dpo_loss
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
from prime.data.batch import Batch
from prime.train.trainer import Forward, LossTraits

_POLICY_SUMS = ("loss", "pg_loss", "tokens", "approx_kl", "entropy", "kl")


@dataclass(frozen=True)
class Regularizers:
    """The entropy bonus and KL-to-reference terms both policy losses may add.

    loss_agg and max_len aggregate them as the policy loss is aggregated (T_max of
    `seq-mean-token-sum-norm`; None uses the batch's response width).
    """

    loss_agg: str = "token-mean"
    max_len: int | None = None
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "k3"

    def __post_init__(self) -> None:
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg={self.loss_agg!r} is not valid; choose one of {LOSS_AGG_MODES}")
        if self.kl_coef > 0 and self.kl_type not in KL_KINDS:
            raise ValueError(f"kl_type={self.kl_type!r} is not valid; choose one of {KL_KINDS}")

    def required(self) -> tuple[str, ...]:
        return ("ref_logp",) if self.kl_coef > 0 else ()

    def add(self, pg_loss: torch.Tensor, fwd: Forward, micro: Batch,
            norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        """pg_loss - entropy_coef * H + kl_coef * KL, and the policy metric sums of the micro-batch."""
        device = fwd.logp.device
        mask = micro.response_mask.to(device)  # [b, T]
        max_len = self.max_len or micro.response_width
        old_logp = micro.old_logp.to(device)  # [b, T]
        loss = pg_loss
        if self.entropy_coef != 0.0:
            loss = loss - self.entropy_coef * entropy_loss(fwd.entropy, mask, self.loss_agg, norm, max_len)[0]
        sums = {"kl": 0.0}
        if self.kl_coef > 0:
            kl = kl_penalty(fwd.logp, micro.ref_logp.to(device), self.kl_type)  # [b, T]
            loss = loss + self.kl_coef * aggregate_loss(kl, mask, self.loss_agg, norm, max_len)
            sums["kl"] = float((kl.detach() * mask).sum())
        with torch.no_grad():
            sums |= {
                "loss": float(loss),
                "pg_loss": float(pg_loss),
                "tokens": float(mask.sum()),
                "entropy": float((fwd.entropy * mask).sum()),
                "approx_kl": float(((old_logp - fwd.logp) * mask).sum()),
            }
        return loss, sums

    def metrics(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        tokens = max(sums["tokens"], 1.0)
        out = {
            "policy/loss": sums["loss"] / steps,
            "policy/pg_loss": sums["pg_loss"] / steps,
            "policy/approx_kl": sums["approx_kl"] / tokens,
            "policy/entropy": sums["entropy"] / tokens,
        }
        if self.kl_coef > 0:
            out["policy/kl"] = sums["kl"] / tokens
        return out


@dataclass(frozen=True)
class PPOClipLoss:
    """PPO-clip with dual clip (`prime.algo.policy_loss.ppo_clip_loss`) on `batch.advantages`."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    reg: Regularizers = Regularizers()

    traits = LossTraits("policy", whole_groups=False, needs_entropy=True,
                        sum_keys=(*_POLICY_SUMS, "clip", "dual_clip"))

    def required(self) -> tuple[str, ...]:
        return ("old_logp", "advantages", *self.reg.required())

    def normalizers(self, mini: Batch) -> list[float]:
        return [local_normalizer(mini.response_mask, self.reg.loss_agg)]

    def __call__(self, fwd: Forward, micro: Batch, norms: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        device = fwd.logp.device
        mask = micro.response_mask.to(device)  # [b, T]
        norm = float(norms[0])
        pg_loss, m = ppo_clip_loss(
            fwd.logp, micro.old_logp.to(device), micro.advantages.to(device), mask,
            clip_low=self.clip_low, clip_high=self.clip_high, clip_ratio_c=self.clip_ratio_c,
            loss_agg=self.reg.loss_agg, global_normalizer=norm, max_len=self.reg.max_len or micro.response_width,
        )
        loss, sums = self.reg.add(pg_loss, fwd, micro, norm)
        sums["clip"] = m["policy/clip_frac"] * sums["tokens"]
        sums["dual_clip"] = m["policy/dual_clip_frac"] * sums["tokens"]
        return loss, sums

    def metrics(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        tokens = max(sums["tokens"], 1.0)
        return self.reg.metrics(sums, steps) | {
            "policy/clip_frac": sums["clip"] / tokens,
            "policy/dual_clip_frac": sums["dual_clip"] / tokens,
        }


@dataclass(frozen=True)
class GVPOLoss:
    """GVPO (`prime.algo.policy_loss.gvpo_loss`), normalised by the mini-batch's number of groups.

    GVPO's reference sums e_i^2 / (K-1) over a micro-batch and divides by the number of
    accumulation steps, which makes the scale depend on the micro-batch size. Here the sum is
    divided by the number of groups in the mini-batch (all ranks together): the mean per-group
    loss, which equals the reference when each micro-batch holds one group and is the same however
    the groups are split.
    """

    beta: float = 0.1
    reg: Regularizers = Regularizers()

    traits = LossTraits("policy", whole_groups=True, needs_entropy=True,
                        sum_keys=(*_POLICY_SUMS, "residual_sq", "responses"))

    def required(self) -> tuple[str, ...]:
        return ("old_logp", "advantages", "group_ids", *self.reg.required())

    def normalizers(self, mini: Batch) -> list[float]:
        return [local_normalizer(mini.response_mask, self.reg.loss_agg), float(torch.unique(mini.group_ids).numel())]

    def __call__(self, fwd: Forward, micro: Batch, norms: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        device = fwd.logp.device
        mask = micro.response_mask.to(device)  # [b, T]
        centred = micro.advantages[:, 0].to(device)  # [b] R_i - mean_g R, broadcast over the tokens
        pg_loss, m = gvpo_loss(sequence_logp_sum(fwd.logp, mask), sequence_logp_sum(micro.old_logp.to(device), mask),
                               centred, micro.group_ids.to(device), self.beta)
        pg_loss = pg_loss / float(norms[1])
        loss, sums = self.reg.add(pg_loss, fwd, micro, float(norms[0]))
        sums["residual_sq"] = m["gvpo/residual_rms"] ** 2 * len(micro)
        sums["responses"] = float(len(micro))
        return loss, sums

    def metrics(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        out = self.reg.metrics(sums, steps)
        out["gvpo/loss"] = out["policy/pg_loss"]
        out["gvpo/residual_rms"] = (sums["residual_sq"] / max(sums["responses"], 1.0)) ** 0.5
        return out


@dataclass(frozen=True)
class PRMCrossEntropyLoss:
    """BCE(sigmoid(Q_i), acc_i), the mean over the mini-batch's responses (`prm_ce_loss`)."""

    beta: float = 0.05

    traits = LossTraits("prm", whole_groups=True, needs_entropy=False, sum_keys=("loss",))

    def required(self) -> tuple[str, ...]:
        return ("scores", "group_ids", "ref_logp")

    def normalizers(self, mini: Batch) -> list[float]:
        return [float(len(mini))]

    def __call__(self, fwd: Forward, micro: Batch, norms: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        device = fwd.logp.device
        loss, _ = prm_ce_loss(fwd.logp, micro.ref_logp.to(device), micro.response_mask.to(device),
                              micro.scores.to(device), self.beta, normalizer=float(norms[0]))
        return loss, {"loss": float(loss.detach())}

    def metrics(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        return {"prm/loss": sums["loss"] / steps if steps else 0.0}


@dataclass(frozen=True)
class PRMPairwiseLoss(PRMCrossEntropyLoss):
    """-log sigmoid(Q_w - Q_l) over within-group pairs with acc_w > acc_l (`prm_dpo_loss`); a
    mini-batch without such a pair takes no step."""

    def normalizers(self, mini: Batch) -> list[float]:
        return [float(better_pairs(mini.scores, mini.group_ids).sum())]

    def __call__(self, fwd: Forward, micro: Batch, norms: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        device = fwd.logp.device
        loss, _ = prm_dpo_loss(fwd.logp, micro.ref_logp.to(device), micro.response_mask.to(device),
                               micro.scores.to(device), micro.group_ids.to(device), self.beta,
                               normalizer=float(norms[0]))
        return loss, {"loss": float(loss.detach())}


def policy_loss(kind: str, *, clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float | None = 3.0,
                gvpo_beta: float = 0.1, reg: Regularizers = Regularizers()):
    """The policy loss named by `prime.algo.policy_loss_kind` ("ppo" or "gvpo")."""
    if kind == "ppo":
        return PPOClipLoss(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, reg=reg)
    if kind == "gvpo":
        return GVPOLoss(beta=gvpo_beta, reg=reg)
    raise ValueError(f"policy loss {kind!r} is not valid; choose one of 'ppo', 'gvpo'")


def prm_loss(kind: str, beta: float):
    """The PRM loss named by `prm.loss` ("ce" or "dpo")."""
    if kind == "ce":
        return PRMCrossEntropyLoss(beta=beta)
    if kind == "dpo":
        return PRMPairwiseLoss(beta=beta)
    raise ValueError(f"prm.loss={kind!r} is not valid; choose one of 'ce', 'dpo'")
