"""Varlen attention: packed rows through `torch.nn.attention.varlen.varlen_attn` (PyTorch's own flash varlen kernel,
no flash-attn wheel needed), so attention costs sum(len_i^2) and no [T, T] mask is built.

transformers' plain "sdpa" also honours packed position ids (masking_utils.find_packed_sequence_indices -> a
block-diagonal boolean mask), but that mask is dense, so attention then costs T^2 and T^2 bytes: fine for short rows,
wasteful for 16k-token rows. A CUDA speed-up: on a 2-core CPU packing measured slower than padded batches, and there
`_varlen_reference` (per-sequence SDPA) stands in for the kernel. Packed batches must run with use_cache=False: with a
KV cache transformers skips packed-sequence detection and examples attend to each other.
"""

from __future__ import annotations

import functools
import inspect


VARLEN_ATTENTION = "varlen_sdpa"


def _cu_seqlens_from_position_ids(position_ids):
    import torch

    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        return None, None
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()], device=pos.device)])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu, int((ends - starts).max())


def _varlen_reference(q, k, v, cu, scale, sliding_window=None):
    """Per-sequence SDPA: the same result as the flash varlen kernel, for CPU (and tests). `sliding_window`: each
    token sees itself and the sliding_window - 1 tokens before it, as transformers' sliding_window_overlay."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
        mask = None
        if sliding_window is not None:
            i = torch.arange(e - s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                  enable_gqa=qs.shape[1] != ks.shape[1])[0].transpose(0, 1)
    return out


@functools.cache
def _varlen_params() -> frozenset:
    from torch.nn.attention import varlen

    return frozenset(inspect.signature(varlen.varlen_attn).parameters)


def _varlen_flash(q, k, v, cu, max_len, scale, sliding_window=None):
    from torch.nn.attention import varlen

    params = _varlen_params()
    kwargs = {"scale": scale} if "scale" in params else {}
    # The causal flag moved from is_causal (torch 2.10/2.11) to window_size=(-1, 0) (later releases), whose left
    # bound also gives a sliding window: (W - 1, 0) keeps the token and the W - 1 before it, as transformers' mask.
    if "window_size" in params:
        kwargs["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif sliding_window is not None:
        raise ValueError("this torch's varlen_attn has no window_size, so it cannot run sliding-window layers")
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
        if attention_mask is None and kwargs.get("sliding_window") is not None and same_len:
            # _varlen_mask built no mask (no padding), so SDPA would run plain causal: give it the window
            i = torch.arange(query.shape[2], device=query.device)
            window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - kwargs["sliding_window"])
            attention_mask = window[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout and module.training:
        raise ValueError("varlen attention does not implement attention dropout")
    if kwargs.get("softcap") is not None:
        raise ValueError("varlen attention does not implement attention logit soft-capping")
    sliding_window = kwargs.get("sliding_window")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    cu = cu.to(device=q.device, dtype=torch.int32)
    max_len = int(max_len)
    dtype = _flash_dtype(q)
    if dtype is not None:
        q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
        out = _varlen_flash(q, k, v, cu, max_len, scaling, sliding_window)
    else:
        out = _varlen_reference(q, k, v, cu, scaling, sliding_window)
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

    Use it with `attn_implementation=VARLEN_ATTENTION` (or `model.set_attn_implementation`). Packed batches (TRL's
    padding-free packing) then skip the dense [T, T] mask. Padded batches, generation and CPU keep working (SDPA / a
    per-sequence reference).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def varlen_unsupported(model) -> str | None:
    """Why the varlen attention cannot stand in for this model's attention, or None when it can."""
    import transformers

    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        # Falcon, for one: its attention classes test config._attn_implementation == "sdpa" themselves
        return (f"{name} does not call its attention through transformers' AttentionInterface (transformers "
                f"{transformers.__version__}), so the varlen function would never run")
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None):
        return f"{name} soft-caps its attention logits (attn_logit_softcapping), which the varlen kernel does not"
    layer_types = getattr(config, "layer_types", None)
    windowed = "sliding_attention" in layer_types if layer_types else bool(getattr(config, "sliding_window", None))
    if windowed and varlen_available() and "window_size" not in _varlen_params():
        return f"{name} has sliding-window layers and this torch's varlen_attn has no window_size"
    return None


@functools.cache
def varlen_available() -> bool:
    """Whether this torch ships the flash varlen kernel (CUDA only; CPU uses the per-sequence reference)."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True
