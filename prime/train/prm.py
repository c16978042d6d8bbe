"""The implicit process reward model trainer (shared/ALGORITHMS.md sections 1-2).

Holds the trainable PRM pi_phi (a causal LM in a DeepSpeed engine) and, with `ref="frozen"`, a
frozen copy of the same checkpoint as pi_ref (a plain HF model in eval mode). With
`ref="policy"` the caller passes the policy's old log-probs as `ref_logp` instead.

Under data parallelism every rank holds a shard of the batch made of whole groups (the DPO loss and
the ranking metric pair responses inside a group) and calls each method collectively. Losses are
normalised by global counts (responses for `ce`, within-group pairs for `dpo`) summed over
micro-batches and ranks, so the update does not depend on the split; the `batch_norm` reward
divisor is the max over all ranks, so rewards do not either.

The frozen reference is not part of `save_checkpoint`: it is the unchanged `model_path` and is
reloaded from there.
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

REFS = ("frozen", "policy")
PRM_LOSSES = ("ce", "dpo")
UPDATE_MODES = ("before", "after", "none")


def _better_pair_count(acc: torch.Tensor, group_ids: torch.Tensor) -> int:
    """Number of ordered pairs (w, l) in the same group with acc_w > acc_l."""
    same = group_ids.unsqueeze(1) == group_ids.unsqueeze(0)  # [B, B]
    better = acc.unsqueeze(1) > acc.unsqueeze(0)  # [B, B]
    return int((same & better).sum())


def _rank_counts(q: torch.Tensor, acc: torch.Tensor, group_ids: torch.Tensor) -> tuple[int, int]:
    """(pairs ordered correctly by Q, pairs) over within-group pairs with different acc."""
    pairs = (group_ids.unsqueeze(1) == group_ids.unsqueeze(0)) & (acc.unsqueeze(1) > acc.unsqueeze(0))  # [B, B]
    correct = pairs & (q.unsqueeze(1) > q.unsqueeze(0))  # [B, B]
    return int(correct.sum()), int(pairs.sum())


class ImplicitPRMTrainer:
    """Trainable implicit PRM with its reference, online update and token rewards.

    Args:
        model_path: HF checkpoint the PRM (and the frozen reference) start from.
        ref: "frozen" (a frozen copy of `model_path`) or "policy" (pass the policy's old_logp).
        beta: implicit-reward scale.
        lr, weight_decay, grad_clip, zero_stage, offload_optimizer, bf16, lr_warmup_steps,
            lr_schedule, total_steps, gradient_checkpointing: see `prime.train.engine.build_engine`.
        loss: "ce" (BCE of sigmoid(Q) against acc) or "dpo" (within-group pairs).
        granularity: "token" or "whole"; norm: "batch_norm" or "none" (token rewards).
        mini_batch_size: responses per optimizer step over all ranks (whole groups).
        max_tokens_per_micro_batch: budget on `rows x longest row` per forward/backward.
        temperature: logits are divided by it before the log-softmax (1.0 scores the plain LM).
        seed: torch seed set before the models are built.
    """

    def __init__(
        self,
        model_path: str,
        *,
        ref: str = "frozen",
        beta: float = 0.05,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        grad_clip: float = 10.0,
        loss: str = "ce",
        granularity: str = "token",
        norm: str = "batch_norm",
        mini_batch_size: int,
        max_tokens_per_micro_batch: int,
        zero_stage: int = 2,
        offload_optimizer: bool = False,
        bf16: bool = False,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        total_steps: int | None = None,
        gradient_checkpointing: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        from prime.algo.implicit_prm import GRANULARITIES, NORMS
        from prime.models.loading import load_model

        for name, value, valid in (
            ("ref", ref, REFS),
            ("loss", loss, PRM_LOSSES),
            ("granularity", granularity, GRANULARITIES),
            ("norm", norm, NORMS),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {tuple(valid)}")
        if mini_batch_size < 1 or max_tokens_per_micro_batch < 1:
            raise ValueError(
                f"mini_batch_size ({mini_batch_size}) and max_tokens_per_micro_batch "
                f"({max_tokens_per_micro_batch}) must be positive"
            )
        self.model_path = model_path
        self.ref = ref
        self.beta = beta
        self.loss = loss
        self.granularity = granularity
        self.norm = norm
        self.mini_batch_size = mini_batch_size
        self.max_tokens = max_tokens_per_micro_batch
        self.zero_stage = zero_stage
        self.temperature = temperature

        torch.manual_seed(seed)
        self.engine = build_engine(
            load_model(model_path, dtype="float32", device="cpu"),
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            zero_stage=zero_stage,
            offload_optimizer=offload_optimizer,
            bf16=bf16,
            lr_warmup_steps=lr_warmup_steps,
            lr_schedule=lr_schedule,
            total_steps=total_steps,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.device = self.engine.device
        self._caller = EngineCaller(self.engine, self.engine.module)
        self.ref_model = None
        if ref == "frozen":
            self.ref_model = load_model(model_path, dtype="bfloat16" if bf16 else "float32", device=self.device)
            self.ref_model.requires_grad_(False)

    # ------------------------------------------------------------------ log-probs and rewards
    def ref_logprobs(self, batch: dict) -> torch.Tensor:
        """Token log-probs under the frozen reference. # [B, T] CPU fp32"""
        if self.ref_model is None:
            raise ValueError("ref_logprobs needs ref='frozen'; with ref='policy' pass the policy's old_logp as ref_logp")
        return batched_logprobs(self.ref_model, batch, self.max_tokens, device=self.device, temperature=self.temperature)

    def prm_logprobs(self, batch: dict) -> torch.Tensor:
        """Token log-probs under the current PRM, no grad. # [B, T] CPU fp32"""
        self.engine.eval()
        return batched_logprobs(self._caller, batch, self.max_tokens, device=self.device, temperature=self.temperature)

    def _resolve_ref(self, batch: dict, ref_logp) -> torch.Tensor:
        if ref_logp is not None:
            ref_logp = torch.as_tensor(ref_logp, dtype=torch.float32).cpu()
            if ref_logp.shape != batch["response_mask"].shape:
                raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != response_mask {tuple(batch['response_mask'].shape)}")
            return ref_logp
        if self.ref == "policy":
            raise ValueError("ref='policy' needs ref_logp (the policy's old_logp of this batch)")
        return self.ref_logprobs(batch)

    def _rewards(self, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token rewards with the batch_norm divisor taken over all ranks. # [B, T]"""
        from prime.algo.implicit_prm import batch_norm_scale, token_rewards

        scale = None
        if self.norm == "batch_norm":
            raw = token_rewards(logp, ref_logp, mask, self.beta, self.granularity, norm="none")
            # max_i(m_i + eps) = max_i(m_i) + eps, so the all-reduced max is the global divisor.
            scale = all_reduce(batch_norm_scale(raw, mask).reshape(1).clone(), "max")[0]
        return token_rewards(logp, ref_logp, mask, self.beta, self.granularity, self.norm, norm_scale=scale)

    def token_rewards(self, batch: dict, ref_logp=None) -> torch.Tensor:
        """Process rewards r[i,t] of the batch under the current PRM. # [B, T] CPU fp32"""
        check_batch(batch)
        ref = self._resolve_ref(batch, ref_logp)
        return self._rewards(self.prm_logprobs(batch), ref, batch["response_mask"].float())

    # ------------------------------------------------------------------ update
    def _local_mini_batch_size(self) -> int:
        w = world_size()
        if self.mini_batch_size % w:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} is not divisible by the data-parallel world size {w}")
        return self.mini_batch_size // w

    def _score_metrics(self, logp, ref_logp, mask, acc, group_ids) -> dict[str, float]:
        """prm/acc and prm/rank_acc of Q = beta * sum_t q over all ranks."""
        from prime.algo.implicit_prm import sequence_rewards

        q = sequence_rewards(logp, ref_logp, mask, self.beta)  # [B]
        agree = float(((q > 0) == (acc > 0.5)).sum())
        correct, pairs = _rank_counts(q, acc, group_ids)
        t = all_reduce(torch.tensor([agree, float(q.numel()), float(correct), float(pairs)], dtype=torch.float64))
        return {
            "prm/acc": float(t[0] / max(t[1], 1.0)),
            "prm/rank_acc": float(t[2] / t[3]) if t[3] > 0 else float("nan"),
        }

    def _train(self, batch, acc, group_ids, ref_logp) -> tuple[dict[str, float], torch.Tensor]:
        """One pass over the batch, one optimizer step per mini-batch. Returns (metrics, logp)
        where logp [B, T] holds each row's PRM log-probs from the forward pass that computed its
        loss (before that mini-batch's step)."""
        from prime.algo.implicit_prm import prm_ce_loss, prm_dpo_loss

        b = check_batch(batch)
        mask_all = batch["response_mask"].float()  # [B, T]
        lengths = sequence_lengths(batch)
        logp_buf = torch.zeros_like(mask_all)  # [B, T]
        mini_batches = make_mini_batches(b, self._local_mini_batch_size(), group_ids.tolist())
        check_same_on_all_ranks(len(mini_batches), "the number of PRM mini-batches")

        loss_sum, grad_norms, lrs = 0.0, [], []
        self.engine.train()
        for mini in mini_batches:
            mini_t = torch.as_tensor(mini)
            if self.loss == "ce":
                count = float(len(mini))
            else:
                count = float(_better_pair_count(acc[mini_t], group_ids[mini_t]))
            normalizer = float(all_reduce(torch.tensor([count], dtype=torch.float64))[0])
            micro = make_micro_batches([lengths[i] for i in mini], self.max_tokens, group_ids[mini_t].tolist())
            micro = [[mini[j] for j in mb] for mb in micro]
            if normalizer == 0:
                # No pair with different accuracies anywhere (dpo): nothing to learn. Still record
                # the scores for the rewards; skip the step on every rank alike.
                with torch.no_grad():
                    self.engine.eval()
                    for rows in micro:
                        logp_buf[torch.as_tensor(rows)] = forward_logprobs(
                            self._caller, batch, rows, device=self.device, temperature=self.temperature
                        ).float().cpu()
                    self.engine.train()
                continue
            n_micro = synced_max(len(micro))

            def loss_fn(k: int) -> torch.Tensor:
                nonlocal loss_sum
                if k >= len(micro):
                    return padding_loss(self._caller, batch, micro[0], device=self.device, temperature=self.temperature)
                rows = micro[k]
                idx = torch.as_tensor(rows)
                logp = forward_logprobs(self._caller, batch, rows, device=self.device, temperature=self.temperature)
                mask = mask_all[idx].to(self.device)
                ref = ref_logp[idx].to(self.device)
                acc_mb = acc[idx].to(self.device)
                if self.loss == "ce":
                    loss, _ = prm_ce_loss(logp, ref, mask, acc_mb, self.beta, normalizer=normalizer)
                else:
                    loss, _ = prm_dpo_loss(logp, ref, mask, acc_mb, group_ids[idx].to(self.device), self.beta, normalizer=normalizer)
                logp_buf[idx] = logp.detach().float().cpu()
                loss_sum += float(loss.detach())
                return loss

            backward_micro_batches(self.engine, n_micro, loss_fn)
            lrs.append(float(self.engine.get_lr()[0]))
            grad_norms.append(optimizer_step(self.engine))

        steps = len(grad_norms)
        total_loss = float(all_reduce(torch.tensor([loss_sum], dtype=torch.float64))[0])
        metrics = {
            "prm/loss": total_loss / steps if steps else 0.0,
            "prm/grad_norm": sum(grad_norms) / steps if steps else 0.0,
            "prm/lr": lrs[-1] if lrs else float(self.engine.get_lr()[0]),
            "prm/num_steps": float(steps),
        }
        metrics.update(self._score_metrics(logp_buf, ref_logp, mask_all, acc, group_ids))
        return metrics, logp_buf

    @staticmethod
    def _labels(batch: dict, acc, group_ids) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch["input_ids"].shape[0]
        acc = torch.as_tensor(acc, dtype=torch.float32).cpu().reshape(-1)
        group_ids = torch.as_tensor(group_ids, dtype=torch.long).cpu().reshape(-1)
        if acc.numel() != b or group_ids.numel() != b:
            raise ValueError(f"acc ({acc.numel()}) and group_ids ({group_ids.numel()}) need one entry per response ({b})")
        return acc, group_ids

    def update(self, batch: dict, acc, group_ids, ref_logp=None) -> dict[str, float]:
        """Train the PRM on the batch (one optimizer step per mini-batch). Returns metrics:
        prm/loss, prm/acc, prm/rank_acc (scores from the training forward passes), prm/grad_norm, prm/lr."""
        acc, group_ids = self._labels(batch, acc, group_ids)
        metrics, _ = self._train(batch, acc, group_ids, self._resolve_ref(batch, ref_logp))
        return metrics

    def update_and_rewards(
        self, batch: dict, acc, group_ids, mode: str = "before", ref_logp=None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """PRM update and token rewards of the batch, in the order `mode` names.

        before: update on the batch, then rewards from the updated PRM.
        after: rewards of each mini-batch from the forward pass that computes its loss (before
            its step), normalised over the whole batch once all mini-batches are done.
        none: rewards only (frozen PRM); metrics hold prm/acc and prm/rank_acc.
        Returns (rewards [B, T] CPU fp32, metrics).
        """
        if mode not in UPDATE_MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of {UPDATE_MODES}")
        acc, group_ids = self._labels(batch, acc, group_ids)
        ref = self._resolve_ref(batch, ref_logp)
        mask = batch["response_mask"].float()
        if mode == "after":
            metrics, logp = self._train(batch, acc, group_ids, ref)
        else:
            metrics = self._train(batch, acc, group_ids, ref)[0] if mode == "before" else {}
            logp = self.prm_logprobs(batch)
            if mode == "none":
                metrics = self._score_metrics(logp, ref, mask, acc, group_ids)
        return self._rewards(logp, ref, mask), metrics

    # ------------------------------------------------------------------ weights and checkpoints
    def named_weights(self) -> dict[str, torch.Tensor]:
        """Full HF-named PRM weights on the CPU, `lm_head.weight` included (collective under ZeRO-3)."""
        return gather_named_weights(self.engine.module, self.zero_stage)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint of the PRM with optimizer and LR-scheduler state (collective)."""
        save_engine_checkpoint(self.engine, path)

    def load_checkpoint(self, path: str) -> None:
        load_engine_checkpoint(self.engine, path)

    def save_hf(self, path: str) -> None:
        """Plain HF folder of the PRM + the tokenizer of `model_path` (collective; rank 0 writes)."""
        save_hf_folder(self.engine, self.zero_stage, self.model_path, path)
