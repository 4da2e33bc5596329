"""Tiny random-init models of six decoder families, built from configs (no download), for the family tests.

Every family gets the tests' own BPE tokenizer (models.build_tokenizer, trained here on a few sentences) with that
family's special tokens, EOS/BOS/pad choice and (where the release has one) a chat template in the release's layout.
Family-specific tokenizer behaviour (SentencePiece byte fallback, Llama-3's pre-tokenizer, Gemma's 262k vocab, ...)
is therefore out of scope: what is tested is each architecture's modules, attention, logits and template layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages.lib.testing.models import TINY_SHAPE, build_tokenizer

# Llama 3.x Instruct: BOS text, header tokens, <|eot_id|> ending every turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral Instruct: [INST] turns, the system prompt folded into the first user turn, answers closed by </s>.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\n\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + "
    "'[/INST]' }}{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
# Qwen2 Instruct: ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 3 Instruct (text part): no system role, its text opens the first user turn; the assistant is "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Phi-3 Instruct: <|role|> headers, <|end|> closing every turn.
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str                 # the transformers class
    config_class: str
    config: dict                      # config fields beyond the tiny shape
    special_tokens: tuple[str, ...]   # first in the vocabulary, in this order
    eos_token: str
    pad_token: str | None             # None: the release has none distinct from EOS (base_model picks or adds one)
    bos_token: str | None
    chat_template: str | None         # None: a base release (model.prompt_format: plain)
    linear_modules: tuple[str, ...]   # what lora.linear_module_names finds (the output head excluded)
    named_targets: tuple[str, ...]    # a lora.target_modules list for the tests
    notes: dict = field(default_factory=dict)


def _shape(**overrides) -> dict:
    return {**TINY_SHAPE, "max_position_embeddings": 1024, **overrides}


LLAMA_PROJ = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")

FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", "LlamaConfig", _shape(tie_word_embeddings=False),
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>"),
           eos_token="<|eot_id|>", pad_token=None, bos_token="<|begin_of_text|>", chat_template=LLAMA3_TEMPLATE,
           linear_modules=LLAMA_PROJ, named_targets=("q_proj", "v_proj")),
    # sliding_window below the tokenized length, so the window is really exercised
    Family("mistral", "MistralForCausalLM", "MistralConfig", _shape(sliding_window=16, tie_word_embeddings=False),
           ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
           eos_token="</s>", pad_token=None, bos_token="<s>", chat_template=MISTRAL_TEMPLATE,
           linear_modules=LLAMA_PROJ, named_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    # Qwen2: biases on q/k/v
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _shape(tie_word_embeddings=False),
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, chat_template=CHATML_TEMPLATE,
           linear_modules=LLAMA_PROJ, named_targets=("q_proj", "v_proj")),
    # Gemma 3 text: tied embeddings scaled by sqrt(hidden), q/k norms, a sliding and a global layer; the final
    # logit soft-capping of Gemma 2 is on (Gemma3TextConfig keeps the field, None in the released checkpoints)
    Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig",
           _shape(head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                  tie_word_embeddings=True),
           ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
           eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", chat_template=GEMMA3_TEMPLATE,
           linear_modules=LLAMA_PROJ, named_targets=("q_proj", "v_proj", "down_proj")),
    # Falcon-40B/180B layout: fused query_key_value, grouped KV heads, parallel attention + MLP, tied head; a base
    # release (no chat template) whose only special token is EOS, so base_model must add a pad token
    Family("falcon", "FalconForCausalLM", "FalconConfig",
           {"hidden_size": 64, "ffn_hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_kv_heads": 2, "new_decoder_architecture": True, "parallel_attn": True, "bias": False,
            "alibi": False, "max_position_embeddings": 1024, "tie_word_embeddings": True},
           ("<|endoftext|>",), eos_token="<|endoftext|>", pad_token=None, bos_token=None, chat_template=None,
           linear_modules=("dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"),
           named_targets=("query_key_value", "dense")),
    # Phi-3 mini: fused qkv_proj and gate_up_proj; pad = EOS in the release, so base_model falls back to <unk>
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", _shape(tie_word_embeddings=False),
           ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<s>", chat_template=PHI3_TEMPLATE,
           linear_modules=("down_proj", "gate_up_proj", "o_proj", "qkv_proj"), named_targets=("qkv_proj", "o_proj")),
)}


def family_tokenizer(family: Family, chat_template: bool = True):
    """The tests' tokenizer with the family's special tokens (ids 0.. in order), EOS, BOS, pad and template."""
    tokenizer = build_tokenizer(special_tokens=family.special_tokens, eos_token=family.eos_token,
                                pad_token=family.pad_token, chat_template=family.chat_template if chat_template
                                else None, bos_token=family.bos_token)
    return tokenizer


def family_model(family: Family, tokenizer, seed: int = 0):
    """The family's tiny model with transformers' own random initialisation, its token ids from `tokenizer`."""
    import torch
    import transformers

    config_class = getattr(transformers, family.config_class)
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = config_class(**{**family.config, **ids})
    torch.manual_seed(seed)
    return getattr(transformers, family.architecture)(config)


def write_family_base(family: Family | str, out: str | Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A family's tiny model + tokenizer saved as a released HF folder would be (safetensors), the input of the
    base_model stage (model.source: <folder>)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = family_tokenizer(family, chat_template)
    model = family_model(family, tokenizer, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
