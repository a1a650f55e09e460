"""Train the byte-level BPE tokenizer of the "say it kindly" task on its training corpus.

    python scripts/train_tokenizer.py        # writes src/rlhfkit/tasks/kindly/tokenizer/

Byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) with VOCAB_SIZE entries
including two special tokens: `<|endoftext|>` (end of text, also used as beginning of text)
and `<|pad|>`. Saved as a transformers PreTrainedTokenizerFast folder with a small chat
template so `apply_chat_template(messages)` works. Training reads only train.txt.xz; the
tokenizers BPE trainer is deterministic for a fixed input order, so reruns give the same file.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDLY = ROOT / "src" / "rlhfkit" / "tasks" / "kindly"
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Plain-text turns: a role header line, the content, then EOS. A generation prompt ends with
# the assistant header so the model continues as the assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train(lines: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=256, padding_side="right", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=KINDLY / "train.txt.xz")
    ap.add_argument("--out", type=Path, default=KINDLY / "tokenizer")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    # The Rust trainer parallelises over threads; one thread keeps merge ties resolved in one order.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.corpus.is_file():
        print(f"missing {args.corpus}: run scripts/build_corpus.py first", file=sys.stderr)
        return 2
    lines = lzma.decompress(args.corpus.read_bytes()).decode("utf-8").splitlines()
    fast = wrap(train(lines, args.vocab_size))
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    # Older transformers releases look the class up by this name; newer ones map it to their backend.
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.replace(args.out)
    n_tokens = sum(len(ids) for ids in fast(lines[:2000])["input_ids"])
    n_chars = sum(len(s) for s in lines[:2000])
    print(f"vocab {len(fast)} (eos={fast.eos_token_id}, pad={fast.pad_token_id}), "
          f"{n_chars / n_tokens:.2f} characters/token on 2000 training lines -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
