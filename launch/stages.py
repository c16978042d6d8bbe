"""Stage bodies of one RL step (ALGORITHMS.md section 5). The loop in `launch/train.py` calls them in order.

Every stage returns its metrics; wall times are taken by the caller's `StageTimer`, and the seconds
each actor spent computing are returned by the actors themselves so the driver can report the
framework's own overhead (`timing/overhead` = step wall time minus the actors' compute time).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
import torch

from prime.algo.advantages import (
    grpo_advantages,
    prime_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from prime.algo.filters import accuracy_filter, truncation_filter
from prime.data.dataset import PromptDataset, PromptItem
from prime.data.sampler import PromptSampler
from prime.models.logprobs import pack_sequences
from prime.rollout.base import Completion
from workers.group import ActorGroup, shard_groups


class StageTimer:
    """Wall time per named stage (`timing/<name>`) and actor compute time (`compute/<name>`)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"timing/{name}"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.perf_counter() - t0

    def compute(self, name: str, seconds: float) -> None:
        key = f"compute/{name}"
        self.metrics[key] = self.metrics.get(key, 0.0) + seconds


@dataclass
class Group:
    """One prompt and its K responses with their verifier scores."""

    prompt: PromptItem
    completions: list[Completion]
    scores: list[float]


@dataclass
class CollectResult:
    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# generate -> verify -> filter, with oversampling until the batch is full
# --------------------------------------------------------------------------------------------------


def deal(items: list, n: int) -> list[list]:
    """Split `items` round-robin into `n` parts (part i holds items i, i+n, ...)."""
    return [items[i::n] for i in range(n)]


def undeal(parts: list[list], total: int, n: int) -> list:
    """Inverse of `deal`: the parts' results back in item order (trailing empty parts may be missing)."""
    out: list = [None] * total
    for i, part in enumerate(parts):
        out[i::n] = part
    return out


def generate(rollout: ActorGroup, prompts: list[PromptItem], *, n: int, max_new_tokens: int,
             temperature: float, top_p: float, seed: int, timer: StageTimer) -> list[list[Completion]]:
    """Deal prompts round-robin to the engines, generate n each, return them in prompt order."""
    engines = rollout.actors
    refs = [
        e.generate.remote([p.prompt_ids for p in chunk], n, max_new_tokens, temperature, top_p, seed + i)
        for i, (e, chunk) in enumerate(zip(engines, deal(prompts, len(engines)))) if chunk
    ]
    results = ray.get(refs)
    timer.compute("generate", max(sec for _, sec in results))
    return undeal([outs for outs, _ in results], len(prompts), len(engines))


def verify(verifier: ActorGroup, prompts: list[PromptItem], completions: list[list[Completion]],
           timer: StageTimer) -> tuple[list[list[float]], dict[str, float]]:
    """Grade every response; the items are dealt round-robin to the verifier actors."""
    items = [
        {"ability": p.ability, "data_source": p.data_source, "response": c.text, "ground_truth": p.ground_truth}
        for p, comps in zip(prompts, completions) for c in comps
    ]
    actors = verifier.actors
    results = ray.get([a.score.remote(chunk) for a, chunk in zip(actors, deal(items, len(actors))) if chunk])
    timer.compute("verify", max(m["verify/seconds"] for _, m in results))
    flat = [float(s) for s in undeal([scores for scores, _ in results], len(items), len(actors))]
    metrics = {key: sum(float(m[key]) for _, m in results) for key in ("verify/timeouts", "verify/errors", "verify/items")}
    k = len(completions[0]) if completions else 0
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))], metrics


def keep_groups(scores: list[list[float]], completions: list[list[Completion]], *, accuracy: bool, acc_low: float,
                acc_high: float, truncated: bool) -> list[bool]:
    """Which groups survive the accuracy and truncation filters (pure)."""
    if not scores:
        return []
    k = len(scores[0])
    group_ids = torch.arange(len(scores)).repeat_interleave(k)  # [G*K]
    keep = torch.ones(len(scores) * k, dtype=torch.bool)
    if accuracy:
        acc = torch.tensor([s for g in scores for s in g], dtype=torch.float32)
        keep &= accuracy_filter(acc, group_ids, acc_low, acc_high)
    if truncated:
        cut = torch.tensor([c.finish_reason == "length" for g in completions for c in g])
        keep &= truncation_filter(cut, group_ids)
    return keep.view(len(scores), k)[:, 0].tolist()


