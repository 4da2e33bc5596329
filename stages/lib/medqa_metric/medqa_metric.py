"""MedQA answer-quality metrics as an `evaluate` module: load it with `evaluate.load("stages/lib/medqa_metric")`.

Kept in the repo because `evaluate.load("rouge")` fetches its script from the Hub. The module is copied into the
`evaluate` cache and imported from there, so it is self-contained (no project imports).

All scores are on a 0-1 scale:
- BLEU via sacrebleu (corpus level, 13a tokenization), plus the 1-4-gram precisions, brevity penalty and
  hypothesis/reference length ratio that reference 003 reports; a smoothed sentence BLEU per example for bootstraps.
- ROUGE-1/2/L/Lsum F1 via rouge-score, with Porter stemming, and without it (`*_nostem`, the HF `evaluate` rouge
  default, on the raw text). Lsum scores sentence by sentence; rouge-score splits sentences only on newlines, so
  the stemmed Lsum first puts each sentence on its own line. Corpus values are means of the per-example F1.
- BERTScore F1 (no baseline rescaling) when `bertscore_model` (a local model folder) is given.
"""

from __future__ import annotations

import re

import datasets
import evaluate

_DESCRIPTION = "BLEU (sacrebleu), ROUGE-1/2/L/Lsum with and without stemming (rouge-score) and BERTScore F1."
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers (strings).
    references: one reference answer per prediction (strings).
    bertscore_model: local folder of a BERT-like model for BERTScore; None skips BERTScore.
    bertscore_layers: which layer's embeddings BERTScore uses (required with bertscore_model).
    bertscore_batch_size: pairs per BERTScore forward pass.
Returns:
    corpus values (bleu, bleu_precisions, brevity_penalty, length_ratio, translation_length, reference_length,
    rouge1, rouge2, rougeL, rougeLsum, the same with _nostem, bertscore_f1 when computed) and `per_example`:
    {metric name: list of per-example scores} for sentence_bleu, every ROUGE variant and bertscore_f1.
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


def bleu_scores(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(predictions, [references])
    sentence = [sacrebleu.sentence_bleu(p, [r]).score / 100 for p, r in zip(predictions, references)]
    return {
        "bleu": corpus.score / 100,
        "bleu_precisions": [p / 100 for p in corpus.precisions],
        "brevity_penalty": corpus.bp,
        "length_ratio": corpus.sys_len / corpus.ref_len if corpus.ref_len else 0.0,
        "translation_length": corpus.sys_len,
        "reference_length": corpus.ref_len,
        "per_example": {"sentence_bleu": sentence},
    }


def rouge_scores(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer

    per_example: dict[str, list[float]] = {}
    for stem, suffix in ((True, ""), (False, "_nostem")):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
        rows = []
        for pred, ref in zip(predictions, references):
            # rouge-score's argument order is (target, prediction).
            row = {k: v.fmeasure for k, v in scorer.score(ref, pred).items()}
            if stem:
                row["rougeLsum"] = scorer.score(split_sentences(ref), split_sentences(pred))["rougeLsum"].fmeasure
            rows.append(row)
        for name in ROUGE_TYPES:
            per_example[name + suffix] = [row[name] for row in rows]
    out = {name: sum(v) / len(v) for name, v in per_example.items()}
    out["per_example"] = per_example
    return out


def bertscore_f1(predictions: list[str], references: list[str], model: str, layers: int, batch_size: int) -> list[float]:
    import bert_score

    # bert-score crashes on an empty string with current transformers; its own rule for empty text is a score of 0.
    keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    f1 = [0.0] * len(predictions)
    if keep:
        _, _, scores = bert_score.score([predictions[i] for i in keep], [references[i] for i in keep],
                                        model_type=str(model), num_layers=int(layers), batch_size=batch_size,
                                        verbose=False)
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
            codebase_urls=["https://github.com/mjpost/sacrebleu", "https://github.com/google-research/google-research/tree/master/rouge",
                           "https://github.com/Tiiiger/bert_score"],
        )

    def _compute(self, predictions, references, bertscore_model=None, bertscore_layers=None, bertscore_batch_size=16):
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        predictions = [p or "" for p in predictions]
        references = [r or "" for r in references]
        bleu = bleu_scores(predictions, references)
        rouge = rouge_scores(predictions, references)
        out = {k: v for k, v in {**bleu, **rouge}.items() if k != "per_example"}
        out["per_example"] = {**bleu["per_example"], **rouge["per_example"]}
        if bertscore_model is not None:
            if bertscore_layers is None:
                raise ValueError("bertscore_layers is required with bertscore_model")
            f1 = bertscore_f1(predictions, references, bertscore_model, bertscore_layers, bertscore_batch_size)
            out["bertscore_f1"] = sum(f1) / len(f1)
            out["per_example"]["bertscore_f1"] = f1
        return out
