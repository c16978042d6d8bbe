"""Score responses with an implicit PRM: per-token log-ratios of a PRM and its reference model.

`ImplicitPRMScorer` loads the PRM pi_prm and the reference pi_ref (two causal LMs, HF folders or hub
ids) and computes, for every (prompt, response) pair of token ids,

    q[t] = log pi_prm(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)

with `prime.models.logprobs.response_logprobs` at temperature 1, micro-batched, without gradients.
The response ids are scored exactly as the engine produced them, the final eos included (the PRM
was trained on such responses). From q it derives the `sum` and `min` scores defined in
`prime.eval.metrics`.

Steps for the `min` score. The response is cut into steps at newlines (`prime.eval.metrics.split_steps`),
which needs the text of every token. Each token is decoded on its own (`tokenizer.decode([id])`,
special tokens skipped, cached per id): a newline is one byte that never occurs inside a
multi-byte UTF-8 character, so a token contains "\\n" exactly when its own bytes do, even where the
token is only part of a character and decodes to a replacement character. Tokens decoded alone
may lose a leading space (SentencePiece), which changes neither the newline nor the
non-whitespace test that `split_steps` applies.

Both models must share the policy's tokenizer (the same ids mean the same tokens);
`check_same_vocab` compares vocabularies and is called for PRM and reference here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prime.eval.metrics import prm_min_score, prm_sum_score, split_steps, step_rewards
from prime.models.loading import load_model, load_tokenizer
from prime.data.batch import pack_sequences
from prime.models.logprobs import response_logprobs

DEFAULT_BETA = 0.05


@dataclass
class PRMScore:
    """Implicit-PRM scores of one response.

    Attributes:
        sum: beta * sum_t q[t] (the PRM's outcome reward; sigmoid(sum) = its P(correct)).
        min: the smallest step reward.
        steps: every step's reward, beta * sum of q over the step, in order.
    """

    sum: float
    min: float
    steps: list[float]


def check_same_vocab(tokenizer_a, tokenizer_b, name_a: str, name_b: str) -> None:
    """Raise ValueError when two tokenizers map tokens to different ids."""
    if tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise ValueError(
            f"the tokenizers of {name_a} ({len(tokenizer_a)} tokens) and {name_b} ({len(tokenizer_b)} "
            "tokens) differ; the PRM, its reference and the policy must share one tokenizer"
        )


class TokenPieces:
    """Each token id decoded on its own (special tokens as empty text), cached per id: the text
    `split_steps` cuts steps by (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_ids: Sequence[int]) -> list[str]:
        pieces = []
        for t in token_ids:
            if t not in self._cache:
                self._cache[t] = self.tokenizer.decode([t], skip_special_tokens=True)
            pieces.append(self._cache[t])
        return pieces


def prm_scores(log_ratios: Sequence[torch.Tensor], response_ids: Sequence[Sequence[int]], pieces: TokenPieces,
               beta: float) -> list[PRMScore]:
    """`PRMScore` of every response from its per-token log-ratios q (one [T_i] tensor each)."""
    scores = []
    for q, response in zip(log_ratios, response_ids):
        step_ids = torch.tensor(split_steps(pieces(response)), dtype=torch.long)  # [T]
        scores.append(PRMScore(sum=prm_sum_score(q, beta), min=prm_min_score(q, step_ids, beta),
                               steps=step_rewards(q, step_ids, beta).tolist()))
    return scores


class ImplicitPRMScorer:
    """Per-token implicit process rewards of fixed responses (no grad, micro-batched).

    Args:
        prm_path: PRM checkpoint (folder or hub id).
        ref_path: reference checkpoint the PRM's log-ratios are taken against.
        beta: the PRM's beta (its outcome reward is beta * sum q).
        dtype: parameter dtype of both models ("float32", "bfloat16", ...).
        device: "cpu", "cuda", ...
        micro_batch_size: responses per forward pass.
    """

    def __init__(self, prm_path: str, ref_path: str, beta: float = DEFAULT_BETA, dtype: str = "float32",
                 device: str = "cpu", micro_batch_size: int = 8):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.beta = beta
        self.micro_batch_size = micro_batch_size
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(prm_path)
        check_same_vocab(self.tokenizer, load_tokenizer(ref_path), f"PRM {prm_path!r}", f"reference {ref_path!r}")
        self.prm = load_model(prm_path, dtype=dtype, device=device)
        self.ref = load_model(ref_path, dtype=dtype, device=device)
        self.token_pieces = TokenPieces(self.tokenizer)

    @torch.no_grad()
    def log_ratios(self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]]) -> list[torch.Tensor]:
        """q of every response, one float32 CPU tensor [T_i] each, in input order.

        Pairs are sorted by length before batching so that a micro-batch pads little.
        """
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses; they must pair up")
        for i, r in enumerate(response_ids):
            if len(r) == 0:
                raise ValueError(f"response {i} is empty; nothing to score")
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
        out: list[torch.Tensor | None] = [None] * len(order)
        for start in range(0, len(order), self.micro_batch_size):
            chunk = order[start:start + self.micro_batch_size]
            q = self._batch_log_ratios([prompt_ids[i] for i in chunk], [response_ids[i] for i in chunk])
            for i, row in zip(chunk, q):
                out[i] = row
        return out  # type: ignore[return-value]

    def _batch_log_ratios(self, prompts: list[list[int]], responses: list[list[int]]) -> list[torch.Tensor]:
        batch = pack_sequences(prompts, responses, self.tokenizer.pad_token_id)
        packed = [getattr(batch, k).to(self.device) for k in batch.PACKED]
        logp = response_logprobs(self.prm, *packed)  # [B, T]
        ref_logp = response_logprobs(self.ref, *packed)  # [B, T]
        q = (logp - ref_logp).float().cpu()  # [B, T], 0 on padding
        return [q[b, :len(r)] for b, r in enumerate(responses)]

    def score(self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]]) -> list[PRMScore]:
        """`PRMScore` of every (prompt, response) pair, in input order."""
        return prm_scores(self.log_ratios(prompt_ids, response_ids), response_ids, self.token_pieces, self.beta)
