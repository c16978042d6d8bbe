"""Held-out evaluation inside a training run, through the run's own engines, verifiers and PRM.

`prime.eval.runner.evaluate` takes an engine with `generate` and a `grade(items) -> scores`; here
both are the job's Ray actors (prompts and items dealt round-robin, as in a training step), and
for PRIME runs the implicit PRM being trained scores every sample, which gives the PRM's held-out
ranking accuracy (`eval/prm_rank_acc`: over (correct, incorrect) pairs of responses to one
problem, how often the PRM's outcome reward orders them right; 0.5 is chance).

Metrics, per dataset and pooled (`eval/<dataset>/<metric>`, and `eval/<metric>` over all problems
where that makes sense): greedy_pass@1, pass@k and maj@k for `eval.ks`, mean_score, truncated, and
with the PRM prm_rank_acc, prm_best_of_n_sum@n, prm_best_of_n_min@n, prm_weighted_vote@n.
"""

from __future__ import annotations

import logging
import time

import ray
import torch

from launch.faults import Recovery
from launch.stages import gather_rows, generate, verify
from prime.config import Config
from prime.data.batch import pack_sequences
from prime.eval.metrics import ranking_accuracy
from prime.eval.prm import PRMScore, TokenPieces, prm_scores
from prime.eval.runner import EvalProblem, EvalSettings, evaluate, load_problems
from prime.rollout.base import Completion
from workers.group import ActorGroup, shard_groups

log = logging.getLogger("prime")


class EngineGroup:
    """`RolloutEngine.generate` over the rollout actors; engine i samples with `seed + i`."""

    def __init__(self, rollout: ActorGroup, recovery: Recovery | None = None):
        self.rollout, self.recovery = rollout, recovery

    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, logprobs: bool = True) -> list[list[Completion]]:
        completions, _ = generate(self.rollout, prompt_ids, n=n, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p,
                                  seed_of_engine=lambda i: None if seed is None else seed + i, recovery=self.recovery,
                                  logprobs=logprobs)
        return completions


class RemotePRMScorer:
    """The `score` of `prime.eval.prm.ImplicitPRMScorer`, computed by the run's PRM actors (and, with
    `prm.ref=policy`, the policy's log-probs as the reference)."""

    def __init__(self, prm: ActorGroup, policy: ActorGroup | None, tokenizer, beta: float):
        self.prm, self.policy, self.beta = prm, policy, beta
        self.pad_id = tokenizer.pad_token_id
        self.pieces = TokenPieces(tokenizer)

    def _sharded(self, group: ActorGroup, verb: str, batch) -> torch.Tensor:
        parts = shard_groups(len(batch), 1, group.world_size)
        results = ray.get(group.call_async(lambda a, r: getattr(a, verb).remote(batch.select(parts[r]))))
        return gather_rows(parts, [value for value, _ in results], batch.response_mask.shape)  # [B, T]

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[PRMScore]:
        # An empty response still gets one (masked) pad token so the layout stays valid.
        batch = pack_sequences(prompt_ids, [r or [self.pad_id] for r in response_ids], self.pad_id)
        batch = batch.replace(group_ids=torch.arange(len(batch)))  # scoring only: any grouping will do
        if self.policy is not None:
            batch = batch.replace(ref_logp=self._sharded(self.policy, "logprobs", batch))
        q = self._sharded(self.prm, "log_ratios", batch)  # [B, T]
        rows = [q[i, : len(r)] for i, r in enumerate(response_ids)]
        return prm_scores(rows, response_ids, self.pieces, self.beta)


def eval_settings(cfg: Config) -> EvalSettings:
    e = cfg.eval
    return EvalSettings(n=e.n, ks=tuple(e.ks), temperature=e.temperature, top_p=e.top_p, greedy=e.greedy,
                        max_new_tokens=e.max_new_tokens or cfg.rollout.max_response_len, seed=cfg.trainer.seed,
                        batch_size=e.batch_size)


def load_eval_problems(cfg: Config, files: list[str], tokenizer) -> list[EvalProblem]:
    problems: list[EvalProblem] = []
    for path in files:
        problems += load_problems(path, tokenizer, limit=cfg.eval.limit or None, system_prompt=cfg.data.system_prompt)
    log.info("held-out evaluation: %d problems in %d datasets", len(problems), len({p.dataset for p in problems}))
    return problems


def flatten_metrics(metrics: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """`eval/<dataset>/<metric>` for every value, and the pooled `eval/prm_rank_acc`."""
    out = {f"eval/{ds}/{k}": float(v) for ds, m in metrics.items() for k, v in m.items() if v is not None}
    pairs = [(m["prm_rank_acc"] * m["prm_rank_pairs"], int(m["prm_rank_pairs"])) for m in metrics.values()
             if m.get("prm_rank_acc") is not None]
    pooled = ranking_accuracy(pairs) if pairs else None
    if pooled is not None:
        out["eval/prm_rank_acc"] = pooled
    return out


def run_eval(cfg: Config, problems: list[EvalProblem], roles, tokenizer,
             recovery: Recovery | None = None) -> dict[str, float]:
    """Evaluate the current policy (as the engines hold it) on the held-out problems; `recovery`
    re-sends the share of an engine or verifier actor that died."""
    t0 = time.perf_counter()
    prm = None
    if roles.prm is not None:
        prm = RemotePRMScorer(roles.prm, roles.policy if cfg.prm.ref == "policy" else None, tokenizer, cfg.prm.beta)
    grade = lambda items: verify(roles.verifier, items, recovery)[0]  # noqa: E731
    result = evaluate(problems, EngineGroup(roles.rollout, recovery), grade, eval_settings(cfg), prm=prm)
    out = flatten_metrics(result.metrics)
    out["timing/eval"] = time.perf_counter() - t0
    return out
