"""The policy trainer: log-probs and PPO-clip / GVPO updates of a causal LM with DeepSpeed.

A plain class (no Ray); `workers/policy.py` only makes it remote. Under data parallelism every
rank builds one `PolicyTrainer` after torch.distributed is initialised and calls every method
with its own shard of the batch (whole groups per rank for GVPO); each method is collective.

Why the update does not depend on how the batch is split
--------------------------------------------------------
A mini-batch (`mini_batch_size` responses over all ranks, one optimizer step) is cut into
micro-batches by token budget. Each micro-batch loss is its partial SUM divided by the GLOBAL
normaliser of the mini-batch: for PPO the `loss_agg` count (valid tokens or sequences) summed over
micro-batches and all-reduced over ranks; for GVPO the number of groups in the mini-batch, all
ranks together. The micro-batch losses therefore add up to the full mini-batch loss, and the
accumulated gradient is its gradient (the engine sets the accumulation boundary by hand and
undoes DeepSpeed's rank averaging, see `prime/train/engine.py`).

GVPO's reference sums e_i^2 / (K-1) over a micro-batch and divides by the number of accumulation
steps, which makes the scale depend on the micro-batch size. Here the sum is divided by the
number of groups instead (the mean per-group loss), which equals the reference when each
micro-batch holds one group and is the same however the groups are split.
"""

from __future__ import annotations

import torch

from prime.train.batching import make_micro_batches, make_mini_batches
from prime.train.engine import (
    all_reduce,
    backward_micro_batches,
    build_engine,
    gather_named_weights,
    load_engine_checkpoint,
    optimizer_step,
    save_engine_checkpoint,
    save_hf_folder,
    world_size,
)
from prime.train.forward import (
    EngineCaller,
    batched_logprobs,
    check_batch,
    check_same_on_all_ranks,
    forward_logprobs,
    padding_loss,
    sequence_lengths,
    synced_max,
)

LOSS_KINDS = ("ppo", "gvpo")


def _as_tensor(value, dtype) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).cpu()


