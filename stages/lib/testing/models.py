"""Random-init Llama models and a tiny tokenizer, for tests and benchmarks (no stage imports this module).

One builder for every random model the project makes: the tests' tiny base (a few hundred thousand parameters,
shaped like the default model), the small models of the speed-lever checks, and the benchmarks' real-shape 135M to
8B models, whose weights do not matter but whose FLOPs and memory do.
"""

from __future__ import annotations

from pathlib import Path

# The tests' tiny decoder: Llama layout (GQA, SwiGLU) at toy width
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}

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


def random_llama(config, seed: int = 0, device: str = "cpu", dtype=None, init_std: float | None = None):
    """A LlamaForCausalLM of `config` (a LlamaConfig) with random weights, on `device`.

    init_std None: transformers' own initialisation after torch.manual_seed(seed), so the same seed gives the same
    weights. A float: the model is made on the meta device and filled in place on `device` (weights N(0, init_std),
    norms 1), which takes seconds at 8B where the default initialisation on a CPU takes minutes. dtype: a torch
    dtype or its name; None keeps float32.
    """
    import torch
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if init_std is None:
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        return model if dtype is None else model.to(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype or torch.float32)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, init_std, generator=gen)
    # buffers are garbage after to_empty: rebuild the rotary embedding's inv_freq on the device
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    model.tie_weights()
    return model


def tiny_llama(vocab_size: int, seed: int = 0, **config):
    """The tests' tiny Llama (TINY_SHAPE); `config` overrides or adds LlamaConfig fields."""
    from transformers import LlamaConfig

    return random_llama(LlamaConfig(vocab_size=vocab_size, **{**TINY_SHAPE, **config}), seed=seed)


def build_tokenizer(special_tokens=SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    chat_template: str | None = CHAT_TEMPLATE, bos_token: str | None = None):
    """A byte-level BPE tokenizer trained here on CORPUS, with ChatML turns and EOS = <|im_end|> (as the default
    model), pad <|endoftext|>; the arguments make a base-model-like one (no ChatML tokens, no template) or another
    family's (families.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token,
                                   unk_token=None, bos_token=bos_token)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_model(vocab_size: int, seed: int = 0):
    """The tiny base model: tied embeddings, pad 0 and EOS 2 as build_tokenizer numbers them."""
    return tiny_llama(vocab_size, seed, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=2,
                      pad_token_id=0, bos_token_id=None)


def write_tiny_base(out: str | Path, seed: int = 0) -> Path:
    """Tokenizer + tiny model saved as an HF folder (safetensors), like models/base."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_plain_base(out: str | Path, seed: int = 0) -> Path:
    """A tiny *base* model folder: no chat template and no ChatML tokens (EOS <|endoftext|> = 0, pad <pad> = 1)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<pad>"), eos_token="<|endoftext|>",
                                pad_token="<pad>", chat_template=None)
    model = tiny_llama(len(tokenizer), seed, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=0,
                       pad_token_id=1, bos_token_id=None)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 0, 1
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
