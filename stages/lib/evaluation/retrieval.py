"""Retrieval baseline: answer a question with the training answer of the most similar training question.

MedQuAD answers follow per-qtype templates, so copying a neighbour's answer already scores well on ROUGE; a
fine-tuned model is only interesting if it beats this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Retrieved:
    index: int         # position of the nearest training question
    similarity: float  # cosine similarity of the TF-IDF vectors (0 = nothing shared)


def nearest_questions(train_questions: Sequence[str], queries: Sequence[str]) -> list[Retrieved]:
    """For each query, the most similar training question by TF-IDF cosine (ties: the earliest one).

    Word unigrams and bigrams with sublinear tf: bigrams separate "symptoms of X" from "causes of X", sublinear tf
    keeps a repeated disease name from dominating. The vocabulary comes from the training questions only.
    """
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not train_questions:
        raise ValueError("retrieval needs at least one training question")
    if not queries:
        return []
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    train = vectorizer.fit_transform(train_questions)
    query = vectorizer.transform(queries)
    # Rows are L2-normalised, so the sparse dot product is the cosine similarity.
    sims = (query @ train.T).toarray()
    best = np.argmax(sims, axis=1)  # argmax returns the first maximum: deterministic ties
    return [Retrieved(int(i), float(sims[row, i])) for row, i in enumerate(best)]


def retrieve_answers(train_questions: Sequence[str], train_answers: Sequence[str],
                     queries: Sequence[str]) -> list[str]:
    """The training answer of each query's nearest training question."""
    if len(train_questions) != len(train_answers):
        raise ValueError(f"{len(train_questions)} training questions but {len(train_answers)} answers")
    return [train_answers[r.index] for r in nearest_questions(train_questions, queries)]
