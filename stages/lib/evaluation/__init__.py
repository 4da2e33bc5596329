"""Evaluation: generating answers, metrics and confidence intervals, the retrieval baseline, the markdown report."""
