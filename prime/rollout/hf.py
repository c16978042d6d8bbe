"""Generation with Hugging Face `model.generate`: the reference engine, and the fallback where
vLLM is not installed (e.g. a GPU box without vLLM, or quick CPU tests).

Follows the conventions in `prime.rollout.base` exactly like the vLLM engine: eos id kept as the
last token on "stop", text without special tokens, and per-token log-probs of the sampling
distribution (temperature applied, then top-p filtering and renormalisation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from prime.models.loading import load_model, load_tokenizer
from prime.data.batch import pack_sequences
from prime.models.logprobs import response_logprobs, unpack_response_logprobs
from prime.rollout.base import Completion, check_sampling_args, check_score_args


class HFEngine:
    """A `RolloutEngine` over `transformers` generation, in-process.

    Args:
        model_path: checkpoint folder or hub id.
        dtype: parameter dtype ("float32", "bfloat16", ...).
        device: "cpu", "cuda", ...
        seed: base seed; call k of `generate` without an explicit seed uses seed + k, so a run is
            reproducible while successive calls still differ.
        trust_remote_code: passed to transformers when loading the checkpoint.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                 trust_remote_code: bool = False):
        self.model_path = model_path
        self.device = torch.device(device)
        self.model = load_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(model_path, padding_side="left", trust_remote_code=trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_ids = self._eos_ids()
        self._seed = seed
        self._calls = 0

    def _eos_ids(self) -> list[int]:
        """Stop ids: the tokenizer's eos plus any eos ids in the generation config (as vLLM does)."""
        ids = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for i in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
            if i is not None and i not in ids:
                ids.append(i)
        if not ids:
            raise ValueError(f"checkpoint {self.model_path!r} defines no eos token id")
        return ids

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        logprobs: bool = True,
    ) -> list[list[Completion]]:
        """Sample `n` completions per prompt (see `prime.rollout.base` for the conventions)."""
        from transformers import GenerationConfig

        check_sampling_args(prompt_ids, n, max_new_tokens, temperature, top_p)
        if seed is None:
            seed = self._seed + self._calls
        self._calls += 1

        # Each prompt repeated n times (prompt-major), left-padded to width P; generate appends
        # after column P-1 for every row.
        rows = [p for p in prompt_ids for _ in range(n)]
        batch = pack_sequences(rows, [[] for _ in rows], self.pad_id)
        input_ids = batch.input_ids.to(self.device)  # [B, P]
        attention_mask = batch.attention_mask.to(self.device)  # [B, P]
        P = input_ids.shape[1]
        greedy = temperature == 0
        # Every knob set explicitly so that defaults in a hub checkpoint's generation_config
        # (top_k=20, repetition_penalty, ...) or library defaults (top_k=50) cannot change the
        # sampling distribution; top_k=0 and repetition_penalty=1.0 switch those warpers off.
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else 0,
            min_p=None,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_scores=logprobs,  # kept only to compute the log-probs
            return_dict_in_generate=True,
        )
        fork_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        generated = out.sequences[:, P:]  # [B*n, S], rows prompt-major (prompt 0's n rows first)
        logp_all = None
        if logprobs:
            # out.scores: S tensors [B*n, V] after temperature and top-p (filtered logits are -inf).
            scores = torch.stack(out.scores, dim=1).float()  # [B*n, S, V]
            logp_all = torch.log_softmax(scores, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # [B*n, S]

        eos = set(self.eos_ids)
        results: list[list[Completion]] = []
        for i, prompt in enumerate(prompt_ids):
            group = []
            for j in range(n):
                row = i * n + j
                tokens = generated[row].tolist()
                stop_at = next((k for k, t in enumerate(tokens) if t in eos), None)
                if stop_at is None:
                    tokens = tokens[:max_new_tokens]
                    reason = "length"
                else:
                    tokens = tokens[: stop_at + 1]
                    reason = "stop"
                group.append(
                    Completion(
                        prompt_ids=list(prompt),
                        token_ids=tokens,
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                        logprobs=logp_all[row, : len(tokens)].tolist() if logp_all is not None else [],
                        finish_reason=reason,
                    )
                )
            results.append(group)
        return results

    @torch.no_grad()
    def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Temperature-1 log-probs of each fixed response token given its prompt."""
        check_score_args(prompt_ids, response_ids)
        batch = pack_sequences(prompt_ids, response_ids, self.pad_id)
        packed = [getattr(batch, k).to(self.device) for k in batch.PACKED]
        logp = response_logprobs(self.model, *packed)  # [B, T]
        return unpack_response_logprobs(logp, packed[-1])

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors (checkpoint names, e.g. "model.layers.0.mlp.up_proj.weight") in place.

        Strict: an unknown name or a shape mismatch raises before anything is copied. Names that
        are not sent keep their current values.
        """
        state = self.model.state_dict()
        pending = []
        # Tied weights (lm_head.weight and model.embed_tokens.weight) share one storage: sending
        # both is fine when they agree, ambiguous when they do not.
        by_storage: dict[int, tuple[str, torch.Tensor]] = {}
        for name, tensor in named_tensors:
            if name not in state:
                valid = sorted(state)[:5]
                raise KeyError(f"unknown weight name {name!r}; valid names include {valid} ({len(state)} in all)")
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(state[name].shape)}"
                )
            ptr = state[name].data_ptr()
            if ptr in by_storage:
                other, other_tensor = by_storage[ptr]
                if not torch.equal(other_tensor.to(tensor.device, tensor.dtype), tensor):
                    raise ValueError(f"tied weights {other!r} and {name!r} were sent with different values")
                continue
            by_storage[ptr] = (name, tensor)
            pending.append((name, tensor))
        for name, tensor in pending:
            state[name].copy_(tensor.to(device=state[name].device, dtype=state[name].dtype))

    def sleep(self, level: int = 1) -> None:
        """No-op: the HF engine keeps its weights where they are."""

    def wake_up(self, tags: list[str] | tuple[str, ...] | None = None) -> None:
        """No-op (see `sleep`)."""

    # ------------------------------------------------------------------ streaming weight sync
    receivers = 1  # the engine lives in its caller's process, which joins the group

    def transport_infos(self, ip: str) -> list[dict]:
        from prime.rollout.weight_transfer import transport_info

        return [transport_info(ip)]

    def join_weight_sync(self, spec: dict, first_rank: int, plan: list, bind_ip: str) -> list[int]:
        """Join the weight-sync group `spec` as rank `first_rank` (see `prime.rollout.weight_transfer`)."""
        from prime.rollout.weight_transfer import buckets_from_wire, join_channel

        self._buckets = buckets_from_wire(plan)
        self._channel = join_channel(spec, first_rank, bind_ip)
        return [first_rank]

    def receive_weights(self) -> dict[str, float]:
        """Receive one sync, copying each bucket into the model as it lands."""
        from prime.rollout.weight_transfer import receive_into

        return receive_into(self._channel, self._buckets, self.load_weights)

    def close_weight_sync(self) -> None:
        channel, self._channel = getattr(self, "_channel", None), None
        if channel is not None:
            channel.close()

    def memory(self, reset_peak: bool = False) -> list[dict[str, int]]:
        """This process's RSS and peak RSS in bytes (one entry: the engine runs in its caller)."""
        import os

        from prime.rollout.weight_transfer import process_memory, reset_peak_memory

        if reset_peak:
            reset_peak_memory()
        return [process_memory() | {"pid": os.getpid()}]

    def shutdown(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        self.model = None
