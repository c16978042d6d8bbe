"""Stage bodies of one RL step (docs/algorithms.md section 5). The loop in `launch/train.py` calls them in order.

Every stage returns its metrics; wall times are taken by the caller's `StageTimer`, and the seconds
each actor spent computing are returned by the actors themselves so the driver can report the
framework's own overhead (`timing/overhead` = step wall time minus the actors' compute time).
"""

from __future__ import annotations

import math
import selectors
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from prime.algo import group_filter_stats, keep_groups
from prime.data.batch import Batch, pack_sequences
from prime.data.dataset import PromptDataset, PromptItem
from prime.data.sampler import PromptSampler
from prime.models.packing import packed_tokens
from launch.faults import LOST_ERRORS, Recovery, gather_dealt
from prime.rollout.base import Completion
from workers.group import ActorGroup, shard_groups
from workers.lane import lane_results
from workers.verifier import grading_items


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


@dataclass(frozen=True)
class Sampling:
    """How a step generates and filters: flat values from the rollout and filter config sections."""

    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    accuracy: bool
    acc_low: float
    acc_high: float
    drop_truncated: bool
    max_rounds: int
    oversample: float
    logprobs: bool = True
    """The engines return each token's log-prob (for the weight-sync check)."""


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


def _generate_calls(rollout: ActorGroup, prompt_ids: list[list[int]], seed_of_engine: Callable[[int], int | None],
                    n: int, max_new_tokens: int, temperature: float, top_p: float,
                    logprobs: bool) -> list[tuple[int, Callable[[Any], Any]]]:
    """One `RolloutWorker.generate` call per engine with prompts (dealt round-robin), each with its
    engine's seed; a retry sends the same seed."""
    return [(i, lambda e, chunk=chunk, seed=seed_of_engine(i): e.generate.remote(
                chunk, n, max_new_tokens, temperature, top_p, seed, logprobs))
            for i, chunk in enumerate(deal(prompt_ids, rollout.world_size)) if chunk]


def generate(rollout: ActorGroup, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
             top_p: float, seed_of_engine: Callable[[int], int | None],
             recovery: Recovery | None = None, logprobs: bool = True) -> tuple[list[list[Completion]], float]:
    """Deal prompts round-robin to the engines, n completions each, back in prompt order; and the
    engines' compute seconds (the slowest engine's). With `recovery`, a dead engine's share is
    generated again, with the same seed, once Ray has restarted it."""
    calls = _generate_calls(rollout, prompt_ids, seed_of_engine, n, max_new_tokens, temperature, top_p, logprobs)
    results = gather_dealt(rollout, calls, recovery)
    return undeal([r[0] for r in results], len(prompt_ids), rollout.world_size), max(r[1] for r in results)


def verify(verifier: ActorGroup, items: list[dict],
           recovery: Recovery | None = None) -> tuple[list[float], dict[str, float]]:
    """Grade items `{ability, data_source, response, ground_truth}`, dealt round-robin to the verifier
    actors; scores in item order and `verify/*` metrics (`verify/seconds`: the slowest actor's). With
    `recovery`, a dead actor's share is graded again once Ray has restarted it."""
    calls = [(i, lambda a, chunk=chunk: a.score.remote(chunk))
             for i, chunk in enumerate(deal(items, verifier.world_size)) if chunk]
    results = gather_dealt(verifier, calls, recovery)
    flat = [float(s) for s in undeal([scores for scores, _ in results], len(items), verifier.world_size)]
    metrics = {key: sum(float(m[key]) for _, m in results)
               for key in ("verify/timeouts", "verify/errors", "verify/items")}
    metrics["verify/seconds"] = max(m["verify/seconds"] for _, m in results)
    return flat, metrics


def _grading_items(prompts: list[PromptItem], completions: list[list[Completion]]) -> list[dict]:
    return grading_items([_grading_fields(p) for p in prompts], completions)


def _grading_fields(p: PromptItem) -> dict:
    return {"ability": p.ability, "data_source": p.data_source, "ground_truth": p.ground_truth}


def _by_prompt(flat: list[float], n_prompts: int, k: int) -> list[list[float]]:
    return [flat[i * k:(i + 1) * k] for i in range(n_prompts)]


