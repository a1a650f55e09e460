"""Tiny random models of several architectures, built from transformers configs, saved as a
user would have them in a folder: model + tokenizer with that family's special-token habits.

* gpt2: learned positions (n_positions), Conv1D layers, BOS = EOS = <|endoftext|>, NO pad token;
* qwen2: ChatML chat template, no BOS, EOS <|im_end|>, pad <|endoftext|>;
* llama: BOS <s>-style (the bundled <|endoftext|>), distinct pad;
* mistral: like llama, sliding-window attention config;
* gemma: like llama, with embeddings scaled by sqrt(hidden), GeGLU MLP and an explicit head_dim.
The tokenizer is the bundled word-level one with the family's special tokens added; qwen2's is a
byte-level BPE trained here on the bundled corpus (transformers loads a qwen2 folder's tokenizer
as Qwen2Tokenizer, which rebuilds a byte-level BPE pipeline and would drop a word-level one).
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("gpt2", "qwen2", "llama", "mistral", "gemma")
MAX_POSITIONS = 64

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_bpe(vocab_size: int = 1024):
    """A byte-level BPE (GPT-2 pre-tokenisation) on the bundled corpus's first 5,000 lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhfkit.tasks import kindly

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(kindly.corpus_lines("train")[:5000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)


def make_tokenizer(arch: str):
    from transformers import AutoTokenizer

    from rlhfkit.models import resolve_path

    tok = byte_level_bpe() if arch == "qwen2" else AutoTokenizer.from_pretrained(resolve_path("kindly:tokenizer"))
    if arch == "gpt2":
        tok.pad_token = None
        tok.chat_template = None
    elif arch == "qwen2":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.bos_token = None
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|endoftext|>"
        tok.chat_template = CHATML
    return tok


def make_config(arch: str, vocab_size: int, tok, dropout: float = 0.0):
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=MAX_POSITIONS, resid_pdrop=dropout,
                          embd_pdrop=dropout, attn_pdrop=dropout, **common)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig, "gemma": GemmaConfig}[arch]
    extra = {"sliding_window": 32} if arch == "mistral" else {"head_dim": 16} if arch == "gemma" else {}
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
