"""Chunked cross-entropy: the causal-LM loss from the final hidden states, chunk by chunk, only on positions whose
label is not -100, with the gradient computed during the forward pass (Liger-style), so the [tokens, vocab] fp32
logits never exist. At a 128k vocabulary they dominate memory otherwise.

`add_chunked_loss_forward` puts it inside a model's own forward, so a Trainer and its DDP/PEFT wrappers use it;
`chunked_loss_trainer` is TRL's SFTTrainer calling it. Written here rather than taken from Liger because Liger's
kernel needs Triton (no CPU path) and the stage runs one loss on CPU and GPU. Measured: benchmarks/README.md.
"""

from __future__ import annotations

import functools

from stages.lib.model.chat import IGNORE_INDEX


@functools.cache
def _fused_linear_ce_function():
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """Summed CE of (hidden @ weight.T) against labels, one chunk of rows at a time.

        The forward pass also computes d(loss)/d(hidden) (and d/d(weight) if it needs a gradient) chunk by chunk,
        so only one chunk of fp32 logits is alive at any time; backward just scales the stored gradients.
        """

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk_size, softcap=None):
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
                if softcap is not None:
                    # Gemma 2/3's final soft-capping, as their forward applies it: softcap * tanh(logits / softcap)
                    capped = logits.div_(softcap).tanh_()
                    logits = capped * softcap
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    # d(sum CE)/d(logits) = softmax - onehot, computed in place over the logits buffer.
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                    if softcap is not None:
                        probs.mul_(1.0 - capped * capped)  # d(softcap * tanh(z / softcap)) / dz
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
            return dh, dw, None, None, None

    return FusedLinearCrossEntropy


def fused_linear_cross_entropy(hidden, weight, labels, chunk_size: int = 1024, softcap: float | None = None):
    """Summed cross-entropy of hidden [N, d] @ weight[V, d].T against labels [N] (no ignored labels here);
    `softcap`: the logits are softcap * tanh(logits / softcap) first (config.final_logit_softcapping)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _fused_linear_ce_function().apply(hidden, weight, labels, chunk_size, softcap)


def shifted_label_positions(hidden, labels):
    """(hidden at positions that predict a real label, those labels): the causal shift, ignoring -100."""
    h = hidden[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


# Config fields that rescale the logits (Cohere, Granite, Falcon-H1 ...): the chunked CE computes hidden @ weight.T
# (then the soft-capping of final_logit_softcapping, which it applies), so it would score those models' logits
# wrongly.
_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def logit_softcap(model) -> float | None:
    """config.final_logit_softcapping (Gemma 2 and 3): the cap the model's forward puts on its logits, or None."""
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


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
    softcap = logit_softcap(model)

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
        kwargs["use_cache"] = False  # a KV cache turns off packed-sequence separation (varlen_attention.py)
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        h, y = shifted_label_positions(hidden, labels.to(hidden.device))
        # Looked up per call: PEFT and FSDP replace modules after the patch
        total = fused_linear_cross_entropy(h, self.get_output_embeddings().weight, y, chunk_size, softcap)
        count = torch.as_tensor(y.numel() if num_items_in_batch is None else num_items_in_batch)
        # clamped like TRL's loss: a step without label tokens gives a finite zero, not 0 / 0
        return CausalLMOutputWithPast(loss=total / count.clamp(min=1), logits=None)

    model.forward = types.MethodType(forward, model)


def chunked_loss_trainer():
    """TRL's SFTTrainer subclass whose loss is the chunked CE, computed inside the model's forward so DDP and PEFT
    still wrap it (pair it with add_chunked_loss_forward on the base model)."""
    from trl import SFTTrainer

    class ChunkedLossSFTTrainer(SFTTrainer):
        """TRL's entropy and token-accuracy logs need each token's full softmax, so they are not logged."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:  # the caller wants logits: TRL's path recomputes them
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = model(**{**inputs, "use_cache": False}, chunked_loss=True,
                         num_items_in_batch=num_items_in_batch).loss
            # As TRL's compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

    return ChunkedLossSFTTrainer