def verify_groups(verifier: ActorGroup, prompts: list[PromptItem], completions: list[list[Completion]],
                  timer: StageTimer, recovery: Recovery | None = None) -> tuple[list[list[float]], dict[str, float]]:
    """Grade every response of every prompt; one list of K scores per prompt."""
    flat, metrics = verify(verifier, _grading_items(prompts, completions), recovery)
    timer.compute("verify", metrics.pop("verify/seconds"))
    return _by_prompt(flat, len(prompts), len(completions[0]) if completions else 0), metrics


def generate_and_verify(rollout: ActorGroup, verifier: ActorGroup, prompts: list[PromptItem], s: Sampling,
                        seed_of_engine: Callable[[int], int | None], timer: StageTimer,
                        recovery: Recovery | None = None) -> tuple[list[list[Completion]], list[list[float]],
                                                                    dict[str, float]]:
    """Generate `s.n` responses per prompt and grade them: the completions and one list of scores per
    prompt, and `verify/*` metrics.

    With at least as many engines as verifier actors, each engine's share is graded straight from
    its result: the grading call (`VerifierWorker.score_generated`, engine i's share to verifier
    actor i mod V) is sent together with the generation call, with the generation's ObjectRef as
    its argument, so Ray hands the result to the verifier the moment it exists. The driver does not
    wait for generation before sending the grading, and a share is graded while slower engines are
    still generating. Then `compute/verify` counts only the grading done after the last engine
    finished (from the actors' wall clocks), so that what ran in the shadow of generation is not
    counted twice. With more verifier actors than engines, the two stages run one after the other
    and every verifier actor gets a share.

    With `recovery`, a dead engine's share is generated again (same seed) and then every share is
    graded anew from the driver; a dead verifier actor's share is graded again from the driver.
    """
    if verifier.world_size <= rollout.world_size and rollout.lanes() is not None and verifier.lanes() is not None:
        return _generate_and_verify_lanes(rollout, verifier, prompts, s, seed_of_engine, timer, recovery)
    if verifier.world_size > rollout.world_size:
        with timer("generate"):
            completions, seconds = generate(rollout, [p.prompt_ids for p in prompts], n=s.n,
                                            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                            seed_of_engine=seed_of_engine, recovery=recovery, logprobs=s.logprobs)
            timer.compute("generate", seconds)
        with timer("verify"):
            scores, metrics = verify_groups(verifier, prompts, completions, timer, recovery)
        return completions, scores, metrics
    shares = deal(prompts, rollout.world_size)
    gen_calls = _generate_calls(rollout, [p.prompt_ids for p in prompts], seed_of_engine,
                                s.n, s.max_new_tokens, s.temperature, s.top_p, s.logprobs)
    restarts_key = f"faults/{rollout.name}_restarts"
    restarts = recovery.counts.get(restarts_key, 0.0) if recovery is not None else 0.0
    with timer("generate"):
        gen_refs = [submit(rollout.actors[i]) for i, submit in gen_calls]
        graded_refs = [verifier.actors[i % verifier.world_size].score_generated.remote(
                           ref, [_grading_fields(p) for p in shares[i]])
                       for (i, _), ref in zip(gen_calls, gen_refs)]
        generated = gather_dealt(rollout, gen_calls, recovery, gen_refs)
        timer.compute("generate", max(r[1] for r in generated))
    regenerated = recovery is not None and recovery.counts.get(restarts_key, 0.0) != restarts
    with timer("verify"):
        calls = [_grading_call(i, verifier.world_size, shares[i], r[0])  # a retry, or every share after a restart
                 for (i, _), r in zip(gen_calls, generated)]
        graded = gather_dealt(verifier, calls, recovery, None if regenerated else graded_refs)
    return _joined_shares(prompts, [i for i, _ in gen_calls], generated, graded, rollout.world_size,
                          verifier.world_size, s.n, timer)


def _generate_and_verify_lanes(rollout: ActorGroup, verifier: ActorGroup, prompts: list[PromptItem], s: Sampling,
                               seed_of_engine: Callable[[int], int | None], timer: StageTimer,
                               recovery: Recovery | None) -> tuple[list[list[Completion]], list[list[float]],
                                                                   dict[str, float]]:
    """`generate_and_verify` over the groups' lanes (`workers/lane.py`): the engines' calls go out
    together, and each engine's share goes to its verifier actor (i mod V) the moment it is back, so
    a share is graded while slower engines still generate.

    A lost actor is handled as on the Ray path: with `recovery`, a dead engine's share is generated
    again by its restarted engine (same seed) and a dead verifier actor's shares are graded again;
    shares already generated or graded are kept. Any error leaves the lanes closed."""
    shares = deal(prompts, rollout.world_size)
    active = [i for i, share in enumerate(shares) if share]
    graders = verifier.lanes()
    try:
        with timer("generate"):
            generated, sent_to, lost_graders = _lanes_generate(rollout, verifier, graders, prompts, s,
                                                               seed_of_engine, recovery)
            timer.compute("generate", max(generated[i][1] for i in active))
        with timer("verify"):
            graded = _lanes_grade(verifier, graders, shares, generated, sent_to, lost_graders, recovery)
    except BaseException:
        rollout.close_lanes()  # replies left unread would be taken for the next calls'
        verifier.close_lanes()
        raise
    return _joined_shares(prompts, active, [generated[i] for i in active], [graded[i] for i in active],
                          rollout.world_size, verifier.world_size, s.n, timer)


