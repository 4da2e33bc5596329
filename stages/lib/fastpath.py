"""Speed levers for training that change how the work is done, never the work itself.

- `plan_packed_batches` + `collate_packed`: padding-free packing. Examples are concatenated into one row up to a
  token budget (best-fit decreasing), position ids restart at 0 per example and the first label of every example is
  -100, so no token is trained to predict the next example. The batch also carries `cu_seq_lens_*`/`max_length_*`
  (the flash-attention varlen kwargs transformers passes down to the attention function).
- `register_varlen_attention`: an attention implementation that runs packed rows through
  `torch.nn.attention.varlen.varlen_attn` (PyTorch's own flash varlen kernel, no flash-attn wheel needed), so
  attention costs sum(len_i^2) and no [T, T] mask is built. transformers' plain "sdpa" also honours packed
  position ids (masking_utils.find_packed_sequence_indices -> a block-diagonal boolean mask), but that mask is dense,
  so attention then costs T^2 and T^2 bytes: fine for short rows, wasteful for 16k-token rows.
- `fused_linear_cross_entropy` / `causal_lm_loss`: the causal-LM loss from the final hidden states in chunks, only on
  positions whose label is not -100, computing the gradient during the forward pass (Liger-style), so the
  [tokens, vocab] fp32 logits never exist. At a 128k vocabulary they dominate memory otherwise.
  `add_chunked_loss_forward` puts it inside a model's own forward, so a Trainer and its DDP/PEFT wrappers use it.
- `disable_lora_input_casting`: keeps LoRA inputs in bf16 under autocast (PEFT otherwise copies every LoRA input to
  the fp32 adapter dtype). `freeze_for_lora`: the kbit preparation without its fp32 upcast.

Batched generation lives in generation.py (the evaluate stage's), so the train stage does not depend on it.

Packing and varlen attention are CUDA levers (on a 2-core CPU they measured slower than padded batches). The
chunked CE pays on both: in the train stage it replaces TRL's fused LM head, and on the CPU default it made steps
1.3-1.5x faster with 20% less memory and the same losses (benchmarks/README.md). Packed batches must run with
use_cache=False: with a KV cache transformers skips packed-sequence detection and examples attend to each other.

Functions over token-id lists, tensors and models: no file paths, no params (stages/lib/speedups.py
maps params onto them).
"""

from __future__ import annotations

import functools
import inspect
import logging
from bisect import bisect_left, insort
from typing import Sequence

from stages.lib.chat import IGNORE_INDEX

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "varlen_sdpa"


# ----------------------------------------------------------------------------------------------------- packing


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


# ---------------------------------------------------------------------------------------- chunked cross-entropy


@functools.lru_cache(maxsize=None)
def _fused_linear_ce_function():
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """Summed CE of (hidden @ weight.T) against labels, one chunk of rows at a time.

        The forward pass also computes d(loss)/d(hidden) (and d/d(weight) if it needs a gradient) chunk by chunk,
        so only one chunk of fp32 logits is alive at any time; backward just scales the stored gradients.
        """

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk_size):
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax for bf16/fp16, as HF upcasts
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size]
                y = labels[start:start + chunk_size]
                logits = (h @ w.t()).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    # d(sum CE)/d(logits) = softmax - onehot, computed in place over the logits buffer.
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                    g = probs.to(h.dtype)
                    if need_h:
                        grad_h[start:start + chunk_size] = g @ w
                    if need_w:
                        grad_w += g.t().to(acc) @ h.to(acc)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
            dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
            return dh, dw, None, None

    return FusedLinearCrossEntropy


def fused_linear_cross_entropy(hidden, weight, labels, chunk_size: int = 1024):
    """Summed cross-entropy of hidden [N, d] @ weight[V, d].T against labels [N] (no ignored labels here)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _fused_linear_ce_function().apply(hidden, weight, labels, chunk_size)


def shifted_label_positions(hidden, labels):
    """(hidden at positions that predict a real label, those labels): the causal shift, ignoring -100."""
    h = hidden[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


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
    total = fused_linear_cross_entropy(h, causal_lm.get_output_embeddings().weight, y, chunk_size)
    return total / (num_items if num_items is not None else max(int(y.numel()), 1))


# Config fields that rescale or cap the logits (Gemma 2, Cohere, Granite, Falcon-H1 ...): the chunked CE
# computes plain hidden @ weight.T, so it would score those models' logits wrongly.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def chunked_loss_unsupported(model) -> str | None:
    """Why `add_chunked_loss_forward` cannot reproduce this causal LM's loss, or None when it can."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return f"{type(model).__name__} has no output embedding weight"
    if getattr(head, "bias", None) is not None:
        return "the output head has a bias"
    config = model.config.get_text_config()
    found = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    return f"the model transforms its logits ({', '.join(found)})" if found else None


