"""The implicit PRM online: a `Trainer` with a PRM loss, its frozen reference, and token rewards.

docs/algorithms.md sections 1-2. The PRM is a causal LM; its log-ratio against the reference is
the implicit process reward r[i,t] = beta * (log pi_prm - log pi_ref)[i,t]. Each RL step it is
updated from the verifier's outcomes and then scores the batch, in the order `prm.update` names:

- before: update on the batch, then rewards from the updated PRM (the default);
- after: rewards of each mini-batch from the forward pass that computes its loss, before its step
  (the PRIME authors' cheaper order);
- none: rewards only, the PRM stays frozen (ablations).

The reference log-probs are computed once per step (by the frozen reference, or taken from the
policy's old log-probs with `prm.ref=policy`) and serve both the update and the rewards. The
batch_norm divisor is taken over all data-parallel ranks, so rewards do not depend on the split.
"""

from __future__ import annotations

import torch

from prime.algo.implicit_prm import GRANULARITIES, NORMS, batch_norm_scale, better_pairs, rank_counts, sequence_rewards
from prime.algo.implicit_prm import token_rewards as token_rewards_of
from prime.data.batch import Batch
from prime.models.loading import load_model
from prime.models.memory import REF_PLACEMENTS
from prime.models.packing import use_packed_attention
from prime.train.engine import EngineSettings, all_reduce, build_frozen_engine, frozen_config
from prime.train.losses import prm_loss
from prime.train.trainer import EngineCaller, Trainer

REFS = ("frozen", "policy")
UPDATE_MODES = ("before", "after", "none")


