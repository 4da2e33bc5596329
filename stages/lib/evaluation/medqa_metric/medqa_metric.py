"""MedQA answer-quality metrics as an `evaluate` module:
`evaluate.load("stages/lib/evaluation/medqa_metric")`.

Kept in the repo because `evaluate.load("rouge")` fetches its script from the Hub. The module is copied into the
`evaluate` cache and imported from there, so it is self-contained (no project imports).

All scores are on a 0-1 scale:
- BLEU via sacrebleu (corpus level, 13a tokenization), plus the 1-4-gram precisions, brevity penalty and
  hypothesis/reference length ratio that reference 003 reports; a smoothed sentence BLEU per example for bootstraps.
- ROUGE-1/2/L/Lsum F1 via rouge-score, with Porter stemming, and without it (`*_nostem`, the HF `evaluate` rouge
  default, on the raw text). Lsum scores sentence by sentence; rouge-score splits sentences only on newlines, so
  the stemmed Lsum first puts each sentence on its own line. Corpus values are means of the per-example F1.
- BERTScore F1 (no baseline rescaling) when `bertscore_model` (a local model folder) is given.
- `loop_rate`: 1 for an answer that says one sentence, or one 8-word phrase, three times or more (a decoding loop:
  "X is caused by a combination of factors. X is caused by a combination of factors. ..."), else 0; its corpus
  value is the share of answers that loop.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "BLEU (sacrebleu), ROUGE-1/2/L/Lsum with and without stemming (rouge-score) and BERTScore F1."
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers (strings).
    references: one reference answer per prediction (strings).
    groups: optional label per example (a system name, a qtype); corpus values are then also returned per label
        under `by_group`. Scoring several systems in one call shares the BERTScore reference embeddings.
    rouge_types: subset of rouge1, rouge2, rougeL, rougeLsum to compute (() = no ROUGE, e.g. for BLEU alone).
    bertscore_model: local folder of a BERT-like model for BERTScore; None skips BERTScore.
    bertscore_layers: which layer's embeddings BERTScore uses (required with bertscore_model).
    bertscore_batch_size: pairs per BERTScore forward pass.
Returns:
    corpus values (bleu, bleu_precisions, brevity_penalty, length_ratio, translation_length, reference_length,
    rouge1, rouge2, rougeL, rougeLsum, the same with _nostem, bertscore_f1 when computed, and the mean
    sentence_bleu, loop_rate), `by_group` when groups are given, and `per_example`: {metric name: list of
    per-example scores} for sentence_bleu, loop_rate, every ROUGE variant and bertscore_f1.
"""
_CITATION = """Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018; Lin, ROUGE, ACL Workshop 2004;
Zhang et al., BERTScore: Evaluating Text Generation with BERT, ICLR 2020."""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? followed by whitespace; good enough for Lsum and needs no downloaded NLTK model.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line (existing line breaks kept), the input rouge-score's Lsum expects."""
    lines = (s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line))
    return "\n".join(s for s in lines if s)


LOOP_REPEATS = 3  # said this many times = a loop
LOOP_PHRASE_WORDS = 8  # a phrase this long said LOOP_REPEATS times is a loop even without sentence ends


def loops(text: str) -> bool:
    """True when the answer repeats one sentence, or one 8-word phrase, LOOP_REPEATS times or more (case, spacing
    and punctuation at the ends ignored)."""
    sentences = Counter(" ".join(s.lower().strip(" .!?,;:-").split()) for s in split_sentences(text).splitlines())
    if any(count >= LOOP_REPEATS for sentence, count in sentences.items() if sentence):
        return True
    words = re.findall(r"\w+", text.lower())
    phrases = Counter(tuple(words[i:i + LOOP_PHRASE_WORDS]) for i in range(len(words) - LOOP_PHRASE_WORDS + 1))
    return any(count >= LOOP_REPEATS for count in phrases.values())


