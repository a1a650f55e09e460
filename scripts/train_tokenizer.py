"""Build the word-level tokenizer of the "say it kindly" task from its training corpus.

    python scripts/train_tokenizer.py        # writes src/rlhfkit/tasks/kindly/tokenizer/

Every vocabulary entry is a whole English word, a punctuation mark or a special token, so a
model using it cannot spell a word that is not in its vocabulary: the gold panel's non-word
term (docs/task.md) can only come from punctuation placed oddly, never from made-up words.

Vocabulary (deterministic: counts sorted by frequency, ties by the word):

* special tokens `<|endoftext|>` (id 0: end of text, also beginning of text), `<|pad|>` (1),
  `<|unk|>` (2: any word outside the vocabulary);
* `▁` + word for each word of the training split (train.txt.xz only) seen at least MIN_COUNT
  times that the gold panel counts as English (`GoldPanel._is_word` on each of its panel tokens);
  a word is the run of a whitespace-separated chunk from its first to its last letter or digit
  ("don't", "well-known", "1990s");
* each ASCII punctuation mark glued to the text before it (`.`) and as an opening mark glued to
  the word after it (`▁(\ue000`); the marks the panel ignores when they stand alone (`- . , ; : ' "`)
  also after a space (`▁-`), the others standing alone (" & ") are unknown, so a model cannot
  write a lone symbol such as "!" or "(" between spaces (the panel would count it a non-word);
* `▁` (a lone space).

Encoding: whitespace runs become one space; a punctuation mark at the start of a chunk and
followed by more of the chunk is an opening mark (a private-use marker and a space are inserted
after it, applied three times for chains such as `("`); then Metaspace splits at spaces and the
split regex below cuts each piece into its word and its single punctuation marks. Decoding
joins the pieces (`▁` is a space; the first piece loses its leading space) and removes each
opening marker with the space after it, so decode(encode(text)) == text for text made of
vocabulary words and single spaces.
"""

from __future__ import annotations

import argparse
import collections
import json
import lzma
import os
import shutil
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDLY = ROOT / "src" / "rlhfkit" / "tasks" / "kindly"
MIN_COUNT = 2
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"
SPACE = "\u2581"          # ▁, Metaspace's marker for a space
OPEN = "\ue000"            # private-use marker after an opening punctuation mark
STANDALONE = "-.,;:'\""     # marks the panel ignores as tokens of their own (panel._IGNORED)
PASSES = 3                 # opening marks recognised in chains of up to three ("(" then '"' ...)
_PUNCT = "".join("\\" + c for c in string.punctuation)
# an opening mark: at the start of a chunk, followed by a character that is neither space nor marker
OPENING = rf"(?<=^[{_PUNCT}]|\s[{_PUNCT}])(?=[^\s{OPEN}])"
PIECE = rf"{SPACE}?[A-Za-z0-9](?:[^\s{SPACE}]*[A-Za-z0-9])?|{SPACE}?[^A-Za-z0-9{SPACE}]{OPEN}?|{SPACE}"

# Plain-text turns: a role header line, the content, then EOS. A generation prompt ends with
# the assistant header so the model continues as the assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def pipeline():
    """(normalizer, pre_tokenizer, decoder) of the tokenizer (no vocabulary needed)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s+"), " ")]
        + [normalizers.Replace(Regex(OPENING), OPEN + " ") for _ in range(PASSES)])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(PIECE), behavior="isolated"),
    ])
    decoder = decoders.Sequence([
        decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        decoders.Fuse(),
        decoders.Replace(OPEN + " ", ""),
        decoders.Replace(OPEN, ""),
    ])
    return normalizer, pre, decoder


def is_english(word: str, panel) -> bool:
    """Whether the gold panel reads `word` as English words only (at least one)."""
    from rlhfkit.judges.panel import response_tokens

    toks = response_tokens(word)
    return bool(toks) and all(panel._is_word(t) for t in toks)


def build_vocab(lines: list[str], min_count: int = MIN_COUNT) -> dict[str, int]:
    from rlhfkit.judges import GoldPanel

    normalizer, pre, _ = pipeline()
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            if piece.startswith(SPACE) and piece[1:2].isalnum():
                counts[piece] += 1
    panel = GoldPanel()
    words = sorted((w for w, n in counts.items() if n >= min_count and is_english(w[1:], panel)),
                   key=lambda w: (-counts[w], w))
    punct = ([c for c in string.punctuation] + [SPACE + c + OPEN for c in string.punctuation]
             + [SPACE + c for c in STANDALONE])
    tokens = [EOS, PAD, UNK, SPACE] + punct + words
    return {t: i for i, t in enumerate(tokens)}


def build(lines: list[str], min_count: int = MIN_COUNT):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(build_vocab(lines, min_count), unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = pipeline()
    tok.add_special_tokens([EOS, PAD, UNK])
    return tok


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=256, padding_side="right", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=KINDLY / "train.txt.xz")
    ap.add_argument("--out", type=Path, default=KINDLY / "tokenizer")
    ap.add_argument("--min-count", type=int, default=MIN_COUNT)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.corpus.is_file():
        print(f"missing {args.corpus}: run scripts/build_corpus.py first", file=sys.stderr)
        return 2
    if args.min_count < 1:
        print(f"--min-count must be >= 1, got {args.min_count}", file=sys.stderr)
        return 2
    lines = lzma.decompress(args.corpus.read_bytes()).decode("utf-8").splitlines()
    fast = wrap(build(lines, args.min_count))
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
    sample = lines[:2000]
    ids = fast(sample, add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(x) for x in ids)
    n_unk = sum(x.count(fast.unk_token_id) for x in ids)
    n_words = sum(len(s.split()) for s in sample)
    print(f"vocab {len(fast)} (eos={fast.eos_token_id}, pad={fast.pad_token_id}, unk={fast.unk_token_id}), "
          f"{n_tokens / n_words:.2f} tokens/word, {n_unk / n_tokens:.2%} unknown on 2000 training lines -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