def _grading_call(engine: int, verifiers: int, share: list[PromptItem],
                  outs: list[list[Completion]]) -> tuple[int, Callable[[Any], Any]]:
    """Engine `engine`'s share graded from the driver, as a `gather_dealt` call to verifier actor
    engine mod `verifiers`."""
    return engine % verifiers, lambda a: a.score.remote(_grading_items(share, outs))


def _joined_shares(prompts: list[PromptItem], engines: list[int], generated: list, graded: list, world_size: int,
                   verifiers: int, n: int, timer: StageTimer) -> tuple[list[list[Completion]], list[list[float]],
                                                                   dict[str, float]]:
    """The engines' shares back in prompt order: `generated[j]` and `graded[j]` are engine
    `engines[j]`'s results (its share graded by verifier actor engines[j] mod `verifiers`). Counts
    the grading done after the last engine finished as `compute/verify`."""
    shares = deal(prompts, world_size)
    timer.compute("verify", _grading_after(max(r[2] for r in generated), [i % verifiers for i in engines],
                                           [m for _, m in graded]))
    per_share = [_by_prompt([float(x) for x in scores], len(shares[i]), n)
                 for i, (scores, _) in zip(engines, graded)]
    metrics = {key: sum(float(m[key]) for _, m in graded) for key in ("verify/timeouts", "verify/errors", "verify/items")}
    completions = undeal([r[0] for r in generated], len(prompts), world_size)
    return completions, undeal(per_share, len(prompts), world_size), metrics


_Lost = list[tuple[ActorGroup, int, BaseException]]


def _lanes_generate(rollout: ActorGroup, verifier: ActorGroup, graders: list, prompts: list[PromptItem],
                    s: Sampling, seed_of_engine: Callable[[int], int | None],
                    recovery: Recovery | None) -> tuple[dict[int, Any], dict[int, list[int]], _Lost]:
    """Every engine's share generated (engine -> its result), which shares went to which verifier
    actor's lane (`graders`, in order), and the verifier actors found dead on the way."""
    engines, shares = rollout.lanes(), deal(prompts, rollout.world_size)
    active = [i for i, share in enumerate(shares) if share]
    generated: dict[int, Any] = {}
    sent_to: dict[int, list[int]] = {}
    lost_engines: _Lost = []
    lost_graders: _Lost = []
    for i in active:
        engines[i].submit("generate", [p.prompt_ids for p in shares[i]], s.n, s.max_new_tokens, s.temperature,
                          s.top_p, seed_of_engine(i), s.logprobs)
    with selectors.DefaultSelector() as waiting:
        for i in active:
            waiting.register(engines[i], selectors.EVENT_READ, i)
        while waiting.get_map():
            for key, _ in waiting.select():
                i = key.data
                waiting.unregister(engines[i])
                try:
                    generated[i] = engines[i].result()
                except LOST_ERRORS as e:
                    lost_engines.append((rollout, i, e))
                    continue
                v = i % verifier.world_size
                if graders[v].broken:
                    continue
                try:
                    graders[v].submit("score_generated", generated[i], [_grading_fields(p) for p in shares[i]])
                except LOST_ERRORS as e:
                    lost_graders.append((verifier, v, e))
                    continue
                sent_to.setdefault(v, []).append(i)
    again = [i for i in active if i not in generated]
    if again:  # through Ray, with its recovery, once the lost engines are back
        _revive_all(lost_engines, recovery)
        calls = _generate_calls(rollout, [p.prompt_ids for p in prompts], seed_of_engine, s.n, s.max_new_tokens,
                                s.temperature, s.top_p, s.logprobs)
        generated |= dict(zip(again, gather_dealt(rollout, [calls[i] for i in again], recovery)))
    return generated, sent_to, lost_graders


