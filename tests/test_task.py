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
    assert len(tok) == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    for text in kindly.corpus_lines("eval")[:300] + ["Ünïcödé ☺ and  two spaces\ttab"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    line = kindly.corpus_lines("train")[0]
    assert len(tok(line)["input_ids"]) < len(line) / 2  # it learned merges, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi<|endoftext|>\nassistant:"


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers missing")
def test_tokenizer_training_is_deterministic(tmp_path):
    train_tokenizer = _script("train_tokenizer")
    assert train_tokenizer.main(["--out", str(tmp_path / "tok")]) == 0
    ours = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    shipped = json.loads((kindly.tokenizer_path() / "tokenizer.json").read_text())
    assert ours["model"]["merges"] == shipped["model"]["merges"]
    assert ours["model"]["vocab"] == shipped["model"]["vocab"]


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