class ImplicitPRM:
    """Online update and token rewards of an implicit PRM.

    Args:
        trainer: the PRM's trainer (its loss is a PRM loss, `prime/train/losses.py`).
        ref_model: the frozen reference (a module, or an `EngineCaller` over a ZeRO-3 engine); None
            when the batch brings `ref_logp` (`prm.ref=policy`).
        beta: implicit-reward scale; granularity: "token" or "whole"; norm: "batch_norm" or "none".
    """

    def __init__(self, trainer: Trainer, ref_model: torch.nn.Module | None, *, beta: float,
                 granularity: str = "token", norm: str = "batch_norm"):
        for name, value, valid in (("granularity", granularity, GRANULARITIES), ("norm", norm, NORMS)):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {tuple(valid)}")
        self.trainer, self.ref_model = trainer, ref_model
        self.beta, self.granularity, self.norm = beta, granularity, norm

    def with_reference(self, batch: Batch) -> Batch:
        """The batch with `ref_logp`, computed by the frozen reference unless the batch has it."""
        if batch.ref_logp is not None:
            return batch
        if self.ref_model is None:
            raise ValueError("prm.ref=policy needs ref_logp in the batch (the policy's old log-probs)")
        return batch.replace(ref_logp=self.trainer.logprobs(batch, model=self.ref_model))

    def rewards(self, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token rewards with the batch_norm divisor taken over all ranks. # [B, T]"""
        scale = None
        if self.norm == "batch_norm":
            raw = token_rewards_of(logp, ref_logp, mask, self.beta, self.granularity, norm="none")
            # max_i(m_i + eps) = max_i(m_i) + eps, so the all-reduced max is the global divisor.
            scale = all_reduce(batch_norm_scale(raw, mask).reshape(1).clone(), "max")[0]
        return token_rewards_of(logp, ref_logp, mask, self.beta, self.granularity, self.norm, norm_scale=scale)

    def score_metrics(self, logp: torch.Tensor, batch: Batch) -> dict[str, float]:
        """prm/acc (sigmoid(Q) > 0.5 agrees with acc > 0.5) and prm/rank_acc (within-group pairs
        ordered by Q as by acc) of Q = beta * sum_t q, over all ranks."""
        q = sequence_rewards(logp, batch.ref_logp, batch.response_mask, self.beta)  # [B]
        agree = float(((q > 0) == (batch.scores > 0.5)).sum())
        correct, pairs = rank_counts(q, better_pairs(batch.scores, batch.group_ids))
        t = all_reduce(torch.tensor([agree, float(q.numel()), float(correct), float(pairs)], dtype=torch.float64))
        return {
            "prm/acc": float(t[0] / max(float(t[1]), 1.0)),
            "prm/rank_acc": float(t[2] / t[3]) if t[3] > 0 else float("nan"),
        }

    def log_ratios(self, batch: Batch) -> torch.Tensor:
        """q = log pi_prm - log pi_ref of every response token under the current PRM, no grad. # [B, T]"""
        batch = self.with_reference(batch)
        return (self.trainer.logprobs(batch) - batch.ref_logp) * batch.response_mask

    def update_and_rewards(self, batch: Batch, mode: str = "before") -> tuple[torch.Tensor, dict[str, float]]:
        """PRM update (per `mode`) and token rewards of the batch. Returns (rewards [B, T] CPU fp32,
        metrics: prm/loss, prm/grad_norm, prm/lr, prm/num_steps unless mode=none, prm/acc and
        prm/rank_acc from the scores the rewards came from (before: the training passes))."""
        if mode not in UPDATE_MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of {UPDATE_MODES}")
        batch.require("scores", "group_ids")
        batch = self.with_reference(batch)
        if mode == "none":
            logp = self.trainer.logprobs(batch)
            metrics = self.score_metrics(logp, batch)
        else:
            metrics, logp = self.trainer.update(batch)
            metrics |= self.score_metrics(logp, batch)
            if mode == "before":
                logp = self.trainer.logprobs(batch)
        return self.rewards(logp, batch.ref_logp, batch.response_mask), metrics


def build_reference(model_path: str, settings: EngineSettings, placement: str, device: torch.device,
                    trust_remote_code: bool = False, padding_free: bool = False):
    """The frozen reference, placed as `placement` says (REF_PLACEMENTS):

    - replicated: a whole copy on every rank's device (2 bytes x params in bf16: 15 GB for 7B);
    - sharded: ZeRO-3 partitions over the PRM's ranks (15 GB / world per GPU), gathered one layer
      at a time in each forward (collective: every rank scores the same number of passes, which
      `Trainer.logprobs` guarantees);
    - offload: the same partitions in pinned host memory (nothing on the GPU between passes).

    With `padding_free` the model is made ready for packed passes (`use_packed_attention`).
    Returns something `Trainer.logprobs(batch, model=...)` can call.
    """
    if placement not in REF_PLACEMENTS:
        raise ValueError(f"ref placement {placement!r} is not valid; choose one of {REF_PLACEMENTS}")
    if placement == "replicated":
        ref = load_model(model_path, dtype=settings.dtype, device=device, trust_remote_code=trust_remote_code)
        ref.requires_grad_(False)
        if padding_free:
            use_packed_attention(ref)
        return ref
    from prime.train.zero3 import build_partitioned_model

    config = frozen_config(settings.bf16, offload_params=placement == "offload")
    model = build_partitioned_model(model_path, settings.dtype, config, trust_remote_code)
    if padding_free:
        use_packed_attention(model)
    engine = build_frozen_engine(model, config)
    return EngineCaller(engine, engine.module)


def build_implicit_prm(model_path: str, settings: EngineSettings, *, ref: str = "frozen", beta: float = 0.05,
                       loss: str = "ce", granularity: str = "token", norm: str = "batch_norm",
                       mini_batch_size: int, max_tokens_per_micro_batch: int, temperature: float = 1.0,
                       seed: int = 0, trust_remote_code: bool = False,
                       ref_placement: str = "replicated", padding_free: bool = False,
                       share_prompts: bool = False) -> ImplicitPRM:
    """The PRM trainer started from `model_path` and, with ref="frozen", a frozen copy of it placed
    as `ref_placement` says (see `build_reference`); both run padding-free passes with `padding_free`,
    packing each prompt once for its samples with `share_prompts` (`Trainer`)."""
    if ref not in REFS:
        raise ValueError(f"ref={ref!r} is not valid; choose one of {REFS}")
    if ref_placement not in REF_PLACEMENTS:
        raise ValueError(f"ref_placement={ref_placement!r} is not valid; choose one of {REF_PLACEMENTS}")
    trainer = Trainer(model_path, prm_loss(loss, beta), settings, mini_batch_size=mini_batch_size,
                      max_tokens_per_micro_batch=max_tokens_per_micro_batch, temperature=temperature, seed=seed,
                      trust_remote_code=trust_remote_code, padding_free=padding_free, share_prompts=share_prompts)
    ref_model = None
    if ref == "frozen":
        ref_model = build_reference(model_path, settings, ref_placement, trainer.device, trust_remote_code,
                                    padding_free)
    return ImplicitPRM(trainer, ref_model, beta=beta, granularity=granularity, norm=norm)
