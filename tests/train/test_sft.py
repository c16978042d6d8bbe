import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from prime.data.dataset import build_prompt_dataset
from prime.data.synthetic import arith_chain_rows, arithmetic_rows, chain_solution, chain_split
from prime.train import sft as warmstart
from prime.models.loading import load_model, load_tokenizer
from prime.data.batch import pack_sequences
from prime.train.sft import (
    build_sft_examples,
    chain_rows,
    default_rows,
    engine_accuracy,
    greedy_accuracy,
    sampled_accuracy,
    sft_loss,
    sft_warm_start,
    target_text,
    torch_threads,
)

# A short run: enough steps to move the loss a long way from its random-init value (~ln 576).
SHORT = dict(num_examples=64, steps=12, batch_size=16, lr=1e-3, log_every=0)


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """The demo's tiny preset (hidden 128, 2 layers), whose SFT defaults the module documents."""
    from prime.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("sft_tiny")), seed=0)


@pytest.fixture
def model_dir(tiny_model_path, tmp_path):
    """A private copy of the tiny checkpoint (the warm start rewrites its folder)."""
    return shutil.copytree(tiny_model_path, str(tmp_path / "model"))


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _fixed_batch_loss(path, rows):
    tok = load_tokenizer(path)
    prompts, responses = build_sft_examples(tok, rows)
    batch = pack_sequences(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        return sft_loss(load_model(path), batch).item()


def test_sft_examples_match_rl_prompts_and_end_with_eos(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    rows = arithmetic_rows(5, seed=3)
    prompts, responses = build_sft_examples(tok, rows)
    # Prompts are exactly the token ids the RL prompt dataset gives the policy.
    assert prompts == [item.prompt_ids for item in build_prompt_dataset(rows, tok)]
    for row, resp in zip(rows, responses):
        assert resp[-1] == tok.eos_token_id
        assert tok.decode(resp[:-1]) == "\\boxed{" + row["reward_model"]["ground_truth"] + "}"


def test_sft_examples_apply_system_prompt(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    rows = arithmetic_rows(2, seed=0)
    prompts, _ = build_sft_examples(tok, rows, system_prompt="Be brief.")
    expected = build_prompt_dataset(rows, tok, system_prompt="Be brief.")
    assert prompts == [item.prompt_ids for item in expected]


class _FixedLogits(torch.nn.Module):
    """Stub LM over V=4 tokens whose logits are (ln 3, 0, 0, 0) at every position.

    softmax -> p(token 0) = 3/6 = 1/2, p(token 1..3) = 1/6 each.
    """

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, 4)
        logits[..., 0] = math.log(3.0)
        return SimpleNamespace(logits=logits)


def test_sft_loss_counts_response_tokens_only():
    # Row 0 answers [0, 2]; row 1 answers [0] and is right-padded with pad id 1. Prompt tokens
    # (3 and 3, 3) and the pad are never targets. Token NLLs: ln 2, ln 6, ln 2 -> mean over 3.
    batch = pack_sequences([[3], [3, 3]], [[0, 2], [0]], pad_id=1)
    expected = (2 * math.log(2.0) + math.log(6.0)) / 3
    assert sft_loss(_FixedLogits(), batch).item() == pytest.approx(expected, rel=1e-6)  # fp32 log-softmax


def test_short_warm_start_lowers_loss_changes_weights_and_keeps_folder(model_dir):
    before = _weights(model_dir)
    files_before = set(os.listdir(model_dir))
    probe = arithmetic_rows(32, seed=77)
    loss_before = _fixed_batch_loss(model_dir, probe)

    metrics = sft_warm_start(model_dir, **SHORT)

    assert metrics["warmstart/steps"] == 12
    assert metrics["warmstart/examples"] == 64
    assert metrics["warmstart/loss"] < metrics["warmstart/loss_first"]
    assert "warmstart/acc" not in metrics  # not measured unless asked
    # Random init starts near ln(576) = 6.4 nats per token; 12 steps learn the fixed tokens of
    # the answer ("\\boxed", "{", "}", eos) and reach about 2.7 on unseen rows.
    loss_after = _fixed_batch_loss(model_dir, probe)
    assert loss_after < loss_before - 2.0, (loss_before, loss_after)

    after = _weights(model_dir)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Same files (tokenizer included), nothing left beside the folder.
    assert set(os.listdir(model_dir)) == files_before
    assert os.listdir(os.path.dirname(model_dir)) == ["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok("Compute 1+2.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_warm_start_is_deterministic(tiny_model_path, tmp_path):
    a = shutil.copytree(tiny_model_path, str(tmp_path / "a"))
    b = shutil.copytree(tiny_model_path, str(tmp_path / "b"))
    sft_warm_start(a, **dict(SHORT, steps=4))
    sft_warm_start(b, **dict(SHORT, steps=4))
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_max_seconds_stops_after_one_step(model_dir):
    metrics = sft_warm_start(model_dir, **dict(SHORT, max_seconds=1e-9))
    assert metrics["warmstart/steps"] == 1


def test_target_acc_stops_at_first_check(model_dir, monkeypatch):
    # Grading is stubbed to "all correct", so the first check (step 2) meets the target.
    monkeypatch.setattr(warmstart, "_grade", lambda completions, truths: 1.0)
    metrics = sft_warm_start(model_dir, **dict(SHORT, target_acc=0.5, eval_every=2))
    assert metrics["warmstart/steps"] == 2
    assert metrics["warmstart/acc"] == 1.0


def test_failed_save_leaves_checkpoint_untouched(model_dir, monkeypatch):
    before = _weights(model_dir)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        sft_warm_start(model_dir, **dict(SHORT, steps=2))
    after = _weights(model_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert os.listdir(os.path.dirname(model_dir)) == ["model"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(target_acc=1.5), "target_acc must be in"),
        (dict(rows=[]), "rows is an empty list"),
        (dict(rows=arithmetic_rows(4), measure=True), "without eval_rows"),
        (dict(num_threads=0), "num_threads must be >= 1 or None, got 0"),
    ],
)
def test_bad_arguments_are_named(model_dir, kwargs, message):
    before = _weights(model_dir)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sft_warm_start(model_dir, **kwargs)
    after = _weights(model_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        sft_warm_start(str(tmp_path / "nope"))


def test_torch_threads_restores_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_default_rows_are_seeded_and_differ_from_rl_rows():
    train, held_out = default_rows(16, seed=0)
    assert len(train) == 16 and len(held_out) == warmstart.DEFAULT_EVAL_PROMPTS
    assert default_rows(16, seed=0) == (train, held_out)
    # The driver's RL prompts are arithmetic_rows(n, seed=trainer.seed): a different draw.
    assert train != arithmetic_rows(16, seed=0)


@pytest.mark.slow
def test_default_warm_start_reaches_middle_accuracy(model_dir):
    # The defaults are tuned to leave the tiny preset near 0.5 sampled accuracy (0.44-0.55 over
    # seeds 0-3).
    metrics = sft_warm_start(model_dir, measure=True)
    assert 0.15 <= metrics["warmstart/acc"] <= 0.9, metrics
    # The accuracy measured during training is that of the saved folder.
    _, held_out = default_rows(1, seed=0)
    assert sampled_accuracy(model_dir, held_out, seed=0) == metrics["warmstart/acc"]


def _chain_row(expr, ground_truth):
    return {"data_source": "synthetic/arith_chain", "ability": "math",
            "prompt": [{"role": "user", "content": f"Compute {expr}. Put the final answer in \\boxed{{}}."}],
            "reward_model": {"ground_truth": ground_truth, "style": "rule"},
            "extra_info": {"split": "train", "expression": expr, "solution": chain_solution(expr)}}


def test_chain_rows_train_their_worked_solution(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    row = _chain_row("3+5+2-4", "6")  # 3+5 = 8, 8+2 = 10, 10-4 = 6
    _, (response,) = build_sft_examples(tok, [row])
    # The byte-level tokenizer spells digits, signs and newlines ("Ċ") one token each and has
    # "\\boxed" as one merged token: 6 + 7 + 7 + 4 = 24 tokens, then eos.
    assert tok.convert_ids_to_tokens(response[:-1]) == [
        "3", "+", "5", "=", "8", "Ċ",
        "8", "+", "2", "=", "1", "0", "Ċ",
        "1", "0", "-", "4", "=", "6", "Ċ",
        "\\boxed", "{", "6", "}",
    ]
    assert response[-1] == tok.eos_token_id and len(response) == 25
    assert response[:-1] == tok("3+5=8\n8+2=10\n10-4=6\n\\boxed{6}", add_special_tokens=False)["input_ids"]
    # use_solution=False trains the bare boxed answer, as for rows without a solution.
    _, (bare,) = build_sft_examples(tok, [row], use_solution=False)
    assert tok.decode(bare[:-1]) == "\\boxed{6}"
    assert target_text(arithmetic_rows(1, seed=0)[0]) == "\\boxed{6}"  # "Compute 6-0." has no solution


def test_bad_solution_is_named():
    row = _chain_row("1+2", "3")
    row["extra_info"]["solution"] = ""
    with pytest.raises(ValueError, match="row 4: extra_info.solution must be a non-empty string, got ''"):
        target_text(row, 4)


def test_warm_start_on_chains_learns_the_solution_tokens(model_dir):
    train, _ = chain_rows(64, seed=0, num_eval=1)
    probe = arith_chain_rows(32, "test", seed=7)  # held-out expressions, scored on their solutions
    before = _fixed_batch_loss(model_dir, probe)
    metrics = sft_warm_start(model_dir, rows=train, steps=12, batch_size=16, lr=1e-3, log_every=0)
    assert metrics["warmstart/examples"] == 64
    # From about ln(576) = 6.4 nats at random init, 12 steps learn the fixed tokens of the chain
    # format ("=", newlines, "\\boxed{", "}", eos), which is most of a solution's tokens.
    after = _fixed_batch_loss(model_dir, probe)
    assert after < before - 2.0, (before, after)


def test_chain_rows_are_disjoint_and_held_out_set_is_fixed():
    train, held_out = chain_rows(200, seed=0, num_eval=100)
    assert {r["extra_info"]["split"] for r in train} == {"train"}
    assert {r["extra_info"]["split"] for r in held_out} == {"test"}
    assert all(chain_split(r["extra_info"]["expression"]) == "test" for r in held_out)
    assert not {r["extra_info"]["expression"] for r in train} & {r["extra_info"]["expression"] for r in held_out}
    other_train, same_held_out = chain_rows(200, seed=1, num_eval=100)
    assert same_held_out == held_out and other_train != train
    # The warm-start rows differ from an RL file drawn from the train split with the same seed.
    assert train != arith_chain_rows(200, "train", seed=0)


def test_chain_rows_bare_answers_drop_about_that_share_of_solutions():
    worked, _ = chain_rows(1000, seed=0, num_eval=1)
    mixed, _ = chain_rows(1000, seed=0, num_eval=1, bare_answers=0.6)
    assert [r["extra_info"]["expression"] for r in mixed] == [r["extra_info"]["expression"] for r in worked]
    bare = [r for r in mixed if r["extra_info"]["solution"] is None]
    # Binomial(1000, 0.6): a standard deviation of 15.5 rows, so 4.5 of them either side.
    assert 530 <= len(bare) <= 670
    assert all(w["extra_info"]["solution"] for w in worked)  # the shared rows were not changed in place
    assert chain_rows(1000, seed=0, num_eval=1, bare_answers=0.6) == (mixed, _)  # seeded
    assert target_text(bare[0]) == f"\\boxed{{{bare[0]['reward_model']['ground_truth']}}}"
    with pytest.raises(ValueError, match="bare_answers must be in"):
        chain_rows(10, bare_answers=1.0)


def test_greedy_accuracy_is_one_engine_pass(tiny_model_path):
    from prime.rollout.hf import HFEngine

    rows = arith_chain_rows(6, "test", seed=0)
    engine = HFEngine(tiny_model_path)
    first = engine_accuracy(engine, rows, 1, 8, temperature=0.0)
    assert engine_accuracy(engine, rows, 1, 8, temperature=0.0) == first  # greedy: no seed involved
    assert greedy_accuracy(tiny_model_path, rows, 8) == first
    # The untrained model cannot write a whole chain in 8 tokens.
    assert first == 0.0
    with pytest.raises(ValueError, match="use n=1, got n=2"):
        engine_accuracy(engine, rows, 2, 8, temperature=0.0)