def _lanes_grade(verifier: ActorGroup, graders: list, shares: list[list[PromptItem]], generated: dict[int, Any],
                 sent_to: dict[int, list[int]], lost_graders: _Lost, recovery: Recovery | None) -> dict[int, Any]:
    """Every share's (scores, metrics): the chained grading's replies from the verifier actors'
    lanes (`graders`), and (through Ray, once the lost verifier actors are back) the shares that
    were not graded."""
    graded: dict[int, Any] = {}
    for v, sent in sent_to.items():
        for i in sent:
            try:
                graded[i] = graders[v].result()
            except LOST_ERRORS as e:
                lost_graders.append((verifier, v, e))
                break
    ungraded = [i for i in generated if i not in graded]
    if ungraded:
        _revive_all(lost_graders, recovery)
        calls = [_grading_call(i, verifier.world_size, shares[i], generated[i][0]) for i in ungraded]
        graded |= dict(zip(ungraded, gather_dealt(verifier, calls, recovery)))
    return graded


def _revive_all(lost: _Lost, recovery: Recovery | None) -> None:
    """Wait for each lost actor's restart (`Recovery.revive`); without recovery, raise the first loss."""
    if recovery is None and lost:
        raise lost[0][2]
    for group, index, error in lost:
        recovery.revive(group, index, error)


def _grading_after(generation_end: float, actors: list[int], metrics: list[dict[str, float]]) -> float:
    """The grading seconds of the busiest verifier actor after `generation_end` (wall clock): a call
    chained to its engine (`verify/started_at` set) counts only its part after the last engine
    finished; a call sent by the driver started after that and counts whole."""
    busy: dict[int, float] = {}
    for actor, m in zip(actors, metrics):
        seconds = m["verify/seconds"]
        if "verify/started_at" in m:
            seconds = max(0.0, min(seconds, m["verify/started_at"] + seconds - generation_end))
        busy[actor] = busy.get(actor, 0.0) + seconds
    return max(busy.values())


def filter_flags(groups: list[Group], s: Sampling) -> list[bool]:
    """Which generated groups pass the enabled filters (`prime.algo.keep_groups`)."""
    if not groups:
        return []
    scores = torch.tensor([g.scores for g in groups], dtype=torch.float32)  # [G, K]
    cut = torch.tensor([[c.finish_reason == "length" for c in g.completions] for g in groups])  # [G, K]
    return keep_groups(scores, cut, accuracy=s.accuracy, acc_low=s.acc_low, acc_high=s.acc_high,
                       drop_truncated=s.drop_truncated).tolist()


def collect_groups(*, rollout: ActorGroup, verifier: ActorGroup, dataset: PromptDataset, sampler: PromptSampler,
                   batch_size: int, sampling: Sampling, seed_of: Callable[[int, int], int | None], multiple_of: int,
                   timer: StageTimer, recovery: Recovery | None = None) -> CollectResult:
    """Generate, verify and filter rounds until `batch_size` groups pass (or `max_rounds` is reached).

    Each round asks for the missing groups times `oversample`; `seed_of(round, engine)` seeds the
    engines' sampling (None: the engine's own random stream).
    Groups that pass beyond the batch are not trained on: their prompts go back to the sampler's
    buffer and are generated again, first, in the next step (`filter/surplus_groups`), so no prompt
    is skipped and every trained response is on-policy. The batch is trimmed to a multiple of
    `multiple_of` (the data-parallel ranks, each of which needs whole groups); if fewer groups than
    that passed in `max_rounds` rounds, generated groups that failed the filter top it up
    (`filter/fallback_groups`) so the step still trains. `recovery` re-sends the share of an engine
    or verifier actor that died (`launch/faults.py`).
    """
    s = sampling
    filtering = s.accuracy or s.drop_truncated
    kept: list[Group] = []
    rejected: list[Group] = []
    m = {"filter/rounds": 0.0, "filter/generated_groups": 0.0, "verify/timeouts": 0.0, "verify/errors": 0.0,
         "verify/items": 0.0, "rollout/generated_tokens": 0.0}
    for rnd in range(s.max_rounds if filtering else 1):
        missing = batch_size - len(kept)
        if missing <= 0:
            break
        prompts = dataset.batch(sampler.next_batch(math.ceil(missing * s.oversample) if filtering else missing))
        completions, scores, vm = generate_and_verify(rollout, verifier, prompts, s,
                                                      lambda engine: seed_of(rnd, engine), timer, recovery)
        groups = [Group(p, c, sc) for p, c, sc in zip(prompts, completions, scores)]
        with timer("filter"):
            flags = filter_flags(groups, s)
        for key, v in vm.items():
            m[key] += v
        m["rollout/generated_tokens"] += sum(len(c.token_ids) for comps in completions for c in comps)
        kept.extend(g for g, f in zip(groups, flags) if f)
        rejected.extend(g for g, f in zip(groups, flags) if not f)
        m["filter/rounds"] += 1
        m["filter/generated_groups"] += len(prompts)
    generated = kept + rejected
    scores_all = torch.tensor([sc for g in generated for sc in g.scores], dtype=torch.float32)  # [G*K]
    stats = group_filter_stats(scores_all, torch.arange(len(generated)).repeat_interleave(s.n))
    for key in ("filter/all_correct_frac", "filter/all_wrong_frac"):
        m[key] = stats[key]
    kept, trim_metrics = _trim_to_batch(kept, rejected, batch_size, multiple_of, sampler)
    m |= trim_metrics
    m["filter/kept_frac"] = m["filter/kept_groups"] / max(1.0, m["filter/generated_groups"])
    m["verify/mean_score_all"] = stats["filter/mean_acc"]
    return CollectResult(kept, m)