def collect_groups(*, rollout: ActorGroup, verifier: ActorGroup, dataset: PromptDataset, sampler: PromptSampler,
                   batch_size: int, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                   accuracy: bool, acc_low: float, acc_high: float, truncated: bool, max_rounds: int,
                   oversample: float, multiple_of: int, timer: StageTimer) -> CollectResult:
    """Generate, verify and filter rounds until `batch_size` groups pass (or `max_rounds` is reached).

    Each round asks for the missing groups times `oversample`. Groups that pass beyond the batch are
    not trained on: their prompts go back to the sampler's buffer and are generated again, first, in
    the next step (`filter/surplus_groups`), so no prompt is skipped and every trained response is
    on-policy. The batch is trimmed to a multiple of `multiple_of` (the data-parallel ranks, each of
    which needs whole groups); if fewer groups than that passed in `max_rounds` rounds, generated
    groups that failed the filter top it up (`filter/fallback_groups`) so the step still trains.
    """
    filtering = accuracy or truncated
    kept: list[Group] = []
    m = {"filter/rounds": 0.0, "filter/generated_groups": 0.0, "verify/timeouts": 0.0, "verify/errors": 0.0,
         "verify/items": 0.0}
    all_scores: list[float] = []
    rejected: list[Group] = []
    for rnd in range(max_rounds if filtering else 1):
        missing = batch_size - len(kept)
        if missing <= 0:
            break
        want = math.ceil(missing * oversample) if filtering else missing
        prompts = dataset.batch(sampler.next_batch(want))
        with timer("generate"):
            completions = generate(rollout, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed * 1000 + rnd, timer=timer)
        with timer("verify"):
            scores, vm = verify(verifier, prompts, completions, timer)
        for key, v in vm.items():
            m[key] = m.get(key, 0.0) + v
        with timer("filter"):
            flags = keep_groups(scores, completions, accuracy=accuracy, acc_low=acc_low, acc_high=acc_high,
                                truncated=truncated)
        m["rollout/generated_tokens"] = m.get("rollout/generated_tokens", 0.0) + sum(
            len(c.token_ids) for comps in completions for c in comps)
        groups = [Group(p, c, s) for p, c, s in zip(prompts, completions, scores)]
        kept.extend(g for g, f in zip(groups, flags) if f)
        rejected.extend(g for g, f in zip(groups, flags) if not f)
        all_scores.extend(s for g in scores for s in g)
        m["filter/rounds"] += 1
        m["filter/generated_groups"] += len(prompts)
    # Every data-parallel rank needs whole groups and the same number of them.
    fallback = rejected[: max(0, multiple_of - len(kept))]
    kept.extend(fallback)
    m["filter/fallback_groups"] = float(len(fallback))
    usable = min(batch_size, len(kept)) // multiple_of * multiple_of
    if usable == 0:  # cannot happen while trainer.batch_size is a multiple of the ranks (validated)
        raise ValueError(f"only {len(kept)} groups were generated for {multiple_of} data-parallel ranks")
    surplus = kept[usable:]
    kept = kept[:usable]
    sampler.put_back([g.prompt.index for g in surplus])
    m["filter/surplus_groups"] = float(len(surplus))
    m["filter/kept_groups"] = float(len(kept))
    m["filter/partial"] = float(len(kept) < batch_size)
    m["filter/kept_frac"] = m["filter/kept_groups"] / max(1.0, m["filter/generated_groups"])
    m["verify/mean_score_all"] = sum(all_scores) / max(1, len(all_scores))
    return CollectResult(kept, m)


# --------------------------------------------------------------------------------------------------
# Batch tensors
# --------------------------------------------------------------------------------------------------


