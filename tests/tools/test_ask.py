"""ask: loads base + adapter (or a merged model), streams answers, compares with the base, keeps a chat history,
shows the disclaimer, and turns bad input into one clear message and exit code 2."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from helpers import ROOT, write_tiny_adapter
from tools import ask
from stages.lib.serving.merge import BASE_MARKER

PARAMS = ROOT / "params.yaml"
QUESTION = "What are the symptoms of glaucoma?"


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dir, tmp_path_factory) -> Path:
    return write_tiny_adapter(tiny_base_dir, tmp_path_factory.mktemp("ask") / "adapter")


def ask_args(*argv, base=None, adapter=None):
    # Decoding pinned here, not taken from params.yaml: with the project's tuned defaults a random tiny model can
    # stop at once, and these tests compare answers, so they need text.
    args = ["--params", str(PARAMS), "--max-new-tokens", "6", "--repetition-penalty", "1.3"]
    args += ["--base", str(base)] if base else []
    args += ["--adapter", str(adapter)] if adapter else []
    return ask.build_parser().parse_args(args + list(argv))


def load(base, adapter, *argv):
    from stages.lib.config import load_params

    args = ask_args(*argv, base=base, adapter=adapter)
    params = load_params(PARAMS, ask.PARAMS)
    return ask.load_respondents(args, params["quant"]), ask.resolve_decoding(args, params["eval"]), \
        params["tokenize.system_prompt"]


def test_one_shot_prints_disclaimer_then_answer(tiny_base_dir, adapter_dir, capsys):
    assert ask.main(ask_args(QUESTION, base=tiny_base_dir, adapter=adapter_dir)) == 0
    out = capsys.readouterr().out
    assert out.startswith(ask.DISCLAIMER) and "not medical advice" in out
    assert "===" not in out  # labels only when comparing


@pytest.mark.parametrize("argv", [(), ("--no-repeat-ngram-size", "2", "--max-new-tokens", "24")])
def test_streamed_answer_is_the_evaluate_stages_answer(tiny_base_dir, adapter_dir, argv):
    """What `ask` shows is what the evaluate stage generates (and scores) for the same decoding params, the
    answer-only n-gram blocker included (the tiny random model loops without it)."""
    from stages.lib.evaluation.generation import generate_answers
    from stages.lib.model.chat import end_of_turn_ids, render_prompt_ids

    (tuned,), decoding, system = load(tiny_base_dir, adapter_dir, *argv)
    pieces: list[str] = []
    answer = ask.stream_answer(tuned, system, QUESTION, decoding, pieces.append)
    assert pieces and "".join(pieces).strip() == answer
    assert tuned.history == [(QUESTION, answer)]

    prompt = render_prompt_ids(tuned.tokenizer, system, QUESTION)
    (scored,) = generate_answers(tuned.model, tuned.tokenizer, [prompt], decoding, 1,
                                 end_of_turn_ids(tuned.tokenizer), progress=False)
    assert scored.text == answer
    if argv:
        bigrams = list(zip(scored.token_ids, scored.token_ids[1:]))
        assert len(bigrams) == len(set(bigrams)) > 0


def test_decoding_comes_from_the_eval_params(tmp_path):
    import yaml

    from stages.lib.config import load_params

    params = yaml.safe_load(PARAMS.read_text())
    params["eval"].update(no_repeat_ngram_size=5, repetition_penalty=1.05, max_new_tokens=77)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    ev = load_params(path, ask.PARAMS)["eval"]
    decoding = ask.resolve_decoding(ask.build_parser().parse_args(["--params", str(path)]), ev)
    assert (decoding.no_repeat_ngram_size, decoding.repetition_penalty, decoding.max_new_tokens) == (5, 1.05, 77)
    flagged = ask.resolve_decoding(ask.build_parser().parse_args(["--no-repeat-ngram-size", "0"]), ev)
    assert flagged.no_repeat_ngram_size == 0 and flagged.max_new_tokens == 77


def test_compare_labels_both_and_base_is_the_plain_base(tiny_base_dir, adapter_dir):
    respondents, decoding, system = load(tiny_base_dir, adapter_dir, "--compare")
    out = io.StringIO()
    base_answer, tuned_answer = ask.answer_all(respondents, system, QUESTION, decoding, out)
    text = out.getvalue()
    assert text.index("=== base ===") < text.index("=== fine-tuned ===")
    assert base_answer != tuned_answer  # the adapter's random B weights change greedy output

    # The base answer (same model, adapter switched off) equals what the base alone says.
    from stages.lib.config import load_params
    from stages.lib.model.loading import load_model_for_inference

    model, tok, _ = load_model_for_inference(tiny_base_dir, None, load_params(PARAMS, ("quant",))["quant"])
    alone = ask.stream_answer(ask.Respondent("base", model, tok), system, QUESTION, decoding, lambda _: None)
    assert alone == base_answer
    # Without --compare the adapter is folded in (float32 on CPU) for speed; the answer must not change.
    (merged,), _, _ = load(tiny_base_dir, adapter_dir)
    assert not any("lora" in name for name, _ in merged.model.named_parameters())
    assert ask.stream_answer(merged, system, QUESTION, decoding, lambda _: None) == tuned_answer


def test_sampling_repeats_for_a_seed(tiny_base_dir, adapter_dir, capsys):
    argv = [QUESTION, "--do-sample", "--temperature", "1.5", "--top-p", "0.95", "--max-new-tokens", "12"]
    outputs = []
    for seed in ("7", "7", "8"):
        assert ask.main(ask_args(*argv, "--seed", seed, base=tiny_base_dir, adapter=adapter_dir)) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_chat_keeps_history_and_resets(tiny_base_dir, adapter_dir, monkeypatch):
    seen = []
    real = ask.render_prompt_ids

    def spy(tokenizer, system_prompt, question, history=(), prompt_format="chat"):
        assert prompt_format == "chat"  # model.prompt_format in params.yaml, as the adapter records it
        seen.append((question, len(history)))
        return real(tokenizer, system_prompt, question, history, prompt_format)

    monkeypatch.setattr(ask, "render_prompt_ids", spy)
    lines = iter(["first question", "", "second question", "/reset", "third question", "/exit", "never read"])
    out = io.StringIO()
    assert ask.main(ask_args(base=tiny_base_dir, adapter=adapter_dir), read_line=lambda: next(lines), out=out) == 0
    assert seen == [("first question", 0), ("second question", 1), ("third question", 0)]
    assert out.getvalue().startswith(ask.DISCLAIMER) and "(conversation forgotten)" in out.getvalue()
    assert next(lines) == "never read"


def test_chat_ends_at_end_of_input(tiny_base_dir, adapter_dir):
    def read_line():
        raise EOFError

    assert ask.main(ask_args(base=tiny_base_dir, adapter=adapter_dir), read_line=read_line, out=io.StringIO()) == 0


def test_long_conversations_forget_the_oldest_turns(tiny_tokenizer):
    history = [("q1 " * 20, "a1 " * 20), ("q2", "a2")]
    short = len(ask.render_prompt_ids(tiny_tokenizer, "sys", "q3", history[1:]))
    ids = ask.fit_history(tiny_tokenizer, "sys", "q3", history, budget=short)
    assert len(ids) == short and history == [("q2", "a2")]
    with pytest.raises(ask.UsageError, match="too long"):
        ask.fit_history(tiny_tokenizer, "sys", "q3", [], budget=3)


def test_merged_model_answers_like_base_plus_adapter(tiny_base_dir, adapter_dir, tmp_path, capsys):
    from tools import export
    from stages.lib.serving.merge import merge_adapter

    (tuned,), decoding, system = load(tiny_base_dir, adapter_dir)
    expected = ask.stream_answer(tuned, system, QUESTION, decoding, lambda _: None)
    assert expected  # otherwise the comparison below would be empty

    # An exact (float32) merge, saved like an export, so greedy answers must agree token for token.
    merged, _, _ = merge_adapter(tiny_base_dir, adapter_dir, "float32", export.probe_ids(tuned.tokenizer, system))
    merged.save_pretrained(tmp_path / "merged")
    tuned.tokenizer.save_pretrained(tmp_path / "merged")
    shutil.copy(adapter_dir / BASE_MARKER, tmp_path / "merged" / BASE_MARKER)

    assert ask.main(ask_args(QUESTION, "--merged", str(tmp_path / "merged"), "--compare", base=tiny_base_dir)) == 0
    out = capsys.readouterr().out
    assert "=== fine-tuned (merged) ===" in out and out.rstrip().endswith(expected)


def corrupt(adapter_dir: Path, tmp_path: Path, marker: dict | None) -> Path:
    adapter = shutil.copytree(adapter_dir, tmp_path / "adapter")
    if marker is None:
        (adapter / BASE_MARKER).unlink()
    else:
        (adapter / BASE_MARKER).write_text(json.dumps(marker))
    return adapter


@pytest.mark.parametrize("case,message", [
    ("empty question", "the question is empty"),
    ("missing base", "no model in"),
    ("missing adapter", "no LoRA adapter in"),
    ("no checksum", "carries no base checksum"),
    ("other base", "trained on a different base model"),
    ("bad decoding", "temperature must be > 0"),
    ("merged without marker", "carries no base checksum"),
])
def test_bad_input_gives_one_clear_message(tiny_base_dir, adapter_dir, tmp_path, caplog, capsys, case, message):
    base, adapter, argv = tiny_base_dir, adapter_dir, [QUESTION]
    if case == "empty question":
        argv = ["   "]
    elif case == "missing base":
        base = tmp_path / "no-base"
    elif case == "missing adapter":
        adapter = tmp_path / "no-adapter"
    elif case == "no checksum":
        adapter = corrupt(adapter_dir, tmp_path, None)
    elif case == "other base":
        adapter = corrupt(adapter_dir, tmp_path, {"weights_sha256": "f" * 64})
    elif case == "bad decoding":
        argv += ["--temperature", "0"]
    elif case == "merged without marker":
        argv += ["--merged", str(tiny_base_dir), "--compare"]  # any model folder without base_model.json
    assert ask.main(ask_args(*argv, base=base, adapter=adapter)) == 2
    assert message in caplog.text
    assert capsys.readouterr().out == ""  # nothing half-printed before the error


def test_prompt_format_comes_from_params_and_must_match_the_adapter(tiny_base_dir, adapter_dir, tmp_path, caplog,
                                                                     monkeypatch):
    """An adapter trained with plain is asked in plain (history included), and refused under chat in one line."""
    import yaml

    plain = tmp_path / "adapter"
    shutil.copytree(adapter_dir, plain)
    marker = json.loads((plain / BASE_MARKER).read_text())
    (plain / BASE_MARKER).write_text(json.dumps({**marker, "prompt_format": "plain"}))
    assert ask.main(ask_args(QUESTION, base=tiny_base_dir, adapter=plain)) == 2
    (line,) = caplog.text.strip().splitlines()  # one line
    assert "model.prompt_format: plain, but params.yaml says chat" in line

    params = yaml.safe_load(PARAMS.read_text())
    params["model"]["prompt_format"] = "plain"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seen = []
    real = ask.render_prompt_ids

    def spy(tokenizer, system_prompt, question, history=(), prompt_format="chat"):
        ids = real(tokenizer, system_prompt, question, history, prompt_format)
        seen.append((prompt_format, len(history), tokenizer.decode(ids)))
        return ids

    monkeypatch.setattr(ask, "render_prompt_ids", spy)
    args = ask_args(base=tiny_base_dir, adapter=plain)
    args.params = str(tmp_path / "params.yaml")
    lines = iter(["first question", "second question", "/exit"])
    assert ask.main(args, read_line=lambda: next(lines), out=io.StringIO()) == 0
    assert [(f, n) for f, n, _ in seen] == [("plain", 0), ("plain", 1)]
    system = params["tokenize"]["system_prompt"]
    assert seen[1][2].startswith((system + "\n" if system else "") + "### Question:\nfirst question\n\n### Answer:\n")
    assert seen[1][2].endswith("<|im_end|>\n\n### Question:\nsecond question\n\n### Answer:\n")