def _trim_to_batch(kept: list[Group], rejected: list[Group], batch_size: int, multiple_of: int,
                   sampler: PromptSampler) -> tuple[list[Group], dict[str, float]]:
    """Top up with rejected groups to a multiple of the ranks, cut to the batch, return the surplus."""
    fallback = rejected[: max(0, multiple_of - len(kept))]
    kept = kept + fallback
    usable = min(batch_size, len(kept)) // multiple_of * multiple_of
    if usable == 0:  # cannot happen while trainer.batch_size is a multiple of the ranks (validated)
        raise ValueError(f"only {len(kept)} groups were generated for {multiple_of} data-parallel ranks")
    surplus = kept[usable:]
    sampler.put_back([g.prompt.index for g in surplus])
    return kept[:usable], {
        "filter/fallback_groups": float(len(fallback)),
        "filter/surplus_groups": float(len(surplus)),
        "filter/kept_groups": float(usable),
        "filter/partial": float(usable < batch_size),
    }


# --------------------------------------------------------------------------------------------------
# Batch tensors
# --------------------------------------------------------------------------------------------------


def build_batch(groups: list[Group], pad_id: int) -> Batch:
    """Pack kept groups, K consecutive rows per prompt, into the padded layout of `Batch`."""
    comps = [c for g in groups for c in g.completions]
    prompts = [g.prompt.prompt_ids for g in groups for _ in g.completions]
    batch = pack_sequences(prompts, [c.token_ids if c.token_ids else [pad_id] for c in comps], pad_id)
    for i, c in enumerate(comps):
        if not c.token_ids:  # an engine may return nothing; keep one masked pad so shapes stay valid
            batch.response_mask[i].zero_()
            batch.response_mask[i, 0] = 1.0
    rollout_logp = np.zeros((len(comps), batch.response_width), dtype=np.float32)  # [B, T]
    for i, c in enumerate(comps):
        if c.logprobs:
            rollout_logp[i, : len(c.logprobs)] = c.logprobs
    k = len(groups[0].completions)
    return batch.replace(
        rollout_logp=torch.from_numpy(rollout_logp),
        scores=torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32),  # [B]
        group_ids=torch.arange(len(groups)).repeat_interleave(k),  # [B]
        truncated=torch.tensor([c.finish_reason == "length" for c in comps]),  # [B]
    )


def response_metrics(batch: Batch) -> dict[str, float]:
    lens = batch.response_mask.sum(1)
    return {
        "response/mean_len": float(lens.mean()),
        "response/max_len": float(lens.max()),
        "response/truncated_frac": float(batch.truncated.float().mean()),
        "verify/mean_score": float(batch.scores.mean()),
        "batch/responses": float(len(batch)),
        "batch/tokens": float(batch.attention_mask.sum()),
        "batch/unique_tokens": float(unique_tokens(batch)),
    }


def unique_tokens(batch: Batch) -> int:
    """Real tokens with a prompt counted once for the consecutive rows that share it: what the
    trainers' padding-free passes run with `actor.share_prompts` / `prm.share_prompts`."""
    return packed_tokens(batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_width,
                         share_prompts=True)


