"""Option log-likelihood scoring (on the tiny random model) and the multiple-choice metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.lib.evaluation.mcq_metrics import (align_rows, headline, macro_f1, per_subject_rows, predict,
                                               suite_metrics)

SYSTEM = "You are a careful medical information assistant."


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_base_dir)


def direct_logprob(model, prompt: list[int], cont: list[int]) -> float:
    """log P(cont | prompt) from one plain forward pass over prompt + cont, no cache, no padding."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(cont))


def _record(options, answer=0, **kw):
    return {"id": "r1", "suite": "mmlu", "subject": "anatomy", "question": "What causes diabetes?", "context": None,
            "options": options, "answer_index": answer, "pool": "test", **kw}


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_scores_equal_a_direct_forward_pass(tiny, prompt_format):
    from stages.lib.data.mcq import question_text
    from stages.lib.evaluation.mcq import encode_option, render_question_ids, score_continuations

    model, tok = tiny
    rec = _record(["Problems with insulin.", "Eat healthy food and exercise every day of the week.", "Cancer"])
    prompt = render_question_ids(tok, SYSTEM, rec, [], prompt_format, question_text)
    options = [encode_option(tok, o) for o in rec["options"]]
    assert len({len(o) for o in options}) > 1  # unequal lengths: the padding path is exercised
    scores = score_continuations(model, prompt, options)
    for score, cont in zip(scores, options):
        assert score.n_tokens == len(cont)
        assert score.logprob == pytest.approx(direct_logprob(model, prompt, cont), abs=1e-4)


def test_scores_do_not_depend_on_the_other_options_or_their_order(tiny):
    from stages.lib.evaluation.mcq import encode_option, score_continuations

    model, tok = tiny
    prompt = list(tok("What are the symptoms of glaucoma?")["input_ids"])
    texts = ["Glaucoma often has no symptoms at first.", "Surgery", "About 1 in 10,000 people are affected."]
    options = [encode_option(tok, t) for t in texts]
    together = [s.logprob for s in score_continuations(model, prompt, options)]
    alone = [score_continuations(model, prompt, [o])[0].logprob for o in options]
    reversed_ = [s.logprob for s in score_continuations(model, prompt, options[::-1])][::-1]
    assert together == pytest.approx(alone, abs=1e-4) and together == pytest.approx(reversed_, abs=1e-4)


def test_single_token_options_need_no_second_pass(tiny):
    from stages.lib.evaluation.mcq import score_continuations

    model, tok = tiny
    prompt = list(tok("Is this condition inherited?")["input_ids"])
    yes, no = (tok(word, add_special_tokens=False)["input_ids"][:1] for word in ("yes", "no"))
    scores = score_continuations(model, prompt, [yes, no])
    assert [s.logprob for s in scores] == pytest.approx([direct_logprob(model, prompt, c) for c in (yes, no)],
                                                        abs=1e-4)


def test_shots_are_earlier_turns_answered_with_their_correct_option(tiny):
    from stages.lib.data.mcq import question_text
    from stages.lib.evaluation.mcq import render_question_ids

    model, tok = tiny
    shot = _record(["wrong one", "Insulin problems"], answer=1, id="s1", question="What is asthma?", pool="shots")
    ids = render_question_ids(tok, SYSTEM, _record(["a", "b"]), [shot], "chat", question_text)
    text = tok.decode(ids)
    assert "What is asthma?" in text and "Insulin problems" in text and "wrong one" not in text
    assert text.index("What is asthma?") < text.index("What causes diabetes?")


def test_a_prompt_over_the_context_window_is_refused(tiny):
    from stages.lib.data.mcq import question_text
    from stages.lib.evaluation.mcq import score_records

    model, tok = tiny
    with pytest.raises(ValueError, match="r1: prompt .* exceed the 8-token context window; lower mcq.k_shot"):
        score_records(model, tok, [_record(["a", "b"])], {}, SYSTEM, "chat", question_text, context_window=8)


# ---------------------------------------------------------------- metrics


def _row(i, logprob, n_tokens, answer, suite="pubmedqa", subject="pqa-l"):
    return {"id": f"q{i}", "suite": suite, "subject": subject, "answer_index": answer, "logprob": logprob,
            "n_tokens": n_tokens, "prompt_tokens": 10}


def test_raw_and_per_token_can_disagree():
    row = _row(0, [-4.0, -3.0], [4, 1], 0)
    assert predict(row, "raw") == 1       # -3 > -4
    assert predict(row, "per_token") == 0  # -1 per token > -3
    assert predict(_row(0, [-2.0, -2.0], [1, 1], 0), "raw") == 0  # ties: the first option


def test_macro_f1_by_hand():
    # gold yes yes no maybe; predicted yes no no yes: F1 yes 2*1/(2+2)=0.5, no 2*1/(2+1)=2/3, maybe 0
    assert macro_f1([0, 1, 1, 0], [0, 0, 1, 2], 3) == pytest.approx((0.5 + 2 / 3 + 0) / 3)


def test_suite_metrics_baselines_and_paired_difference():
    gold = [0, 0, 0, 1, 2, 0, 1, 0]
    base = [_row(i, [-1.0 if j == 0 else -2.0 for j in range(3)], [1, 1, 1], g) for i, g in enumerate(gold)]
    finetuned = [_row(i, [-1.0 if j == g else -2.0 for j in range(3)], [1, 1, 1], g) for i, g in enumerate(gold)]
    m = suite_metrics(base, finetuned, 500, seed=1)
    assert m["n"] == 8 and m["chance"] == pytest.approx(1 / 3)
    assert m["majority"]["option_index"] == 0 and m["majority"]["accuracy"] == 5 / 8
    raw = m["raw"]
    assert raw["base"]["accuracy"] == 5 / 8 and raw["finetuned"]["accuracy"] == 1.0  # base always says "yes"
    assert raw["delta"]["mean"] == pytest.approx(3 / 8)
    assert raw["delta"]["ci95_low"] <= 3 / 8 <= raw["delta"]["ci95_high"] and raw["delta"]["ci95_low"] > 0
    assert raw["base"]["macro_f1"] == pytest.approx(m["majority"]["macro_f1"])
    assert raw["finetuned"]["macro_f1"] == 1.0
    numbers = headline({"pubmedqa": m}, "raw")["pubmedqa"]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values())
    assert numbers["majority"] == 5 / 8 and "finetuned_macro_f1" in numbers


def test_rows_of_different_questions_are_refused():
    base = [_row(0, [-1.0, -2.0], [1, 1], 0), _row(1, [-1.0, -2.0], [1, 1], 1)]
    with pytest.raises(ValueError, match="not of the same questions"):
        align_rows(base, base[:1])
    flipped = [dict(base[0], answer_index=1), base[1]]
    with pytest.raises(ValueError, match="q0: the base and fine-tuned rows disagree"):
        align_rows(base, flipped)
    assert align_rows(base, base[::-1]) == base


def test_per_subject_rows():
    base = [_row(i, [-1.0, -2.0], [1, 1], i % 2, suite="mmlu", subject=s) for i, s in enumerate("aabb")]
    rows = per_subject_rows(base, base, "raw")
    assert [(r["subject"], r["n"], r["base_accuracy"], r["delta"]) for r in rows] == [("a", 2, 0.5, 0.0),
                                                                                       ("b", 2, 0.5, 0.0)]
    assert np.isclose(sum(r["n"] for r in rows), 4)