def build_batch(groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack kept groups, K consecutive rows per prompt, into the padded layout of `pack_sequences`."""
    prompts = [g.prompt.prompt_ids for g in groups for _ in g.completions]
    responses = [c.token_ids if c.token_ids else [pad_id] for g in groups for c in g.completions]
    batch = pack_sequences(prompts, responses, pad_id)
    for i, (g, c) in enumerate((g, c) for g in groups for c in g.completions):
        if not c.token_ids:  # an engine may return nothing; keep one masked pad so shapes stay valid
            batch["response_mask"][i].zero_()
            batch["response_mask"][i, 0] = 1.0
    t = batch["response_mask"].shape[1]
    rollout_logp = torch.zeros(len(responses), t)  # [B, T]
    for i, c in enumerate(c for g in groups for c in g.completions):
        if c.logprobs:
            rollout_logp[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    batch["rollout_logp"] = rollout_logp
    batch["acc"] = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)  # [B]
    k = len(groups[0].completions)
    batch["group_ids"] = torch.arange(len(groups)).repeat_interleave(k)  # [B]
    batch["truncated"] = torch.tensor([c.finish_reason == "length" for g in groups for c in g.completions])
    return batch


def response_metrics(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    lens = batch["response_mask"].sum(1)
    acc = batch["acc"]
    return {
        "response/mean_len": float(lens.mean()),
        "response/max_len": float(lens.max()),
        "response/truncated_frac": float(batch["truncated"].float().mean()),
        "verify/mean_score": float(acc.mean()),
        "batch/responses": float(acc.numel()),
        "batch/tokens": float(batch["attention_mask"].sum()),
    }


# --------------------------------------------------------------------------------------------------
# Sharded calls on the training groups
# --------------------------------------------------------------------------------------------------

TENSOR_KEYS_PER_ROW = ("input_ids", "attention_mask", "position_ids", "response_mask")


def shard(batch: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    idx = torch.tensor(indices, dtype=torch.long)
    b = batch["input_ids"].shape[0]
    return {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b else v)
            for k, v in batch.items()}


def shards_for(group: ActorGroup, batch: dict[str, torch.Tensor], k: int) -> list[list[int]]:
    return shard_groups(batch["input_ids"].shape[0], k, group.world_size)


def sharded_logprobs(group: ActorGroup, batch: dict[str, torch.Tensor], k: int, timer: StageTimer,
                     name: str) -> torch.Tensor:
    """Log-probs [B, T] from a data-parallel group (each rank its shard of whole groups)."""
    parts = shards_for(group, batch, k)
    keys = TENSOR_KEYS_PER_ROW
    sub = {kk: batch[kk] for kk in keys}
    refs = group.call_async(lambda a, r: a.compute_logprobs.remote(shard(sub, parts[r])))
    results = ray.get(refs)
    timer.compute(name, max(sec for _, sec in results))
    out = torch.zeros(batch["response_mask"].shape)
    for idx, (logp, _) in zip(parts, results):
        out[idx] = logp
    return out


def prm_rewards(group: ActorGroup, batch: dict[str, torch.Tensor], k: int, *, mode: str, ref_is_policy: bool,
                timer: StageTimer) -> tuple[torch.Tensor, dict[str, float]]:
    """Implicit-PRM update (per `mode`) and token rewards [B, T], each rank on its shard of whole groups.

    With `ref_is_policy` the reference log-probs are the policy's old log-probs (`prm.ref=policy`).
    The trainers reduce losses and the reward normaliser across ranks, so every rank's metrics are global.
    """
    parts = shards_for(group, batch, k)
    packed = TENSOR_KEYS_PER_ROW
    sub = {kk: batch[kk] for kk in (*packed, "acc", "group_ids", "old_logp")}

    def call(actor, r):
        part = shard(sub, parts[r])
        ref = part["old_logp"] if ref_is_policy else None
        return actor.update_and_rewards.remote({kk: part[kk] for kk in packed}, part["acc"], part["group_ids"],
                                               mode, ref)

    results = group.call(call)
    mask = batch["response_mask"]
    rewards = torch.zeros(mask.shape)  # [B, T]
    for idx, (r_part, _, _) in zip(parts, results):
        rewards[idx] = r_part
    timer.compute("prm", max(sec for _, _, sec in results))
    metrics = dict(results[0][1])
    metrics["prm/reward_mean"] = float((rewards * mask).sum() / mask.sum())
    return rewards, metrics


POLICY_KEYS = (*TENSOR_KEYS_PER_ROW, "old_logp", "ref_logp", "advantages", "scores", "group_ids")


def policy_update(group: ActorGroup, batch: dict[str, torch.Tensor], k: int, timer: StageTimer) -> dict[str, float]:
    """One RL update of the policy; each data-parallel rank trains on its shard of whole groups."""
    parts = shards_for(group, batch, k)
    sub = {kk: batch[kk] for kk in POLICY_KEYS if kk in batch}
    results = group.call(lambda a, r: a.update.remote(shard(sub, parts[r])))
    timer.compute("update_policy", max(sec for _, sec in results))
    return dict(results[0][0])


def logprob_gap(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |rollout log-prob - trainer log-prob| over response tokens: the weight-sync health check."""
    return float(((rollout_logp - old_logp).abs() * mask).sum() / mask.sum().clamp(min=1))


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def compute_advantages(name: str, *, acc: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor,
                       process_rewards: torch.Tensor | None, norm_by_std: bool, gamma: float,
                       process_coef: float, outcome_coef: float, gamma_process: float,
                       gamma_outcome: float) -> torch.Tensor:
    """Token-level advantages [B, T] for the PPO-style estimators (GVPO uses the scores directly)."""
    if name == "prime":
        return prime_advantages(process_rewards, acc, group_ids, mask, process_coef=process_coef,
                                outcome_coef=outcome_coef, gamma_process=gamma_process,
                                gamma_outcome=gamma_outcome)
    if name == "grpo":
        return grpo_advantages(acc, group_ids, mask, norm_by_std=norm_by_std)
    if name == "rloo":
        return rloo_advantages(acc, group_ids, mask)
    if name == "reinforce_pp":
        last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)  # [B, T] last valid token
        token_rewards = last.float() * acc[:, None]
        return reinforce_pp_advantages(token_rewards, mask, gamma=gamma)
    raise ValueError(f"algo.name={name!r} has no token advantages; valid: prime, grpo, rloo, reinforce_pp")