# --------------------------------------------------------------------------------------------------
# Sharded calls on the training groups: each data-parallel rank gets its shard of whole groups
# --------------------------------------------------------------------------------------------------


def _shards(group: ActorGroup, batch: Batch, k: int) -> list[list[int]]:
    return shard_groups(len(batch), k, group.world_size)


def gather_rows(parts: list[list[int]], values: list[np.ndarray], shape: torch.Size) -> torch.Tensor:
    """The ranks' [B_r, T] results (numpy, as the training verbs return them: `workers.training.wire`)
    back into one [B, T] fp32 tensor; rank r's rows are `parts[r]`. Filled in numpy: arrays that come
    out of Ray's object store are read-only, which torch cannot wrap without a copy."""
    out = np.zeros(tuple(shape), dtype=np.float32)
    for idx, v in zip(parts, values):
        out[idx] = v
    return torch.from_numpy(out)


def submit_ranks(group: ActorGroup, verb: str, args_of: Callable[[int], tuple]) -> Callable[[], list]:
    """Send `verb(*args_of(rank))` to every rank, over the group's lanes when it has them, else as
    Ray calls; returns the function that waits for the ranks' results, in rank order."""
    lanes = group.lanes()
    if lanes is not None:
        for r, lane in enumerate(lanes):
            lane.submit(verb, *args_of(r))
        return lambda: lane_results(group, lanes)
    refs = group.call_async(lambda a, r: getattr(a, verb).remote(*args_of(r)))
    return lambda: ray.get(refs)


def sharded_logprobs(group: ActorGroup, batch: Batch, k: int, timer: StageTimer, name: str) -> torch.Tensor:
    """No-grad log-probs [B, T] from a data-parallel group."""
    parts = _shards(group, batch, k)
    sub = batch.packed().replace(group_ids=batch.group_ids)
    results = submit_ranks(group, "logprobs", lambda r: (sub.select(parts[r]),))()
    timer.compute(name, max(sec for _, sec in results))
    return gather_rows(parts, [logp for logp, _ in results], batch.response_mask.shape)


def prm_rewards(group: ActorGroup, batch: Batch, k: int, *, mode: str, ref_is_policy: bool,
                timer: StageTimer) -> tuple[torch.Tensor, dict[str, float]]:
    """Implicit-PRM update (per `mode`) and token rewards [B, T].

    With `ref_is_policy` the reference log-probs are the policy's old log-probs (`prm.ref=policy`).
    The trainers reduce losses and the reward normaliser across ranks, so every rank's metrics are global.
    """
    parts = _shards(group, batch, k)
    sub = batch.packed().replace(scores=batch.scores, group_ids=batch.group_ids,
                                 ref_logp=batch.old_logp if ref_is_policy else None)
    results = submit_ranks(group, "update_and_rewards", lambda r: (sub.select(parts[r]), mode))()
    timer.compute("prm", max(sec for _, sec in results))
    rewards = gather_rows(parts, [r for (r, _), _ in results], batch.response_mask.shape)  # [B, T]
    mask = batch.response_mask
    metrics = dict(results[0][0][1])
    metrics["prm/reward_mean"] = float((rewards * mask).sum() / mask.sum())
    return rewards, metrics


def policy_update(group: ActorGroup, batch: Batch, k: int, timer: StageTimer, on_policy: bool = False,
                  then: Callable[[], Any] | None = None) -> tuple[dict[str, float], torch.Tensor, Any]:
    """One RL update of the policy; each data-parallel rank trains on its shard of whole groups.
    Returns its metrics, the log-probs [B, T] of its forward passes (with `on_policy`, a batch
    without old_logp: the single-pass update's own log-probs serve as the old ones), and what
    `then()` returned: `then` runs once the update calls are submitted, before waiting for them
    (the weight sync's `start`, which queues the sync behind the update on every rank)."""
    parts = _shards(group, batch, k)
    sub = batch.packed().replace(old_logp=batch.old_logp, ref_logp=batch.ref_logp, advantages=batch.advantages,
                                 group_ids=batch.group_ids)
    wait = submit_ranks(group, "update", lambda r: (sub.select(parts[r]), on_policy))
    queued = then() if then is not None else None
    results = wait()
    timer.compute("update_policy", max(sec for _, sec in results))
    logp = gather_rows(parts, [lp for (_, lp), _ in results], batch.response_mask.shape)  # [B, T]
    return dict(results[0][0][0]), logp, queued
