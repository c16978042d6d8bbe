"""The trainer: a causal LM in a DeepSpeed engine, updated by the loss it is given. It knows no algorithm.

A plain class (no Ray); `workers/` only makes it remote. Under data parallelism every rank builds
one `Trainer` after torch.distributed is initialised and calls every method with its own shard of
the batch (whole groups per rank); each method is collective.

What it owns: the engine (AdamW, clipping, LR schedule, ZeRO), the plan that cuts a batch into
mini-batches (one optimizer step each) and micro-batches (one forward/backward each, by token
budget), the no-grad log-prob pass, checkpoints and the HF export. What a loss owns (see
`prime/train/losses.py`): which batch fields it reads, its normalisers, its value and its metrics.

Why the update does not depend on how the batch is split
--------------------------------------------------------
Each micro-batch loss is its partial SUM divided by the GLOBAL normaliser of its mini-batch: the
loss's local counts (valid tokens, sequences, groups or pairs) summed over all ranks. The
micro-batch losses therefore add up to the full mini-batch loss, and the accumulated gradient is
its gradient (the engine sets the accumulation boundary by hand and undoes DeepSpeed's rank
averaging, see `prime/train/engine.py`).

The same plan serves the no-grad pass and the update, so the log-probs `logprobs` returns for a
batch are bit for bit those of the update's first forward pass while the weights are unchanged:
an on-policy ratio is exactly 1, and a PRM that still equals its reference scores exactly 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from prime.data.batch import Batch
from prime.models.loading import load_model
from prime.models.logprobs import response_logprobs
from prime.models.packing import PACKED_ATTENTION, packed_tokens, use_packed_attention
from prime.train.batching import make_micro_batches, make_mini_batches
from prime.train.engine import (
    EngineSettings,
    accelerator_device,
    all_reduce,
    backward_micro_batches,
    build_engine,
    ds_config,
    ensure_distributed,
    gather_named_weights,
    iter_weight_buckets,
    load_engine_checkpoint,
    offload_engine_states,
    optimizer_step,
    reload_engine_states,
    save_engine_checkpoint,
    save_hf_folder,
    streamed_weight_specs,
    world_size,
)

Plan = list[list[list[int]]]  # mini-batches -> micro-batches -> row indices


@dataclass(frozen=True)
class Forward:
    """One micro-batch's forward pass, at the batch's full response width T."""

    logp: torch.Tensor  # [b, T] token log-probs, on the device, with the graph
    entropy: torch.Tensor | None  # [b, T] when the loss asked for it


@dataclass(frozen=True)
class LossTraits:
    """What the trainer must know of a loss before calling it."""

    section: str
    """Metric section of the trainer's own metrics (`policy/grad_norm`, `prm/lr`, ...)."""
    whole_groups: bool
    """Mini- and micro-batches keep every group (rows with one group id) together."""
    needs_entropy: bool
    """The forward pass also computes token entropies."""
    sum_keys: tuple[str, ...]
    """The metric sums `__call__` may return; the trainer adds them over micro-batches and ranks."""


