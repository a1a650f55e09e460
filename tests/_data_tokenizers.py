"""Tokenizers for the data-layer tests: the bundled word-level one and a tiny byte-level BPE trained here."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "Hello world, the world is big.", "The weather is nice today.", "Hello there, kind friend.",
    "A wonderful world of words.", "Be kind to the world.", "You are great and kind.",
    "Go away now.", "What a lovely day it is.",
]

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "rlhfkit" / "tasks" / "kindly" / "tokenizer"


def trained_tokenizer():
    """Byte-level BPE trained on a few sentences: distinct <s>, </s>, <pad>, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(SENTENCES * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bundled_tokenizer():
    """The bundled task's tokenizer (BOS = EOS = <|endoftext|>, with a chat template), or None."""
    if not (BUNDLED / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUNDLED))
