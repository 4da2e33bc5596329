"""The answer-only n-gram blocker as it was first written (Python, one row at a time, with a copy of the answer to
the host every step): the tests' oracle for the vectorized `evaluation.generation.AnswerNGramBlocker`, and the
"today's path" row of benchmarks/bench_generation.py."""

from __future__ import annotations


class LoopNGramBlocker:
    """Same bans as AnswerNGramBlocker, found with a per-row dict of the n-grams seen so far."""

    def __init__(self, n: int, prompt_width: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.prompt_width = n, prompt_width
        self.seen: list[dict[tuple, set[int]]] = []
        self.done = 0  # answer tokens already indexed

    def __call__(self, input_ids, scores):
        answer = input_ids[:, self.prompt_width:].tolist()
        if not self.seen:
            self.seen = [{} for _ in answer]
        n, length = self.n, len(answer[0]) if answer else 0
        for row, tokens in enumerate(answer):
            index = self.seen[row]
            for end in range(max(self.done, n - 1), length):  # the n-grams that end at the new tokens
                index.setdefault(tuple(tokens[end - n + 1:end]), set()).add(tokens[end])
            if length >= n - 1:
                banned = index.get(tuple(tokens[length - n + 1:]) if n > 1 else (), ())
                if banned:
                    scores[row, list(banned)] = float("-inf")
        self.done = length
        return scores
