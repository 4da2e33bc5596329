"""Normalization of MedQuAD questions and answers, and the grouping key of the split."""

import pytest

from stages.lib.data.text import normalize_answer, normalize_key, normalize_question


def test_answer_collapses_spaces_tabs_and_nbsp_inside_lines():
    assert normalize_answer("Key  points\t\there.\u00a0 Next\u00a0\u00a0sentence.") == "Key points here. Next sentence."


def test_answer_keeps_paragraph_breaks_as_single_newlines():
    raw = "Key Points\n                    - First point.    - Second.\n   \n\n\n        Second paragraph.   "
    assert normalize_answer(raw) == "Key Points\n- First point. - Second.\nSecond paragraph."


def test_answer_text_is_otherwise_intact():
    text = 'Dose: 5–10 mg/kg (≥ 2 "doses"); see https://example.org/a?b=1. Café µ°.'
    assert normalize_answer(text) == text


@pytest.mark.parametrize("raw,expected", [
    ("What is (are) Glaucoma ?", "What is (are) Glaucoma?"),
    ("Who is at risk for Parasites - Taeniasis? ?", "Who is at risk for Parasites - Taeniasis?"),
    ("What causes X ? ?", "What causes X?"),
    ("what is  holmes-adie\u00a0syndrome ?", "what is holmes-adie syndrome?"),
    ("Do you have information about Aspirin", "Do you have information about Aspirin"),
    ("  What are the\n symptoms of Y ?  ", "What are the symptoms of Y?"),
])
def test_question_artefacts_are_fixed(raw, expected):
    assert normalize_question(raw) == expected


@pytest.mark.parametrize("text", ["What causes X? ?", "A\n\n  b\tc", "plain"])
def test_normalization_is_idempotent(text):
    assert normalize_question(normalize_question(text)) == normalize_question(text)
    assert normalize_answer(normalize_answer(text)) == normalize_answer(text)


def test_key_ignores_case_punctuation_spacing_and_unicode_form():
    assert normalize_key("What is (are) High Blood Pressure?") == normalize_key("what is are high  blood pressure ?")
    assert normalize_key("Fixture\u00a0Adie") == normalize_key("fixture adie")
    assert normalize_key("ﬁbrosis") == normalize_key("FIBROSIS")  # NFKC folds the ligature


def test_key_keeps_different_texts_apart():
    assert normalize_key("What causes Gout?") != normalize_key("What causes Goiter?")
    assert normalize_key("") == "" and normalize_key(" ?! ") == ""
