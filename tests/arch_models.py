"""Tiny random models of several architectures, built from transformers configs, saved as a
user would have them in a folder: model + tokenizer with that family's special-token habits.

* gpt2: learned positions (n_positions), Conv1D layers, BOS = EOS = <|endoftext|>, NO pad token;
* qwen2: ChatML chat template, no BOS, EOS <|im_end|>, pad <|endoftext|>;
* llama: BOS <s>-style (the bundled <|endoftext|>), distinct pad;
* mistral: like llama, sliding-window attention config;
* gemma: like llama, with embeddings scaled by sqrt(hidden), GeGLU MLP and an explicit head_dim.

ARCHS_MORE, a second tuple so the main matrix's runtime does not grow with it:

* qwen3: like qwen2 (ChatML, byte-level BPE), with q/k norms and an explicit head_dim;
* phi3: fused qkv / gate_up projections, Phi-3's <|user|> ... <|end|> chat template, NO pad token;
* olmo2: untied LM head (lm_head is its own weight), q/k norms, distinct pad <|pad|>;
* gpt_neox: fused query_key_value, partial rotary, untied embed_out, BOS = EOS, NO pad token.
The tokenizer is the bundled word-level one with the family's special tokens added; qwen2's and
qwen3's are a byte-level BPE trained here on the bundled corpus (transformers loads such a folder's
tokenizer as Qwen2Tokenizer, which rebuilds a byte-level BPE pipeline and would drop a word-level
one); phi3's and gpt_neox's are that BPE with no pad token in the vocabulary (1024 tokens), so a
reward model built on them gets a new pad token and a resized embedding (1025 rows).
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("gpt2", "qwen2", "llama", "mistral", "gemma")
ARCHS_MORE = ("qwen3", "phi3", "olmo2", "gpt_neox")
MAX_POSITIONS = 64

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3_CHAT = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)
OLMO2_CHAT = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def byte_level_bpe(vocab_size: int = 1024, pad: bool = True):
    """A byte-level BPE (GPT-2 pre-tokenisation) on the bundled corpus's first 5,000 lines; without
    `pad` it has no pad token at all, not even an unused one (as Phi-3's and GPT-NeoX's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhfkit.tasks import kindly

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"][:2 if pad else 1],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(kindly.corpus_lines("train")[:5000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>" if pad else None, clean_up_tokenization_spaces=False)


def make_tokenizer(arch: str):
    from transformers import AutoTokenizer

    from rlhfkit.models import resolve_path

    if arch in ("qwen2", "qwen3"):
        tok = byte_level_bpe()
    elif arch in ("phi3", "gpt_neox"):
        tok = byte_level_bpe(pad=False)
    else:
        tok = AutoTokenizer.from_pretrained(resolve_path("kindly:tokenizer"))
    if arch in ("gpt2", "gpt_neox"):
        tok.pad_token = None
        tok.chat_template = None
    elif arch == "phi3":
        tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
        tok.pad_token = None
        tok.chat_template = PHI3_CHAT
    elif arch == "olmo2":
        tok.chat_template = OLMO2_CHAT
    elif arch in ("qwen2", "qwen3"):
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.bos_token = None
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|endoftext|>"
        tok.chat_template = CHATML
    return tok


def make_config(arch: str, vocab_size: int, tok, dropout: float = 0.0):
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=MAX_POSITIONS, resid_pdrop=dropout,
                          embd_pdrop=dropout, attn_pdrop=dropout, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=MAX_POSITIONS, rotary_pct=0.5, hidden_dropout=dropout,
                             attention_dropout=dropout, tie_word_embeddings=False, **common)
    if arch == "phi3":
        return Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, max_position_embeddings=MAX_POSITIONS,
                          original_max_position_embeddings=MAX_POSITIONS, resid_pdrop=dropout, embd_pdrop=dropout,
                          attention_dropout=dropout, tie_word_embeddings=False, **common)
    if arch == "olmo2":
        return Olmo2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, max_position_embeddings=MAX_POSITIONS, attention_dropout=dropout,
                           tie_word_embeddings=False, **common)
    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "mistral": MistralConfig, "gemma": GemmaConfig}[arch]
    extra = {"sliding_window": 32} if arch == "mistral" else {"head_dim": 16} if arch in ("gemma", "qwen3") else {}
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=64, max_position_embeddings=MAX_POSITIONS, attention_dropout=dropout,
               tie_word_embeddings=True, **extra, **common)


def make_model_folder(arch: str, folder: str | Path, dropout: float = 0.0, seed: int = 0) -> str:
    """Write a tiny random causal LM of `arch` and its tokenizer to `folder`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tok), tok, dropout))
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
