"""The bundled "say it kindly" task: corpus, prompts, SFT records, tokenizer, licences."""

import importlib.util
import json
import lzma
import sys
from pathlib import Path

import pytest

from rlhfkit.tasks import kindly

ROOT = Path(__file__).resolve().parents[1]
HAVE_DEBIAN_SOURCES = Path("/usr/share/wordnet/data.noun").is_file() and Path("/usr/share/games/fortunes").is_dir()


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_corpus_splits_are_disjoint_and_sized():
    train, eval_ = kindly.corpus_lines("train"), kindly.corpus_lines("eval")
    assert 30_000 < len(train) < 100_000
    assert 2_000 < len(eval_) < len(train) / 5
    assert not set(train) & set(eval_)
    assert len(set(train)) == len(train)
    assert all(0 < len(s) <= 200 and "\n" not in s for s in train[:5000])
    assert kindly.corpus_lines("train") == train  # deterministic and not mutated by callers
    with pytest.raises(ValueError, match="split"):
        kindly.corpus_lines("test")


@pytest.mark.skipif(not HAVE_DEBIAN_SOURCES, reason="Debian wordnet-base/fortunes not installed")
def test_corpus_rebuild_matches_shipped_files():
    build = _script("build_corpus")
    train, eval_, _ = build.build()
    assert train == kindly.corpus_lines("train")
    assert eval_ == kindly.corpus_lines("eval")


def test_prompts_come_from_held_out_sentences_and_splits_are_disjoint():
    train_p, eval_p = kindly.prompts("train"), kindly.prompts("eval")
    assert 2_000 <= len(train_p) <= 5_000 and 200 <= len(eval_p) <= 1_000
    assert not set(train_p) & set(eval_p)
    assert len(set(train_p)) == len(train_p)
    assert all(3 <= len(p.split()) <= 5 for p in train_p + eval_p)
    held_out = set(kindly.corpus_lines("eval"))
    for rec in kindly.prompt_records("eval")[:200]:
        assert rec["prompt"] + rec["completion"] in held_out
        assert len(rec["completion"].split()) >= 2
    assert kindly.prompts("train") == train_p


def test_sft_records_cut_sentences_into_prompt_and_completion():
    train = kindly.sft_records("train")
    assert len(train) > 20_000
    sentences = set(kindly.corpus_lines("train"))
    for rec in train[:500]:
        assert rec["completion"].startswith(" ") and not rec["prompt"].endswith(" ")
        assert rec["prompt"] + rec["completion"] in sentences
    eval_ = kindly.sft_records("eval")
    assert [r["prompt"] for r in eval_] == kindly.prompts("eval")


def test_tokenizer_round_trips_and_has_special_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kindly.tokenizer_path())
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.unk_token == "<|unk|>" and len({tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 3
    lines = kindly.corpus_lines("eval")[:1000]
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    known = [(line, x) for line, x in zip(lines, ids) if tok.unk_token_id not in x]
    assert len(known) > 500
    for line, x in known:
        assert tok.decode(x) == line
    # one token per word and mark: about one token per whitespace-separated word
    assert sum(len(x) for _, x in known) < 1.3 * sum(len(line.split()) for line, _ in known)
    # held-out words outside the vocabulary (all seen fewer than twice in training) are unknown
    unknown = sum(x.count(tok.unk_token_id) for x in ids) / sum(len(x) for x in ids)
    assert 0 < unknown < 0.12
    assert tok.decode(tok("Ünïcödé ☺ and  two spaces\ttab")["input_ids"], skip_special_tokens=True) == "and two spaces tab"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi<|endoftext|>\nassistant:"


def test_tokenizer_cannot_spell_a_non_word():
    """Every entry is a special token, a punctuation mark or a word the gold panel reads as English,
    and any run of words with opening and closing marks around them decodes to text without non-words."""
    import random
    import string

    from transformers import AutoTokenizer

    from rlhfkit.judges import GoldPanel
    from rlhfkit.judges.panel import response_tokens

    train_tokenizer = _script("train_tokenizer")
    panel = GoldPanel()
    tok = AutoTokenizer.from_pretrained(kindly.tokenizer_path())
    vocab = tok.get_vocab()
    space, mark = train_tokenizer.SPACE, train_tokenizer.OPEN
    words, opening, closing = [], [], []
    for entry, i in vocab.items():
        if entry in tok.all_special_tokens or entry == space:
            continue
        core = entry.removeprefix(space).removesuffix(mark)
        if core in string.punctuation:
            (opening if entry.endswith(mark) else closing if not entry.startswith(space) else []).append(i)
            if entry.startswith(space) and not entry.endswith(mark):
                assert not response_tokens(core), entry  # a lone mark stands only where the panel ignores it
            continue
        assert entry.startswith(space) and train_tokenizer.is_english(core, panel), entry
        words.append(i)
    assert len(words) > 10_000 and len(opening) == len(closing) == len(string.punctuation)
    rng = random.Random(0)
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 12)):
            ids += rng.sample(opening, rng.choice([0, 0, 0, 1, 2])) + [rng.choice(words)]
            ids += rng.sample(closing, rng.choice([0, 0, 1, 2]))
        text = tok.decode(ids)
        assert panel.degeneracy(text)["nonword"] == 0, text


def test_unknown_words_are_never_a_training_target():
    from rlhfkit.models import load_tokenizer
    from rlhfkit.recipes.pretrain import make_blocks
    from rlhfkit.recipes.sft import load_sft_examples

    tok = load_tokenizer("kindly:tokenizer")
    unk = tok.unk_token_id
    lines = ["the zqxjv was kind", "a kind word"] * 8
    blocks = make_blocks(lines, tok, 8)
    assert any(unk in b["input_ids"] for b in blocks)
    for b in blocks:
        assert [-100 if t == unk else t for t in b["input_ids"]] == b["labels"]
    examples = load_sft_examples("kindly", tok, max_length=64, split="eval").examples
    assert any(unk in ex["input_ids"] for ex in examples)
    assert all(unk not in ex["labels"] for ex in examples)


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers missing")
def test_tokenizer_training_is_deterministic(tmp_path):
    train_tokenizer = _script("train_tokenizer")
    assert train_tokenizer.main(["--out", str(tmp_path / "tok")]) == 0
    ours = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    shipped = json.loads((kindly.tokenizer_path() / "tokenizer.json").read_text())
    assert ours == shipped
    assert train_tokenizer.main(["--out", str(tmp_path / "tok"), "--min-count", "0"]) == 2


def test_base_model_path_names_the_missing_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(kindly, "HERE", tmp_path)
    with pytest.raises(FileNotFoundError, match="rlhfkit pretrain"):
        kindly.base_model_path()


def test_licences_ship_with_the_corpus():
    text = kindly.licence_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    assert "The Regents of the University of California" in text
    shipped = lzma.decompress((kindly.HERE / "train.txt.xz").read_bytes())
    assert shipped.decode("utf-8").count("\n") == len(kindly.corpus_lines("train"))