def bleu_scores(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU and its parts, 0-1 scale."""
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(predictions, [references])
    return {
        "bleu": corpus.score / 100,
        "bleu_precisions": [p / 100 for p in corpus.precisions],
        "brevity_penalty": corpus.bp,
        "length_ratio": corpus.sys_len / corpus.ref_len if corpus.ref_len else 0.0,
        "translation_length": corpus.sys_len,
        "reference_length": corpus.ref_len,
    }


def sentence_bleu(predictions: list[str], references: list[str]) -> list[float]:
    import sacrebleu

    # sacrebleu's sentence BLEU smooths zero n-gram counts ("exp"), so short answers do not all score 0.
    return [sacrebleu.sentence_bleu(p, [r]).score / 100 for p, r in zip(predictions, references)]


def rouge_scores(predictions: list[str], references: list[str], rouge_types=ROUGE_TYPES) -> dict[str, list[float]]:
    """Per-example ROUGE F1, stemmed (`rouge1` ...) and unstemmed (`rouge1_nostem` ...)."""
    from rouge_score import rouge_scorer

    # rouge-score logs "Using default tokenizer." at INFO through absl for every scorer it builds.
    logging.getLogger("absl").setLevel(logging.WARNING)
    plain = [t for t in rouge_types if t != "rougeLsum"]
    out: dict[str, list[float]] = {}
    for stem, suffix in ((True, ""), (False, "_nostem")):
        scorer = rouge_scorer.RougeScorer(plain, use_stemmer=stem) if plain else None
        lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=stem)
        rows = []
        for pred, ref in zip(predictions, references):
            # rouge-score's argument order is (target, prediction).
            row = {k: v.fmeasure for k, v in scorer.score(ref, pred).items()} if scorer else {}
            if "rougeLsum" in rouge_types:
                if stem:
                    row["rougeLsum"] = lsum.score(split_sentences(ref), split_sentences(pred))["rougeLsum"].fmeasure
                elif "\n" not in ref and "\n" not in pred and "rougeL" in row:
                    row["rougeLsum"] = row["rougeL"]  # one "sentence" each: summary-level LCS is plain LCS
                else:
                    row["rougeLsum"] = lsum.score(ref, pred)["rougeLsum"].fmeasure
            rows.append(row)
        for name in rouge_types:
            out[name + suffix] = [row[name] for row in rows]
    return out


def bertscore_f1(predictions: list[str], references: list[str], model: str, layers: int,
                 batch_size: int) -> list[float]:
    import bert_score

    # bert-score crashes on an empty string with current transformers; its own rule for empty text is a score of 0.
    keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    f1 = [0.0] * len(predictions)
    if keep:
        _, _, scores = bert_score.score([predictions[i] for i in keep], [references[i] for i in keep],
                                        model_type=str(model), num_layers=int(layers), batch_size=batch_size,
                                        verbose=True)  # bert-score's own progress bars (embedding, matching)
        for i, value in zip(keep, scores.tolist()):
            f1[i] = float(value)
    return f1


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MedqaMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/mjpost/sacrebleu",
                           "https://github.com/google-research/google-research/tree/master/rouge",
                           "https://github.com/Tiiiger/bert_score"],
        )

    def _compute(self, predictions, references, groups=None, rouge_types=ROUGE_TYPES, bertscore_model=None,
                 bertscore_layers=None, bertscore_batch_size=16):
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if groups is not None and len(groups) != len(predictions):
            raise ValueError(f"{len(groups)} group labels for {len(predictions)} predictions")
        unknown = sorted(set(rouge_types) - set(ROUGE_TYPES))
        if unknown:
            raise ValueError(f"unknown rouge_types {unknown} (known: {list(ROUGE_TYPES)})")
        predictions = [p or "" for p in predictions]
        references = [r or "" for r in references]
        per_example = {"sentence_bleu": sentence_bleu(predictions, references),
                       "loop_rate": [float(loops(p)) for p in predictions],
                       **rouge_scores(predictions, references, tuple(rouge_types))}
        if bertscore_model is not None:
            if bertscore_layers is None:
                raise ValueError("bertscore_layers is required with bertscore_model")
            per_example["bertscore_f1"] = bertscore_f1(predictions, references, bertscore_model, bertscore_layers,
                                                       bertscore_batch_size)

        def corpus(idx: list[int]) -> dict:
            values = bleu_scores([predictions[i] for i in idx], [references[i] for i in idx])
            values.update({name: sum(v[i] for i in idx) / len(idx) for name, v in per_example.items()})
            return values

        out = corpus(list(range(len(predictions))))
        if groups is not None:
            # Several systems (or strata) in one call: per-example scores are computed once, and BERTScore embeds
            # each distinct reference once, however many systems answer it.
            members: dict = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            out["by_group"] = {g: corpus(idx) for g, idx in members.items()}
        out["per_example"] = per_example
        return out