def add_chunked_loss_forward(model, chunk_size: int = 1024) -> None:
    """Patch `model.forward` (a causal LM instance) so `model(..., labels=labels, chunked_loss=True)` returns the
    token-mean loss from `fused_linear_cross_entropy` over the final hidden states, with logits None.

    The loss is computed inside the model's own forward, not next to it, so whatever wraps the model (PEFT, DDP,
    accelerate's autocast) still runs: DDP syncs gradients only for work done inside its forward. The sum is divided
    by `num_items_in_batch` when given (the label tokens of the whole optimizer step, across micro-batches and
    ranks), else by this batch's label tokens, as transformers' own causal-LM loss does. Without `chunked_loss` the
    previous forward runs unchanged (generation, TRL's fused head).
    """
    import types

    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    reason = chunked_loss_unsupported(model)
    if reason:
        raise ValueError(f"chunked loss cannot reproduce this model's loss: {reason}")
    previous = model.forward

    # Keep the class forward's signature: generate() validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, chunked_loss=False, labels=None, num_items_in_batch=None, **kwargs):
        if not chunked_loss:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return previous(*args, **kwargs)
        if labels is None:
            raise ValueError("chunked_loss=True needs labels")
        kwargs["use_cache"] = False  # a KV cache turns off packed-sequence separation (module docstring)
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        h, y = shifted_label_positions(hidden, labels.to(hidden.device))
        # Looked up per call: PEFT and FSDP replace modules after the patch
        total = fused_linear_cross_entropy(h, self.get_output_embeddings().weight, y, chunk_size)
        count = torch.as_tensor(y.numel() if num_items_in_batch is None else num_items_in_batch)
        # clamped like TRL's loss: a step without label tokens gives a finite zero, not 0 / 0
        return CausalLMOutputWithPast(loss=total / count.clamp(min=1), logits=None)

    model.forward = types.MethodType(forward, model)


# ------------------------------------------------------------------------------------------- varlen attention


def _cu_seqlens_from_position_ids(position_ids):
    import torch

    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        return None, None
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()], device=pos.device)])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu, int((ends - starts).max())


def _varlen_reference(q, k, v, cu, scale):
    """Per-sequence SDPA: the same result as the flash varlen kernel, for CPU (and tests)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=qs.shape[1] != ks.shape[1])[0].transpose(0, 1)
    return out


@functools.lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    from torch.nn.attention import varlen

    return frozenset(inspect.signature(varlen.varlen_attn).parameters)


def _varlen_flash(q, k, v, cu, max_len, scale):
    from torch.nn.attention import varlen

    params = _varlen_params()
    kwargs = {"scale": scale} if "scale" in params else {}
    # The causal flag moved from is_causal (torch 2.10/2.11) to window_size=(-1, 0) (later releases).
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen.varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention function: packed rows through the varlen kernel, everything else through SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    same_len = query.shape[2] == key.shape[2]
    if cu is None and attention_mask is None and position_ids is not None and query.shape[0] == 1 and same_len:
        cu, max_len = _cu_seqlens_from_position_ids(position_ids)
    if cu is None or attention_mask is not None or query.shape[0] != 1 or not same_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout and module.training:
        raise ValueError("varlen attention does not implement attention dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    cu = cu.to(device=q.device, dtype=torch.int32)
    max_len = int(max_len)
    dtype = _flash_dtype(q)
    if dtype is not None:
        q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
        out = _varlen_flash(q, k, v, cu, max_len, scaling)
    else:
        out = _varlen_reference(q, k, v, cu, scaling)
    return out[None], None  # [1, T, H, D], as sdpa_attention_forward returns


def _flash_dtype(q):
    """The dtype the flash kernel runs q/k/v in, or None where it cannot run (CPU, no kernel, fp32 compute).

    Under autocast that is autocast's dtype, as SDPA does: with fp32 norms (PEFT's kbit preparation) the rotary
    embedding leaves q and k in fp32 and v in bf16, which the kernel (fp16/bf16 only) would reject.
    """
    import torch

    if not (q.is_cuda and varlen_available()):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _varlen_mask(*args, **kwargs):
    """No mask for packed/unpadded rows (the kernel knows the boundaries); SDPA's mask when there is padding."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> str:
    """Register the varlen attention (and its mask function) with transformers; returns its name.

    Use it with `attn_implementation=VARLEN_ATTENTION` (or `model.set_attn_implementation`). Packed batches from
    `collate_packed` then skip the dense [T, T] mask. Padded batches, generation and CPU keep working (SDPA / a
    per-sequence reference).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


@functools.lru_cache(maxsize=None)
def varlen_available() -> bool:
    """Whether this torch ships the flash varlen kernel (CUDA only; CPU uses the per-sequence reference)."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ model setup


def disable_lora_input_casting(model) -> int:
    """Stop PEFT from copying each LoRA input to the (fp32) adapter dtype; autocast picks the matmul dtype instead.

    Returns the number of LoRA layers changed. Needs `torch.autocast` around forward when adapters are fp32.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def freeze_for_lora(model, gradient_checkpointing: bool) -> None:
    """What prepare_model_for_kbit_training does, minus its fp32 upcast of embeddings, lm_head and norms.

    The upcast doubles their memory (2 x 2.1 GB at Llama-3-8B's 128k vocabulary) and makes the lm_head matmul run
    in fp32; LoRA trains the same without it. Non-reentrant checkpointing needs no input-grad hook.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
