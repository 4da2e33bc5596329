"""Batch helpers for benchmarks and tests, not for the train stage (TRL's collator builds its batches).

A best-fit-decreasing packing planner, packed and padded collators, and a reference token-mean loss through the
chunked CE, so benchmarks can time one step of each layout without a Trainer and tests can check the fused loss
against the model's own. Nothing in dvc.yaml depends on this module: editing it reruns no stage.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

from stages.lib.model.chat import IGNORE_INDEX
from stages.lib.training.chunked_loss import fused_linear_cross_entropy, logit_softcap, shifted_label_positions


def plan_packed_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices; each bin's total length is <= token_budget.

    Longest first, each into the fullest bin that still has room, so bins come out nearly full and the
    longest example always has a bin of its own size class. Order inside a bin is by decreasing length.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) are longer than token_budget={token_budget} "
                         f"(longest {max(lengths)}); raise the budget to at least the max length")
    if any(n <= 0 for n in lengths):
        raise ValueError("every example needs at least one token")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted: bisect finds the tightest fit
    for i in order:
        n = lengths[i]
        pos = bisect_left(free, (n, -1))
        if pos == len(free):
            bins.append([i])
            insort(free, (token_budget - n, len(bins) - 1))
        else:
            room, b = free.pop(pos)
            bins[b].append(i)
            insort(free, (room - n, b))
    return bins


def collate_packed(examples: Sequence[dict], varlen_kwargs: bool = True) -> dict:
    """One packed row [1, T] from examples {"input_ids": [...], "labels": [...]}.

    position_ids restart at 0 for every example; the first label of each example is -100 (after the causal shift it
    would be predicted from the previous example's last token). With varlen_kwargs, also the cumulative sequence
    lengths and the longest example, as int32 tensor / Python ints (the flash-attention kwargs).
    """
    import torch

    ids, labels, pos, lens = [], [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        if n == 0 or len(ex["labels"]) != n:
            raise ValueError("each example needs input_ids and labels of the same, non-zero length")
        ids.extend(ex["input_ids"])
        labels.append(IGNORE_INDEX)
        labels.extend(ex["labels"][1:])
        pos.extend(range(n))
        lens.append(n)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
    }
    if varlen_kwargs:
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(lens), max_length_k=max(lens))
    return batch


def collate_padded(examples: Sequence[dict], pad_id: int, side: str = "right") -> dict:
    """The usual padded batch: input_ids, attention_mask and labels (-100 on padding) of shape [B, longest]."""
    import torch

    if side not in ("right", "left"):
        raise ValueError(f"side must be right or left, got {side!r}")
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(ex["input_ids"])
        labels[row, cols] = torch.tensor(ex["labels"])
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_label_tokens(batch: dict) -> int:
    """Tokens that contribute to the loss after the causal shift (the normaliser of a token-mean loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model, batch: dict, chunk_size: int = 1024, num_items: int | None = None):
    """Token-mean causal-LM loss of a (packed or padded) batch without materialising the full logits.

    Runs the decoder of `model` (a causal LM or a PEFT wrapper around one), then the chunked CE against the output
    embedding. Equal to `model(**batch).loss` up to float rounding; `num_items` overrides the normaliser (gradient
    accumulation over micro-batches must divide by the tokens of the whole step).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    h, y = shifted_label_positions(hidden, batch["labels"])
    total = fused_linear_cross_entropy(h, causal_lm.get_output_embeddings().weight, y, chunk_size,
                                       logit_softcap(causal_lm))
    return total / (num_items if num_items is not None else max(int(y.numel()), 1))
