"""The bundled "say it kindly" task: corpus, tokenizer, base checkpoint, prompts.

Sentiment-steered continuation (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 3.1): the policy continues the first words of a real English sentence
and is judged by a held-out panel of human raters (:class:`rlhfkit.judges.GoldPanel`).

Data (built by ``scripts/build_corpus.py`` from Debian wordnet-base and fortunes, see LICENSES):

* ``corpus_lines("train")`` -- sentences for pretraining and the tokenizer (90 %);
* ``corpus_lines("eval")``  -- held-out sentences (10 %): held-out perplexity, and the source of
  every prompt, so no prompt's sentence was seen in pretraining;
* ``prompts(split)``        -- the first 3-5 words of held-out sentences that have at least two
  more words; those sentences are split 85/15 into "train" and "eval" prompts;
* ``sft_records(split)``    -- prompt/completion pairs cut the same way: "train" from the training
  corpus, "eval" from the sentences behind the eval prompts.

Everything is deterministic: the same call returns the same list on every machine.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "eval")
PROMPT_WORDS = (3, 4, 5)
MIN_COMPLETION_WORDS = 2
EVAL_PROMPT_SHARE = 0.15


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


@functools.lru_cache(maxsize=2)
def _lines(split: str) -> tuple[str, ...]:
    path = HERE / f"{split}.txt.xz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/build_corpus.py`")
    return tuple(lzma.decompress(path.read_bytes()).decode("utf-8").splitlines())


def corpus_lines(split: str = "train") -> list[str]:
    """Sentences of the corpus split ("train" 90 %, "eval" 10 % held out), one per item."""
    _check_split(split)
    return list(_lines(split))


def _stable_unit(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text alone (no global RNG, no Python hash seed)."""
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _cut(sentence: str) -> tuple[str, str] | None:
    """Split a sentence into (first k words, " " + the rest); k in PROMPT_WORDS fixed per sentence."""
    words = sentence.split()
    k = PROMPT_WORDS[int(_stable_unit(sentence, "k") * len(PROMPT_WORDS))]
    if len(words) < k + MIN_COMPLETION_WORDS:
        k = len(words) - MIN_COMPLETION_WORDS
        if k < PROMPT_WORDS[0]:
            return None
    return " ".join(words[:k]), " " + " ".join(words[k:])


@functools.lru_cache(maxsize=4)
def _pairs(source: str, split: str) -> tuple[tuple[str, str], ...]:
    """(prompt, completion) pairs. source "prompts": held-out sentences split by a stable hash."""
    if source == "corpus":
        sentences = _lines(split)
    else:
        want_eval = split == "eval"
        sentences = tuple(s for s in _lines("eval")
                          if (_stable_unit(s, "prompt-split") < EVAL_PROMPT_SHARE) == want_eval)
    out: list[tuple[str, str]] = []
    # train prompts skip any prompt string that is also an eval prompt (two sentences may share
    # their first words), so the two prompt sets are disjoint as strings, not only as sentences
    seen = {p for p, _ in _pairs("prompts", "eval")} if (source, split) == ("prompts", "train") else set()
    for s in sentences:
        cut = _cut(s)
        if cut is None:
            continue
        # one record per distinct prompt keeps the prompt sets free of duplicates
        if source == "prompts" and cut[0] in seen:
            continue
        seen.add(cut[0])
        out.append(cut)
    return tuple(out)


def prompts(split: str = "train") -> list[str]:
    """First 3-5 words of held-out sentences; "train" and "eval" prompts come from disjoint sentences."""
    _check_split(split)
    return [p for p, _ in _pairs("prompts", split)]


def prompt_records(split: str = "train") -> list[dict]:
    """Prompts with the reference continuation written by the sentence's author."""
    _check_split(split)
    return [{"prompt": p, "completion": c} for p, c in _pairs("prompts", split)]


def sft_records(split: str = "train") -> list[dict]:
    """prompt/completion dicts for SFT: prompt = first words, completion = " rest of sentence".

    "train" cuts the training corpus; "eval" cuts the sentences behind the eval prompts, so the
    held-out SFT loss is measured on text the model never saw.
    """
    _check_split(split)
    source = "corpus" if split == "train" else "prompts"
    return [{"prompt": p, "completion": c} for p, c in _pairs(source, split)]


def tokenizer_path() -> Path:
    """Folder of the bundled word-level tokenizer (load with AutoTokenizer.from_pretrained)."""
    path = HERE / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/train_tokenizer.py` "
                                "(the base model must then be rebuilt too: `python scripts/build_base.py`)")
    return path


def base_model_path() -> Path:
    """Folder of the bundled pretrained base model (a tiny Llama saved with save_pretrained)."""
    path = HERE / "base"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled base checkpoint is not at {path} yet; build it with "
            "`python scripts/build_base.py` (tokenizer and pretraining) or "
            "`rlhfkit pretrain --config configs/pretrain_kindly.yaml` (see docs/task.md)")
    return path


def licence_text() -> str:
    """Licence notices of the corpus sources (WordNet 3.0 licence, fortunes BSD notice)."""
    return (HERE / "LICENSES").read_text()


__all__ = ["corpus_lines", "prompts", "prompt_records", "sft_records", "tokenizer_path",
           "base_model_path", "licence_text"]