class PolicyTrainer:
    """Trainable policy: a DeepSpeed engine around an HF causal LM plus the update loop.

    Args:
        model_path: HF checkpoint folder or hub id (the SFT model).
        lr, weight_decay, grad_clip, zero_stage, offload_optimizer, bf16, lr_warmup_steps,
            lr_schedule, total_steps, min_lr_ratio, gradient_checkpointing: see `build_engine`.
        loss_kind: "ppo" (clipped surrogate on token advantages) or "gvpo" (group scores).
        clip_low, clip_high, clip_ratio_c, loss_agg: PPO-clip settings (`prime.algo.policy_loss`).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        kl_coef, kl_type: KL-to-reference loss term (needs `ref_logp` in the batch when > 0).
        gvpo_beta: GVPO's beta.
        ppo_epochs: passes over the batch per `update`.
        mini_batch_size: responses per optimizer step, summed over data-parallel ranks.
        max_tokens_per_micro_batch: budget on `rows x longest row` per forward/backward.
        temperature: sampling temperature; logits are divided by it, as in the sampler.
        max_response_len: T_max of `seq-mean-token-sum-norm`; None uses the batch's response width.
        seed: torch seed set before the model is built.
    """

    def __init__(
        self,
        model_path: str,
        *,
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        zero_stage: int = 2,
        offload_optimizer: bool = False,
        bf16: bool = False,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        loss_kind: str = "ppo",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        clip_ratio_c: float | None = 3.0,
        loss_agg: str = "token-mean",
        entropy_coef: float = 0.0,
        kl_coef: float = 0.0,
        kl_type: str = "k3",
        gvpo_beta: float = 0.1,
        ppo_epochs: int = 1,
        mini_batch_size: int,
        max_tokens_per_micro_batch: int,
        temperature: float = 1.0,
        gradient_checkpointing: bool = False,
        max_response_len: int | None = None,
        seed: int = 0,
    ):
        from prime.algo.kl import KL_KINDS
        from prime.algo.policy_loss import LOSS_AGG_MODES
        from prime.models.loading import load_model

        if loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind={loss_kind!r} is not valid; choose one of {LOSS_KINDS}")
        if loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg={loss_agg!r} is not valid; choose one of {LOSS_AGG_MODES}")
        if kl_coef > 0 and kl_type not in KL_KINDS:
            raise ValueError(f"kl_type={kl_type!r} is not valid; choose one of {KL_KINDS}")
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        if mini_batch_size < 1 or max_tokens_per_micro_batch < 1:
            raise ValueError(
                f"mini_batch_size ({mini_batch_size}) and max_tokens_per_micro_batch "
                f"({max_tokens_per_micro_batch}) must be positive"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")

        self.model_path = model_path
        self.zero_stage = zero_stage
        self.loss_kind = loss_kind
        self.clip_low, self.clip_high, self.clip_ratio_c = clip_low, clip_high, clip_ratio_c
        self.loss_agg = loss_agg
        self.entropy_coef = entropy_coef
        self.kl_coef, self.kl_type = kl_coef, kl_type
        self.gvpo_beta = gvpo_beta
        self.ppo_epochs = ppo_epochs
        self.mini_batch_size = mini_batch_size
        self.max_tokens = max_tokens_per_micro_batch
        self.temperature = temperature
        self.max_response_len = max_response_len

        torch.manual_seed(seed)
        model = load_model(model_path, dtype="float32", device="cpu")
        self.engine = build_engine(
            model,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            zero_stage=zero_stage,
            offload_optimizer=offload_optimizer,
            bf16=bf16,
            lr_warmup_steps=lr_warmup_steps,
            lr_schedule=lr_schedule,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.device = self.engine.device
        self._caller = EngineCaller(self.engine, self.engine.module)

    # ------------------------------------------------------------------ log-probs
    def compute_logprobs(self, batch: dict) -> torch.Tensor:
        """Token log-probs of the responses under the current weights, no grad. # [B, T] CPU fp32"""
        self.engine.eval()
        return batched_logprobs(self._caller, batch, self.max_tokens, device=self.device, temperature=self.temperature)

    # ------------------------------------------------------------------ update
    def _local_mini_batch_size(self) -> int:
        w = world_size()
        if self.mini_batch_size % w:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} is not divisible by the data-parallel world size {w}")
        return self.mini_batch_size // w

    def update(self, batch: dict) -> dict[str, float]:
        """`ppo_epochs` passes over the batch, one optimizer step per mini-batch.

        batch: the packed layout plus old_logp [B, T] and, for "ppo", advantages [B, T]; for
        "gvpo", scores [B] and group_ids [B]; ref_logp [B, T] when kl_coef > 0.
        Returns metrics (Python floats) averaged over the optimizer steps.
        """
        from prime.algo.kl import kl_penalty
        from prime.algo.policy_loss import aggregate_loss, gvpo_loss, local_normalizer, ppo_clip_loss, sequence_logp_sum

        needed = ["old_logp"] + (["advantages"] if self.loss_kind == "ppo" else ["scores", "group_ids"])
        if self.kl_coef > 0:
            needed.append("ref_logp")
        b = check_batch(batch, required=["input_ids", "attention_mask", "position_ids", "response_mask", *needed])
        mask_all = batch["response_mask"].float()  # [B, T]
        full_t = mask_all.shape[1]
        max_len = self.max_response_len or full_t
        old_logp_all = _as_tensor(batch["old_logp"], torch.float32)  # [B, T]
        group_ids = _as_tensor(batch["group_ids"], torch.long) if "group_ids" in batch else None  # [B]
        gvpo = self.loss_kind == "gvpo"
        lengths = sequence_lengths(batch)

        mini_batches = make_mini_batches(b, self._local_mini_batch_size(), group_ids.tolist() if gvpo else None)
        check_same_on_all_ranks(len(mini_batches), "the number of mini-batches")

        # Local sums; all-reduced once at the end.
        sums = dict(loss=0.0, pg_loss=0.0, tokens=0.0, clip=0.0, dual_clip=0.0, approx_kl=0.0, entropy=0.0, kl=0.0,
                    responses=0.0, residual_sq=0.0)
        grad_norms, lrs = [], []
        self.engine.train()
        for _ in range(self.ppo_epochs):
            for mini in mini_batches:
                mask_mb = mask_all[mini]  # [b_mb, T]
                norm_t = torch.tensor([local_normalizer(mask_mb, self.loss_agg), 0.0])
                if gvpo:
                    norm_t[1] = float(torch.unique(group_ids[mini]).numel())
                all_reduce(norm_t)
                agg_norm, n_groups = float(norm_t[0]), float(norm_t[1])
                micro = make_micro_batches(
                    [lengths[i] for i in mini], self.max_tokens, group_ids[mini].tolist() if gvpo else None
                )
                micro = [[mini[j] for j in mb] for mb in micro]
                n_micro = synced_max(len(micro))

                def loss_fn(k: int) -> torch.Tensor:
                    if k >= len(micro):
                        return padding_loss(self._caller, batch, micro[0], device=self.device, temperature=self.temperature)
                    rows = micro[k]
                    idx = torch.as_tensor(rows)
                    logp, entropy = forward_logprobs(
                        self._caller, batch, rows, device=self.device, temperature=self.temperature, return_entropy=True
                    )  # [b, T] each
                    mask = mask_all[idx].to(self.device)  # [b, T]
                    old_logp = old_logp_all[idx].to(self.device)  # [b, T]
                    if gvpo:
                        pg_loss, m = gvpo_loss(
                            sequence_logp_sum(logp, mask),
                            sequence_logp_sum(old_logp, mask),
                            _as_tensor(batch["scores"], torch.float32)[idx].to(self.device),
                            group_ids[idx].to(self.device),
                            self.gvpo_beta,
                        )
                        pg_loss = pg_loss / n_groups
                        residual_rms = m["gvpo/residual_rms"]
                        sums["residual_sq"] += residual_rms**2 * len(rows)
                        sums["responses"] += len(rows)
                    else:
                        advantages = _as_tensor(batch["advantages"], torch.float32)[idx].to(self.device)
                        pg_loss, m = ppo_clip_loss(
                            logp, old_logp, advantages, mask,
                            clip_low=self.clip_low, clip_high=self.clip_high, clip_ratio_c=self.clip_ratio_c,
                            loss_agg=self.loss_agg, global_normalizer=agg_norm, max_len=max_len,
                        )
                    loss = pg_loss
                    ntok = float(mask.sum())
                    if self.entropy_coef != 0.0:
                        loss = loss - self.entropy_coef * aggregate_loss(entropy, mask, self.loss_agg, agg_norm, max_len)
                    if self.kl_coef > 0:
                        ref_logp = _as_tensor(batch["ref_logp"], torch.float32)[idx].to(self.device)
                        kl = kl_penalty(logp, ref_logp, self.kl_type)  # [b, T]
                        loss = loss + self.kl_coef * aggregate_loss(kl, mask, self.loss_agg, agg_norm, max_len)
                        sums["kl"] += float((kl.detach() * mask).sum())
                    with torch.no_grad():
                        sums["loss"] += float(loss.detach())
                        sums["pg_loss"] += float(pg_loss.detach())
                        sums["tokens"] += ntok
                        sums["entropy"] += float((entropy.detach() * mask).sum())
                        sums["approx_kl"] += float(((old_logp - logp.detach()) * mask).sum())
                        if not gvpo:
                            sums["clip"] += m["policy/clip_frac"] * ntok
                            sums["dual_clip"] += m["policy/dual_clip_frac"] * ntok
                    return loss

                backward_micro_batches(self.engine, n_micro, loss_fn)
                lrs.append(float(self.engine.get_lr()[0]))
                grad_norms.append(optimizer_step(self.engine))

        keys = list(sums)
        totals = all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        t = dict(zip(keys, totals.tolist()))
        steps = len(grad_norms)
        tokens = max(t["tokens"], 1.0)
        metrics = {
            "policy/loss": t["loss"] / steps,
            "policy/pg_loss": t["pg_loss"] / steps,
            "policy/approx_kl": t["approx_kl"] / tokens,
            "policy/entropy": t["entropy"] / tokens,
            "policy/grad_norm": sum(grad_norms) / steps,
            "policy/lr": lrs[-1],
            "policy/num_steps": float(steps),
        }
        if gvpo:
            metrics["gvpo/loss"] = metrics["policy/pg_loss"]
            metrics["gvpo/residual_rms"] = (t["residual_sq"] / max(t["responses"], 1.0)) ** 0.5
        else:
            metrics["policy/clip_frac"] = t["clip"] / tokens
            metrics["policy/dual_clip_frac"] = t["dual_clip"] / tokens
        if self.kl_coef > 0:
            metrics["policy/kl"] = t["kl"] / tokens
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints
    def named_weights(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on the CPU, `lm_head.weight` included (collective under ZeRO-3)."""
        return gather_named_weights(self.engine.module, self.zero_stage)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint with optimizer and LR-scheduler state (collective)."""
        save_engine_checkpoint(self.engine, path)

    def load_checkpoint(self, path: str) -> None:
        load_engine_checkpoint(self.engine, path)

    def save_hf(self, path: str) -> None:
        """Plain HF folder + the tokenizer of `model_path` (collective; rank 0 writes)."""
        save_hf_folder(self.engine, self.zero_stage, self.model_path, path)

