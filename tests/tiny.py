"""A tiny random-init Llama with a real (trained-here) byte-level BPE tokenizer and a ChatML template.

Shaped like the default model (Llama architecture, <|im_start|>/<|im_end|> chat turns, EOS = <|im_end|>)
but a few hundred thousand parameters, so tests run in seconds and never touch a hub.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2-Instruct renders it (system turn optional).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What are the symptoms of glaucoma? Glaucoma often has no symptoms at first.",
    "What causes diabetes? Diabetes is caused by problems with insulin.",
    "How to prevent heart disease? Eat healthy food, exercise and do not smoke.",
    "What is (are) asthma? Asthma is a chronic disease of the airways of the lungs.",
    "Is this condition inherited? It is inherited in an autosomal dominant pattern.",
    "What are the treatments for cancer? Surgery, chemotherapy and radiation therapy.",
    "You are a careful medical information assistant. Answer the question accurately.",
    "How many people are affected? About 1 in 10,000 people are affected worldwide.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def write_tiny_base(out: Path, seed: int = 0) -> Path:
    """Save tokenizer + model as an HF folder (safetensors), like models/base."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
