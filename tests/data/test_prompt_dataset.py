"""Tests for prime.data.dataset: reading the verl schema, templating, length filter, row errors."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prime.data.dataset import (
    PromptDataset,
    PromptItem,
    RowError,
    build_messages,
    build_prompt_dataset,
    load_prompt_dataset,
    read_rows,
)

# ChatML around one user message: "<|im_start|>" (1 token) + "user\n" (5) + "<|im_end|>" (1)
# + "\n" (1) + "<|im_start|>" (1) + "assistant\n" (10) = 19 tokens with the byte tokenizer.
CHATML_USER_OVERHEAD = 19


def _row(content, gt="12", ability="math", source="test/arith", **extra):
    row = {
        "data_source": source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ability,
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": 0, "split": "train"},
    }
    row.update(extra)
    return row


ROWS = [_row("Compute 7+5.", "12"), _row("Compute 2*3.", "6"), _row("Compute 9-4.", "5")]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_jsonl_rows_get_chat_template_and_ids(tmp_path, byte_tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    ds = load_prompt_dataset(path, byte_tokenizer)
    assert isinstance(ds, PromptDataset) and len(ds) == 3
    item = ds[0]
    assert isinstance(item, PromptItem)
    assert item.index == 0 and item.source_row == 0
    assert item.prompt_text == "<|im_start|>user\nCompute 7+5.<|im_end|>\n<|im_start|>assistant\n"
    # Encoded exactly once, with no extra special tokens: "Compute 7+5." is 12 bytes.
    assert item.prompt_ids == byte_tokenizer.encode(item.prompt_text, add_special_tokens=False)
    assert len(item.prompt_ids) == CHATML_USER_OVERHEAD + 12
    assert byte_tokenizer.decode(item.prompt_ids) == item.prompt_text
    assert (item.ground_truth, item.ability, item.data_source) == ("12", "math", "test/arith")
    assert item.raw["extra_info"] == {"index": 0, "split": "train"}
    assert [it.ground_truth for it in ds] == ["12", "6", "5"]
    assert ds.num_dropped_too_long == 0 and ds.num_dropped_invalid == 0


def test_parquet_gives_the_same_items_as_jsonl(tmp_path, byte_tokenizer):
    a = load_prompt_dataset(_write_jsonl(tmp_path / "t.jsonl", ROWS), byte_tokenizer)
    b = load_prompt_dataset(_write_parquet(tmp_path / "t.parquet", ROWS), byte_tokenizer)
    assert [(x.prompt_ids, x.ground_truth, x.raw) for x in a] == [(x.prompt_ids, x.ground_truth, x.raw) for x in b]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, byte_tokenizer):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    ds = load_prompt_dataset(tmp_path / "single", byte_tokenizer)
    assert [it.ground_truth for it in ds] == ["12", "6", "5"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [it.ground_truth for it in load_prompt_dataset(tmp_path / "dict", byte_tokenizer)] == ["12", "6"]
    test = load_prompt_dataset(tmp_path / "dict", byte_tokenizer, split="test")
    assert [it.ground_truth for it in test] == ["5"]
    with pytest.raises(ValueError, match=r"split 'validation'.*available splits: \['test', 'train'\]"):
        read_rows(tmp_path / "dict", split="validation")


def test_list_of_paths_and_directory_keep_order(tmp_path, byte_tokenizer):
    _write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    _write_parquet(tmp_path / "a.parquet", ROWS[:1])
    # A list is read in the given order; a directory in sorted file-name order (a.parquet first).
    listed = load_prompt_dataset([tmp_path / "b.jsonl", tmp_path / "a.parquet"], byte_tokenizer)
    assert [it.ground_truth for it in listed] == ["6", "5", "12"]
    assert [it.source_row for it in listed] == [0, 1, 2]
    folder = load_prompt_dataset(tmp_path, byte_tokenizer)
    assert [it.ground_truth for it in folder] == ["12", "6", "5"]


def test_hub_id_goes_through_load_dataset(monkeypatch, byte_tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_prompt_dataset("PRIME-RL/Eurus-2-RL-Data", byte_tokenizer, split="validation")
    assert calls == [("PRIME-RL/Eurus-2-RL-Data", "validation")]
    assert len(ds) == 3


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows("./data/train")


def test_unsupported_file_suffix(tmp_path):
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported dataset file .*rows.csv.*\.parquet, \.jsonl, \.json"):
        read_rows(tmp_path / "rows.csv")


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    _write_jsonl(tmp_path / "lines.json", ROWS)
    assert read_rows(tmp_path / "list.json") == ROWS
    assert read_rows(tmp_path / "lines.json") == ROWS


def test_plain_string_prompt_is_one_user_message(byte_tokenizer):
    row = _row("x")
    row["prompt"] = "Compute 1+1."
    ds = build_prompt_dataset([row], byte_tokenizer)
    assert ds[0].prompt_text == "<|im_start|>user\nCompute 1+1.<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_added_only_when_absent_and_suffix_on_last_user_message():
    msgs = [{"role": "user", "content": "Q"}]
    assert build_messages(msgs, system_prompt="S", instruction_suffix=" Think.") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q Think."}]
    own = [{"role": "system", "content": "Own"}, {"role": "user", "content": "A"},
           {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    assert build_messages(own, system_prompt="S", instruction_suffix="!") == [
        {"role": "system", "content": "Own"}, {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"}, {"role": "user", "content": "C!"}]
    assert msgs == [{"role": "user", "content": "Q"}]  # input untouched


def test_system_prompt_reaches_the_rendered_text(byte_tokenizer):
    ds = build_prompt_dataset([_row("Q")], byte_tokenizer, system_prompt="S", instruction_suffix=" Box it.")
    assert ds[0].prompt_text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ Box it.<|im_end|>\n"
                                 "<|im_start|>assistant\n")


def test_too_long_prompts_are_dropped_and_counted(byte_tokenizer, caplog):
    # Lengths: 19 + len(content) -> 20, 29, 23 tokens.
    rows = [_row("a", "1"), _row("b" * 10, "2"), _row("c" * 4, "3")]
    with caplog.at_level(logging.WARNING, logger="prime.data"):
        ds = build_prompt_dataset(rows, byte_tokenizer, max_prompt_len=23)
    assert [len(it.prompt_ids) for it in ds] == [20, 23]  # a prompt of exactly the limit is kept
    assert [it.ground_truth for it in ds] == ["1", "3"]
    assert [it.index for it in ds] == [0, 1] and [it.source_row for it in ds] == [0, 2]
    assert ds.num_dropped_too_long == 1 and ds.max_prompt_len == 23
    assert "dropped 1 of 3 prompts longer than max_prompt_len=23" in caplog.text


@pytest.mark.parametrize("field", ["prompt", "reward_model.ground_truth", "ability", "data_source"])
def test_missing_field_error_names_row_and_field(byte_tokenizer, field):
    rows = [_row("ok"), _row("ok"), _row("bad")]
    if field == "reward_model.ground_truth":
        rows[2]["reward_model"] = {"style": "rule"}
    else:
        del rows[2][field]
    with pytest.raises(RowError, match=rf"row 2: missing required field '{field}'"):
        build_prompt_dataset(rows, byte_tokenizer)


def test_malformed_messages_are_reported(byte_tokenizer):
    row = _row("x")
    row["prompt"] = [{"role": "narrator", "content": "x"}]
    with pytest.raises(RowError, match=r"row 0: prompt\[0\].role is 'narrator'; valid roles: system, user, assistant"):
        build_prompt_dataset([row], byte_tokenizer)


def test_non_strict_drops_invalid_rows_with_a_count(byte_tokenizer):
    rows = [_row("a", "1"), {"prompt": "no reward"}, _row("b", "2")]
    ds = build_prompt_dataset(rows, byte_tokenizer, strict=False)
    assert [it.ground_truth for it in ds] == ["1", "2"]
    assert ds.num_dropped_invalid == 1


def test_code_ground_truth_json_string_is_kept_as_is(tmp_path, byte_tokenizer):
    tests = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})
    path = _write_parquet(tmp_path / "code.parquet", [_row("Sum two ints.", tests, ability="code")])
    item = load_prompt_dataset(path, byte_tokenizer)[0]
    assert item.ground_truth == tests and item.ability == "code"


def test_template_with_bos_gets_exactly_one_bos():
    """Llama-style: the template writes {{ bos_token }} and the tokenizer's post-processor would
    add another one; templated text must be encoded without special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    bos = vocab["<s>"]
    item = build_prompt_dataset([_row("hi")], hf)[0]
    assert item.prompt_text == "<s>[user]hi[assistant]"
    assert item.prompt_ids[0] == bos and item.prompt_ids.count(bos) == 1
    # The default encode would have doubled it, which is what the dataset avoids.
    assert hf.encode(item.prompt_text).count(bos) == 2


def test_without_chat_template(byte_tokenizer):
    no_template = byte_tokenizer.__class__.from_pretrained(byte_tokenizer.name_or_path)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat_template; set use_chat_template=False"):
        build_prompt_dataset([_row("x")], no_template)
    ds = build_prompt_dataset([_row("Q")], no_template, system_prompt="S", use_chat_template=False)
    assert ds[0].prompt_text == "S\n\nQ"


def test_batch_selects_in_order_and_checks_range(byte_tokenizer):
    ds = build_prompt_dataset(ROWS, byte_tokenizer)
    assert [it.ground_truth for it in ds.batch([2, 0, 2])] == ["5", "12", "5"]
    with pytest.raises(IndexError, match="prompt index 3 out of range for a dataset of 3 prompts"):
        ds.batch([3])
    assert ds.prompt_lengths == [31, 31, 31]


def test_bad_max_prompt_len(byte_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_len must be a positive integer or None, got 0"):
        build_prompt_dataset(ROWS, byte_tokenizer, max_prompt_len=0)