class Loss(Protocol):
    """What the trainer needs from a loss (`prime/train/losses.py` has the four the project uses)."""

    traits: LossTraits

    def required(self) -> tuple[str, ...]:
        """Batch fields the loss reads (besides the packed layout)."""

    def normalizers(self, mini: Batch) -> list[float]:
        """This rank's counts for one mini-batch; the trainer sums them over ranks. A mini-batch
        whose first normaliser is 0 on every rank has nothing to learn and takes no step."""

    def __call__(self, fwd: Forward, micro: Batch, norms: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the mini-batch loss, and its metric sums."""

    def metrics(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        """Logged metrics from the sums over all micro-batches and ranks of one update."""


class EngineCaller:
    """Calls a DeepSpeed engine with the keyword arguments `response_logprobs` uses.

    The engine's own `forward(*inputs, **kwargs)` hides whether the wrapped model accepts
    `logits_to_keep` (which saves the LM head on prompt positions), so this adapter exposes it.
    Other keyword arguments (the packed sequences' `cu_seq_lens_q/k`, ...) go to the model as given.
    """

    def __init__(self, engine, module: torch.nn.Module):
        self.engine = engine
        try:
            self._keep = "logits_to_keep" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            self._keep = False

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0, **kwargs):
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache)
        if self._keep and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):  # an int or an index tensor
            kwargs["logits_to_keep"] = logits_to_keep
        return self.engine(**kwargs)

    __call__ = forward


def forward_rows(model, batch: Batch, rows: Sequence[int], *, device: torch.device, temperature: float = 1.0,
                 entropy: bool = False, padding_free: bool = False, share_prompts: bool = False) -> Forward:
    """Log-probs (and entropies) of rows `rows`, trimmed of all-padding columns for the pass (or packed
    into one row without padding, `padding_free`, each prompt once for its consecutive rows with
    `share_prompts`) and padded back to the batch's response width T. Keeps the graph."""
    ids, attn, pos, rmask = batch.select(rows).trimmed()
    out = response_logprobs(model, ids.to(device), attn.to(device), pos.to(device), rmask.to(device),
                            temperature=temperature, return_entropy=entropy, padding_free=padding_free,
                            share_prompts=share_prompts)
    pad = batch.response_width - rmask.shape[1]

    def widen(x: torch.Tensor) -> torch.Tensor:  # [b, T'] -> [b, T]
        return torch.nn.functional.pad(x, (0, pad)) if pad else x

    if entropy:
        return Forward(widen(out[0]), widen(out[1]))
    return Forward(widen(out), None)


def pass_tokens(batch: Batch, rows: Sequence[int], padding_free: bool = False, share_prompts: bool = False) -> int:
    """Tokens one forward over `rows` runs through the model (`forward_rows`): rows x trimmed width
    padded; their real tokens padding-free, each prompt once for the consecutive rows that share it
    with `share_prompts`."""
    ids, attn, pos, rmask = batch.select(rows).trimmed()
    if not padding_free:
        return int(attn.numel())
    return packed_tokens(ids, attn, pos, rmask.shape[1], share_prompts)


def synced_max(n: int) -> int:
    """Largest `n` over the data-parallel ranks."""
    return int(all_reduce(torch.tensor([n], dtype=torch.long), "max").item())


def check_same_on_all_ranks(n: int, what: str) -> None:
    """Raise when `n` differs between ranks (every rank must take the same optimizer steps)."""
    if world_size() > 1 and synced_max(n) != -synced_max(-n):
        raise ValueError(f"{what} differs between data-parallel ranks; give every rank the same number of responses")


def make_plan(batch: Batch, mini_batch_size: int, max_tokens: int, whole_groups: bool,
              padding_free: bool = False, share_prompts: bool = False) -> Plan:
    """Mini-batches of about `mini_batch_size` rows, each cut into micro-batches by token budget
    (on rows x longest row, or on real tokens when the passes are padding-free). With `share_prompts`
    a group's rows (a prompt's samples) stay in one micro-batch where the batch has group ids, so
    its prompt is packed once."""
    if whole_groups:
        batch.require("group_ids")
    gids = batch.group_ids.tolist() if whole_groups else None
    units = gids  # rows that must share a micro-batch
    if units is None and share_prompts and batch.group_ids is not None:
        units = batch.group_ids.tolist()
    lengths = batch.lengths()
    plan = []
    for mini in make_mini_batches(len(batch), mini_batch_size, gids):
        micro = make_micro_batches([lengths[i] for i in mini], max_tokens, [units[i] for i in mini] if units else None,
                                   padding_free=padding_free)
        plan.append([[mini[j] for j in mb] for mb in micro])
    return plan


def load_trainable(model_path: str, settings: EngineSettings, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model in its training dtype: under ZeRO-3 built partitioned (`prime/train/zero3.py`, no
    rank holds it whole), otherwise loaded whole onto this rank's device."""
    if settings.zero_stage == 3:
        from prime.train.zero3 import build_partitioned_model

        return build_partitioned_model(model_path, settings.dtype, ds_config(settings), trust_remote_code)
    ensure_distributed()
    return load_model(model_path, dtype=settings.dtype, device=accelerator_device(), trust_remote_code=trust_remote_code)


class Trainer:
    """A trainable causal LM: the DeepSpeed engine plus the update loop, for any `Loss`.

    Args:
        model_path: HF checkpoint folder or hub id the weights start from.
        loss: what to minimise (see `prime/train/losses.py`).
        settings: the engine's optimiser, schedule and ZeRO settings.
        mini_batch_size: rows per optimizer step, summed over data-parallel ranks.
        max_tokens_per_micro_batch: budget on `rows x longest row` per forward/backward (on the sum of
            the rows' lengths with `padding_free`).
        epochs: passes over the batch per `update`.
        temperature: logits are divided by it, as in the sampler.
        seed: torch seed set before the model is built.
        trust_remote_code: passed to transformers when loading the checkpoint.
        padding_free: every pass runs its micro-batch's rows packed into one row, no padding
            (`prime.models.packing`; runs set it from `actor.padding_free` / `prm.padding_free`). A
            reference model given to `logprobs` must then have been through `use_packed_attention`.
        share_prompts: with `padding_free`, a prompt's consecutive samples pack it once
            (`actor.share_prompts` / `prm.share_prompts`); ignored for flash-attention models, whose
            varlen kernels keep every packed sequence apart.
    """

    def __init__(self, model_path: str, loss: Loss, settings: EngineSettings, *, mini_batch_size: int,
                 max_tokens_per_micro_batch: int, epochs: int = 1, temperature: float = 1.0, seed: int = 0,
                 trust_remote_code: bool = False, padding_free: bool = False, share_prompts: bool = False):
        for name, value in (("mini_batch_size", mini_batch_size), ("epochs", epochs),
                            ("max_tokens_per_micro_batch", max_tokens_per_micro_batch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model_path, self.loss, self.settings = model_path, loss, settings
        self.mini_batch_size, self.max_tokens, self.epochs = mini_batch_size, max_tokens_per_micro_batch, epochs
        self.temperature, self.padding_free = temperature, padding_free
        torch.manual_seed(seed)
        model = load_trainable(model_path, settings, trust_remote_code)
        self.share_prompts = False
        if padding_free:
            self.share_prompts = use_packed_attention(model) == PACKED_ATTENTION and share_prompts
        self.engine = build_engine(model, settings)
        self.device = self.engine.device
        self._caller = EngineCaller(self.engine, self.engine.module)
        self._offloaded = False
        self._on_policy = False

    # ------------------------------------------------------------------ planning and forward passes
    def plan(self, batch: Batch) -> Plan:
        """This rank's mini- and micro-batches of `batch` (the same for `logprobs` and `update`)."""
        w = world_size()
        if self.mini_batch_size % w:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} is not divisible by the data-parallel "
                             f"world size {w}")
        return make_plan(batch, self.mini_batch_size // w, self.max_tokens, self.loss.traits.whole_groups,
                         self.padding_free, self.share_prompts)

    def _forward(self, model, batch: Batch, rows: Sequence[int], entropy: bool = False) -> Forward:
        return forward_rows(model, batch, rows, device=self.device, temperature=self.temperature, entropy=entropy,
                            padding_free=self.padding_free, share_prompts=self.share_prompts)

    def logprobs(self, batch: Batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """No-grad log-probs of the batch under the current weights (or under `model`, e.g. a frozen
        reference), pass by pass as the update plans them. # [B, T] fp32 on the CPU"""
        self.reload_states()
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)  # [B, T]
        micro = [mb for mini in self.plan(batch) for mb in mini]
        self._score(model if model is not None else self._caller, batch, micro, out)
        return out

    @torch.no_grad()
    def _score(self, model, batch: Batch, micro: list[list[int]], out: torch.Tensor) -> None:
        """Write the no-grad log-probs of the micro-batches' rows into `out` [B, T].

        Every rank runs the same number of passes (extra ones repeat the first micro-batch and are
        dropped), because ZeRO-3 gathers parameters collectively inside forward.
        """
        self.engine.eval()
        for k in range(synced_max(len(micro))):
            rows = micro[k] if k < len(micro) else micro[0]
            fwd = self._forward(model, batch, rows)
            if k < len(micro):
                out[torch.as_tensor(rows)] = fwd.logp.float().cpu()

    # ------------------------------------------------------------------ update
    def single_pass(self, batch: Batch) -> bool:
        """Whether `update(batch)` makes one optimizer step over the whole batch (one epoch, one
        mini-batch): its forward pass then sees the weights the batch's old log-probs would come from."""
        return self.epochs == 1 and len(self.plan(batch)) == 1

    def update(self, batch: Batch, on_policy: bool = False) -> tuple[dict[str, float], torch.Tensor]:
        """`epochs` passes over the batch, one optimizer step per mini-batch.

        With `on_policy` the batch brings no `old_logp`: the update must be a single pass
        (`single_pass`), and each micro-batch's old log-probs are its own forward's, detached. They
        equal, bit for bit, what `logprobs` would have returned before the update (same plan, same
        weights), so the loss and its gradient are those of the update with the separate pass.

        Returns the loss's metrics (over all ranks) plus `<section>/grad_norm` (mean over steps),
        `<section>/lr`, `<section>/num_steps` and `<section>/tokens` (the tokens its forward passes
        ran through the model, `pass_tokens`, all epochs and ranks), and the log-probs [B, T] of the
        first epoch's forward passes (each row as scored just before its mini-batch's step).
        """
        batch.require(*(f for f in self.loss.required() if not (on_policy and f == "old_logp")))
        self.reload_states()
        plan = self.plan(batch)
        check_same_on_all_ranks(len(plan), "the number of mini-batches")
        if on_policy and not (self.epochs == 1 and len(plan) == 1):
            raise ValueError(f"on_policy=True needs a single pass over the batch, but the update makes {self.epochs} "
                             f"epoch(s) over {len(plan)} mini-batch(es); compute old_logp with logprobs() instead")
        self._on_policy = on_policy
        sums = dict.fromkeys(self.loss.traits.sum_keys, 0.0)
        logp = torch.zeros(batch.response_mask.shape, dtype=torch.float32)  # [B, T]
        grad_norms, lrs = [], []
        for epoch in range(self.epochs):
            for micro in plan:
                lr = float(self.engine.get_lr()[0])  # the rate this step uses (the schedule moves on in it)
                grad_norm = self._mini_batch(batch, micro, sums, logp if epoch == 0 else None)
                if grad_norm is not None:
                    grad_norms.append(grad_norm)
                    lrs.append(lr)
        ran = self.epochs * sum(pass_tokens(batch, mb, self.padding_free, self.share_prompts)
                                for micro in plan for mb in micro)
        totals = all_reduce(torch.tensor([*sums.values(), ran], dtype=torch.float64)).tolist()
        metrics = self.loss.metrics(dict(zip(sums, totals[:-1])), len(grad_norms))
        s = self.loss.traits.section
        metrics[f"{s}/tokens"] = totals[-1]
        metrics[f"{s}/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        metrics[f"{s}/lr"] = lrs[-1] if lrs else float(self.engine.get_lr()[0])
        metrics[f"{s}/num_steps"] = float(len(grad_norms))
        return metrics, logp

    def _mini_batch(self, batch: Batch, micro: Plan, sums: dict[str, float], logp: torch.Tensor | None) -> float | None:
        """Accumulate one mini-batch's gradient and step; returns the grad norm (None: no step)."""
        rows = sorted(i for mb in micro for i in mb)
        norms = all_reduce(torch.tensor(self.loss.normalizers(batch.select(rows)), dtype=torch.float64))
        if norms[0] == 0:  # nothing to learn on any rank; still score the rows when asked
            if logp is not None:
                self._score(self._caller, batch, micro, logp)
            return None
        self.engine.train()

        def loss_fn(k: int) -> torch.Tensor:
            if k >= len(micro):
                # A rank with fewer micro-batches than the others runs zero-loss passes so every
                # rank calls backward equally often (ZeRO-2/3 communicate inside backward).
                return self._forward(self._caller, batch, micro[0][:1]).logp.sum() * 0.0
            fwd = self._forward(self._caller, batch, micro[k], entropy=self.loss.traits.needs_entropy)
            mb = batch.select(micro[k])
            if self._on_policy:  # the old log-probs are this very pass's (see `update`)
                mb = mb.replace(old_logp=fwd.logp.detach())
            loss, part = self.loss(fwd, mb, norms)
            for key, value in part.items():
                sums[key] += value
            if logp is not None:
                logp[torch.as_tensor(micro[k])] = fwd.logp.detach().float().cpu()
            return loss

        backward_micro_batches(self.engine, synced_max(len(micro)), loss_fn)
        return optimizer_step(self.engine)

    # ------------------------------------------------------------------ weights and checkpoints
    def weight_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(HF name, full shape, dtype) of every checkpoint tensor, `lm_head.weight` included; nothing
        is gathered, so a weight-sync plan costs no memory."""
        return streamed_weight_specs(self.engine.module)

    def weight_buckets(self, buckets: list) -> Iterator[dict[str, torch.Tensor]]:
        """Each bucket's full tensors in turn (collective under ZeRO-3: every rank drains it)."""
        self.reload_states()
        return iter_weight_buckets(self.engine.module, buckets)

    def offload_states(self) -> bool:
        """Move the engine's states to host memory (GPU only; colocated engines generate meanwhile).
        Returns whether anything moved."""
        if self.device.type != "cuda" or self._offloaded:
            return False
        offload_engine_states(self.engine)
        self._offloaded = True
        return True

    def reload_states(self) -> bool:
        """Undo `offload_states`; every method that computes calls it first."""
        if not self._offloaded:
            return False
        reload_engine_states(self.engine)
        self._offloaded = False
        return True

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on the CPU, `lm_head.weight` included (collective under ZeRO-3, where
        only rank 0 gets them; the weight sync streams `weight_buckets` instead)."""
        self.reload_states()
        return gather_named_weights(self.engine.module, self.settings.zero_stage)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint with optimizer and LR-scheduler state (collective)."""
        self.reload_states()
        save_engine_checkpoint(self.engine, path)

    def load_checkpoint(self, path: str) -> None:
        self.reload_states()
        load_engine_checkpoint(self.engine, path)

    def save_hf(self, path: str) -> None:
        """Plain HF folder + the tokenizer of `model_path` (collective; rank 0 writes)."""
        self.reload_states()
        save_hf_folder(self.engine, self.settings.zero_stage, self.model_path, path)
