"""tokenize stage: completion-only labels, EOS learned, pad != EOS, truncation keeps the question, subsampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import QTYPES, SYSTEM_PROMPT, make_records, run_tokenize


def test_labels_mask_prompt_and_keep_eos(tmp_path, tiny_base_dir, tiny_tokenizer):
    from datasets import load_from_disk

    args = run_tokenize(tmp_path, tiny_base_dir, max_length=512)
    ds = load_from_disk(str(Path(args.out) / "train"))
    assert set(ds.column_names) >= {"input_ids", "labels", "id", "qtype"}
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny_tokenizer.pad_token_id != eos
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert all(t == -100 for t in labels[:first])
        # the prompt ends with the assistant header; everything after is the answer and is learned
        assert tiny_tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
        assert labels[first:] == ids[first:]
        assert labels[-1] == eos  # nothing truncated at 512 tokens: every answer teaches the stop token
    report = json.loads(Path(args.report).read_text())
    assert report["splits"]["train"]["truncated"] == 0
    assert report["splits"]["train"]["with_end_of_turn"] == 24


def test_truncation_keeps_question_and_is_counted(tmp_path, tiny_base_dir, tiny_tokenizer):
    from datasets import load_from_disk

    args = run_tokenize(tmp_path, tiny_base_dir, max_length=128)
    report = json.loads(Path(args.report).read_text())
    train = report["splits"]["train"]
    assert train["truncated"] == 5  # ids 0, 5, 10, 15, 20 have the long answers
    assert train["token_length"]["max"] == 128
    assert set(train["token_length"]) == {"p50", "p90", "p99", "max", "mean"}
    assert "metadata" in report and "libraries" in report["metadata"]
    ds = load_from_disk(str(Path(args.out) / "train"))
    row = ds[0]  # q0000, a truncated one
    assert len(row["input_ids"]) == 128
    assert "What are the symptoms of disease 0?" in tiny_tokenizer.decode(row["input_ids"])
    assert row["labels"][-1] != tiny_tokenizer.eos_token_id  # a cut answer does not teach stopping there


def test_prompt_too_long_is_dropped_then_fails_past_threshold(tmp_path, tiny_base_dir):
    from stages.tokenize import encode_records

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    records = make_records(4)
    records[0] = {**records[0], "question": "What are the symptoms of glaucoma? " * 20}
    columns, stats = encode_records(tok, records, SYSTEM_PROMPT, max_length=64)
    assert stats["dropped_prompt_too_long"] == 1 and stats["dropped_ids"] == ["q0000"]
    assert len(columns["input_ids"]) == 3
    with pytest.raises(ValueError, match="prompts alone exceed tokenize.max_length"):
        run_tokenize(tmp_path, tiny_base_dir, max_length=20)


def test_subsample_is_stratified_and_deterministic(tmp_path, tiny_base_dir):
    from datasets import load_from_disk

    args = run_tokenize(tmp_path, tiny_base_dir, max_train_samples=8, max_eval_samples=4)
    ds = load_from_disk(str(Path(args.out) / "train"))
    assert len(ds) == 8 and sorted(set(ds["qtype"])) == sorted(QTYPES)
    assert len(load_from_disk(str(Path(args.out) / "validation"))) == 4
    first_ids = list(ds["id"])
    run_tokenize(tmp_path, tiny_base_dir, max_train_samples=8, max_eval_samples=4)
    assert list(load_from_disk(str(Path(args.out) / "train"))["id"]) == first_ids


def test_length_summary():
    from stages.tokenize import length_summary

    out = length_summary(list(range(1, 101)))
    assert out == {"p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5}
    assert length_summary([])["max"] == 0


def test_pad_equal_to_eos_is_rejected(tmp_path, tiny_base_dir):
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(base)
    with pytest.raises(ValueError, match="pad token"):
        run_tokenize(tmp_path, base)


def test_special_token_lookup_matches_the_vocabulary(tiny_tokenizer):
    """end_of_turn_ids / choose_pad_token look tokens up one by one (get_vocab per example was the bottleneck);
    they must agree with the full vocabulary, and a token the vocab lacks must not come back as the unknown id."""
    from stages.lib.model.chat import PAD_CANDIDATES, choose_pad_token, end_of_turn_ids, token_id

    vocab = tiny_tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<pad>", "<unk>", "glaucoma", "no-such-token"):
        assert token_id(tiny_tokenizer, token) == vocab.get(token)
    expected = {tiny_tokenizer.eos_token_id} | {vocab[t] for t in ("<|im_end|>", "<|eot_id|>") if t in vocab}
    assert end_of_turn_ids(tiny_tokenizer) == expected
    stops = end_of_turn_ids(tiny_tokenizer)
    assert choose_pad_token(tiny_tokenizer) in {tiny_tokenizer.pad_token} | {
        t for t in PAD_CANDIDATES if t in vocab and vocab[t] not in stops}


def test_lookup_ignores_the_unknown_token_mapping():
    """A tokenizer with an unknown token maps strangers to it; that id is not the stranger's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from stages.lib.model.chat import end_of_turn_ids, token_id

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2},
                                                                              unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="</s>")
    assert token_id(tok, "<|im_end|>") is None and token_id(tok, "<unk>") == 0
    assert end_of_turn_ids(tok) == {1}


@pytest.mark.parametrize("prompt_format,header,end", [("plain", "### Answer:\n", "<|im_end|>"),
                                                      ("chatml", "<|im_start|>assistant\n", "<|im_end|>")])
def test_prompt_format_param_sets_the_layout_and_keeps_labels_exact(tmp_path, tiny_base_dir, tiny_tokenizer,
                                                                    prompt_format, header, end):
    """model.prompt_format reaches the stage: the prompt ends with the format's header, only the answer and its one
    end token are learned (the tiny tokenizer's EOS is <|im_end|>, so plain ends on it too)."""
    from datasets import load_from_disk

    args = run_tokenize(tmp_path, tiny_base_dir, prompt_format=prompt_format, max_length=512)
    end_id = tiny_tokenizer.convert_tokens_to_ids(end)
    for row in load_from_disk(str(Path(args.out) / "train")):
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, t in enumerate(labels) if t != -100)
        prompt = tiny_tokenizer.decode(ids[:first])
        assert prompt.endswith(header)
        assert (prompt.startswith(SYSTEM_PROMPT + "\n### Question:\n")) == (prompt_format == "plain")
        assert labels[first:] == ids[first:] and labels[-1] == end_id and labels.count(end_id) == 1
    report = json.loads(Path(args.report).read_text())
    assert report["prompt_format"] == prompt_format and report["splits"]["train"]["with_end_of_turn"] == 24
